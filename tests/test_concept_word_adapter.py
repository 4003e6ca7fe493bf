"""benchmarks/concept_word_adapter.py: the word-gated cross-attention adapter is the identity at
its start, touches only examples whose context holds the word's states, computes the decoupled
attention of its docstring, and in its bias form equals moving the word's states."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import concept_word_adapter as wa
from jaxdiff.models import UNet, UNetConfig, init_unet
from jaxdiff.models.attention import MultiHeadAttention

K = 2   # the word's tokens


@pytest.fixture(scope="module")
def unet():
    cfg = UNetConfig(in_channels=4, out_channels=4, block_channels=(8, 16), layers_per_block=1,
                     attention=(None, "cross"), mid_attention="cross", num_heads=2,
                     context_dim=8, norm_groups=4)
    params = init_unet(cfg, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    ctx = jax.random.normal(jax.random.key(2), (2, 5, 8))
    states = ctx[0, 1:1 + K]         # example 0 holds the word, example 1 does not

    def run(p, c, adapter=None, mode="decoupled", **kw):
        def f():
            return UNet(cfg).apply({"params": p}, x, jnp.array([3, 500]), context=c)
        if adapter is None:
            return f()
        with nn.intercept_methods(wa.make_interceptor(adapter, states, mode, **kw)):
            return f()

    return params, ctx, states, run


def _random(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.slow
def test_gate_paths_and_shapes(unet):
    params, ctx, states, _ = unet
    np.testing.assert_array_equal(wa.word_gate(ctx, states), [1.0, 0.0])
    np.testing.assert_array_equal(wa.word_gate(ctx.at[0, 2].add(0.5), states), [0.0, 0.0])
    paths = wa.cross_attention_widths(params)
    assert len(paths) == 4 and all(p.endswith("/attn2") for p in paths)   # down, mid, up x2
    dec, bias = wa.init_adapter(params, K, "decoupled"), wa.init_adapter(params, K, "bias")
    for p, width in paths.items():
        assert dec[p]["keys"].shape == (K + 1, width) and dec[p]["values"].shape == (K, width)
        assert bias[p]["to_k"].shape == bias[p]["to_v"].shape == (K, width)
    with pytest.raises(ValueError, match="mode must be one of"):
        wa.init_adapter(params, K, "lora")


def _schedule():
    from jaxdiff.schedules import make_schedule
    return make_schedule("scaled_linear", 1000)


@pytest.mark.slow
@pytest.mark.parametrize("mode", wa.MODES)
def test_identity_at_start_and_only_the_gated_example_moves(unet, mode):
    params, ctx, _, run = unet
    kw = {"alphas_cumprod": _schedule().alphas_cumprod} if mode == "shift" else {}
    plain = run(params, ctx)
    start = wa.init_adapter(params, K, mode, latent_shape=(8, 8, 4))
    np.testing.assert_array_equal(run(params, ctx, start, mode, **kw), plain)
    moved = run(params, ctx, _random(start, 3), mode, **kw)
    np.testing.assert_array_equal(moved[1], plain[1])
    assert float(jnp.max(jnp.abs(moved[0] - plain[0]))) > 1e-3


@pytest.mark.slow
def test_t_max_shuts_the_gate_at_noisier_steps(unet):
    # the fixture's timesteps are [3, 500]; only example 0 holds the word
    params, ctx, _, run = unet
    plain = run(params, ctx)
    adapter = _random(wa.init_adapter(params, K, "decoupled"), 3)
    assert float(jnp.max(jnp.abs(run(params, ctx, adapter, t_max=4)[0] - plain[0]))) > 1e-3
    np.testing.assert_array_equal(run(params, ctx, adapter, t_max=3), plain)


@pytest.mark.slow
def test_bias_form_equals_moving_the_word_states(unet):
    # to_k / to_v have no bias in the transformer blocks: a bias W d on the word's keys and
    # values is the context moved by d at the word's positions
    params, ctx, _, run = unet
    d = 0.3 * jax.random.normal(jax.random.key(4), (K, ctx.shape[-1]))
    adapter = {}
    flat = {"/".join(getattr(p, "key", str(p)) for p in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path in wa.cross_attention_widths(params):
        assert f"{path}/to_k/bias" not in flat
        adapter[path] = {n: d @ flat[f"{path}/{n}/kernel"] for n in ("to_k", "to_v")}
    moved_ctx = ctx.at[0, 1:1 + K].add(d)
    np.testing.assert_allclose(run(params, ctx, adapter, "bias"), run(params, moved_ctx),
                               rtol=1e-4, atol=1e-5)


class _Holder(nn.Module):
    """One cross-attention layer named ``attn2`` (the adapter's target)."""

    @nn.compact
    def __call__(self, x, c):
        return MultiHeadAttention(heads=2, qkv_bias=False, name="attn2")(x, c)


@pytest.mark.slow
def test_decoupled_term_by_hand():
    Holder = _Holder
    x = jax.random.normal(jax.random.key(0), (2, 6, 8))
    c = jax.random.normal(jax.random.key(1), (2, 5, 8))
    params = Holder().init(jax.random.key(2), x, c)["params"]
    states = c[0, 1:1 + K]
    adapter = {"attn2": {"keys": jax.random.normal(jax.random.key(3), (K + 1, 8)),
                         "values": jax.random.normal(jax.random.key(4), (K, 8))}}
    with nn.intercept_methods(wa.make_interceptor(adapter, states, "decoupled", scale=0.5)):
        got = Holder().apply({"params": params}, x, c)
    plain = Holder().apply({"params": params}, x, c)
    p = params["attn2"]
    q = (x[0] @ p["to_q"]["kernel"]).reshape(6, 2, 4)
    keys = adapter["attn2"]["keys"].reshape(K + 1, 2, 4)
    values = jnp.concatenate([adapter["attn2"]["values"], jnp.zeros((1, 8))]).reshape(K + 1, 2, 4)
    term = np.zeros((6, 8), np.float32)
    for h in range(2):
        logits = np.asarray(q[:, h] @ keys[:, h].T) / 2.0          # sqrt(head_dim = 4)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        term[:, 4 * h:4 * h + 4] = w @ np.asarray(values[:, h])
    want = plain[0] + 0.5 * term @ np.asarray(p["to_out_0"]["kernel"])
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[1], plain[1])


