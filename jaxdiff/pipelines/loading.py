"""Load a diffusers-format Stable Diffusion folder into one frozen :class:`StableDiffusion`.

The folder is what ``StableDiffusionPipeline.save_pretrained`` writes (and what the Hub holds)::

    model_index.json
    unet/config.json          unet/diffusion_pytorch_model[.fp16].safetensors (or .bin, sharded)
    vae/config.json           vae/diffusion_pytorch_model[.fp16].safetensors (or .bin)
    text_encoder/config.json  text_encoder/model[.fp16].safetensors (or pytorch_model[.fp16].bin)
    tokenizer/vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    scheduler/scheduler_config.json

Nothing touches the network. SD 1.x and 2.x (epsilon and v-prediction) load; SDXL (a
``text_encoder_2`` in ``model_index.json``, or a UNet with ``addition_embed_type="text_time"``) is
rejected. The ``safety_checker`` and ``feature_extractor`` entries are ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import jax.numpy as jnp
from flax import struct

from jaxdiff.convert.diffusers_config import unet_config_from_diffusers
from jaxdiff.convert.diffusers_scheduler import (
    sampler_from_diffusers_config,
    schedule_from_diffusers_config,
    scheduler_classes,
)
from jaxdiff.convert.diffusers_unet import convert_unet_state_dict
from jaxdiff.convert.diffusers_vae import convert_vae_state_dict, vae_config_from_diffusers
from jaxdiff.convert.torch_io import load_torch_state_dict
from jaxdiff.convert.transformers_clip import (
    clip_text_config_from_transformers,
    convert_clip_text_state_dict,
)
from jaxdiff.models.autoencoder_config import AutoencoderKLConfig
from jaxdiff.models.clip_text_config import CLIPTextConfig
from jaxdiff.models.unet_config import UNetConfig
from jaxdiff.samplers.diffusers_names import PREDICTION_FROM_DIFFUSERS
from jaxdiff.samplers.registry import Sampler, get_sampler, sampler_spec
from jaxdiff.schedules import Schedule
from jaxdiff.text.tokenizer import CLIPTokenizer

__all__ = ["StableDiffusion", "load_stable_diffusion", "SUPPORTED_PIPELINES"]

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_CLASSES = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
}
_SDXL = "SDXL (Stable Diffusion XL) is not supported by jaxdiff's Stable Diffusion pipeline"


@struct.dataclass
class StableDiffusion:
    """A loaded Stable Diffusion: a pytree whose only leaves are the parameters.

    Attributes:
      params: ``{"unet": ..., "vae": ..., "text_encoder": ...}``, the three models' Flax
        ``"params"`` trees.
      unet_config, vae_config, text_config: the models' frozen configs (their ``dtype`` is the
        compute dtype).
      tokenizer: the prompt tokenizer (host side).
      schedule: the training noise schedule (from ``scheduler_config.json``).
      sampler: the default sampler (``scheduler_config.json``'s scheduler, or the one chosen at
        load time).
      scheduler_config: the raw ``scheduler_config.json``.
      sample_size: the UNet's latent ``sample_size`` (default image side = ``sample_size *
        vae_scale_factor``).
      compiled: the compiled generation programs (filled by the pipeline; not part of the
        value).

    Only ``params`` is a pytree node: ``jax.tree.map(f, sd)`` maps the parameters and keeps the
    rest.
    """

    params: dict
    unet_config: UNetConfig = struct.field(pytree_node=False)
    vae_config: AutoencoderKLConfig = struct.field(pytree_node=False)
    text_config: CLIPTextConfig = struct.field(pytree_node=False)
    tokenizer: CLIPTokenizer = struct.field(pytree_node=False)
    schedule: Schedule = struct.field(pytree_node=False)
    sampler: Sampler = struct.field(pytree_node=False)
    scheduler_config: Mapping[str, Any] = struct.field(pytree_node=False)
    sample_size: int = struct.field(pytree_node=False, default=64)
    compiled: dict = struct.field(pytree_node=False, default_factory=dict, compare=False)

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel: ``2 ** (len(vae block_channels) - 1)``."""
        return 2 ** (len(self.vae_config.block_channels) - 1)

    @property
    def prediction_type(self) -> str:
        """The UNet's output kind, from the scheduler config (``"epsilon"``/``"v_prediction"``)."""
        return str(self.scheduler_config.get("prediction_type", "epsilon"))


def _read_json(path: str, option: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"{option}: {path!r} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{option}: {path!r} is not valid JSON ({e})") from None


