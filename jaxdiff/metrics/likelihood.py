"""Bits per dimension from the variational bound of a diffusion model (Ho et al. 2020, Sec. 3.3;
Nichol & Dhariwal 2021, Sec. 2 / ``guided_diffusion.GaussianDiffusion.calc_bpd_loop``).

For 8-bit data scaled to ``x0 in [-1, 1]`` (256 bins of width ``2/255``) the negative log-likelihood
is bounded by ``L = L_T + sum_{t=1}^{T-1} L_t + L_0`` (paper indices; the code's timestep index
``k`` in ``0 .. T-1`` is the paper's ``t = k + 1``):

- ``L_T = KL(q(x_T | x0) || N(0, I))``, the prior term (no model);
- ``L_k = KL(q(x_{k-1} | x_k, x0) || p(x_{k-1} | x_k))`` for ``k >= 1``, between Gaussians;
- ``L_0 = -log p(x0 | x_1)`` under a discretised Gaussian decoder with the model's mean at
  ``k = 0``.

The model's mean is the posterior mean at its predicted ``x0``. Its variance is ``"fixed_small"``
(the posterior variance, with the clipped log variance, so ``k = 0`` uses
``posterior_variance[1]``), ``"fixed_large"`` (``beta_k``, with ``posterior_variance[1]`` at
``k = 0`` as in the paper's code), or, for models whose output has ``2C`` channels on the last
axis, ``"learned"`` (the log variance itself) or ``"learned_range"`` (``(v+1)/2 log beta +
(1-v)/2 log posterior_variance``), matching :mod:`jaxdiff.samplers.ddpm`. Every term is reported in
bits per dimension (nats / (D log 2)).

    >>> import jax, jax.numpy as jnp
    >>> from functools import partial
    >>> from jaxdiff import make_schedule
    >>> sched = make_schedule("linear", 20)
    >>> model_fn = lambda x_t, t: jnp.zeros_like(x_t)          # predicts eps = 0
    >>> x0 = jnp.zeros((2, 4, 4, 1))
    >>> terms = jax.jit(partial(vlb_terms, model_fn, sched))(x0, jax.random.key(0))
    >>> terms.prior.shape, terms.terms.shape, terms.total.shape   # [B], [B, T], [B] bits/dim
    ((2,), (2, 20), (2,))
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff.diffusion import (
    canonical_prediction_type,
    extract,
    model_output_to_x0_eps,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
)
from jaxdiff.schedules import Schedule
from jaxdiff.types import ModelFn

__all__ = [
    "VLB_VARIANCE_TYPES",
    "VLBTerms",
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "prior_bpd",
    "vlb_terms",
    "bits_per_dim",
]

VLB_VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
_LEARNED = ("learned", "learned_range")
_LOG2 = math.log(2.0)


class VLBTerms(NamedTuple):
    """The terms of the bound for a batch, all in bits per dimension.

    Attributes:
      prior: ``[B]`` ``L_T``.
      terms: ``[B, T]``; ``terms[:, 0]`` is the decoder ``L_0`` and ``terms[:, k]`` for ``k >= 1``
        the KL term ``L_k`` at timestep index ``k``.
      total: ``[B]`` ``prior + terms.sum(-1)``, an upper bound on ``-log2 p(x0) / D``.
    """

    prior: jax.Array
    terms: jax.Array
    total: jax.Array


def _mean_flat(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
    """Elementwise ``KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))`` in nats; broadcasts."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """The tanh approximation of the standard normal CDF used by Ho et al. and guided-diffusion."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _log_normal_mass(lo: jax.Array, hi: jax.Array) -> jax.Array:
    """``log(Phi(hi) - Phi(lo))`` for ``lo < hi``, accurate in both tails and for narrow bins."""
    # Reflect so the bin lies mostly left of 0, where log_ndtr keeps its precision.
    flip = (lo + hi) > 0
    a = jnp.where(flip, -hi, lo)
    b = jnp.where(flip, -lo, hi)
    log_b = jax.scipy.special.log_ndtr(b)
    d = jax.scipy.special.log_ndtr(a) - log_b                     # <= 0
    wide = log_b + jnp.log(-jnp.expm1(jnp.minimum(d, -1e-30)))
    # A bin much narrower than the scale: midpoint rule (relative error ~ (b - a)^2 / 24).
    narrow = jax.scipy.stats.norm.logpdf(0.5 * (a + b)) + jnp.log(b - a)
    return jnp.where(b - a < 1e-3, narrow, wide)


