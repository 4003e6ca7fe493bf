"""Reading PyTorch weights: one home for what every converter shares.

State-dict files (``load_torch_state_dict``, sharded ones through their ``*.index.json``:
``load_sharded_state_dict``), tensors as numpy (``to_numpy``), diffusers' legacy
attention names (``rename_legacy_attention_keys``), the torch -> Flax layout of a weight
(``torch_to_flax``) and the torch key of a Flax param path (``torch_key``). torch and safetensors
are imported only when used.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
import numpy as np
from flax.traverse_util import unflatten_dict

from jaxdiff.validation import InvalidFileError, read_json

__all__ = [
    "flax_to_torch",
    "load_sharded_state_dict",
    "load_torch_state_dict",
    "match_state_dict",
    "rename_legacy_attention_keys",
    "to_numpy",
    "torch_key",
    "torch_to_flax",
]

# diffusers' ``nn.ModuleList`` attributes: their index is a path component of its own in torch.
_LISTS = (
    "down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
    "transformer_blocks", "to_out", "net", "controlnet_down_blocks", "blocks",
)  # fmt: skip
_LIST_RE = re.compile(rf"^({'|'.join(_LISTS)})_(\d+)$")
_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def torch_key(path: tuple[str, ...]) -> str:
    """The diffusers state-dict key of a Flax param path.

    ``("down_blocks_0", "attentions_1", "to_out_0", "kernel")`` ->
    ``"down_blocks.0.attentions.1.to_out.0.weight"``.
    """
    parts = [_LIST_RE.sub(r"\1.\2", p) for p in path[:-1]]
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(path[-1], path[-1])
    return ".".join([*parts, leaf])


def to_numpy(value) -> np.ndarray:
    """A torch tensor (any dtype, any device) or array-like as numpy."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def rename_legacy_attention_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Legacy attention names -> current ones; a key given under both names is an error."""
    given, origin, clashes = {}, {}, []
    for key, value in state_dict.items():
        legacy = _LEGACY_RE.match(key)
        new = f"{legacy.group(1)}.{_LEGACY[legacy.group(2)]}.{legacy.group(3)}" if legacy else key
        if new in given:
            clashes.append(f"{origin[new]} and {key} (both {new})")
            continue
        given[new], origin[new] = value, key
    if clashes:
        raise ValueError(
            f"state_dict holds {len(clashes)} weights under both their legacy and current "
            f"attention names: " + "; ".join(sorted(clashes))
        )
    return given


def torch_to_flax(
    path: tuple[str, ...], value: np.ndarray, expected: tuple[int, ...]
) -> np.ndarray:
    """A torch weight as the Flax param at ``path`` of shape ``expected``: conv kernels OIHW ->
    HWIO, linear kernels ``[out, in]`` transposed, anything else unchanged."""
    if path[-1] == "kernel" and value.ndim == 4:  # conv: OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    if path[-1] == "kernel" and value.ndim == 2 and len(expected) == 2:  # linear: [out, in]
        return value.T
    return value


