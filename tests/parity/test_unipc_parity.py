"""UniPC trajectories against diffusers' UniPCMultistepScheduler (PyTorch, float32).

Both sides run test_sampler_parity's analytic stand-in model (O(1) everywhere, so absolute
tolerances mean what they say), jaxdiff's sampler jitted as one ``lax.scan``, diffusers' scheduler
in its Python loop. As in test_sampler_parity.py, diffusers gets jaxdiff's ``alphas_cumprod``
(schedules are compared in test_schedule_parity.py), so that these tests isolate the solver
arithmetic: with diffusers' own float32-built schedule, 1-ulp differences in ``alphas_cumprod``
near 1 move ``sigma`` by up to 7e-6 relative, which moved the trajectories by up to 2e-5 (7.5e-4
for an eps model on the cosine schedule from t = 999, whose first x0 divides by
``alpha_999 ~ 5e-5``); one case runs on diffusers' native schedule (``test_native_schedule``).

Tolerance: every sample of the trajectory (``x_T``, then each step's ``prev_sample``) within
``tolerances.stepwise_atol`` at the scale of the trajectory, float32; the data predictions
(diffusers' converted model output) within its clean-estimate bounds, which divide an eps model's
conversion rounding by ``sqrt(abar_t)`` (see ``_bounds``). Timesteps are compared exactly.

The Karras / exponential / beta sigma schedules run on the linear schedule only: on the cosine
one ``sigma_max = 2e4``, most steps evaluate the model at t = 998-999 (repeated timesteps) before
one large last step, and both float32 loops end 1e-4 (Karras) to 2e-3 (beta) from diffusers' own
float64 run: float32 parity says nothing there.

Noise-prediction cases (``predict_x0=False``): that form multiplies ``x`` by ``alpha_s / alpha_t >
1`` on every step against an eps term of the same size, so each step's rounding grows by that
ratio (``multistep_gains``; 2e4 from t = 999 on the cosine schedule, where diffusers' float32 loop
is 0.85 from its own float64 run: those are not run). These cases assert the bound on
``|jaxdiff - diffusers|``, and that jaxdiff is as close to diffusers' loop run in float64 as
diffusers' float32 loop is, within the same bound.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from jaxdiff.samplers.unipc import unipc_sample, unipc_timesteps
from jaxdiff.schedules import make_schedule
from tests.parity.test_sampler_parity import DIFFUSERS_PRED, standin
from tests.parity.tolerances import (
    float32_betas_atol,
    float32_cumprod_rtol,
    multistep_gains,
    stepwise_atol,
    ulps,
    within,
)

T = 1000
DIFFUSERS_BETA = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
SCHEDULES = {name: make_schedule(name, T) for name in DIFFUSERS_BETA}

# jaxdiff options; diffusers gets the same through _diffusers_config.
CASES = [
    dict(num_steps=10),  # diffusers' defaults: order 2, bh2, predict_x0, corrector, linspace
    dict(num_steps=10, solver_order=1, spacing="trailing"),
    dict(num_steps=12, solver_order=3, solver_type="bh1", prediction_type="v", spacing="leading",
         steps_offset=1, final_sigmas_type="sigma_min"),
    dict(num_steps=8, solver_order=3, prediction_type="x0", spacing="trailing",
         use_corrector=False),
    dict(num_steps=15, solver_type="bh1", final_sigmas_type="sigma_min", lower_order_final=False),
    dict(num_steps=7, solver_order=3, prediction_type="v", disable_corrector=(1, 3)),
    dict(num_steps=5, solver_order=3, spacing="leading", predict_x0=False,
         final_sigmas_type="sigma_min"),
    dict(num_steps=25, solver_order=3, prediction_type="v", spacing="trailing", predict_x0=False,
         final_sigmas_type="sigma_min", lower_order_final=False, betas=("linear",)),
    dict(num_steps=20, prediction_type="x0", use_corrector=False, spacing="leading"),
    dict(num_steps=6, solver_order=1, solver_type="bh1", prediction_type="v", spacing="trailing",
         final_sigmas_type="sigma_min"),
    dict(num_steps=25, solver_order=3, solver_type="bh1", spacing="trailing",
         final_sigmas_type="sigma_min"),
    dict(num_steps=9, solver_order=2, solver_type="bh2", prediction_type="x0", predict_x0=False,
         spacing="linspace", final_sigmas_type="sigma_min", disable_corrector=(0, 4, 8),
         betas=("linear",)),
    # diffusers' use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas, on the linear
    # schedule only (see the module docstring). These grids end at t = 0, where the eps stand-in
    # (x - alpha x0) / sigma_0 multiplies its own float32 rounding by 1 / sigma_0 = 100 (both
    # sides, differently): the beta case, whose last steps are large, runs a v model (an eps
    # model: 9.3e-6 at order 3, 7.2e-6 at order 2; 2.3e-5 with 10 steps, diffusers' float32 loop
    # then being 2.4e-5 from its float64 run).
    dict(num_steps=10, solver_order=3, sigma_schedule="karras", betas=("linear",)),
    dict(num_steps=12, solver_type="bh1", prediction_type="v", sigma_schedule="karras",
         final_sigmas_type="sigma_min", betas=("linear",)),
    dict(num_steps=8, prediction_type="x0", sigma_schedule="exponential", betas=("linear",)),
    dict(num_steps=15, solver_order=3, prediction_type="v", sigma_schedule="beta",
         disable_corrector=(2,), betas=("linear",)),
]
# (case, schedule) pairs: every case on both schedules, except noise-prediction cases from
# t = 999 on the cosine schedule (see the module docstring).
PARAMS = [({k: v for k, v in c.items() if k != "betas"}, beta) for c in CASES
          for beta in c.get("betas", ("linear", "cosine"))]


def _case_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items())


def _diffusers_config(case):
    n = case["num_steps"]
    disabled = list(range(n)) if not case.get("use_corrector", True) else list(
        case.get("disable_corrector", ()))
    return dict(
        solver_order=case.get("solver_order", 2), solver_type=case.get("solver_type", "bh2"),
        prediction_type=DIFFUSERS_PRED[case.get("prediction_type", "eps")],
        predict_x0=case.get("predict_x0", True), timestep_spacing=case.get("spacing", "linspace"),
        steps_offset=case.get("steps_offset", 0),
        lower_order_final=case.get("lower_order_final", True),
        final_sigmas_type=case.get("final_sigmas_type", "zero"), disable_corrector=disabled,
        **{f"use_{case['sigma_schedule']}_sigmas": True for _ in [0]
           if case.get("sigma_schedule", "discrete") != "discrete"},
    )


def _reference(case, beta, x_T, native=False, dtype=torch.float32):
    """diffusers' trajectory ``[N + 1, ...]``, its data predictions ``[N, ...]`` (the converted
    model output; only meaningful with ``predict_x0``), and the scheduler. With ``dtype=float64``
    the same loop runs in float64 from the same float32 grid, schedule and ``x_T``."""
    ref = UniPCMultistepScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_BETA[beta],
                                  **_diffusers_config(case))
    if not native:
        ref.alphas_cumprod = torch.tensor(np.asarray(SCHEDULES[beta].alphas_cumprod))
    ref.set_timesteps(case["num_steps"])
    # Karras / exponential / beta sigmas on the cosine schedule repeat t = 999 at the start, where
    # diffusers' own step-index lookup would start at step 1 (and fail at the end of the loop).
    ref.set_begin_index(0)
    ref.sigmas = ref.sigmas.to(dtype)
    acp = ref.alphas_cumprod.to(dtype)
    pred = case.get("prediction_type", "eps")
    x = torch.from_numpy(x_T).to(dtype)
    traj, x0s = [x.numpy()], []
    for t in ref.timesteps:
        out = standin(torch, x, torch.full((x.shape[0],), int(t)), acp, pred)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            x = ref.step(out, t, x).prev_sample
        traj.append(x.numpy())
        x0s.append(ref.model_outputs[-1].numpy())
    return np.stack(traj), np.stack(x0s), ref


def _jaxdiff(case, beta, x_T):
    """jaxdiff's jitted ``(trajectory [N + 1, ...], pred_x0s [N, ...])``, NCHW like x_T."""
    case = dict(case)
    n = case.pop("num_steps")
    acp = SCHEDULES[beta].alphas_cumprod
    pred = case.get("prediction_type", "eps")
    sample = jax.jit(lambda x: unipc_sample(
        lambda x, t: standin(jnp, x, t, acp, pred), SCHEDULES[beta], x, None, num_steps=n,
        return_trajectory=True, **case))
    # The stand-in is elementwise, so NHWC (jaxdiff) vs NCHW (torch) only permutes.
    _, traj, x0s = sample(jnp.asarray(x_T.transpose(0, 2, 3, 1)))
    return (np.asarray(traj).transpose(0, 1, 4, 2, 3),
            np.asarray(x0s).transpose(0, 1, 4, 2, 3))


