"""diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` -> :class:`jaxdiff.models.UNetConfig` and
Flax params. From a diffusers-format folder (needs its files, so not a doctest; the README and
``tests/parity/test_unet_parity.py`` run the same calls on a model built in memory)::

    config = unet_config_from_diffusers(json.load(open("unet/config.json")))
    params = convert_unet_state_dict(load_torch_state_dict("unet/model.safetensors"), config)
    out = UNet(config).apply({"params": params}, x_nhwc, t)

Weights map by name: the Flax tree uses diffusers' module names with list indices folded in
(``down_blocks.0.resnets.1.conv1.weight`` -> ``down_blocks_0/resnets_1/conv1/kernel``). Conv
kernels go OIHW -> HWIO (``transpose(2, 3, 1, 0)``), linear weights are transposed, norms and
embeddings copy. Nothing is left at random init: a missing, unexpected or mis-shaped key is a
``ValueError`` listing every such key. Legacy attention names (``query``/``key``/``value``/
``proj_attn``, from checkpoints older than diffusers 0.14) are accepted.

torch and safetensors are imported only when used.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxdiff.convert.diffusers_config import unet_config_from_diffusers
from jaxdiff.models.unet import unet_param_shapes
from jaxdiff.models.unet_config import UNetConfig

__all__ = [
    "unet_config_from_diffusers",
    "convert_unet_state_dict",
    "load_torch_state_dict",
    "from_diffusers",
    "torch_key",
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


def _to_numpy(value) -> np.ndarray:
    """A torch tensor (any dtype, any device) or array-like as numpy."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def _rename_legacy(state_dict: Mapping[str, Any]) -> dict[str, Any]:
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


def _convert(path: tuple[str, ...], value: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
    if path[-1] == "kernel" and value.ndim == 4:  # conv: OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    if path[-1] == "kernel" and value.ndim == 2 and len(expected) == 2:  # linear: [out, in]
        return value.T
    return value


def convert_unet_state_dict(
    state_dict: Mapping[str, Any], config: UNetConfig, *, dtype: Any = None
) -> dict:
    """A diffusers UNet state dict -> the ``"params"`` tree of ``UNet(config)``.

    Args:
      state_dict: key -> torch tensor or numpy array (``model.state_dict()``, or
        :func:`load_torch_state_dict`).
      config: the target config (usually from :func:`unet_config_from_diffusers`).
      dtype: the params' dtype; default ``config.param_dtype``.

    Returns:
      A nested dict of ``jax.Array``, exactly the structure ``UNet(config).init`` makes.

    Raises:
      ValueError listing every missing, unexpected and mis-shaped key (torch names, with the
      Flax path and the shapes), when the state dict does not cover the model exactly; and
      listing every weight given under both its legacy and its current attention name
      (``...attentions.0.query.weight`` and ``...attentions.0.to_q.weight``).
    """
    dtype = np.dtype(config.param_dtype if dtype is None else dtype)
    given = _rename_legacy(state_dict)
    shapes = flatten_dict(unet_param_shapes(config))
    expected = {torch_key(p): (p, tuple(s.shape)) for p, s in shapes.items()}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshaped, flat = [], {}
    for key in sorted(set(expected) & set(given)):
        path, shape = expected[key]
        value = _convert(path, _to_numpy(given[key]), shape)
        if value.shape != shape:
            misshaped.append(
                f"{key} ({'/'.join(path)}): expected {shape} after conversion, got {value.shape} "
                f"(torch {tuple(_to_numpy(given[key]).shape)})"
            )
            continue
        flat[path] = value.astype(dtype)
    if missing or unexpected or misshaped:
        lines = ["the state dict does not match the UNet config:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                lines.append(f"  {len(keys)} {title} keys: " + ", ".join(keys))
        if misshaped:
            lines.append(f"  {len(misshaped)} mis-shaped keys: " + "; ".join(misshaped))
        raise ValueError("\n".join(lines))
    return jax.tree.map(jax.numpy.asarray, unflatten_dict(flat))


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
        return {k: _to_numpy(v) for k, v in state.items()}
    raise ValueError(f"path must end in .safetensors, .bin, .pt, .pth or .ckpt, got {path!r}")


def from_diffusers(model, *, dtype: Any = None, param_dtype: Any = None) -> tuple[UNetConfig, dict]:
    """``(config, params)`` from an instantiated diffusers ``UNet2DModel`` /
    ``UNet2DConditionModel`` (its config and ``state_dict()``).

    ``dtype`` / ``param_dtype`` set the config's compute and parameter dtypes (float32 default).
    """
    overrides = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
    config = unet_config_from_diffusers(
        dict(model.config), model_class=type(model).__name__, **overrides
    )
    return config, convert_unet_state_dict(model.state_dict(), config)
