"""Continuous-time training objectives: denoising score matching (Song et al. 2021, eq. 7; the
score-SDE tutorial's ``loss_fn``; ``score_sde``'s ``get_sde_loss_fn``) and eps-prediction.

For ``t`` drawn from ``[eps, T]``, ``z ~ N(0, I)`` and ``x_t = mean_coeff(t) x0 + std(t) z``:

- :func:`dsm_loss` with ``weighting="none"``: ``|| s(x_t, t) std(t) + z ||^2``, the tutorial's form
  (``lambda(t) = std(t)^2``); with ``"likelihood"``: ``g(t)^2 || s(x_t, t) + z / std(t) ||^2``
  (``lambda = g^2``, which makes the objective a bound on the negative log-likelihood, Song et al.
  2021b, "Maximum Likelihood Training of Score-Based Diffusion Models");
- :func:`eps_loss`: ``|| eps(x_t, t) - z ||^2``, for a model predicting the noise (its score is
  ``-eps / std``, :func:`jaxdiff.sde.models.score_from_eps`); ``"likelihood"`` multiplies it by
  ``g^2 / std^2``, the same weighting in eps form.

Per-example errors are summed (``reduce="sum"``, as the tutorial and ``score_sde``'s default) or
averaged (``"mean"``) over the non-batch axes; the batch loss is their mean. ``t`` is drawn
uniformly on ``[eps, T]``; ``antithetic`` pairs each uniform ``u`` with ``1 - u`` (variance
reduction); ``importance_sampling`` (likelihood weighting only) draws ``t`` from
``p(t) ~ g(t)^2 / std(t)^2`` on ``[eps, T]`` through a tabulated inverse CDF
(:func:`importance_sample_t`) and divides the weight by ``p(t) (T - eps)``, so that the expected
loss equals the uniformly sampled one with a smaller variance.

    >>> import jax, jax.numpy as jnp
    >>> from jaxdiff.sde import VPSDE
    >>> apply_fn = lambda params, x_t, t, cond: params["w"] * x_t       # any score network
    >>> @jax.jit
    ... def loss_fn(params, x0, key):
    ...     return dsm_loss(apply_fn, params, VPSDE(), x0, key, weighting="likelihood",
    ...                     importance_sampling=True, antithetic=True)
    >>> loss, aux = loss_fn({"w": -1.0}, jnp.zeros((8, 2)), jax.random.key(0))
    >>> loss.shape, aux["per_example"].shape, aux["t"].shape
    ((), (8,), (8,))
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdiff.sde.sdes import batch_broadcast
from jaxdiff.validation import check_batched, check_bool, check_choice, check_float, check_int

__all__ = [
    "SDE_WEIGHTINGS",
    "REDUCTIONS",
    "importance_grid",
    "importance_sample_t",
    "sample_t",
    "dsm_loss",
    "eps_loss",
]

SDE_WEIGHTINGS = ("none", "likelihood")
REDUCTIONS = ("sum", "mean")


def importance_grid(sde, eps: float, num_points: int = 2048) -> tuple[jax.Array, jax.Array]:
    """``(t_grid [K + 1], cdf [K + 1])``: the normalised CDF of ``g(t)^2 / std(t)^2`` on a
    geometric grid from ``eps`` to ``T`` (``K = num_points``, trapezoid rule; geometric because the
    density grows like ``1 / t`` near 0 for VP-type SDEs). Jittable in ``sde``'s parameters."""
    k = jnp.arange(num_points + 1, dtype=jnp.float32) / num_points
    grid = eps * (sde.T / eps) ** k
    grid = grid.at[0].set(eps).at[-1].set(sde.T)
    density = sde.diffusion(grid) ** 2 / sde.marginal_coeffs(grid)[1] ** 2
    mass = 0.5 * (density[1:] + density[:-1]) * jnp.diff(grid)
    cdf = jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(mass)])
    return grid, cdf / cdf[-1]


