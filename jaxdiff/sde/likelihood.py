"""Exact log-likelihoods through the probability-flow ODE (Song et al. 2021, Sec. 4.3 and
App. D.2; ``score_sde``'s ``likelihood.py``), and bits per dimension.

Along the ODE ``dx/dt = f~(x, t)`` the log-density obeys ``d log p_t(x(t)) / dt = -div f~``, so

    log p_eps(x) = log p_T(x(T)) + int_eps^T div f~(x(t), t) dt

with ``p_T`` replaced by the prior. The state ``(x, delta_logp)`` is integrated from ``eps`` to
``T`` by :func:`jaxdiff.sde.ode.integrate` (packed into one ``[B, D + 1]`` array). The divergence
is Hutchinson's estimate ``E[v^T (d f~ / dx) v]`` with one probe ``v`` per example, fixed for the
whole solve (Rademacher ``+-1`` or standard Gaussian), the Jacobian-vector product taken by
``jax.jvp`` (forward mode, the default) or ``jax.vjp`` (reverse mode); ``probe="exact"`` takes the
exact trace with ``D`` Jacobian-vector products (for low-dimensional data).

Bits per dimension follow ``score_sde``: ``-log p / (D log 2)`` plus the offset of the
dequantisation, ``log2(num_bins / data_width)`` (7 for 256 levels in ``[-1, 1]``, 8 in
``[0, 1]``): the continuous density of uniformly dequantised data over bins of width
``data_width / num_bins`` bounds the discrete model's log-probability.

    >>> import jax, jax.numpy as jnp
    >>> from jaxdiff.sde import VPSDE
    >>> sde = VPSDE()
    >>> score_fn = lambda x, t: -x              # data N(0, I): its score under VP at every t
    >>> res = ode_likelihood(score_fn, sde, jnp.zeros((2, 3)), jax.random.key(0), solver="rk4",
    ...                      num_steps=50)
    >>> res.logp.shape, res.z.shape
    ((2,), (2, 3))
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff.sde.ode import ADAPTIVE_SOLVERS, integrate, probability_flow_drift
from jaxdiff.sde.sdes import ScoreFn
from jaxdiff.validation import check_batched, check_choice, check_float

__all__ = [
    "PROBES",
    "DIVERGENCE_MODES",
    "LikelihoodResult",
    "hutchinson_probe",
    "divergence",
    "ode_likelihood",
    "bits_per_dim",
    "uniform_dequantize",
]

PROBES = ("rademacher", "gaussian", "exact")
DIVERGENCE_MODES = ("jvp", "vjp")
_LOG2 = math.log(2.0)


class LikelihoodResult(NamedTuple):
    """``logp [B]`` (nats, ``prior_logp + delta_logp``), ``delta_logp [B]`` (the integral of the
    divergence), ``prior_logp [B]``, ``z [B, ...]`` (the latent at ``T``) and the solver's
    ``stats``."""

    logp: jax.Array
    delta_logp: jax.Array
    prior_logp: jax.Array
    z: jax.Array
    stats: dict


def hutchinson_probe(key: jax.Array, shape: tuple, kind: str = "rademacher",
                     dtype=jnp.float32) -> jax.Array:
    """A Hutchinson probe ``[*shape]``: ``+-1`` with equal probability (``"rademacher"``) or
    standard normal (``"gaussian"``); both have ``E[v v^T] = I``."""
    check_choice("kind", kind, PROBES[:2])
    if kind == "gaussian":
        return jax.random.normal(key, shape, dtype)
    return jax.random.rademacher(key, shape, dtype)


def _sum_flat(v: jax.Array) -> jax.Array:
    return jnp.sum(v.reshape(v.shape[0], -1), axis=-1)


def divergence(fn: Callable[[jax.Array], jax.Array], x: jax.Array, probe: jax.Array | None, *,
               mode: str = "jvp", exact: bool = False) -> tuple[jax.Array, jax.Array]:
    """``(fn(x), div)`` for a per-example map ``fn: [B, ...] -> [B, ...]``.

    ``div [B]`` is Hutchinson's ``v^T J v`` for the probe ``v = probe [B, ...]`` (by ``jax.jvp`` or
    ``jax.vjp``, per ``mode``), or with ``exact`` the trace of each example's Jacobian from ``D``
    forward-mode products (``probe`` unused). Examples must not interact inside ``fn`` (the
    probe's cross-example terms would enter the estimate).
    """
    check_choice("mode", mode, DIVERGENCE_MODES)
    if exact:
        d = math.prod(x.shape[1:])
        eye = jnp.eye(d, dtype=x.dtype).reshape((d, 1) + x.shape[1:])

        def column(e):
            return jax.jvp(fn, (x,), (jnp.broadcast_to(e, x.shape),))[1]

        jcols = jax.lax.map(column, eye)                                  # [D, B, ...]
        diag = jnp.diagonal(jcols.reshape(d, x.shape[0], d), axis1=0, axis2=2)   # [B, D]
        return fn(x), jnp.sum(diag, axis=-1)
    if mode == "jvp":
        out, jv = jax.jvp(fn, (x,), (probe,))
        return out, _sum_flat(jv * probe)
    out, pullback = jax.vjp(fn, x)
    (vj,) = pullback(probe)
    return out, _sum_flat(vj * probe)


def ode_likelihood(
    score_fn: ScoreFn,
    sde,
    x: jax.Array,
    key: jax.Array | None,
    *,
    probe: str = "rademacher",
    mode: str = "jvp",
    eps: float = 1e-5,
    solver: str = "tsit5",
    num_steps: int = 100,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
) -> LikelihoodResult:
    """``log p_eps(x)`` under the probability-flow ODE of ``sde`` with ``score_fn``.

    Args:
      score_fn: ``score_fn(x [B, ...], t [B] float32) -> [B, ...]``, per example.
      sde: a forward SDE.
      x: ``[B, ...]`` data (float; carried in at least float32).
      key: draws the Hutchinson probe (``None`` only with ``probe="exact"``).
      probe: ``"rademacher"``, ``"gaussian"`` or ``"exact"`` (``D`` JVPs per evaluation).
      mode: ``"jvp"`` or ``"vjp"``, how ``v^T J v`` is formed.
      eps: the start time, in ``(0, T)`` (``score_sde`` uses ``1e-5``).
      solver, num_steps, rtol, atol, max_steps: as :func:`jaxdiff.sde.ode.integrate`.

    Returns:
      A :class:`LikelihoodResult`.

    Raises:
      ValueError: an unknown probe / mode / solver, ``eps`` outside ``(0, T)``, no ``key`` for a
        random probe, or a ``score_fn`` output of the wrong shape.
    """
    check_choice("probe", probe, PROBES)
    check_choice("mode", mode, DIVERGENCE_MODES)
    check_choice("solver", solver, tuple(ADAPTIVE_SOLVERS) + ("euler", "heun", "rk4"))
    eps = check_float("eps", eps, minimum=0.0, maximum=sde.T, exclusive_minimum=True,
                      exclusive_maximum=True)
    x = check_batched("x", x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating-point array, got dtype {x.dtype}")
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    exact = probe == "exact"
    if not exact and key is None:
        raise ValueError(f"key is required to draw the {probe} probe, got None")
    v = None if exact else hutchinson_probe(key, x.shape, probe, x.dtype)
    batch, shape = x.shape[0], x.shape
    d = math.prod(shape[1:])

    def fn(t, y):
        xt = y[:, :d].reshape(shape)
        drift, div = divergence(lambda u: probability_flow_drift(sde, score_fn, u, t), xt, v,
                                mode=mode, exact=exact)
        return jnp.concatenate([drift.reshape(batch, d), div[:, None]], axis=1)

    y0 = jnp.concatenate([x.reshape(batch, d), jnp.zeros((batch, 1), x.dtype)], axis=1)
    y1, stats = integrate(fn, y0, eps, sde.T, solver=solver, num_steps=num_steps, rtol=rtol,
                          atol=atol, max_steps=max_steps)
    z, delta = y1[:, :d].reshape(shape), y1[:, d]
    prior = sde.prior_logp(z)
    return LikelihoodResult(prior + delta, delta, prior, z, stats)


def bits_per_dim(logp: jax.Array, num_dims: int, *, num_bins: int = 256,
                 data_width: float = 2.0) -> jax.Array:
    """``-logp / (num_dims log 2) + log2(num_bins / data_width)``: bits per dimension of data
    quantised to ``num_bins`` levels over an interval of width ``data_width`` (2 for ``[-1, 1]``,
    1 for ``[0, 1]``), from the log-density ``logp [B]`` (nats) of the dequantised data."""
    if num_dims < 1 or num_bins < 1 or not data_width > 0:
        raise ValueError(f"num_dims and num_bins must be >= 1 and data_width > 0, got "
                         f"num_dims={num_dims}, num_bins={num_bins}, data_width={data_width}")
    return -logp / (num_dims * _LOG2) + math.log2(num_bins / data_width)


def uniform_dequantize(key: jax.Array, x: jax.Array, *, num_bins: int = 256,
                       centered: bool = True) -> jax.Array:
    """Integer data ``x`` in ``{0 .. num_bins - 1}`` plus ``U[0, 1)`` noise, scaled to ``[0, 1]``
    (``(x + u) / num_bins``) or, with ``centered``, to ``[-1, 1]``; float32, ``x``'s shape."""
    u = jax.random.uniform(key, jnp.shape(x), jnp.float32)
    y = (jnp.asarray(x, jnp.float32) + u) / num_bins
    return 2.0 * y - 1.0 if centered else y
