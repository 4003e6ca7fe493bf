"""The forward process and the conversions between model parametrisations.

All functions take the :class:`~jaxdiff.schedules.Schedule` first, a batch ``x: [B, ...]`` of any
rank and integer timesteps ``t: [B]`` (or a scalar, broadcast over the batch).

Timestep range. When ``t`` is concrete (outside ``jit``) every function checks ``0 <= t < T`` and
raises a ``ValueError``. Inside ``jit`` a traced ``t`` cannot be checked; rather than clamp like a
plain JAX gather, an out-of-range ``t`` reads NaN, which propagates to the output. To raise instead,
wrap the function with :func:`checked`, which uses ``jax.experimental.checkify`` index checks::

    err, x_t = checked(jax.jit(q_sample))(sched, x0, t, noise)
    err.throw()   # ValueError-like JaxRuntimeError if any t was outside [0, T)
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from jaxdiff.schedules import Schedule
from jaxdiff.validation import (
    check_array,
    check_batched,
    check_floating,
    check_same_shape,
    check_timesteps,
)

# What an integer x0 (uint8 pixels, an int32 image batch) must become: the forward process
# assumes data scaled like the model's training data.
_SCALE_HINT = "scale images to [-1, 1] floats first (e.g. x.astype(np.float32) / 127.5 - 1)"

__all__ = [
    "PREDICTION_TYPES",
    "canonical_prediction_type",
    "checked",
    "extract",
    "q_sample",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "predict_x0_from_eps",
    "predict_eps_from_x0",
    "velocity",
    "predict_x0_from_v",
    "predict_eps_from_v",
    "model_output_to_x0_eps",
    "x0_and_eps",
    "target_for",
    "snr",
]

PREDICTION_TYPES = ("eps", "x0", "v")
_PREDICTION_ALIASES = {
    "eps": "eps",
    "epsilon": "eps",
    "x0": "x0",
    "sample": "x0",
    "x_0": "x0",
    "v": "v",
    "v_prediction": "v",
}


def canonical_prediction_type(prediction_type: str) -> str:
    """``"eps"``, ``"x0"`` or ``"v"``; the diffusers names ``"epsilon"``, ``"sample"`` and
    ``"v_prediction"`` are accepted as aliases."""
    try:
        return _PREDICTION_ALIASES[prediction_type]
    except (KeyError, TypeError):
        raise ValueError(
            f"prediction_type must be one of {sorted(_PREDICTION_ALIASES)}, got {prediction_type!r}"
        ) from None


def checked(fn: Callable) -> Callable:
    """``checkify`` ``fn`` so that an out-of-range traced timestep raises instead of reading NaN.

    Returns ``checked_fn(*args) -> (error, out)``; call ``error.throw()`` to raise.
    """
    return checkify.checkify(fn, errors=checkify.index_checks | checkify.user_checks)


def extract(a: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """``a[t]`` reshaped to broadcast against an array of rank ``ndim``: ``[B, 1, ..., 1]``.

    ``a: [T]``; ``t: [B]`` or scalar int. An index outside ``[0, T)`` reads NaN (never a clamped
    neighbour); under :func:`checked` it raises.
    """
    vals = a.at[t].get(mode="fill", fill_value=jnp.nan, wrap_negative_indices=False)
    return vals.reshape(jnp.shape(t) + (1,) * (ndim - jnp.ndim(t)))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Sample ``x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` with the given noise.

    ``x0, noise: [B, ...]`` floating point (data scaled to ``[-1, 1]``, like the model's training
    data); ``t: [B]`` int. Returns ``[B, ...]``.

    Raises:
      ValueError: (at trace time) ``x0`` or ``noise`` is an integer or bool array (e.g. uint8
        pixels in ``[0, 255]``: scale them to ``[-1, 1]`` floats first), shapes differ, or a
        concrete ``t`` is outside ``[0, T)``.
    """
    x0 = check_floating("x0", check_batched("x0", x0), _SCALE_HINT)
    noise = check_floating("noise", noise, "draw it with jax.random.normal")
    check_same_shape(x0=x0, noise=noise)
    t = check_timesteps("t", t, schedule.num_timesteps, x0.shape[0])
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
    )


def q_mean_variance(schedule: Schedule, x0: jax.Array, t: jax.Array):
    """Mean ``[B, ...]``, variance and log variance ``[B, 1, ...]`` of ``q(x_t | x_0)``.

    ``x0`` must be floating point (an integer array raises, as in :func:`q_sample`)."""
    x0 = check_floating("x0", check_batched("x0", x0), _SCALE_HINT)
    t = check_timesteps("t", t, schedule.num_timesteps, x0.shape[0])
    mean = extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
    var = extract(1.0 - schedule.alphas_cumprod, t, x0.ndim)
    log_var = extract(schedule.log_one_minus_alphas_cumprod, t, x0.ndim)
    return mean, var, log_var


def q_posterior_mean_variance(schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array):
    """The posterior ``q(x_{t-1} | x_t, x_0)``.

    Returns ``(mean [B, ...], variance [B, 1, ...], log_variance_clipped [B, 1, ...])``; at
    ``t = 0`` the variance is 0 and the clipped log variance is that of ``t = 1`` (Ho et al. 2020).
    """
    x0 = check_batched("x0", x0)
    x_t = check_array("x_t", x_t)
    check_same_shape(x0=x0, x_t=x_t)
    t = check_timesteps("t", t, schedule.num_timesteps, x0.shape[0])
    mean = (
        extract(schedule.posterior_mean_coef1, t, x0.ndim) * x0
        + extract(schedule.posterior_mean_coef2, t, x0.ndim) * x_t
    )
    var = extract(schedule.posterior_variance, t, x0.ndim)
    log_var = extract(schedule.posterior_log_variance_clipped, t, x0.ndim)
    return mean, var, log_var


