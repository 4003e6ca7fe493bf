"""Write jaxdiff models as a diffusers-format Stable Diffusion folder: the reverse of
:func:`~jaxdiff.pipelines.load_stable_diffusion`. Train in JAX, load in PyTorch::

    save_stable_diffusion("out/sd", unet_params=..., unet_config=..., vae_params=...,
                          vae_config=..., text_params=..., text_config=..., tokenizer=tok,
                          sampler="ddim", schedule="cosine", num_timesteps=1000)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained("out/sd")   # in PyTorch

The folder is what ``StableDiffusionPipeline.save_pretrained`` writes, without a safety checker
or feature extractor (``requires_safety_checker: false``)::

    model_index.json
    unet/config.json          unet/diffusion_pytorch_model.safetensors
    vae/config.json           vae/diffusion_pytorch_model.safetensors
    text_encoder/config.json  text_encoder/model.safetensors
    tokenizer/vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
    scheduler/scheduler_config.json
    jaxdiff_generation.json   (with generation_defaults: the settings to generate with;
                               diffusers ignores it; jaxdiff.pipelines.generation_defaults)

Weights and configs come from :mod:`jaxdiff.convert.export_diffusers`, the scheduler from
:func:`~jaxdiff.convert.export_scheduler.scheduler_to_diffusers`; nothing imports torch.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from jaxdiff.convert.diffusers_scheduler import (
    sampler_from_diffusers_config,
    scheduler_classes,
    scheduler_spec,
)
from jaxdiff.convert.export_diffusers import (
    DIFFUSERS_VERSION,
    clip_text_to_transformers,
    save_safetensors,
    unet_to_diffusers,
    vae_to_diffusers,
)
from jaxdiff.convert.export_scheduler import scheduler_to_diffusers
from jaxdiff.models.autoencoder_config import AutoencoderKLConfig
from jaxdiff.models.clip_text_config import CLIPTextConfig
from jaxdiff.models.unet_config import UNetConfig
from jaxdiff.pipelines.generation_defaults import (
    GENERATION_DEFAULTS_FILE,
    GenerationDefaults,
    write_generation_defaults,
)
from jaxdiff.pipelines.export_sdxl import export_stable_diffusion_xl
from jaxdiff.pipelines.loading import StableDiffusion
from jaxdiff.samplers.registry import Sampler, get_sampler
from jaxdiff.schedules import Schedule
from jaxdiff.text.tokenizer import CLIPTokenizer

__all__ = ["export_stable_diffusion", "save_stable_diffusion", "save_tokenizer"]


def _write_json(path: str, value: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def save_tokenizer(tokenizer: CLIPTokenizer, path: str | os.PathLike) -> str:
    """Write a jaxdiff :class:`~jaxdiff.text.CLIPTokenizer` as a transformers ``CLIPTokenizer``
    folder: ``vocab.json``, ``merges.txt`` (``#version: 0.2`` then one ``a b`` merge a line, in
    rank order), ``tokenizer_config.json`` (``model_max_length = tokenizer.max_length``, the
    special tokens, ``do_lower_case``) and ``special_tokens_map.json``. Returns ``path``.

    ``CLIPTokenizer.from_pretrained(path)`` (jaxdiff's or transformers') gives back the same ids.
    The text cleanup is not stored (no file field holds it): transformers 5 applies its own
    (jaxdiff's ``normalization="fast"``), which agrees with ``"basic"`` on plain text.

    Raises:
      ValueError: for a ``tokenizer`` that is not a :class:`~jaxdiff.text.CLIPTokenizer`, or a
        vocabulary token that contains a space or a newline (``merges.txt`` could not hold it).
    """
    if not isinstance(tokenizer, CLIPTokenizer):
        raise ValueError(f"tokenizer must be a jaxdiff CLIPTokenizer, got "
                         f"{type(tokenizer).__name__}")
    path = os.fspath(path)
    vocab, merges = tokenizer.get_vocab(), tokenizer.get_merges()   # the BPE the ids come from
    bad = sorted({t for pair in merges for t in pair if any(c in t for c in " \n")})
    if bad:
        raise ValueError(f"tokenizer: merged symbols {bad[:5]} contain a space or newline")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(["#version: 0.2", *(" ".join(m) for m in merges)]) + "\n")
    specials = dict(bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                    pad_token=tokenizer.pad_token, unk_token=tokenizer.unk_token)
    _write_json(os.path.join(path, "special_tokens_map.json"), specials)
    _write_json(os.path.join(path, "tokenizer_config.json"),
                dict(specials, model_max_length=tokenizer.max_length, do_lower_case=True,
                     tokenizer_class="CLIPTokenizer", clean_up_tokenization_spaces=False))
    return path


def _as_the_pipeline_loads_it(config: dict) -> dict:
    """``StableDiffusionPipeline.__init__`` rewrites a scheduler config with ``steps_offset !=
    1`` or ``clip_sample=True`` (to 1 and False). Where that would change the sampler, raise;
    where it cannot (no "leading" spacing), write ``steps_offset=1`` (no rewrite, no warning)."""
    cls = config["_class_name"]
    c = {**scheduler_spec(config).diffusers.defaults, **config}
    if c.get("clip_sample") is True:
        raise ValueError(f"sampler option clip_x0={c.get('clip_sample_range')!r}: "
                         "StableDiffusionPipeline sets the scheduler's clip_sample to False when "
                         "it loads (clip_x0=None for latents)")
    if "steps_offset" in c and c["steps_offset"] != 1:
        if c.get("timestep_spacing") == "leading" and cls != "LCMScheduler":
            raise ValueError(f"sampler option steps_offset={c['steps_offset']} with "
                             "spacing='leading': StableDiffusionPipeline sets steps_offset to 1 "
                             "when it loads (use steps_offset=1, as Stable Diffusion, or spacing "
                             "'trailing' / 'linspace')")
        config = {**config, "steps_offset": 1}  # read only by the "leading" spacing
    return config


def save_stable_diffusion(
    path: str | os.PathLike,
    *,
    unet_params: Mapping,
    unet_config: UNetConfig,
    vae_params: Mapping,
    vae_config: AutoencoderKLConfig,
    text_params: Mapping,
    text_config: CLIPTextConfig,
    tokenizer: CLIPTokenizer,
    sampler: Sampler | str | None = None,
    schedule: str | np.ndarray | Schedule = "linear",
    num_timesteps: int = 1000,
    rescale_to_zero_terminal_snr: bool = False,
    schedule_kwargs: Mapping[str, Any] | None = None,
    scheduler_config: Mapping[str, Any] | None = None,
    image_size: int | None = None,
    generation_defaults: GenerationDefaults | None = None,
    dtype: Any = np.float32,
) -> str:
    """Write a diffusers-format Stable Diffusion folder that
    ``diffusers.StableDiffusionPipeline.from_pretrained(path)`` loads and runs (and
    :func:`~jaxdiff.pipelines.load_stable_diffusion` loads back, params bit for bit in float32).

    Args:
      path: the folder (created; files already there are overwritten).
      unet_params, unet_config: the UNet (``"params"`` tree and :class:`UNetConfig`):
        cross-attention over the text encoder's last hidden state (``context_dim =
        text_config.hidden_size``), no class labels, ``in_channels = out_channels =
        vae_config.latent_channels`` (see :func:`~jaxdiff.convert.unet_config_to_diffusers`).
      vae_params, vae_config: the :class:`~jaxdiff.models.AutoencoderKL` (its
        ``scaling_factor`` / ``shift_factor`` are what the pipeline scales latents by).
      text_params, text_config: the :class:`~jaxdiff.models.CLIPTextModel` (no projection).
      tokenizer: the :class:`~jaxdiff.text.CLIPTokenizer` (:func:`save_tokenizer`).
      sampler, schedule, num_timesteps, rescale_to_zero_terminal_snr, schedule_kwargs: the
        default sampler (``None``: ``get_sampler("ddim", steps_offset=1)``) and the training
        schedule (:func:`~jaxdiff.make_schedule`'s name,
        ``num_timesteps`` and keywords, or betas), as
        :func:`~jaxdiff.convert.export_scheduler.scheduler_to_diffusers` takes them.
      scheduler_config: instead of those, a diffusers ``scheduler_config.json`` dict written as
        it is (e.g. ``StableDiffusion.scheduler_config`` of a loaded folder); it must name a
        class jaxdiff maps.

        ``StableDiffusionPipeline`` rewrites two scheduler settings when it loads: it sets
        ``clip_sample`` to False and ``steps_offset`` to 1. So ``clip_x0`` must be None, and
        ``steps_offset`` 1 where the spacing is ``"leading"`` (DDIM's and DDPM's default; SD's
        ``steps_offset=1``); elsewhere it has no effect and is written as 1.
      image_size: the default image side in pixels (the UNet's ``sample_size`` times the VAE's
        downscale); default ``vae_config.sample_size``. diffusers' pipeline needs a multiple of
        8 (and of the downscale).
      generation_defaults: the settings the model is meant to be sampled with (sampler, steps,
        guidance, size, crop), written as ``jaxdiff_generation.json``
        (:mod:`jaxdiff.pipelines.generation_defaults`); ``None`` writes none (and removes one
        left in ``path`` by an earlier export).
      dtype: the weights' dtype on disk, ``float32`` (default) or ``float16``.

    Returns:
      ``path``.

    Raises:
      ValueError: naming the argument or field: parts that do not fit together (``context_dim``
        vs ``hidden_size``, UNet channels vs ``latent_channels``, ``num_classes`` set, a
        tokenizer larger than the text model's vocabulary or context), an ``image_size`` that
        is not a multiple of 8 and of the VAE's downscale, ``clip_x0`` / ``steps_offset`` that
        the pipeline would rewrite, ``generation_defaults`` that are not a
        :class:`~jaxdiff.pipelines.GenerationDefaults` or whose size is not a multiple of the
        VAE's downscale, and as the exporters (a config field or sampler option
        diffusers cannot express, params that do not match their config).
    """
    if not isinstance(unet_config, UNetConfig):
        raise ValueError(f"unet_config must be a UNetConfig, got {type(unet_config).__name__}")
    if not isinstance(vae_config, AutoencoderKLConfig):
        raise ValueError(f"vae_config must be an AutoencoderKLConfig, got "
                         f"{type(vae_config).__name__}")
    if not isinstance(text_config, CLIPTextConfig):
        raise ValueError(f"text_config must be a CLIPTextConfig, got "
                         f"{type(text_config).__name__}")
    if not isinstance(tokenizer, CLIPTokenizer):
        raise ValueError(f"tokenizer must be a jaxdiff CLIPTokenizer, got "
                         f"{type(tokenizer).__name__}")
    if unet_config.context_dim != text_config.hidden_size:
        raise ValueError(f"unet_config.context_dim={unet_config.context_dim} must equal "
                         f"text_config.hidden_size={text_config.hidden_size} (the UNet "
                         "cross-attends to the text encoder's last hidden state)")
    if unet_config.num_classes is not None:
        raise ValueError(f"unet_config.num_classes={unet_config.num_classes}: "
                         "StableDiffusionPipeline passes no class labels")
    if unet_config.added_cond is not None:
        raise ValueError(f"unet_config.added_cond={unet_config.added_cond!r}: an SDXL UNet; "
                         "StableDiffusionPipeline passes no added_cond_kwargs")
    if unet_config.time_cond_dim is not None:
        raise ValueError(f"unet_config.time_cond_dim={unet_config.time_cond_dim}: an LCM UNet's "
                         "guidance embedding, which jaxdiff's Stable Diffusion pipeline does not "
                         "pass yet")
    z = vae_config.latent_channels
    for name in ("in_channels", "out_channels"):
        if getattr(unet_config, name) != z:
            raise ValueError(f"unet_config.{name}={getattr(unet_config, name)} must equal "
                             f"vae_config.latent_channels={z}")
    if text_config.projection_dim is not None:
        raise ValueError("text_config.projection_dim must be None: StableDiffusionPipeline's "
                         "text encoder is a CLIPTextModel")
    if tokenizer.vocab_size > text_config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens > text_config.vocab_size="
                         f"{text_config.vocab_size}")
    if tokenizer.max_length > text_config.max_position_embeddings:
        raise ValueError(f"tokenizer.max_length={tokenizer.max_length} > text_config."
                         f"max_position_embeddings={text_config.max_position_embeddings}")
    f = vae_config.downscale
    size = vae_config.sample_size if image_size is None else image_size
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(f"image_size must be an int >= 1 or None, got {image_size!r}")
    if size % f or size % 8:
        raise ValueError(f"image_size={size} must be a multiple of 8 (diffusers' "
                         f"StableDiffusionPipeline requires it) and of the VAE's downscale {f}"
                         + ("; it defaults to vae_config.sample_size" if image_size is None
                            else ""))
    if generation_defaults is not None:
        if not isinstance(generation_defaults, GenerationDefaults):
            raise ValueError(f"generation_defaults must be a GenerationDefaults or None, got "
                             f"{type(generation_defaults).__name__}")
        g = generation_defaults
        if g.height is not None and (g.height % f or g.width % f):
            raise ValueError(f"generation_defaults: height x width = {g.height}x{g.width} must "
                             f"be multiples of the VAE's downscale {f}")
    if scheduler_config is not None:
        scheduler_config = dict(scheduler_config)
        sampler_from_diffusers_config(scheduler_config)  # raises naming what jaxdiff lacks
    else:
        if sampler is None:
            sampler = get_sampler("ddim", steps_offset=1)
        scheduler_config = scheduler_to_diffusers(
            sampler, schedule, num_timesteps,
            rescale_to_zero_terminal_snr=rescale_to_zero_terminal_snr, **(schedule_kwargs or {}))
    scheduler_config = _as_the_pipeline_loads_it(scheduler_config)

    # Convert everything before writing anything.
    unet_state, unet_json = unet_to_diffusers(unet_params, unet_config,
                                              sample_size=int(size) // f, dtype=dtype)
    vae_state, vae_json = vae_to_diffusers(vae_params, vae_config, dtype=dtype)
    text_state, text_json = clip_text_to_transformers(
        text_params, text_config, bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype=dtype)
    if not isinstance(scheduler_config.get("_class_name"), str):
        raise ValueError("scheduler_config must have a '_class_name'")

    root = os.fspath(path)
    os.makedirs(root, exist_ok=True)
    weights = "diffusion_pytorch_model.safetensors"
    for part, state, config in (("unet", unet_state, unet_json), ("vae", vae_state, vae_json)):
        _write_json(os.path.join(root, part, "config.json"), config)
        save_safetensors(state, os.path.join(root, part, weights))
    _write_json(os.path.join(root, "text_encoder", "config.json"), text_json)
    save_safetensors(text_state, os.path.join(root, "text_encoder", "model.safetensors"))
    save_tokenizer(tokenizer, os.path.join(root, "tokenizer"))
    _write_json(os.path.join(root, "scheduler", "scheduler_config.json"), scheduler_config)
    _write_json(os.path.join(root, "model_index.json"), {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_config["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    })
    if generation_defaults is not None:
        write_generation_defaults(root, generation_defaults)
    elif os.path.isfile(os.path.join(root, GENERATION_DEFAULTS_FILE)):
        os.remove(os.path.join(root, GENERATION_DEFAULTS_FILE))
    return root


def export_stable_diffusion(
    sd: StableDiffusion, path: str | os.PathLike, *, dtype: Any = np.float32
) -> str:
    """:func:`save_stable_diffusion` of an in-memory (or loaded)
    :class:`~jaxdiff.pipelines.StableDiffusion`: its params, configs and tokenizer, its
    ``scheduler_config`` as the folder's scheduler (``sd.sampler`` is not written: diffusers
    samples with the scheduler config's class), ``sd.sample_size * sd.vae_scale_factor`` as
    the image size, and ``sd.generation_defaults`` (if any) as ``jaxdiff_generation.json``: a
    loaded folder exported again keeps its defaults. Returns ``path``. An SDXL model
    (``sd.is_sdxl``) is written as an SDXL folder by
    :func:`~jaxdiff.pipelines.export_sdxl.export_stable_diffusion_xl`.

    Raises:
      ValueError: as :func:`save_stable_diffusion`; naming ``sd.scheduler_config`` when it
        is not a scheduler config jaxdiff maps; and for a model with unfused LoRAs
        (``sd.loras``), which the folder could not hold: ``fuse_lora(sd)`` first, or save the
        LoRA with :func:`jaxdiff.convert.save_lora`.
    """
    if not isinstance(sd, StableDiffusion):
        raise ValueError(f"sd must be a StableDiffusion, got {type(sd).__name__}")
    if sd.is_sdxl:
        return export_stable_diffusion_xl(sd, path, dtype=dtype)
    if sd.loras:
        raise ValueError(f"sd has {len(sd.loras)} unfused LoRA(s) (sd.loras), which a diffusers "
                         "folder cannot hold: export fuse_lora(sd) to write the adapted model, "
                         "or unload_loras(sd) for the base model")
    name = sd.scheduler_config.get("_class_name")
    if name not in scheduler_classes():
        raise ValueError(f"sd.scheduler_config: _class_name {name!r} is not one of "
                         f"{list(scheduler_classes())}")
    return save_stable_diffusion(
        path, unet_params=sd.params["unet"], unet_config=sd.unet_config,
        vae_params=sd.params["vae"], vae_config=sd.vae_config,
        text_params=sd.params["text_encoder"], text_config=sd.text_config,
        tokenizer=sd.tokenizer, scheduler_config=sd.scheduler_config,
        image_size=sd.sample_size * sd.vae_scale_factor,
        generation_defaults=sd.generation_defaults, dtype=dtype)
