"""The converted AutoencoderKL against diffusers' ``AutoencoderKL`` (PyTorch), float32.

Random models (every torch parameter overwritten with random values first, norm scales around 1),
random inputs, NCHW for torch and NHWC for jaxdiff. Compared: the posterior's mean,
log-variance and KL, ``decode`` of a random latent, the full forward with ``sample_posterior=False``
(and once with ``True``, on the same noise),
at diffusers' tiny test configs, an SD 1.x block layout at small width (4 levels, 2 layers per
block), without quant convs, without mid attention, on odd sizes, and with tiling on (jaxdiff's
``tiled_encode`` / ``tiled_decode`` against diffusers after ``enable_tiling()``). Also: weights
read back from a saved ``safetensors`` / ``.bin`` folder, and legacy attention keys.

Tolerance: ``max|jax - torch| / max|torch|`` within the network's float32 bound
(``tolerances.network_rtol`` from the model's layer count and widest sum; the encoder and the
decoder counted together, which also covers the forward pass and the tiles' blending); the KL,
a sum over the latents of the posterior's mean and log-variance, within their bounds carried
through its terms (``_kl_rtol``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from jaxdiff.convert import convert_vae_state_dict, vae_from_diffusers
from jaxdiff.models import tiled_decode, tiled_encode
from tests.parity.test_unet_parity import randomize, rel_err
from tests.parity.tolerances import network_rtol, torch_layers, ulps, within

pytestmark = pytest.mark.slow  # every test here takes > 1.5 s on 2 cores


class _Errors(dict):
    """The relative errors by output, with their ``bounds``."""

    bounds: dict


def _check(errors):
    for name, err in errors.items():
        within(err, errors.bounds[name], name)


def _kl_rtol(mean, logvar, rel):
    """The KL ``0.5 sum(mean^2 + exp(logvar) - 1 - logvar)`` (per example, over ``[C, h, w]``)
    moves by ``sum(|mean| d_mean + 0.5 |exp(logvar) - 1| d_logvar)`` for absolute errors
    ``d = rel * max|.|`` of its inputs, plus the float32 sum's roundings (2 per term, a side),
    relative to the largest KL."""
    mean, logvar = (np.asarray(a, np.float64) for a in (mean, logvar))
    axes = tuple(range(1, mean.ndim))
    move = (np.abs(mean) * rel * np.abs(mean).max()
            + 0.5 * np.abs(np.exp(logvar) - 1) * rel * np.abs(logvar).max()).sum(axis=axes)
    terms = (mean**2 + np.exp(logvar) + 1 + np.abs(logvar)).sum(axis=axes) / 2
    kl = (mean**2 + np.exp(logvar) - 1 - logvar).sum(axis=axes) / 2
    return float((move + ulps(4 * mean[0].size) * terms).max() / np.abs(kl).max())


def _levels(n: int) -> dict:
    return dict(down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n)  # fmt: skip


# name -> (diffusers AutoencoderKL kwargs, input (H, W))
CASES = {
    # diffusers' tests/models/autoencoders: get_autoencoder_kl_config()
    "diffusers_tiny": (dict(block_out_channels=(2, 4), norm_num_groups=2, **_levels(2)), (32, 32)),
    # the tiny VAE of diffusers' Stable Diffusion pipeline tests (32 GroupNorm groups)
    "pipeline_tiny": (dict(block_out_channels=(32, 64), **_levels(2)), (32, 32)),
    # SD 1.x's layout (4 levels, 2 layers per block, mid attention) at small width
    "sd1_small": (dict(block_out_channels=(8, 16, 32, 32), layers_per_block=2, norm_num_groups=4,
                       **_levels(4)), (32, 32)),  # fmt: skip
    "no_quant_convs": (dict(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=16,
                            use_quant_conv=False, use_post_quant_conv=False, in_channels=1,
                            out_channels=2, **_levels(2)), (16, 24)),  # fmt: skip
    "no_mid_attention": (dict(block_out_channels=(8, 16, 16), norm_num_groups=4,
                              mid_block_add_attention=False, **_levels(3)), (16, 16)),
    "odd_size": (dict(block_out_channels=(8, 16, 16), norm_num_groups=4, **_levels(3)), (15, 22)),
}


def _torch_model(kwargs: dict, seed: int = 0) -> TorchAutoencoderKL:
    return randomize(TorchAutoencoderKL(**kwargs), seed=seed)


def _nhwc(x: torch.Tensor | np.ndarray) -> jnp.ndarray:
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def _nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def _errors(model: TorchAutoencoderKL, vae, params, size, *, tiled=False, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, model.config.in_channels, *size)).astype(np.float32)
    with torch.no_grad():
        post = model.encode(torch.from_numpy(x)).latent_dist
        h, w = post.mean.shape[2:]
        z = rng.standard_normal((2, model.config.latent_channels, h, w)).astype(np.float32)
        dec = model.decode(torch.from_numpy(z)).sample.numpy()
        fwd = model(torch.from_numpy(x), sample_posterior=False).sample.numpy()
        kl = post.kl().numpy()
    v = {"params": params}
    if tiled:
        p = tiled_encode(vae, params, _nhwc(x))
        d = tiled_decode(vae, params, _nhwc(z))
        f = tiled_decode(vae, params, tiled_encode(vae, params, _nhwc(x)).mode())
    else:
        p = vae.apply(v, _nhwc(x), method="encode")
        d = vae.apply(v, _nhwc(z), method="decode")
        f, _ = vae.apply(v, _nhwc(x))
    assert _nchw(p.mean).shape == tuple(post.mean.shape)
    assert _nchw(f).shape == fwd.shape  # odd sizes come back smaller, in both
    assert fwd.shape[:2] == (2, model.config.out_channels)
    errors = _Errors(
        mean=rel_err(_nchw(p.mean), post.mean.numpy()),
        logvar=rel_err(_nchw(p.logvar), post.logvar.numpy()),
        decode=rel_err(_nchw(d), dec),
        forward=rel_err(_nchw(f), fwd),
        kl=rel_err(np.asarray(p.kl()), kl),
    )
    rel = network_rtol(*torch_layers(model))
    errors.bounds = dict(mean=rel, logvar=rel, decode=rel, forward=rel,
                         kl=_kl_rtol(post.mean.numpy(), post.logvar.numpy(), rel))
    return errors


@pytest.mark.parametrize("name", sorted(CASES))
def test_autoencoder_kl_matches_diffusers(name):
    kwargs, size = CASES[name]
    model = _torch_model(kwargs)
    vae, params = vae_from_diffusers(model)
    errors = _errors(model, vae, params, size)
    print(name, {k: f"{v:.1e}" for k, v in errors.items()})
    _check(errors)


def test_tiled_encode_decode_match_diffusers_enable_tiling():
    """64x48 images and 32x24 latents with 32-pixel tiles: 3 x 2 overlapping tiles blended."""
    kwargs = dict(block_out_channels=(8, 16), norm_num_groups=4, sample_size=32, **_levels(2))
    model = _torch_model(kwargs, seed=3)
    vae, params = vae_from_diffusers(model)
    model.enable_tiling()
    errors = _errors(model, vae, params, (64, 48), tiled=True)
    print("tiled", {k: f"{v:.1e}" for k, v in errors.items()})
    _check(errors)
    # tiling changes the result (each tile sees only itself), so the comparison above would
    # catch an implementation that silently ran the untiled path
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 64, 48))).float()
    with torch.no_grad():
        tiled = model(x).sample
        model.disable_tiling()
        assert rel_err(tiled.numpy(), model(x).sample.numpy()) > 1e-3


def test_sampled_forward_matches_diffusers_with_the_same_noise(monkeypatch):
    """``sample_posterior=True``: diffusers draws through ``randn_tensor`` in its vae module;
    it is patched to return the normal noise that ``DiagonalGaussian.sample(key)`` draws."""
    import diffusers.models.autoencoders.vae as vae_module

    kwargs, size = CASES["diffusers_tiny"]
    model = _torch_model(kwargs, seed=11)
    vae, params = vae_from_diffusers(model)
    x = np.random.default_rng(1).standard_normal((2, 3, *size)).astype(np.float32)
    key = jax.random.key(4)
    out, post = vae.apply({"params": params}, _nhwc(x), key)
    eps = np.asarray(jax.random.normal(key, post.mean.shape, post.mean.dtype))
    monkeypatch.setattr(vae_module, "randn_tensor",
                        lambda shape, **kw: torch.from_numpy(_nchw(eps).copy()))
    with torch.no_grad():
        ref = model(torch.from_numpy(x), sample_posterior=True).sample.numpy()
    err = rel_err(_nchw(out), ref)
    within(err, network_rtol(*torch_layers(model)), "sampled forward")
    without, _ = vae.apply({"params": params}, _nhwc(x))
    assert rel_err(_nchw(without), ref) > 1e-3  # the noise mattered


@pytest.mark.parametrize("safe", [True, False])
def test_round_trip_through_a_saved_vae_folder(tmp_path, safe):
    kwargs, size = CASES["no_mid_attention"]
    model = _torch_model(dict(kwargs, scaling_factor=0.5, shift_factor=0.1), seed=5)
    model.save_pretrained(tmp_path / "vae", safe_serialization=safe)
    suffix = "safetensors" if safe else "bin"
    assert (tmp_path / "vae" / f"diffusion_pytorch_model.{suffix}").is_file()
    vae, params = vae_from_diffusers(tmp_path / "vae")
    assert vae.config.scaling_factor == 0.5 and vae.config.shift_factor == 0.1
    errors = _errors(model, vae, params, size)
    _check(errors)
    # a weights file on its own converts to the same params
    again = convert_vae_state_dict(tmp_path / "vae" / f"diffusion_pytorch_model.{suffix}",
                                   vae.config)  # fmt: skip
    assert jax.tree.structure(again) == jax.tree.structure(params)
    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(again))
    assert all(np.array_equal(a, b) for a, b in pairs)


_LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _legacy(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        for new, old in _LEGACY.items():
            if f".attentions.0.{new}." in k:
                k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        out[k] = v
    return out


def test_legacy_attention_keys_convert_to_the_same_model():
    kwargs, size = CASES["sd1_small"]
    model = _torch_model(kwargs, seed=7)
    vae, params = vae_from_diffusers(model)
    legacy = _legacy(model.state_dict())
    assert "encoder.mid_block.attentions.0.query.weight" in legacy
    assert "decoder.mid_block.attentions.0.proj_attn.bias" in legacy
    converted = convert_vae_state_dict(legacy, vae.config)
    errors = _errors(model, vae, converted, size)
    _check(errors)
    both = dict(model.state_dict(), **{"encoder.mid_block.attentions.0.query.weight":
                                       legacy["encoder.mid_block.attentions.0.query.weight"]})
    with pytest.raises(ValueError, match="legacy and current"):
        convert_vae_state_dict(both, vae.config)