def _weights(folder: str, stems: tuple[str, ...], variant: str | None) -> dict:
    """The state dict of ``folder``: ``<stem>[.<variant>].safetensors`` (or its sharded
    ``.index.json``), else ``.bin``, for the first stem found."""
    suffix = f".{variant}" if variant else ""
    tried = []
    for ext in ("safetensors", "bin"):
        for stem in stems:
            name = f"{stem}{suffix}.{ext}"
            index = os.path.join(folder, name + ".index.json")
            if os.path.isfile(index):
                shards = sorted(set(_read_json(index, "model")["weight_map"].values()))
                out: dict = {}
                for shard in shards:
                    out.update(load_torch_state_dict(os.path.join(folder, shard)))
                return out
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return load_torch_state_dict(path)
            tried.append(name)
    others = sorted(n for n in os.listdir(folder) if n.endswith((".safetensors", ".bin")))
    hint = f"; the folder holds {others} (pass variant=...)" if others else ""
    raise ValueError(f"variant={variant!r}: no weights file in {folder!r} (looked for "
                     f"{tried}){hint}")


def _check_class(part: str, index: Mapping[str, Any], config: Mapping[str, Any] | None) -> None:
    entry = index.get(part)
    name = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
    if config is not None and name is None:
        name = config.get("_class_name")
    if part in _CLASSES and name is not None and name not in _CLASSES[part]:
        raise ValueError(f"model_index.json: {part} is a {name}; jaxdiff supports "
                         f"{' / '.join(_CLASSES[part])}")


def load_stable_diffusion(
    path: str | os.PathLike,
    *,
    variant: str | None = None,
    dtype: Any = jnp.float32,
    sampler: str | None = None,
    sampler_options: Mapping[str, Any] | None = None,
) -> StableDiffusion:
    """Load a diffusers-format Stable Diffusion folder (no network).

    Args:
      path: the folder holding ``model_index.json`` and the five parts (module docstring).
      variant: load ``*.<variant>.safetensors`` / ``.bin`` weights (e.g. ``"fp16"``); ``None``
        loads the plain files.
      dtype: the compute dtype of the three models (``jnp.float32`` or ``jnp.bfloat16``); the
        parameters are stored in it too. The VAE decodes in float32 when its config says
        ``force_upcast`` (the default), whatever ``dtype``.
      sampler: a registered sampler name (:func:`jaxdiff.samplers.sampler_names`) to use instead
        of the folder's scheduler (SD 1.x's ``PNDMScheduler`` is ``pndm``); its
        ``prediction_type`` is the scheduler config's. Required when the folder's scheduler has
        no jaxdiff counterpart (:func:`jaxdiff.convert.scheduler_classes` lists those that
        have one): its training-schedule keys are then read alone.
      sampler_options: options for ``sampler`` (see :func:`jaxdiff.samplers.sampler_options`).

    Returns:
      A :class:`StableDiffusion`.

    Raises:
      ValueError: naming the file or option: a missing ``model_index.json`` / part folder /
        config / weights file, an unsupported class (SDXL, a non-CLIP text encoder, ...), an
        unsupported config option, or weights that do not match their config.
    """
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise ValueError(f"path: {root!r} is not a folder (a diffusers Stable Diffusion folder)")
    index = _read_json(os.path.join(root, "model_index.json"), "path")
    cls = index.get("_class_name")
    if "text_encoder_2" in index or "XL" in str(cls):
        raise ValueError(f"model_index.json: {_SDXL} (it names {cls!r} / text_encoder_2)")
    if cls not in SUPPORTED_PIPELINES:
        raise ValueError(f"model_index.json: _class_name {cls!r} is not supported (supported: "
                         f"{SUPPORTED_PIPELINES})")
    for part in _PARTS:
        if not os.path.isdir(os.path.join(root, part)):
            raise ValueError(f"path: {root!r} has no {part}/ folder (needed by {cls})")
        _check_class(part, index, None)
    if dtype is not None and jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    overrides = dict(dtype=dtype, param_dtype=dtype)

    unet_dir = os.path.join(root, "unet")
    unet_raw = _read_json(os.path.join(unet_dir, "config.json"), "unet")
    _check_class("unet", {}, unet_raw)
    if unet_raw.get("addition_embed_type") == "text_time":
        raise ValueError(f"unet/config.json: addition_embed_type='text_time': {_SDXL}")
    unet_config = unet_config_from_diffusers(unet_raw, model_class="UNet2DConditionModel",
                                             **overrides)
    unet_params = convert_unet_state_dict(
        _weights(unet_dir, ("diffusion_pytorch_model",), variant), unet_config)

    vae_dir = os.path.join(root, "vae")
    vae_raw = _read_json(os.path.join(vae_dir, "config.json"), "vae")
    _check_class("vae", {}, vae_raw)
    vae_config = vae_config_from_diffusers(vae_raw, **overrides)
    vae_params = convert_vae_state_dict(
        _weights(vae_dir, ("diffusion_pytorch_model",), variant), vae_config)

    te_dir = os.path.join(root, "text_encoder")
    te_raw = _read_json(os.path.join(te_dir, "config.json"), "text_encoder")
    archs = te_raw.get("architectures") or ["CLIPTextModel"]
    if archs[0] != "CLIPTextModel":
        raise ValueError(f"text_encoder/config.json: architectures {archs} is not supported "
                         "(supported: CLIPTextModel)")
    text_config = clip_text_config_from_transformers(te_raw, with_projection=False, **overrides)
    text_params = convert_clip_text_state_dict(
        _weights(te_dir, ("model", "pytorch_model"), variant), text_config)

    tokenizer = load_tokenizer(os.path.join(root, "tokenizer"))
    sched_raw = _read_json(os.path.join(root, "scheduler", "scheduler_config.json"),
                           "scheduler")
    sched_cls = sched_raw.get("_class_name")
    known = scheduler_classes()
    if sampler is None and sched_cls not in known:
        raise ValueError(
            f"scheduler/scheduler_config.json: {sched_cls} has no jaxdiff sampler (supported: "
            f"{list(known)}); pass sampler= (e.g. 'ddim' or 'dpmpp_2m') to use its "
            "training schedule with a jaxdiff sampler"
        )
    if sampler_options and sampler is None:
        raise ValueError("sampler_options given without sampler")
    if sched_cls in known:
        schedule = schedule_from_diffusers_config(sched_raw)
    else:  # only the training schedule's keys are read (as a DDIMScheduler would read them)
        schedule = schedule_from_diffusers_config({**sched_raw, "_class_name": "DDIMScheduler"})
    if sampler is not None:
        chosen = choose_sampler(sampler, sampler_options, sched_raw)
    else:
        chosen = sampler_from_diffusers_config(sched_raw)
    cross = unet_config.context_dim
    if cross is not None and cross != text_config.hidden_size:
        raise ValueError(f"unet/config.json: cross_attention_dim={cross} differs from "
                         f"text_encoder/config.json hidden_size={text_config.hidden_size}")
    params = {"unet": unet_params, "vae": vae_params, "text_encoder": text_params}
    return StableDiffusion(
        params=params, unet_config=unet_config, vae_config=vae_config, text_config=text_config,
        tokenizer=tokenizer, schedule=schedule, sampler=chosen, scheduler_config=sched_raw,
        sample_size=int(unet_raw.get("sample_size", 64)),
    )


