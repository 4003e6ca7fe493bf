"""Classifier-free guidance (Ho & Salimans 2022) as a model-function transform.

``classifier_free_guidance(model_fn, cond, null_cond, w)`` returns a plain ``fn(x, t)`` that any
sampler takes. Both branches run in ONE batched model call of batch ``2B``; the outputs combine as
``uncond + w * (cond - uncond)`` (the diffusers convention: ``w = 1`` is the conditional model,
``w = 0`` the unconditional one), optionally rescaled (Lin et al. 2023, ``guidance_rescale``),
optionally only inside an interval of noise levels (Kynkaanniemi et al. 2024,
``guidance_interval``: the conditional model elsewhere, so guidance does not collapse the
samples' diversity at high noise nor cost an extra branch where it does nothing).

Learned-variance models (``2C`` output channels: mean prediction, then variance): pass
``guide_channels=C`` so that only the first ``C`` channels are guided and the variance channels
come from the conditional branch, as diffusers' ``DiTPipeline`` does. Extrapolating the variance
prediction too (the default, ``guide_channels=None``) can push it outside its valid range.

    >>> import jax.numpy as jnp
    >>> from jaxdiff.samplers import ddim_sample
    >>> from jaxdiff.schedules import make_schedule
    >>> def model_fn(x, t, labels):          # a stand-in for a class-conditional denoiser
    ...     return 0.1 * x + 0.01 * labels[:, None]
    >>> labels = jnp.array([3, 7])
    >>> fn = classifier_free_guidance(model_fn, labels, 10, 3.0)   # 10: the null label
    >>> ddim_sample(fn, make_schedule("cosine", 100), jnp.ones((2, 4)), None, num_steps=5).shape
    (2, 4)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.types import CondModelFn, ModelFn
from jaxdiff.validation import concrete

__all__ = ["classifier_free_guidance", "prompt_guidance", "rescale_guidance"]



def rescale_guidance(
    guided: jax.Array, cond_out: jax.Array, guidance_rescale: float | jax.Array
) -> jax.Array:
    """Blend the guided output with a copy rescaled to the conditional output's standard deviation.

    ``phi * guided * std(cond_out) / std(guided) + (1 - phi) * guided``, the standard deviations
    (unbiased, as ``torch.std``) taken per example over all non-batch axes (diffusers'
    ``rescale_noise_cfg``). ``guided, cond_out: [B, ...]``; returns ``[B, ...]``.
    """
    axes = tuple(range(1, guided.ndim))
    std_cond = jnp.std(cond_out, axis=axes, keepdims=True, ddof=1)
    std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
    rescaled = guided * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def _check_interval(interval) -> tuple[float, float] | None:
    """``guidance_interval`` as ``(lo, hi)`` floats, or ``None``; ``ValueError`` naming it."""
    if interval is None:
        return None
    try:
        lo, hi = interval
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise ValueError("guidance_interval must be None or a pair (t_lo, t_hi) of numbers, got "
                         f"{interval!r}") from None
    if any(isinstance(v, (bool, np.bool_)) for v in interval) or not lo <= hi:
        raise ValueError(f"guidance_interval must be a pair (t_lo, t_hi) of numbers with "
                         f"t_lo <= t_hi, got {interval!r}")
    return lo, hi


def _broadcast_null(cond, null_cond):
    """``null_cond`` broadcast leaf by leaf to ``cond``'s shapes and dtypes."""
    cond_leaves, treedef = jax.tree.flatten(cond)
    null_leaves = treedef.flatten_up_to(null_cond)
    out = []
    for c, n in zip(cond_leaves, null_leaves):
        c, n = jnp.asarray(c), jnp.asarray(n)
        if c.ndim < 1:
            raise ValueError(f"cond leaves must have a batch axis, got shape {c.shape}")
        try:
            out.append(jnp.broadcast_to(n.astype(c.dtype), c.shape))
        except ValueError as e:
            raise ValueError(
                f"null_cond leaf of shape {n.shape} does not broadcast to cond's {c.shape}"
            ) from e
    return jax.tree.unflatten(treedef, out)


def _per_example_t(cond: Any, t: Any, batch: int) -> jax.Array:
    """``t`` broadcast to ``[batch]``, after checking that every leaf of ``cond`` has that batch.

    Raises:
      ValueError: a ``cond`` leaf whose batch axis is not ``batch``.
    """
    for leaf in jax.tree.leaves(cond):
        if jnp.shape(leaf)[0] != batch:
            raise ValueError(f"cond's batch axis ({jnp.shape(leaf)[0]}) must match x's ({batch})")
    return jnp.broadcast_to(jnp.asarray(t), (batch,))


