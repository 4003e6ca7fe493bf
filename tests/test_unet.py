"""UNet: shapes, dtypes, gradients, input validation, config validation, no recompiles."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import UNet, UNetConfig, init_unet, mnist_unet_config, unet_param_shapes

TINY = UNetConfig(
    in_channels=2, out_channels=3, block_channels=(16, 32), layers_per_block=1,
    attention=(None, "cross"), mid_attention="self", num_heads=2, norm_groups=8, context_dim=8,
    num_classes=3, class_conditioning="embedding",
)  # fmt: skip
B = 2


@pytest.fixture(scope="module")
def tiny_params():
    return init_unet(TINY, jax.random.key(0))


def inputs(config=TINY, size=(6, 6), seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k[0], (B, *size, config.in_channels))
    t = jnp.array([0, 999], jnp.int32)
    kw = {}
    if config.num_classes is not None:
        kw["labels"] = jnp.array([config.num_classes, 0], jnp.int32)  # the null label is valid
    if config.needs_context:
        kw["context"] = jax.random.normal(k[2], (B, 4, config.context_dim))
    return x, t, kw


@jax.jit
def _apply_tiny(params, x, t, kw):
    return UNet(TINY).apply({"params": params}, x, t, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("size", [(6, 6), (5, 7)])
def test_shapes_any_spatial_size(tiny_params, size):
    x, t, kw = inputs(size=size)
    out = _apply_tiny(tiny_params, x, t, kw)
    assert out.shape == (B, *size, TINY.out_channels) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.slow
def test_mnist_preset():
    cfg = mnist_unet_config()
    assert cfg.num_classes == 10 and cfg.class_conditioning == "cross_attention"
    shapes = unet_param_shapes(cfg)
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert 1_000_000 <= n <= 4_000_000, n
    assert shapes["class_tokens"]["embedding"]["embedding"].shape == (11, 4 * cfg.context_dim)
    params = init_unet(cfg, jax.random.key(1))
    x = jnp.ones((B, 28, 28, 1))
    apply = jax.jit(UNet(cfg).apply)
    out = apply({"params": params}, x, jnp.array([1, 2]), labels=jnp.array([9, 10]))
    assert out.shape == x.shape and np.isfinite(np.asarray(out)).all()
    # Extra context is appended to the class tokens (shape check only: traced, not compiled).
    ctx = jnp.ones((B, 3, cfg.context_dim))
    spec = jax.eval_shape(
        lambda p: UNet(cfg).apply({"params": p}, x, jnp.array([1, 2]), labels=jnp.array([0, 1]),
                                  context=ctx), params)  # fmt: skip
    assert spec.shape == x.shape
    unconditional = mnist_unet_config(num_classes=None)
    assert unconditional.context_dim is None and "cross" not in unconditional.attention


def _matmul_operand_dtypes(config, params, x, t, kw) -> list[tuple[str, tuple]]:
    """``(primitive, operand dtypes)`` of every conv / dot_general in the forward's jaxpr."""

    def fn(p, x, t, kw):
        return UNet(config).apply({"params": p}, x, t, **kw)

    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
                found.append((eqn.primitive.name, tuple(v.aval.dtype for v in eqn.invars)))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(params, x, t, kw).jaxpr)
    return found


@pytest.mark.slow
def test_bfloat16_compute_close_to_float32(tiny_params):
    """bf16 compute, f32 params: every conv and matmul takes bf16 operands; the output is finite,
    within 5% (relative to max |out|) of float32, and not equal to it (error above 1e-4).
    Measured about 1e-2."""
    cfg16 = dataclasses.replace(TINY, dtype=jnp.bfloat16)
    x, t, kw = inputs()
    ops = _matmul_operand_dtypes(cfg16, tiny_params, x, t, kw)
    assert {name for name, _ in ops} == {"conv_general_dilated", "dot_general"}
    bf16 = jnp.dtype(jnp.bfloat16)
    assert all(dtypes == (bf16, bf16) for _, dtypes in ops), ops
    ref = np.asarray(_apply_tiny(tiny_params, x, t, kw))
    out = jax.jit(UNet(cfg16).apply)({"params": tiny_params}, x, t, **kw)
    assert out.dtype == x.dtype  # the output comes back in x's dtype
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    err = np.abs(out - ref).max() / np.abs(ref).max()
    print(f"bf16 vs f32 relative error {err:.2e}")
    assert 1e-4 < err < 5e-2