def flax_to_torch(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """The inverse of :func:`torch_to_flax`: a Flax param at ``path`` in torch's layout (conv
    kernels HWIO -> OIHW, linear kernels ``[in, out]`` transposed, anything else unchanged)."""
    if path[-1] == "kernel" and value.ndim == 4:  # conv: HWIO -> OIHW
        return value.transpose(3, 2, 0, 1)
    if path[-1] == "kernel" and value.ndim == 2:  # linear: [in, out] -> [out, in]
        return value.T
    return value


_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """Load a PyTorch checkpoint file as ``{key: numpy array}``.

    ``.safetensors`` through ``safetensors.numpy`` (``safetensors.flax`` for dtypes numpy lacks,
    such as bfloat16); ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt`` through
    ``torch.load(weights_only=True)`` (no pickled code runs; torch is not part of jaxdiff's base
    install). bfloat16 tensors come back as ``ml_dtypes.bfloat16`` numpy arrays (safetensors) or
    float32 (torch files). A torch file holding ``{"state_dict": {...}}`` (a training checkpoint)
    gives that inner dict.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: ``path`` has none of the suffixes above.
      jaxdiff.validation.InvalidFileError: the file is not a valid file of its kind (truncated,
        empty, another format), holds something other than a state dict of tensors (a bare
        tensor, a nested dict), or is a torch file and torch is not installed (the message says
        what to install, or how to convert the file to ``.safetensors``). It names the file.
    """
    path = os.fspath(path)
    if not path.endswith((".safetensors",) + _TORCH_SUFFIXES):
        raise ValueError(f"path must end in .safetensors, .bin, .pt, .pth or .ckpt, got {path!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no weights file at {path}")
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
    return _load_torch_file(path)


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    import safetensors
    import safetensors.numpy

    try:
        try:
            return dict(safetensors.numpy.load_file(path))
        except TypeError:  # a dtype numpy does not know (bfloat16)
            import safetensors.flax

            return {k: np.asarray(v) for k, v in safetensors.flax.load_file(path).items()}
    except safetensors.SafetensorError as e:
        size = os.path.getsize(path)
        raise InvalidFileError(
            f"{path}: not a valid safetensors file ({size} bytes; {e}): it is probably truncated "
            "(an interrupted download or copy) or not a safetensors file: download it again"
        ) from None


def _load_torch_file(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise InvalidFileError(
            f"{path}: reading a PyTorch file needs torch, which jaxdiff's base install does not "
            "include: `pip install torch` (the CPU wheel is enough), or convert the file to "
            ".safetensors once where torch is installed: `python -c \"import torch, "
            "safetensors.torch as st; sd = torch.load('FILE', weights_only=True); "
            "st.save_file({k: v.contiguous() for k, v in sd.items()}, 'FILE.safetensors')\"` "
            "(diffusers and transformers folders usually ship .safetensors weights too)"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling garbage raises anything (IndexError, KeyError, ...)
        detail = " ".join(str(e).split())
        cause = f"{type(e).__name__}: {detail:.200}" if detail else type(e).__name__
        raise InvalidFileError(
            f"{path}: not a readable PyTorch weights file ({os.path.getsize(path)} bytes; "
            f"{cause}): truncated (an interrupted download or copy), another format, or pickled "
            "objects other than tensors; download it again"
        ) from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise InvalidFileError(
            f"{path}: holds a {type(state).__module__}.{type(state).__name__}, not a state dict "
            "({name: tensor}); save the model's state_dict() instead"
        )
    bad = [f"{k!r} ({type(v).__name__})" for k, v in state.items()
           if not isinstance(k, str)
           or not (hasattr(v, "detach") or isinstance(v, (int, float, np.ndarray, np.generic)))]
    if bad:
        raise InvalidFileError(
            f"{path}: not a state dict of tensors: {len(bad)} entries are not tensors (or "
            f"numbers) under string keys: {', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}"
        )
    return {k: to_numpy(v) for k, v in state.items()}


def load_sharded_state_dict(index_file: str) -> dict[str, np.ndarray]:
    """The state dict of a sharded checkpoint: every shard named in ``index_file``'s
    ``weight_map`` (``model.safetensors.index.json`` and the like), merged.

    A shard must be a plain file name or a relative path that stays inside the index's folder:
    an absolute path, a drive, a backslash, a ``..`` component or a symlinked folder that leads
    out of the folder is refused, so that a downloaded folder's index cannot make jaxdiff read
    other files on disk. The shard file itself may be a symbolic link, as any weights file may:
    the Hugging Face cache links every file of a snapshot to its blob outside the snapshot.

    Raises:
      FileNotFoundError: no index file, or a shard it names is missing.
      jaxdiff.validation.InvalidFileError: the index is not JSON with a ``weight_map`` of
        ``{key: shard file}``, a shard leaves the folder, or a shard is invalid
        (:func:`load_torch_state_dict`).
    """
    index_file = os.fspath(index_file)
    raw = read_json(index_file)
    weight_map = raw.get("weight_map") if isinstance(raw, Mapping) else None
    if not isinstance(weight_map, Mapping) or not all(
        isinstance(v, str) for v in weight_map.values()
    ):
        raise InvalidFileError(f"{index_file}: expected a JSON object with a \"weight_map\" of "
                               "{tensor name: shard file name}")
    folder = os.path.dirname(os.path.abspath(index_file))
    root = os.path.realpath(folder)
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        parent = os.path.realpath(os.path.dirname(os.path.join(folder, shard)))
        if (os.path.isabs(shard) or "\\" in shard or os.path.splitdrive(shard)[0]
                or ".." in shard.split("/") or os.path.commonpath([root, parent]) != root):
            raise InvalidFileError(f"{index_file}: shard {shard!r} is not a file inside "
                                   f"{folder}; refusing to read it")
        out.update(load_torch_state_dict(os.path.join(folder, shard)))
    return out


def match_state_dict(
    given: Mapping[str, Any],
    expected: Mapping[str, tuple[tuple[str, ...], tuple[int, ...]]],
    *,
    dtype: Any,
    what: str,
) -> dict:
    """The Flax params tree from a torch state dict that must cover a model exactly.

    Args:
      given: ``{torch key: tensor or array}`` (legacy names already renamed).
      expected: ``{torch key: (Flax param path, Flax shape)}`` of every parameter of the model.
      dtype: the parameters' dtype.
      what: the model, for the error message (e.g. ``"the UNet config"``).

    Returns:
      The nested params dict (``jax.Array`` leaves), each weight through :func:`torch_to_flax`.

    Raises:
      ValueError: listing every missing, unexpected and mis-shaped key (with its Flax path and
        both shapes); nothing is left at random init.
    """
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshaped, flat = [], {}
    for key in sorted(set(expected) & set(given)):
        path, shape = expected[key]
        raw = to_numpy(given[key])
        value = torch_to_flax(path, raw, shape)
        if value.shape != shape:
            misshaped.append(
                f"{key} ({'/'.join(path)}): expected {shape} after conversion, got {value.shape} "
                f"(torch {tuple(raw.shape)})"
            )
            continue
        flat[path] = value.astype(dtype)
    if missing or unexpected or misshaped:
        lines = [f"the state dict does not match {what}:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                lines.append(f"  {len(keys)} {title} keys: " + ", ".join(keys))
        if misshaped:
            lines.append(f"  {len(misshaped)} mis-shaped keys: " + "; ".join(misshaped))
        raise ValueError("\n".join(lines))
    return jax.tree.map(jax.numpy.asarray, unflatten_dict(flat))
