"""DPM-Solver and DPM-Solver++ (Lu et al. 2022), multistep, orders 1-3, ODE or SDE, as one
``lax.scan``.

Semantics follow diffusers' ``DPMSolverMultistepScheduler`` (0.42): the four ``algorithm_type``s
(``"dpmsolver++"``, ``"sde-dpmsolver++"`` and the noise-prediction forms ``"dpmsolver"``,
``"sde-dpmsolver"``), timestep spacing, Karras / exponential / beta / Lu sigma schedules,
``lower_order_final``, ``euler_at_final``, ``final_sigmas_type`` and the ``midpoint`` / ``heun``
second-order variants. Not covered: dynamic thresholding (``clip_x0`` is static clipping), flow
sigmas, learned-variance model outputs.

In the notation of the paper, with ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)`` and
``lambda_t = log(alpha_t / sigma_t)``, ``h = lambda_t - lambda_s``, the first-order update is
``x_t = sigma_t / sigma_s x_s - alpha_t (e^{-h} - 1) x0_s`` (DDIM), and the second-order multistep
update adds ``-1/2 alpha_t (e^{-h} - 1) D1`` (midpoint) with ``D1 = (x0_s - x0_{s'}) / r``; the
third-order one (DPM-Solver++(3M)) also uses the step before that. The SDE form
``"sde-dpmsolver++"`` (k-diffusion's "DPM++ 2M SDE") scales ``x`` by ``e^{-h}`` more and adds
``sigma_t sqrt(1 - e^{-2h}) z`` per step.

The pieces follow the sampler contract (:mod:`jaxdiff.samplers`): :func:`dpm_solver_timesteps`
(the grid), :func:`dpm_solver_step` (one update; the multistep history lives in an explicit
:class:`DPMSolverState`, created by :func:`dpm_solver_init`) and :func:`dpm_solver_sample` (one
``lax.scan``). :data:`DPM_SOLVER` declares it (with the ``dpmpp_*`` presets and its diffusers
twin, ``DPMSolverMultistepScheduler``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion import canonical_prediction_type, x0_and_eps
from jaxdiff.samplers.diffusers_names import (
    THRESHOLD_KEYS,
    config_key,
    prediction_option,
    sigma_schedule_option,
)
from jaxdiff.samplers.driver import (
    check_start_step,
    checked_model,
    prepare_x_T,
    run_scan,
    strength_start_step,
)
from jaxdiff.samplers.sigmas import (
    alpha_sigma_lambda,
    beta_sigmas,
    exponential_sigmas,
    karras_sigmas,
    sigma_to_t,
    train_sigmas,
)
from jaxdiff.samplers.spec import DiffusersTwin, SamplerSpec
from jaxdiff.samplers.timesteps import SPACINGS, Grid
from jaxdiff.schedules import Schedule
from jaxdiff.types import ModelFn
from jaxdiff.validation import (
    check_bool,
    check_choice,
    check_clip,
    check_float,
    check_int,
    concrete,
)

__all__ = [
    "DPM_ALGORITHM_TYPES",
    "FINAL_SIGMAS_TYPES",
    "DPM_SIGMA_SCHEDULES",
    "SOLVER_TYPES",
    "DPMSolverState",
    "dpm_solver_timesteps",
    "dpm_solver_init",
    "dpm_solver_orders",
    "dpm_solver_updates",
    "dpm_solver_step",
    "dpm_solver_sample",
    "DPM_SOLVER",
    "SPECS",
]

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
SOLVER_TYPES = ("midpoint", "heun")
DPM_ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
# "lu": uniform in lambda_t (diffusers' use_lu_lambdas), i.e. log-linear sigmas like
# "exponential", but computed and rounded to timesteps as diffusers does for Lu's schedule.
DPM_SIGMA_SCHEDULES = ("discrete", "karras", "exponential", "beta", "lu")


def _sigma_schedule_grid(
    schedule: Schedule, n: int, sigma_schedule: str, round_timesteps: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``(timesteps [n] int64, sigmas [n] float64)`` of a non-discrete sigma schedule, spanning the
    whole training range (``sigma_{T-1}`` down to ``sigma_0``) as ``set_timesteps`` does."""
    train = train_sigmas(schedule)  # float32 values, as diffusers computes them
    log_train = np.log(train.astype(np.float32))  # float32 logs, as diffusers' _sigma_to_t reads
    lo, hi = train[0], train[-1]
    if sigma_schedule == "karras":
        sigmas = karras_sigmas(lo, hi, n)
    elif sigma_schedule == "exponential":
        sigmas = exponential_sigmas(lo, hi, n)
    elif sigma_schedule == "beta":
        sigmas = beta_sigmas(lo, hi, n)
    else:  # "lu": diffusers' _convert_to_lu, linear in the float32 log-sigmas (rho = 1)
        top, bottom = float(log_train[-1]), float(log_train[0])
        sigmas = np.exp(top + np.linspace(0, 1, n) * (bottom - top))
    ts = sigma_to_t(sigmas, log_train)
    # diffusers rounds the Karras / Lu timesteps (except for beta_schedule="squaredcos_cap_v2"),
    # and casts the others to int64, which truncates.
    if round_timesteps and sigma_schedule in ("karras", "lu"):
        ts = ts.round()
    return ts.astype(np.int64), sigmas


