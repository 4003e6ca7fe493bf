"""The ControlNet without PyTorch: its residuals' layout, a new ControlNet (zero convolutions)
leaving the UNet unchanged, one compilation for every ``conditioning_scale``, and a one-line
error naming the argument for each bad input (traced with ``jax.eval_shape``: the checks run at
trace time). Parity with diffusers is in tests/parity/test_controlnet_parity.py."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.convert import (
    controlnet_config_from_diffusers,
    controlnet_config_to_diffusers,
    controlnet_to_diffusers,
    convert_controlnet_state_dict,
    load_torch_state_dict,
    save_controlnet,
)
from jaxdiff.models import (
    ControlNet,
    ControlNetConfig,
    UNet,
    UNetConfig,
    check_controlnet_matches_unet,
    controlnet_config_from_unet,
    controlnet_from_unet,
    controlnet_param_shapes,
    guess_mode_scales,
    init_controlnet,
    init_unet,
    is_zero_conv,
    multi_controlnet_residuals,
)

UNET = UNetConfig(in_channels=4, out_channels=4, block_channels=(8, 16), layers_per_block=1,
                  attention=("cross", None), mid_attention="cross", num_heads=2, norm_groups=4,
                  context_dim=8)
CN = controlnet_config_from_unet(UNET, conditioning_embedding_channels=(4, 8))  # 2x the latents
X, T = jnp.zeros((1, 4, 4, 4)), jnp.array([10])
IMAGE, CTX = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 3, 8))


def zeros(tree):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)


CN_PARAMS = zeros(controlnet_param_shapes(CN))
UNET_PARAMS = init_unet(UNET, jax.random.key(0))


def residuals(config=CN, params=None, image=IMAGE, **kw):
    fn = lambda p: ControlNet(config).apply({"params": p}, X, T, image, context=CTX, **kw)  # noqa
    return jax.eval_shape(fn, params if params is not None else zeros(
        controlnet_param_shapes(config)))


def unet_out(**kw):
    fn = lambda p, kw: UNet(UNET).apply({"params": p}, X, T, context=CTX, **kw)  # noqa: E731
    return jax.eval_shape(fn, UNET_PARAMS, kw)


def test_residual_layout_matches_the_unet_skips():
    down, mid = residuals()
    # conv_in, level 0's layer and downsample, level 1's layer
    assert [r.shape for r in down] == [(1, 4, 4, 8), (1, 4, 4, 8), (1, 2, 2, 8), (1, 2, 2, 16)]
    assert len(down) == CN.num_down_residuals and mid.shape == (1, 2, 2, 16)
    assert unet_out(down_residuals=down, mid_residual=mid).shape == X.shape
    pooled = dataclasses.replace(CN, global_pool_conditions=True)
    down, mid = residuals(pooled, guess_mode=True)
    assert all(r.shape[1:3] == (1, 1) for r in (*down, mid))
    assert unet_out(down_residuals=down, mid_residual=mid).shape == X.shape
    s = guess_mode_scales(5)
    np.testing.assert_allclose(s, [0.1, 10**-0.75, 10**-0.5, 10**-0.25, 1.0], rtol=1e-6)
    assert s.dtype == np.float32


@pytest.mark.slow
def test_new_controlnet_has_zero_residuals_one_compile_per_scale():
    """``controlnet_from_unet``: the UNet's encoder weights, zero convolutions, so zero
    residuals (the UNet is unchanged: tests/parity/test_controlnet_parity.py checks the
    addition). ``conditioning_scale`` is traced: one trace for every value."""
    config, params = controlnet_from_unet(UNET, UNET_PARAMS, jax.random.key(1),
                                          conditioning_embedding_channels=(4, 8))
    assert config == CN
    for name in ("conv_in", "time_embedding", "down_blocks_1", "mid_block"):
        jax.tree.map(np.testing.assert_array_equal, params[name], UNET_PARAMS[name])
    traces = []

    @jax.jit
    def step(cn_params, scale, x, image):
        traces.append(1)
        return ControlNet(config).apply({"params": cn_params}, x, T, image, context=CTX,
                                        conditioning_scale=scale)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(X.shape), jnp.float32)
    image = jnp.asarray(rng.uniform(0, 1, IMAGE.shape), jnp.float32)
    for scale in (1.0, 0.5):
        down, mid = step(params, jnp.float32(scale), x, image)
        assert len(down) == 4 and all(not np.asarray(r).any() for r in (*down, mid))
    assert len(traces) == 1


def test_init_controlnet_zero_convs_on_the_host():
    params = init_controlnet(CN, jax.random.key(3))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    shapes = jax.tree_util.tree_flatten_with_path(controlnet_param_shapes(CN))[0]
    assert [(p, v.shape) for p, v in flat] == [(p, s.shape) for p, s in shapes]
    zero = {jax.tree_util.keystr(p) for p, _ in flat if is_zero_conv(tuple(k.key for k in p))}
    assert len(zero) == 2 * (CN.num_down_residuals + 2)  # kernel and bias of each
    for path, value in flat:
        name = jax.tree_util.keystr(path)
        if name in zero:
            assert not np.asarray(value).any(), name
        elif path[-1].key == "kernel":
            assert np.asarray(value).std() > 0, name
    with pytest.raises(ValueError, match="init_controlnet needs a concrete key"):
        jax.jit(lambda k: init_controlnet(CN, k))(jax.random.key(0))


def _unet_residual_inputs(case):
    down, mid = residuals()
    down = list(down)
    return {
        "down only": dict(down_residuals=down),
        "mid only": dict(mid_residual=mid),
        "count": dict(down_residuals=down[:-1], mid_residual=mid),
        "shape": dict(down_residuals=down[:2] + [jnp.zeros((1, 4, 4, 8))] + down[3:],
                      mid_residual=mid),
        "mid shape": dict(down_residuals=down, mid_residual=jnp.zeros((1, 2, 2, 8))),
        "dtype": dict(down_residuals=[jnp.zeros(r.shape, jnp.int32) for r in down],
                      mid_residual=mid),
        "array": dict(down_residuals=jnp.zeros((4, 1, 4, 4, 8)), mid_residual=mid),
    }[case]


@pytest.mark.parametrize("case, match", [
    ("down only", "down_residuals was given without mid_residual"),
    ("mid only", "mid_residual was given without down_residuals"),
    ("count", "down_residuals must hold 4 arrays"),
    ("shape", r"down_residuals\[2\] must be float \[1, 2, 2, 8\]"),
    ("mid shape", r"mid_residual must be float \[1, 2, 2, 16\]"),
    ("dtype", r"down_residuals\[0\] must be float .* dtype int32"),
    ("array", "down_residuals must be a sequence of arrays"),
])  # fmt: skip
def test_unet_residual_errors(case, match):
    with pytest.raises(ValueError, match=match):
        unet_out(**_unet_residual_inputs(case))


@pytest.mark.parametrize("kw, match", [
    (dict(image=jnp.zeros((1, 16, 16, 3))), r"cond_image must be \[1, 8, 8, 3\] .*resize"),
    (dict(image=jnp.zeros((1, 8, 8, 1))), r"cond_image must be \[1, 8, 8, 3\]"),
    (dict(image=jnp.zeros((2, 8, 8, 3))), r"cond_image must be \[1, 8, 8, 3\]"),
    (dict(image=jnp.zeros((8, 8, 3))), r"cond_image must be \[1, 8, 8, 3\]"),
    (dict(image=jnp.zeros((1, 8, 8, 3), jnp.uint8)), "cond_image must be a float array"),
    (dict(conditioning_scale=jnp.ones(2)), "conditioning_scale must be a scalar"),
    (dict(guess_mode="yes"), "guess_mode must be a bool"),
])  # fmt: skip
def test_controlnet_input_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        residuals(**kw)


def test_odd_control_image_sizes_follow_the_strided_convs():
    """A 7x7 image halves to 4x4 (``ceil``), as torch's stride-2 conv with padding 1."""
    assert residuals(image=jnp.zeros((1, 7, 7, 3)))[1].shape == (1, 2, 2, 16)


