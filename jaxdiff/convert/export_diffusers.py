"""jaxdiff models -> diffusers / transformers state dicts and configs: the reverse of
:mod:`~jaxdiff.convert.diffusers_unet`, :mod:`~jaxdiff.convert.diffusers_vae` and
:mod:`~jaxdiff.convert.transformers_clip`.

Each exporter returns ``(state_dict, config)``: numpy arrays in torch's layout under the torch
keys, and the ``config.json`` dict that diffusers' ``UNet2DConditionModel`` / ``AutoencoderKL`` or
transformers' ``CLIPTextModel`` read::

    state, config = unet_to_diffusers(params, unet_config, sample_size=8)
    save_safetensors(state, "unet/diffusion_pytorch_model.safetensors")

There is one source of truth for the names: the keys are the importers' (:func:`torch_key`,
:func:`clip_torch_key`), the weights go through :func:`flax_to_torch`, the inverse of the
importers' :func:`torch_to_flax`. Every exported config is read back by the importer's own config
function and compared with the given one on everything that changes the model's output; a field
the diffusers / transformers class cannot express (a jaxdiff-only feature) is a ``ValueError``
naming it. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import numpy as np
from flax.traverse_util import flatten_dict

from jaxdiff.convert.diffusers_config import UNET2D_CONDITION_DEFAULTS, unet_config_from_diffusers
from jaxdiff.convert.diffusers_vae import AUTOENCODER_KL_DEFAULTS, vae_config_from_diffusers
from jaxdiff.convert.torch_io import flax_to_torch, torch_key
from jaxdiff.convert.transformers_clip import clip_text_config_from_transformers, clip_torch_key
from jaxdiff.models.autoencoder import autoencoder_param_shapes
from jaxdiff.models.autoencoder_config import AutoencoderKLConfig
from jaxdiff.models.clip_text import clip_text_param_shapes
from jaxdiff.models.clip_text_config import CLIPTextConfig
from jaxdiff.models.unet import unet_param_shapes
from jaxdiff.models.unet_config import UNetConfig

__all__ = [
    "DIFFUSERS_VERSION",
    "EXPORT_DTYPES",
    "clip_text_to_transformers",
    "params_to_state_dict",
    "save_safetensors",
    "unet_to_diffusers",
    "vae_to_diffusers",
]

DIFFUSERS_VERSION = "0.42.1"  # the version the exported folders are tested against
EXPORT_DTYPES = ("float32", "float16")
_DOWN = {None: "DownBlock2D", "cross": "CrossAttnDownBlock2D"}
_UP = {None: "UpBlock2D", "cross": "CrossAttnUpBlock2D"}


def _dtype(dtype) -> np.dtype:
    name = np.dtype(dtype).name if dtype is not None else None
    if name not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
    return np.dtype(name)


def params_to_state_dict(params: Mapping, shapes: Mapping, key_fn, dtype, what: str) -> dict:
    """``{torch key: numpy array}`` of a params tree that must match ``shapes`` (a tree of
    ``jax.ShapeDtypeStruct``, the model's ``*_param_shapes``) exactly: each weight through
    :func:`flax_to_torch` under ``key_fn(path)`` (:func:`torch_key` for diffusers models), cast
    to ``dtype`` (one of :data:`EXPORT_DTYPES`); ``what`` names the model in the errors.

    Raises:
      ValueError: ``params`` not a nested dict; listing every missing, unexpected or
        mis-shaped param; ``dtype`` not an export dtype.
    """
    dtype = _dtype(dtype)
    if not isinstance(params, Mapping):
        raise ValueError(f"{what} params must be a nested dict (a Flax 'params' tree), got "
                         f"{type(params).__name__}")
    flat = flatten_dict(dict(params))
    expected = {p: tuple(s.shape) for p, s in flatten_dict(shapes).items()}
    missing = sorted("/".join(p) for p in set(expected) - set(flat))
    unexpected = sorted("/".join(p) for p in set(flat) - set(expected))
    misshaped = sorted(f"{'/'.join(p)}: {tuple(np.shape(flat[p]))} (config: {expected[p]})"
                       for p in set(flat) & set(expected)
                       if tuple(np.shape(flat[p])) != expected[p])
    if missing or unexpected or misshaped:
        lines = [f"{what} params do not match its config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected),
                             ("mis-shaped", misshaped)):
            if items:
                lines.append(f"  {len(items)} {title}: " + "; ".join(items))
        raise ValueError("\n".join(lines))
    out = {}
    for path in sorted(flat):
        value = np.asarray(jax.device_get(flat[path])).astype(np.float32).astype(dtype)
        out[key_fn(path)] = np.ascontiguousarray(flax_to_torch(path, value))
    return out


def _mismatch(what: str, cls: str, given: Mapping, back: Mapping) -> None:
    bad = [f"{k}={given[k]!r} (as {cls}: {back[k]!r})" for k in given if given[k] != back[k]]
    if bad:
        raise ValueError(f"{what}: {cls} cannot express " + "; ".join(bad))


def _plain(value: Any) -> Any:
    """A JSON-ready value: tuples -> lists, numpy scalars -> Python scalars."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ------------------------------------------------------------------------------------- UNet


def _unet_meaning(cfg: UNetConfig) -> dict[str, Any]:
    """Everything about a UNet config that changes the model (per-level values expanded, fields
    that cannot matter dropped)."""
    n = len(cfg.block_channels)
    mid = cfg.mid_attention if cfg.mid_block and cfg.mid_layers else None
    attends = [lv for lv in range(n) if cfg.attention[lv] or cfg.up_kinds[lv]
               or (mid and lv == n - 1)]
    cross = [lv for lv in range(n) if "cross" in (cfg.attention[lv], cfg.up_kinds[lv])
             or (mid == "cross" and lv == n - 1)]
    conditioned = cfg.num_classes is not None
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_channels=cfg.block_channels,
        layers_per_block=tuple(cfg.layers(lv) for lv in range(n)), attention=cfg.attention,
        up_attention=cfg.up_kinds, mid_block=cfg.mid_block, mid_attention=mid,
        mid_layers=cfg.mid_layers if cfg.mid_block else None,
        num_heads=tuple(cfg.heads(lv) for lv in attends),
        transformer_depth=tuple(cfg.depth(lv) for lv in cross),
        use_linear_projection=cfg.use_linear_projection if cross else None,
        context_dim=cfg.context_dim, norm_groups=cfg.norm_groups, norm_eps=cfg.norm_eps,
        dropout=cfg.dropout, mid_block_scale_factor=cfg.mid_block_scale_factor,
        time_embed_dim=cfg.time_dim, flip_sin_to_cos=cfg.flip_sin_to_cos,
        freq_shift=cfg.freq_shift, num_classes=cfg.num_classes,
        class_conditioning=cfg.class_conditioning if conditioned else None,
        num_class_tokens=(cfg.num_class_tokens if conditioned
                          and cfg.class_conditioning == "cross_attention" else None),
        center_input_sample=cfg.center_input_sample, added_cond=cfg.added_cond,
        added_time_dim=cfg.added_time_dim, added_cond_input_dim=cfg.added_cond_input_dim,
        time_cond_dim=cfg.time_cond_dim,
    )  # fmt: skip