def _x_T():
    return np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)


def _max_diffs(a, b):
    return np.abs(a - b).reshape(len(a), -1).max(axis=1)


def _bounds(case, beta, sigmas, ts, *arrays):
    """``(trajectory [N + 1], data predictions [N])`` bounds: ``tolerances.stepwise_atol`` at the
    scale of ``arrays``, with ``multistep_gains`` on the grid's ``sigmas`` (order + 1: the
    corrector adds a divided difference) where a step grows a rounding: always for noise
    prediction, for an eps model's x0 conversion otherwise; that conversion's own rounding,
    ``/ sqrt(abar_t)`` at ``ts``, in the data predictions."""
    eps = case.get("prediction_type", "eps") == "eps"
    gains = multistep_gains(sigmas, case.get("solver_order", 2) + 1)
    if case.get("predict_x0", True) and not eps:
        gains = 0 * gains
    acp = np.asarray(SCHEDULES[beta].alphas_cumprod, np.float64)
    x0_gains = 1 / np.sqrt(acp[np.asarray(ts)]) if eps else np.zeros(len(ts))
    scale = max(np.abs(a[np.isfinite(a)]).max() for a in arrays)
    samples, x0s = stepwise_atol(scale, x0_gains, gains)
    return np.concatenate([[0.0], samples]), x0s


