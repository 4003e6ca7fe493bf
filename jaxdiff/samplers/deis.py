"""DEIS (Zhang & Chen 2022, "Fast Sampling of Diffusion Models with Exponential Integrator"),
multistep, orders 1-3, as one ``lax.scan``.

Semantics follow diffusers' ``DEISMultistepScheduler`` (0.42): ``algorithm_type="deis"`` with
``solver_type="logrho"`` (the only ones it implements), timestep spacing, Karras / exponential /
beta sigma schedules and ``lower_order_final``. Not covered: dynamic thresholding, flow sigmas and
flow prediction (a scheduler config asking for them is refused, naming the key).

The solver works in ``rho = sigma_t / alpha_t`` (the grid's ``sigma``): with ``alpha_t = 1 /
sqrt(rho^2 + 1)``, the probability-flow ODE is ``d(x / alpha) / d rho = eps(x, rho)``, so

    x_t = alpha_t (x_s / alpha_s + integral_{rho_s}^{rho_t} eps(rho) d rho),

and DEIS ("logrho") integrates the Lagrange polynomial through the last ``k`` noise predictions
in ``u = log rho`` exactly. Order 1 is DDIM; order ``k`` uses the ``k - 1`` previous steps' noise
predictions, kept in an explicit :class:`DEISState`. With ``w = log(rho_t / rho_s)``, the
integrals ``I_j = integral_{rho_s}^{rho_t} (u - u_s)^j d rho`` are ``I_0 = rho_t - rho_s``,
``I_1 = rho_t w - I_0`` and ``I_2 = rho_t w (w - 2) + 2 I_0``, and each coefficient is the basis
polynomial's combination of them (:func:`deis_coefficients`). diffusers writes each coefficient
as the difference of two values of an antiderivative that are up to ``(u_s - u_1)^-(k-1)`` times
larger than the coefficient, so its float32 coefficients lose digits on fine grids (many
third-order steps); here only ``I_1`` and ``I_2`` cancel, by ``1 / w`` and ``1 / w^2``, and the
trajectory stays within float32 rounding of diffusers' own arithmetic run in float64
(tests/parity/test_deis_parity.py).

Where this differs from diffusers: an eps model's output is used as the noise prediction as it is
(diffusers converts it to x0 and back, a rounding); ``"trailing"`` grids whose float ``arange``
overshoots to ``t = -1`` drop that entry (diffusers calls the model there); discrete grids that
repeat a timestep are refused (diffusers' higher-order updates divide by 0 there).

The pieces follow the sampler contract (:mod:`jaxdiff.samplers`): :func:`deis_timesteps` (the
grid), :func:`deis_orders` (each step's order), :func:`deis_coefficients` (a step's
coefficients), :func:`deis_step` (one update; the history in
:class:`DEISState`, created by :func:`deis_init`) and :func:`deis_sample` (one ``lax.scan``).
:data:`DEIS` declares it, with its diffusers twin ``DEISMultistepScheduler``.

    >>> from jaxdiff.schedules import make_schedule
    >>> grid = deis_timesteps(make_schedule("linear", 1000), 4)
    >>> grid.timesteps.tolist(), deis_orders(grid.sigmas, 3).tolist()
    ([999, 749, 500, 250], [1, 2, 2, 1])
"""

from __future__ import annotations

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
from jaxdiff.samplers.dpm_solver import dpm_solver_orders, dpm_solver_timesteps
from jaxdiff.samplers.driver import (
    check_start_step,
    checked_model,
    prepare_x_T,
    run_scan,
    strength_start_step,
)
from jaxdiff.samplers.sigmas import SIGMA_SCHEDULES
from jaxdiff.samplers.spec import DiffusersTwin, SamplerSpec
from jaxdiff.samplers.timesteps import Grid
from jaxdiff.schedules import Schedule
from jaxdiff.types import ModelFn
from jaxdiff.validation import check_bool, check_choice, check_int, concrete

__all__ = [
    "DEISState",
    "deis_timesteps",
    "deis_orders",
    "deis_init",
    "deis_coefficients",
    "deis_step",
    "deis_sample",
    "DEIS",
    "SPECS",
]


