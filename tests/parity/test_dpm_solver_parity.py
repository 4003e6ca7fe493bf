"""DPM-Solver++ trajectories against diffusers' DPMSolverMultistepScheduler (dpmsolver++).

The same deterministic analytic stand-in model runs on both sides. Tolerance: every step's sample
within ``tolerances.stepwise_atol`` (float32 roundings per step at the trajectory's scale, and an
eps model's x0 conversion grown by ``tolerances.multistep_gains``), and identical timesteps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from jaxdiff.samplers.dpm_solver import dpm_solver_sample, dpm_solver_timesteps
from jaxdiff.schedules import make_schedule
from tests.parity.test_sampler_parity import DIFFUSERS_PRED, standin
from tests.parity.tolerances import multistep_gains, stepwise_atol, within

JAXDIFF_PRED = {v: k for k, v in DIFFUSERS_PRED.items()}


def _bounds(sched, ts, final_sigmas_type, order, prediction_type, *arrays):
    """``[N + 1]`` bounds on the trajectory (``x_T`` first, equal on both sides): see
    ``tolerances.stepwise_atol``; an eps model's x0 conversion, ``/ alpha_t``, is carried into the
    next sample by ``alpha_s`` and the multistep weights (``multistep_gains`` on the grid's
    sigmas, ``sigma_min`` or 0 last)."""
    acp = np.asarray(sched.alphas_cumprod, np.float64)
    sig = np.sqrt((1 - acp) / acp)
    sigmas = np.concatenate([sig[ts], [sig[0] if final_sigmas_type == "sigma_min" else 0.0]])
    gains = multistep_gains(sigmas, order) if prediction_type == "epsilon" else np.zeros(len(ts))
    scale = max(np.abs(a).max() for a in arrays)
    return np.concatenate([[0.0], stepwise_atol(scale, gains)[0]])


def stand_in(xp, x, t, acp, prediction_type):
    """test_sampler_parity's analytic stand-in, by diffusers' prediction-type name."""
    return standin(xp, x, t, acp, JAXDIFF_PRED[prediction_type])


def torch_model(x, t, acp, prediction_type):
    return stand_in(torch, x, torch.full((x.shape[0],), int(t)), acp, prediction_type)


CASES = [
    dict(num_steps=10, solver_order=2, solver_type="midpoint", spacing="linspace",
         prediction_type="epsilon"),
    dict(num_steps=20, solver_order=2, solver_type="heun", spacing="trailing",
         prediction_type="v_prediction"),
    dict(num_steps=12, solver_order=2, solver_type="midpoint", spacing="leading",
         prediction_type="sample", steps_offset=1, final_sigmas_type="sigma_min"),
    dict(num_steps=16, solver_order=2, solver_type="midpoint", spacing="linspace",
         prediction_type="epsilon", lower_order_final=False, final_sigmas_type="sigma_min"),
    dict(num_steps=8, solver_order=1, solver_type="midpoint", spacing="trailing",
         prediction_type="epsilon"),
]


@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['num_steps']}-{c['solver_type']}-"
                                                      f"{c['spacing']}-{c['prediction_type']}")
def test_dpm_solver_trajectory(case, beta_schedule):
    case = dict(case)
    n = case.pop("num_steps")
    kw = dict(
        solver_order=case["solver_order"], solver_type=case["solver_type"],
        timestep_spacing=case["spacing"], prediction_type=case["prediction_type"],
        steps_offset=case.get("steps_offset", 0),
        lower_order_final=case.get("lower_order_final", True),
        final_sigmas_type=case.get("final_sigmas_type", "zero"),
        # As diffusers recommends for the cosine schedule: without it, the first eps -> x0
        # conversion divides by alpha_999 ~ 6e-3 and float32 rounding alone exceeds the tolerance.
        lambda_min_clipped=-5.1 if beta_schedule == "cosine" else -float("inf"),
    )
    ref = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule={"linear": "linear", "cosine": "squaredcos_cap_v2"}[beta_schedule],
        algorithm_type="dpmsolver++", **kw,
    )
    ref.set_timesteps(n)
    sched = make_schedule(beta_schedule, 1000)
    ts = dpm_solver_timesteps(sched, n, spacing=case["spacing"], steps_offset=kw["steps_offset"],
                              final_sigmas_type=kw["final_sigmas_type"],
                              lambda_min_clipped=kw["lambda_min_clipped"]).timesteps
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())

    x_T = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    x = torch.from_numpy(x_T)
    ref_traj = [x.numpy()]
    for t in ref.timesteps:
        x = ref.step(torch_model(x, t, ref.alphas_cumprod, case["prediction_type"]),
                     t, x).prev_sample
        ref_traj.append(x.numpy())

    acp = sched.alphas_cumprod
    model_fn = lambda x, t: stand_in(jnp, x, t, acp, case["prediction_type"])  # noqa: E731
    sample = jax.jit(
        lambda x: dpm_solver_sample(
            model_fn, sched, x, num_steps=n, solver_order=case["solver_order"],
            solver_type=case["solver_type"], prediction_type=case["prediction_type"],
            spacing=case["spacing"], steps_offset=kw["steps_offset"],
            lower_order_final=kw["lower_order_final"], final_sigmas_type=kw["final_sigmas_type"],
            lambda_min_clipped=kw["lambda_min_clipped"],
            return_trajectory=True,
        )
    )
    # NCHW on the torch side; the stand-in is elementwise, so NHWC vs NCHW only permutes.
    _, traj, _ = sample(jnp.asarray(x_T.transpose(0, 2, 3, 1)))
    traj = np.asarray(traj).transpose(0, 1, 4, 2, 3)
    diffs = [np.abs(a - b).max() for a, b in zip(traj, ref_traj)]
    within(diffs, _bounds(sched, ts, kw["final_sigmas_type"], case["solver_order"],
                          case["prediction_type"], np.stack(ref_traj)), "trajectory")


@pytest.mark.parametrize("spacing, offset", [("linspace", 0), ("leading", 0), ("leading", 1),
                                             ("trailing", 0)])
@pytest.mark.parametrize("beta_schedule, T, clip", [("linear", 50, -float("inf")),
                                                    ("cosine", 1000, -5.1)])
def test_timesteps_equal_diffusers_or_raise(spacing, offset, beta_schedule, T, clip):
    """For every 1 <= num_steps <= T: where diffusers' grid is strictly decreasing inside [0, T),
    ours is identical; where it repeats timesteps or leaves [0, T) (the solver would then divide by
    h = 0), ours raises ValueError. The one exception: trailing's float arange sometimes ends in an
    extra t = -1 (e.g. T = 1000, num_steps = 61), which we drop."""
    ref = DPMSolverMultistepScheduler(
        num_train_timesteps=T, beta_schedule={"linear": "linear", "cosine": "squaredcos_cap_v2"}[
            beta_schedule], timestep_spacing=spacing, steps_offset=offset,
        lambda_min_clipped=clip, algorithm_type="dpmsolver++",
    )
    sched = make_schedule(beta_schedule, T)
    raised = 0
    for n in range(1, T + 1):
        ref.set_timesteps(n)
        theirs = ref.timesteps.numpy()
        if spacing == "trailing" and len(theirs) > 1 and theirs[-1] == -1:
            theirs = theirs[:-1]
        kw = dict(spacing=spacing, steps_offset=offset, lambda_min_clipped=clip)
        if (np.diff(theirs) < 0).all() and theirs.min() >= 0 and theirs.max() < T:
            ts = dpm_solver_timesteps(sched, n, **kw).timesteps
            np.testing.assert_array_equal(ts, theirs, err_msg=f"num_steps={n}")
        else:
            with pytest.raises(ValueError, match="num_steps|steps_offset"):
                dpm_solver_timesteps(sched, n, **kw)
            raised += 1
    assert (raised == 0) if spacing == "trailing" else raised > 0  # both branches exercised
