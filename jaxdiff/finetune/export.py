"""What a finished fine-tuning run writes: a LoRA as diffusers' ``pytorch_lora_weights.safetensors``
(which ``StableDiffusionPipeline.load_lora_weights`` and
:func:`jaxdiff.convert.lora_files.read_lora` read),
or a fully fine-tuned model as a diffusers Stable Diffusion folder
(:func:`jaxdiff.pipelines.export_stable_diffusion`)."""

from __future__ import annotations

import os
from typing import Any, Dict

import jax

from jaxdiff.convert.lora_files import save_lora
from jaxdiff.finetune.modes import FinetuneConfig, finetuned_pipeline
from jaxdiff.pipelines.export import export_stable_diffusion
from jaxdiff.pipelines.loading import StableDiffusion

__all__ = ["LORA_FILE", "DIFFUSERS_DIR", "save_lora_file", "export_finetuned"]

LORA_FILE = "pytorch_lora_weights.safetensors"
DIFFUSERS_DIR = "diffusers"


def save_lora_file(path: str, lora: Dict[str, Any], scale: float) -> str:
    """Writes ``lora`` (``{"unet": ..., "text_encoder": ...}``) with its factor ``scale`` folded
    in, as diffusers/peft-format safetensors at ``path``
    (:func:`jaxdiff.convert.lora_files.save_lora`); returns the path."""
    return save_lora(path, lora, scale=scale)


def export_finetuned(workdir: str, sd: StableDiffusion, cfg: FinetuneConfig,
                     params: Dict[str, Any]) -> Dict[str, Any]:
    """Writes the run's result into ``workdir``: LoRA mode ``WORKDIR/pytorch_lora_weights.
    safetensors`` (scale ``alpha / rank`` folded in), full mode ``WORKDIR/diffusers/`` (the whole
    pipeline, the base model's VAE / tokenizer / scheduler with the trained UNet and text
    encoder, and the base folder's ``jaxdiff_generation.json`` when it has one:
    ``sd.generation_defaults``, :mod:`jaxdiff.pipelines.generation_defaults`). Call it on every
    process; process 0 writes. Returns ``{"lora_file": path or None, "diffusers": path or None,
    "export_bytes": size on disk}``.

    Raises:
      ValueError: from the writers (params that do not fit the configs).
    """
    params = jax.device_get(params)   # every process takes part in a gather of split params
    out: Dict[str, Any] = {"lora_file": None, "diffusers": None, "export_bytes": None}
    if jax.process_index() != 0:
        return out
    if cfg.mode == "lora":
        path = save_lora_file(os.path.join(workdir, LORA_FILE), params, cfg.lora_scale)
        out.update(lora_file=path, export_bytes=os.path.getsize(path))
        return out
    path = export_stable_diffusion(finetuned_pipeline(sd, cfg, params),
                                   os.path.join(workdir, DIFFUSERS_DIR))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    out.update(diffusers=path, export_bytes=size)
    return out
