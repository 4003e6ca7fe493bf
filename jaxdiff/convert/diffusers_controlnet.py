"""diffusers ``ControlNetModel`` -> :class:`jaxdiff.models.ControlNetConfig` and Flax params. From
a diffusers ControlNet folder (needs its files, so not a doctest; tests/parity/
test_controlnet_parity.py runs the same calls on models built in memory)::

    config = controlnet_config_from_diffusers(json.load(open("controlnet/config.json")))
    params = convert_controlnet_state_dict(
        load_torch_state_dict("controlnet/diffusion_pytorch_model.safetensors"), config)
    down, mid = ControlNet(config).apply({"params": params}, x, t, image, context=ctx)

The encoder options are a ``UNet2DConditionModel``'s and go through
:func:`~jaxdiff.convert.unet_config_from_diffusers` (so the same options are supported, and the
same ones rejected, naming them); the ControlNet's own are ``conditioning_channels``,
``conditioning_embedding_out_channels``, ``global_pool_conditions`` and
``controlnet_conditioning_channel_order``. Weights map by name, as the UNet's
(``controlnet_down_blocks.3.weight`` -> ``controlnet_down_blocks_3/kernel``,
``controlnet_cond_embedding.blocks.1.weight`` -> ``controlnet_cond_embedding/blocks_1/kernel``).
SD 1.x / 2.x ControlNets and SDXL ones (``addition_embed_type="text_time"``) both convert.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax.traverse_util import flatten_dict

from jaxdiff.convert.diffusers_config import unet_config_from_diffusers
from jaxdiff.convert.torch_io import match_state_dict, rename_legacy_attention_keys, torch_key
from jaxdiff.models.controlnet import controlnet_param_shapes
from jaxdiff.models.controlnet_config import ControlNetConfig

__all__ = [
    "CONTROLNET_DEFAULTS",
    "controlnet_config_from_diffusers",
    "convert_controlnet_state_dict",
    "controlnet_from_diffusers",
]

# diffusers 0.42 ControlNetModel constructor defaults (the keys a saved config.json holds).
CONTROLNET_DEFAULTS: dict[str, Any] = dict(
    in_channels=4, conditioning_channels=3, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", only_cross_attention=False,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=1280, transformer_layers_per_block=1, encoder_hid_dim=None,
    encoder_hid_dim_type=None, attention_head_dim=8, num_attention_heads=None,
    use_linear_projection=False, class_embed_type=None, addition_embed_type=None,
    addition_time_embed_dim=None, num_class_embeds=None, upcast_attention=False,
    resnet_time_scale_shift="default", projection_class_embeddings_input_dim=None,
    controlnet_conditioning_channel_order="rgb",
    conditioning_embedding_out_channels=(16, 32, 96, 256), global_pool_conditions=False,
    addition_embed_type_num_heads=64,
)  # fmt: skip
# The ControlNet's own options; every other one is a UNet2DConditionModel option.
_OWN = ("conditioning_channels", "controlnet_conditioning_channel_order",
        "conditioning_embedding_out_channels", "global_pool_conditions")
_MIDS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")


def controlnet_config_from_diffusers(config: Mapping[str, Any], **overrides) -> ControlNetConfig:
    """A diffusers ``ControlNetModel`` config -> :class:`~jaxdiff.models.ControlNetConfig`.

    Args:
      config: ``dict(model.config)`` or a parsed ``config.json``; missing keys take diffusers'
        defaults, keys starting with ``_`` are metadata.
      overrides: :class:`~jaxdiff.models.UNetConfig` fields of the encoder (``dtype``,
        ``param_dtype``, ...).

    ``num_attention_heads``, when set, is the number of heads (a ``ControlNetModel`` reads
    ``num_attention_heads or attention_head_dim``); the up path a ``UNet2DConditionModel`` would
    need is not part of a ControlNet.

    Raises:
      ValueError: naming every unknown or unsupported option (as
        :func:`~jaxdiff.convert.unet_config_from_diffusers`, and ``mid_block_type`` other than
        ``UNetMidBlock2DCrossAttn`` / ``UNetMidBlock2D``, a missing
        ``conditioning_embedding_out_channels``, an unknown channel order).
    """
    unknown = sorted(k for k in config if not k.startswith("_") and k not in CONTROLNET_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown ControlNetModel config options: {unknown}")
    c = {**CONTROLNET_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    if c["mid_block_type"] not in _MIDS:
        raise ValueError(f"unsupported ControlNetModel config options: mid_block_type="
                         f"{c['mid_block_type']!r} (supported: {list(_MIDS)})")
    if not c["conditioning_embedding_out_channels"]:
        raise ValueError("unsupported ControlNetModel config options: "
                         "conditioning_embedding_out_channels=None (supported: a list of ints)")
    unet = {k: v for k, v in c.items() if k not in _OWN and k != "num_attention_heads"}
    if c["num_attention_heads"] is not None:
        unet["attention_head_dim"] = c["num_attention_heads"]
    unet["out_channels"] = c["in_channels"]
    unet["up_block_types"] = [t.replace("Down", "Up") for t in reversed(c["down_block_types"])]
    try:
        encoder = unet_config_from_diffusers(unet, model_class="UNet2DConditionModel",
                                             **overrides)
    except ValueError as e:
        raise ValueError(str(e).replace("UNet2DConditionModel", "ControlNetModel")) from None
    return ControlNetConfig(
        encoder, conditioning_channels=c["conditioning_channels"],
        conditioning_embedding_channels=tuple(c["conditioning_embedding_out_channels"]),
        global_pool_conditions=c["global_pool_conditions"],
        conditioning_channel_order=c["controlnet_conditioning_channel_order"],
    )  # fmt: skip


def convert_controlnet_state_dict(
    state_dict: Mapping[str, Any], config: ControlNetConfig, *, dtype: Any = None
) -> dict:
    """A diffusers ``ControlNetModel`` state dict -> the ``"params"`` tree of
    ``ControlNet(config)``.

    Args:
      state_dict: key -> torch tensor or numpy array (``model.state_dict()``, or
        :func:`~jaxdiff.convert.load_torch_state_dict`).
      config: the target config (usually from :func:`controlnet_config_from_diffusers`).
      dtype: the params' dtype; default ``config.unet.param_dtype``.

    Raises:
      ValueError: listing every missing, unexpected and mis-shaped key (nothing is left at
        random init), and weights given under both a legacy and a current attention name.
    """
    if not isinstance(config, ControlNetConfig):
        raise ValueError(f"config must be a ControlNetConfig, got {type(config).__name__}")
    dtype = np.dtype(config.unet.param_dtype if dtype is None else dtype)
    given = rename_legacy_attention_keys(state_dict)
    shapes = flatten_dict(controlnet_param_shapes(config))
    expected = {torch_key(p): (p, tuple(s.shape)) for p, s in shapes.items()}
    return match_state_dict(given, expected, dtype=dtype, what="the ControlNet config")


def controlnet_from_diffusers(
    model, *, dtype: Any = None, param_dtype: Any = None
) -> tuple[ControlNetConfig, dict]:
    """``(config, params)`` from an instantiated diffusers ``ControlNetModel`` (its config and
    ``state_dict()``); ``dtype`` / ``param_dtype`` set the compute and parameter dtypes (float32
    default).

    Raises:
      ValueError: ``model`` is not a ``ControlNetModel``; as
        :func:`controlnet_config_from_diffusers` and :func:`convert_controlnet_state_dict`.
    """
    if type(model).__name__ != "ControlNetModel":
        raise ValueError(f"model must be a diffusers ControlNetModel, got {type(model).__name__}")
    overrides = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
    config = controlnet_config_from_diffusers(dict(model.config), **overrides)
    return config, convert_controlnet_state_dict(model.state_dict(), config)
