"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"), multistep, orders 1-3, as one ``lax.scan``.

Semantics follow diffusers' ``UniPCMultistepScheduler`` (0.42): the predictor UniP-p and the
corrector UniC-p in their ``B(h)`` forms (``solver_type`` ``"bh1"``: ``B(h) = h``; ``"bh2"``:
``B(h) = e^h - 1``), data prediction (``predict_x0=True``) or noise prediction,
``lower_order_final``, ``disable_corrector``, ``final_sigmas_type`` and the timestep spacings (the
grid is DPM-Solver's: :func:`~jaxdiff.samplers.dpm_solver.dpm_solver_timesteps`).

With ``alpha = 1 / sqrt(sigma^2 + 1)``, ``sigma_t = sigma alpha``, ``lambda = log(alpha / sigma_t)``
and ``h = lambda_t - lambda_s0``, the data-prediction predictor of order ``p`` is

    x_t = sigma_t / sigma_s0 x - alpha_t (e^{-h} - 1) m_0 - alpha_t B(-h) sum_k rho_k D_k,

``D_k = (m_k - m_0) / r_k`` over the previous outputs ``m_k`` at ``r_k = (lambda_k - lambda_s0) /
h``, ``rho`` solving the order conditions ``R rho = b`` (``rho = 1/2`` at order 2). The corrector
re-runs the same update from the previous sample, with the model output at ``x_t`` as one more
difference; since that output is the next step's model evaluation, UniPC costs one evaluation per
step. Each scan step therefore does: evaluate the model at ``x``; correct ``x`` (UniC, from the
previous step's sample and history); predict the next sample (UniP) from the corrected ``x``.

Where this differs from diffusers (which returns NaN or inf, or raises, in these cases): a step to
``sigma = 0`` (``final_sigmas_type="zero"``, the last step) returns the data prediction, the
first-order update's limit. diffusers gets that value only for ``solver_type="bh2"`` with
``predict_x0=True`` and a first-order last step (``lower_order_final=True``, its defaults); its
``bh1`` multiplies ``B(h) = -inf`` by 0 (NaN), its noise-prediction update ``0 * inf`` (NaN), and a
higher-order last step divides by ``r_k = 0`` (inf, or a singular solve for order 3). So a final
step to ``sigma = 0`` is first order here whatever ``lower_order_final`` says, as in diffusers'
``DPMSolverMultistepScheduler``.

The pieces follow the sampler contract (:mod:`jaxdiff.samplers`): :func:`unipc_timesteps` (the
grid), :func:`unipc_orders` (each step's predictor order and whether it corrects),
:func:`unipc_step` (one update, with the history in an explicit :class:`UniPCState` from
:func:`unipc_init`) and :func:`unipc_sample` (one ``lax.scan``).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

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
from jaxdiff.samplers.dpm_solver import dpm_solver_timesteps
from jaxdiff.samplers.driver import (
    check_start_step,
    checked_model,
    prepare_x_T,
    run_scan,
    strength_start_step,
)
from jaxdiff.samplers.sigmas import alpha_sigma_lambda
from jaxdiff.samplers.spec import DiffusersTwin, SamplerSpec
from jaxdiff.samplers.timesteps import Grid
from jaxdiff.schedules import Schedule
from jaxdiff.types import ModelFn
from jaxdiff.validation import check_bool, check_choice, check_clip, check_int

__all__ = [
    "UNIPC_SIGMA_SCHEDULES",
    "UNIPC_SOLVER_TYPES",
    "UniPCState",
    "unipc_timesteps",
    "unipc_orders",
    "unipc_init",
    "unipc_step",
    "unipc_sample",
    "UNIPC",
    "SPECS",
]

UNIPC_SOLVER_TYPES = ("bh1", "bh2")
UNIPC_SIGMA_SCHEDULES = ("discrete", "karras", "exponential", "beta")
_FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
MAX_ORDER = 3


def unipc_timesteps(
    schedule: Schedule,
    num_steps: int,
    *,
    spacing: str = "linspace",
    steps_offset: int = 0,
    final_sigmas_type: str = "zero",
    sigma_schedule: str = "discrete",
) -> Grid:
    """UniPC's :class:`~jaxdiff.samplers.timesteps.Grid`: ``UniPCMultistepScheduler.set_timesteps``
    (diffusers 0.42), which is DPM-Solver's grid
    (:func:`~jaxdiff.samplers.dpm_solver.dpm_solver_timesteps`, whose docstring lists what
    raises): timesteps ``[N]`` int32 descending, their successors, sigmas ``[N + 1]`` ending in
    ``0`` (``final_sigmas_type="zero"``) or the sigma of ``t = 0`` (``"sigma_min"``).

    ``sigma_schedule``: ``"discrete"`` (the training sigmas at the spaced timesteps), or
    ``"karras"`` / ``"exponential"`` / ``"beta"`` (diffusers' ``use_karras_sigmas`` /
    ``use_exponential_sigmas`` / ``use_beta_sigmas``: ``num_steps`` sigmas over the whole training
    range, at timesteps interpolated from them, rounded for Karras and truncated otherwise, as
    UniPC has it for every ``beta_schedule``; ``spacing`` then does not matter).
    """
    check_choice("final_sigmas_type", final_sigmas_type, _FINAL_SIGMAS_TYPES)
    check_choice("sigma_schedule", sigma_schedule, UNIPC_SIGMA_SCHEDULES)
    return dpm_solver_timesteps(schedule, num_steps, spacing=spacing, steps_offset=steps_offset,
                                final_sigmas_type=final_sigmas_type,
                                sigma_schedule=sigma_schedule, round_timesteps=True)


def _disabled_steps(disable_corrector: Any) -> tuple[int, ...]:
    if isinstance(disable_corrector, (str, bytes)) or not isinstance(
        disable_corrector, (Sequence, np.ndarray, set, frozenset)
    ):
        raise ValueError(
            f"disable_corrector must be a sequence of step indices (ints >= 0), got "
            f"{disable_corrector!r}"
        )
    return tuple(sorted(check_int("disable_corrector", i, 0) for i in disable_corrector))


def unipc_orders(
    sigmas: np.ndarray,
    solver_order: int = 2,
    *,
    lower_order_final: bool = True,
    disable_corrector: Sequence[int] = (),
    use_corrector: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Each step's predictor order and whether it applies the corrector, as diffusers decides them.

    Step ``i`` of ``N`` predicts with order ``min(solver_order, i + 1, N - i)`` (without
    ``lower_order_final``: ``min(solver_order, i + 1)``), and order 1 where it steps to
    ``sigma = 0`` or does not move (``sigma_{i+1} == sigma_i``: ``final_sigmas_type="sigma_min"``
    after a grid ending at ``t = 0``); see the module docstring. Step ``i > 0`` first corrects its
    input (the result of step ``i - 1``'s predictor) unless ``i - 1`` is in ``disable_corrector``
    (diffusers' convention) or ``use_corrector`` is false; step 0 has nothing to correct.

    Args:
      sigmas: ``[N + 1]`` the grid's sigmas.
      solver_order: 1, 2 or 3.
      lower_order_final: lower the order on the last steps.
      disable_corrector: step indices whose predictor result is not corrected.
      use_corrector: false for no corrector at all (UniP alone).

    Returns:
      ``(orders [N] int32, corrects [N] bool)``.
    """
    k = check_int("solver_order", solver_order, 1, MAX_ORDER)
    lower_order_final = check_bool("lower_order_final", lower_order_final)
    disabled = _disabled_steps(disable_corrector)
    use_corrector = check_bool("use_corrector", use_corrector)
    sigmas = np.asarray(sigmas)
    n = len(sigmas) - 1
    idx = np.arange(n)
    orders = np.minimum(k, idx + 1)
    if lower_order_final:
        orders = np.minimum(orders, n - idx)
    orders = np.where((sigmas[1:] == 0) | (sigmas[1:] == sigmas[:-1]), 1, orders)
    corrects = (idx > 0) & ~np.isin(idx - 1, disabled) & use_corrector
    return orders.astype(np.int32), corrects


class UniPCState(NamedTuple):
    """The multistep history carried between :func:`unipc_step` calls.

    Attributes:
      outputs: ``[K, B, ...]`` the last ``K = solver_order`` converted model outputs (data
        predictions with ``predict_x0``, else noise predictions), oldest first; zeros until
        filled.
      sigmas: ``[K]`` float32, the sigmas those outputs were evaluated at (ones until filled).
      last_sample: ``[B, ...]`` the sample the last predictor started from (the corrector's
        starting point).
      last_order: scalar int32, the last predictor's order (the corrector's order); 0 before the
        first step.
    """

    outputs: jax.Array
    sigmas: jax.Array
    last_sample: jax.Array
    last_order: jax.Array


def unipc_init(x_T: jax.Array, solver_order: int = 2) -> UniPCState:
    """The empty history for a trajectory starting at ``x_T: [B, ...]``, holding
    ``solver_order`` (1-3) model outputs."""
    k = check_int("solver_order", solver_order, 1, MAX_ORDER)
    dtype = jnp.result_type(x_T)
    return UniPCState(
        jnp.zeros((k, *jnp.shape(x_T)), dtype),
        jnp.ones((k,), jnp.float32),
        jnp.zeros(jnp.shape(x_T), dtype),
        jnp.int32(0),
    )


def _bh_update(outputs, sigmas, x, sigma_t, order, model_t, *, predict_x0, solver_type):
    """diffusers' ``multistep_uni_p_bh_update`` (``model_t is None``) or
    ``multistep_uni_c_bh_update`` (``model_t``: the converted output at the predicted sample), of
    traced ``order`` in ``[1, K]``, from ``x`` at the newest history sigma ``sigmas[-1]`` to
    ``sigma_t``. The history (``outputs [K, B, ...]``, ``sigmas [K]``) is newest last. Scalars are
    float32 in diffusers' order of operations; every order's coefficients are computed and the
    traced order selects one set (the unused sets may be NaN where the history is not yet filled;
    the differences they would weight are guarded, so nothing non-finite leaks)."""
    K = outputs.shape[0]
    corrector = model_t is not None
    m0 = outputs[-1]
    alpha_t, sig_t, lam_t = alpha_sigma_lambda(sigma_t)
    alpha_s0, sig_s0, lam_s0 = alpha_sigma_lambda(sigmas[-1])
    h = lam_t - lam_s0
    hh = -h if predict_x0 else h
    h_phi_1 = jnp.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    B_h = hh if solver_type == "bh1" else jnp.expm1(hh)
    b, factorial = [], 1
    for i in range(1, MAX_ORDER + 1):
        b.append(h_phi_k * factorial / B_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    # r_j and D_j for the older outputs j = 0 .. K - 2 (outputs[-(j + 2)]); r is replaced by 1
    # where this order does not use D_j, whose weight is then exactly 0.
    rks = [(alpha_sigma_lambda(sigmas[-(j + 2)])[2] - lam_s0) / h for j in range(K - 1)]
    d1s = [(outputs[-(j + 2)] - m0) / jnp.where(j < order - 1, rks[j], 1.0) for j in range(K - 1)]
    zero, half = jnp.float32(0.0), jnp.float32(0.5)
    # Per order p = 1..K: the weights of D_0, D_1 (padded to MAX_ORDER - 1) and, for the
    # corrector, of D_t = model_t - m0.
    cands = []
    for p in range(1, K + 1):
        if corrector:
            if p == 1:
                rho = [zero, zero, half]
            else:
                rk = jnp.stack(rks[: p - 1] + [jnp.float32(1.0)])
                R = jnp.stack([rk**i for i in range(p)])
                sol = jnp.linalg.solve(R, jnp.stack(b[:p]))
                rho = [sol[j] for j in range(p - 1)] + [zero] * (MAX_ORDER - p) + [sol[-1]]
        elif p == 1:
            rho = [zero, zero, zero]
        elif p == 2:
            rho = [half, zero, zero]
        else:
            R = jnp.stack([jnp.ones((2,), jnp.float32), jnp.stack(rks[:2])])
            sol = jnp.linalg.solve(R, jnp.stack(b[:2]))
            rho = [sol[0], sol[1], zero]
        cands.append(jnp.stack(rho))
    rho = jnp.stack(cands)[jnp.asarray(order) - 1]
    if predict_x0:
        x_t_ = sig_t / sig_s0 * x - alpha_t * h_phi_1 * m0
        scale = alpha_t
    else:
        x_t_ = alpha_t / alpha_s0 * x - sig_t * h_phi_1 * m0
        scale = sig_t
    if K == 1 and not corrector:
        return x_t_  # order 1: no correction term (diffusers: x_t_ - scale * B_h * 0)
    res = None
    for j in range(K - 1):
        term = rho[j] * d1s[j]
        res = term if res is None else res + term
    if corrector:
        term = rho[-1] * (model_t - m0)
        res = term if res is None else res + term
    x_t = x_t_ - scale * B_h * res
    # Order 1 takes x_t_ itself: diffusers' x_t_ - scale * B_h * 0, without its 0 * inf.
    return x_t if corrector else jnp.where(jnp.asarray(order) == 1, x_t_, x_t)


def unipc_step(
    state: UniPCState,
    model_output: jax.Array,
    x: jax.Array,
    sigma: jax.Array | float,
    sigma_next: jax.Array | float,
    *,
    order: int | jax.Array,
    use_corrector: bool | jax.Array = True,
    prediction_type: str = "eps",
    solver_type: str = "bh2",
    predict_x0: bool = True,
    clip_x0: float | None = None,
) -> tuple[UniPCState, jax.Array, jax.Array]:
    """One UniPC step (``UniPCMultistepScheduler.step``): convert the model output, correct ``x``
    (UniC, when ``use_corrector`` and a previous step exists), then predict the sample at
    ``sigma_next`` (UniP) from the corrected ``x``.

    Args:
      state: the history (:func:`unipc_init` before the first step).
      model_output: ``[B, ...]`` eps, x0 or v by ``prediction_type``, at ``x``.
      x: ``[B, ...]`` the current sample (the previous step's prediction; at least float32).
      sigma: scalar ``sqrt((1 - abar) / abar)`` of the current timestep.
      sigma_next: scalar, of the next one (``0``: return the data prediction).
      order: the predictor's order, ``1 <= order <= min(K, steps so far + 1)`` with ``K`` the
        history length; an int or a traced int32 scalar (see :func:`unipc_orders`). The corrector
        uses the previous step's order (kept in ``state``).
      use_corrector: whether to correct ``x``; a bool or a traced bool scalar. No effect on the
        first step.
      prediction_type: ``"eps"``, ``"x0"`` or ``"v"`` (or diffusers' names).
      solver_type: ``"bh1"`` or ``"bh2"``.
      predict_x0: the data-prediction (``True``) or noise-prediction form of the updates.
      clip_x0: clip the data prediction to ``[-clip_x0, clip_x0]`` (``predict_x0`` only); ``None``
        for no clipping.

    Returns:
      ``(state, x_next, pred_x0)``: the updated history, ``x_next: [B, ...]`` in ``x``'s dtype and
      the data prediction ``[B, ...]`` at (the uncorrected) ``x``.
    """
    kind = canonical_prediction_type(prediction_type)
    check_choice("solver_type", solver_type, UNIPC_SOLVER_TYPES)
    predict_x0 = check_bool("predict_x0", predict_x0)
    clip_x0 = check_clip(clip_x0)
    if clip_x0 is not None and not predict_x0:
        raise ValueError("clip_x0 clips the data prediction, which predict_x0=False does not "
                         "use: leave clip_x0=None")
    if jnp.shape(model_output) != jnp.shape(x):
        raise ValueError(f"model_output must have x's shape {jnp.shape(x)}, got "
                         f"{jnp.shape(model_output)}")
    if jnp.shape(state.outputs)[1:] != jnp.shape(x):
        raise ValueError(f"state holds outputs of shape {jnp.shape(state.outputs)[1:]}, but x has "
                         f"shape {jnp.shape(x)}")
    if isinstance(order, (int, np.integer)):
        check_int("order", order, 1, state.outputs.shape[0])
    out = model_output.astype(x.dtype)  # a bf16 model output joins the >= float32 carry
    sigma, sigma_next = jnp.float32(sigma), jnp.float32(sigma_next)
    alpha, sig, _ = alpha_sigma_lambda(sigma)
    x0, eps = x0_and_eps(out, x, alpha, sig, kind)
    if clip_x0 is not None:
        x0 = jnp.clip(x0, -clip_x0, clip_x0)
    m_t = x0 if predict_x0 else eps
    kw = dict(predict_x0=predict_x0, solver_type=solver_type)
    corrected = _bh_update(state.outputs, state.sigmas, state.last_sample, sigma,
                           jnp.maximum(state.last_order, 1), m_t, **kw)
    x = jnp.where(jnp.asarray(use_corrector) & (state.last_order > 0), corrected, x).astype(x.dtype)
    outputs = jnp.concatenate([state.outputs[1:], m_t[None]])
    sigmas = jnp.concatenate([state.sigmas[1:], sigma[None]])
    x_next = _bh_update(outputs, sigmas, x, sigma_next, order, None, **kw)
    x_next = jnp.where(sigma_next == 0, x0, x_next).astype(x.dtype)
    return UniPCState(outputs, sigmas, x, jnp.asarray(order, jnp.int32)), x_next, x0


def unipc_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array | None = None,
    *,
    num_steps: int,
    solver_order: int = 2,
    solver_type: str = "bh2",
    predict_x0: bool = True,
    prediction_type: str = "eps",
    spacing: str = "linspace",
    steps_offset: int = 0,
    sigma_schedule: str = "discrete",
    lower_order_final: bool = True,
    final_sigmas_type: str = "zero",
    use_corrector: bool = True,
    disable_corrector: Sequence[int] = (),
    clip_x0: float | None = None,
    noise: jax.Array | None = None,
    return_trajectory: bool = False,
    strength: float = 1.0,
    after_step=None,
):
    """Deterministic UniPC sampling from ``x_T: [B, ...]`` in one ``lax.scan``
    (``UniPCMultistepScheduler``; one model evaluation per step).

    Args:
      model_fn: ``model_fn(x [B, ...], t [B] int32) -> output [B, ...]`` of ``prediction_type``.
      schedule: the training schedule.
      x_T: ``[B, ...]`` the starting noise, carried in at least float32.
      key: accepted and unused (this solver is deterministic; may be ``None``), so that every
        sampler has the signature ``(model_fn, schedule, x_T, key, *, num_steps, ...)``.
      num_steps: number of model evaluations (5-25 is typical).
      solver_order: 1, 2 or 3 (diffusers recommends 2 for guided sampling, 3 for unconditional).
      solver_type: ``"bh1"`` (``B(h) = h``; diffusers suggests it for unconditional sampling
        with few steps) or ``"bh2"`` (``B(h) = e^h - 1``).
      predict_x0: the data-prediction (``True``) or noise-prediction form (UniPC's ``x`` / ``eps``
        variants).
      prediction_type: ``"eps"``, ``"x0"`` or ``"v"`` (or diffusers' names).
      spacing, steps_offset, final_sigmas_type, sigma_schedule: see :func:`unipc_timesteps`.
      lower_order_final: lower the order on the last steps (diffusers does so for any number of
        steps).
      use_corrector: ``False`` for the predictor alone (UniP).
      disable_corrector: step indices whose predictor result is not corrected (diffusers' list).
      clip_x0: clip the data prediction to ``[-clip_x0, clip_x0]`` (None: no clipping; only with
        ``predict_x0``).
      noise: accepted for the common contract: ``[M, B, ...]`` (``M`` the steps that run) is
        shape-checked and unused (deterministic).
      return_trajectory: also return the path.
      strength: image-to-image strength in ``(0, 1]``: run the grid's steps ``s .. N - 1``
        only, ``s = num_steps - int(num_steps * strength)``, from ``x_T`` noised to
        ``sigmas[s]`` (:func:`jaxdiff.samplers.noise_to_img2img`). The history starts empty
        there: the tail warms up at lower order and its first step has nothing to correct, as
        diffusers' scheduler after ``set_begin_index``; ``lower_order_final`` still counts the
        whole grid. 1 (the default) is text-to-image.
      after_step: optional ``(x_next, i) -> x_next`` applied to each step's output
        (:func:`jaxdiff.samplers.driver.run_scan`; 4-channel inpainting's blending).

    Returns:
      ``x_0`` ``[B, ...]`` float32 (or wider), or with ``return_trajectory`` ``(x_0, xs [N + 1,
      B, ...], pred_x0s [N, B, ...])`` (``xs[0]`` is ``x_T``; ``xs[i + 1]`` is step ``i``'s
      prediction, before the next step corrects it, as diffusers' ``prev_sample``).

    Raises:
      ValueError: naming the argument, for a bad grid or option or a mis-shaped model output.
    """
    kind = canonical_prediction_type(prediction_type)
    solver_order = check_int("solver_order", solver_order, 1, MAX_ORDER)
    check_choice("solver_type", solver_type, UNIPC_SOLVER_TYPES)
    predict_x0 = check_bool("predict_x0", predict_x0)
    clip_x0 = check_clip(clip_x0)
    if clip_x0 is not None and not predict_x0:
        raise ValueError("clip_x0 clips the data prediction, which predict_x0=False does not "
                         "use: leave clip_x0=None")
    x_T = prepare_x_T(x_T)
    grid = unipc_timesteps(schedule, num_steps, spacing=spacing, steps_offset=steps_offset,
                           final_sigmas_type=final_sigmas_type, sigma_schedule=sigma_schedule)
    ts, sigmas = grid.timesteps, grid.sigmas
    orders, corrects = unipc_orders(sigmas, solver_order, lower_order_final=lower_order_final,
                                    disable_corrector=disable_corrector,
                                    use_corrector=use_corrector)
    start = check_start_step(strength_start_step(num_steps, strength), len(ts))
    # warm-up counted from the first step that runs; that step has no predictor to correct.
    # `idx > start` is already implied by the state (unipc_init's last_order = 0 at the first
    # step that runs, and unipc_step corrects only where last_order > 0): kept so that
    # `corrects` says on its own which steps correct.
    idx = np.arange(len(ts))
    orders = np.minimum(orders, np.maximum(idx - start + 1, 1)).astype(np.int32)
    corrects = corrects & (idx > start)
    model = checked_model(model_fn, x_T.shape)
    ts_j, sig_j = jnp.asarray(ts), jnp.asarray(sigmas)
    orders_j, corrects_j = jnp.asarray(orders), jnp.asarray(corrects)

    def body(state, x, i, z):
        return unipc_step(
            state, model(x, ts_j[i]), x, sig_j[i], sig_j[i + 1], order=orders_j[i],
            use_corrector=corrects_j[i], prediction_type=kind, solver_type=solver_type,
            predict_x0=predict_x0, clip_x0=clip_x0,
        )

    return run_scan(body, unipc_init(x_T, solver_order), x_T, key, len(ts), stochastic=False,
                    noise=noise, return_trajectory=return_trajectory, start_step=start,
                    after_step=after_step)


def _grid(schedule: Schedule, num_steps: int, *, strength: float = 1.0, spacing: str = "linspace",
          steps_offset: int = 0, final_sigmas_type: str = "zero",
          sigma_schedule: str = "discrete", **_) -> Grid:
    return unipc_timesteps(schedule, num_steps, spacing=spacing, steps_offset=steps_offset,
                           final_sigmas_type=final_sigmas_type, sigma_schedule=sigma_schedule)


UNIPC = SamplerSpec(
    name="unipc",
    after_step=True,
    sample=unipc_sample,
    grid=_grid,
    options=dict(solver_order=2, solver_type="bh2", predict_x0=True, prediction_type="eps",
                 spacing="linspace", steps_offset=0, sigma_schedule="discrete",
                 lower_order_final=True, final_sigmas_type="zero", use_corrector=True,
                 disable_corrector=(), clip_x0=None),
    noise_space="sigma_vp",
    stochastic=lambda o: False,
    # UniPC's two B(h) variants (diffusers' UniPCMultistepScheduler solver_type).
    presets=dict(unipc_bh1=dict(solver_type="bh1"), unipc_bh2=dict(solver_type="bh2")),
    diffusers=DiffusersTwin(
        "UniPCMultistepScheduler",
        defaults=dict(solver_order=2, prediction_type="epsilon", thresholding=False,
                      dynamic_thresholding_ratio=0.995, sample_max_value=1.0, predict_x0=True,
                      solver_type="bh2", lower_order_final=True, disable_corrector=[],
                      solver_p=None, use_karras_sigmas=False, use_exponential_sigmas=False,
                      use_beta_sigmas=False, use_flow_sigmas=False, flow_shift=1.0,
                      timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero",
                      use_dynamic_shifting=False, time_shift_type="exponential", sigma_min=None,
                      sigma_max=None, shift_terminal=None),
        options=dict(
            solver_order=config_key("solver_order"),
            # diffusers rewrites the DPM-Solver names to bh2 (with a warning)
            solver_type=lambda c: ("bh2" if c["solver_type"] in ("midpoint", "heun", "logrho")
                                   else c["solver_type"]),
            predict_x0=config_key("predict_x0"),
            prediction_type=prediction_option,
            spacing=config_key("timestep_spacing"),
            steps_offset=config_key("steps_offset"),
            sigma_schedule=lambda c: sigma_schedule_option(c, "UniPCMultistepScheduler"),
            lower_order_final=config_key("lower_order_final"),
            final_sigmas_type=config_key("final_sigmas_type"),
            disable_corrector=lambda c: tuple(c["disable_corrector"] or ()),
        ),
        must_be=dict(thresholding=(False,), use_flow_sigmas=(False,), solver_p=(None,),
                     use_dynamic_shifting=(False,), shift_terminal=(None,), sigma_min=(None,),
                     sigma_max=(None,)),
        no_effect=THRESHOLD_KEYS | {"flow_shift", "time_shift_type"},
        zero_snr_floor=True,
    ),
)
SPECS = (UNIPC,)
