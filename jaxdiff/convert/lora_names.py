"""LoRA layers by their torch module names, and one layer's weights between torch and jaxdiff.

A Stable Diffusion adapter (:mod:`jaxdiff.lora`) is ``{"unet": ..., "text_encoder": ...}`` (SDXL:
and ``"text_encoder_2"``), mirroring ``StableDiffusion.params`` down to each adapted layer's
``{"down", "up"}``. LoRA files name the same layers by their PyTorch module names:
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` in the UNet
(:func:`jaxdiff.convert.torch_io.torch_key`), ``text_model.encoder.layers.0.self_attn.q_proj`` in
the CLIP text encoders (SDXL's second one also has ``text_projection``;
:func:`jaxdiff.convert.transformers_clip.clip_torch_key`). :func:`lora_targets` lists every layer a
LoRA can adapt (every ``kernel`` of rank 2 or 4) under those names, so that file readers resolve
names against the model instead of guessing.

Weights: torch's ``lora_A`` / ``lora_down`` is ``[r, d_in]`` (linear) or ``[r, d_in, kh, kw]``
(conv), ``lora_B`` / ``lora_up`` ``[d_out, r]`` or ``[d_out, r, 1, 1]`` (a 1x1 conv);
jaxdiff's ``down`` is ``[d_in, r]`` or ``[kh, kw, d_in, r]``, ``up`` ``[r, d_out]``.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import numpy as np
from flax.traverse_util import flatten_dict

from jaxdiff.convert.torch_io import torch_key
from jaxdiff.convert.transformers_clip import clip_torch_key

__all__ = ["LORA_PARTS", "LoraTarget", "lora_targets", "module_name", "lora_from_torch",
           "lora_to_torch"]

LORA_PARTS = ("unet", "text_encoder", "text_encoder_2")
"""The parts of a Stable Diffusion (XL) a LoRA file may adapt, as diffusers prefixes their
keys."""


class LoraTarget(NamedTuple):
    """One layer a LoRA can adapt: its part (one of :data:`LORA_PARTS`), Flax layer path
    (without ``"kernel"``) and kernel shape."""

    part: str
    path: tuple[str, ...]
    shape: tuple[int, ...]


def module_name(part: str, path: tuple[str, ...]) -> str:
    """The torch module name of the Flax layer ``path`` of ``part``:
    ``("down_blocks_0", "attentions_0", "proj_in")`` -> ``"down_blocks.0.attentions.0.proj_in"``
    (UNet), ``("text_model", "encoder", "layers_0", "mlp", "fc1")`` ->
    ``"text_model.encoder.layers.0.mlp.fc1"`` (text encoders).

    Raises:
      ValueError: ``part`` is not one of :data:`LORA_PARTS`.
    """
    if part == "unet":
        return torch_key(tuple(path) + ("kernel",))[: -len(".weight")]
    if part in ("text_encoder", "text_encoder_2"):
        return clip_torch_key(tuple(path) + ("kernel",))[: -len(".weight")]
    raise ValueError(f"a Stable Diffusion LoRA adapts {' / '.join(LORA_PARTS)}, got part "
                     f"{part!r}")


def lora_targets(params: Mapping[str, Any]) -> dict[str, LoraTarget]:
    """Every layer of a Stable Diffusion's ``params`` that a LoRA can adapt (every kernel of rank
    2 or 4): ``{"<part>.<torch module name>": LoraTarget}``, e.g.
    ``"unet.mid_block.attentions.0.proj_in"`` or
    ``"text_encoder.text_model.encoder.layers.0.self_attn.q_proj"``.

    ``params`` is ``StableDiffusion.params`` (or any mapping holding some of the
    :data:`LORA_PARTS`' params trees); other parts (the VAE) are ignored.
    """
    out: dict[str, LoraTarget] = {}
    for part in LORA_PARTS:
        if part not in params:
            continue
        for path, leaf in flatten_dict(dict(params[part])).items():
            if path[-1] == "kernel" and np.ndim(leaf) in (2, 4):
                layer = path[:-1]
                out[f"{part}.{module_name(part, layer)}"] = LoraTarget(
                    part, layer, tuple(np.shape(leaf)))
    return out


def lora_from_torch(down: Any, up: Any, kernel_shape: tuple[int, ...],
                    factor: float = 1.0) -> dict[str, np.ndarray]:
    """A torch LoRA pair -> jaxdiff's ``{"down", "up"}`` (float32), ``factor`` (the layer's
    ``alpha / rank``) folded into ``up``.

    ``down`` ``[r, d_in]`` or ``[r, d_in, kh, kw]``; ``up`` ``[d_out, r]`` or ``[d_out, r, 1, 1]``.
    A linear pair for a 1x1 conv kernel (and a 1x1 conv pair for a linear kernel: SD 2's linear
    ``proj_in`` against SD 1's conv one) is reshaped to fit. Other mismatches are left for
    :func:`jaxdiff.lora.check_lora` to name.
    """
    down = np.asarray(down, np.float32)
    up = np.asarray(up, np.float32)
    if up.ndim == 4 and up.shape[2:] == (1, 1):
        up = up[:, :, 0, 0]
    if down.ndim == 4:
        if len(kernel_shape) == 2 and down.shape[2:] == (1, 1):
            down = down[:, :, 0, 0].T
        else:
            down = down.transpose(2, 3, 1, 0)  # [r, in, kh, kw] -> [kh, kw, in, r]
    elif down.ndim == 2:
        down = down.T
        if len(kernel_shape) == 4 and tuple(kernel_shape[:2]) == (1, 1):
            down = down[None, None]
    up = up.T * np.float32(factor) if up.ndim == 2 else up
    return {"down": down, "up": up}


def lora_to_torch(down: Any, up: Any, factor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """jaxdiff's ``down`` / ``up`` -> torch's ``(lora_A, lora_B)`` (float32), ``factor`` folded
    into ``lora_B``: ``[d_in, r]`` -> ``[r, d_in]`` and ``[r, d_out]`` -> ``[d_out, r]``
    (linear); ``[kh, kw, d_in, r]`` -> ``[r, d_in, kh, kw]`` and ``[d_out, r, 1, 1]`` (conv)."""
    down = np.asarray(down, np.float32)
    up = np.asarray(up, np.float32) * np.float32(factor)
    if down.ndim == 4:
        return (np.ascontiguousarray(down.transpose(3, 2, 0, 1)),
                np.ascontiguousarray(up.T[:, :, None, None]))
    return np.ascontiguousarray(down.T), np.ascontiguousarray(up.T)