def discretized_gaussian_log_likelihood(
    x: jax.Array, means: jax.Array, log_scales: jax.Array, *, approx_cdf: bool = True
) -> jax.Array:
    """Log-probability of 8-bit data under a Gaussian discretised into 256 bins over ``[-1, 1]``.

    The bin of value ``x`` is ``[x - 1/255, x + 1/255]``; the edge bins extend to ``-inf`` (for
    ``x = -1``) and ``+inf`` (for ``x = 1``), so the 256 probabilities sum to 1.

    Args:
      x: ``[B, ...]`` data on the grid ``{-1, -1 + 2/255, ..., 1}``.
      means: the Gaussian's mean, broadcastable to ``x``.
      log_scales: the Gaussian's ``log(std)``, broadcastable to ``x``.
      approx_cdf: use :func:`approx_standard_normal_cdf` with guided-diffusion's ``1e-12`` floors
        (bit-for-bit their formula); else the exact CDF through ``log_ndtr``, accurate in the tails.

    Returns:
      ``[B, ...]`` log-probabilities in nats.
    """
    centred = x - means
    inv_stdv = jnp.exp(-log_scales)
    plus_in = inv_stdv * (centred + 1.0 / 255.0)
    min_in = inv_stdv * (centred - 1.0 / 255.0)
    if approx_cdf:
        cdf_plus = approx_standard_normal_cdf(plus_in)
        cdf_min = approx_standard_normal_cdf(min_in)
        log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
        log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
        log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    else:
        log_cdf_plus = jax.scipy.special.log_ndtr(plus_in)
        log_one_minus_cdf_min = jax.scipy.special.log_ndtr(-min_in)
        log_delta = _log_normal_mass(min_in, plus_in)
    inner = jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    return jnp.where(x < -0.999, log_cdf_plus, inner)


def prior_bpd(schedule: Schedule, x0: jax.Array) -> jax.Array:
    """``L_T = KL(q(x_T | x0) || N(0, I))`` in bits per dimension. ``x0: [B, ...]`` -> ``[B]``."""
    t = jnp.full((x0.shape[0],), schedule.num_timesteps - 1, jnp.int32)
    mean, _, log_var = q_mean_variance(schedule, x0, t)
    return _mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / _LOG2


def _model_log_variance(schedule, t, ndim, variance_type, var_out):
    """Log variance of ``p(x_{t-1} | x_t)``: ``[B, 1, ...]`` (fixed) or ``[B, ...]`` (learned)."""
    min_log = extract(schedule.posterior_log_variance_clipped, t, ndim)
    if variance_type == "fixed_small":
        return min_log
    # log(beta_t), with the first entry replaced by the posterior variance at t = 1 (paper's code).
    log_betas = jnp.log(schedule.betas).at[0].set(schedule.posterior_log_variance_clipped[0])
    max_log = extract(log_betas, t, ndim)
    if variance_type == "fixed_large":
        return max_log
    if variance_type == "learned":
        return var_out
    frac = (var_out + 1.0) / 2.0
    return frac * max_log + (1.0 - frac) * min_log


def _term_bpd(model_fn, schedule, x0, t, key, prediction_type, variance_type, clip_x0, approx_cdf):
    """The bound's term at timestep ``t`` (a scalar int, traced) for the batch: ``[B]`` bits/dim."""
    batch = x0.shape[0]
    tb = jnp.full((batch,), t, jnp.int32)
    noise = jax.random.normal(jax.random.fold_in(key, t), x0.shape, x0.dtype)
    x_t = q_sample(schedule, x0, tb, noise)
    out = model_fn(x_t, tb)
    channels = x0.shape[-1]
    want = (*x0.shape[:-1], 2 * channels) if variance_type in _LEARNED else x0.shape
    if out.shape != want:
        raise ValueError(
            f"model_fn's output must have shape {want} for variance_type={variance_type!r}, "
            f"got {out.shape}"
        )
    mean_out, var_out = (out[..., :channels], out[..., channels:]) if variance_type in _LEARNED \
        else (out, None)
    pred_x0, _ = model_output_to_x0_eps(schedule, x_t, tb, mean_out, prediction_type)
    if clip_x0 is not None:
        pred_x0 = jnp.clip(pred_x0, -clip_x0, clip_x0)
    model_mean, _, _ = q_posterior_mean_variance(schedule, pred_x0, x_t, tb)
    model_log_var = _model_log_variance(schedule, tb, x0.ndim, variance_type, var_out)

    true_mean, _, true_log_var = q_posterior_mean_variance(schedule, x0, x_t, tb)
    kl = _mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / _LOG2
    nll = -_mean_flat(
        discretized_gaussian_log_likelihood(
            x0, model_mean, 0.5 * model_log_var * jnp.ones_like(x0), approx_cdf=approx_cdf
        )
    ) / _LOG2
    return jnp.where(t == 0, nll, kl)