@pytest.mark.parametrize("case, beta", PARAMS, ids=lambda p: p if isinstance(p, str)
                         else _case_id(p))
def test_unipc_trajectory(case, beta):
    x_T = _x_T()
    want, want_x0s, ref = _reference(case, beta, x_T)
    grid = unipc_timesteps(SCHEDULES[beta], case["num_steps"],
                           spacing=case.get("spacing", "linspace"),
                           steps_offset=case.get("steps_offset", 0),
                           final_sigmas_type=case.get("final_sigmas_type", "zero"),
                           sigma_schedule=case.get("sigma_schedule", "discrete"))
    np.testing.assert_array_equal(grid.timesteps, ref.timesteps.numpy())
    # the float32 sigma formula (3 roundings a side) at both end points, which the Karras /
    # exponential / beta grids pass on summed, and the float32 cast of a float64 grid
    np.testing.assert_allclose(grid.sigmas, ref.sigmas.numpy(), rtol=ulps(14))
    got, got_x0s = _jaxdiff(case, beta, x_T)
    diffs = _max_diffs(got, want)
    tol, tol_x0 = _bounds(case, beta, grid.sigmas, grid.timesteps, want, got_x0s)
    within(diffs, tol, "trajectory")
    if not case.get("predict_x0", True):  # see the module docstring
        exact, _, _ = _reference(case, beta, x_T, dtype=torch.float64)
        ours, theirs = _max_diffs(got, exact).max(), _max_diffs(want, exact).max()
        within(max(ours - theirs, 0.0), tol[-1], "jaxdiff - float64 vs diffusers - float64")
    if case.get("predict_x0", True):
        within(_max_diffs(got_x0s, want_x0s), tol_x0, "data predictions")


def test_native_schedule():
    """On diffusers' own float32-built schedule (no alphas_cumprod handed over): diffusers'
    defaults, linear schedule. Bound: the float32 trajectory's (``_bounds``), plus the first-order
    effect of the schedules' difference (``float32_cumprod_rtol`` at each grid timestep, the only
    entries the loop reads), from diffusers' loop run in float64 with each entry moved by its bound
    in turn (a sensitivity of the formula, not a float32 comparison)."""
    case = dict(num_steps=10)
    want, _, ref = _reference(case, "linear", _x_T(), native=True)
    got, got_x0s = _jaxdiff(case, "linear", _x_T())
    tol, _ = _bounds(case, "linear", ref.sigmas.numpy(), ref.timesteps.numpy(), want, got_x0s)
    betas = np.asarray(SCHEDULES["linear"].betas, np.float64)
    rel = float32_cumprod_rtol(betas, float32_betas_atol(betas, "linear"))
    base = _reference_with(case, _x_T(), {})
    effect = sum(np.abs(_reference_with(case, _x_T(), {int(t): rel[int(t)]}) - base)
                 for t in ref.timesteps)
    within(_max_diffs(got, want), tol + effect.reshape(len(tol), -1).max(axis=1), "trajectory")