def _uniform_or_list(values: tuple) -> Any:
    return values[0] if len(set(values)) == 1 else list(values)


def unet_config_to_diffusers(config: UNetConfig, *, sample_size: int | None = None) -> dict:
    """A :class:`UNetConfig` -> a diffusers ``UNet2DConditionModel`` ``config.json`` dict.

    Args:
      config: the UNet's config. Attention must be ``None`` or ``"cross"`` per level, the mid
        block a cross-attention block with one layer (``mid_layers=1``) or a single resnet
        (``mid_attention=None, mid_layers=0``); class labels only as ``"embedding"``
        (diffusers' ``num_class_embeds = num_classes + 1``). ``added_cond="text_time"`` is
        written as ``addition_embed_type`` with ``addition_time_embed_dim`` and
        ``projection_class_embeddings_input_dim``; ``time_cond_dim`` as ``time_cond_proj_dim``.
      sample_size: the latent side the model was trained at (diffusers' ``sample_size``,
        informational there; it sets the pipeline's default image size); ``None``: omitted.

    Raises:
      ValueError: naming the field diffusers cannot express (``attention`` / ``up_attention``
        with ``"self"``, ``mid_attention`` / ``mid_layers``, ``class_conditioning=
        "cross_attention"``), or any field that does not survive the round trip through
        :func:`~jaxdiff.convert.unet_config_from_diffusers`.
    """
    if not isinstance(config, UNetConfig):
        raise ValueError(f"config must be a UNetConfig, got {type(config).__name__}")
    cls = "UNet2DConditionModel"
    n = len(config.block_channels)
    for name, kinds in (("attention", config.attention), ("up_attention", config.up_kinds)):
        if "self" in kinds:
            raise ValueError(f"unet_config.{name}={kinds!r}: {cls} has no self-attention-only "
                             "blocks (supported per level: None or 'cross')")
    mid = config.mid_attention if config.mid_layers else None
    if not config.mid_block:
        mid_type = None
    elif mid == "cross" and config.mid_layers == 1:
        mid_type = "UNetMidBlock2DCrossAttn"
    elif mid is None and config.mid_layers == 0:
        mid_type = "UNetMidBlock2D"
    else:
        raise ValueError(f"unet_config.mid_attention={config.mid_attention!r} with mid_layers="
                         f"{config.mid_layers}: {cls}'s mid block is one cross-attention layer "
                         "(mid_attention='cross', mid_layers=1) or one resnet (mid_layers=0)")
    if config.num_classes is not None and config.class_conditioning != "embedding":
        raise ValueError(f"unet_config.class_conditioning={config.class_conditioning!r}: {cls} "
                         "takes class labels only as an embedding added to the time embedding "
                         "('embedding'); learned class tokens have no diffusers counterpart")
    if sample_size is not None and (not isinstance(sample_size, int) or sample_size < 1):
        raise ValueError(f"sample_size must be an int >= 1 or None, got {sample_size!r}")
    freq = config.freq_shift
    out = dict(UNET2D_CONDITION_DEFAULTS)
    out.update(
        sample_size=sample_size, in_channels=config.in_channels,
        out_channels=config.out_channels, block_out_channels=list(config.block_channels),
        down_block_types=[_DOWN[k] for k in config.attention],
        up_block_types=[_UP[k] for k in reversed(config.up_kinds)],
        mid_block_type=mid_type,
        layers_per_block=_uniform_or_list(tuple(config.layers(lv) for lv in range(n))),
        attention_head_dim=_uniform_or_list(tuple(config.heads(lv) for lv in range(n))),
        transformer_layers_per_block=_uniform_or_list(tuple(config.depth(lv) for lv in range(n))),
        use_linear_projection=config.use_linear_projection,
        cross_attention_dim=config.context_dim or UNET2D_CONDITION_DEFAULTS["cross_attention_dim"],
        norm_num_groups=config.norm_groups, norm_eps=config.norm_eps, dropout=config.dropout,
        mid_block_scale_factor=config.mid_block_scale_factor,
        time_embedding_dim=config.time_embed_dim, flip_sin_to_cos=config.flip_sin_to_cos,
        freq_shift=int(freq) if float(freq).is_integer() else freq,
        center_input_sample=config.center_input_sample,
        num_class_embeds=None if config.num_classes is None else config.num_classes + 1,
        addition_embed_type=config.added_cond, addition_time_embed_dim=config.added_time_dim,
        projection_class_embeddings_input_dim=config.added_cond_input_dim,
        time_cond_proj_dim=config.time_cond_dim,
    )  # fmt: skip
    out = {k: _plain(v) for k, v in out.items()}
    back = unet_config_from_diffusers(out, model_class=cls)
    _mismatch("unet_config", cls, _unet_meaning(config), _unet_meaning(back))
    return {"_class_name": cls, "_diffusers_version": DIFFUSERS_VERSION, **out}