@pytest.mark.slow
def test_adapter_gets_gradients():
    x = jax.random.normal(jax.random.key(0), (2, 6, 8))
    c = jax.random.normal(jax.random.key(1), (2, 5, 8))
    holder = _Holder()
    params = holder.init(jax.random.key(2), x, c)["params"]
    start = _random({"attn2": {"keys": jnp.zeros((K + 1, 8)), "values": jnp.zeros((K, 8))}}, 5)

    def loss(adapter):
        with nn.intercept_methods(wa.make_interceptor(adapter, c[0, 1:1 + K], "decoupled")):
            return jnp.sum(jnp.square(holder.apply({"params": params}, x, c)))

    g = jax.grad(loss)(start)["attn2"]
    assert float(jnp.max(jnp.abs(g["values"]))) > 0
    assert float(jnp.max(jnp.abs(g["keys"]))) > 0


@pytest.mark.slow
def test_pixel_prior_scores_only_partial_masks_in_pixel_space():
    import types

    from jaxdiff.finetune.objective import Objective, denoising_terms
    from jaxdiff.models.autoencoder import AutoencoderKL, init_autoencoder
    from jaxdiff.models.autoencoder_config import AutoencoderKLConfig
    from jaxdiff.schedules import make_schedule

    vae_cfg = AutoencoderKLConfig(in_channels=1, out_channels=1, block_channels=(8, 8),
                                  latent_channels=2, norm_groups=4, mid_attention=False)
    vae = init_autoencoder(vae_cfg, jax.random.key(0))
    schedule = make_schedule("linear", 100)
    latents = jax.random.normal(jax.random.key(1), (3, 4, 4, 2))
    images = jax.random.uniform(jax.random.key(2), (3, 8, 8, 3), minval=-1, maxval=1)
    apply_fn = lambda x, t: 0.5 * x   # noqa: E731
    obj = Objective(prediction_type="v_prediction")
    ctx = {"sd": types.SimpleNamespace(vae_config=vae_cfg), "vae": vae, "pixel_values": images}
    terms = wa.pixel_masked_terms(denoising_terms, ctx, weight=2.0)
    key = jax.random.key(3)
    plain, _ = denoising_terms(apply_fn, schedule, latents, key, obj)
    np.testing.assert_array_equal(terms(apply_fn, schedule, latents, key, obj)[0], plain)
    mask = jnp.ones((3, 4, 4, 1)).at[1, :2].set(0.0)     # example 1: its top half free
    got, aux = terms(apply_fn, schedule, latents, key, obj, mask=mask)
    np.testing.assert_array_equal(np.asarray(got)[[0, 2]], np.asarray(plain)[[0, 2]])
    t = aux["t"]
    noise = jax.random.normal(jax.random.split(key, 3)[1], latents.shape)
    abar = schedule.alphas_cumprod[t[1]]
    x_t = jnp.sqrt(abar) * latents[1] + jnp.sqrt(1 - abar) * noise[1]
    x0 = jnp.sqrt(abar) * x_t - jnp.sqrt(1 - abar) * apply_fn(x_t, None)
    z = x0 / vae_cfg.scaling_factor + (vae_cfg.shift_factor or 0.0)
    pix = AutoencoderKL(vae_cfg).apply({"params": vae}, z[None], method="decode")[0]
    want = jnp.mean(images[1], axis=-1, keepdims=True)
    err = np.asarray(jnp.square(pix - want))[4:]        # the bottom half: mask rows 2, 3 x 2
    np.testing.assert_allclose(got[1], 2.0 * err.mean(), rtol=1e-4)


