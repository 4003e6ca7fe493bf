"""Load a diffusers-format Stable Diffusion folder into one frozen :class:`StableDiffusion`.

The folder is what ``StableDiffusionPipeline.save_pretrained`` writes (and what the Hub holds)::

    model_index.json
    unet/config.json          unet/diffusion_pytorch_model[.fp16].safetensors (or .bin, sharded)
    vae/config.json           vae/diffusion_pytorch_model[.fp16].safetensors (or .bin)
    text_encoder/config.json  text_encoder/model[.fp16].safetensors (or pytorch_model[.fp16].bin)
    tokenizer/vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    scheduler/scheduler_config.json
    jaxdiff_generation.json   (optional: the settings it was measured with; diffusers ignores it)

Nothing touches the network. SD 1.x and 2.x (epsilon and v-prediction) load, and SDXL
(``StableDiffusionXLPipeline`` / ``StableDiffusionXLImg2ImgPipeline``: ``text_encoder_2`` +
``tokenizer_2`` besides, ``text_encoder`` + ``tokenizer`` optional for a refiner whose
``model_index.json`` names them ``[null, null]``, a ``text_time`` UNet; the pipeline flags
``force_zeros_for_empty_prompt`` and ``requires_aesthetics_score``) into the same
:class:`StableDiffusion`, so that one :func:`~jaxdiff.pipelines.generate` serves both. An
LCM-distilled UNet (``time_cond_proj_dim``: LCM_Dreamshaper_v7, LCM-SDXL) loads too:
:func:`~jaxdiff.pipelines.generate` passes it the guidance-scale embedding. The
``safety_checker``, ``feature_extractor`` and ``image_encoder`` entries are ignored. The
tokenizers are checked against their text encoders (:func:`check_tokenizer`), and a sharded
checkpoint's index may name only files inside its folder
(:mod:`jaxdiff.pipelines.checkpoint_files`).
"""

from __future__ import annotations

import contextlib
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
from jaxdiff.convert.transformers_clip import (
    clip_text_config_from_transformers,
    convert_clip_text_state_dict,
)
from jaxdiff.models.autoencoder_config import AutoencoderKLConfig
from jaxdiff.models.clip_text_config import CLIPTextConfig
from jaxdiff.models.unet_config import UNetConfig
from jaxdiff.pipelines.checkpoint_files import (
    VARIANT_RE,
    LoadOptionError,
    read_config,
    read_weights,
)
from jaxdiff.pipelines.sdxl_conditioning import check_add_embedding_dim
from jaxdiff.pipelines.sdxl_index import named_in_index, sdxl_flags
from jaxdiff.pipelines.generation_defaults import GenerationDefaults, read_generation_defaults
from jaxdiff.samplers.diffusers_names import PREDICTION_FROM_DIFFUSERS
from jaxdiff.samplers.registry import Sampler, get_sampler, sampler_spec
from jaxdiff.schedules import Schedule
from jaxdiff.text.tokenizer import CLIPTokenizer

__all__ = ["StableDiffusion", "SUPPORTED_PIPELINES", "check_tokenizer", "choose_sampler",
           "load_stable_diffusion", "load_tokenizer", "with_sampler"]

SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                "LatentConsistencyModelPipeline", "LatentConsistencyModelImg2ImgPipeline")
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
SUPPORTED_PIPELINES = SD_PIPELINES + SDXL_PIPELINES
_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_SDXL_PARTS = ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler")
_CLASSES = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "text_encoder_2": ("CLIPTextModelWithProjection",),
    "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast"),
}