def unet_to_diffusers(
    params: Mapping, config: UNetConfig, *, sample_size: int | None = None,
    dtype: Any = np.float32,
) -> tuple[dict[str, np.ndarray], dict]:
    """A jaxdiff UNet -> ``(state_dict, config)`` of diffusers' ``UNet2DConditionModel``.

    Args:
      params: the ``"params"`` tree of ``UNet(config)`` (jax or numpy leaves, any float dtype).
      config: its :class:`UNetConfig` (see :func:`unet_config_to_diffusers` for what diffusers
        can express).
      sample_size: the latent side, written to the config (``None``: omitted).
      dtype: the exported weights' dtype, ``float32`` (default) or ``float16``.

    Returns:
      ``{torch key: numpy array}`` (``UNet2DConditionModel(**config).load_state_dict`` takes it
      after ``torch.from_numpy``), and the ``config.json`` dict.

    Raises:
      ValueError: listing every missing, unexpected or mis-shaped param; and as
        :func:`unet_config_to_diffusers`.
    """
    diffusers_config = unet_config_to_diffusers(config, sample_size=sample_size)
    state = params_to_state_dict(params, unet_param_shapes(config), torch_key, dtype, "the UNet")
    return state, diffusers_config


# -------------------------------------------------------------------------------------- VAE


