"""Training objectives.

The loss takes the network as ``apply_fn(params, x_t, t, cond) -> prediction`` so that any model
plugs in (a Flax module's ``apply``, a closure adding dropout keys, a plain function). Per-example
losses are computed with ``jax.vmap``; the batch loss is their mean.

    >>> import jax, jax.numpy as jnp
    >>> from jaxdiff import make_schedule
    >>> sched = make_schedule("cosine", 1000)
    >>> apply_fn = lambda params, x_t, t, cond: params["w"] * x_t    # any network
    >>> x0, labels = jnp.zeros((4, 8, 8, 1)), jnp.arange(4)
    >>> loss, aux = diffusion_loss(apply_fn, {"w": 0.5}, sched, x0, jax.random.key(0), labels,
    ...                            prediction_type="v", weighting="min_snr",
    ...                            cond_drop_prob=0.1, null_cond=jnp.int32(10))
    >>> loss.shape, aux["per_example"].shape
    ((), (4,))
    >>> grads = jax.grad(lambda p: diffusion_loss(apply_fn, p, sched, x0, jax.random.key(0))[0])(
    ...     {"w": 0.5})
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdiff.diffusion import (
    canonical_prediction_type,
    q_sample,
    snr,
    target_for,
)
from jaxdiff.schedules import Schedule
from jaxdiff.validation import check_batched, check_timesteps, concrete

__all__ = ["WEIGHTINGS", "LOSS_TYPES", "loss_weights", "drop_condition", "diffusion_loss"]

WEIGHTINGS = ("none", "min_snr")
LOSS_TYPES = ("l2", "l1")


def loss_weights(
    schedule: Schedule,
    t: jax.Array,
    *,
    prediction_type: str = "eps",
    weighting: str = "none",
    min_snr_gamma: float = 5.0,
) -> jax.Array:
    """Per-example loss weights ``[B]`` for timesteps ``t: [B]``.

    ``"min_snr"`` (Hang et al. 2023) weights the x0-space loss by ``min(SNR, gamma)``; expressed for
    each prediction target that is ``min(SNR, gamma) / SNR`` (eps), ``min(SNR, gamma)`` (x0) and
    ``min(SNR, gamma) / (SNR + 1)`` (v). The eps form is written ``min(1, gamma / SNR)`` so that a
    zero-terminal-SNR step gets weight 1 rather than 0/0.
    """
    kind = canonical_prediction_type(prediction_type)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "none":
        return jnp.ones(jnp.shape(t), jnp.float32)
    if not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma!r}")
    s = snr(schedule, t)
    if kind == "eps":
        return jnp.minimum(1.0, min_snr_gamma / s)
    if kind == "x0":
        return jnp.minimum(s, min_snr_gamma)
    return jnp.minimum(s, min_snr_gamma) / (s + 1.0)


def drop_condition(cond: Any, null_cond: Any, drop: jax.Array) -> Any:
    """Replace the conditioning of the examples where ``drop: [B] bool`` by ``null_cond``.

    ``cond`` is a pytree whose leaves are ``[B, ...]``; ``null_cond`` has the same structure with
    leaves broadcastable to one example (e.g. the null label ``10`` for int labels ``[B]``, or a
    zero context ``[L, D]`` for a context ``[B, L, D]``).
    """

    def one(c, n):
        c = jnp.asarray(c)
        mask = drop.reshape(drop.shape + (1,) * (c.ndim - 1))
        return jnp.where(mask, jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape[1:]), c)

    try:
        return jax.tree.map(one, cond, null_cond)
    except ValueError as e:
        raise ValueError(f"null_cond must have the same pytree structure as cond: {e}") from e


def diffusion_loss(
    apply_fn: Callable[[Any, jax.Array, jax.Array, Any], jax.Array],
    params: Any,
    schedule: Schedule,
    x0: jax.Array,
    key: jax.Array | None,
    cond: Any = None,
    *,
    prediction_type: str = "eps",
    weighting: str = "none",
    min_snr_gamma: float = 5.0,
    loss_type: str = "l2",
    cond_drop_prob: float = 0.0,
    null_cond: Any = None,
    t: jax.Array | None = None,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The denoising loss of one batch.

    Args:
      apply_fn: ``apply_fn(params, x_t, t, cond) -> prediction [B, ...]`` of ``prediction_type``.
      x0: clean data ``[B, ...]``.
      key: draws ``t ~ U{0..T-1}``, the noise, and the label-dropout mask. May be None only when
        ``t`` and ``noise`` are given and ``cond_drop_prob == 0``.
      cond: conditioning pytree with leaves ``[B, ...]`` (labels, context), or None.
      prediction_type: ``"eps"``, ``"x0"`` or ``"v"`` (diffusers names accepted).
      weighting: ``"none"`` or ``"min_snr"`` (with ``min_snr_gamma``).
      loss_type: ``"l2"`` (mean squared error) or ``"l1"``.
      cond_drop_prob: probability of replacing an example's ``cond`` by ``null_cond``, for
        classifier-free guidance: a scalar. A concrete value must lie in ``[0, 1]`` (``0`` skips
        the dropout); a traced one (e.g. annealed under ``jit``) always draws the dropout mask
        and so needs ``cond``, ``null_cond`` and ``key``; its range cannot be checked (values
        below 0 never drop, above 1 always drop).
      t: optional fixed timesteps ``[B]`` int instead of random draws.
      noise: optional fixed noise ``[B, ...]`` (the shape of ``x0``) instead of random draws.

    Returns:
      ``(loss, aux)``: the mean weighted loss and ``{"per_example": [B], "t": [B], "weight": [B]}``.
    """
    kind = canonical_prediction_type(prediction_type)
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if jnp.ndim(cond_drop_prob) != 0:
        raise ValueError(f"cond_drop_prob must be a scalar, got shape {jnp.shape(cond_drop_prob)}")
    p_value = concrete(cond_drop_prob)
    if p_value is not None and not 0.0 <= float(p_value) <= 1.0:
        raise ValueError(f"cond_drop_prob must lie in [0, 1], got {cond_drop_prob!r}")
    drops = p_value is None or float(p_value) > 0  # traced: always draw the mask
    if drops and (cond is None or null_cond is None):
        raise ValueError(
            "cond_drop_prob > 0 (or traced) needs both cond and null_cond (the null condition)"
        )
    x0 = check_batched("x0", x0)
    batch = x0.shape[0]
    needs_key = t is None or noise is None or drops
    if needs_key and key is None:
        raise ValueError(
            "key is required to draw t, noise or the label-dropout mask (cond_drop_prob > 0 or "
            "traced); got None"
        )
    k_t, k_noise, k_drop = jax.random.split(key, 3) if key is not None else (None,) * 3

    if t is None:
        t = jax.random.randint(k_t, (batch,), 0, schedule.num_timesteps, dtype=jnp.int32)
    t = check_timesteps("t", t, schedule.num_timesteps, batch)
    if noise is None:
        noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    x_t = q_sample(schedule, x0, t, noise)
    target = target_for(schedule, x0, t, noise, kind)

    if drops:
        drop = jax.random.bernoulli(k_drop, cond_drop_prob, (batch,))
        cond = drop_condition(cond, null_cond, drop)

    pred = apply_fn(params, x_t, t, cond)
    if jnp.shape(pred) != x0.shape:
        raise ValueError(
            f"apply_fn must return a prediction shaped like x0 {x0.shape}, got {jnp.shape(pred)}"
        )
    weight = loss_weights(
        schedule, t, prediction_type=kind, weighting=weighting, min_snr_gamma=min_snr_gamma
    )

    def per_example(p, y, w):
        err = (p - y).astype(jnp.float32)
        return w * jnp.mean(jnp.square(err) if loss_type == "l2" else jnp.abs(err))

    losses = jax.vmap(per_example)(pred, target, weight)
    return jnp.mean(losses), {"per_example": losses, "t": t, "weight": weight}
