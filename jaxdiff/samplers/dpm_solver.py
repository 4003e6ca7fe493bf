"""DPM-Solver++ (Lu et al. 2022), multistep, first or second order, as one ``lax.scan``.

Semantics follow diffusers' ``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"``
(the data-prediction solver): timestep spacing, ``lower_order_final``, ``final_sigmas_type`` and the
``midpoint`` / ``heun`` second-order variants. The solver history (the previous step's predicted x0)
lives in the scan carry.

In the notation of the paper, with ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)`` and
``lambda_t = log(alpha_t / sigma_t)``, ``h = lambda_t - lambda_s``, the first-order update is
``x_t = sigma_t / sigma_s x_s - alpha_t (e^{-h} - 1) x0_s`` (DDIM), and the second-order multistep
update adds ``-1/2 alpha_t (e^{-h} - 1) D1`` (midpoint) with ``D1 = (x0_s - x0_{s'}) / r``.

The pieces follow the sampler contract (:mod:`jaxdiff.samplers`): :func:`dpm_solver_timesteps`
(the grid), :func:`dpm_solver_step` (one update; the multistep history lives in an explicit
:class:`DPMSolverState`, created by :func:`dpm_solver_init`) and :func:`dpm_solver_sample` (one
``lax.scan``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion import canonical_prediction_type, x0_and_eps
from jaxdiff.samplers.driver import checked_model, prepare_x_T, run_scan
from jaxdiff.samplers.timesteps import SPACINGS, Grid
from jaxdiff.schedules import Schedule
from jaxdiff.types import ModelFn
from jaxdiff.validation import check_bool, check_choice, check_clip, check_float, check_int

__all__ = [
    "FINAL_SIGMAS_TYPES",
    "SOLVER_TYPES",
    "DPMSolverState",
    "dpm_solver_timesteps",
    "dpm_solver_init",
    "dpm_solver_step",
    "dpm_solver_sample",
]

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
SOLVER_TYPES = ("midpoint", "heun")


def dpm_solver_timesteps(
    schedule: Schedule,
    num_steps: int,
    *,
    spacing: str = "linspace",
    steps_offset: int = 0,
    final_sigmas_type: str = "zero",
    lambda_min_clipped: float = -float("inf"),
) -> Grid:
    """DPM-Solver's :class:`~jaxdiff.samplers.timesteps.Grid`, as diffusers has it: timesteps
    ``[N]`` int32 (descending), their successors (``-1`` after the last) and sigmas ``[N + 1]``.

    The grid is ``DPMSolverMultistepScheduler.set_timesteps`` (diffusers 0.42) for ``spacing`` in
    ``"linspace"``, ``"leading"`` (plus ``steps_offset``) and ``"trailing"``. ``sigma = sqrt((1 -
    abar) / abar)`` at each timestep, followed by the final sigma: ``0`` (``final_sigmas_type
    = "zero"``, the last step returns the predicted x0) or the sigma of ``t = 0`` (``"sigma_min"``).
    ``lambda_min_clipped`` drops the noisiest timesteps whose log-SNR/2 ``lambda_t`` lies below it
    (diffusers recommends -5.1 for the cosine schedule, whose last ``alpha_t`` is so small that
    converting an eps prediction to x0 loses all float32 precision).

    ``N == num_steps`` except where diffusers itself differs: ``"trailing"`` with
    ``lambda_min_clipped`` keeps diffusers' step ``T / num_steps`` from the clipped start, so gives
    fewer steps; and diffusers' float ``arange`` sometimes overshoots to ``t = -1`` there, an entry
    dropped here (as :func:`~jaxdiff.samplers.timesteps.ddim_timesteps` does).

    Raises ``ValueError`` naming the argument unless the grid is strictly decreasing inside ``[0,
    T)``. With ``T'`` the training steps left after ``lambda_min_clipped`` (``T`` by default),
    ``"leading"`` and ``"linspace"`` need ``num_steps <= T' - 1``: beyond that diffusers repeats
    timesteps (``"leading"``: ``T' // (num_steps + 1) == 0`` puts every step at ``steps_offset``),
    the solver's ``h`` is 0 and its output NaN. ``"trailing"`` works for every ``num_steps <= T``.
    Also raised: ``steps_offset`` pushing a timestep to ``>= T``, ``lambda_min_clipped`` clipping
    every timestep.
    """
    T = schedule.num_timesteps
    n = check_int("num_steps", num_steps, 1)
    if n > T:
        raise ValueError(f"num_steps must be <= num_train_timesteps ({T}), got {n}")
    check_choice("spacing", spacing, SPACINGS)
    offset = check_int("steps_offset", steps_offset, 0)
    check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
    if lambda_min_clipped != -float("inf"):
        lambda_min_clipped = check_float("lambda_min_clipped", lambda_min_clipped)
    acp = np.asarray(schedule.alphas_cumprod, dtype=np.float64)
    lambdas = 0.5 * (np.log(acp) - np.log1p(-acp))
    last_t = T - int(np.searchsorted(lambdas[::-1], lambda_min_clipped))
    if last_t < 1:
        raise ValueError(
            f"lambda_min_clipped={lambda_min_clipped} clips every timestep (max lambda_t is "
            f"{lambdas.max():.3g})"
        )
    if spacing == "linspace":
        ts = np.linspace(0, last_t - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = last_t // (n + 1)
        ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + offset
    else:
        ts = np.arange(last_t, 0, -T / n).round().astype(np.int64) - 1
        ts = ts[ts >= 0]  # diffusers' float arange can overshoot to -1 (then np.interp clamps)
    if ts.size and ts[0] >= T:
        raise ValueError(
            f"steps_offset={offset} pushes the first timestep to {int(ts[0])} >= "
            f"num_train_timesteps={T}"
        )
    if np.any(np.diff(ts) >= 0):
        raise ValueError(
            f"num_steps={n} repeats timesteps with spacing={spacing!r} over {last_t} usable "
            f"training steps (diffusers repeats them; the solver's h = 0 gives NaN): use "
            f"num_steps <= {last_t - 1} or spacing='trailing'"
        )
    all_sigmas = np.sqrt((1 - acp) / acp)
    sigmas = all_sigmas[ts]  # == diffusers' np.interp at these integer timesteps
    last = 0.0 if final_sigmas_type == "zero" else all_sigmas[0]
    return Grid(
        ts.astype(np.int32),
        np.concatenate([ts[1:], [-1]]).astype(np.int32),
        np.concatenate([sigmas, [last]]).astype(np.float32),
    )


class DPMSolverState(NamedTuple):
    """The multistep history carried between :func:`dpm_solver_step` calls.

    Attributes:
      prev_x0: ``[B, ...]`` the previous step's data prediction (zeros before the first step).
      prev_sigma: scalar float32, the previous step's sigma (the first sigma before the first
        step; unused there, since the first step is first order).
    """

    prev_x0: jax.Array
    prev_sigma: jax.Array


def dpm_solver_init(x_T: jax.Array, sigma: jax.Array | float) -> DPMSolverState:
    """The empty history for a trajectory starting at ``x_T: [B, ...]`` with sigma ``sigma``."""
    return DPMSolverState(jnp.zeros(jnp.shape(x_T), jnp.result_type(x_T)), jnp.float32(sigma))


def _alpha_sigma_lambda(sigma):
    alpha = 1.0 / jnp.sqrt(sigma**2 + 1.0)
    sig = sigma * alpha
    return alpha, sig, jnp.log(alpha) - jnp.log(sig)


def dpm_solver_step(
    state: DPMSolverState,
    model_output: jax.Array,
    x: jax.Array,
    sigma: jax.Array | float,
    sigma_next: jax.Array | float,
    *,
    first_order: bool | jax.Array,
    prediction_type: str = "eps",
    solver_type: str = "midpoint",
    clip_x0: float | None = None,
) -> tuple[DPMSolverState, jax.Array, jax.Array]:
    """One DPM-Solver++ update from sigma ``sigma`` to ``sigma_next``
    (``DPMSolverMultistepScheduler.step`` with ``algorithm_type="dpmsolver++"``).

    Args:
      state: the history (:func:`dpm_solver_init` before the first step).
      model_output: ``[B, ...]`` eps, x0 or v by ``prediction_type``, at ``x``.
      x: ``[B, ...]`` the current sample (at least float32).
      sigma: scalar ``sqrt((1 - abar) / abar)`` of the current timestep.
      sigma_next: scalar, of the next one (``0``: return the predicted x0).
      first_order: the first-order (DDIM) update instead of the second-order multistep one; a
        bool or a traced bool scalar. Must be true on the first step (no history yet).
      prediction_type: ``"eps"``, ``"x0"`` or ``"v"`` (or diffusers' names).
      solver_type: ``"midpoint"`` or ``"heun"`` form of the second-order update.
      clip_x0: clip the data prediction to ``[-clip_x0, clip_x0]``; ``None`` for no clipping.

    Returns:
      ``(state, x_next, pred_x0)``: the updated history, ``x_next: [B, ...]`` in ``x``'s dtype and
      the data prediction ``[B, ...]``.
    """
    kind = canonical_prediction_type(prediction_type)
    check_choice("solver_type", solver_type, SOLVER_TYPES)
    clip_x0 = check_clip(clip_x0)
    if jnp.shape(model_output) != jnp.shape(x):
        raise ValueError(f"model_output must have x's shape {jnp.shape(x)}, got "
                         f"{jnp.shape(model_output)}")
    out = model_output.astype(x.dtype)  # a bf16 model output joins the >= float32 carry
    alpha_s0, sig_s0, lam_s0 = _alpha_sigma_lambda(jnp.float32(sigma))
    alpha_t, sig_t, lam_t = _alpha_sigma_lambda(jnp.float32(sigma_next))
    _, _, lam_s1 = _alpha_sigma_lambda(state.prev_sigma)
    x0, _ = x0_and_eps(out, x, alpha_s0, sig_s0, kind)
    if clip_x0 is not None:
        x0 = jnp.clip(x0, -clip_x0, clip_x0)
    h = lam_t - lam_s0
    phi = jnp.expm1(-h)  # e^{-h} - 1, accurate for small h
    x_first = (sig_t / sig_s0) * x - alpha_t * phi * x0
    r0 = (lam_s0 - lam_s1) / h
    d1 = (x0 - state.prev_x0) / r0
    if solver_type == "midpoint":
        x_second = x_first - 0.5 * alpha_t * phi * d1
    else:
        x_second = x_first + alpha_t * (phi / h + 1.0) * d1
    x_next = jnp.where(first_order, x_first, x_second).astype(x.dtype)
    return DPMSolverState(x0, jnp.float32(sigma)), x_next, x0


def dpm_solver_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array | None = None,
    *,
    num_steps: int,
    solver_order: int = 2,
    solver_type: str = "midpoint",
    prediction_type: str = "eps",
    spacing: str = "linspace",
    steps_offset: int = 0,
    lower_order_final: bool = True,
    final_sigmas_type: str = "zero",
    lambda_min_clipped: float = -float("inf"),
    clip_x0: float | None = None,
    return_trajectory: bool = False,
):
    """Deterministic DPM-Solver++ sampling from ``x_T: [B, ...]`` in one ``lax.scan``.

    Args:
      model_fn: ``model_fn(x [B, ...], t [B] int32) -> output [B, ...]`` of ``prediction_type``.
      schedule: the training schedule.
      x_T: ``[B, ...]`` the starting noise, carried in at least float32.
      key: accepted and unused (this solver is deterministic; may be ``None``), so that every
        sampler has the signature ``(model_fn, schedule, x_T, key, *, num_steps, ...)``.
      num_steps: number of model evaluations (10-25 is typical).
      solver_order: 1 (DDIM) or 2 (DPM-Solver++(2M)).
      solver_type: ``"midpoint"`` or ``"heun"`` form of the second-order update.
      prediction_type: ``"eps"``, ``"x0"`` or ``"v"``.
      spacing, steps_offset, final_sigmas_type, lambda_min_clipped: see
        :func:`dpm_solver_timesteps`.
      lower_order_final: use lower orders on the last steps when ``num_steps < 15``.
      clip_x0: clip the predicted x0 to ``[-clip_x0, clip_x0]`` (None: no clipping).
      return_trajectory: also return the path.

    Returns:
      ``x_0`` ``[B, ...]`` float32 (or wider), or with ``return_trajectory`` ``(x_0, xs [N + 1,
      B, ...], pred_x0s [N, B, ...])`` (``xs[0]`` is ``x_T``), as the other samplers return.

    Raises:
      ValueError: naming the argument, for a bad grid or option or a mis-shaped model output.
    """
    kind = canonical_prediction_type(prediction_type)
    solver_order = check_int("solver_order", solver_order, 1, 2)
    check_choice("solver_type", solver_type, SOLVER_TYPES)
    lower_order_final = check_bool("lower_order_final", lower_order_final)
    clip_x0 = check_clip(clip_x0)
    x_T = prepare_x_T(x_T)
    grid = dpm_solver_timesteps(
        schedule, num_steps, spacing=spacing, steps_offset=steps_offset,
        final_sigmas_type=final_sigmas_type, lambda_min_clipped=lambda_min_clipped,
    )
    ts, sigmas = grid.timesteps, grid.sigmas
    n = len(ts)
    # Which steps use the first-order update (diffusers' lower_order_final / warm-up rules).
    idx = np.arange(n)
    first = (idx == 0) | (solver_order == 1)
    first |= (idx == n - 1) & ((lower_order_final and n < 15) or final_sigmas_type == "zero")
    # A step that does not move (sigma_min after a grid ending at t = 0): first order returns x
    # exactly, where the second-order heun update would divide 0 by h = 0.
    first |= sigmas[1:] == sigmas[:-1]
    model = checked_model(model_fn, x_T.shape)
    ts_j, sig_j, first_j = jnp.asarray(ts), jnp.asarray(sigmas), jnp.asarray(first)

    def body(state, x, i, z):
        return dpm_solver_step(
            state, model(x, ts_j[i]), x, sig_j[i], sig_j[i + 1], first_order=first_j[i],
            prediction_type=kind, solver_type=solver_type, clip_x0=clip_x0,
        )

    return run_scan(body, dpm_solver_init(x_T, sigmas[0]), x_T, key, n, stochastic=False,
                    return_trajectory=return_trajectory)
