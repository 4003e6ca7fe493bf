"""Reading PyTorch weights: one home for what every converter shares.

State-dict files (``load_torch_state_dict``), tensors as numpy (``to_numpy``), diffusers' legacy
attention names (``rename_legacy_attention_keys``), the torch -> Flax layout of a weight
(``torch_to_flax``) and the torch key of a Flax param path (``torch_key``). torch and safetensors
are imported only when used.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np
from flax.traverse_util import unflatten_dict

__all__ = [
    "flax_to_torch",
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
    "transformer_blocks", "to_out", "net",
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


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """Load a PyTorch checkpoint file as ``{key: numpy array}``.

    ``.safetensors`` through ``safetensors.numpy`` (``safetensors.flax`` for dtypes numpy lacks,
    such as bfloat16); ``.bin`` / ``.pt`` / ``.pth`` through ``torch.load(weights_only=True)``
    (no pickled code runs). bfloat16 tensors come back as ``ml_dtypes.bfloat16`` numpy arrays
    (safetensors) or float32 (torch files).
    """
    path = str(path)
    if path.endswith(".safetensors"):
        import safetensors.numpy

        try:
            return dict(safetensors.numpy.load_file(path))
        except TypeError:  # a dtype numpy does not know (bfloat16)
            import safetensors.flax

            return {k: np.asarray(v) for k, v in safetensors.flax.load_file(path).items()}
    if path.endswith((".bin", ".pt", ".pth", ".ckpt")):
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
        if "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        return {k: to_numpy(v) for k, v in state.items()}
    raise ValueError(f"path must end in .safetensors, .bin, .pt, .pth or .ckpt, got {path!r}")


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