def vlb_terms(
    model_fn: ModelFn,
    schedule: Schedule,
    x0: jax.Array,
    key: jax.Array,
    *,
    prediction_type: str = "eps",
    variance_type: str = "fixed_large",
    clip_x0: float | None = 1.0,
    approx_cdf: bool = True,
    t_batch_size: int | None = None,
) -> VLBTerms:
    """Every term of the variational bound for each example of a batch, in bits per dimension.

    One ``jax.lax.map`` over the ``T`` timesteps (a ``lax.scan``; with ``t_batch_size`` that many
    timesteps are ``vmap``-ed per iteration, trading memory for speed). Timestep ``k`` draws its own
    noise ``x_k ~ q(x_k | x0)`` from ``fold_in(key, k)``, so each term is a one-sample estimate, as
    in guided-diffusion's ``calc_bpd_loop``. Jit the call (``model_fn`` closed over its params).

    Args:
      model_fn: ``model_fn(x_t: [B, ...], t: [B] int32) -> [B, ...]`` (eps, x0 or v by
        ``prediction_type``; ``2C`` channels on the last axis for the learned variance types).
        A class-conditional model closes over its labels.
      schedule: the schedule the model was trained with.
      x0: ``[B, ..., C]`` data in ``[-1, 1]`` on the 256-level grid (NHWC for images).
      key: PRNG key.
      prediction_type: ``"eps"``, ``"x0"`` or ``"v"`` (or the diffusers aliases).
      variance_type: one of :data:`VLB_VARIANCE_TYPES`.
      clip_x0: clip the predicted ``x0`` to ``[-clip_x0, clip_x0]`` before forming the mean, as
        guided-diffusion does (``clip_denoised=True``); ``None`` to skip.
      approx_cdf: the decoder's CDF (see :func:`discretized_gaussian_log_likelihood`).
      t_batch_size: timesteps evaluated together (``None``: one at a time).

    Returns:
      :class:`VLBTerms` with ``prior [B]``, ``terms [B, T]`` and ``total [B]``.
    """
    prediction_type = canonical_prediction_type(prediction_type)
    if variance_type not in VLB_VARIANCE_TYPES:
        raise ValueError(
            f"variance_type must be one of {VLB_VARIANCE_TYPES}, got {variance_type!r}")
    x0 = jnp.asarray(x0)
    if x0.ndim < 2:
        raise ValueError(f"x0 must be a batch [B, ..., C], got shape {x0.shape}")
    if t_batch_size is not None and t_batch_size < 1:
        raise ValueError(f"t_batch_size must be >= 1 or None, got {t_batch_size}")

    def term(t):
        return _term_bpd(model_fn, schedule, x0, t, key, prediction_type, variance_type, clip_x0,
                         approx_cdf)

    ts = jnp.arange(schedule.num_timesteps, dtype=jnp.int32)
    terms = jax.lax.map(term, ts, batch_size=t_batch_size).T          # [T, B] -> [B, T]
    prior = prior_bpd(schedule, x0)
    return VLBTerms(prior=prior, terms=terms, total=prior + terms.sum(axis=1))


def bits_per_dim(
    model_fn: ModelFn, schedule: Schedule, x0: jax.Array, key: jax.Array, **kwargs
) -> jax.Array:
    """The variational bound on the negative log-likelihood, ``[B]`` bits per dimension.

    ``vlb_terms(...).total``; keyword arguments as :func:`vlb_terms`. Average over a test set for
    the usual bits/dim number.
    """
    return vlb_terms(model_fn, schedule, x0, key, **kwargs).total