def deis_timesteps(
    schedule: Schedule,
    num_steps: int,
    *,
    spacing: str = "linspace",
    steps_offset: int = 0,
    sigma_schedule: str = "discrete",
) -> Grid:
    """DEIS's :class:`~jaxdiff.samplers.timesteps.Grid`: ``DEISMultistepScheduler.set_timesteps``
    (diffusers 0.42), timesteps ``[N]`` int32 (descending), their successors (``-1`` after the
    last) and sigmas ``[N + 1]``.

    It is DPM-Solver's grid (:func:`~jaxdiff.samplers.dpm_solver.dpm_solver_timesteps`, whose
    docstring lists what raises) with ``final_sigmas_type="sigma_min"``: ``sigma_schedule=
    "discrete"`` spaces the timesteps by ``spacing`` (``"linspace"``, ``"leading"`` plus
    ``steps_offset``, ``"trailing"``) and ends at the training sigma of ``t = 0``;
    ``"karras"`` (timesteps rounded, whatever the ``beta_schedule``), ``"exponential"`` or
    ``"beta"`` (timesteps truncated) put ``num_steps`` sigmas over the whole training range and
    repeat the last one (diffusers' ``sigmas[-1:]``), so the last step does not move.

    Raises:
      ValueError: naming the argument, for an unknown option (``sigma_schedule`` is one of
        :data:`~jaxdiff.samplers.sigmas.SIGMA_SCHEDULES`: DPM-Solver's ``"lu"`` is not
        DEIS's), ``num_steps`` outside ``[1, T]`` or repeating discrete timesteps (diffusers'
        higher-order update divides by 0 there), ``steps_offset`` pushing a timestep to ``>= T``.
    """
    check_choice("sigma_schedule", sigma_schedule, SIGMA_SCHEDULES)
    grid = dpm_solver_timesteps(schedule, num_steps, spacing=spacing, steps_offset=steps_offset,
                                final_sigmas_type="sigma_min", sigma_schedule=sigma_schedule,
                                round_timesteps=True)
    if sigma_schedule == "discrete":
        return grid
    sigmas = np.array(grid.sigmas)
    sigmas[-1] = sigmas[-2]
    return Grid(grid.timesteps, grid.prev_timesteps, sigmas)


def deis_orders(sigmas: np.ndarray, solver_order: int = 2, *, lower_order_final: bool = True,
                start_step: int = 0) -> np.ndarray:
    """Each step's order, ``[N]`` int32, as ``DEISMultistepScheduler.step`` chooses it on a grid
    with ``sigmas [N + 1]``: ``min(solver_order, i - start_step + 1)`` (the warm-up, counted from
    the first step that runs; the steps before it, which do not run, read 1), then with
    ``lower_order_final`` and ``N < 15`` order 1 on the last step and at most 2 on the one
    before; a step between equal sigmas (the last of a Karras grid) is order 1 (every order
    gives ``x`` there).

    Raises:
      ValueError: naming ``solver_order`` outside 1-3, ``lower_order_final`` not a bool,
        ``start_step`` outside ``[0, N)``.
    """
    k = check_int("solver_order", solver_order, 1, 3)
    lower_order_final = check_bool("lower_order_final", lower_order_final)
    sigmas = np.asarray(sigmas)
    n = len(sigmas) - 1
    start = check_start_step(start_step, n)
    orders = dpm_solver_orders(n, sigmas, k, lower_order_final)
    return np.minimum(orders, np.maximum(np.arange(n) - start + 1, 1)).astype(np.int32)


class DEISState(NamedTuple):
    """The multistep history carried between :func:`deis_step` calls.

    Attributes:
      prev_eps: ``[B, ...]`` the previous step's noise prediction (zeros before the first step).
      prev_sigma: scalar float32, the previous step's sigma (the first sigma before the first
        step; unused there, since the first step is first order).
      older_eps: ``[B, ...]`` the noise prediction of the step before that (third order only;
        ``None`` in a two-field state, which supports orders 1 and 2).
      older_sigma: scalar float32, its sigma (``None`` with ``older_eps``).
    """

    prev_eps: jax.Array
    prev_sigma: jax.Array
    older_eps: jax.Array | None = None
    older_sigma: jax.Array | None = None


