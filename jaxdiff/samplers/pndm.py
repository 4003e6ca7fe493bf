"""PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"): the
pseudo linear multistep method (PLMS) and its Runge-Kutta warm-up (F-PNDM), as one ``lax.scan``.

Semantics follow diffusers' ``PNDMScheduler`` (0.42), the scheduler almost every Stable Diffusion
1.x folder ships (``skip_prk_steps=True``, ``steps_offset=1``, ``set_alpha_to_one=False``):

- every update is the paper's transfer (its eq. 9) of ``x`` from timestep ``s`` to ``t`` along a
  noise estimate ``e``, DDIM's deterministic step written without cancellation::

      x_t = sqrt(abar_t / abar_s) x - (abar_t - abar_s) e
            / (abar_s sqrt(1 - abar_t) + sqrt(abar_s (1 - abar_s) abar_t))

  with ``t = s - T // N`` for a multistep update (diffusers' step; for ``"linspace"`` /
  ``"trailing"`` spacing not always the next grid timestep) and ``abar_t`` = 1
  (``set_alpha_to_one``) or ``abar_0`` below ``t = 0``.
  ``e`` is a fixed linear combination of model outputs; a v-prediction model's combination is
  converted to noise at ``(x, s)`` (diffusers has no x0-prediction PNDM);
- PLMS (``skip_prk_steps=True``): the first step is taken twice, an Euler step with ``e_0`` and,
  with ``e_1`` evaluated at its result, the same step again from ``x`` with ``(e_0 + e_1) / 2``
  (diffusers lists the second timestep twice for it: ``N + 1`` model evaluations); then
  Adams-Bashforth steps over the history ``e_0, e_2, e_3, ...`` (``e_1`` is not kept):
  ``(3 e_n - e_{n-1}) / 2``, ``(23 e_n - 16 e_{n-1} + 5 e_{n-2}) / 12``, then ``(55 e_n - 59
  e_{n-1} + 37 e_{n-2} - 9 e_{n-3}) / 24``;
- F-PNDM (``skip_prk_steps=False``, the class's default): three classical Runge-Kutta steps
  (four evaluations each, the midpoints ``T // N // 2`` below the start) fill the history, then
  order-4 Adams-Bashforth steps: ``N + 9`` model evaluations. diffusers' grid arithmetic fails
  for ``N < 4``; jaxdiff then warms up with ``N - 1`` Runge-Kutta steps (the same formulas).

Image-to-image is diffusers' ``StableDiffusionImg2ImgPipeline`` with this scheduler: it keeps
``scheduler.timesteps[s:]`` (``s`` = :func:`~jaxdiff.samplers.strength_start_step`, counted in
the model evaluations' list, as PNDM's ``order`` is 1), noises the image to ``timesteps[s]`` and
restarts the scheduler's counter there. So the tail opens with the PLMS warm-up again, which the
list's repeated timestep no longer lines up with (``s >= 1``): the later steps evaluate the model
one grid step off the sample's noise level. With F-PNDM the tail's first twelve evaluations are
Runge-Kutta stages measured from the text-to-image warm-up's timesteps. jaxdiff reproduces both
(as it reproduces every sampler's diffusers image-to-image); the ``N - s`` steps that run are the
sampler contract's ``M``.

The pieces follow the sampler contract (:mod:`jaxdiff.samplers`): :func:`pndm_timesteps` (the
grid, with every model evaluation's timestep), :func:`pndm_plan` (what each evaluation does:
diffusers' scheduler state machine, run on the host), :func:`pndm_step` (one evaluation's
update, with the history in an explicit :class:`PNDMState` from :func:`pndm_init`) and
:func:`pndm_sample` (one ``lax.scan`` over the evaluations).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion import canonical_prediction_type
from jaxdiff.samplers.diffusers_names import (
    SCHEDULE_KEYS_NO_RESCALE,
    config_key,
    prediction_option,
)
from jaxdiff.samplers.driver import (
    checked_model,
    prepare_noise,
    prepare_x_T,
    run_scan,
    strength_start_step,
)
from jaxdiff.samplers.spec import DiffusersTwin, SamplerSpec
from jaxdiff.samplers.timesteps import ddim_timesteps, gather, sigmas_at
from jaxdiff.schedules import Schedule
from jaxdiff.types import ModelFn
from jaxdiff.validation import check_bool, check_int

__all__ = [
    "PRK_STEPS",
    "PNDMGrid",
    "PNDMPlan",
    "PNDMState",
    "pndm_timesteps",
    "pndm_plan",
    "pndm_init",
    "pndm_step",
    "pndm_sample",
    "PNDM",
    "SPECS",
]

PRK_STEPS = 3  # Runge-Kutta steps before the linear multistep (diffusers' pndm_order - 1)
HISTORY = 4  # model outputs the Adams-Bashforth steps combine


class PNDMGrid(NamedTuple):
    """PNDM's host-side grid: a :class:`~jaxdiff.samplers.timesteps.Grid` (its three fields
    first) plus every model evaluation's timestep.

    Attributes:
      timesteps: ``[N]`` int32, ``model_timesteps[:N]``: image-to-image starting at step ``i``
        noises to ``timesteps[i]`` and evaluates the model there first (non-increasing: PLMS
        lists its second timestep twice).
      prev_timesteps: ``[N]`` int32, the next entry of ``model_timesteps`` (``-1`` after the
        last).
      sigmas: ``[N + 1]`` float32, ``sqrt((1 - abar) / abar)`` at ``timesteps``, then 0.
      model_timesteps: ``[E]`` int32, diffusers' ``scheduler.timesteps``: the model's timestep
        at each evaluation of a text-to-image run (``E = N + 1`` for PLMS, 1 for ``N = 1``;
        ``N + 9`` for F-PNDM with ``N >= 4``, ``4 (N - 1) + 1`` below).
      prk_timesteps: ``[4 K]`` int32, the Runge-Kutta stages' timesteps (``K`` warm-up steps;
        empty for PLMS): the first ``4 K`` entries of ``model_timesteps``.
    """

    timesteps: np.ndarray
    prev_timesteps: np.ndarray
    sigmas: np.ndarray
    model_timesteps: np.ndarray
    prk_timesteps: np.ndarray


def pndm_timesteps(
    schedule: Schedule,
    num_steps: int,
    *,
    skip_prk_steps: bool = False,
    spacing: str = "leading",
    steps_offset: int = 0,
) -> PNDMGrid:
    """``PNDMScheduler.set_timesteps`` (diffusers 0.42): the grid of ``N = num_steps`` levels
    spaced as DDIM's (:func:`~jaxdiff.samplers.ddim_timesteps`: ``"leading"`` plus
    ``steps_offset``, ``"trailing"``, ``"linspace"``), then the model evaluations' timesteps:
    PLMS repeats the second level; F-PNDM first lists three Runge-Kutta steps' stages (start,
    midpoint ``T // N // 2`` below it twice, end) over the top four levels (``N - 1`` steps over
    all levels when ``N < 4``, where diffusers fails), then the remaining levels.

    >>> from jaxdiff.schedules import make_schedule
    >>> sched = make_schedule("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
    >>> pndm_timesteps(sched, 10, skip_prk_steps=True, steps_offset=1).model_timesteps.tolist()
    [901, 801, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    >>> pndm_timesteps(sched, 5).model_timesteps.tolist()  # F-PNDM: 3 Runge-Kutta steps first
    [800, 700, 700, 600, 600, 500, 500, 400, 400, 300, 300, 200, 200, 0]

    Where diffusers' ``"trailing"`` float arange yields ``N + 1`` levels (e.g. ``T = 1000``,
    ``N = 61``: an extra level ``-1``, which torch reads as ``alphas_cumprod[-1]``), the ``N``
    intended ones are kept, as in DDIM's grid.

    Raises:
      ValueError: naming the argument: ``num_steps`` outside ``[1, T]``, an unknown
        ``spacing``, a negative ``steps_offset`` or one that pushes a timestep to ``T``, a
        non-bool ``skip_prk_steps``.
    """
    skip = check_bool("skip_prk_steps", skip_prk_steps)
    T = schedule.num_timesteps
    levels = ddim_timesteps(schedule, num_steps, spacing, steps_offset).timesteps
    levels = levels[::-1].astype(np.int64)  # ascending: diffusers' _timesteps
    n = len(levels)
    if skip:
        prk = np.zeros((0,), np.int64)
        plms = np.concatenate([levels[:-1], levels[-2:-1], levels[-1:]])[::-1]
    else:
        k = min(PRK_STEPS, n - 1)
        half = T // n // 2
        top = levels[n - 1 - k:]  # the k + 1 levels the Runge-Kutta steps join
        stages = np.repeat(top, 2) + np.tile(np.array([0, half]), k + 1)
        prk = stages[:-1].repeat(2)[1:-1][::-1]
        plms = levels[: n - k][::-1]
    model_ts = np.concatenate([prk, plms]).astype(np.int32)
    ts = model_ts[:n]
    prev = np.concatenate([model_ts[1:n + 1], [-1] * (n + 1 - len(model_ts))]).astype(np.int32)
    sig = sigmas_at(schedule, ts)
    xp = np if isinstance(sig, np.ndarray) else jnp
    sigmas = xp.concatenate([sig, xp.zeros((1,), sig.dtype)]).astype(xp.float32)
    return PNDMGrid(ts, prev, sigmas, model_ts, prk.astype(np.int32))


class PNDMPlan(NamedTuple):
    """What each model evaluation does: diffusers' ``PNDMScheduler.step`` counter by counter, as
    host arrays over the ``E`` evaluations that run; one row (every field indexed at one
    evaluation, :meth:`row`) is the ``row`` argument of :func:`pndm_step`.

    The update at evaluation ``c`` moves ``base`` (``x``, or the saved sample) from
    ``from_timestep`` to ``to_timestep`` along ``e = weights . (output, rk_sum, outputs[0],
    ..., outputs[3])``, the history taken before this evaluation's output joins it.

    Attributes:
      timestep: ``[E]`` int32, the model's timestep.
      from_timestep: ``[E]`` int32, the update's start ``s``.
      to_timestep: ``[E]`` int32, its end ``t`` (negative: below ``t = 0``, the final alpha).
      weights: ``[E, 6]`` float32.
      push: ``[E]`` bool, this output joins the history (the newest of :attr:`PNDMState.outputs`).
      rk_keep: ``[E]`` bool, the Runge-Kutta sum is kept (else restarted from 0).
      rk_weight: ``[E]`` float32, this output's weight added to the Runge-Kutta sum.
      save: ``[E]`` bool, ``x`` becomes the saved sample (a Runge-Kutta step's or the PLMS
        warm-up's start).
      from_saved: ``[E]`` bool, the update starts from the saved sample instead of ``x``.
      ends_step: ``[E]`` bool, this evaluation completes one of the ``M`` steps (the trajectory's
        entries; unused by :func:`pndm_step`).
    """

    timestep: np.ndarray
    from_timestep: np.ndarray
    to_timestep: np.ndarray
    weights: np.ndarray
    push: np.ndarray
    rk_keep: np.ndarray
    rk_weight: np.ndarray
    save: np.ndarray
    from_saved: np.ndarray
    ends_step: np.ndarray

    def row(self, i) -> PNDMPlan:
        """Evaluation ``i``'s row, every field indexed at ``i`` (a traced ``i`` where the fields
        are JAX arrays): the ``row`` argument of :func:`pndm_step`."""
        return PNDMPlan(*(a[i] for a in self))


# Adams-Bashforth weights of (this output, outputs[3], outputs[2], outputs[1]) by history length.
_AB = {2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
       4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def pndm_plan(grid: PNDMGrid, num_train_timesteps: int, start: int = 0) -> PNDMPlan:
    """The plan of the evaluations ``grid.model_timesteps[start:]`` with the scheduler's counter
    starting at 0 there (``start > 0``: image-to-image, module docstring).

    Args:
      grid: :func:`pndm_timesteps`' grid.
      num_train_timesteps: ``T`` (the steps are ``T // N`` apart, ``N = len(grid.timesteps)``).
      start: the first grid step that runs, in ``[0, N)``.

    Returns:
      A :class:`PNDMPlan` of ``E - start`` evaluations, ``N - start`` of them ending a step (the
      last always does: where diffusers' tail stops inside a Runge-Kutta step, it returns that
      stage's sample, the last step's result here).

    Raises:
      ValueError: naming ``start`` outside ``[0, N)`` or ``num_train_timesteps`` < 1.
    """
    T = check_int("num_train_timesteps", num_train_timesteps, 1)
    n = len(grid.timesteps)
    start = check_int("start", start, 0, n - 1)
    evals = np.asarray(grid.model_timesteps, np.int64)[start:]
    prk = np.asarray(grid.prk_timesteps, np.int64)
    ratio, half = T // n, T // n // 2
    rows, ends, history = [], [], 0
    for c, t in enumerate(evals):
        w = np.zeros(2 + HISTORY)
        rk_keep, rk_weight, save, from_saved = True, 0.0, False, False
        if c < len(prk):  # a Runge-Kutta stage: diffusers' step_prk
            stage = c % 4
            frm, to = prk[c - stage], t - (0 if c % 2 else half)
            push = save = stage == 0
            history += push
            from_saved = stage != 0
            if stage < 3:
                w[0], rk_weight = 1.0, (1 / 6 if stage == 0 else 1 / 3)
            else:  # the step's result: the weighted sum of its four stages
                w[0], w[1], rk_keep = 1 / 6, 1.0, False
            ends.append(stage == 3)
        else:  # a linear multistep update: diffusers' step_plms
            frm, to = t, t - ratio
            push = c != 1
            if c == 1:  # the warm-up's repeat: the first step again, from its start
                frm, to = t + ratio, t
            if push:
                history = min(history, HISTORY - 1) + 1
            if history == 1 and c == 0:  # provisional Euler step
                w[0], save = 1.0, True
            elif history == 1 and c == 1:
                w[0], w[-1], from_saved = 0.5, 0.5, True
            else:
                ab = _AB[history]
                w[0] = ab[0]
                w[len(w) - len(ab) + 1:] = ab[:0:-1]
            ends.append(not (c == 0 and len(evals) > 1))
        rows.append((t, frm, to, w, push, rk_keep, rk_weight, save, from_saved))
    # M = N - start steps; the last evaluation ends the last one (module docstring).
    done = [c for c, e in enumerate(ends) if e and c < len(evals) - 1][: n - start - 1]
    ends_step = np.zeros(len(evals), bool)
    ends_step[done + [len(evals) - 1]] = True
    cols = list(zip(*rows))
    return PNDMPlan(
        np.asarray(cols[0], np.int32), np.asarray(cols[1], np.int32),
        np.asarray(cols[2], np.int32), np.asarray(cols[3], np.float32),
        np.asarray(cols[4], bool), np.asarray(cols[5], bool), np.asarray(cols[6], np.float32),
        np.asarray(cols[7], bool), np.asarray(cols[8], bool), ends_step,
    )


class PNDMState(NamedTuple):
    """The history carried between :func:`pndm_step` calls (diffusers' ``ets``,
    ``cur_model_output`` and ``cur_sample``).

    Attributes:
      outputs: ``[4, B, ...]`` the last model outputs pushed (:attr:`PNDMPlan.push`), oldest
        first; zeros until filled.
      rk_sum: ``[B, ...]`` the current Runge-Kutta step's weighted sum of its stages so far.
      saved: ``[B, ...]`` the saved sample (:attr:`PNDMPlan.save`).
    """

    outputs: jax.Array
    rk_sum: jax.Array
    saved: jax.Array


def pndm_init(x_T: jax.Array) -> PNDMState:
    """The empty history for a trajectory starting at ``x_T: [B, ...]`` (in its dtype)."""
    x = jnp.asarray(x_T)
    return PNDMState(jnp.zeros((HISTORY, *x.shape), x.dtype), jnp.zeros_like(x),
                     jnp.zeros_like(x))


def _prediction(prediction_type: str) -> str:
    kind = canonical_prediction_type(prediction_type)
    if kind == "x0":
        raise ValueError("prediction_type must be 'eps' or 'v' for PNDM (diffusers' "
                         f"PNDMScheduler has no x0 prediction), got {prediction_type!r}")
    return kind


def pndm_step(
    schedule: Schedule,
    state: PNDMState,
    model_output: jax.Array,
    x: jax.Array,
    row: PNDMPlan,
    *,
    prediction_type: str = "eps",
    set_alpha_to_one: bool = False,
) -> tuple[PNDMState, jax.Array, jax.Array]:
    """One model evaluation's update (``PNDMScheduler.step``), as its plan row says.

    Args:
      schedule: the training schedule.
      state: the history (:func:`pndm_init` before the first evaluation that runs).
      model_output: ``[B, ...]`` eps or v (``prediction_type``) at ``(x, row.timestep)``.
      x: ``[B, ...]`` the current sample (at least float32: the carry).
      row: one evaluation of a :class:`PNDMPlan` (each field a scalar, or ``[6]`` for
        ``weights``; concrete or traced).
      prediction_type: ``"eps"`` or ``"v"`` (or diffusers' names).
      set_alpha_to_one: ``abar`` below ``t = 0`` is 1 (else ``abar_0``).

    Returns:
      ``(state, x_next, pred_x0)``: the updated history, ``x_next: [B, ...]`` in ``x``'s dtype
      and the clean sample the update's noise estimate implies at its start.

    Raises:
      ValueError: naming the argument: an x0 ``prediction_type``, a model output or history of
        another shape than ``x``.
    """
    kind = _prediction(prediction_type)
    set_alpha_to_one = check_bool("set_alpha_to_one", set_alpha_to_one)
    if jnp.shape(model_output) != jnp.shape(x):
        raise ValueError(f"model_output must have x's shape {jnp.shape(x)}, got "
                         f"{jnp.shape(model_output)}")
    if jnp.shape(state.outputs) != (HISTORY, *jnp.shape(x)):
        raise ValueError(f"state holds outputs of shape {jnp.shape(state.outputs)}, expected "
                         f"{(HISTORY, *jnp.shape(x))} (pndm_init(x))")
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    out = model_output.astype(dtype)
    w = jnp.asarray(row.weights, dtype)
    e = w[0] * out + w[1] * state.rk_sum.astype(dtype) + jnp.tensordot(
        w[2:], state.outputs.astype(dtype), axes=1)
    base = jnp.where(row.from_saved, state.saved, x).astype(dtype)
    acp = schedule.alphas_cumprod
    to = jnp.asarray(row.to_timestep)
    final = jnp.float32(1.0) if set_alpha_to_one else acp[0]
    a_s = gather(acp, jnp.asarray(row.from_timestep))
    a_t = jnp.where(to >= 0, gather(acp, jnp.maximum(to, 0)), final)
    if kind == "v":
        e = jnp.sqrt(a_s) * e + jnp.sqrt(1.0 - a_s) * base
    denom = a_s * jnp.sqrt(1.0 - a_t) + jnp.sqrt(a_s * (1.0 - a_s) * a_t)
    x_next = jnp.sqrt(a_t / a_s) * base - (a_t - a_s) * e / denom
    pred_x0 = (base - jnp.sqrt(1.0 - a_s) * e) / jnp.sqrt(a_s)
    outputs = jnp.where(row.push, jnp.concatenate([state.outputs[1:], out[None]]), state.outputs)
    rk_sum = jnp.where(row.rk_keep, state.rk_sum, 0.0) + jnp.asarray(row.rk_weight, dtype) * out
    saved = jnp.where(row.save, x, state.saved)
    state = PNDMState(outputs.astype(state.outputs.dtype), rk_sum.astype(state.rk_sum.dtype),
                      saved.astype(state.saved.dtype))
    return state, x_next.astype(x.dtype), pred_x0


def pndm_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array | None = None,
    *,
    num_steps: int,
    skip_prk_steps: bool = False,
    spacing: str = "leading",
    steps_offset: int = 0,
    set_alpha_to_one: bool = False,
    prediction_type: str = "eps",
    noise: jax.Array | None = None,
    return_trajectory: bool = False,
    strength: float = 1.0,
    after_step=None,
):
    """Deterministic PNDM sampling from ``x_T: [B, ...]`` in one ``lax.scan`` over the model
    evaluations (``PNDMScheduler``; the defaults are the class's: F-PNDM, leading spacing).

    Args:
      model_fn: ``model_fn(x [B, ...], t [B] int32) -> [B, ...]`` eps or v.
      schedule: the training schedule; ``T = schedule.num_timesteps``.
      x_T: ``[B, ...]`` the starting noise, carried in at least float32.
      key: accepted and unused (deterministic; may be ``None``).
      num_steps: ``N`` in ``[1, T]``: the grid's levels (the model runs ``N + 1`` times with
        PLMS, ``N + 9`` with F-PNDM and ``N >= 4``).
      skip_prk_steps: PLMS (``True``, Stable Diffusion's setting; the ``plms`` preset) instead
        of the Runge-Kutta warm-up.
      spacing, steps_offset: the grid (:func:`pndm_timesteps`).
      set_alpha_to_one: ``abar`` below ``t = 0`` is 1 (else ``abar_0``, SD's setting).
      prediction_type: ``"eps"`` or ``"v"`` (or diffusers' names).
      noise: accepted for the common contract: ``[M, B, ...]`` (``M = N - s`` the steps that
        run) is shape-checked and unused.
      return_trajectory: also return the path, one entry per step (:attr:`PNDMPlan.ends_step`;
        the PLMS warm-up's provisional sample and the Runge-Kutta stages are not entries).
      strength: image-to-image strength in ``(0, 1]``: diffusers' tail of the model
        evaluations from ``s = N - int(N * strength)`` with the history restarted there, from
        ``x_T`` noised to ``timesteps[s]`` (:func:`jaxdiff.samplers.noise_to_img2img`; module
        docstring); 1 (the default) is text-to-image.
      after_step: optional ``(x_next, i) -> x_next`` applied to each step's output
        (:func:`jaxdiff.samplers.driver.run_scan`; 4-channel inpainting's blending).

    Returns:
      ``x_0: [B, ...]`` float32 (or wider); with ``return_trajectory`` ``(x_0, xs [M + 1, B,
      ...], pred_x0s [M, B, ...])``, ``xs[0] = x_T``.

    Raises:
      ValueError: naming the argument, for a bad grid or option (an x0 ``prediction_type``),
        a ``strength`` keeping no step, a mis-shaped ``noise`` or model output.
    """
    kind = _prediction(prediction_type)
    set_alpha_to_one = check_bool("set_alpha_to_one", set_alpha_to_one)
    grid = pndm_timesteps(schedule, num_steps, skip_prk_steps=skip_prk_steps, spacing=spacing,
                          steps_offset=steps_offset)
    start = strength_start_step(num_steps, strength)
    x_T = prepare_x_T(x_T)
    prepare_noise(noise, key, num_steps - start, x_T, stochastic=False)  # checked, unused
    plan = pndm_plan(grid, schedule.num_timesteps, start)
    rows = PNDMPlan(*(jnp.asarray(a) for a in plan))
    model = checked_model(model_fn, x_T.shape)

    def body(state, x, i, z):
        row = rows.row(i - start)
        return pndm_step(schedule, state, model(x, row.timestep), x, row, prediction_type=kind,
                         set_alpha_to_one=set_alpha_to_one)

    out = run_scan(body, pndm_init(x_T), x_T, key, len(grid.model_timesteps), stochastic=False,
                   return_trajectory=return_trajectory, start_step=start,
                   after_step=after_step)
    if not return_trajectory:
        return out
    x_0, xs, pred_x0s = out
    ends = np.flatnonzero(plan.ends_step)
    return x_0, jnp.concatenate([xs[:1], xs[1 + ends]]), pred_x0s[ends]


def _grid(schedule: Schedule, num_steps: int, *, strength: float = 1.0,
          skip_prk_steps: bool = False, spacing: str = "leading", steps_offset: int = 0,
          **_) -> PNDMGrid:
    return pndm_timesteps(schedule, num_steps, skip_prk_steps=skip_prk_steps, spacing=spacing,
                          steps_offset=steps_offset)


PNDM = SamplerSpec(
    name="pndm",
    after_step=True,
    sample=pndm_sample,
    grid=_grid,
    options=dict(skip_prk_steps=False, spacing="leading", steps_offset=0, set_alpha_to_one=False,
                 prediction_type="eps"),
    noise_space="alphas_cumprod",
    stochastic=lambda o: False,
    presets=dict(plms=dict(skip_prk_steps=True)),  # PLMS: what Stable Diffusion 1.x folders use
    diffusers=DiffusersTwin(
        "PNDMScheduler",
        # The constructor's defaults. SD 1.x folders also carry DDIMScheduler's keys (clip_sample,
        # ...): keys of another registered class, ignored as diffusers ignores them; so is
        # rescale_betas_zero_snr (not an argument of this class).
        defaults=dict(skip_prk_steps=False, set_alpha_to_one=False, prediction_type="epsilon",
                      timestep_spacing="leading", steps_offset=0),
        options=dict(skip_prk_steps=config_key("skip_prk_steps"),
                     spacing=config_key("timestep_spacing"),
                     steps_offset=config_key("steps_offset"),
                     set_alpha_to_one=config_key("set_alpha_to_one"),
                     prediction_type=prediction_option),
        must_be=dict(prediction_type=("epsilon", "v_prediction")),
        schedule_keys=SCHEDULE_KEYS_NO_RESCALE,
    ),
)
SPECS = (PNDM,)