@pytest.mark.slow
def test_bfloat16_params_float32_compute(tiny_params):
    """bf16 params, f32 compute: the params are upcast, so the forward equals float32 compute on
    the same (bf16-rounded) values; every conv and matmul runs in float32."""
    cfg = dataclasses.replace(TINY, param_dtype=jnp.bfloat16)
    params16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), tiny_params)
    x, t, kw = inputs()
    ops = _matmul_operand_dtypes(cfg, params16, x, t, kw)
    assert ops and all(d == (jnp.float32, jnp.float32) for _, d in ops), ops
    out = jax.jit(UNet(cfg).apply)({"params": params16}, x, t, **kw)
    assert out.dtype == jnp.float32
    ref = _apply_tiny(jax.tree.map(lambda a: a.astype(jnp.float32), params16), x, t, kw)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_attention_implementation_is_passed_through(tiny_params, monkeypatch):
    """``attention_implementation`` reaches every ``jax.nn.dot_product_attention`` call, and
    ``"xla"`` gives the default's output."""
    x, t, kw = inputs()
    cfg = dataclasses.replace(TINY, attention_implementation="xla")
    calls = []
    real = jax.nn.dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("implementation"))
        return real(*args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    jax.eval_shape(lambda p: UNet(cfg).apply({"params": p}, x, t, **kw), tiny_params)
    # Transformers (self + cross each): 1 on level 1 down, 2 up; the mid block: 1 self-attention.
    assert calls == ["xla"] * 7, calls
    monkeypatch.undo()
    out = jax.jit(UNet(cfg).apply)({"params": tiny_params}, x, t, **kw)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(_apply_tiny(tiny_params, x, t, kw)))


@pytest.mark.slow
def test_gradients_dropout_and_no_recompile(tiny_params):
    cfg = dataclasses.replace(TINY, dropout=0.5)
    x, t, kw = inputs()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def loss_and_out(params, x, key):
        def loss(p):
            out = UNet(cfg).apply({"params": p}, x, t, train=True, rngs={"dropout": key}, **kw)
            return jnp.mean(out**2), out

        return jax.value_and_grad(loss, has_aux=True)(params)

    (l1, out1), grads = loss_and_out(tiny_params, x, jax.random.key(1))
    (l2, out2), _ = loss_and_out(tiny_params, x + 1.0, jax.random.key(2))
    assert np.isfinite(float(l1)) and np.isfinite(float(l2))
    flat = jax.tree_util.tree_leaves_with_path(grads)
    dead = [jax.tree_util.keystr(p) for p, g in flat if not np.abs(np.asarray(g)).max() > 0]
    # Every leaf gets a gradient, the class table included: a leaf's max |grad| is over all its
    # entries, and the table's rows of the labels used are nonzero (unused rows stay zero).
    assert dead == [], dead
    eval_out = _apply_tiny(tiny_params, x, t, kw)
    assert not np.allclose(np.asarray(out1), np.asarray(eval_out))  # dropout is active


# Bad inputs: a ValueError naming the argument, raised while tracing (under jit too).


def _trace(config, x, t, **kw):
    fn = lambda p, x, t, kw: UNet(config).apply({"params": p}, x, t, **kw)  # noqa: E731
    return jax.eval_shape(fn, _shapes(config), x, t, kw)


@functools.lru_cache
def _shapes(config):
    return unet_param_shapes(config)


NO_CLASSES = UNetConfig(block_channels=(16, 32), norm_groups=8, attention=(None, "self"))


