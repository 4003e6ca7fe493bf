"""LoRA files in and out: a Stable Diffusion adapter (:mod:`jaxdiff.lora`) as the
``pytorch_lora_weights.safetensors`` diffusers writes, and LoRA files of diffusers / peft or
kohya / A1111 format as an adapter.

    lora = read_lora("my_lora.safetensors", sd.params)   # {"unet": .., "text_encoder": ..}
    save_lora("out/pytorch_lora_weights.safetensors", lora, scale=alpha / rank)

The adapter mirrors ``StableDiffusion.params`` (``{"unet": .., "text_encoder": ..}``, SDXL's
``"text_encoder_2"`` too, each optional) down to each layer's
``{"down": [..., d_in, r], "up": [r, d_out]}``; its update is ``scale * down @ up``. Files carry
their own factor (``alpha / r``: kohya's ``.alpha`` keys, peft's ``lora_alpha`` metadata);
:func:`read_lora` folds it into ``up``, :func:`save_lora` folds ``scale`` into ``lora_B``, so a
file round-trips to an adapter used with scale 1. Formats: :mod:`jaxdiff.convert.lora_peft` and
:mod:`jaxdiff.convert.lora_kohya` (with :mod:`jaxdiff.convert.lora_ldm` for LDM-named UNet
layers); layer names: :mod:`jaxdiff.convert.lora_names`. safetensors (and torch, for ``.bin``
files) are imported only when used.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxdiff.convert.lora_kohya import has_ldm_unet_keys, is_kohya_key, kohya_names, parse_kohya
from jaxdiff.convert.lora_names import (LORA_PARTS, lora_from_torch, lora_targets, lora_to_torch,
                                        module_name)
from jaxdiff.convert.lora_peft import parse_peft, peft_factor
from jaxdiff.convert.torch_io import load_torch_state_dict, to_numpy
from jaxdiff.lora import check_lora
from jaxdiff.models.unet_config import UNetConfig
from jaxdiff.validation import InvalidFileError

__all__ = ["LORA_WEIGHT_NAME", "LORA_FORMATS", "lora_format", "read_lora",
           "read_lora_state_dict", "save_lora", "lora_state_dict"]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""The file name diffusers' ``save_lora_weights`` writes and ``load_lora_weights`` looks for in a
folder."""
LORA_FORMATS = ("diffusers", "kohya")
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
_MAX_LISTED = 40


def _safetensors_metadata(path: str) -> dict[str, Any] | None:
    """The parsed ``lora_adapter_metadata`` of a safetensors file (read from its JSON header),
    or None."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        raw = (header.get("__metadata__") or {}).get(_METADATA_KEY)
        return None if raw is None else dict(json.loads(raw))
    except (OSError, ValueError, TypeError, struct.error) as e:
        raise InvalidFileError(f"{path}: unreadable LoRA metadata ({e})") from None


def read_lora_state_dict(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict | None]:
    """``(state dict, peft metadata or None)`` of a LoRA file: ``.safetensors`` (``.bin`` / ``.pt``
    / ``.ckpt`` through torch), or a folder holding :data:`LORA_WEIGHT_NAME`.

    Raises:
      FileNotFoundError: no such file (or the folder has no :data:`LORA_WEIGHT_NAME`).
      jaxdiff.validation.InvalidFileError: the file is corrupt or unreadable (one line naming it).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        inside = os.path.join(path, LORA_WEIGHT_NAME)
        if not os.path.isfile(inside):
            raise FileNotFoundError(f"LoRA folder {path} has no {LORA_WEIGHT_NAME}")
        path = inside
    state = load_torch_state_dict(path)
    return state, _safetensors_metadata(path) if path.endswith(".safetensors") else None


def lora_format(state_dict: Mapping[str, Any]) -> str:
    """``"kohya"`` when the keys are kohya's (``lora_unet_...`` / ``lora_te_...``), else
    ``"diffusers"`` (diffusers / peft layouts)."""
    return "kohya" if any(is_kohya_key(k) for k in state_dict) else "diffusers"