def dpm_solver_timesteps(
    schedule: Schedule,
    num_steps: int,
    *,
    spacing: str = "linspace",
    steps_offset: int = 0,
    final_sigmas_type: str = "zero",
    lambda_min_clipped: float = -float("inf"),
    sigma_schedule: str = "discrete",
    round_timesteps: bool = True,
) -> Grid:
    """DPM-Solver's :class:`~jaxdiff.samplers.timesteps.Grid`, as diffusers has it: timesteps
    ``[N]`` int32 (descending), their successors (``-1`` after the last) and sigmas ``[N + 1]``.

    The grid is ``DPMSolverMultistepScheduler.set_timesteps`` (diffusers 0.42). With
    ``sigma_schedule="discrete"`` (the default), the timesteps are spaced by ``spacing`` in
    ``"linspace"``, ``"leading"`` (plus ``steps_offset``) and ``"trailing"``, with ``sigma =
    sqrt((1 - abar) / abar)`` at each. ``lambda_min_clipped`` drops the noisiest timesteps whose
    log-SNR/2 ``lambda_t`` lies below it (diffusers recommends -5.1 for the cosine schedule, whose
    last ``alpha_t`` is so small that converting an eps prediction to x0 loses all float32
    precision).

    With ``sigma_schedule`` in ``"karras"`` (rho = 7), ``"exponential"``, ``"beta"`` (alpha = beta
    = 0.6) or ``"lu"`` (uniform in ``lambda_t``), ``num_steps`` sigmas run from the largest
    training sigma to the smallest (``spacing``, ``steps_offset`` and ``lambda_min_clipped`` are
    then validated but, as in diffusers, do not matter), and each step's model timestep is the
    interpolated :func:`~jaxdiff.samplers.sigmas.sigma_to_t`, rounded for ``"karras"`` and
    ``"lu"`` when ``round_timesteps`` (diffusers rounds them unless its ``beta_schedule`` is
    ``"squaredcos_cap_v2"``: pass ``round_timesteps=False`` there), truncated otherwise. These
    timesteps may repeat; the sigmas do not.

    The final sigma follows: ``0`` (``final_sigmas_type = "zero"``, the last step returns the
    predicted x0) or the sigma of ``t = 0`` (``"sigma_min"``). The sigmas are float32 values
    computed from float32 ``alphas_cumprod`` as diffusers computes them.

    ``N == num_steps`` except where diffusers itself differs: ``"trailing"`` with
    ``lambda_min_clipped`` keeps diffusers' step ``T / num_steps`` from the clipped start, so gives
    fewer steps; and diffusers' float ``arange`` sometimes overshoots to ``t = -1`` there, an entry
    dropped here (as :func:`~jaxdiff.samplers.timesteps.ddim_timesteps` does).

    Raises ``ValueError`` naming the argument for an unknown option, and for a discrete grid
    unless it is strictly decreasing inside ``[0, T)``. With ``T'`` the training steps left after
    ``lambda_min_clipped`` (``T`` by default), ``"leading"`` and ``"linspace"`` need ``num_steps <=
    T' - 1``: beyond that diffusers repeats timesteps (``"leading"``: ``T' // (num_steps + 1) ==
    0`` puts every step at ``steps_offset``), the solver's ``h`` is 0 and its output NaN.
    ``"trailing"`` works for every ``num_steps <= T``. Also raised: ``steps_offset`` pushing a
    timestep to ``>= T``, ``lambda_min_clipped`` clipping every timestep.
    """
    T = schedule.num_timesteps
    n = check_int("num_steps", num_steps, 1)
    if n > T:
        raise ValueError(f"num_steps must be <= num_train_timesteps ({T}), got {n}")
    check_choice("spacing", spacing, SPACINGS)
    offset = check_int("steps_offset", steps_offset, 0)
    check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
    check_choice("sigma_schedule", sigma_schedule, DPM_SIGMA_SCHEDULES)
    round_timesteps = check_bool("round_timesteps", round_timesteps)
    if lambda_min_clipped != -float("inf"):
        lambda_min_clipped = check_float("lambda_min_clipped", lambda_min_clipped)
    all_sigmas = train_sigmas(schedule)
    last = 0.0 if final_sigmas_type == "zero" else all_sigmas[0]
    if sigma_schedule != "discrete":
        ts, sigmas = _sigma_schedule_grid(schedule, n, sigma_schedule, round_timesteps)
        return Grid(
            ts.astype(np.int32),
            np.concatenate([ts[1:], [-1]]).astype(np.int32),
            np.concatenate([sigmas, [last]]).astype(np.float32),
        )
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
    sigmas = all_sigmas[ts]  # == diffusers' np.interp at these integer timesteps
    return Grid(
        ts.astype(np.int32),
        np.concatenate([ts[1:], [-1]]).astype(np.int32),
        np.concatenate([sigmas, [last]]).astype(np.float32),
    )