@pytest.mark.parametrize(
    "config, change, match",
    [
        (TINY, dict(x=jnp.ones((B, 6, 6))), "x must be"),
        (TINY, dict(x=jnp.ones((B, 6, 6, 3))), "x must have in_channels=2"),
        (TINY, dict(x=jnp.ones((B, 6, 6, 2), jnp.int32)), "x must be a float array"),
        (TINY, dict(x=jnp.ones((B, 6, 6, 2), bool)), "x must be a float array"),
        (TINY, dict(t=jnp.ones((B,), bool)), "t must hold int or float"),
        (TINY, dict(t=jnp.ones((B,), jnp.complex64)), "t must hold int or float"),
        (TINY, dict(t=jnp.ones((B, 1), jnp.int32)), "t must have shape"),
        (TINY, dict(t=jnp.ones((B + 1,), jnp.int32)), "t must have shape"),
        (TINY, dict(labels=None), "labels are required"),
        (TINY, dict(labels=jnp.ones((B, 1), jnp.int32)), "labels must be"),
        (TINY, dict(labels=jnp.ones((B,), jnp.float32)), "labels must be"),
        (TINY, dict(context=None), "context .* is required"),
        (TINY, dict(context=jnp.ones((B, 4, 5))), "context must be"),
        (TINY, dict(context=jnp.ones((B, 8))), "context must be"),
        (TINY, dict(context=jnp.ones((B + 1, 4, 8))), "context must be"),
        (NO_CLASSES, dict(labels=jnp.zeros((B,), jnp.int32)), "labels were given"),
        (NO_CLASSES, dict(context=jnp.ones((B, 4, 8))), "context was given"),
    ],
)
def test_bad_inputs_raise_at_trace_time(config, change, match):
    x, t, kw = inputs(config)
    args = {"x": x, "t": t, **kw, **change}
    x, t = args.pop("x"), args.pop("t")
    args = {k: v for k, v in args.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        _trace(config, x, t, **args)


def test_out_of_range_labels_raise_when_concrete():
    x, t, kw = inputs()
    for bad in ([0, TINY.num_classes + 1], [-1, 0]):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
            UNet(TINY).apply({"params": {}}, x, t, labels=jnp.array(bad), context=kw["context"])


def test_traced_out_of_range_labels_give_nan_not_a_wrong_row(tiny_params):
    x, t, kw = inputs()
    for bad in (-1, TINY.num_classes + 1):
        out = np.asarray(_apply_tiny(tiny_params, x, t, {**kw, "labels": jnp.array([1, bad])}))
        assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()


def test_scalar_t_broadcasts():
    x, _, kw = inputs()
    spec = _trace(TINY, x, jnp.float32(3.5), **kw)
    assert spec.shape == (B, 6, 6, TINY.out_channels)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(block_channels=()), "block_channels"),
        (dict(block_channels=16), "block_channels must be a non-empty tuple"),
        (dict(block_channels=(16, 20)), "norm_groups"),
        (dict(attention=(None,)), "attention must have one entry per level"),
        (dict(attention=(None, "flash")), "attention entries"),
        (dict(up_attention=(None, "x")), "up_attention"),
        (dict(layers_per_block=0), "layers_per_block"),
        (dict(layers_per_block=(1, 1, 1)), "layers_per_block"),
        (dict(num_heads=3), "heads"),
        (dict(num_heads=64), r"num_heads=64: level 1 has 64 heads .*block_channels\[1\]=32"),
        (dict(num_heads=(2, 48)), r"num_heads=\(2, 48\): level 1"),
        (dict(num_heads=2, attention_head_dim=8), "attention_head_dim and num_heads"),
        (dict(context_dim=None), "context_dim is required"),
        (dict(attention=(None, "self"), mid_attention=None), "context_dim is set"),
        (dict(class_conditioning="concat"), "class_conditioning"),
        (dict(num_classes=0), "num_classes"),
        (dict(dropout=1.0), "dropout"),
        (dict(mid_layers=-1), "mid_layers"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(norm_eps=-1e-5), "norm_eps"),
        (dict(norm_eps=float("nan")), "norm_eps"),
        (dict(dtype=None), "dtype must be a floating dtype"),
        (dict(dtype=jnp.int32), "dtype must be a floating dtype"),
        (dict(dtype="not_a_dtype"), "dtype must be a floating dtype"),
        (dict(param_dtype=None), "param_dtype must be a floating dtype"),
        (dict(attention_implementation="flash"), "attention_implementation must be one of"),
    ],
)
def test_config_validation(fields, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **fields)


def test_class_tokens_need_cross_attention():
    with pytest.raises(ValueError, match="class_conditioning='cross_attention' needs"):
        UNetConfig(block_channels=(16,), norm_groups=8, attention=("self",), num_classes=2,
                   class_conditioning="cross_attention")  # fmt: skip


def test_config_is_frozen_and_hashable():
    cfg = UNetConfig(block_channels=[16, 32], norm_groups=8, attention=[None, "self"])
    assert cfg.block_channels == (16, 32) and cfg.layers(1) == 2 and cfg.up_kinds == (None, "self")
    assert hash(cfg) == hash(UNetConfig(block_channels=(16, 32), norm_groups=8,
                                        attention=(None, "self")))  # fmt: skip
    with pytest.raises(AttributeError):
        cfg.in_channels = 1