def vae_config_to_diffusers(config: AutoencoderKLConfig) -> dict:
    """An :class:`AutoencoderKLConfig` -> a diffusers ``AutoencoderKL`` ``config.json`` dict
    (every field has a diffusers counterpart: ``block_channels`` -> ``block_out_channels``,
    ``norm_groups`` -> ``norm_num_groups``, ``mid_attention`` -> ``mid_block_add_attention``,
    the latent scaling and the others by name).

    Raises:
      ValueError: for a config that is not an :class:`AutoencoderKLConfig`, or one that does not
        survive the round trip through :func:`~jaxdiff.convert.vae_config_from_diffusers`.
    """
    if not isinstance(config, AutoencoderKLConfig):
        raise ValueError(f"config must be an AutoencoderKLConfig, got {type(config).__name__}")
    n = len(config.block_channels)
    out = dict(AUTOENCODER_KL_DEFAULTS)
    out.update(
        in_channels=config.in_channels, out_channels=config.out_channels,
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=list(config.block_channels), layers_per_block=config.layers_per_block,
        act_fn="silu", latent_channels=config.latent_channels, norm_num_groups=config.norm_groups,
        sample_size=config.sample_size, scaling_factor=config.scaling_factor,
        shift_factor=config.shift_factor, latents_mean=config.latents_mean,
        latents_std=config.latents_std, force_upcast=config.force_upcast,
        use_quant_conv=config.use_quant_conv, use_post_quant_conv=config.use_post_quant_conv,
        mid_block_add_attention=config.mid_attention,
    )  # fmt: skip
    out = {k: _plain(v) for k, v in out.items()}
    back = vae_config_from_diffusers(out)
    keep = lambda c: {f.name: getattr(c, f.name) for f in dataclasses.fields(c)  # noqa: E731
                      if f.name not in ("dtype", "param_dtype", "attention_implementation")}
    _mismatch("vae_config", "AutoencoderKL", keep(config), keep(back))
    return {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, **out}


def vae_to_diffusers(
    params: Mapping, config: AutoencoderKLConfig, *, dtype: Any = np.float32
) -> tuple[dict[str, np.ndarray], dict]:
    """A jaxdiff :class:`~jaxdiff.models.AutoencoderKL` -> ``(state_dict, config)`` of
    diffusers' ``AutoencoderKL`` (attention under the current ``to_q/to_k/to_v/to_out.0``
    names). ``dtype``: ``float32`` (default) or ``float16``.

    Raises:
      ValueError: listing every missing, unexpected or mis-shaped param; and as
        :func:`vae_config_to_diffusers`.
    """
    diffusers_config = vae_config_to_diffusers(config)
    state = params_to_state_dict(params, autoencoder_param_shapes(config), torch_key, dtype,
                                 "the AutoencoderKL")
    return state, diffusers_config