class DPMSolverState(NamedTuple):
    """The multistep history carried between :func:`dpm_solver_step` calls.

    The solver's "model outputs" are data predictions (x0) for ``"dpmsolver++"`` /
    ``"sde-dpmsolver++"`` and noise predictions (eps) for ``"dpmsolver"`` / ``"sde-dpmsolver"``.

    Attributes:
      prev_x0: ``[B, ...]`` the previous step's converted model output (zeros before the first
        step).
      prev_sigma: scalar float32, the previous step's sigma (the first sigma before the first
        step; unused there, since the first step is first order).
      older_x0: ``[B, ...]`` the converted model output of the step before that (third order only;
        ``None`` in a two-field state, which then supports orders 1 and 2 only).
      older_sigma: scalar float32, its sigma (``None`` with ``older_x0``).
    """

    prev_x0: jax.Array
    prev_sigma: jax.Array
    older_x0: jax.Array | None = None
    older_sigma: jax.Array | None = None


def dpm_solver_init(x_T: jax.Array, sigma: jax.Array | float) -> DPMSolverState:
    """The empty history (for every order) of a trajectory starting at ``x_T: [B, ...]`` with
    sigma ``sigma``."""
    zeros = jnp.zeros(jnp.shape(x_T), jnp.result_type(x_T))
    return DPMSolverState(zeros, jnp.float32(sigma), zeros, jnp.float32(sigma))


