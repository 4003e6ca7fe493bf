"""diffusers ``AutoencoderKL`` -> :class:`jaxdiff.models.AutoencoderKLConfig` and Flax params.

From a diffusers-format ``vae/`` folder (needs its files, so not a doctest;
``tests/parity/test_vae_parity.py`` runs the same calls on saved and in-memory models)::

    vae, params = vae_from_diffusers("sd/vae")          # config.json + weights in the folder
    latents = vae_encode_latents(vae, params, images_nhwc, key)

Every config option of diffusers 0.42's ``AutoencoderKL`` is mapped, known to have no effect, or
rejected with a ``ValueError`` naming it. Weights map by name as the UNet's
(:func:`jaxdiff.convert.torch_key`): ``encoder.down_blocks.0.resnets.1.conv1.weight`` ->
``encoder/down_blocks_0/resnets_1/conv1/kernel``; conv kernels OIHW -> HWIO, linear weights
transposed. Both attention key layouts convert: ``to_q/to_k/to_v/to_out.0`` and the legacy
``query/key/value/proj_attn``. A missing, unexpected or mis-shaped key is a ``ValueError`` listing
every such key.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
from flax.traverse_util import flatten_dict

from jaxdiff.convert.torch_io import (
    load_torch_state_dict,
    match_state_dict,  # one home for the diffusers key conventions
    rename_legacy_attention_keys,
    torch_key,
)
from jaxdiff.models.autoencoder import AutoencoderKL, autoencoder_param_shapes
from jaxdiff.models.autoencoder_config import AutoencoderKLConfig
from jaxdiff.validation import InvalidFileError, read_json

__all__ = [
    "AUTOENCODER_KL_DEFAULTS",
    "vae_config_from_diffusers",
    "convert_vae_state_dict",
    "vae_from_diffusers",
]

# diffusers 0.42 AutoencoderKL constructor defaults (the keys a saved config.json holds).
AUTOENCODER_KL_DEFAULTS: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,), layers_per_block=1,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=32, scaling_factor=0.18215,
    shift_factor=None, latents_mean=None, latents_std=None, force_upcast=True,
    use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
)  # fmt: skip
# diffusers key -> AutoencoderKLConfig field, copied as they are.
_DIRECT = {
    "in_channels": "in_channels", "out_channels": "out_channels",
    "layers_per_block": "layers_per_block", "latent_channels": "latent_channels",
    "norm_num_groups": "norm_groups", "scaling_factor": "scaling_factor",
    "shift_factor": "shift_factor", "force_upcast": "force_upcast",
    "use_quant_conv": "use_quant_conv", "use_post_quant_conv": "use_post_quant_conv",
    "mid_block_add_attention": "mid_attention",
}  # fmt: skip
_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin",
)  # fmt: skip


def vae_config_from_diffusers(config: Mapping[str, Any], **overrides) -> AutoencoderKLConfig:
    """A diffusers ``AutoencoderKL`` config -> :class:`AutoencoderKLConfig`.

    Args:
      config: ``dict(model.config)`` or a parsed ``vae/config.json``; missing keys take diffusers'
        defaults, keys starting with ``_`` are metadata.
      overrides: :class:`AutoencoderKLConfig` fields to set on top (``dtype``, ``param_dtype``,
        ``attention_implementation``, ...).

    Mapping: ``block_out_channels`` -> ``block_channels``, ``norm_num_groups`` -> ``norm_groups``,
    ``mid_block_add_attention`` -> ``mid_attention``, ``sample_size`` (an int, or a square
    ``[s, s]``) -> ``sample_size``; the others by name. ``act_fn`` must be ``"silu"`` (or its
    alias ``"swish"``), the block types ``DownEncoderBlock2D`` / ``UpDecoderBlock2D``, one per
    level.

    Raises:
      ValueError: naming every unknown option, and each unsupported value.
    """
    known = AUTOENCODER_KL_DEFAULTS
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(f"unknown AutoencoderKL config options: {unknown}")
    c = {**AUTOENCODER_KL_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    chans = tuple(c["block_out_channels"])
    bad = []
    if c["act_fn"] not in ("silu", "swish"):
        bad.append(f"act_fn={c['act_fn']!r} (supported: 'silu')")
    for key, kind in (("down_block_types", "DownEncoderBlock2D"),
                      ("up_block_types", "UpDecoderBlock2D")):  # fmt: skip
        types = tuple(c[key])
        if len(types) != len(chans) or any(t != kind for t in types):
            bad.append(f"{key}={list(types)} (supported: {kind!r} once per block_out_channels)")
    size = c["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            bad.append(f"sample_size={list(size)} (supported: an int or a square size)")
        size = size[0]
    if bad:
        raise ValueError("unsupported AutoencoderKL config options: " + "; ".join(bad))
    out: dict[str, Any] = {field: c[key] for key, field in _DIRECT.items()}
    out.update(block_channels=chans, sample_size=size)
    for key in ("latents_mean", "latents_std"):
        out[key] = None if c[key] is None else tuple(c[key])
    out.update(overrides)
    return AutoencoderKLConfig(**out)


def convert_vae_state_dict(
    state_dict: Mapping[str, Any] | str | os.PathLike, config: AutoencoderKLConfig, *, dtype=None
) -> dict:
    """A diffusers ``AutoencoderKL`` state dict -> the ``"params"`` of ``AutoencoderKL(config)``.

    Args:
      state_dict: key -> torch tensor or numpy array (``model.state_dict()``), or the path of a
        ``.safetensors`` / ``.bin`` weights file (:func:`jaxdiff.convert.load_torch_state_dict`).
      config: the target config (usually from :func:`vae_config_from_diffusers`).
      dtype: the params' dtype; default ``config.param_dtype``.

    Returns:
      A nested dict of ``jax.Array``, exactly the structure ``AutoencoderKL(config).init`` makes.

    Raises:
      ValueError: listing every missing, unexpected and mis-shaped key (torch names, with the
        Flax path and the shapes), and every weight given under both its legacy and its current
        attention name.
    """
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict = load_torch_state_dict(os.fspath(state_dict))
    dtype = np.dtype(config.param_dtype if dtype is None else dtype)
    given = rename_legacy_attention_keys(state_dict)
    shapes = flatten_dict(autoencoder_param_shapes(config))
    expected = {torch_key(p): (p, tuple(s.shape)) for p, s in shapes.items()}
    return match_state_dict(given, expected, dtype=dtype, what="the AutoencoderKL config")


def _weights_file(folder: str) -> str:
    for name in _WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise ValueError(f"source: no weights file in {folder!r} (looked for {list(_WEIGHT_FILES)})")


def vae_from_diffusers(source, **overrides) -> tuple[AutoencoderKL, dict]:
    """``(AutoencoderKL(config), params)`` from a diffusers ``AutoencoderKL``.

    Args:
      source: an instantiated diffusers ``AutoencoderKL`` (its config and ``state_dict()``), or
        the path of a diffusers ``vae/`` folder (``config.json`` and
        ``diffusion_pytorch_model[.fp16].safetensors`` or ``.bin``).
      overrides: :class:`AutoencoderKLConfig` fields (``dtype``, ``param_dtype``, ...).

    Raises:
      ValueError: naming ``source`` when the folder lacks its files, and as
        :func:`vae_config_from_diffusers` and :func:`convert_vae_state_dict`.
    """
    if isinstance(source, (str, os.PathLike)):
        folder = os.fspath(source)
        cfg_path = os.path.join(folder, "config.json")
        if not os.path.isfile(cfg_path):
            raise ValueError(f"source: {cfg_path!r} not found (a diffusers vae/ folder?)")
        raw = read_json(cfg_path)
        if not isinstance(raw, Mapping):
            raise InvalidFileError(f"{cfg_path}: expected a JSON object (an AutoencoderKL config)")
        config = vae_config_from_diffusers(raw, **overrides)
        state = _weights_file(folder)
    else:
        if not hasattr(source, "config") or not hasattr(source, "state_dict"):
            raise ValueError(
                f"source must be a diffusers AutoencoderKL or a vae/ folder, got {type(source)}"
            )
        config = vae_config_from_diffusers(dict(source.config), **overrides)
        state = source.state_dict()
    return AutoencoderKL(config), convert_vae_state_dict(state, config)
