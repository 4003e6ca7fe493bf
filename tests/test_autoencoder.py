"""AutoencoderKL: config checks, shapes and input errors, the posterior, the latent scaling,
sliced / tiled decode, bf16 and force_upcast, the converter's config mapping and key errors, and
the VAE loss. (Numerical agreement with diffusers: tests/parity/test_vae_parity.py.)"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.convert import convert_vae_state_dict, vae_config_from_diffusers
from jaxdiff.models import (
    AutoencoderKL,
    AutoencoderKLConfig,
    DiagonalGaussian,
    init_autoencoder,
    scale_latents,
    sliced_decode,
    tiled_decode,
    tiled_encode,
    unscale_latents,
    vae_decode_latents,
    vae_encode_latents,
)
from jaxdiff.models.autoencoder_latents import blend_h, blend_v
from jaxdiff.losses import reconstruction_metrics, vae_loss

TINY = dict(block_channels=(8, 16), latent_channels=2, norm_groups=4, sample_size=16)


@pytest.fixture(scope="module")
def tiny():
    cfg = AutoencoderKLConfig(**TINY)
    return AutoencoderKL(cfg), init_autoencoder(cfg, jax.random.key(0))


@partial(jax.jit, static_argnames=("cfg", "method"))
def run(cfg, params, *args, method="__call__"):
    """``AutoencoderKL(cfg).apply`` jitted (eager flax dispatches op by op, slowly)."""
    return AutoencoderKL(cfg).apply({"params": params}, *args, method=method)


def _images(shape=(2, 16, 16, 3), seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# --- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    (dict(block_channels=(8, 10)), "norm_groups"),
    (dict(block_channels=()), "block_channels"),
    (dict(latent_channels=0), "latent_channels"),
    (dict(mid_attention="False"), "mid_attention"),
    (dict(scaling_factor=0.0), "scaling_factor"),
    (dict(latents_mean=(0.0,), latents_std=(1.0, 1.0)), "latents_mean"),
    (dict(latents_mean=(0.0, 0.0)), "latents_std"),
    (dict(latents_mean=(0.0, 0.0), latents_std=(1.0, 0.0)), r"latents_std\[1\]"),
    (dict(latents_mean=(0.0, 0.0), latents_std=(1.0, 1.0), shift_factor=0.1), "shift_factor"),
    (dict(dtype=jnp.int32), "dtype"),
    (dict(attention_implementation="flash"), "attention_implementation"),
])  # fmt: skip
def test_config_rejects_bad_fields_by_name(kw, match):
    with pytest.raises(ValueError, match=match):
        AutoencoderKLConfig(**{**TINY, **kw})


def test_config_normalises_lists_and_is_hashable():
    cfg = AutoencoderKLConfig(**{**TINY, "block_channels": [8, 16], "latents_mean": [0, 1],
                                 "latents_std": [1, 2]})  # fmt: skip
    assert cfg.block_channels == (8, 16) and cfg.latents_std == (1.0, 2.0)
    assert hash(cfg) == hash(AutoencoderKLConfig(**{**TINY, "latents_mean": (0.0, 1.0),
                                                    "latents_std": (1.0, 2.0)}))
    assert cfg.downscale == 2


# --- model --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_shapes_and_input_errors(tiny):
    vae, params = tiny
    post = run(vae.config, params, _images(), method="encode")
    assert post.mean.shape == post.logvar.shape == (2, 8, 8, 2)
    assert run(vae.config, params, post.mean, method="decode").shape == (2, 16, 16, 3)
    # odd sizes halve downwards: 14x10 -> 7x5 -> 14x10
    recon, _ = run(vae.config, params, _images((1, 14, 10, 3)))
    assert recon.shape == (1, 14, 10, 3)
    with pytest.raises(ValueError, match=r"x must be \[B, H, W, in_channels=3\]"):
        run(vae.config, params, _images((2, 16, 16, 1)), method="encode")
    with pytest.raises(ValueError, match="z must be"):
        run(vae.config, params, jnp.zeros((2, 8, 8, 3)), method="decode")
    with pytest.raises(ValueError, match="x must be a float"):
        run(vae.config, params, jnp.zeros((2, 16, 16, 3), jnp.int32), method="encode")


@pytest.mark.slow
def test_forward_with_a_key_samples_and_without_takes_the_mode(tiny):
    vae, params = tiny
    x = _images()
    post = run(vae.config, params, x, method="encode")
    mode, _ = run(vae.config, params, x)
    np.testing.assert_allclose(mode, run(vae.config, params, post.mean, method="decode"), atol=1e-5)
    a, _ = run(vae.config, params, x, jax.random.key(1))
    b, _ = run(vae.config, params, x, jax.random.key(1))
    c, _ = run(vae.config, params, x, jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, mode)


@pytest.mark.slow
def test_posterior_clamps_logvar_and_its_kl_and_samples():
    moments = jnp.concatenate([jnp.zeros((1, 2, 2, 3)), jnp.full((1, 2, 2, 3), 50.0)], -1)
    assert float(DiagonalGaussian.from_moments(moments).logvar.max()) == 20.0
    moments = moments.at[..., 3:].set(-50.0)
    assert float(DiagonalGaussian.from_moments(moments).logvar.min()) == -30.0
    std_normal = DiagonalGaussian(jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 4, 4, 3)))
    np.testing.assert_allclose(std_normal.kl(), 0.0, atol=1e-7)
    mean, logvar = jnp.full((1, 1, 1, 1), 0.5), jnp.full((1, 1, 1, 1), np.log(2.0))
    # KL(N(0.5, 2) || N(0, 1)) = 0.5 (0.25 + 2 - 1 - log 2)
    np.testing.assert_allclose(DiagonalGaussian(mean, logvar).kl(),
                               [0.5 * (1.25 - np.log(2.0))], rtol=1e-6)  # fmt: skip
    post = DiagonalGaussian(jnp.full((4000, 1, 1, 2), 3.0), jnp.full((4000, 1, 1, 2), np.log(4.0)))
    z = np.asarray(post.sample(jax.random.key(0)))
    assert abs(z.mean() - 3.0) < 0.1 and abs(z.std() - 2.0) < 0.1
    assert post.mode() is post.mean


# --- latent scaling -----------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(scaling_factor=0.18215),
    dict(scaling_factor=0.3611, shift_factor=0.1159),
    dict(scaling_factor=0.5, latents_mean=(0.1, -0.2), latents_std=(2.0, 0.5)),
])  # fmt: skip
def test_scale_and_unscale_latents(kw):
    cfg = AutoencoderKLConfig(**{**TINY, **kw})
    z = _images((2, 4, 4, 2))
    if "latents_mean" in kw:
        expected = (z - jnp.array([0.1, -0.2])) * 0.5 / jnp.array([2.0, 0.5])
    else:
        expected = (z - kw.get("shift_factor", 0.0)) * kw["scaling_factor"]
    np.testing.assert_allclose(scale_latents(cfg, z), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(unscale_latents(cfg, scale_latents(cfg, z)), z, atol=1e-5)
    with pytest.raises(ValueError, match="latents must be"):
        unscale_latents(cfg, jnp.zeros((2, 4, 4, 3)))


@pytest.mark.slow
def test_encode_and_decode_latents_apply_the_scaling(tiny):
    vae, params = tiny
    x = _images()
    post = run(vae.config, params, x, method="encode")
    latents = vae_encode_latents(vae, params, x)
    np.testing.assert_allclose(latents, post.mean * 0.18215, rtol=1e-5, atol=1e-6)
    sampled = vae_encode_latents(vae, params, x, jax.random.key(3))
    np.testing.assert_allclose(sampled, post.sample(jax.random.key(3)) * 0.18215, atol=1e-5)
    images = vae_decode_latents(vae, params, latents)
    decoded = run(vae.config, params, post.mean, method="decode")
    np.testing.assert_allclose(images, decoded, atol=1e-4)
    with pytest.raises(ValueError, match="exclusive"):
        vae_decode_latents(vae, params, latents, tiled=True, slice_size=1)
    jitted = jax.jit(lambda p, l: vae_decode_latents(vae, p, l, slice_size=2))
    np.testing.assert_allclose(jitted(params, latents), images, atol=1e-4)


# --- memory savers ------------------------------------------------------------------------------

@pytest.mark.slow
def test_sliced_decode_equals_decode(tiny):
    vae, params = tiny
    z = _images((3, 4, 6, 2))
    full = run(vae.config, params, z, method="decode")
    for size in (1, 2):
        np.testing.assert_allclose(sliced_decode(vae, params, z, size), full, atol=1e-5)
    with pytest.raises(ValueError, match="slice_size"):
        sliced_decode(vae, params, z, 0)


def _blend_reference(a, b, extent, axis):
    """diffusers' blend_v / blend_h loop (NHWC)."""
    b = np.array(b)
    e = min(a.shape[axis], b.shape[axis], extent)
    for y in range(e):
        ia = [slice(None)] * 4
        ia[axis] = -e + y
        ib = [slice(None)] * 4
        ib[axis] = y
        b[tuple(ib)] = a[tuple(ia)] * (1 - y / e) + b[tuple(ib)] * (y / e)
    return b