def dpm_solver_updates(
    algorithm_type: str, solver_type: str, x: jax.Array, m0: jax.Array, d1: jax.Array,
    d1_3: jax.Array, d2: jax.Array, h: jax.Array, g: jax.Array, a_s0: jax.Array, a_t: jax.Array,
    s_s0: jax.Array, s_t: jax.Array, z: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """DPM-Solver's first-, second- and third-order updates ``(x1, x2, x3)`` from ``x`` at the
    base point ``s`` to ``t``, term by term in diffusers' order of operations: the exponential
    integrator's formulas, shared by the multistep (:func:`dpm_solver_step`) and singlestep
    (:mod:`jaxdiff.samplers.dpm_solver_singlestep`) solvers, which differ only in the base point
    and the differences they pass.

    Args:
      algorithm_type: one of :data:`DPM_ALGORITHM_TYPES` (``"sde-dpmsolver"`` has no ``x3``:
        NaN).
      solver_type: ``"midpoint"`` or ``"heun"`` form of ``x2`` (``x3`` has one form).
      x: ``[B, ...]`` the sample at ``s``.
      m0: ``[B, ...]`` the converted model output at ``s`` (x0 for the ``++`` types, eps else).
      d1: the second-order difference ``D1`` (``(m0 - m_prev) / r``).
      d1_3, d2: the third-order first and second differences.
      h: ``lambda_t - lambda_s`` (``inf`` for ``sigma_t = 0``: ``x1`` is then the data
        prediction).
      g: ``h`` where ``x2`` / ``x3`` are used, a harmless 1 where not: ``h = 0`` or ``inf`` would
        put NaN in the unused branch, and through ``jnp.where`` into gradients.
      a_s0, s_s0: ``alpha_s``, ``sigma_s`` (:func:`~jaxdiff.samplers.sigmas.alpha_sigma_lambda`).
      a_t, s_t: ``alpha_t``, ``sigma_t``.
      z: ``[B, ...]`` standard normal for the ``"sde-*"`` types (``None`` otherwise).

    Returns:
      ``(x1, x2, x3)``, each ``[B, ...]``; the caller picks one by the step's order.
    """
    if algorithm_type == "dpmsolver++":
        phi, phi_g = jnp.expm1(-h), jnp.expm1(-g)  # e^{-h} - 1, accurate for small h
        x1 = (s_t / s_s0) * x - (a_t * phi) * m0
        if solver_type == "midpoint":
            x2 = x1 - 0.5 * (a_t * phi_g) * d1
        else:
            x2 = x1 + (a_t * (phi_g / g + 1.0)) * d1
        x3 = x1 + (a_t * (phi_g / g + 1.0)) * d1_3 - (a_t * ((phi_g + g) / g**2 - 0.5)) * d2
    elif algorithm_type == "sde-dpmsolver++":
        psi, psi_g = -jnp.expm1(-2.0 * h), -jnp.expm1(-2.0 * g)  # 1 - e^{-2h}
        base = (s_t / s_s0 * jnp.exp(-h)) * x + (a_t * psi) * m0
        noise = s_t * jnp.sqrt(psi) * z
        x1 = base + noise
        if solver_type == "midpoint":
            x2 = base + 0.5 * (a_t * psi_g) * d1 + noise
        else:
            x2 = base + (a_t * (psi_g / (-2.0 * g) + 1.0)) * d1 + noise
        x3 = (base + (a_t * (psi_g / (-2.0 * g) + 1.0)) * d1_3
              + (a_t * ((psi_g - 2.0 * g) / (2.0 * g) ** 2 - 0.5)) * d2 + noise)
    elif algorithm_type == "dpmsolver":
        e, e_g = jnp.expm1(h), jnp.expm1(g)  # e^h - 1
        x1 = (a_t / a_s0) * x - (s_t * e) * m0
        if solver_type == "midpoint":
            x2 = x1 - 0.5 * (s_t * e_g) * d1
        else:
            x2 = x1 - (s_t * (e_g / g - 1.0)) * d1
        x3 = x1 - (s_t * (e_g / g - 1.0)) * d1_3 - (s_t * ((e_g - g) / g**2 - 0.5)) * d2
    else:  # sde-dpmsolver (no third order, as in diffusers)
        e, e_g = jnp.expm1(h), jnp.expm1(g)
        base = (a_t / a_s0) * x - 2.0 * (s_t * e) * m0
        noise = s_t * jnp.sqrt(jnp.expm1(2.0 * h)) * z
        x1 = base + noise
        if solver_type == "midpoint":
            x2 = base - (s_t * e_g) * d1 + noise
        else:
            x2 = base - 2.0 * (s_t * (e_g / g - 1.0)) * d1 + noise
        x3 = jnp.full_like(x, jnp.nan)
    return x1, x2, x3


def dpm_solver_step(
    state: DPMSolverState,
    model_output: jax.Array,
    x: jax.Array,
    sigma: jax.Array | float,
    sigma_next: jax.Array | float,
    *,
    first_order: bool | jax.Array | None = None,
    order: int | jax.Array | None = None,
    prediction_type: str = "eps",
    solver_type: str = "midpoint",
    algorithm_type: str = "dpmsolver++",
    noise: jax.Array | None = None,
    clip_x0: float | None = None,
) -> tuple[DPMSolverState, jax.Array, jax.Array]:
    """One multistep DPM-Solver update from sigma ``sigma`` to ``sigma_next``
    (``DPMSolverMultistepScheduler.step``).

    Args:
      state: the history (:func:`dpm_solver_init` before the first step).
      model_output: ``[B, ...]`` eps, x0 or v by ``prediction_type``, at ``x``.
      x: ``[B, ...]`` the current sample (at least float32).
      sigma: scalar ``sqrt((1 - abar) / abar)`` of the current timestep.
      sigma_next: scalar, of the next one (``0``: the data-prediction forms return the predicted
        x0; the noise-prediction forms need ``sigma_next > 0``).
      first_order: the first-order (DDIM) update instead of the second-order multistep one; a
        bool or a traced bool scalar. Give this or ``order``.
      order: the update's order, 1, 2 or 3 (an int or a traced int scalar). Order ``k`` needs
        ``k - 1`` previous steps in ``state``: order 1 on the first step, at most 2 on the second.
      prediction_type: ``"eps"``, ``"x0"`` or ``"v"`` (or diffusers' names).
      solver_type: ``"midpoint"`` or ``"heun"`` form of the second-order update (the third-order
        update has one form).
      algorithm_type: one of :data:`DPM_ALGORITHM_TYPES`; ``"sde-dpmsolver"`` has no third order.
      noise: ``[B, ...]`` standard normal, required by the ``"sde-*"`` types (else ignored).
      clip_x0: clip the data prediction to ``[-clip_x0, clip_x0]``; ``None`` for no clipping
        (the noise-prediction forms then use the eps implied by the clipped x0).

    Returns:
      ``(state, x_next, pred_x0)``: the updated history, ``x_next: [B, ...]`` in ``x``'s dtype and
      the data prediction ``[B, ...]``.

    Raises:
      ValueError: naming the argument, for an unknown option, a missing ``noise``, both or
        neither of ``first_order`` / ``order``, a concrete order outside 1-3 (or 3 where the
        state or algorithm has none), or a mis-shaped ``model_output``.
    """
    kind = canonical_prediction_type(prediction_type)
    check_choice("solver_type", solver_type, SOLVER_TYPES)
    check_choice("algorithm_type", algorithm_type, DPM_ALGORITHM_TYPES)
    clip_x0 = check_clip(clip_x0)
    if (first_order is None) == (order is None):
        raise ValueError("give exactly one of first_order and order")
    if order is None:
        order = jnp.where(first_order, 1, 2)
    has_third = state.older_x0 is not None and algorithm_type != "sde-dpmsolver"
    c = concrete(order)
    if c is not None and (c.shape != () or int(c) not in ((1, 2, 3) if has_third else (1, 2))):
        raise ValueError(
            f"order must be 1 or 2{' or 3' if has_third else ''} (algorithm_type="
            f"{algorithm_type!r}, {'three' if state.older_x0 is not None else 'two'}-field "
            f"state), got {order!r}"
        )
    sde = algorithm_type.startswith("sde")
    if sde and noise is None:
        raise ValueError(f"noise is required by algorithm_type={algorithm_type!r}")
    if jnp.shape(model_output) != jnp.shape(x):
        raise ValueError(f"model_output must have x's shape {jnp.shape(x)}, got "
                         f"{jnp.shape(model_output)}")
    if sde and jnp.shape(noise) != jnp.shape(x):
        raise ValueError(f"noise must have x's shape {jnp.shape(x)}, got {jnp.shape(noise)}")
    out = model_output.astype(x.dtype)  # a bf16 model output joins the >= float32 carry
    z = noise.astype(x.dtype) if sde else None
    a_s0, s_s0, lam_s0 = alpha_sigma_lambda(jnp.float32(sigma))
    a_t, s_t, lam_t = alpha_sigma_lambda(jnp.float32(sigma_next))
    _, _, lam_s1 = alpha_sigma_lambda(state.prev_sigma)
    x0, eps = x0_and_eps(out, x, a_s0, s_s0, kind)
    if clip_x0 is not None:
        x0 = jnp.clip(x0, -clip_x0, clip_x0)
        eps = (x - a_s0 * x0) / s_s0
    m0 = x0 if algorithm_type.endswith("++") else eps
    m1 = state.prev_x0
    h, h_0 = lam_t - lam_s0, lam_s0 - lam_s1
    g = jnp.where(order >= 2, h, 1.0)  # h where the multistep terms are used (dpm_solver_updates)
    r0 = jnp.where(order >= 2, h_0 / g, 1.0)  # not 0 on the first step: finite unused terms
    d1 = (1.0 / r0) * (m0 - m1)
    if has_third:
        _, _, lam_s2 = alpha_sigma_lambda(state.older_sigma)
        r1 = jnp.where(order >= 3, (lam_s1 - lam_s2) / g, 1.0)
        d1_1 = (1.0 / r1) * (m1 - state.older_x0)
        d1_3 = d1 + (r0 / (r0 + r1)) * (d1 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1 - d1_1)
    else:
        d1_3 = d2 = jnp.zeros_like(x)
    x1, x2, x3 = dpm_solver_updates(algorithm_type, solver_type, x, m0, d1, d1_3, d2, h, g,
                                    a_s0, a_t, s_s0, s_t, z)
    x_next = jnp.where(order == 1, x1, jnp.where(order == 2, x2, x3)).astype(x.dtype)
    if state.older_x0 is None:
        new_state = DPMSolverState(m0, jnp.float32(sigma))
    else:
        new_state = DPMSolverState(m0, jnp.float32(sigma), state.prev_x0, state.prev_sigma)
    return new_state, x_next, x0


def dpm_solver_orders(n: int, sigmas: np.ndarray, solver_order: int, lower_order_final: bool,
                      euler_at_final: bool = False,
                      final_sigmas_type: str = "sigma_min") -> np.ndarray:
    """``[n]`` int32: each step's order on an ``n``-step grid with ``sigmas [n + 1]``, by the
    rules diffusers' multistep schedulers derived from DPM-Solver share (DPM-Solver, DEIS): step
    ``i`` uses order ``min(solver_order, i + 1)`` (the warm-up), order 1 on the last step with
    ``euler_at_final``, ``final_sigmas_type="zero"`` or ``lower_order_final and n < 15``, at most
    2 on the step before it with ``lower_order_final and n < 15``, and order 1 on a step between
    equal sigmas (it does not move). Host numpy; image-to-image counts the warm-up from its start
    step on top of this."""
    i = np.arange(n)
    last = (i == n - 1) & (euler_at_final or (lower_order_final and n < 15)
                           or final_sigmas_type == "zero")
    second_last = (i == n - 2) & (lower_order_final and n < 15)
    orders = np.where((solver_order == 1) | (i < 1) | last, 1,
                      np.where((solver_order == 2) | (i < 2) | second_last, 2, 3))
    # A step that does not move (sigma_min after a grid ending at sigma_0): first order returns x
    # exactly, where the heun and third-order updates would divide 0 by h = 0 (diffusers: NaN).
    orders[sigmas[1:] == sigmas[:-1]] = 1
    return orders.astype(np.int32)


def dpm_solver_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array | None = None,
    *,
    num_steps: int,
    solver_order: int = 2,
    solver_type: str = "midpoint",
    algorithm_type: str = "dpmsolver++",
    prediction_type: str = "eps",
    spacing: str = "linspace",
    steps_offset: int = 0,
    sigma_schedule: str = "discrete",
    round_timesteps: bool = True,
    lower_order_final: bool = True,
    euler_at_final: bool = False,
    final_sigmas_type: str = "zero",
    lambda_min_clipped: float = -float("inf"),
    clip_x0: float | None = None,
    noise: jax.Array | None = None,
    return_trajectory: bool = False,
    strength: float = 1.0,
    after_step=None,
):
    """DPM-Solver(++) sampling from ``x_T: [B, ...]`` in one ``lax.scan``.

    Args:
      model_fn: ``model_fn(x [B, ...], t [B] int32) -> output [B, ...]`` of ``prediction_type``.
      schedule: the training schedule.
      x_T: ``[B, ...]`` the starting noise, carried in at least float32.
      key: the ``"sde-*"`` algorithms draw step ``i``'s noise from ``fold_in(key, i)`` (required
        unless ``noise`` is given); the ODE algorithms accept and ignore it (may be ``None``).
      num_steps: number of model evaluations (10-25 is typical).
      solver_order: 1 (DDIM), 2 (DPM-Solver++(2M)) or 3 (3M; not with ``"sde-dpmsolver"``).
      solver_type: ``"midpoint"`` or ``"heun"`` form of the second-order update.
      algorithm_type: ``"dpmsolver++"`` (the default), ``"sde-dpmsolver++"`` (stochastic, "DPM++
        2M SDE"), or the noise-prediction forms ``"dpmsolver"`` / ``"sde-dpmsolver"`` (which need
        ``final_sigmas_type="sigma_min"``).
      prediction_type: ``"eps"``, ``"x0"`` or ``"v"``.
      spacing, steps_offset, sigma_schedule, round_timesteps: the grid, see
        :func:`dpm_solver_timesteps`.
      final_sigmas_type, lambda_min_clipped: the grid, likewise.
      lower_order_final: use lower orders on the last steps when ``num_steps < 15`` (first order
        on the last step, at most second order on the one before).
      euler_at_final: first order on the last step, whatever ``num_steps``.
      clip_x0: clip the predicted x0 to ``[-clip_x0, clip_x0]`` (None: no clipping).
      noise: optional pre-drawn ``[M, B, ...]`` standard normal for the ``"sde-*"`` algorithms,
        ``M`` the steps that run (``N`` unless ``strength < 1``); shape-checked and unused by
        the ODE algorithms.
      return_trajectory: also return the path.
      strength: image-to-image strength in ``(0, 1]``: run the grid's steps ``s .. N - 1``
        only, ``s = num_steps - int(num_steps * strength)``, from ``x_T`` noised to
        ``sigmas[s]`` (:func:`jaxdiff.samplers.noise_to_img2img`). The history starts empty
        there, so the first steps of the tail warm up at lower order, as diffusers' scheduler
        does after ``set_begin_index``; ``lower_order_final`` still counts the whole grid.
        1 (the default) is text-to-image.
      after_step: optional ``(x_next, i) -> x_next`` applied to each step's output
        (:func:`jaxdiff.samplers.driver.run_scan`; 4-channel inpainting's blending).

    The last step is first order also with ``final_sigmas_type="zero"`` (it returns the predicted
    x0), and so is a step between equal sigmas (the last one with ``"sigma_min"`` after a grid
    ending at ``sigma_0``, e.g. every ``sigma_schedule`` but ``"discrete"``): it returns ``x``
    where diffusers' heun and third-order updates give NaN.

    Returns:
      ``x_0`` ``[B, ...]`` float32 (or wider), or with ``return_trajectory`` ``(x_0, xs [N + 1,
      B, ...], pred_x0s [N, B, ...])`` (``xs[0]`` is ``x_T``), as the other samplers return.

    Raises:
      ValueError: naming the argument, for a bad grid or option, a missing ``key`` / ``noise``
        (stochastic algorithms) or a mis-shaped model output.
    """
    kind = canonical_prediction_type(prediction_type)
    solver_order = check_int("solver_order", solver_order, 1, 3)
    check_choice("solver_type", solver_type, SOLVER_TYPES)
    check_choice("algorithm_type", algorithm_type, DPM_ALGORITHM_TYPES)
    lower_order_final = check_bool("lower_order_final", lower_order_final)
    euler_at_final = check_bool("euler_at_final", euler_at_final)
    clip_x0 = check_clip(clip_x0)
    if algorithm_type in ("dpmsolver", "sde-dpmsolver") and final_sigmas_type == "zero":
        raise ValueError(
            f"final_sigmas_type='zero' is not supported with algorithm_type={algorithm_type!r} "
            "(as in diffusers): use final_sigmas_type='sigma_min'"
        )
    if algorithm_type == "sde-dpmsolver" and solver_order == 3:
        raise ValueError("solver_order=3 is not defined for algorithm_type='sde-dpmsolver' "
                         "(diffusers has no such update): use solver_order <= 2")
    x_T = prepare_x_T(x_T)
    grid = dpm_solver_timesteps(
        schedule, num_steps, spacing=spacing, steps_offset=steps_offset,
        final_sigmas_type=final_sigmas_type, lambda_min_clipped=lambda_min_clipped,
        sigma_schedule=sigma_schedule, round_timesteps=round_timesteps,
    )
    ts, sigmas = grid.timesteps, grid.sigmas
    n = len(ts)
    orders = dpm_solver_orders(n, sigmas, solver_order, lower_order_final, euler_at_final,
                          final_sigmas_type)
    start = check_start_step(strength_start_step(num_steps, strength), n)
    # warm-up counted from the first step that runs: order <= (steps taken so far) + 1
    orders = np.minimum(orders, np.maximum(np.arange(n) - start + 1, 1)).astype(np.int32)
    model = checked_model(model_fn, x_T.shape)
    ts_j, sig_j, ord_j = jnp.asarray(ts), jnp.asarray(sigmas), jnp.asarray(orders)
    stochastic = algorithm_type.startswith("sde")

    def body(state, x, i, z):
        return dpm_solver_step(
            state, model(x, ts_j[i]), x, sig_j[i], sig_j[i + 1], order=ord_j[i],
            prediction_type=kind, solver_type=solver_type, algorithm_type=algorithm_type,
            noise=z, clip_x0=clip_x0,
        )

    init = dpm_solver_init(x_T, sigmas[start])
    if solver_order < 3:  # no third-order history to carry
        init = DPMSolverState(init.prev_x0, init.prev_sigma)
    return run_scan(body, init, x_T, key, n, stochastic=stochastic, noise=noise,
                    return_trajectory=return_trajectory, start_step=start,
                    after_step=after_step)


