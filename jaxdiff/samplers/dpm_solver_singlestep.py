"""Singlestep DPM-Solver and DPM-Solver++ (Lu et al. 2022), orders 1-3, ODE or SDE, as one
``lax.scan``.

Semantics follow diffusers' ``DPMSolverSinglestepScheduler`` (0.42): the ``algorithm_type``s
``"dpmsolver++"``, ``"sde-dpmsolver++"`` and ``"dpmsolver"`` (noise prediction), the
``"midpoint"`` / ``"heun"`` forms, ``lower_order_final``, ``final_sigmas_type``,
``lambda_min_clipped`` and the Karras / exponential / beta sigma schedules. Not covered (refused
by the config import, naming the key): dynamic thresholding (``clip_x0`` is static clipping),
flow sigmas and dynamic shifting, learned-variance model outputs.

A singlestep solver of order ``k`` groups the grid's steps by ``k``: the group's first step is a
first-order (DDIM) step from its sample ``x_s``, and its ``j``-th step goes from that same
``x_s`` (not from the intermediate samples, which only feed the model) to the next grid point
with the model outputs at the group's first ``j`` points, i.e. DPM-Solver-2/3 (DPM-Solver++(2S)
for ``"dpmsolver++"``) with the grid's points as the intermediate times. The orders step by step
are diffusers' ``get_order_list``: ``1, 2, 1, 2, ...`` for ``solver_order=2``, ``1, 2, 3, 1, 2,
3, ...`` for 3, ending on a complete group (:func:`dpm_solver_singlestep_orders`). The updates
are DPM-Solver's exponential-integrator formulas, shared with the multistep solver
(:func:`~jaxdiff.samplers.dpm_solver.dpm_solver_updates`); the grid is the multistep solver's
``"linspace"`` grid (:func:`~jaxdiff.samplers.dpm_solver.dpm_solver_timesteps`), the only
spacing this scheduler has. diffusers' third-order ``"midpoint"`` update is DPM-Solver-3's
one-difference form, third order where the group's last intermediate point lies at ``r = 2/3``
of the step in ``lambda``; at the grid's points it does not, so ``solver_type="heun"`` (both
differences, any ``r``) is the accurate third order.

The pieces follow the sampler contract (:mod:`jaxdiff.samplers`):
:func:`dpm_solver_singlestep_timesteps` (the grid and its orders),
:func:`dpm_solver_singlestep_step` (one update; the group's first sample and model outputs live in
an explicit :class:`DPMSolverSinglestepState`, created by :func:`dpm_solver_singlestep_init`) and
:func:`dpm_solver_singlestep_sample` (one ``lax.scan``). :data:`DPM_SOLVER_SINGLESTEP` declares it
with its diffusers twin. It has no presets: A1111 / k-diffusion have no name for this solver
(their "DPM++ 2S a" is ancestral and "DPM++ SDE" another stochastic solver).

    >>> from jaxdiff.schedules import make_schedule
    >>> grid = dpm_solver_singlestep_timesteps(make_schedule("linear", 1000), 7, solver_order=3)
    >>> grid.timesteps.tolist(), grid.orders.tolist()
    ([999, 856, 714, 571, 428, 285, 143], [1, 2, 3, 1, 2, 3, 1])
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion import canonical_prediction_type, x0_and_eps
from jaxdiff.samplers.diffusers_names import (
    SCHEDULE_KEYS_NO_RESCALE,
    THRESHOLD_KEYS,
    config_key,
    prediction_option,
    sigma_schedule_option,
)
from jaxdiff.samplers.dpm_solver import (
    FINAL_SIGMAS_TYPES,
    SOLVER_TYPES,
    dpm_solver_timesteps,
    dpm_solver_updates,
)
from jaxdiff.samplers.driver import (
    check_start_step,
    checked_model,
    prepare_x_T,
    run_scan,
    strength_start_step,
)
from jaxdiff.samplers.sigmas import SIGMA_SCHEDULES, alpha_sigma_lambda
from jaxdiff.samplers.spec import DiffusersTwin, SamplerSpec
from jaxdiff.schedules import Schedule
from jaxdiff.types import ModelFn
from jaxdiff.validation import check_bool, check_choice, check_clip, check_int, concrete

__all__ = [
    "SINGLESTEP_ALGORITHM_TYPES",
    "SinglestepGrid",
    "DPMSolverSinglestepState",
    "dpm_solver_singlestep_orders",
    "dpm_solver_singlestep_timesteps",
    "dpm_solver_singlestep_init",
    "dpm_solver_singlestep_step",
    "dpm_solver_singlestep_sample",
    "DPM_SOLVER_SINGLESTEP",
    "SPECS",
]

# diffusers' DPMSolverSinglestepScheduler has no "sde-dpmsolver" (and maps "deis" to dpmsolver++).
SINGLESTEP_ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver")


class SinglestepGrid(NamedTuple):
    """The singlestep solver's host-side grid: a :class:`~jaxdiff.samplers.timesteps.Grid` (its
    first three fields) plus each step's order.

    Attributes:
      timesteps: ``[N]`` int32, descending.
      prev_timesteps: ``[N]`` the next entry of ``timesteps``, ``-1`` after the last.
      sigmas: ``[N + 1]`` float32, the last one 0 or ``sigma_0`` (``final_sigmas_type``).
      orders: ``[N]`` int32, each step's order (:func:`dpm_solver_singlestep_orders`).
    """

    timesteps: np.ndarray
    prev_timesteps: np.ndarray
    sigmas: np.ndarray
    orders: np.ndarray


def dpm_solver_singlestep_orders(
    num_steps: int,
    solver_order: int = 2,
    lower_order_final: bool = False,
    final_sigmas_type: str = "zero",
) -> np.ndarray:
    """``[num_steps]`` int32: each step's order (diffusers' ``get_order_list``, 0.42).

    The steps come in groups ``1, 2, ..., solver_order``. With ``lower_order_final`` the last
    group is shortened so that the run ends on a complete group (``N = 7``, order 3: ``1 2 3 1 2
    3 1``; ``N = 6``: ``1 2 3 1 2 1``; ``N = 4``, order 2: ``1 2 1 1``); without it every group
    is whole. As in diffusers, ``lower_order_final=False`` is honoured only where it can be:
    with ``final_sigmas_type="sigma_min"`` and ``num_steps`` a multiple of ``solver_order``
    (diffusers then switches it on, with a warning); and with ``final_sigmas_type="zero"`` the
    last step is first order (it returns the predicted x0).

    Raises:
      ValueError: naming the argument, for ``num_steps < 1``, ``solver_order`` outside 1-3, a
        non-bool ``lower_order_final`` or an unknown ``final_sigmas_type``.

    >>> dpm_solver_singlestep_orders(5, 2).tolist()
    [1, 2, 1, 2, 1]
    >>> dpm_solver_singlestep_orders(6, 3, False, "sigma_min").tolist()
    [1, 2, 3, 1, 2, 3]
    """
    n = check_int("num_steps", num_steps, 1)
    k = check_int("solver_order", solver_order, 1, 3)
    lower = check_bool("lower_order_final", lower_order_final)
    check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
    lower = lower or n % k != 0 or final_sigmas_type == "zero"
    groups = [list(range(1, k + 1))] * (n // k)
    if lower and n % k == 0 and k > 1:
        # the last whole group gives way to a (k - 1)-group and a first-order step
        groups = groups[:-1] + [list(range(1, k))] + [[1]]
    elif n % k:
        groups = groups + [list(range(1, n % k + 1))]
    orders = np.concatenate([np.asarray(g, np.int32) for g in groups])
    if final_sigmas_type == "zero":
        orders[-1] = 1
    return orders


def dpm_solver_singlestep_timesteps(
    schedule: Schedule,
    num_steps: int,
    *,
    solver_order: int = 2,
    lower_order_final: bool = False,
    final_sigmas_type: str = "zero",
    lambda_min_clipped: float = -math.inf,
    sigma_schedule: str = "discrete",
) -> SinglestepGrid:
    """The singlestep solver's grid, as ``DPMSolverSinglestepScheduler.set_timesteps`` (diffusers
    0.42) computes it: timesteps ``[N]`` (``N == num_steps``), sigmas ``[N + 1]`` and the orders.

    The timesteps are :func:`~jaxdiff.samplers.dpm_solver.dpm_solver_timesteps`' with
    ``spacing="linspace"`` (this scheduler has no other spacing and no ``steps_offset``):
    ``num_steps`` timesteps spaced evenly over the training steps that ``lambda_min_clipped``
    keeps. With ``sigma_schedule`` ``"karras"`` (rounded timesteps, whatever the beta schedule),
    ``"exponential"`` or ``"beta"`` (truncated timesteps), ``num_steps`` sigmas from the largest
    training sigma to the smallest. The final sigma is 0 (``final_sigmas_type="zero"``) or
    ``sigma_0`` (``"sigma_min"``). ``orders`` is :func:`dpm_solver_singlestep_orders`; the
    options that do not shape the grid are validated by the sampler.

    Raises:
      ValueError: naming the argument: an unknown ``sigma_schedule`` (diffusers' multistep-only
        ``"lu"`` included) or ``final_sigmas_type``; ``num_steps`` outside ``[1, T - 1]`` for
        the discrete grid (more repeats timesteps: the solver's ``h`` is 0 and its output NaN)
        or above ``T``; ``lambda_min_clipped`` clipping every timestep.
    """
    check_choice("sigma_schedule", sigma_schedule, SIGMA_SCHEDULES)
    grid = dpm_solver_timesteps(schedule, num_steps, spacing="linspace", steps_offset=0,
                                final_sigmas_type=final_sigmas_type,
                                lambda_min_clipped=lambda_min_clipped,
                                sigma_schedule=sigma_schedule, round_timesteps=True)
    orders = dpm_solver_singlestep_orders(len(grid.timesteps), solver_order, lower_order_final,
                                          final_sigmas_type)
    return SinglestepGrid(grid.timesteps, grid.prev_timesteps, grid.sigmas, orders)


class DPMSolverSinglestepState(NamedTuple):
    """What a singlestep group carries between :func:`dpm_solver_singlestep_step` calls.

    The "model outputs" are data predictions (x0) for ``"dpmsolver++"`` / ``"sde-dpmsolver++"``
    and noise predictions (eps) for ``"dpmsolver"``.

    Attributes:
      sample: ``[B, ...]`` the sample at the current group's first step (diffusers'
        ``scheduler.sample``); every step of the group starts from it.
      prev_m: ``[B, ...]`` the previous step's converted model output (zeros before the first).
      prev_sigma: scalar float32, the previous step's sigma.
      older_m: ``[B, ...]`` the converted model output of the step before that (third order
        only; ``None`` in a three-field state, which supports orders 1 and 2 only).
      older_sigma: scalar float32, its sigma (``None`` with ``older_m``).
    """

    sample: jax.Array
    prev_m: jax.Array
    prev_sigma: jax.Array
    older_m: jax.Array | None = None
    older_sigma: jax.Array | None = None


def dpm_solver_singlestep_init(
    x_T: jax.Array, sigma: jax.Array | float, *, solver_order: int = 3
) -> DPMSolverSinglestepState:
    """The empty state of a trajectory starting at ``x_T: [B, ...]`` with sigma ``sigma``; with
    ``solver_order`` 3 it carries the third-order history, with 1 or 2 it does not."""
    k = check_int("solver_order", solver_order, 1, 3)
    x_T = jnp.asarray(x_T)
    zeros = jnp.zeros_like(x_T)
    if k < 3:
        return DPMSolverSinglestepState(x_T, zeros, jnp.float32(sigma))
    return DPMSolverSinglestepState(x_T, zeros, jnp.float32(sigma), zeros, jnp.float32(sigma))


def dpm_solver_singlestep_step(
    state: DPMSolverSinglestepState,
    model_output: jax.Array,
    x: jax.Array,
    sigma: jax.Array | float,
    sigma_next: jax.Array | float,
    *,
    order: int | jax.Array,
    prediction_type: str = "eps",
    solver_type: str = "midpoint",
    algorithm_type: str = "dpmsolver++",
    noise: jax.Array | None = None,
    clip_x0: float | None = None,
) -> tuple[DPMSolverSinglestepState, jax.Array, jax.Array]:
    """One singlestep DPM-Solver update to ``sigma_next`` (``DPMSolverSinglestepScheduler.step``).

    Order 1 starts a group: a first-order (DDIM) step from ``x`` at ``sigma``, and ``x`` becomes
    the group's sample. Order ``k = 2, 3`` is the group's ``k``-th step: from the group's sample
    (at ``state``'s sigma ``k - 1`` steps back) to ``sigma_next``, with the model outputs at the
    group's points (the state's and this one: ``r = (lambda_{s_j} - lambda_s) / (lambda_t -
    lambda_s)``, the DPM-Solver-2 / -3 updates with those intermediate points).

    Args:
      state: :func:`dpm_solver_singlestep_init` before the first step, then the returned one.
      model_output: ``[B, ...]`` eps, x0 or v by ``prediction_type``, at ``x``.
      x: ``[B, ...]`` the current sample (at least float32).
      sigma: scalar ``sqrt((1 - abar) / abar)`` of the current grid point.
      sigma_next: scalar, of the next one (``0`` needs ``order=1``: the data-prediction forms
        then return the predicted x0; ``"dpmsolver"`` needs ``sigma_next > 0``).
      order: 1, 2 or 3 (an int or a traced int scalar): the step's place in its group. Order
        ``k`` needs the ``k - 1`` previous steps of the same group in ``state``.
      prediction_type: ``"eps"``, ``"x0"`` or ``"v"`` (or diffusers' names).
      solver_type: ``"midpoint"`` or ``"heun"`` form of the second- and third-order updates.
      algorithm_type: one of :data:`SINGLESTEP_ALGORITHM_TYPES`.
      noise: ``[B, ...]`` standard normal, required by ``"sde-dpmsolver++"`` (else ignored).
      clip_x0: clip the data prediction to ``[-clip_x0, clip_x0]``; ``None`` for no clipping
        (``"dpmsolver"`` then uses the eps implied by the clipped x0).

    Returns:
      ``(state, x_next, pred_x0)``: the updated state, ``x_next: [B, ...]`` in ``x``'s dtype and
      the data prediction ``[B, ...]``.

    Raises:
      ValueError: naming the argument, for an unknown option, a missing ``noise``, a concrete
        ``order`` outside 1-3 (or 3 with a three-field state) or a mis-shaped ``model_output``.
    """
    kind = canonical_prediction_type(prediction_type)
    check_choice("solver_type", solver_type, SOLVER_TYPES)
    check_choice("algorithm_type", algorithm_type, SINGLESTEP_ALGORITHM_TYPES)
    clip_x0 = check_clip(clip_x0)
    has_third = state.older_m is not None
    c = concrete(order)
    if c is not None and (c.shape != () or int(c) not in ((1, 2, 3) if has_third else (1, 2))):
        raise ValueError(f"order must be 1 or 2{' or 3' if has_third else ''} (a "
                         f"{'five' if has_third else 'three'}-field state), got {order!r}")
    sde = algorithm_type == "sde-dpmsolver++"
    if sde and noise is None:
        raise ValueError(f"noise is required by algorithm_type={algorithm_type!r}")
    if jnp.shape(model_output) != jnp.shape(x):
        raise ValueError(f"model_output must have x's shape {jnp.shape(x)}, got "
                         f"{jnp.shape(model_output)}")
    if sde and jnp.shape(noise) != jnp.shape(x):
        raise ValueError(f"noise must have x's shape {jnp.shape(x)}, got {jnp.shape(noise)}")
    out = model_output.astype(x.dtype)  # a bf16 model output joins the >= float32 carry
    z = noise.astype(x.dtype) if sde else None
    a_0, s_0, lam_0 = alpha_sigma_lambda(jnp.float32(sigma))
    a_t, s_t, lam_t = alpha_sigma_lambda(jnp.float32(sigma_next))
    x0, eps = x0_and_eps(out, x, a_0, s_0, kind)
    if clip_x0 is not None:
        x0 = jnp.clip(x0, -clip_x0, clip_x0)
        eps = (x - a_0 * x0) / s_0
    m0 = x0 if algorithm_type.endswith("++") else eps
    zeros = jnp.zeros_like(x)

    def update(k, base, m_base, a_s, s_s, g, d1=zeros, d1_3=zeros, d2=zeros):
        return dpm_solver_updates(algorithm_type, solver_type, base, m_base, d1, d1_3, d2, g, g,
                                  a_s, a_t, s_s, s_t, z)[k - 1]

    # Order 1: from x, this step's output. Orders 2 and 3: from the group's sample, the output
    # at its first point as the base and the differences to the later ones. Where a branch is
    # not taken its h and r are a harmless 1 (h = 0 or inf would put NaN there, and through
    # jnp.where into gradients).
    x_1 = update(1, x, m0, a_0, s_0, lam_t - lam_0)
    a_1, s_1, lam_1 = alpha_sigma_lambda(state.prev_sigma)
    h2 = jnp.where(order == 2, lam_t - lam_1, 1.0)
    r = jnp.where(order == 2, (lam_0 - lam_1) / h2, 1.0)
    x_2 = update(2, state.sample, state.prev_m, a_1, s_1, h2, d1=(1.0 / r) * (m0 - state.prev_m))
    x_3 = x_1
    if has_third:
        a_2, s_2, lam_2 = alpha_sigma_lambda(state.older_sigma)
        h3 = jnp.where(order == 3, lam_t - lam_2, 1.0)
        r0 = jnp.where(order == 3, (lam_0 - lam_2) / h3, 1.0)
        r1 = jnp.where(order == 3, (lam_1 - lam_2) / h3, 0.5)
        d1_0 = (1.0 / r1) * (state.prev_m - state.older_m)
        d1_1 = (1.0 / r0) * (m0 - state.older_m)
        if solver_type == "midpoint":
            d1_3, d2 = d1_1, zeros
        else:
            d1_3 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
            d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
        x_3 = update(3, state.sample, state.older_m, a_2, s_2, h3, d1_3=d1_3, d2=d2)
    x_next = jnp.where(order == 1, x_1, jnp.where(order == 2, x_2, x_3)).astype(x.dtype)
    sample = jnp.where(order == 1, x, state.sample).astype(state.sample.dtype)
    if has_third:
        new_state = DPMSolverSinglestepState(sample, m0, jnp.float32(sigma), state.prev_m,
                                             state.prev_sigma)
    else:
        new_state = DPMSolverSinglestepState(sample, m0, jnp.float32(sigma))
    return new_state, x_next, x0


def dpm_solver_singlestep_sample(
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
    sigma_schedule: str = "discrete",
    lower_order_final: bool = False,
    final_sigmas_type: str = "zero",
    lambda_min_clipped: float = -math.inf,
    clip_x0: float | None = None,
    noise: jax.Array | None = None,
    return_trajectory: bool = False,
    strength: float = 1.0,
):
    """Singlestep DPM-Solver(++) sampling from ``x_T: [B, ...]`` in one ``lax.scan``.

    Args:
      model_fn: ``model_fn(x [B, ...], t [B] int32) -> output [B, ...]`` of ``prediction_type``.
      schedule: the training schedule.
      x_T: ``[B, ...]`` the starting noise, carried in at least float32.
      key: ``"sde-dpmsolver++"`` draws step ``i``'s noise from ``fold_in(key, i)`` (required
        unless ``noise`` is given); the ODE algorithms accept and ignore it (may be ``None``).
      num_steps: number of model evaluations ``N`` (the grid's length).
      solver_order: 1 (DDIM), 2 (DPM-Solver-2 / DPM-Solver++(2S)) or 3.
      solver_type: ``"midpoint"`` or ``"heun"`` form of the higher-order updates (with order 3,
        prefer ``"heun"``: module docstring).
      algorithm_type: ``"dpmsolver++"`` (the default), ``"sde-dpmsolver++"`` (stochastic: every
        step adds ``sigma_t sqrt(1 - e^{-2h}) z``) or the noise-prediction form ``"dpmsolver"``
        (which needs ``final_sigmas_type="sigma_min"``, as in diffusers).
      prediction_type: ``"eps"``, ``"x0"`` or ``"v"``.
      sigma_schedule, final_sigmas_type, lambda_min_clipped: the grid, see
        :func:`dpm_solver_singlestep_timesteps`.
      lower_order_final: end on a complete lower-order group (see
        :func:`dpm_solver_singlestep_orders`: ``False`` is honoured only with
        ``final_sigmas_type="sigma_min"`` and ``num_steps`` a multiple of ``solver_order``, as
        in diffusers, where it is also the default).
      clip_x0: clip the predicted x0 to ``[-clip_x0, clip_x0]`` (None: no clipping).
      noise: optional pre-drawn ``[M, B, ...]`` standard normal for ``"sde-dpmsolver++"``, ``M``
        the steps that run (``N`` unless ``strength < 1``); shape-checked and unused by the ODE
        algorithms.
      return_trajectory: also return the path (the intermediate samples of each group included).
      strength: image-to-image strength in ``(0, 1]``: run the grid's steps ``s .. N - 1`` only,
        ``s = num_steps - int(num_steps * strength)``, from ``x_T`` noised to ``sigmas[s]``
        (:func:`jaxdiff.samplers.noise_to_img2img`). The first steps there run at the lower
        orders their history allows (order ``<=`` steps taken + 1, a new group starting at
        ``s``), as diffusers' scheduler does after ``set_begin_index``; the orders otherwise
        follow the whole grid's. 1 (the default) is text-to-image.

    Returns:
      ``x_0`` ``[B, ...]`` float32 (or wider), or with ``return_trajectory`` ``(x_0, xs [M + 1,
      B, ...], pred_x0s [M, B, ...])`` (``xs[0]`` is ``x_T``), as the other samplers return.

    Raises:
      ValueError: naming the argument, for a bad grid or option, a missing ``key`` / ``noise``
        (``"sde-dpmsolver++"``) or a mis-shaped model output.
    """
    kind = canonical_prediction_type(prediction_type)
    solver_order = check_int("solver_order", solver_order, 1, 3)
    check_choice("solver_type", solver_type, SOLVER_TYPES)
    check_choice("algorithm_type", algorithm_type, SINGLESTEP_ALGORITHM_TYPES)
    clip_x0 = check_clip(clip_x0)
    if algorithm_type == "dpmsolver" and final_sigmas_type == "zero":
        raise ValueError("final_sigmas_type='zero' is not supported with algorithm_type="
                         "'dpmsolver' (as in diffusers): use final_sigmas_type='sigma_min'")
    x_T = prepare_x_T(x_T)
    grid = dpm_solver_singlestep_timesteps(
        schedule, num_steps, solver_order=solver_order, lower_order_final=lower_order_final,
        final_sigmas_type=final_sigmas_type, lambda_min_clipped=lambda_min_clipped,
        sigma_schedule=sigma_schedule,
    )
    n = len(grid.timesteps)
    start = check_start_step(strength_start_step(num_steps, strength), n)
    # diffusers lowers an order whose history is missing (image-to-image starts mid-group)
    orders = np.minimum(grid.orders, np.maximum(np.arange(n) - start + 1, 1)).astype(np.int32)
    model = checked_model(model_fn, x_T.shape)
    ts, sigmas, ords = (jnp.asarray(a) for a in (grid.timesteps, grid.sigmas, orders))

    def body(state, x, i, z):
        return dpm_solver_singlestep_step(
            state, model(x, ts[i]), x, sigmas[i], sigmas[i + 1], order=ords[i],
            prediction_type=kind, solver_type=solver_type, algorithm_type=algorithm_type,
            noise=z, clip_x0=clip_x0,
        )

    init = dpm_solver_singlestep_init(x_T, grid.sigmas[start], solver_order=solver_order)
    return run_scan(body, init, x_T, key, n, stochastic=algorithm_type == "sde-dpmsolver++",
                    noise=noise, return_trajectory=return_trajectory, start_step=start)


def _grid(schedule: Schedule, num_steps: int, *, strength: float = 1.0, solver_order: int = 2,
          lower_order_final: bool = False, final_sigmas_type: str = "zero",
          lambda_min_clipped: float = -math.inf, sigma_schedule: str = "discrete",
          **_) -> SinglestepGrid:
    return dpm_solver_singlestep_timesteps(
        schedule, num_steps, solver_order=solver_order, lower_order_final=lower_order_final,
        final_sigmas_type=final_sigmas_type, lambda_min_clipped=lambda_min_clipped,
        sigma_schedule=sigma_schedule)


DPM_SOLVER_SINGLESTEP = SamplerSpec(
    name="dpm_solver_singlestep",
    sample=dpm_solver_singlestep_sample,
    grid=_grid,
    options=dict(solver_order=2, solver_type="midpoint", algorithm_type="dpmsolver++",
                 prediction_type="eps", sigma_schedule="discrete", lower_order_final=False,
                 final_sigmas_type="zero", lambda_min_clipped=-math.inf, clip_x0=None),
    noise_space="sigma_vp",
    stochastic=lambda o: o["algorithm_type"] == "sde-dpmsolver++",
    diffusers=DiffusersTwin(
        "DPMSolverSinglestepScheduler",
        defaults=dict(solver_order=2, prediction_type="epsilon", thresholding=False,
                      dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                      algorithm_type="dpmsolver++", solver_type="midpoint",
                      lower_order_final=False, use_karras_sigmas=False,
                      use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=False,
                      flow_shift=1.0, final_sigmas_type="zero", lambda_min_clipped=-math.inf,
                      variance_type=None, use_dynamic_shifting=False,
                      time_shift_type="exponential"),
        options=dict(
            solver_order=config_key("solver_order"),
            # diffusers' constructor maps the UniPC / DEIS names onto midpoint, "deis" onto ++
            solver_type=lambda c: ("midpoint" if c["solver_type"] in ("logrho", "bh1", "bh2")
                                   else c["solver_type"]),
            algorithm_type=lambda c: ("dpmsolver++" if c["algorithm_type"] == "deis"
                                      else c["algorithm_type"]),
            prediction_type=prediction_option,
            sigma_schedule=lambda c: sigma_schedule_option(c, "DPMSolverSinglestepScheduler"),
            lower_order_final=config_key("lower_order_final"),
            final_sigmas_type=config_key("final_sigmas_type"),
            lambda_min_clipped=config_key("lambda_min_clipped"),
        ),
        must_be=dict(thresholding=(False,), use_flow_sigmas=(False,),
                     use_dynamic_shifting=(False,),
                     # learned variance: give the sampler a model_fn returning the mean only
                     variance_type=(None,),
                     prediction_type=("epsilon", "v_prediction", "sample")),
        no_effect=THRESHOLD_KEYS | {"flow_shift", "time_shift_type"},
        schedule_keys=SCHEDULE_KEYS_NO_RESCALE,  # diffusers ignores rescale_betas_zero_snr
    ),
)
SPECS = (DPM_SOLVER_SINGLESTEP,)