# ------------------------------------------------------------------------------------- CLIP


def clip_text_config_to_transformers(
    config: CLIPTextConfig, *, bos_token_id: int | None = None, pad_token_id: int | None = None
) -> dict:
    """A :class:`CLIPTextConfig` -> a transformers ``CLIPTextConfig`` ``config.json`` dict
    (``architectures``: ``CLIPTextModel``, or ``CLIPTextModelWithProjection`` when
    ``projection_dim`` is set). ``bos_token_id`` / ``pad_token_id`` (the tokenizer's; they do
    not change the forward pass) are written when given.

    Raises:
      ValueError: for a config that is not a :class:`CLIPTextConfig`, or one that does not
        survive the round trip through
        :func:`~jaxdiff.convert.clip_text_config_from_transformers`.
    """
    if not isinstance(config, CLIPTextConfig):
        raise ValueError(f"config must be a CLIPTextConfig, got {type(config).__name__}")
    projection = config.projection_dim is not None
    out: dict[str, Any] = dict(
        architectures=["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        model_type="clip_text_model", vocab_size=config.vocab_size,
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        projection_dim=config.projection_dim if projection else 512,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings, hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps, eos_token_id=config.eos_token_id,
        attention_dropout=0.0, dropout=0.0, initializer_factor=1.0, initializer_range=0.02,
        dtype="float32",
    )  # fmt: skip
    for name, value in (("bos_token_id", bos_token_id), ("pad_token_id", pad_token_id)):
        if value is not None:
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0 or None, got {value!r}")
            out[name] = int(value)
    out = {k: _plain(v) for k, v in out.items()}
    back = clip_text_config_from_transformers(out)
    keep = lambda c: {f.name: getattr(c, f.name) for f in dataclasses.fields(c)  # noqa: E731
                      if f.name not in ("dtype", "param_dtype", "attention_implementation")}
    _mismatch("text_config", "CLIPTextModel", keep(config), keep(back))
    return out


def clip_text_to_transformers(
    params: Mapping, config: CLIPTextConfig, *, bos_token_id: int | None = None,
    pad_token_id: int | None = None, dtype: Any = np.float32,
) -> tuple[dict[str, np.ndarray], dict]:
    """A jaxdiff :class:`~jaxdiff.models.CLIPTextModel` -> ``(state_dict, config)`` of
    transformers' ``CLIPTextModel`` (or ``CLIPTextModelWithProjection``).

    The keys carry the ``text_model.`` prefix, as Stable Diffusion ``text_encoder/``
    checkpoints do (transformers loads them into either class); no ``position_ids`` buffer.
    ``dtype``: ``float32`` (default) or ``float16``.

    Raises:
      ValueError: listing every missing, unexpected or mis-shaped param; and as
        :func:`clip_text_config_to_transformers`.
    """
    hf_config = clip_text_config_to_transformers(config, bos_token_id=bos_token_id,
                                                 pad_token_id=pad_token_id)
    state = params_to_state_dict(params, clip_text_param_shapes(config), clip_torch_key, dtype,
                                 "the CLIP text model")
    return state, hf_config


# -------------------------------------------------------------------------------------- I/O


def save_safetensors(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> str:
    """Write ``{key: numpy array}`` as a ``.safetensors`` file with torch's metadata
    (``{"format": "pt"}``, which transformers requires). Returns the path.

    Raises:
      ValueError: for a path not ending in ``.safetensors`` or a value that is not a numpy array.
    """
    import safetensors.numpy

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"path must end in .safetensors, got {path!r}")
    for key, value in state_dict.items():
        if not isinstance(value, np.ndarray):
            raise ValueError(f"state_dict[{key!r}] must be a numpy array, got "
                             f"{type(value).__name__}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()},
                                path, metadata={"format": "pt"})
    return path