def _grid(schedule: Schedule, num_steps: int, *, strength: float = 1.0, spacing: str = "linspace",
          steps_offset: int = 0, final_sigmas_type: str = "zero",
          lambda_min_clipped: float = -math.inf, sigma_schedule: str = "discrete",
          round_timesteps: bool = True, **_) -> Grid:
    return dpm_solver_timesteps(schedule, num_steps, spacing=spacing, steps_offset=steps_offset,
                                final_sigmas_type=final_sigmas_type,
                                lambda_min_clipped=lambda_min_clipped,
                                sigma_schedule=sigma_schedule, round_timesteps=round_timesteps)


DPM_SOLVER = SamplerSpec(
    name="dpm_solver",
    after_step=True,
    sample=dpm_solver_sample,
    grid=_grid,
    options=dict(solver_order=2, solver_type="midpoint", algorithm_type="dpmsolver++",
                 prediction_type="eps", spacing="linspace", steps_offset=0,
                 sigma_schedule="discrete", round_timesteps=True, lower_order_final=True,
                 euler_at_final=False, final_sigmas_type="zero", lambda_min_clipped=-math.inf,
                 clip_x0=None),
    noise_space="sigma_vp",
    stochastic=lambda o: str(o["algorithm_type"]).startswith("sde"),
    # DPM-Solver++ under the names of k-diffusion / A1111 ("DPM++ 2M Karras", ...).
    presets=dict(
        dpmpp_2m=dict(algorithm_type="dpmsolver++", solver_order=2),
        dpmpp_2m_karras=dict(algorithm_type="dpmsolver++", solver_order=2,
                             sigma_schedule="karras"),
        dpmpp_3m_karras=dict(algorithm_type="dpmsolver++", solver_order=3,
                             sigma_schedule="karras"),
        dpmpp_2m_sde_karras=dict(algorithm_type="sde-dpmsolver++", solver_order=2,
                                 sigma_schedule="karras"),
    ),
    diffusers=DiffusersTwin(
        "DPMSolverMultistepScheduler",
        defaults=dict(solver_order=2, prediction_type="epsilon", thresholding=False,
                      dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                      algorithm_type="dpmsolver++", solver_type="midpoint",
                      lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
                      use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False,
                      use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
                      lambda_min_clipped=-math.inf, variance_type=None,
                      timestep_spacing="linspace", steps_offset=0, use_dynamic_shifting=False,
                      time_shift_type="exponential"),
        options=dict(
            solver_order=config_key("solver_order"),
            # diffusers maps the UniPC / DEIS names onto midpoint and "deis" onto dpmsolver++
            solver_type=lambda c: ("midpoint" if c["solver_type"] in ("logrho", "bh1", "bh2")
                                   else c["solver_type"]),
            algorithm_type=lambda c: ("dpmsolver++" if c["algorithm_type"] == "deis"
                                      else c["algorithm_type"]),
            prediction_type=prediction_option,
            spacing=config_key("timestep_spacing"),
            steps_offset=config_key("steps_offset"),
            sigma_schedule=lambda c: sigma_schedule_option(c, "DPMSolverMultistepScheduler",
                                                           lu=True),
            # set_timesteps rounds the Karras / Lu timesteps except for squaredcos_cap_v2
            round_timesteps=lambda c: c["beta_schedule"] != "squaredcos_cap_v2",
            lower_order_final=config_key("lower_order_final"),
            euler_at_final=config_key("euler_at_final"),
            final_sigmas_type=config_key("final_sigmas_type"),
            lambda_min_clipped=config_key("lambda_min_clipped"),
        ),
        must_be=dict(thresholding=(False,), use_flow_sigmas=(False,),
                     use_dynamic_shifting=(False,),
                     # learned variance: give the sampler a model_fn returning the mean only
                     variance_type=(None,),
                     prediction_type=("epsilon", "v_prediction", "sample")),
        no_effect=THRESHOLD_KEYS | {"flow_shift", "time_shift_type"},
        zero_snr_floor=True,
    ),
)
SPECS = (DPM_SOLVER,)