@pytest.mark.slow
def test_offset_prior_moves_only_the_word_prior_examples():
    # the word prior's examples (a mask below 1) are scored as their latents + offset,
    # everywhere; the others as they were
    from jaxdiff.finetune.objective import Objective, denoising_terms

    sch = _schedule()
    lat = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
    off = jax.random.normal(jax.random.key(1), (4, 4, 2))
    mask = jnp.ones((3, 4, 4, 1)).at[2].set(0.99)
    obj = Objective(prediction_type="v_prediction")

    def apply_fn(x, t):
        return 0.5 * x

    terms = wa.offset_prior_terms(denoising_terms, off)
    key = jax.random.key(5)
    got, aux = terms(apply_fn, sch, lat, key, obj, mask=mask)
    want, _ = denoising_terms(apply_fn, sch, lat.at[2].add(off), key, obj)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    plain, _ = denoising_terms(apply_fn, sch, lat, key, obj)
    np.testing.assert_allclose(got[:2], plain[:2], rtol=1e-6)
    assert abs(float(got[2] - plain[2])) > 1e-3
    np.testing.assert_allclose(terms(apply_fn, sch, lat, key, obj)[0], plain, rtol=1e-6)


def test_word_only_prompts_replace_every_other_word_prior_example():
    ids = jnp.arange(5 * 4, dtype=jnp.int32).reshape(5, 4)
    mask = jnp.ones((5, 2, 2, 1)).at[2:].set(0.99)        # examples 2, 3, 4: the word prior's
    alone = jnp.full((1, 4), -7, jnp.int32)
    out = wa.with_word_only_prompts({"input_ids": ids, "loss_mask": mask}, alone)["input_ids"]
    np.testing.assert_array_equal(out[3], alone[0])           # odd and moved
    keep = np.array([0, 1, 2, 4])
    np.testing.assert_array_equal(out[keep], ids[keep])
    same = {"input_ids": ids}
    assert wa.with_word_only_prompts(same, alone) is same


def test_null_word_goes_to_the_prompts_that_start_with_it():
    seen = {}

    def generate(sd, prompt=None, negative_prompt=None, **kw):
        seen.update(prompt=prompt, negative=negative_prompt, kw=kw)

    gen = wa.with_null_word(generate, "boxed")
    gen(None, ["boxed a 3", "a boxed 3", "boxedx 3"], num_steps=2)
    assert seen["negative"] == ["boxed", "", ""] and seen["kw"] == {"num_steps": 2}
    gen(None, "boxed 7")
    assert seen["negative"] == ["boxed"]
    gen(None, ["boxed 1"], negative_prompt=["blurry"])
    assert seen["negative"] == ["blurry"]


def test_word_only_prompts_refuse_cached_text():
    with pytest.raises(ValueError, match="input_ids"):
        wa.with_word_only_prompts({"context": jnp.zeros((2, 4, 8)),
                                   "loss_mask": jnp.ones((2, 2, 2, 1))}, jnp.zeros((1, 4)))


def test_distill_needs_the_word_prior(tmp_path):
    with pytest.raises(SystemExit, match="word_prior"):
        wa.distill(str(tmp_path / "none.npz"), ["--model", "x"])


@pytest.mark.slow
def test_additive_check_on_a_tiny_folder(tmp_path, monkeypatch):
    # a tiny diffusers folder's VAE and a small fake MNIST: the moved images and the boxed ones
    # through the VAE are scored, and the adapter's cosine with the offset is computed
    from jaxdiff.pipelines import load_stable_diffusion
    from jaxdiff.pipelines.tiny import write_tiny_stable_diffusion
    from tests.test_data import write_fake_mnist

    from jaxdiff.metrics import init_classifier, save_classifier

    write_fake_mnist(str(tmp_path / "mnist"), n_train=8, n_test=60)
    save_classifier(str(tmp_path / "clf.msgpack"), init_classifier(jax.random.key(0)), {})
    monkeypatch.setenv("JAXDIFF_MNIST_DIR", str(tmp_path / "mnist"))
    folder = str(tmp_path / "sd")
    write_tiny_stable_diffusion(folder)
    sd = load_stable_diffusion(folder)
    shape = (sd.sample_size, sd.sample_size, sd.vae_config.latent_channels)
    wa.save_adapter(str(tmp_path / "a.npz"), {"latent": {"offset": np.ones(shape, np.float32)}},
                    np.zeros((1, 8)), "shift")
    out = wa.check_additive(folder, str(tmp_path / "clf.msgpack"), n_offset=6, n_test=6,
                            adapter_path=str(tmp_path / "a.npz"))
    for name in ("other digits", "offset's digits"):
        assert out[name]["moved"]["n"] == 6
        assert 0.0 <= out[name]["moved"]["accuracy"] <= 1.0
    assert out["offset_norm"] > 0 and -1.0 <= out["adapter"]["cosine"] <= 1.0
    assert out["adapter"]["norm"] == pytest.approx(np.sqrt(np.prod(shape)))
