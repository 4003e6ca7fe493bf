"""A ControlNet and the UNet it steers: a new ControlNet copied from a UNet
(:func:`controlnet_from_unet`, diffusers' ``ControlNetModel.from_unet``), the check that a
ControlNet fits a UNet (:func:`check_controlnet_matches_unet`), and several ControlNets at once
(:func:`multi_controlnet_residuals`, diffusers' ``MultiControlNetModel``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxdiff.models.controlnet import ControlNet, controlnet_param_shapes, is_zero_conv
from jaxdiff.models.controlnet_config import (
    DEFAULT_CONDITIONING_CHANNELS,
    ControlNetConfig,
    controlnet_config_from_unet,
)
from jaxdiff.models.host_init import host_init
from jaxdiff.models.unet_config import UNetConfig

__all__ = [
    "check_controlnet_matches_unet",
    "controlnet_from_unet",
    "multi_controlnet_residuals",
]

# The parts of a ControlNet that are a copy of the UNet's (everything else is its own).
_COPIED = ("conv_in", "time_embedding", "add_embedding", "class_embedding", "class_tokens",
           "mid_block")


def controlnet_from_unet(
    unet_config: UNetConfig,
    unet_params: Mapping,
    key: jax.Array,
    *,
    conditioning_channels: int = 3,
    conditioning_embedding_channels: tuple[int, ...] = DEFAULT_CONDITIONING_CHANNELS,
    global_pool_conditions: bool = False,
    conditioning_channel_order: str = "rgb",
) -> tuple[ControlNetConfig, dict]:
    """A new ControlNet for a UNet, as diffusers' ``ControlNetModel.from_unet`` (with
    ``load_weights_from_unet=True``): the encoder's weights copied from the UNet's, the
    conditioning network drawn from ``key`` on the host (flax's default initialisers, as
    :func:`~jaxdiff.models.init_controlnet`) but its last conv, and the zero convolutions zero,
    so that the new ControlNet's residuals are all zero. Nothing is compiled.

    Args:
      unet_config: the UNet's config (see :func:`~jaxdiff.models.controlnet_config_from_unet`
        for what the encoder does not copy).
      unet_params: its ``"params"`` tree.
      key: the PRNG key of the conditioning network's initial weights.
      conditioning_channels, conditioning_embedding_channels: as in
        :class:`~jaxdiff.models.ControlNetConfig`.
      global_pool_conditions, conditioning_channel_order: as in
        :class:`~jaxdiff.models.ControlNetConfig`.

    Returns:
      ``(config, params)``: the ControlNet's config and its ``"params"`` tree (the copied
      leaves are the UNet's arrays, not copies: JAX arrays are immutable).

    Raises:
      ValueError: as :func:`~jaxdiff.models.controlnet_config_from_unet`; ``unet_params``
        missing a copied weight or of another shape (naming the paths); ``key`` a tracer.
    """
    config = controlnet_config_from_unet(
        unet_config, conditioning_channels=conditioning_channels,
        conditioning_embedding_channels=conditioning_embedding_channels,
        global_pool_conditions=global_pool_conditions,
        conditioning_channel_order=conditioning_channel_order,
    )  # fmt: skip
    if not isinstance(unet_params, Mapping):
        raise ValueError(f"unet_params must be a Flax params tree (nested dict), got "
                         f"{type(unet_params).__name__}")
    tree = controlnet_param_shapes(config)
    shapes, given = flatten_dict(tree), flatten_dict(dict(unet_params))
    fresh = flatten_dict(host_init(tree["controlnet_cond_embedding"], key,
                                   config.unet.param_dtype, what="controlnet_from_unet"))
    out, bad = {}, []
    for path, spec in shapes.items():
        top = path[0]
        if is_zero_conv(path):
            out[path] = jnp.zeros(spec.shape, spec.dtype)
        elif top == "controlnet_cond_embedding":
            out[path] = fresh[path[1:]]
        elif top in _COPIED or top.startswith("down_blocks_"):
            value = given.get(path)
            if value is None or tuple(np.shape(value)) != tuple(spec.shape):
                got = "missing" if value is None else f"shape {tuple(np.shape(value))}"
                bad.append(f"{'/'.join(path)} ({got}, expected {tuple(spec.shape)})")
                continue
            out[path] = jnp.asarray(value, spec.dtype)
        else:  # pragma: no cover - a new ControlNet part must be classified above
            raise NotImplementedError(f"no source for ControlNet parameter {'/'.join(path)}")
    if bad:
        raise ValueError(f"unet_params do not match unet_config: {len(bad)} weights: "
                         + "; ".join(bad))
    return config, unflatten_dict(out)


def check_controlnet_matches_unet(controlnet: ControlNetConfig, unet: UNetConfig) -> None:
    """Raise a one-line ``ValueError`` if a ControlNet cannot steer a UNet: another
    cross-attention width (``context_dim``, diffusers' ``cross_attention_dim``: the ControlNet
    reads the same text embedding), another latent channel count, or other skip connections
    (``block_channels``, layers per level: the residuals would not fit). The embeddings need
    not match (a ControlNet may lack the UNet's class labels, for example).
    """
    if not isinstance(controlnet, ControlNetConfig):
        raise ValueError(f"controlnet must be a ControlNetConfig, got "
                         f"{type(controlnet).__name__}")
    if not isinstance(unet, UNetConfig):
        raise ValueError(f"unet must be a UNetConfig, got {type(unet).__name__}")
    c = controlnet.unet
    if c.context_dim != unet.context_dim:
        raise ValueError(f"the ControlNet's cross-attention width (context_dim, diffusers' "
                         f"cross_attention_dim) is {c.context_dim} but the UNet's is "
                         f"{unet.context_dim}: this ControlNet was made for another model")
    if c.in_channels != unet.in_channels:
        raise ValueError(f"the ControlNet takes {c.in_channels}-channel latents but the UNet "
                         f"{unet.in_channels}-channel ones")
    n = len(unet.block_channels)
    layers = lambda cfg: tuple(cfg.layers(lv) for lv in range(len(cfg.block_channels)))  # noqa
    if c.block_channels != unet.block_channels or layers(c) != layers(unet):
        raise ValueError(f"the ControlNet's levels (block_channels {c.block_channels}, layers "
                         f"{layers(c)}) differ from the UNet's ({unet.block_channels}, "
                         f"{layers(unet)} over {n} levels): its residuals would not fit")


def multi_controlnet_residuals(
    controlnets: Sequence[tuple[ControlNet, Mapping, jax.Array, Any]],
    x: jax.Array,
    t: jax.Array,
    *,
    guess_mode: bool = False,
    **inputs,
) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """The summed residuals of several ControlNets (diffusers' ``MultiControlNetModel``).

    Args:
      controlnets: one ``(controlnet, params, cond_image, conditioning_scale)`` per ControlNet:
        a :class:`~jaxdiff.models.ControlNet` module, its ``"params"`` tree, its control image
        and its scale. Their residuals must have the same shapes (ControlNets made for the same
        UNet), up to the broadcast of a globally pooled one (``[B, 1, 1, C]``).
      x, t: the UNet's latents and timesteps.
      guess_mode: as :class:`~jaxdiff.models.ControlNet`'s, for every ControlNet.
      inputs: ``labels`` / ``context`` / ``added_cond`` / ``timestep_cond``, passed to each
        ControlNet.

    Returns:
      ``(down_residuals, mid_residual)``, elementwise sums over the ControlNets (in order).

    Raises:
      ValueError: ``controlnets`` empty or an entry not a 4-tuple of that form (naming its
        index); the ControlNets' residuals of different shapes; as the ControlNets' inputs.
    """
    if isinstance(controlnets, (str, bytes)) or not isinstance(controlnets, Sequence) \
            or not controlnets:
        raise ValueError("controlnets must be a non-empty sequence of (controlnet, params, "
                         "cond_image, conditioning_scale) tuples")
    down = mid = None
    for i, entry in enumerate(controlnets):
        if not isinstance(entry, (tuple, list)) or len(entry) != 4 \
                or not isinstance(entry[0], ControlNet):
            raise ValueError(f"controlnets[{i}] must be a (ControlNet module, params, cond_image, "
                             f"conditioning_scale) tuple, got {type(entry).__name__}")
        net, params, image, scale = entry
        d, m = net.apply({"params": params}, x, t, image, conditioning_scale=scale,
                         guess_mode=guess_mode, **inputs)
        if down is None:
            down, mid = list(d), m
            continue
        try:
            [np.broadcast_shapes(a.shape, b.shape) for a, b in zip(down, d, strict=True)]
            np.broadcast_shapes(mid.shape, m.shape)
        except ValueError:
            raise ValueError(f"controlnets[{i}]'s residuals {[tuple(r.shape) for r in d]}, "
                             f"{tuple(m.shape)} differ in shape from controlnets[0]'s "
                             f"{[tuple(r.shape) for r in down]}, {tuple(mid.shape)}") from None
        down = [a + b for a, b in zip(down, d)]
        mid = mid + m
    return tuple(down), mid