@pytest.mark.parametrize("extent", [0, 3, 9])
def test_blend_matches_diffusers_loop(extent):
    a, b = np.asarray(_images((1, 6, 5, 2), 1)), np.asarray(_images((1, 4, 5, 2), 2))
    np.testing.assert_allclose(blend_v(a, b, extent), _blend_reference(a, b, extent, 1), atol=1e-6)
    a, b = np.asarray(_images((1, 4, 6, 2), 1)), np.asarray(_images((1, 4, 3, 2), 2))
    np.testing.assert_allclose(blend_h(a, b, extent), _blend_reference(a, b, extent, 2), atol=1e-6)


@pytest.mark.slow
def test_tiled_paths(tiny):
    vae, params = tiny
    small = _images((1, 16, 16, 3))  # fits in one 16-pixel tile: the untiled result
    np.testing.assert_allclose(tiled_encode(vae, params, small).mean,
                               run(vae.config, params, small, method="encode").mean, atol=1e-5)
    big = _images((1, 32, 24, 3))
    post = tiled_encode(vae, params, big, tile_overlap_factor=0.5)
    assert post.mean.shape == (1, 16, 12, 2)
    assert tiled_decode(vae, params, post.mean).shape == (1, 32, 24, 3)
    with pytest.raises(ValueError, match="tile_overlap_factor"):
        tiled_encode(vae, params, big, tile_overlap_factor=1.0)
    with pytest.raises(ValueError, match="tile_sample_min_size"):
        tiled_decode(vae, params, post.mean, tile_sample_min_size=1)