def importance_sample_t(sde, u: jax.Array, eps: float,
                        num_points: int = 2048) -> tuple[jax.Array, jax.Array]:
    """``(t, p)``: ``t`` from uniforms ``u [B]`` in ``[0, 1)`` by the piecewise-linear inverse of
    :func:`importance_grid`'s CDF, and ``p [B]`` the density of that draw (piecewise constant, so
    that ``E[h(t) / p(t)] = int_eps^T h`` holds exactly)."""
    grid, cdf = importance_grid(sde, eps, num_points)
    i = jnp.clip(jnp.searchsorted(cdf, u, side="right") - 1, 0, num_points - 1)
    dc, dt = cdf[i + 1] - cdf[i], grid[i + 1] - grid[i]
    t = grid[i] + (u - cdf[i]) / jnp.maximum(dc, 1e-30) * dt
    return jnp.clip(t, eps, sde.T), dc / dt


def sample_t(sde, key: jax.Array, batch: int, *, eps: float = 1e-5, antithetic: bool = False,
             importance_sampling: bool = False) -> tuple[jax.Array, jax.Array]:
    """``(t [B], w [B])``: times in ``[eps, T]`` and the importance weight ``1 / (p(t) (T - eps))``
    (ones without ``importance_sampling``). Arguments as :func:`dsm_loss`."""
    batch = check_int("batch", batch, minimum=1)
    if antithetic:
        half = jax.random.uniform(key, ((batch + 1) // 2,), jnp.float32)
        u = jnp.concatenate([half, 1.0 - half])[:batch]
    else:
        u = jax.random.uniform(key, (batch,), jnp.float32)
    if importance_sampling:
        t, p = importance_sample_t(sde, u, eps)
        return t, 1.0 / (p * (sde.T - eps))
    return eps + u * (sde.T - eps), jnp.ones((batch,), jnp.float32)


def _check_options(sde, weighting, reduce, eps, antithetic, importance_sampling, t):
    check_choice("weighting", weighting, SDE_WEIGHTINGS)
    check_choice("reduce", reduce, REDUCTIONS)
    eps = check_float("eps", eps, minimum=0.0, maximum=sde.T, exclusive_minimum=True,
                      exclusive_maximum=True)
    check_bool("antithetic", antithetic)
    if check_bool("importance_sampling", importance_sampling):
        if weighting != "likelihood":
            raise ValueError("importance_sampling needs weighting='likelihood' (it samples t from "
                             f"g^2 / std^2), got weighting={weighting!r}")
        if t is not None:
            raise ValueError("t must be None with importance_sampling (t is then drawn)")
    return eps


def _draw(sde, x0, key, t, noise, eps, antithetic, importance_sampling):
    x0 = check_batched("x0", x0)
    batch = x0.shape[0]
    if (t is None or noise is None) and key is None:
        raise ValueError("key is required to draw t or the noise; got None")
    k_t, k_noise = jax.random.split(key) if key is not None else (None, None)
    if t is None:
        t, w = sample_t(sde, k_t, batch, eps=eps, antithetic=antithetic,
                        importance_sampling=importance_sampling)
    else:
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
        w = jnp.ones((batch,), jnp.float32)
    if noise is None:
        noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    elif jnp.shape(noise) != x0.shape:
        raise ValueError(f"noise must have x0's shape {x0.shape}, got {jnp.shape(noise)}")
    mean, std = sde.marginal_prob(x0, t)
    std = jnp.broadcast_to(std, (batch,))
    return x0, t, w, noise, mean + batch_broadcast(std, x0) * noise, std


def _apply(apply_fn, params, x_t, t, cond, shape):
    out = apply_fn(params, x_t, t, cond)
    if jnp.shape(out) != shape:
        raise ValueError(f"apply_fn must return an array shaped like x0 {shape}, got "
                         f"{jnp.shape(out)}")
    return out


def _reduce(err, reduce):
    err = err.astype(jnp.float32)
    return jnp.sum(err) if reduce == "sum" else jnp.mean(err)


def dsm_loss(
    apply_fn: Callable[[Any, jax.Array, jax.Array, Any], jax.Array],
    params: Any,
    sde,
    x0: jax.Array,
    key: jax.Array | None,
    cond: Any = None,
    *,
    weighting: str = "none",
    importance_sampling: bool = False,
    antithetic: bool = False,
    eps: float = 1e-5,
    reduce: str = "sum",
    t: jax.Array | None = None,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Denoising score matching for one batch.

    Args:
      apply_fn: ``apply_fn(params, x_t, t [B] float32, cond) -> score [B, ...]``.
      params: the network's parameters (differentiate the loss with respect to them).
      sde: a forward SDE (:mod:`jaxdiff.sde.sdes`).
      x0: ``[B, ...]`` data.
      key: draws ``t`` and the noise; may be ``None`` when both are given.
      cond: passed to ``apply_fn`` unchanged.
      weighting: ``"none"`` (``lambda = std^2``) or ``"likelihood"`` (``lambda = g^2``).
      importance_sampling: draw ``t ~ g^2 / std^2`` (needs ``weighting="likelihood"``).
      antithetic: pair uniforms ``u`` and ``1 - u`` in the batch.
      eps: the smallest time, in ``(0, T)``.
      reduce: ``"sum"`` or ``"mean"`` over the non-batch axes.
      t: optional fixed times ``[B]`` (or a scalar) in ``[eps, T]``.
      noise: optional fixed noise shaped like ``x0``.

    Returns:
      ``(loss, aux)``: the batch mean and ``{"per_example": [B], "t": [B], "weight": [B]}``
      (``weight`` is the importance weight, ones without importance sampling).

    Raises:
      ValueError: an unknown ``weighting`` / ``reduce``, ``eps`` outside ``(0, T)``,
        ``importance_sampling`` without likelihood weighting or with a given ``t``, no ``key``
        when something must be drawn, or shapes that disagree.
    """
    eps = _check_options(sde, weighting, reduce, eps, antithetic, importance_sampling, t)
    x0, t, w, z, x_t, std = _draw(sde, x0, key, t, noise, eps, antithetic, importance_sampling)
    score = _apply(apply_fn, params, x_t, t, cond, x0.shape)
    g2 = sde.diffusion(t) ** 2

    def per_example(s, z, std, g2, w):
        if weighting == "none":
            return w * _reduce(jnp.square(s * std + z), reduce)
        return w * g2 * _reduce(jnp.square(s + z / std), reduce)

    losses = jax.vmap(per_example)(score, z, std, g2, w)
    return jnp.mean(losses), {"per_example": losses, "t": t, "weight": w}


def eps_loss(
    apply_fn: Callable[[Any, jax.Array, jax.Array, Any], jax.Array],
    params: Any,
    sde,
    x0: jax.Array,
    key: jax.Array | None,
    cond: Any = None,
    *,
    weighting: str = "none",
    importance_sampling: bool = False,
    antithetic: bool = False,
    eps: float = 1e-5,
    reduce: str = "mean",
    t: jax.Array | None = None,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Continuous-time noise prediction ``|| eps(x_t, t) - z ||^2`` (times ``g^2 / std^2`` with
    ``weighting="likelihood"``). ``apply_fn(params, x_t, t, cond) -> eps [B, ...]``; everything
    else as :func:`dsm_loss` (the default reduction here is ``"mean"``, as
    :func:`jaxdiff.losses.diffusion_loss`)."""
    eps = _check_options(sde, weighting, reduce, eps, antithetic, importance_sampling, t)
    x0, t, w, z, x_t, std = _draw(sde, x0, key, t, noise, eps, antithetic, importance_sampling)
    pred = _apply(apply_fn, params, x_t, t, cond, x0.shape)
    lam = sde.diffusion(t) ** 2 / std**2 if weighting == "likelihood" else jnp.ones_like(std)

    def per_example(p, z, lam, w):
        return w * lam * _reduce(jnp.square(p - z), reduce)

    losses = jax.vmap(per_example)(pred, z, lam, w)
    return jnp.mean(losses), {"per_example": losses, "t": t, "weight": w}
