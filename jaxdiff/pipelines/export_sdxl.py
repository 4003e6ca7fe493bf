"""Write an SDXL :class:`~jaxdiff.pipelines.StableDiffusion` as a diffusers-format folder that
``diffusers.StableDiffusionXLPipeline.from_pretrained`` (or ``StableDiffusionXLImg2ImgPipeline``
for a refiner) loads, and :func:`~jaxdiff.pipelines.load_stable_diffusion` loads back (params bit
for bit in float32)::

    model_index.json          _class_name, force_zeros_for_empty_prompt
                              (+ requires_aesthetics_score for StableDiffusionXLImg2ImgPipeline)
    unet/  vae/               config.json + diffusion_pytorch_model.safetensors
    text_encoder/             CLIPTextModel (absent, [null, null] in model_index, for a refiner)
    text_encoder_2/           CLIPTextModelWithProjection
    tokenizer/  tokenizer_2/  (tokenizer_2 pads with its own pad token, "!" for SDXL)
    scheduler/scheduler_config.json
    jaxdiff_generation.json   (sd.generation_defaults, if any; diffusers ignores it)

:func:`~jaxdiff.pipelines.export_stable_diffusion` calls :func:`export_stable_diffusion_xl` for
an SDXL model. Nothing imports torch.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from jaxdiff.convert.diffusers_scheduler import sampler_from_diffusers_config
from jaxdiff.convert.export_diffusers import (
    DIFFUSERS_VERSION,
    clip_text_to_transformers,
    save_safetensors,
    unet_to_diffusers,
    vae_to_diffusers,
)
from jaxdiff.pipelines.generation_defaults import (
    GENERATION_DEFAULTS_FILE,
    write_generation_defaults,
)
from jaxdiff.pipelines.loading import SDXL_PIPELINES, StableDiffusion

__all__ = ["export_stable_diffusion_xl"]


def _write_json(path: str, value: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def export_stable_diffusion_xl(sd: StableDiffusion, path: str | os.PathLike, *,
                               dtype: Any = np.float32) -> str:
    """Write ``sd`` (an SDXL model: ``sd.is_sdxl``) as a diffusers SDXL folder (module
    docstring): its params and configs, both tokenizers, ``sd.scheduler_config`` as the
    scheduler, ``sd.sample_size`` as the UNet's, ``sd.pipeline_class`` and its flags in
    ``model_index.json``, ``sd.generation_defaults`` as ``jaxdiff_generation.json`` (``None``
    writes none and removes one left in ``path`` by an earlier export). ``dtype``: the weights
    on disk, ``float32`` or ``float16``. Returns
    ``path``.

    Raises:
      ValueError: a model that is not SDXL, has unfused LoRAs, or whose scheduler config jaxdiff
        does not map; parts that do not fit (``sd.params`` without ``text_encoder_2``, a
        ``text_config`` without its params); and as the exporters (params that do not match
        their configs).
    """
    from jaxdiff.pipelines.export import save_tokenizer  # its one home; imports this module

    if not isinstance(sd, StableDiffusion) or not sd.is_sdxl:
        raise ValueError("export_stable_diffusion_xl needs an SDXL StableDiffusion "
                         "(text_config_2 set)")
    if sd.loras:
        raise ValueError(f"sd has {len(sd.loras)} unfused LoRA(s) (sd.loras): fuse_lora(sd) "
                         "first, or unload_loras(sd)")
    cls = sd.pipeline_class if sd.pipeline_class in SDXL_PIPELINES else SDXL_PIPELINES[0]
    if sd.requires_aesthetics_score and cls != "StableDiffusionXLImg2ImgPipeline":
        raise ValueError("requires_aesthetics_score is a StableDiffusionXLImg2ImgPipeline's "
                         f"flag, the model's pipeline_class is {sd.pipeline_class!r}")
    for name, config in (("text_encoder", sd.text_config), ("text_encoder_2", sd.text_config_2)):
        if (config is None) != (name not in sd.params):
            raise ValueError(f"sd.params has {'no ' if config is not None else ''}{name!r} but "
                             f"sd.{name.replace('encoder', 'config')} is "
                             f"{'set' if config is not None else 'None'}")
    sampler_from_diffusers_config(dict(sd.scheduler_config))  # raises naming what jaxdiff lacks

    # Convert everything before writing anything.
    unet_state, unet_json = unet_to_diffusers(sd.params["unet"], sd.unet_config,
                                              sample_size=sd.sample_size, dtype=dtype)
    vae_state, vae_json = vae_to_diffusers(sd.params["vae"], sd.vae_config, dtype=dtype)
    texts = {}
    for name, config, tok in (("text_encoder", sd.text_config, sd.tokenizer),
                              ("text_encoder_2", sd.text_config_2, sd.tokenizer_2)):
        if config is not None:
            texts[name] = clip_text_to_transformers(
                sd.params[name], config, bos_token_id=tok.bos_token_id,
                pad_token_id=tok.pad_token_id, dtype=dtype)

    root = os.fspath(path)
    os.makedirs(root, exist_ok=True)
    weights = "diffusion_pytorch_model.safetensors"
    for part, state, config in (("unet", unet_state, unet_json), ("vae", vae_state, vae_json)):
        _write_json(os.path.join(root, part, "config.json"), config)
        save_safetensors(state, os.path.join(root, part, weights))
    for name, (state, config) in texts.items():
        _write_json(os.path.join(root, name, "config.json"), config)
        save_safetensors(state, os.path.join(root, name, "model.safetensors"))
    if sd.tokenizer is not None:
        save_tokenizer(sd.tokenizer, os.path.join(root, "tokenizer"))
    save_tokenizer(sd.tokenizer_2, os.path.join(root, "tokenizer_2"))
    _write_json(os.path.join(root, "scheduler", "scheduler_config.json"),
                dict(sd.scheduler_config))
    first = sd.text_config is not None
    index = {
        "_class_name": cls, "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None], "image_encoder": [None, None],
        "force_zeros_for_empty_prompt": bool(sd.force_zeros_for_empty_prompt),
        "scheduler": ["diffusers", sd.scheduler_config["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"] if first else [None, None],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"] if first else [None, None],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    if cls == "StableDiffusionXLImg2ImgPipeline":
        index["requires_aesthetics_score"] = bool(sd.requires_aesthetics_score)
    _write_json(os.path.join(root, "model_index.json"), index)
    if sd.generation_defaults is not None:
        write_generation_defaults(root, sd.generation_defaults)
    elif os.path.isfile(os.path.join(root, GENERATION_DEFAULTS_FILE)):
        os.remove(os.path.join(root, GENERATION_DEFAULTS_FILE))
    return root