@struct.dataclass
class StableDiffusion:
    """A loaded Stable Diffusion: a pytree whose only leaves are the parameters.

    Attributes:
      params: ``{"unet": ..., "vae": ..., "text_encoder": ...}``, the three models' Flax
        ``"params"`` trees; SDXL adds ``"text_encoder_2"`` (and a refiner may lack
        ``"text_encoder"``).
      unet_config, vae_config, text_config: the models' frozen configs (their ``dtype`` is the
        compute dtype); ``text_config`` is ``None`` for an SDXL refiner without
        ``text_encoder``.
      tokenizer: the prompt tokenizer (host side); ``None`` with ``text_config``.
      schedule: the training noise schedule (from ``scheduler_config.json``).
      sampler: the default sampler (``scheduler_config.json``'s scheduler, or the one chosen at
        load time).
      scheduler_config: the raw ``scheduler_config.json``.
      sample_size: the UNet's latent ``sample_size`` (default image side = ``sample_size *
        vae_scale_factor``).
      loras: the unfused LoRAs, ``((adapter, scale), ...)``: each adapter
        ``{"unet": .., "text_encoder": ..}`` (:mod:`jaxdiff.lora`) with its float32 scale, merged
        into the parameters inside the generation program (:func:`jaxdiff.pipelines.load_lora`);
        empty by default.
      generation_defaults: the settings the folder was measured with (its
        ``jaxdiff_generation.json``: sampler, steps, guidance, size, crop;
        :mod:`jaxdiff.pipelines.generation_defaults`), or ``None``. Informative:
        :func:`~jaxdiff.pipelines.generate` does not read them (pass them as its arguments);
        :func:`~jaxdiff.pipelines.export_stable_diffusion` writes them back.
      text_config_2, tokenizer_2: SDXL's second text encoder (``CLIPTextModelWithProjection``)
        and its tokenizer; ``None`` for SD 1.x / 2.x.
      force_zeros_for_empty_prompt, requires_aesthetics_score: SDXL's pipeline flags (its
        ``model_index.json``; diffusers' defaults True / False); False for SD.
      pipeline_class: the folder's ``model_index.json`` ``_class_name``.

    Only ``params`` and ``loras`` are pytree nodes: ``jax.tree.map(f, sd)`` maps the parameters
    (and the unfused LoRAs) and keeps the rest. The compiled generation programs are not part of
    it: they live in :data:`jaxdiff.pipelines.sd_program.PROGRAM_CACHE`, shared by every model
    with the same configs and schedule.
    """

    params: dict
    unet_config: UNetConfig = struct.field(pytree_node=False)
    vae_config: AutoencoderKLConfig = struct.field(pytree_node=False)
    text_config: CLIPTextConfig | None = struct.field(pytree_node=False)
    tokenizer: CLIPTokenizer | None = struct.field(pytree_node=False)
    schedule: Schedule = struct.field(pytree_node=False)
    sampler: Sampler = struct.field(pytree_node=False)
    scheduler_config: Mapping[str, Any] = struct.field(pytree_node=False)
    sample_size: int = struct.field(pytree_node=False, default=64)
    loras: tuple = ()
    generation_defaults: GenerationDefaults | None = struct.field(pytree_node=False,
                                                                  default=None)
    text_config_2: CLIPTextConfig | None = struct.field(pytree_node=False, default=None)
    tokenizer_2: CLIPTokenizer | None = struct.field(pytree_node=False, default=None)
    force_zeros_for_empty_prompt: bool = struct.field(pytree_node=False, default=False)
    requires_aesthetics_score: bool = struct.field(pytree_node=False, default=False)
    pipeline_class: str = struct.field(pytree_node=False, default="StableDiffusionPipeline")

    @property
    def is_sdxl(self) -> bool:
        """An SDXL model: ``text_encoder_2`` (and a ``text_time`` UNet)."""
        return self.text_config_2 is not None

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel: ``2 ** (len(vae block_channels) - 1)``."""
        return 2 ** (len(self.vae_config.block_channels) - 1)

    @property
    def prediction_type(self) -> str:
        """The UNet's output kind, from the scheduler config (``"epsilon"``/``"v_prediction"``)."""
        return str(self.scheduler_config.get("prediction_type", "epsilon"))


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
      variant: load ``*.<variant>.safetensors`` / ``.bin`` weights (e.g. ``"fp16"``; letters,
        digits and ``_``); ``None`` loads the plain files.
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
      A :class:`StableDiffusion`; its ``generation_defaults`` are the folder's
      ``jaxdiff_generation.json`` (:func:`~jaxdiff.pipelines.read_generation_defaults`), or
      ``None``. They choose nothing here: ``sampler`` is the folder's scheduler unless given.

    Raises:
      LoadOptionError: (a ``ValueError``) a folder that needs ``sampler`` (its scheduler has no
        jaxdiff sampler) or another ``variant`` (the weight files present are another one's).
      ValueError: naming the file or option: a missing ``model_index.json`` / part folder /
        config / weights file, a sharded index naming a file outside its folder, an unsupported
        class (SDXL, a non-CLIP text encoder, ...), an unsupported config option, weights that
        do not match their config, a tokenizer that does not fit the text encoder
        (:func:`check_tokenizer`), or a ``jaxdiff_generation.json`` with an unknown key or a
        bad value.
    """
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise ValueError(f"{root!r} is not a folder (a diffusers Stable Diffusion folder holds "
                         "model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    if not os.path.isfile(os.path.join(root, "model_index.json")):
        raise ValueError(f"{root!r} has no model_index.json (not a diffusers Stable Diffusion "
                         "folder: that holds model_index.json, unet/, vae/, text_encoder/, "
                         "tokenizer/, scheduler/)")
    if variant is not None and (not isinstance(variant, str) or not VARIANT_RE.match(variant)):
        raise ValueError(f"variant must be None or a name of letters, digits and _ (e.g. 'fp16'), "
                         f"got {variant!r}")
    index = read_config(os.path.join(root, "model_index.json"), "model_index.json")
    generation_defaults = read_generation_defaults(root)
    cls = index.get("_class_name")
    if cls not in SUPPORTED_PIPELINES:
        raise ValueError(f"model_index.json: _class_name {cls!r} is not supported (supported: "
                         f"{SUPPORTED_PIPELINES})")
    sdxl = cls in SDXL_PIPELINES
    if not sdxl and "text_encoder_2" in index:
        raise ValueError(f"model_index.json: a {cls} has no text_encoder_2 (an SDXL folder's "
                         f"_class_name is one of {SDXL_PIPELINES})")
    parts = list(_SDXL_PARTS if sdxl else _PARTS)
    if sdxl:  # text_encoder + tokenizer: present unless model_index says [null, null] (refiner)
        for part in ("text_encoder_2", "tokenizer_2"):
            if not named_in_index(index, part):
                raise ValueError(f"model_index.json: {part} is missing or null: an SDXL folder "
                                 f"needs {part}/ (SDXL's pooled prompt embedding comes from "
                                 "text_encoder_2)")
        firsts = [p for p in ("text_encoder", "tokenizer") if named_in_index(index, p)]
        if len(firsts) == 1:
            other = ({"text_encoder", "tokenizer"} - set(firsts)).pop()
            raise ValueError(f"model_index.json: {firsts[0]} is named but {other} is null: "
                             "SDXL's first text encoder needs both")
        parts += firsts
    for part in parts:
        if not os.path.isdir(os.path.join(root, part)):
            raise ValueError(f"{root!r} has no {part}/ folder (model_index.json of {cls} "
                             "names it)")
        _check_class(part, index, None)
    if dtype is not None and jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    overrides = dict(dtype=dtype, param_dtype=dtype)

    unet_dir = os.path.join(root, "unet")
    unet_raw = read_config(os.path.join(unet_dir, "config.json"), "unet")
    _check_class("unet", {}, unet_raw)
    text_time = unet_raw.get("addition_embed_type") == "text_time"
    if text_time != sdxl:
        raise ValueError(
            f"unet/config.json: addition_embed_type={unet_raw.get('addition_embed_type')!r} "
            f"in a {cls} folder: " + ("an SDXL UNet needs 'text_time'" if sdxl else
                                      "a 'text_time' UNet is SDXL's (model_index.json "
                                      f"_class_name one of {SDXL_PIPELINES})"))
    with _errors_in("unet/config.json"):
        unet_config = unet_config_from_diffusers(unet_raw, model_class="UNet2DConditionModel",
                                                 **overrides)
    unet_state = read_weights(unet_dir, ("diffusion_pytorch_model",), variant)
    with _errors_in(f"{unet_dir}: weights"):
        unet_params = convert_unet_state_dict(unet_state, unet_config)
    del unet_state

    vae_dir = os.path.join(root, "vae")
    vae_raw = read_config(os.path.join(vae_dir, "config.json"), "vae")
    _check_class("vae", {}, vae_raw)
    with _errors_in("vae/config.json"):
        vae_config = vae_config_from_diffusers(vae_raw, **overrides)
    vae_state = read_weights(vae_dir, ("diffusion_pytorch_model",), variant)
    with _errors_in(f"{vae_dir}: weights"):
        vae_params = convert_vae_state_dict(vae_state, vae_config)
    del vae_state

    params = {"unet": unet_params, "vae": vae_params}
    text_config = tokenizer = text_config_2 = tokenizer_2 = None
    if "text_encoder" in parts:
        text_config, params["text_encoder"] = _load_text_encoder(root, "text_encoder", variant,
                                                                 overrides)
        tokenizer = load_tokenizer(os.path.join(root, "tokenizer"))
        check_tokenizer(tokenizer, text_config, os.path.join(root, "tokenizer"),
                        os.path.join(root, "text_encoder"))
    flags = {}
    if sdxl:
        text_config_2, params["text_encoder_2"] = _load_text_encoder(
            root, "text_encoder_2", variant, overrides)
        tokenizer_2 = load_tokenizer(os.path.join(root, "tokenizer_2"))
        from jaxdiff.pipelines.sdxl_text import check_sdxl_text_encoders  # imports this module

        check_sdxl_text_encoders(text_config, text_config_2, tokenizer, tokenizer_2)
        flags = sdxl_flags(index, cls)
        with _errors_in("unet/config.json"):
            check_add_embedding_dim(unet_config.added_time_dim,
                                    5 if flags["requires_aesthetics_score"] else 6,
                                    text_config_2.projection_dim,
                                    unet_config.added_cond_input_dim)
    sched_raw = read_config(os.path.join(root, "scheduler", "scheduler_config.json"),
                           "scheduler")
    sched_cls = sched_raw.get("_class_name")
    known = scheduler_classes()
    if sampler is None and sched_cls not in known:
        raise LoadOptionError(
            f"scheduler/scheduler_config.json: {sched_cls} has no jaxdiff sampler (supported: "
            f"{', '.join(known)})", "sampler", "dpmpp_2m",
            " (or another registered sampler) to sample its training schedule with a jaxdiff "
            "sampler")
    if sampler_options and sampler is None:
        raise ValueError("sampler_options given without sampler")
    with _errors_in("scheduler/scheduler_config.json"):
        if sched_cls in known:
            schedule = schedule_from_diffusers_config(sched_raw)
        else:  # only the training schedule's keys are read (as a DDIMScheduler would read them)
            schedule = schedule_from_diffusers_config({**sched_raw,
                                                       "_class_name": "DDIMScheduler"})
    if sampler is not None:
        chosen = choose_sampler(sampler, sampler_options, sched_raw)
    else:
        with _errors_in("scheduler/scheduler_config.json"):
            chosen = sampler_from_diffusers_config(sched_raw)
    cross = unet_config.context_dim
    widths = [(n, c.hidden_size) for n, c in (("text_encoder", text_config),
                                               ("text_encoder_2", text_config_2)) if c]
    if cross is not None and cross != sum(w for _, w in widths):
        named = " + ".join(f"{n}/config.json hidden_size={w}" for n, w in widths)
        raise ValueError(f"unet/config.json: cross_attention_dim={cross} differs from {named}")
    return StableDiffusion(
        params=params, unet_config=unet_config, vae_config=vae_config, text_config=text_config,
        tokenizer=tokenizer, schedule=schedule, sampler=chosen, scheduler_config=sched_raw,
        sample_size=int(unet_raw.get("sample_size", 64)),
        generation_defaults=generation_defaults, text_config_2=text_config_2,
        tokenizer_2=tokenizer_2, pipeline_class=cls, **flags,
    )


def _load_text_encoder(root: str, part: str, variant: str | None,
                       overrides: Mapping[str, Any]) -> tuple[CLIPTextConfig, dict]:
    """``(config, params)`` of ``root/part``: a ``CLIPTextModel`` (``text_encoder``) or a
    ``CLIPTextModelWithProjection`` (``text_encoder_2``)."""
    folder = os.path.join(root, part)
    raw = read_config(os.path.join(folder, "config.json"), part)
    want = _CLASSES[part][0]
    archs = raw.get("architectures") or [want]
    if not isinstance(archs, list) or archs[0] != want:
        raise ValueError(f"{part}/config.json: architectures {archs} is not supported "
                         f"(supported: {want})")
    with _errors_in(f"{part}/config.json"):
        config = clip_text_config_from_transformers(
            raw, with_projection=want == "CLIPTextModelWithProjection", **overrides)
    state = read_weights(folder, ("model", "pytorch_model"), variant)
    with _errors_in(f"{folder}: weights"):
        params = convert_clip_text_state_dict(state, config)
    return config, params


@contextlib.contextmanager
def _errors_in(where: str):
    """A ``ValueError`` raised inside (not a :class:`LoadOptionError`) is re-raised prefixed with
    ``where``, the file or folder it is about."""
    try:
        yield
    except LoadOptionError:
        raise
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def check_tokenizer(tokenizer: CLIPTokenizer, text_config: CLIPTextConfig,
                    tokenizer_name: str = "tokenizer", text_name: str = "text_encoder") -> None:
    """Refuse a tokenizer that does not fit the text encoder: an id (the special tokens' among
    them) at or beyond its ``vocab_size``, or a ``max_length`` beyond its
    ``max_position_embeddings``. Inside ``jit`` such an id or position would not fail: JAX
    clamps the embedding lookup, and the image comes out wrong (e.g. all black) without an
    error.

    Raises:
      ValueError: naming both folders (``tokenizer_name``, ``text_name``) and the numbers.
    """
    vocab = tokenizer.get_vocab()
    top = max(vocab.values(), default=-1)
    size = text_config.vocab_size
    where = f"{tokenizer_name!r} does not fit {text_name!r}"
    if top >= size:
        specials = {name: getattr(tokenizer, f"{name}_token_id")
                    for name in ("bos", "eos", "pad", "unk")}
        bad = sorted(f"{k}_token={v}" for k, v in specials.items() if v >= size)
        named = f" (among them {', '.join(bad)})" if bad else ""
        raise ValueError(f"{where}: the tokenizer has {len(vocab)} tokens with ids up to {top}"
                         f"{named}, the text encoder's vocab_size is {size}; ids >= {size} "
                         "have no embedding (are the two folders from the same checkpoint?)")
    if tokenizer.max_length > text_config.max_position_embeddings:
        raise ValueError(f"{where}: the tokenizer pads prompts to {tokenizer.max_length} tokens "
                         f"(model_max_length), the text encoder has "
                         f"{text_config.max_position_embeddings} positions "
                         "(max_position_embeddings)")


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
    model = read_config(tok_json, "tokenizer").get("model", {})
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
        try:
            return CLIPTokenizer.from_pretrained(tmp)
        except ValueError as e:  # name the folder, not the temporary copy
            raise ValueError(str(e).replace(tmp, folder)) from None


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
    return dataclasses.replace(sd, sampler=choose_sampler(name, options, sd.scheduler_config))

