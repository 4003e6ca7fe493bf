"""diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` -> :class:`jaxdiff.models.UNetConfig` and
Flax params. From a diffusers-format folder (needs its files, so not a doctest; docs/conversion.md
and ``tests/parity/test_unet_parity.py`` run the same calls on a model built in memory)::

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

from typing import Any, Mapping

import numpy as np
from flax.traverse_util import flatten_dict

from jaxdiff.convert.diffusers_config import unet_config_from_diffusers
from jaxdiff.convert.torch_io import (
    match_state_dict,
    rename_legacy_attention_keys,
    torch_key,
)
from jaxdiff.models.unet import unet_param_shapes
from jaxdiff.models.unet_config import UNetConfig

__all__ = [
    "unet_config_from_diffusers",
    "convert_unet_state_dict",
    "from_diffusers",
]


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
      ValueError: listing every missing, unexpected and mis-shaped key (torch names, with the
        Flax path and the shapes), when the state dict does not cover the model exactly; and
        listing every weight given under both its legacy and its current attention name
        (``...attentions.0.query.weight`` and ``...attentions.0.to_q.weight``).
    """
    dtype = np.dtype(config.param_dtype if dtype is None else dtype)
    given = rename_legacy_attention_keys(state_dict)
    shapes = flatten_dict(unet_param_shapes(config))
    expected = {torch_key(p): (p, tuple(s.shape)) for p, s in shapes.items()}
    return match_state_dict(given, expected, dtype=dtype, what="the UNet config")


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