def deis_init(x_T: jax.Array, sigma: jax.Array | float, solver_order: int = 3) -> DEISState:
    """The empty history of a trajectory starting at ``x_T: [B, ...]`` with sigma ``sigma``: four
    fields for ``solver_order=3``, two (orders 1 and 2 only) otherwise."""
    k = check_int("solver_order", solver_order, 1, 3)
    zeros = jnp.zeros(jnp.shape(x_T), jnp.result_type(x_T))
    if k < 3:
        return DEISState(zeros, jnp.float32(sigma))
    return DEISState(zeros, jnp.float32(sigma), zeros, jnp.float32(sigma))


def deis_coefficients(
    sigma: jax.Array | float,
    sigma_next: jax.Array | float,
    prev_sigma: jax.Array | float,
    older_sigma: jax.Array | float | None = None,
    *,
    order: int | jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The coefficients ``(c_0, c_1, c_2)`` (float32 scalars) of one DEIS step from ``rho_s =
    sigma`` to ``rho_t = sigma_next``: ``x_t = alpha_t (x_s / alpha_s + c_0 eps + c_1 eps_1 + c_2
    eps_2)`` with ``eps_1``, ``eps_2`` the noise predictions at ``prev_sigma`` and
    ``older_sigma``. ``c_j`` is the integral over ``[rho_s, rho_t]`` of the Lagrange basis
    polynomial (in ``log rho``) of node ``j`` among the ``order`` nodes ``sigma, prev_sigma,
    older_sigma``; the coefficients beyond ``order`` are 0 (order 1: ``c_0 = rho_t - rho_s``).

    ``order`` may be traced (1, 2 or 3; 3 needs ``older_sigma``). The sigmas must be > 0 and
    distinct where used, except ``sigma_next = sigma`` (all coefficients 0) and ``sigma_next =
    0`` at order 1. Where a term is unused its logarithms read harmless values, so that neither
    the selected coefficients nor their gradients see inf or NaN.

    Raises:
      ValueError: naming ``order`` for a concrete order outside 1-3 (1-2 without
        ``older_sigma``).
    """
    c = concrete(order)
    allowed = (1, 2) if older_sigma is None else (1, 2, 3)
    if c is not None and (c.shape != () or int(c) not in allowed):
        hint = " (3 needs older_sigma)" if older_sigma is None else ""
        raise ValueError(f"order must be one of {allowed}{hint}, got {order!r}")
    rho_s, rho_t = jnp.float32(sigma), jnp.float32(sigma_next)
    second, third = order >= 2, order >= 3
    # The integrals I_j of (u - u_s)^j d rho over [rho_s, rho_t], u = log rho (module docstring).
    log_s = jnp.log(rho_s)
    w = jnp.where(second, jnp.log(jnp.where(second, rho_t, rho_s)) - log_s, 0.0)
    i0 = rho_t - rho_s
    i1 = rho_t * w - i0
    a = jnp.where(second, jnp.log(jnp.float32(prev_sigma)) - log_s, 1.0)  # u_1 - u_s
    # order 2: the line through (u_s, eps), (u_1, eps_1)
    c0 = jnp.where(second, i0 - i1 / a, i0)
    c1 = jnp.where(second, i1 / a, 0.0)
    c2 = jnp.zeros_like(c0)
    if older_sigma is not None:  # order 3: the parabola through the three nodes
        i2 = rho_t * w * (w - 2.0) + 2.0 * i0
        b = jnp.where(third, jnp.log(jnp.float32(older_sigma)) - log_s, a + 1.0)  # u_2 - u_s
        c0 = jnp.where(third, (i2 - (a + b) * i1 + a * b * i0) / (a * b), c0)
        c1 = jnp.where(third, (i2 - b * i1) / (a * (a - b)), c1)
        c2 = jnp.where(third, (i2 - a * i1) / (b * (b - a)), c2)
    return c0, c1, c2


def deis_step(
    state: DEISState,
    model_output: jax.Array,
    x: jax.Array,
    sigma: jax.Array | float,
    sigma_next: jax.Array | float,
    *,
    order: int | jax.Array,
    prediction_type: str = "eps",
) -> tuple[DEISState, jax.Array, jax.Array]:
    """One multistep DEIS (log-rho) update from sigma ``sigma`` to ``sigma_next``
    (``DEISMultistepScheduler.step``).

    Args:
      state: the history (:func:`deis_init` before the first step).
      model_output: ``[B, ...]`` eps, x0 or v by ``prediction_type``, at ``x``.
      x: ``[B, ...]`` the current sample (at least float32).
      sigma: scalar ``sqrt((1 - abar) / abar) > 0`` of the current timestep (``rho_s``).
      sigma_next: scalar sigma of the next one (``rho_t``; ``> 0`` for orders 2 and 3, ``0``
        allowed for order 1, which then returns the predicted x0).
      order: 1, 2 or 3 (may be traced); order ``k`` uses the ``k - 1`` noise predictions in
        ``state`` (3 needs a four-field state).
      prediction_type: ``"eps"``, ``"x0"`` or ``"v"``.

    Returns:
      ``(state, x_next, pred_x0)``: the history with this step's noise prediction pushed in,
      ``x_next: [B, ...]`` in ``x``'s dtype, the data prediction ``[B, ...]``.

    Raises:
      ValueError: naming the argument, for an unknown ``prediction_type``, a concrete ``order``
        outside 1-3 (or 3 with a two-field state), a mis-shaped ``model_output``.
    """
    kind = canonical_prediction_type(prediction_type)
    has_third = state.older_eps is not None
    c = concrete(order)
    if c is not None and (c.shape != () or int(c) not in ((1, 2, 3) if has_third else (1, 2))):
        raise ValueError(f"order must be 1 or 2{' or 3' if has_third else ''} "
                         f"({'four' if has_third else 'two'}-field state), got {order!r}")
    if jnp.shape(model_output) != jnp.shape(x):
        raise ValueError(f"model_output must have x's shape {jnp.shape(x)}, got "
                         f"{jnp.shape(model_output)}")
    out = model_output.astype(x.dtype)  # a bf16 model output joins the >= float32 carry
    rho_s, rho_t = jnp.float32(sigma), jnp.float32(sigma_next)
    a_s = 1.0 / jnp.sqrt(rho_s**2 + 1.0)
    a_t = 1.0 / jnp.sqrt(rho_t**2 + 1.0)
    x0, eps = x0_and_eps(out, x, a_s, rho_s * a_s, kind)
    c0, c1, c2 = deis_coefficients(rho_s, rho_t, state.prev_sigma, state.older_sigma,
                                   order=order)
    integral = c0 * eps + c1 * state.prev_eps
    if has_third:
        integral = integral + c2 * state.older_eps
    x_next = (a_t * (x / a_s + integral)).astype(x.dtype)
    if has_third:
        new_state = DEISState(eps, rho_s, state.prev_eps, state.prev_sigma)
    else:
        new_state = DEISState(eps, rho_s)
    return new_state, x_next, x0


def deis_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array | None = None,
    *,
    num_steps: int,
    solver_order: int = 2,
    prediction_type: str = "eps",
    spacing: str = "linspace",
    steps_offset: int = 0,
    sigma_schedule: str = "discrete",
    lower_order_final: bool = True,
    noise: jax.Array | None = None,
    return_trajectory: bool = False,
    strength: float = 1.0,
    after_step=None,
):
    """DEIS sampling from ``x_T: [B, ...]`` in one ``lax.scan``.

    Args:
      model_fn: ``model_fn(x [B, ...], t [B] int32) -> output [B, ...]`` of ``prediction_type``.
      schedule: the training schedule.
      x_T: ``[B, ...]`` the starting noise (standard normal), carried in at least float32.
      key: unused (DEIS is deterministic); may be ``None``.
      num_steps: number of model evaluations (10-25 is typical).
      solver_order: 1 (DDIM), 2 or 3 (diffusers recommends 2 for guided sampling, 3 for
        unguided).
      prediction_type: ``"eps"``, ``"x0"`` or ``"v"``.
      spacing, steps_offset, sigma_schedule: the grid, see :func:`deis_timesteps`.
      lower_order_final: lower the order on the last two steps when ``num_steps < 15``
        (:func:`deis_orders`).
      noise: accepted for the common contract, shape-checked (``[M, B, ...]``, ``M`` the steps
        that run) and unused.
      return_trajectory: also return the path.
      strength: image-to-image strength in ``(0, 1]``: run the grid's steps ``s .. N - 1`` only,
        ``s = num_steps - int(num_steps * strength)``, from ``x_T`` noised to ``sigmas[s]``
        (:func:`jaxdiff.samplers.noise_to_img2img`). The history starts empty there, so the
        tail warms up at lower order, as diffusers' scheduler does after ``set_begin_index``;
        ``lower_order_final`` still counts the whole grid. 1 (the default) is text-to-image.
      after_step: optional ``(x_next, i) -> x_next`` applied to each step's output
        (:func:`jaxdiff.samplers.driver.run_scan`; 4-channel inpainting's blending).

    Returns:
      ``x_0`` ``[B, ...]`` float32 (or wider), or with ``return_trajectory`` ``(x_0, xs [M + 1,
      B, ...], pred_x0s [M, B, ...])`` (``xs[0]`` is ``x_T``).

    Raises:
      ValueError: naming the argument, for a bad grid or option, a mis-shaped model output or
        ``noise``.
    """
    kind = canonical_prediction_type(prediction_type)
    solver_order = check_int("solver_order", solver_order, 1, 3)
    lower_order_final = check_bool("lower_order_final", lower_order_final)
    x_T = prepare_x_T(x_T)
    grid = deis_timesteps(schedule, num_steps, spacing=spacing, steps_offset=steps_offset,
                          sigma_schedule=sigma_schedule)
    ts, sigmas = grid.timesteps, grid.sigmas
    n = len(ts)
    start = check_start_step(strength_start_step(num_steps, strength), n)
    orders = deis_orders(sigmas, solver_order, lower_order_final=lower_order_final,
                         start_step=start)
    model = checked_model(model_fn, x_T.shape)
    ts_j, sig_j, ord_j = jnp.asarray(ts), jnp.asarray(sigmas), jnp.asarray(orders)

    def body(state, x, i, z):
        return deis_step(state, model(x, ts_j[i]), x, sig_j[i], sig_j[i + 1], order=ord_j[i],
                         prediction_type=kind)

    init = deis_init(x_T, sigmas[start], solver_order)
    return run_scan(body, init, x_T, key, n, stochastic=False, noise=noise,
                    return_trajectory=return_trajectory, start_step=start,
                    after_step=after_step)


def _grid(schedule: Schedule, num_steps: int, *, strength: float = 1.0, spacing: str = "linspace",
          steps_offset: int = 0, sigma_schedule: str = "discrete", **_) -> Grid:
    return deis_timesteps(schedule, num_steps, spacing=spacing, steps_offset=steps_offset,
                          sigma_schedule=sigma_schedule)


DEIS = SamplerSpec(
    name="deis",
    after_step=True,
    sample=deis_sample,
    grid=_grid,
    options=dict(solver_order=2, prediction_type="eps", spacing="linspace", steps_offset=0,
                 sigma_schedule="discrete", lower_order_final=True),
    noise_space="sigma_vp",
    stochastic=lambda o: False,
    diffusers=DiffusersTwin(
        "DEISMultistepScheduler",
        defaults=dict(solver_order=2, prediction_type="epsilon", thresholding=False,
                      dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                      algorithm_type="deis", solver_type="logrho", lower_order_final=True,
                      use_karras_sigmas=False, use_exponential_sigmas=False,
                      use_beta_sigmas=False, use_flow_sigmas=False, flow_shift=1.0,
                      timestep_spacing="linspace", steps_offset=0, use_dynamic_shifting=False,
                      time_shift_type="exponential"),
        options=dict(
            solver_order=config_key("solver_order"),
            prediction_type=prediction_option,
            spacing=config_key("timestep_spacing"),
            steps_offset=config_key("steps_offset"),
            sigma_schedule=lambda c: sigma_schedule_option(c, "DEISMultistepScheduler"),
            lower_order_final=config_key("lower_order_final"),
        ),
        must_be=dict(thresholding=(False,), use_flow_sigmas=(False,),
                     use_dynamic_shifting=(False,),
                     prediction_type=("epsilon", "v_prediction", "sample"),
                     # the class maps the DPM-Solver / UniPC names onto its only ones
                     algorithm_type=("deis", "dpmsolver", "dpmsolver++"),
                     solver_type=("logrho", "midpoint", "heun", "bh1", "bh2")),
        no_effect=THRESHOLD_KEYS | {"flow_shift", "time_shift_type", "algorithm_type",
                                    "solver_type"},
        schedule_keys=SCHEDULE_KEYS_NO_RESCALE,  # diffusers ignores rescale_betas_zero_snr
    ),
)
SPECS = (DEIS,)