@pytest.mark.slow
def test_init_unet_matches_flax_init_tree_and_distributions():
    shapes = unet_param_shapes(TINY)
    params = init_unet(TINY, jax.random.key(3))
    assert jax.tree.structure(params) == jax.tree.structure(shapes)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(
        lambda s: (s.shape, s.dtype), shapes
    )
    again = init_unet(TINY, jax.random.key(3))
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), params, again)
    assert all(jax.tree.leaves(same))
    other = init_unet(TINY, jax.random.key(4))
    kernel = params["down_blocks_1"]["resnets_0"]["conv2"]["kernel"]  # [3, 3, 32, 32]
    assert not np.allclose(kernel, other["down_blocks_1"]["resnets_0"]["conv2"]["kernel"])
    kernel = np.asarray(kernel)
    assert abs(kernel.std() * np.sqrt(9 * 32) - 1.0) < 0.05  # LeCun normal
    assert np.abs(kernel).max() <= 2 / 0.8796 / np.sqrt(9 * 32) + 1e-6  # truncated at 2 std
    assert np.all(np.asarray(params["conv_norm_out"]["scale"]) == 1)
    assert np.all(np.asarray(params["conv_in"]["bias"]) == 0)
    bf16 = init_unet(dataclasses.replace(TINY, param_dtype=jnp.bfloat16), jax.random.key(3))
    assert {a.dtype for a in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize(
    "field, value, match",
    [
        # A string is truthy: "False" used to switch the option on.
        ("flip_sin_to_cos", "False", "flip_sin_to_cos must be a bool"),
        ("mid_block", "False", "mid_block must be a bool"),
        ("use_linear_projection", "True", "use_linear_projection must be a bool"),
        ("center_input_sample", 1, "center_input_sample must be a bool"),
        ("mid_layers", True, "mid_layers must be an int"),
        ("mid_block_scale_factor", -1.0, "mid_block_scale_factor must be > 0"),
        ("mid_block_scale_factor", 0, "mid_block_scale_factor must be > 0"),
        ("mid_block_scale_factor", "2", "mid_block_scale_factor must be a concrete real number"),
        ("freq_shift", "1", "freq_shift must be a concrete real number"),
        ("freq_shift", float("nan"), "freq_shift must be finite"),
        ("dropout", "0.1", "dropout must be a concrete real number"),
        ("freq_shift", None, "freq_shift must be a concrete real number"),
        ("mid_block_scale_factor", float("inf"), "mid_block_scale_factor must be finite"),
    ],
)
def test_config_rejects_wrong_types_and_ranges_naming_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **{field: value})


def test_config_keeps_numpy_scalars_as_python_values():
    cfg = dataclasses.replace(TINY, flip_sin_to_cos=np.bool_(False), freq_shift=np.float32(1.0),
                              in_channels=np.int64(2), mid_block_scale_factor=np.int32(2))
    assert cfg.flip_sin_to_cos is False and cfg.in_channels == 2
    assert type(cfg.freq_shift) is float and type(cfg.mid_block_scale_factor) is float
    assert type(cfg.in_channels) is int and hash(cfg) == hash(dataclasses.replace(
        TINY, flip_sin_to_cos=False, freq_shift=1.0, mid_block_scale_factor=2.0))


@pytest.mark.slow
@pytest.mark.parametrize("side,channels,strides,im2col", [
    (1, 8, 1, True), (2, 8, 1, True), (3, 8, 1, False),       # tiny images, any width
    (4, 512, 1, True), (5, 512, 2, True), (17, 512, 1, False),  # wide convs up to 256 pixels
    (4, 256, 1, False), (2, 8, 2, False), (7, 8, 2, False)])
def test_conv3x3_equals_flax_conv_on_every_path(side, channels, strides, im2col):
    """``Conv3x3`` (im2col on the CPU where ``uses_im2col`` says XLA:CPU's convolution is slow)
    has nn.Conv's parameters (same names, shapes, initial values) and output and gradient to
    float32 rounding, on both sides of the switch, stride 1 and 2, even and odd sides."""
    import flax.linen as nn

    from jaxdiff.models.resnet import PAD1, Conv3x3, uses_im2col

    x = jax.random.normal(jax.random.key(0), (2, side, side, channels))
    assert uses_im2col(x.shape, strides) == im2col
    ref = nn.Conv(16, (3, 3), strides=strides, padding=PAD1)
    ours = Conv3x3(16, strides=strides)
    p_ref, p_ours = ref.init(jax.random.key(1), x), ours.init(jax.random.key(1), x)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), p_ref, p_ours))
    params = jax.tree.map(lambda a: a + 0.1, p_ref)  # a nonzero bias too
    scale = float(np.sqrt(channels / 8))  # the sums grow with the fan-in
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), atol=2e-6 * scale,
                               rtol=1e-6)

    def grads(m):
        return jax.grad(lambda p, y: (m.apply(p, y) ** 2).sum(), argnums=(0, 1))(params, x)

    for a, b in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(ref))):
        # float32 rounding of sums over ~9 * channels terms, relative to the gradient's scale
        np.testing.assert_allclose(a, b, atol=2e-5 + 2e-6 * float(np.abs(b).max()), rtol=1e-5)
