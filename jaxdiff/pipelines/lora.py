"""LoRAs in the Stable Diffusion pipeline: unfused (merged inside the generation program, the
scale a traced value) or fused (merged once into the parameters).

    sd = load_lora(sd, "style.safetensors", scale=0.8)        # unfused: sd.loras grows
    sd = load_lora(sd, "subject.safetensors", scale=0.5)      # several, each with its scale
    out = generate(sd, "a photo", seed=0)
    sd = set_lora_scales(sd, [0.3, 1.0])                      # no recompilation
    fused = fuse_lora(sd)                                     # merged into sd.params, no cost
    base = unload_loras(sd)

**Unfused** (:func:`load_lora`): the adapters and their scales ride along with the model
(``StableDiffusion.loras``, pytree leaves like the parameters) and the generation program merges
``W + sum_i scale_i * down_i @ up_i`` at its start, with the scales as traced float32 scalars:
a new scale (or a new adapter of the same shapes) reuses the compiled program. The merge costs
one ``d_in x r x d_out`` matmul per adapted layer per call, next to nothing beside the
denoising loop. **Fused** (:func:`fuse_lora`): the merge happens once, outside ``jit``; the
model then runs at its plain speed (and a new scale is a new merge).

LoRA files are read by :func:`jaxdiff.convert.read_lora` (diffusers / peft and kohya / A1111
formats, each layer's ``alpha / rank`` folded in), so the scale here is the user's weight on top
(diffusers' ``set_adapters(..., adapter_weights=)`` / ``fuse_lora(lora_scale=)``, A1111's
``<lora:name:weight>``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.convert.lora_files import read_lora
from jaxdiff.convert.lora_names import LORA_PARTS
from jaxdiff.lora import check_lora, merge_loras
from jaxdiff.pipelines.loading import StableDiffusion

__all__ = ["load_lora", "fuse_lora", "unload_loras", "set_lora_scales", "apply_loras"]


def _check_scale(scale: Any, name: str = "scale") -> float:
    if isinstance(scale, (bool, np.bool_, str, bytes)) or np.ndim(scale) != 0:
        raise ValueError(f"{name} must be a finite number, got {scale!r}")
    try:
        value = float(scale)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {scale!r}")
    return value


def _adapter(sd: StableDiffusion, lora: Any) -> dict:
    """An adapter for ``sd`` from a file / folder path or an adapter dict (checked)."""
    if isinstance(lora, (str, os.PathLike)):
        return read_lora(lora, sd.params, unet_config=sd.unet_config)
    if not isinstance(lora, Mapping) or not lora or set(lora) - set(LORA_PARTS):
        got = sorted(lora) if isinstance(lora, Mapping) else type(lora).__name__
        raise ValueError("lora must be a LoRA file path or an adapter {'unet': .., "
                         f"'text_encoder': .., 'text_encoder_2': ..}} (at least one), got {got}")
    for part, tree in lora.items():
        if part not in sd.params:
            raise ValueError(f"lora[{part!r}]: the model has no {part}")
        try:
            check_lora(sd.params[part], tree)
        except ValueError as e:
            raise ValueError(f"lora[{part!r}]: {e}") from None
    return {part: jax.tree.map(jnp.asarray, tree) for part, tree in lora.items()}


def apply_loras(params: Mapping[str, Any], loras: Sequence[tuple[Mapping, Any]]) -> dict:
    """``params`` (``StableDiffusion.params``) with every ``(adapter, scale)`` merged into its
    UNet and text encoders (:func:`jaxdiff.lora.merge_loras`); ``params`` itself when ``loras``
    is empty. Jittable, the scales may be traced."""
    if not loras:
        return params
    out = dict(params)
    for part in LORA_PARTS:
        pairs = [(lora[part], scale) for lora, scale in loras if part in lora]
        if pairs:
            out[part] = merge_loras(params[part], pairs)
    return out


def load_lora(sd: StableDiffusion, lora: Any, scale: float = 1.0) -> StableDiffusion:
    """``sd`` with one more unfused LoRA (module docstring): merged inside every generation
    program, ``scale`` a traced value (changing it does not recompile).

    Args:
      sd: the model (it is not changed; the result shares its parameters).
      lora: a LoRA file (diffusers / peft or kohya format, :func:`jaxdiff.convert.read_lora`;
        for SD 1.x / 2.x and SDXL, kohya's LDM-named UNet layers included), a folder holding
        ``pytorch_lora_weights.safetensors``, or an adapter ``{"unet": .., "text_encoder": ..,
        "text_encoder_2": ..}`` (each optional; used with factor 1 times ``scale``).
      scale: the LoRA's weight (any finite number; 0 disables it).

    Returns:
      ``sd`` with ``loras`` extended by ``(adapter, float32 scale)``.

    Raises:
      ValueError: a ``scale`` that is not a finite number, and as
        :func:`jaxdiff.convert.read_lora` (unknown keys, shapes of another architecture; naming
        the file); a corrupt file as ``jaxdiff.validation.InvalidFileError``.
    """
    value = _check_scale(scale)
    adapter = _adapter(sd, lora)
    return dataclasses.replace(sd, loras=(*sd.loras, (adapter, jnp.float32(value))))


def set_lora_scales(sd: StableDiffusion, scales: Sequence[float]) -> StableDiffusion:
    """``sd`` with new scales for its unfused LoRAs, in the order they were loaded (the compiled
    programs are reused).

    Raises:
      ValueError: not one finite number per LoRA in ``sd.loras``.
    """
    scales = list(scales)
    if len(scales) != len(sd.loras):
        raise ValueError(f"scales must have one entry per loaded LoRA ({len(sd.loras)}), got "
                         f"{len(scales)}")
    values = [_check_scale(s, f"scales[{i}]") for i, s in enumerate(scales)]
    return dataclasses.replace(
        sd, loras=tuple((lora, jnp.float32(v)) for (lora, _), v in zip(sd.loras, values)))


def fuse_lora(sd: StableDiffusion, lora: Any = None, scale: float = 1.0) -> StableDiffusion:
    """Merge LoRAs into ``sd.params`` once: the model then runs at its plain speed.

    Args:
      sd: the model.
      lora: a LoRA file / folder / adapter (as :func:`load_lora`) to fuse with ``scale``; or
        ``None`` to fuse every unfused LoRA of ``sd`` with its own scale (``sd.loras`` is then
        emptied).
      scale: the weight of ``lora`` (ignored when ``lora`` is None).

    Returns:
      A new model with merged ``params`` (adapted kernels keep their dtype; the sum is done in
      float32).

    Raises:
      ValueError: as :func:`load_lora`.
    """
    if lora is None:
        pairs, rest = sd.loras, ()
    else:
        pairs, rest = ((_adapter(sd, lora), _check_scale(scale)),), sd.loras
    params = apply_loras(sd.params, pairs)  # eagerly: parts without a LoRA stay the same arrays
    return dataclasses.replace(sd, params=params, loras=rest)


def unload_loras(sd: StableDiffusion) -> StableDiffusion:
    """``sd`` without its unfused LoRAs (fused ones are part of ``params`` and stay)."""
    return dataclasses.replace(sd, loras=())