@pytest.mark.parametrize("kw, match", [
    (dict(unet="sd"), "unet must be a UNetConfig"),
    (dict(conditioning_embedding_channels=()), "conditioning_embedding_channels must be"),
    (dict(conditioning_embedding_channels=(4, 0)), r"conditioning_embedding_channels\[1\]"),
    (dict(conditioning_channels=0), "conditioning_channels"),
    (dict(global_pool_conditions="no"), "global_pool_conditions"),
    (dict(conditioning_channel_order="xyz"), "conditioning_channel_order"),
])  # fmt: skip
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        ControlNetConfig(**{"unet": UNET, **kw})


@pytest.mark.parametrize("unet, match", [
    (dataclasses.replace(UNET, context_dim=16), "cross-attention width .* is 8 but the UNet's "
                                                "is 16"),
    (dataclasses.replace(UNET, block_channels=(8, 32)), "levels .* differ from the UNet's"),
    (dataclasses.replace(UNET, layers_per_block=2), "levels .* differ from the UNet's"),
    (dataclasses.replace(UNET, in_channels=9, out_channels=4), "4-channel latents but the UNet "
                                                               "9-channel"),
])  # fmt: skip
def test_controlnet_must_match_the_unet(unet, match):
    check_controlnet_matches_unet(CN, UNET)
    with pytest.raises(ValueError, match=match) as e:
        check_controlnet_matches_unet(CN, unet)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_multi_controlnet_errors_and_sum():
    net = ControlNet(CN)
    with pytest.raises(ValueError, match="non-empty sequence"):
        multi_controlnet_residuals([], X, T, context=CTX)
    with pytest.raises(ValueError, match=r"controlnets\[0\] must be a \(ControlNet module"):
        multi_controlnet_residuals([(CN, CN_PARAMS, IMAGE, 1.0)], X, T, context=CTX)
    other = controlnet_config_from_unet(dataclasses.replace(UNET, layers_per_block=2),
                                        conditioning_embedding_channels=(4, 8))
    entries = [(net, CN_PARAMS, IMAGE, 1.0),
               (ControlNet(other), zeros(controlnet_param_shapes(other)), IMAGE, 1.0)]
    with pytest.raises(ValueError, match=r"controlnets\[1\]'s residuals .* differ in shape"):
        jax.eval_shape(lambda: multi_controlnet_residuals(entries, X, T, context=CTX))
    pooled = dataclasses.replace(CN, global_pool_conditions=True)
    down, mid = jax.eval_shape(lambda: multi_controlnet_residuals(
        [(net, CN_PARAMS, IMAGE, 1.0), (ControlNet(pooled), CN_PARAMS, IMAGE, 0.5)], X, T,
        context=CTX))
    assert [r.shape for r in down] == [r.shape for r in residuals()[0]]


