"""The probability-flow ODE ``dx/dt = f(x, t) - g(t)^2 s(x, t) / 2`` (Song et al. 2021, eq. 13):
deterministic sampling (``T -> eps``) and encoding (``eps -> T``).

Two kinds of solver, for a state ``y: [B, ...]``:

- fixed-step (``"euler"``, ``"heun"``, ``"rk4"``) on the grid ``linspace(t0, t1, num_steps + 1)``,
  one ``lax.scan`` on the shared driver (:func:`jaxdiff.samplers.driver.run_scan`): jit-, vmap- and
  grad-friendly, ``num_steps`` (Euler), ``2 num_steps`` (Heun) or ``4 num_steps`` (RK4) score
  evaluations;
- adaptive (``"tsit5"``, ``"dopri5"``, ``"dopri8"``) with ``diffrax``'s embedded Runge-Kutta
  pairs and a PID step-size controller on ``rtol``/``atol`` (``score_sde`` uses scipy's RK45 with
  ``rtol = atol = 1e-5``); the number of steps is data-dependent, at most ``max_steps``.

    >>> import jax, jax.numpy as jnp
    >>> from jaxdiff.sde import VPSDE
    >>> sde = VPSDE()
    >>> score_fn = lambda x, t: -x             # the score of N(0, I) data under VP
    >>> x_T = sde.prior_sampling(jax.random.key(0), (4, 2))
    >>> ode_sample(score_fn, sde, x_T, num_steps=20, solver="rk4").shape
    (4, 2)

An adaptive solve returns its statistics too::

    x0, stats = ode_sample(score_fn, sde, x_T, solver="tsit5", rtol=1e-5, atol=1e-5)
    stats["num_steps"]       # accepted + rejected steps, an int32 array
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.samplers.driver import prepare_x_T, run_scan
from jaxdiff.sde.sdes import ScoreFn
from jaxdiff.validation import check_bool, check_choice, check_float, check_int

__all__ = [
    "FIXED_SOLVERS",
    "ADAPTIVE_SOLVERS",
    "ODE_SOLVERS",
    "probability_flow_drift",
    "fixed_step",
    "integrate",
    "ode_sample",
    "ode_encode",
]

FIXED_SOLVERS = ("euler", "heun", "rk4")
ADAPTIVE_SOLVERS = ("tsit5", "dopri5", "dopri8")
ODE_SOLVERS = FIXED_SOLVERS + ADAPTIVE_SOLVERS

_tmap = jax.tree.map


def probability_flow_drift(sde, score_fn: ScoreFn, x: jax.Array, t: jax.Array) -> jax.Array:
    """``f(x, t) - g(t)^2 s(x, t) / 2``, ``[B, ...]``; ``t`` a scalar or ``[B]``."""
    return sde.reverse(score_fn, probability_flow=True).sde(x, t)[0]


def fixed_step(fn: Callable[[jax.Array, Any], Any], y: Any, t: jax.Array, h: jax.Array,
               solver: str) -> Any:
    """One step ``y(t) -> y(t + h)`` of ``dy/dt = fn(t, y)`` (a pytree ``y``) by Euler, Heun
    (explicit trapezoid) or classical RK4."""
    add = lambda a, *bs: _tmap(lambda a, *b: a + sum(b), a, *bs)  # noqa: E731
    scale = lambda c, k: _tmap(lambda v: c * v, k)  # noqa: E731
    k1 = fn(t, y)
    if solver == "euler":
        return add(y, scale(h, k1))
    if solver == "heun":
        k2 = fn(t + h, add(y, scale(h, k1)))
        return add(y, scale(h / 2, k1), scale(h / 2, k2))
    k2 = fn(t + h / 2, add(y, scale(h / 2, k1)))
    k3 = fn(t + h / 2, add(y, scale(h / 2, k2)))
    k4 = fn(t + h, add(y, scale(h, k3)))
    return add(y, scale(h / 6, k1), scale(h / 3, k2), scale(h / 3, k3), scale(h / 6, k4))


def _adaptive(fn, y0, t0, t1, *, solver, rtol, atol, max_steps):
    try:
        import diffrax
    except ImportError as e:  # pragma: no cover - diffrax is a core dependency
        raise ImportError(f"solver={solver!r} needs diffrax (pip install diffrax)") from e
    solvers = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5, "dopri8": diffrax.Dopri8}
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: fn(t, y)), solvers[solver](), t0, t1, None, y0,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(t1=True), max_steps=max_steps,
    )
    y1 = _tmap(lambda v: v[-1], sol.ys)
    stats = {k: sol.stats[k] for k in ("num_steps", "num_accepted_steps", "num_rejected_steps")}
    return y1, stats


def integrate(fn: Callable[[jax.Array, jax.Array], jax.Array], y0: jax.Array, t0: float,
              t1: float, *, solver: str = "rk4", num_steps: int = 100, rtol: float = 1e-5,
              atol: float = 1e-5, max_steps: int = 4096):
    """Solve ``dy/dt = fn(t, y)`` for ``y: [B, ...]`` floating from ``t0`` to ``t1`` (either
    direction); ``t`` is a float32 scalar. A fixed-step solver is one ``lax.scan`` on
    :func:`~jaxdiff.samplers.driver.run_scan` (``y`` is its carry); an adaptive one is a
    ``diffrax.diffeqsolve``.

    Returns ``(y1, stats)``: ``stats`` is ``{"num_steps": int32}`` for a fixed-step solver and
    adds ``num_accepted_steps`` / ``num_rejected_steps`` for an adaptive one.

    Raises ``ValueError`` for an unknown solver, ``num_steps`` / ``max_steps`` < 1 or ``rtol`` /
    ``atol`` <= 0.
    """
    check_choice("solver", solver, ODE_SOLVERS)
    y0 = prepare_x_T(y0)
    if solver in ADAPTIVE_SOLVERS:
        rtol = check_float("rtol", rtol, minimum=0.0, exclusive_minimum=True)
        atol = check_float("atol", atol, minimum=0.0, exclusive_minimum=True)
        max_steps = check_int("max_steps", max_steps, minimum=1)
        return _adaptive(fn, y0, float(t0), float(t1), solver=solver, rtol=rtol, atol=atol,
                         max_steps=max_steps)
    num_steps = check_int("num_steps", num_steps, minimum=1)
    ts = jnp.asarray(np.linspace(t0, t1, num_steps + 1).astype(np.float32))

    def body(state, y, i, _):
        return state, fixed_step(fn, y, ts[i], ts[i + 1] - ts[i], solver), None

    y1 = run_scan(body, None, y0, None, num_steps, stochastic=False)
    return y1, {"num_steps": jnp.int32(num_steps)}


def _check_common(sde, eps, solver):
    check_choice("solver", solver, ODE_SOLVERS)
    return check_float("eps", eps, minimum=0.0, maximum=sde.T, exclusive_minimum=True,
                       exclusive_maximum=True)


def ode_sample(score_fn: ScoreFn, sde, x_T: jax.Array, *, solver: str = "rk4",
               num_steps: int = 100, eps: float = 1e-3, rtol: float = 1e-5, atol: float = 1e-5,
               max_steps: int = 4096, return_stats: bool | None = None):
    """Sample by integrating the probability-flow ODE from ``T`` down to ``eps``.

    Args:
      score_fn: ``score_fn(x [B, ...], t [B] float32) -> [B, ...]``.
      sde: a forward SDE.
      x_T: ``[B, ...]`` a prior draw (``sde.prior_sampling``); carried in at least float32.
      solver: one of :data:`ODE_SOLVERS`.
      num_steps: steps of a fixed-step solver.
      eps: the final time, in ``(0, T)``.
      rtol, atol, max_steps: an adaptive solver's tolerances and step budget.
      return_stats: also return the solver's statistics (default: for adaptive solvers).

    Returns:
      ``x_0 [B, ...]``, or ``(x_0, stats)`` (see :func:`integrate`).

    Raises:
      ValueError: an unknown solver, ``eps`` outside ``(0, T)``, invalid step counts or
        tolerances, or a ``score_fn`` output of the wrong shape.
    """
    eps = _check_common(sde, eps, solver)
    if return_stats is None:
        return_stats = solver in ADAPTIVE_SOLVERS
    return_stats = check_bool("return_stats", return_stats)
    x_T = prepare_x_T(x_T)

    def fn(t, x):
        return probability_flow_drift(sde, score_fn, x, t)

    x0, stats = integrate(fn, x_T, sde.T, eps, solver=solver, num_steps=num_steps,
                               rtol=rtol, atol=atol, max_steps=max_steps)
    return (x0, stats) if return_stats else x0


def ode_encode(score_fn: ScoreFn, sde, x: jax.Array, *, solver: str = "rk4",
               num_steps: int = 100, eps: float = 1e-3, rtol: float = 1e-5, atol: float = 1e-5,
               max_steps: int = 4096):
    """Map data ``x [B, ...]`` (at time ``eps``) to its latent at ``T`` along the
    probability-flow ODE. Arguments as :func:`ode_sample`; returns ``(z [B, ...], stats)``."""
    eps = _check_common(sde, eps, solver)
    x = prepare_x_T(x)

    def fn(t, x):
        return probability_flow_drift(sde, score_fn, x, t)

    z, stats = integrate(fn, x, eps, sde.T, solver=solver, num_steps=num_steps,
                              rtol=rtol, atol=atol, max_steps=max_steps)
    return z, stats