# --- dtypes -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_bfloat16_compute_with_float32_params_and_force_upcast(tiny):
    _, params = tiny
    vae16 = AutoencoderKL(AutoencoderKLConfig(**TINY, dtype=jnp.bfloat16))
    vae32 = AutoencoderKL(AutoencoderKLConfig(**TINY))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    x = _images()
    ref, _ = run(vae32.config, params, x)
    out, post = run(vae16.config, params, x)
    assert out.dtype == post.mean.dtype == jnp.bfloat16
    assert float(jnp.abs(out - ref).max() / jnp.abs(ref).max()) < 5e-2
    latents = vae_encode_latents(vae32, params, x)
    up = vae_decode_latents(vae16, params, latents)  # config.force_upcast defaults to True
    assert up.dtype == jnp.float32
    np.testing.assert_allclose(up, vae_decode_latents(vae32, params, latents), atol=1e-5)
    low = vae_decode_latents(vae16, params, latents, force_upcast=False)
    assert low.dtype == jnp.bfloat16


# --- converter ----------------------------------------------------------------------------------

def test_config_from_diffusers_maps_and_rejects():
    cfg = vae_config_from_diffusers(
        {"_class_name": "AutoencoderKL", "block_out_channels": [8, 16], "norm_num_groups": 4,
         "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
         "mid_block_add_attention": False, "sample_size": [64, 64], "latents_mean": [0.0] * 4,
         "latents_std": [1.0] * 4, "act_fn": "swish"},
        dtype=jnp.bfloat16,
    )  # fmt: skip
    assert cfg.block_channels == (8, 16) and cfg.norm_groups == 4 and not cfg.mid_attention
    assert cfg.sample_size == 64 and cfg.latents_std == (1.0,) * 4 and cfg.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"unknown AutoencoderKL config options: \['foo'\]"):
        vae_config_from_diffusers({"foo": 1})
    with pytest.raises(ValueError, match="act_fn='gelu'"):
        vae_config_from_diffusers({"act_fn": "gelu"})
    with pytest.raises(ValueError, match="down_block_types"):
        vae_config_from_diffusers({"down_block_types": ["AttnDownEncoderBlock2D"]})
    with pytest.raises(ValueError, match="up_block_types"):
        vae_config_from_diffusers({"block_out_channels": [32, 64]})  # one block type for 2 levels
    with pytest.raises(ValueError, match="sample_size"):
        vae_config_from_diffusers({"sample_size": [64, 32]})


