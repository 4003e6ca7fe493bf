"""The UNet's input checks, run when the model is traced.

Every model input is validated against its :class:`~jaxdiff.models.UNetConfig` (a ``ValueError``
naming the argument): a wrong shape never reaches XLA, where it would surface as an unreadable
shape error or, for indices, a silent clamp.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp

from jaxdiff.models.unet_config import ADDED_COND_KEYS, UNetConfig
from jaxdiff.validation import concrete

__all__ = ["check_inputs", "check_added_inputs", "check_residuals"]


def check_inputs(cfg: UNetConfig, x, t, labels, context, *, added_cond=None,
                 timestep_cond=None):
    """Validate and normalise the UNet's inputs at trace time.

    Returns ``(x, t, labels, context, added_cond, timestep_cond)`` with ``t`` broadcast to
    ``[B]``, ``added_cond`` a dict of float32 arrays (or ``None``) and ``timestep_cond`` an array
    (or ``None``). Raises ``ValueError`` naming the offending argument (see
    :func:`check_added_inputs` for the last two).
    """
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x must be [B, H, W, C] (NHWC, rank 4), got shape {x.shape}")
    if x.shape[-1] != cfg.in_channels:
        raise ValueError(
            f"x must have in_channels={cfg.in_channels} channels (last axis, NHWC), "
            f"got shape {x.shape}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a float array, got dtype {x.dtype}")
    b = x.shape[0]
    t = jnp.asarray(t)
    if not (jnp.issubdtype(t.dtype, jnp.integer) or jnp.issubdtype(t.dtype, jnp.floating)):
        raise ValueError(f"t must hold int or float timesteps, got dtype {t.dtype}")
    if t.ndim == 0:
        t = jnp.broadcast_to(t, (b,))
    if t.shape != (b,):
        raise ValueError(f"t must have shape [B] = ({b},) or be a scalar, got shape {t.shape}")

    if cfg.num_classes is None:
        if labels is not None:
            raise ValueError("labels were given but the config has no classes (num_classes=None)")
    else:
        if labels is None:
            raise ValueError(
                f"labels are required ([B] ints in [0, {cfg.num_classes}]; "
                f"{cfg.num_classes} is the null label)"
            )
        labels = jnp.asarray(labels)
        if labels.shape != (b,) or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(
                f"labels must be [B] = ({b},) ints, got shape {labels.shape} dtype {labels.dtype}"
            )
        value = concrete(labels)
        if value is not None and value.size and (value.min() < 0 or value.max() > cfg.num_classes):
            raise ValueError(
                f"labels must lie in [0, {cfg.num_classes}] ({cfg.num_classes} is the null label), "
                f"got values in [{value.min()}, {value.max()}]"
            )

    if context is None:
        if cfg.needs_context:
            raise ValueError(
                f"context ([B, L, {cfg.context_dim}]) is required by the cross-attention layers"
            )
    else:
        if not cfg.has_cross_attention:
            raise ValueError("context was given but the config has no cross-attention layers")
        context = jnp.asarray(context)
        if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != cfg.context_dim:
            raise ValueError(
                f"context must be [B, L, context_dim] = [{b}, L, {cfg.context_dim}], "
                f"got shape {context.shape}"
            )
    added_cond, timestep_cond = check_added_inputs(cfg, b, added_cond, timestep_cond)
    return x, t, labels, context, added_cond, timestep_cond


def check_added_inputs(cfg: UNetConfig, batch: int, added_cond, timestep_cond):
    """Validate the inputs of the extra embeddings at trace time: ``added_cond`` (required iff
    ``cfg.added_cond == "text_time"``: a mapping with exactly the keys ``"text_embeds"``
    ``[B, P]`` and ``"time_ids"`` ``[B, K]``, int or float, with ``P + K * added_time_dim ==
    added_cond_input_dim``) and ``timestep_cond`` (required iff ``cfg.time_cond_dim`` is set:
    ``[B, time_cond_dim]`` float).

    Returns ``(added_cond, timestep_cond)``: ``added_cond`` as a dict of float32 arrays.

    Raises:
      ValueError: naming ``added_cond`` (or its key) or ``timestep_cond``: missing, given to a
        UNet without that embedding, a wrong key set, rank, batch, dtype or width.
    """
    b = batch
    if cfg.added_cond is None:
        if added_cond is not None:
            raise ValueError("added_cond was given but the UNet has no added embedding "
                             "(added_cond=None in its config: not an SDXL-style UNet)")
    else:
        expect = (f"{{'text_embeds': [B, P], 'time_ids': [B, K]}} with P + K * "
                  f"{cfg.added_time_dim} = {cfg.added_cond_input_dim}")
        if added_cond is None:
            raise ValueError(f"added_cond is required by the UNet's {cfg.added_cond!r} "
                             f"embedding: {expect}")
        if not isinstance(added_cond, Mapping):
            raise ValueError(f"added_cond must be a mapping {expect}, got "
                             f"{type(added_cond).__name__}")
        if set(added_cond) != set(ADDED_COND_KEYS):
            raise ValueError(f"added_cond must have exactly the keys {list(ADDED_COND_KEYS)}, "
                             f"got {sorted(map(str, added_cond))}")
        out = {}
        for key in ADDED_COND_KEYS:
            value = jnp.asarray(added_cond[key])
            if value.ndim != 2 or value.shape[0] != b:
                raise ValueError(f"added_cond[{key!r}] must be [B, N] = [{b}, N], got shape "
                                 f"{value.shape}")
            if not (jnp.issubdtype(value.dtype, jnp.floating)
                    or jnp.issubdtype(value.dtype, jnp.integer)):
                raise ValueError(f"added_cond[{key!r}] must hold numbers, got dtype "
                                 f"{value.dtype}")
            out[key] = value.astype(jnp.float32)
        p, k = out["text_embeds"].shape[1], out["time_ids"].shape[1]
        if p + k * cfg.added_time_dim != cfg.added_cond_input_dim:
            raise ValueError(
                f"added_cond: text_embeds [B, {p}] and time_ids [B, {k}] give {p} + {k} * "
                f"{cfg.added_time_dim} = {p + k * cfg.added_time_dim} features, but the UNet's "
                f"added_cond_input_dim is {cfg.added_cond_input_dim}"
            )
        added_cond = out
    if cfg.time_cond_dim is None:
        if timestep_cond is not None:
            raise ValueError(
                "timestep_cond (an LCM guidance embedding) was given but the UNet has none "
                "(time_cond_dim=None: not an LCM-distilled UNet); use classifier-free guidance"
            )
    else:
        if timestep_cond is None:
            raise ValueError(
                f"timestep_cond ([B, {cfg.time_cond_dim}], e.g. guidance_scale_embedding("
                f"guidance_scale, {cfg.time_cond_dim})) is required: the UNet has "
                f"time_cond_dim={cfg.time_cond_dim}"
            )
        timestep_cond = jnp.asarray(timestep_cond)
        if timestep_cond.shape != (b, cfg.time_cond_dim) or not jnp.issubdtype(
            timestep_cond.dtype, jnp.floating
        ):
            raise ValueError(
                f"timestep_cond must be [B, time_cond_dim] = [{b}, {cfg.time_cond_dim}] float, "
                f"got shape {timestep_cond.shape} dtype {timestep_cond.dtype}"
            )
    return added_cond, timestep_cond


def _residual_shape_ok(shape: tuple, target: tuple) -> bool:
    """``shape`` is ``target`` or ``target`` with the spatial axes 1 (a pooled residual)."""
    return len(shape) == 4 and (shape == target or shape == (target[0], 1, 1, target[3]))


def check_residuals(skips, h, down_residuals, mid_residual):
    """Validate a ControlNet's residuals against the UNet's skips and mid output at trace time.

    Args:
      skips: the UNet's skip connections (arrays, or anything with ``.shape``), in diffusers'
        order.
      h: the mid block's output.
      down_residuals: a sequence of one array per skip, each of the skip's shape or
        ``[B, 1, 1, C]``, float.
      mid_residual: an array of ``h``'s shape or ``[B, 1, 1, C]``, float.

    Returns:
      ``(down_residuals, mid_residual)``: a list of arrays and an array.

    Raises:
      ValueError: naming ``down_residuals`` (with the index) or ``mid_residual``: one given
        without the other, not a sequence, the wrong count, shape or a non-float dtype.
    """
    if down_residuals is None or mid_residual is None:
        given, missing = (("down_residuals", "mid_residual") if mid_residual is None
                          else ("mid_residual", "down_residuals"))
        raise ValueError(f"{given} was given without {missing}: a ControlNet's residuals come "
                         "in pairs (both, or neither)")
    if isinstance(down_residuals, (str, bytes)) or not hasattr(down_residuals, "__len__") \
            or hasattr(down_residuals, "shape"):
        raise ValueError(f"down_residuals must be a sequence of arrays, one per skip connection "
                         f"({len(skips)}), got {type(down_residuals).__name__}")
    if len(down_residuals) != len(skips):
        raise ValueError(f"down_residuals must hold {len(skips)} arrays (one per skip connection "
                         f"of this UNet), got {len(down_residuals)}")
    out = []
    for i, (r, s) in enumerate(zip(down_residuals, skips)):
        r = jnp.asarray(r)
        target = tuple(s.shape)
        if not _residual_shape_ok(tuple(r.shape), target) or not jnp.issubdtype(
                r.dtype, jnp.floating):
            raise ValueError(f"down_residuals[{i}] must be float {list(target)} (or [{target[0]}, "
                             f"1, 1, {target[3]}]), got shape {tuple(r.shape)} dtype {r.dtype}")
        out.append(r)
    mid_residual = jnp.asarray(mid_residual)
    target = tuple(h.shape)
    if not _residual_shape_ok(tuple(mid_residual.shape), target) or not jnp.issubdtype(
            mid_residual.dtype, jnp.floating):
        raise ValueError(f"mid_residual must be float {list(target)} (or [{target[0]}, 1, 1, "
                         f"{target[3]}]), got shape {tuple(mid_residual.shape)} dtype "
                         f"{mid_residual.dtype}")
    return out, mid_residual