def predict_x0_from_eps(
    schedule: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array
) -> jax.Array:
    """``x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)``."""
    x_t = check_batched("x_t", x_t)
    eps = check_array("eps", eps)
    check_same_shape(x_t=x_t, eps=eps)
    t = check_timesteps("t", t, schedule.num_timesteps, x_t.shape[0])
    return (
        extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
        - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps
    )


def predict_eps_from_x0(
    schedule: Schedule, x_t: jax.Array, t: jax.Array, x0: jax.Array
) -> jax.Array:
    """``eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar)``."""
    x_t = check_batched("x_t", x_t)
    x0 = check_array("x0", x0)
    check_same_shape(x_t=x_t, x0=x0)
    t = check_timesteps("t", t, schedule.num_timesteps, x_t.shape[0])
    return (x_t - extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * x0) / extract(
        schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim
    )


def velocity(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """The v-prediction target ``v = sqrt(abar) eps - sqrt(1 - abar) x_0`` (Salimans & Ho 2022)."""
    x0 = check_batched("x0", x0)
    noise = check_array("noise", noise)
    check_same_shape(x0=x0, noise=noise)
    t = check_timesteps("t", t, schedule.num_timesteps, x0.shape[0])
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * noise
        - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0
    )


def predict_x0_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """``x_0 = sqrt(abar) x_t - sqrt(1 - abar) v``."""
    x_t = check_batched("x_t", x_t)
    v = check_array("v", v)
    check_same_shape(x_t=x_t, v=v)
    t = check_timesteps("t", t, schedule.num_timesteps, x_t.shape[0])
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
        - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v
    )


def predict_eps_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    """``eps = sqrt(abar) v + sqrt(1 - abar) x_t``."""
    x_t = check_batched("x_t", x_t)
    v = check_array("v", v)
    check_same_shape(x_t=x_t, v=v)
    t = check_timesteps("t", t, schedule.num_timesteps, x_t.shape[0])
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * v
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x_t
    )


def x0_and_eps(
    model_output: jax.Array,
    x_t: jax.Array,
    alpha: jax.Array,
    sigma: jax.Array,
    prediction_type: str,
) -> tuple[jax.Array, jax.Array]:
    """``(x_0, eps)`` implied by a model output, given ``x_t = alpha x_0 + sigma eps``.

    The one conversion every sampler uses, in diffusers' order of operations:
    eps-prediction ``x_0 = (x_t - sigma out) / alpha``; x0-prediction ``eps = (x_t - alpha out) /
    sigma``; v-prediction ``x_0 = alpha x_t - sigma out``, ``eps = alpha out + sigma x_t`` (with
    ``alpha^2 + sigma^2 = 1``).

    Args:
      model_output: ``[B, ...]`` eps, x0 or v by ``prediction_type``.
      x_t: ``[B, ...]``.
      alpha: ``sqrt(abar_t)``, broadcastable to ``x_t`` (a scalar or ``[B, 1, ..., 1]``).
      sigma: ``sqrt(1 - abar_t)``, broadcastable likewise.
      prediction_type: see :func:`canonical_prediction_type`.

    Returns:
      ``(x_0, eps)``, each ``[B, ...]``.
    """
    kind = canonical_prediction_type(prediction_type)
    if kind == "eps":
        return (x_t - sigma * model_output) / alpha, model_output
    if kind == "x0":
        return model_output, (x_t - alpha * model_output) / sigma
    return alpha * x_t - sigma * model_output, alpha * model_output + sigma * x_t


def model_output_to_x0_eps(
    schedule: Schedule, x_t: jax.Array, t: jax.Array, model_output: jax.Array, prediction_type: str
) -> tuple[jax.Array, jax.Array]:
    """Both ``(x_0, eps)`` implied by a model output of the given ``prediction_type`` at integer
    timesteps ``t: [B]`` (:func:`x0_and_eps` with the schedule's ``alpha_t``, ``sigma_t``)."""
    x_t = check_batched("x_t", x_t)
    model_output = check_array("model_output", model_output)
    check_same_shape(x_t=x_t, model_output=model_output)
    t = check_timesteps("t", t, schedule.num_timesteps, x_t.shape[0])
    alpha = extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim)
    sigma = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
    return x0_and_eps(model_output, x_t, alpha, sigma, prediction_type)


def target_for(
    schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array, prediction_type: str
) -> jax.Array:
    """The regression target of a model of ``prediction_type``: ``noise``, ``x0`` or ``v``."""
    kind = canonical_prediction_type(prediction_type)
    if kind == "eps":
        check_same_shape(x0=x0, noise=noise)
        return noise
    if kind == "x0":
        check_same_shape(x0=x0, noise=noise)
        return x0
    return velocity(schedule, x0, t, noise)


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio ``abar_t / (1 - abar_t)``; ``t: [B]`` or scalar int, same shape out."""
    t = check_timesteps("t", t, schedule.num_timesteps, None)
    abar = extract(schedule.alphas_cumprod, t, jnp.ndim(t))
    return abar / (1.0 - abar)