def test_state_dict_errors_list_every_bad_key(tiny):
    vae, params = tiny
    from flax.traverse_util import flatten_dict

    from jaxdiff.convert import torch_key

    state = {}
    for path, value in flatten_dict(params).items():  # a torch-layout state dict
        value = np.asarray(value)
        if value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        elif value.ndim == 2:
            value = value.T
        state[torch_key(path)] = value
    back = convert_vae_state_dict(state, vae.config)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    broken = dict(state)
    del broken["encoder.conv_in.bias"], broken["decoder.mid_block.attentions.0.to_q.weight"]
    broken["encoder.extra.weight"] = np.zeros(3)
    broken["quant_conv.weight"] = np.zeros((3, 4, 1, 1))
    with pytest.raises(ValueError) as e:
        convert_vae_state_dict(broken, vae.config)
    msg = str(e.value)
    assert "2 missing keys: decoder.mid_block.attentions.0.to_q.weight, encoder.conv_in.bias" in msg
    assert "1 unexpected keys: encoder.extra.weight" in msg
    assert "1 mis-shaped keys: quant_conv.weight" in msg


# --- loss ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_vae_loss_terms_gradient_and_errors(tiny):
    vae, params = tiny
    x = _images()

    def apply_fn(p, xb, key):
        return vae.apply({"params": p}, xb, key)

    loss_fn = jax.jit(lambda p, k: vae_loss(apply_fn, p, x, k, beta=0.5, recon_type="l2"))
    loss, aux = loss_fn(params, jax.random.key(0))
    recon, post = apply_fn(params, x, jax.random.key(0))
    expected = jnp.mean(jnp.square(recon - x), axis=(1, 2, 3)) + 0.5 * post.kl() / (16 * 16 * 3)
    np.testing.assert_allclose(aux["per_example"], expected, rtol=1e-5)
    np.testing.assert_allclose(loss, expected.mean(), rtol=1e-5)
    l1, aux1 = vae_loss(apply_fn, params, x, None, beta=0.0)
    np.testing.assert_allclose(l1, jnp.mean(jnp.abs(run(vae.config, params, x)[0] - x)),
                               rtol=1e-5)  # fmt: skip
    grads = jax.grad(lambda p: loss_fn(p, jax.random.key(0))[0])(params)
    norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and max(norms) > 0
    with pytest.raises(ValueError, match="beta"):
        vae_loss(apply_fn, params, x, None, beta=-1.0)
    with pytest.raises(ValueError, match="recon_type"):
        vae_loss(apply_fn, params, x, None, recon_type="huber")
    with pytest.raises(ValueError, match="apply_fn must return"):
        vae_loss(lambda p, xb, k: (xb[:, :8], None), params, x, None)


def test_reconstruction_metrics():
    x = _images((3, 4, 4, 1))
    m = reconstruction_metrics(x, x + 0.2)
    np.testing.assert_allclose(m["mse"], 0.04, rtol=1e-5)
    np.testing.assert_allclose(m["psnr"], 10 * np.log10(4 / 0.04), rtol=1e-5)
    with pytest.raises(ValueError, match="x_hat"):
        reconstruction_metrics(x, x[:2])