def load_tokenizer(folder: str) -> CLIPTokenizer:
    """The CLIP tokenizer of a ``tokenizer/`` folder: ``vocab.json`` + ``merges.txt`` (as SD
    checkpoints hold them), else the BPE model inside a ``tokenizers`` ``tokenizer.json`` (as
    transformers 5 saves it); the folder's ``tokenizer_config.json`` / ``special_tokens_map.json``
    apply either way.

    Raises:
      ValueError: naming the folder when it holds neither, and as
        :meth:`CLIPTokenizer.from_pretrained`.
    """
    if os.path.isfile(os.path.join(folder, "vocab.json")):
        return CLIPTokenizer.from_pretrained(folder)
    tok_json = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(tok_json):
        raise ValueError(f"tokenizer: {folder!r} holds neither vocab.json + merges.txt nor "
                         "tokenizer.json")
    model = _read_json(tok_json, "tokenizer").get("model", {})
    if model.get("type") != "BPE" or "vocab" not in model:
        raise ValueError(f"tokenizer: {tok_json!r} does not hold a BPE model")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(model["vocab"], f, ensure_ascii=False)
        with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(["#version: 0.2", *merges]) + "\n")
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if os.path.isfile(os.path.join(folder, name)):
                shutil.copy(os.path.join(folder, name), os.path.join(tmp, name))
        return CLIPTokenizer.from_pretrained(tmp)


def choose_sampler(name: str, options: Mapping[str, Any] | None,
                   scheduler_config: Mapping[str, Any]) -> Sampler:
    """``get_sampler(name, **options)`` with the scheduler config's ``prediction_type`` unless
    ``options`` sets one (for samplers that declare the option: all the built-in ones)."""
    options = dict(options or {})
    pred = scheduler_config.get("prediction_type", "epsilon")
    if "prediction_type" in sampler_spec(name).options:
        options.setdefault("prediction_type", PREDICTION_FROM_DIFFUSERS.get(pred, pred))
    return get_sampler(name, **options)


def with_sampler(sd: StableDiffusion, name: str, **options: Any) -> StableDiffusion:
    """``sd`` with another default sampler (:func:`choose_sampler`); shares the parameters."""
    return dataclasses.replace(sd, sampler=choose_sampler(name, options, sd.scheduler_config),
                               compiled={})

