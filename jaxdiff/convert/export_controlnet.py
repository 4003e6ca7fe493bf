"""A jaxdiff ControlNet -> a diffusers ``ControlNetModel``: the reverse of
:mod:`~jaxdiff.convert.diffusers_controlnet`::

    state, config = controlnet_to_diffusers(params, controlnet_config)
    save_controlnet(params, controlnet_config, "controlnet")  # config.json + safetensors
    # diffusers: ControlNetModel.from_pretrained("controlnet")

The encoder's config goes through :func:`~jaxdiff.convert.unet_config_to_diffusers` (what a
``UNet2DConditionModel`` cannot express, a ``ControlNetModel`` cannot either), plus the
ControlNet's own limits (no ``time_embed_dim`` other than ``4 * block_channels[0]``, no input
centring, no guidance-scale embedding, one ``layers_per_block`` for every level); the result is
read back by :func:`~jaxdiff.convert.controlnet_config_from_diffusers` and compared. The weights
use the importer's names (:func:`~jaxdiff.convert.torch_key`). Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from jaxdiff.convert.diffusers_controlnet import (
    CONTROLNET_DEFAULTS,
    controlnet_config_from_diffusers,
)
from jaxdiff.convert.export_diffusers import (
    DIFFUSERS_VERSION,
    params_to_state_dict,
    save_safetensors,
    unet_config_to_diffusers,
)
from jaxdiff.convert.torch_io import torch_key
from jaxdiff.models.controlnet import controlnet_param_shapes
from jaxdiff.models.controlnet_config import ControlNetConfig

__all__ = [
    "CONTROLNET_WEIGHTS_NAME",
    "controlnet_config_to_diffusers",
    "controlnet_to_diffusers",
    "save_controlnet",
]

CONTROLNET_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def controlnet_config_to_diffusers(config: ControlNetConfig) -> dict:
    """A :class:`~jaxdiff.models.ControlNetConfig` -> a diffusers ``ControlNetModel``
    ``config.json`` dict (SD form, or SDXL's with ``addition_embed_type="text_time"``).

    Raises:
      ValueError: naming the field diffusers cannot express: as
        :func:`~jaxdiff.convert.unet_config_to_diffusers` for the encoder, and
        ``unet.time_embed_dim`` (other than ``4 * block_channels[0]``),
        ``unet.center_input_sample``, ``unet.time_cond_dim``, per-level
        ``unet.layers_per_block``; or any field that does not survive the round trip.
    """
    if not isinstance(config, ControlNetConfig):
        raise ValueError(f"config must be a ControlNetConfig, got {type(config).__name__}")
    u = config.unet
    bad = []
    if u.time_dim != 4 * u.block_channels[0]:
        bad.append(f"unet.time_embed_dim={u.time_embed_dim} (ControlNetModel's is always "
                   f"4 * block_channels[0] = {4 * u.block_channels[0]})")
    if u.center_input_sample:
        bad.append("unet.center_input_sample=True (ControlNetModel has no input centring)")
    if u.time_cond_dim is not None:
        bad.append(f"unet.time_cond_dim={u.time_cond_dim} (ControlNetModel has no "
                   "guidance-scale embedding)")
    layers = {u.layers(lv) for lv in range(len(u.block_channels))}
    if len(layers) != 1:
        bad.append(f"unet.layers_per_block={u.layers_per_block!r} (ControlNetModel takes one "
                   "int for every level)")
    if bad:
        raise ValueError("controlnet_config: ControlNetModel cannot express " + "; ".join(bad))
    as_unet = unet_config_to_diffusers(u)
    out = {k: as_unet[k] for k in CONTROLNET_DEFAULTS if k in as_unet}
    out.update(
        conditioning_channels=config.conditioning_channels,
        conditioning_embedding_out_channels=list(config.conditioning_embedding_channels),
        global_pool_conditions=config.global_pool_conditions,
        controlnet_conditioning_channel_order=config.conditioning_channel_order,
    )  # fmt: skip
    back = controlnet_config_from_diffusers(out)
    again = unet_config_to_diffusers(back.unet)
    diff = sorted(k for k in as_unet if not k.startswith("_") and as_unet[k] != again[k])
    own = ("conditioning_channels", "conditioning_embedding_channels", "global_pool_conditions",
           "conditioning_channel_order")
    diff += [k for k in own if getattr(back, k) != getattr(config, k)]
    if diff:  # pragma: no cover - a mapping bug, not a user error
        raise ValueError(f"controlnet_config: these fields do not survive the round trip: {diff}")
    return {"_class_name": "ControlNetModel", "_diffusers_version": DIFFUSERS_VERSION, **out}


def controlnet_to_diffusers(
    params: Mapping, config: ControlNetConfig, *, dtype: Any = np.float32
) -> tuple[dict[str, np.ndarray], dict]:
    """A jaxdiff ControlNet -> ``(state_dict, config)`` of diffusers' ``ControlNetModel``.

    Args:
      params: the ``"params"`` tree of ``ControlNet(config)`` (jax or numpy leaves).
      config: its :class:`~jaxdiff.models.ControlNetConfig`.
      dtype: the exported weights' dtype, ``float32`` (default) or ``float16``.

    Returns:
      ``{torch key: numpy array}`` (``ControlNetModel(**config).load_state_dict`` takes it after
      ``torch.from_numpy``) and the ``config.json`` dict.

    Raises:
      ValueError: listing every missing, unexpected or mis-shaped param; and as
        :func:`controlnet_config_to_diffusers`.
    """
    diffusers_config = controlnet_config_to_diffusers(config)
    state = params_to_state_dict(params, controlnet_param_shapes(config), torch_key, dtype,
                                 "the ControlNet")
    return state, diffusers_config


def save_controlnet(
    params: Mapping, config: ControlNetConfig, folder: str | os.PathLike, *,
    dtype: Any = np.float32,
) -> str:
    """Write a diffusers ``ControlNetModel`` folder: ``config.json`` and
    ``diffusion_pytorch_model.safetensors`` (``ControlNetModel.from_pretrained(folder)`` loads
    it). The folder is created if needed; existing files of those names are replaced. Returns
    the folder.

    Raises:
      ValueError: as :func:`controlnet_to_diffusers`, before anything is written.
    """
    state, diffusers_config = controlnet_to_diffusers(params, config, dtype=dtype)
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    save_safetensors(state, os.path.join(folder, CONTROLNET_WEIGHTS_NAME))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(diffusers_config, f, indent=2, sort_keys=True)
    return folder