def _listed(keys: list[str]) -> str:
    shown = ", ".join(sorted(keys)[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _alpha(value: Any, name: str) -> float | None:
    if value is None:
        return None
    a = np.asarray(to_numpy(value), np.float64)
    if a.size != 1 or not np.isfinite(a).all():
        raise ValueError(f"the alpha of LoRA layer {name} must be one finite number, got shape "
                         f"{a.shape}")
    return float(a.reshape(-1)[0])


def read_lora(source: str | os.PathLike | Mapping[str, Any], params: Mapping[str, Any], *,
              unet_config: UNetConfig | None = None) -> dict:
    """A LoRA file (or state dict) as a Stable Diffusion (XL) adapter for ``params``.

    Args:
      source: a LoRA file (``.safetensors``; ``.bin`` / ``.pt`` / ``.ckpt`` need torch), a folder
        holding :data:`LORA_WEIGHT_NAME`, or an already loaded ``{key: array or tensor}``.
        The format is detected from the keys (:func:`lora_format`): diffusers / peft
        (:mod:`jaxdiff.convert.lora_peft`) or kohya / A1111 (:mod:`jaxdiff.convert.lora_kohya`).
      params: the model's params, ``StableDiffusion.params`` (``{"unet": .., "text_encoder":
        ..}``, SDXL's ``"text_encoder_2"``; other entries are ignored). Layer names are resolved
        against it.
      unet_config: the model's UNet config (``StableDiffusion.unet_config``): needed for kohya
        files on the original LDM / SGM UNet's names (``lora_unet_input_blocks_...``, as
        sd-scripts' SDXL trainer writes them), whose block numbers depend on it
        (:mod:`jaxdiff.convert.lora_ldm`); ``None``: such keys are unknown.

    Returns:
      ``{"unet": .., "text_encoder": .., "text_encoder_2": ..}`` (only the parts the file
      adapts): float32
      ``{"down", "up"}`` per layer, each layer's ``alpha / rank`` folded into ``up``, to be used
      with scale 1 (:func:`jaxdiff.lora.merge_lora`, :func:`jaxdiff.pipelines.load_lora`).

    Raises:
      ValueError: naming the file: keys that name no layer of the model or are of no known form
        (all listed: nothing is skipped silently), a layer with only one of its two weights, a
        file with no LoRA weights, and weights whose shapes do not fit the model (a LoRA for
        another architecture: :func:`jaxdiff.lora.check_lora` names each layer and shapes).
      FileNotFoundError: no such file.
      jaxdiff.validation.InvalidFileError: (a ``ValueError``) a corrupt or unreadable file.
    """
    if isinstance(source, Mapping):
        state, metadata, where = dict(source), None, "LoRA state dict"
    else:
        state, metadata = read_lora_state_dict(source)
        where = f"LoRA file {os.fspath(source)}"
    if not state:
        raise ValueError(f"{where}: holds no weights")
    targets = lora_targets(params)
    fmt = lora_format(state)
    if fmt == "kohya":
        layers, unknown = parse_kohya(state, kohya_names(targets, unet_config))
    else:
        layers, unknown = parse_peft(state)
        for name in [n for n in layers if n not in targets]:
            unknown += [f"{name} ({', '.join(sorted(layers.pop(name)))})"]
    if unknown:
        parts = ", ".join(p for p in LORA_PARTS if p in params)
        hint = ("; LDM-named UNet keys (input_blocks / middle_block / output_blocks) need "
                "unet_config" if unet_config is None and has_ldm_unet_keys(unknown) else "")
        raise ValueError(f"{where}: {len(unknown)} keys name no LoRA layer of this model or "
                         f"are of no known form ({fmt} format; the model's parts: {parts}"
                         f"{hint}): {_listed(unknown)}")
    incomplete = [f"{n} (has {', '.join(sorted(e))})" for n, e in layers.items()
                  if "down" not in e or "up" not in e]
    if incomplete:
        raise ValueError(f"{where}: {len(incomplete)} layers lack their down or up weight: "
                         f"{_listed(incomplete)}")
    if not layers:
        raise ValueError(f"{where}: holds no LoRA weights")
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for name, entry in sorted(layers.items()):
        target = targets[name]
        down = to_numpy(entry["down"])
        rank = int(down.shape[0]) if down.ndim else 0
        if rank < 1:
            raise ValueError(f"{where}: layer {name} has a down weight of shape {down.shape}")
        alpha = _alpha(entry.get("alpha"), name)
        factor = (alpha / rank if alpha is not None else 1.0) if fmt == "kohya" \
            else peft_factor(name, rank, alpha, metadata)
        pair = lora_from_torch(down, to_numpy(entry["up"]), target.shape, factor)
        for leaf in ("down", "up"):
            flat[(target.part, *target.path, leaf)] = pair[leaf]
    adapter = unflatten_dict(flat)
    for part, tree in adapter.items():
        try:
            check_lora(params[part], tree)
        except ValueError as e:
            raise ValueError(f"{where}: {part}: {e}") from None
    return adapter


def lora_state_dict(lora: Mapping[str, Any], *, scale: float = 1.0) -> dict[str, np.ndarray]:
    """An adapter as diffusers' LoRA state dict (peft keys ``unet.<module>.lora_A.weight`` /
    ``.lora_B.weight``, ``text_encoder.text_model.<module>...``, SDXL's
    ``text_encoder_2.text_model.<module>...``), ``scale`` folded into ``lora_B``, float32.

    Raises:
      ValueError: a part other than ``"unet"`` / ``"text_encoder"`` / ``"text_encoder_2"``, a
        leaf other than ``down`` / ``up``, a layer without both, an empty adapter, or a
        ``scale`` that is not a finite number.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.number)) \
            or not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if not isinstance(lora, Mapping) or not lora or set(lora) - set(LORA_PARTS):
        got = sorted(lora) if isinstance(lora, Mapping) else type(lora).__name__
        raise ValueError(f"lora must be a Stable Diffusion adapter {{'unet': .., "
                         f"'text_encoder': .., 'text_encoder_2': ..}} (at least one), got {got}")
    out: dict[str, np.ndarray] = {}
    for part in LORA_PARTS:
        layers: dict[tuple[str, ...], dict[str, Any]] = {}
        for path, leaf in flatten_dict(dict(lora.get(part) or {})).items():
            if path[-1] not in ("down", "up"):
                raise ValueError(f"lora[{part!r}]: a LoRA adapter holds only 'down' / 'up' "
                                 f"leaves, got {'/'.join(path)}")
            layers.setdefault(path[:-1], {})[path[-1]] = np.asarray(leaf)
        for path, pair in sorted(layers.items()):
            if len(pair) != 2:
                raise ValueError(f"lora[{part!r}]: layer {'/'.join(path)} needs both 'down' and "
                                 f"'up', got {sorted(pair)}")
            a, b = lora_to_torch(pair["down"], pair["up"], float(scale))
            name = f"{part}.{module_name(part, path)}"
            out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = a, b
    return out


def save_lora(path: str | os.PathLike, lora: Mapping[str, Any], *, scale: float = 1.0) -> str:
    """Write ``lora`` as diffusers' ``pytorch_lora_weights.safetensors``
    (:func:`lora_state_dict`; metadata ``{"format": "pt"}`` and no ``lora_adapter_metadata``,
    so diffusers takes ``lora_alpha = r`` and the folded ``scale`` is the whole factor).
    ``StableDiffusionPipeline.load_lora_weights`` (``StableDiffusionXLPipeline``'s for an SDXL
    adapter) reads it and makes the model jaxdiff makes with
    ``merge_lora(params, lora, scale)``.

    Args:
      path: a ``.safetensors`` file, or a folder (created if missing) to hold
        :data:`LORA_WEIGHT_NAME`.
      lora: ``{"unet": .., "text_encoder": .., "text_encoder_2": ..}`` (each optional).
      scale: the adapter's factor (``alpha / rank``), folded into ``lora_B``.

    Returns:
      The file written. It is written to a temporary file beside it and renamed, so an
      interrupted write leaves no half-written file under ``path``.

    Raises:
      ValueError: as :func:`lora_state_dict`, or a file path not ending in ``.safetensors``.
    """
    import safetensors.numpy

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"path must be a folder or end in .safetensors, got {path!r}")
        path = os.path.join(path, LORA_WEIGHT_NAME)
    state = lora_state_dict(lora, scale=scale)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        safetensors.numpy.save_file(state, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