def _reference_with(case, x_T, moves):
    """diffusers' native-schedule loop in float64 with ``alphas_cumprod[t] *= 1 + moves[t]``."""
    ref = UniPCMultistepScheduler(num_train_timesteps=T, beta_schedule="linear",
                                  **_diffusers_config(case))
    acp = ref.alphas_cumprod.to(torch.float64)
    for t, r in moves.items():
        acp[t] *= 1 + r
    ref.alphas_cumprod = acp
    ref.alpha_t, ref.sigma_t = torch.sqrt(acp), torch.sqrt(1 - acp)
    ref.lambda_t = torch.log(ref.alpha_t) - torch.log(ref.sigma_t)
    ref.sigmas = ((1 - acp) / acp) ** 0.5
    ref.set_timesteps(case["num_steps"])
    ref.set_begin_index(0)
    ref.sigmas = ref.sigmas.to(torch.float64)
    x = torch.from_numpy(x_T).to(torch.float64)
    traj = [x.numpy()]
    for t in ref.timesteps:
        out = standin(torch, x, torch.full((x.shape[0],), int(t)), acp, "eps")
        x = ref.step(out, t, x).prev_sample
        traj.append(x.numpy())
    return np.stack(traj)


@pytest.mark.parametrize("case", [
    dict(num_steps=8, solver_type="bh1"),  # diffusers: B(h) = h = -inf times 0 -> NaN
    dict(num_steps=8, solver_order=2, lower_order_final=False),  # D_1 / r_1, r_1 = 0 -> inf
    dict(num_steps=8, predict_x0=False),  # sigma_t (e^h - 1) = 0 * inf -> NaN
], ids=_case_id)
def test_final_step_to_sigma_zero_where_diffusers_is_not_finite(case):
    """A last step to sigma = 0 returns the data prediction (the first-order limit) where
    diffusers' update is NaN or inf: every earlier step still matches diffusers within TOL, and
    the result is the data prediction at the last step's input."""
    x_T = _x_T()
    want, _, ref = _reference(case, "linear", x_T)
    assert not np.isfinite(want[-1]).all()
    got, got_x0s = _jaxdiff(case, "linear", x_T)
    tol, tol_x0 = _bounds(case, "linear", ref.sigmas.numpy(), ref.timesteps.numpy(), want[:-1],
                          got_x0s)
    within(_max_diffs(got[:-1], want[:-1]), tol[:-1], "trajectory")
    np.testing.assert_array_equal(got[-1], got_x0s[-1])
    t_last = torch.full((x_T.shape[0],), int(ref.timesteps[-1]))
    x0 = standin(torch, torch.from_numpy(want[-2]), t_last, ref.alphas_cumprod, "x0").numpy()
    within(np.abs(got[-1] - x0).max(), tol_x0[-1], "the last data prediction")


@pytest.mark.parametrize("spacing, offset", [("linspace", 0), ("leading", 0), ("leading", 1),
                                             ("trailing", 0)])
def test_timesteps_equal_diffusers(spacing, offset):
    """Every num_steps whose diffusers grid is strictly decreasing inside [0, T) (T = 50) gives
    the same timesteps and sigmas (the grid is DPM-Solver's; its own test covers what raises)."""
    sched = make_schedule("linear", 50)
    ref = UniPCMultistepScheduler(num_train_timesteps=50, timestep_spacing=spacing,
                                  steps_offset=offset)
    ref.alphas_cumprod = torch.tensor(np.asarray(sched.alphas_cumprod))
    checked = 0
    for n in range(1, 51):
        ref.set_timesteps(n)
        theirs = ref.timesteps.numpy()
        if not ((np.diff(theirs) < 0).all() and theirs.min() >= 0 and theirs.max() < 50):
            continue
        grid = unipc_timesteps(sched, n, spacing=spacing, steps_offset=offset)
        np.testing.assert_array_equal(grid.timesteps, theirs, err_msg=f"num_steps={n}")
        # the float32 sigma formula, 3 roundings a side (discrete grids: no end-point spreading)
        np.testing.assert_allclose(grid.sigmas, ref.sigmas.numpy(), rtol=ulps(6))
        checked += 1
    assert checked >= 45