def classifier_free_guidance(
    model_fn: CondModelFn,
    cond: Any,
    null_cond: Any,
    guidance_scale: float | jax.Array,
    guidance_rescale: float | jax.Array = 0.0,
    *,
    guide_channels: int | None = None,
    guidance_interval: tuple[float, float] | None = None,
) -> ModelFn:
    """Wrap a conditional model into a guided ``fn(x, t)`` for the samplers.

    Args:
      model_fn: ``model_fn(x: [N, ...], t: [N] int32, cond) -> [N, ...]``.
      cond: a pytree whose leaves have batch axis ``B`` (e.g. labels ``[B]`` int32, or a context
        ``[B, L, D]``).
      null_cond: the "no condition" pytree with ``cond``'s structure; each leaf is broadcast to
        the matching leaf of ``cond`` (e.g. a scalar null label, a ``[1, L, D]`` or ``[L, D]``
        context).
      guidance_scale: ``w``; may be traced (changing it does not recompile). A concrete NaN
        or infinite ``w`` raises; a traced one cannot be checked, and a NaN there makes every
        output NaN (check it where it is still a Python number).
      guidance_rescale: ``phi`` in ``[0, 1]``; may be traced. A concrete ``0`` skips the rescale.
      guide_channels: ``None`` guides every output channel. An int ``C >= 1`` guides (and
        rescales) only the first ``C`` channels of the LAST axis; the remaining ones (a learned
        variance: output ``[B, ..., 2C]``) are the conditional branch's.

    Returns:
      ``fn(x: [B, ...], t: [B] or scalar int) -> [B, ...]``: ``uncond + w * (cond - uncond)``,
      computed from ONE call of ``model_fn`` on ``[x, x]``, ``[t, t]``, ``[cond, null_cond]``.
      A concrete ``w = 1`` (the conditional model; rescaling is then the identity) or ``w = 0``
      without rescale and without ``guide_channels`` (the unconditional model) needs one branch
      only, so ``model_fn`` runs once on batch ``B`` instead of ``2B``: half the cost, same result.
      With ``guidance_interval``, the conditional output outside it, in ``model_fn``'s dtype.

    Raises:
      ValueError: a concrete ``guidance_scale`` that is NaN or infinite, a concrete
        ``guidance_rescale`` outside ``[0, 1]``, a bad ``guide_channels`` or
        ``guidance_interval``, or a ``null_cond`` that does not broadcast to ``cond``.
    """
    if guide_channels is not None and (
        isinstance(guide_channels, bool)
        or not isinstance(guide_channels, (int, np.integer))
        or guide_channels < 1
    ):
        raise ValueError(f"guide_channels must be None or an int >= 1, got {guide_channels!r}")
    rescale_value = concrete(guidance_rescale)
    if rescale_value is not None and not 0.0 <= float(rescale_value) <= 1.0:
        raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale!r}")
    skip_rescale = rescale_value is not None and float(rescale_value) == 0.0
    interval = _check_interval(guidance_interval)
    null_full = _broadcast_null(cond, null_cond)
    scale_value = concrete(guidance_scale)
    if scale_value is not None and not np.all(np.isfinite(np.asarray(scale_value, np.float64))):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r} (every output "
                         "would be NaN)")
    single = None
    if scale_value is not None and np.ndim(scale_value) == 0:
        if float(scale_value) == 1.0:
            single = cond
        elif (float(scale_value) == 0.0 and skip_rescale and guide_channels is None
              and interval is None):
            single = null_full
    both_cond = jax.tree.map(lambda c, n: jnp.concatenate([c, n], axis=0), cond, null_full)

    def run(x: jax.Array, t: jax.Array, c: Any, n: int) -> jax.Array:
        out = model_fn(x, t, c)
        if out.shape[0] != n:
            raise ValueError(f"model_fn's output must have batch {n}, got {out.shape}")
        return out

    def both_branches(x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(guided output, conditional output), both ``[B, ...]``, from one call on ``2B``."""
        batch = x.shape[0]
        out = run(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), both_cond,
                  2 * batch)
        cond_full, uncond_out = out[:batch], out[batch:]
        cond_out, rest = cond_full, None
        if guide_channels is not None:
            if out.ndim < 2 or guide_channels > out.shape[-1]:
                raise ValueError(
                    f"guide_channels={guide_channels} exceeds the last axis of model_fn's output "
                    f"{out.shape}"
                )
            rest = cond_full[..., guide_channels:]
            cond_out, uncond_out = cond_full[..., :guide_channels], uncond_out[..., :guide_channels]
        guided_out = uncond_out + guidance_scale * (cond_out - uncond_out)
        if not skip_rescale:
            guided_out = rescale_guidance(guided_out, cond_out, guidance_rescale)
        if rest is not None:
            guided_out = jnp.concatenate([guided_out.astype(rest.dtype), rest], axis=-1)
        return guided_out, cond_full

    def guided(x: jax.Array, t: jax.Array) -> jax.Array:
        batch = x.shape[0]
        t = _per_example_t(cond, t, batch)
        if single is not None:
            return run(x, t, single, batch)
        if interval is None:
            return both_branches(x, t)[0]
        inside = (t >= interval[0]) & (t <= interval[1])

        def with_guidance(x, t):
            guided_out, cond_full = both_branches(x, t)
            keep = inside.reshape((batch,) + (1,) * (guided_out.ndim - 1))
            return jnp.where(keep, guided_out, cond_full).astype(cond_full.dtype)

        return jax.lax.cond(jnp.any(inside), with_guidance,
                            lambda x, t: run(x, t, cond, batch), x, t)

    return guided


def prompt_guidance(
    model_fn: CondModelFn,
    cond: Any,
    guide_cond: Any,
    null_cond: Any,
    guidance_scale: float | jax.Array,
) -> ModelFn:
    """Guidance along another condition's direction: ``cond_out + (w - 1) * (guide_out -
    uncond_out)``, from ONE call of ``model_fn`` on ``[x, x, x]`` / ``[cond, guide_cond,
    null_cond]`` (batch ``3B``).

    With ``guide_cond = cond`` this is :func:`classifier_free_guidance` (``uncond + w (cond -
    uncond)``). With ``guide_cond`` the condition without one of its parts (the prompt without a
    word whose attribute is an offset the model adds: :mod:`jaxdiff.finetune.offset`), the part
    is drawn once, as the conditional model draws it, and only the rest is guided; classifier-
    free guidance would multiply the part's contribution by ``w``.

    Args:
      model_fn: ``model_fn(x: [N, ...], t: [N] int32, cond) -> [N, ...]``.
      cond, guide_cond: pytrees whose leaves have batch axis ``B`` (the same structure).
      null_cond: the "no condition" pytree, broadcast to ``cond``'s leaves as in
        :func:`classifier_free_guidance`.
      guidance_scale: ``w``; may be traced. A concrete NaN or infinite ``w`` raises.

    Returns:
      ``fn(x: [B, ...], t: [B] or scalar int) -> [B, ...]``.

    Raises:
      ValueError: a concrete non-finite ``guidance_scale``, ``guide_cond`` of another structure
        or batch than ``cond``, a ``null_cond`` that does not broadcast to ``cond``.
    """
    scale_value = concrete(guidance_scale)
    if scale_value is not None and not np.all(np.isfinite(np.asarray(scale_value, np.float64))):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r}")
    if jax.tree.structure(guide_cond) != jax.tree.structure(cond) or any(
            jnp.shape(g) != jnp.shape(c)
            for g, c in zip(jax.tree.leaves(guide_cond), jax.tree.leaves(cond))):
        raise ValueError("guide_cond must have cond's structure and shapes")
    null_full = _broadcast_null(cond, null_cond)
    three = jax.tree.map(lambda c, g, n: jnp.concatenate([c, g, n], axis=0), cond, guide_cond,
                         null_full)

    def guided(x: jax.Array, t: jax.Array) -> jax.Array:
        batch = x.shape[0]
        t = _per_example_t(cond, t, batch)
        out = model_fn(jnp.concatenate([x, x, x], axis=0), jnp.concatenate([t, t, t], axis=0),
                       three)
        if out.shape[0] != 3 * batch:
            raise ValueError(f"model_fn's output must have batch {3 * batch}, got {out.shape}")
        c, g, n = out[:batch], out[batch:2 * batch], out[2 * batch:]
        return c + (guidance_scale - 1.0) * (g - n)

    return guided