@pytest.mark.slow
def test_from_unet_errors():
    params = dict(UNET_PARAMS)
    del params["conv_in"]
    with pytest.raises(ValueError, match="unet_params do not match .* conv_in/kernel"):
        controlnet_from_unet(UNET, params, jax.random.key(0))
    with pytest.raises(ValueError, match="unet must be a UNetConfig"):
        controlnet_from_unet(CN, UNET_PARAMS, jax.random.key(0))


def test_diffusers_config_round_trip_and_errors():
    exported = controlnet_config_to_diffusers(CN)
    assert exported["_class_name"] == "ControlNetModel"
    assert controlnet_config_from_diffusers(exported) == CN
    for bad, match in [
        (dict(resnet_time_scale_shift="scale_shift"), "unsupported ControlNetModel config "
                                                      "options: resnet_time_scale_shift"),
        (dict(class_embed_type="timestep"), "class_embed_type='timestep'"),
        (dict(encoder_hid_dim=8), "encoder_hid_dim=8"),
        (dict(mid_block_type=None), "mid_block_type=None"),
        (dict(conditioning_embedding_out_channels=None), "conditioning_embedding_out_channels"),
        (dict(controlnet_conditioning_channel_order="xyz"), "conditioning_channel_order"),
        (dict(down_block_types=["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
         "SimpleCrossAttnDownBlock2D"),
        (dict(frobnicate=1), r"unknown ControlNetModel config options: \['frobnicate'\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            controlnet_config_from_diffusers({**exported, **bad})


@pytest.mark.parametrize("unet, match", [
    (dataclasses.replace(UNET, center_input_sample=True), "center_input_sample"),
    (dataclasses.replace(UNET, time_cond_dim=8), "time_cond_dim=8"),
    (dataclasses.replace(UNET, layers_per_block=(1, 2)), r"layers_per_block=\(1, 2\)"),
    (dataclasses.replace(UNET, time_embed_dim=48), "time_embed_dim=48"),
    (dataclasses.replace(UNET, attention=("self", None), context_dim=None,
                         mid_attention="self"), "self-attention"),
])  # fmt: skip
def test_export_errors(unet, match):
    with pytest.raises(ValueError, match=match):
        controlnet_config_to_diffusers(ControlNetConfig(unet, conditioning_embedding_channels=(4,
                                                                                           8)))


def test_state_dict_errors_name_the_keys():
    state, _ = controlnet_to_diffusers(CN_PARAMS, CN)
    assert "controlnet_cond_embedding.blocks.1.weight" in state
    assert "controlnet_down_blocks.3.bias" in state and "controlnet_mid_block.weight" in state
    del state["controlnet_down_blocks.3.weight"]
    state["extra.weight"] = np.zeros(1, np.float32)
    with pytest.raises(ValueError, match=r"(?s)1 missing keys: controlnet_down_blocks.3.weight"
                                         r".*1 unexpected keys: extra.weight"):
        convert_controlnet_state_dict(state, CN)
    with pytest.raises(ValueError, match="the ControlNet params do not match"):
        controlnet_to_diffusers({"conv_in": CN_PARAMS["conv_in"]}, CN)


def test_saved_folder_reads_back_without_torch(tmp_path):
    """``save_controlnet`` -> ``config.json`` + safetensors -> the converters: the same config
    and the same weights, bit for bit (float32), or rounded once (float16)."""
    params = init_controlnet(CN, jax.random.key(4))
    params["controlnet_mid_block"]["bias"] = jnp.full((16,), 0.1)  # not all zero convs zero
    for dtype, folder in (("float32", tmp_path / "f32"), ("float16", tmp_path / "f16")):
        save_controlnet(params, CN, folder, dtype=dtype)
        with open(folder / "config.json") as f:
            config = controlnet_config_from_diffusers(json.load(f))
        assert config == CN
        state = load_torch_state_dict(str(folder / "diffusion_pytorch_model.safetensors"))
        back = convert_controlnet_state_dict(state, config)
        cast = (lambda a: a) if dtype == "float32" else (
            lambda a: np.asarray(a).astype(np.float16).astype(np.float32))
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), cast(b)),
                     back, params)
    with pytest.raises(ValueError, match="dtype must be one of"):
        save_controlnet(params, CN, tmp_path / "bad", dtype="int8")
    assert not (tmp_path / "bad").exists()
