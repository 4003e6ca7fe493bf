"""DPM-Solver(++) trajectories, orders 1-3, ODE and SDE, against diffusers 0.42's
``DPMSolverMultistepScheduler`` run step by step.

Both sides run the analytic stand-in model of test_sampler_parity.py and, for the ``sde-*``
algorithms, the same noise: diffusers' ``randn_tensor`` is patched to return the arrays jaxdiff
draws (from ``fold_in(key, i)``) or is given (``noise=[N, B, ...]``). jaxdiff's options come from
:func:`jaxdiff.convert.sampler_options_from_diffusers_config` applied to the scheduler's config
(the DPM-Solver spec's diffusers twin), so the mapping is tested with the arithmetic.

Both sides use the same float32 ``alphas_cumprod`` (jaxdiff's, patched into the scheduler before
``set_timesteps``, as test_sampler_parity.py does). With diffusers' own, a float32 cumprod, the
~1 ulp differences of ``abar`` near 1 give sigmas near ``t = 0`` 4e-5 relative apart, which the
Karras / exponential grids spread over their whole range, and move a truncated timestep by one
(cosine, exponential, 100 steps); see test_sigma_grid_parity.py. With the same ``alphas_cumprod``
the timesteps are equal and the sigmas within 1 ulp (torch's float32 ``sqrt`` is not always
correctly rounded).

The scheduler is started with ``set_begin_index(0)``: where its first timestep repeats (the cosine
schedule's Karras / exponential grids start 998, 998, ...), diffusers' ``index_for_timestep`` would
otherwise start at the second occurrence, skip the first sigma and index past the end of its
sigmas on the last step (IndexError); jaxdiff runs every step.

Tolerance: every step's sample within ``tolerances.stepwise_atol`` at the scale of the largest
value of the trajectory or its noise (see ``_bounds``). The noise-prediction algorithms
(``"dpmsolver"``, ``"sde-dpmsolver"``) multiply ``x`` by ``alpha_s / alpha_t > 1`` against an eps
term of the same size (twice that size for ``"sde-dpmsolver"``, whose noise term also grows the
sample to |x| ~ 14), and the data-prediction ones divide an eps model's rounding by ``alpha_t``
before scaling it by ``alpha_s``: both are the gains of ``tolerances.multistep_gains``.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from diffusers.schedulers import scheduling_dpmsolver_multistep

from jaxdiff.convert import sampler_options_from_diffusers_config
from jaxdiff.samplers.dpm_solver import dpm_solver_sample, dpm_solver_timesteps
from jaxdiff.schedules import make_schedule
from tests.parity.test_sampler_parity import standin
from tests.parity.tolerances import multistep_gains, stepwise_atol, ulps, within

SHAPE = (2, 3, 6, 6)  # NCHW on the torch side; the stand-in is elementwise
DIFFUSERS_NAME = {"linear": "linear", "scaled_linear": "scaled_linear",
                  "cosine": "squaredcos_cap_v2"}
BETAS = {"linear": {}, "scaled_linear": dict(beta_start=0.00085, beta_end=0.012), "cosine": {}}
SCHEDULES = {name: make_schedule(name, 1000, **BETAS[name]) for name in DIFFUSERS_NAME}

K, E, B, L = (dict(use_karras_sigmas=True), dict(use_exponential_sigmas=True),
              dict(use_beta_sigmas=True), dict(use_lu_lambdas=True))
SDE, NOISE_PRED = dict(algorithm_type="sde-dpmsolver++"), dict(final_sigmas_type="sigma_min")
# (id, schedule, num_steps, diffusers config, noise source for the sde algorithms)
CASES = [
    ("2m-karras-eps", "scaled_linear", 10, dict(**K), None),
    ("2m-karras-v-cosine-int", "cosine", 12, dict(**K, prediction_type="v_prediction"), None),
    ("2m-heun-karras-x0-sigmamin", "linear", 14,
     dict(**K, solver_type="heun", prediction_type="sample", final_sigmas_type="sigma_min"), None),
    ("3m-karras-eps", "scaled_linear", 20, dict(**K, solver_order=3), None),
    ("3m-karras-eps-short", "scaled_linear", 8, dict(**K, solver_order=3), None),
    ("3m-karras-euler-at-final", "linear", 18,
     dict(**K, solver_order=3, euler_at_final=True, final_sigmas_type="sigma_min"), None),
    ("3m-linspace-v", "linear", 10, dict(solver_order=3, prediction_type="v_prediction"), None),
    ("3m-trailing-x0-nolof-sigmamin", "scaled_linear", 25,
     dict(solver_order=3, timestep_spacing="trailing", prediction_type="sample",
          lower_order_final=False, final_sigmas_type="sigma_min"), None),
    ("3m-leading-offset-eps", "linear", 14,
     dict(solver_order=3, timestep_spacing="leading", steps_offset=1), None),
    ("3m-cosine-clipped-eps", "cosine", 15, dict(solver_order=3, lambda_min_clipped=-5.1), None),
    ("2m-exponential-eps", "linear", 12, dict(**E), None),
    ("2m-exponential-v-cosine", "cosine", 20,
     dict(**E, prediction_type="v_prediction", final_sigmas_type="sigma_min"), None),
    ("3m-beta-v", "scaled_linear", 15, dict(**B, solver_order=3, prediction_type="v_prediction"),
     None),
    ("3m-lu-eps", "linear", 12, dict(**L, solver_order=3), None),
    ("2m-sde-karras-eps-key", "scaled_linear", 10, dict(**SDE, **K), "key"),
    ("2m-sde-heun-v-noise", "linear", 16,
     dict(**SDE, solver_type="heun", prediction_type="v_prediction"), "noise"),
    ("3m-sde-karras-eps-noise", "scaled_linear", 20, dict(**SDE, **K, solver_order=3), "noise"),
    ("1-sde-exponential-x0-key", "linear", 8,
     dict(**SDE, **E, solver_order=1, prediction_type="sample"), "key"),
    ("2m-dpmsolver-x0", "linear", 12,
     dict(**NOISE_PRED, algorithm_type="dpmsolver", prediction_type="sample"), None),
    ("2m-heun-dpmsolver-karras-v", "scaled_linear", 12,
     dict(**NOISE_PRED, **K, algorithm_type="dpmsolver", solver_type="heun",
          prediction_type="v_prediction"), None),
    ("3m-dpmsolver-eps", "linear", 20, dict(**NOISE_PRED, algorithm_type="dpmsolver",
                                              solver_order=3, lower_order_final=False), None),
    ("2m-sde-dpmsolver-eps-noise", "linear", 12,
     dict(**NOISE_PRED, algorithm_type="sde-dpmsolver"), "noise"),
    ("2m-heun-sde-dpmsolver-karras-key", "scaled_linear", 10,
     dict(**NOISE_PRED, **K, algorithm_type="sde-dpmsolver", solver_type="heun"), "key"),
]


def _ref(name, cfg):
    """The diffusers scheduler on ``name``, with jaxdiff's float32 ``alphas_cumprod``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # dpmsolver / sde-dpmsolver deprecation
        ref = DPMSolverMultistepScheduler(num_train_timesteps=1000,
                                          beta_schedule=DIFFUSERS_NAME[name], **BETAS[name], **cfg)
    acp = torch.from_numpy(np.array(SCHEDULES[name].alphas_cumprod))
    ref.alphas_cumprod = acp
    ref.alpha_t, ref.sigma_t = torch.sqrt(acp), torch.sqrt(1 - acp)
    ref.lambda_t = torch.log(ref.alpha_t) - torch.log(ref.sigma_t)
    return ref


def _run_pair(name, n, cfg, noise_source, monkeypatch):
    """``(jaxdiff's trajectory, diffusers')``, each ``[N + 1, *SHAPE]`` NCHW numpy."""
    ref = _ref(name, cfg)
    ref.set_timesteps(n)
    ref.set_begin_index(0)
    opts = sampler_options_from_diffusers_config(
        {**ref.config, "_class_name": "DPMSolverMultistepScheduler"})
    sched = SCHEDULES[name]
    grid_opts = {k: opts[k] for k in ("spacing", "steps_offset", "final_sigmas_type",
                                       "lambda_min_clipped", "sigma_schedule", "round_timesteps")}
    grid = dpm_solver_timesteps(sched, n, **grid_opts)
    np.testing.assert_array_equal(grid.timesteps, ref.timesteps.numpy())
    # the float32 sigma formula (1 - abar, the division, the square root: 3 roundings a side) at
    # both end points, which the Karras / exponential / beta / lu grids pass on summed, and the
    # float32 cast of a float64 grid (1 a side)
    np.testing.assert_allclose(grid.sigmas, ref.sigmas.numpy(), rtol=ulps(14), atol=0)

    rng = np.random.default_rng(0)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    key = jax.random.key(3)
    nhwc = (len(ref.timesteps), SHAPE[0], *SHAPE[2:], SHAPE[1])
    if noise_source == "key":  # what jaxdiff draws: step i from fold_in(key, i), NHWC
        noise = np.stack([jax.random.normal(jax.random.fold_in(key, i), nhwc[1:])
                          for i in range(nhwc[0])])
    else:
        noise = rng.standard_normal(nhwc).astype(np.float32)
    torch_noise = iter(torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 1, 4, 2, 3))))
    monkeypatch.setattr(scheduling_dpmsolver_multistep, "randn_tensor",
                        lambda shape, **kw: next(torch_noise))

    pred = opts["prediction_type"]  # jaxdiff's name ("eps", "x0", "v")
    acp_t = torch.from_numpy(np.array(sched.alphas_cumprod))
    x = torch.from_numpy(x_T)
    ref_traj = [x.numpy()]
    for t in ref.timesteps:
        out = standin(torch, x, torch.full((x.shape[0],), int(t)), acp_t, pred)
        x = ref.step(out, t, x).prev_sample
        ref_traj.append(x.numpy())

    acp = sched.alphas_cumprod
    sample = jax.jit(lambda x, k, z: dpm_solver_sample(
        lambda x, t: standin(jnp, x, t, acp, pred), sched, x, k, num_steps=n, noise=z,
        return_trajectory=True, **opts,
    ))
    x_j = jnp.asarray(x_T.transpose(0, 2, 3, 1))
    if noise_source == "noise":
        _, traj, _ = sample(x_j, None, jnp.asarray(noise))
    else:
        _, traj, _ = sample(x_j, key if noise_source else None, None)
    ref_traj = np.stack(ref_traj)
    return np.asarray(traj).transpose(0, 1, 4, 2, 3), ref_traj, _bounds(
        grid.sigmas, cfg, ref_traj[np.isfinite(ref_traj)], noise)


def _bounds(sigmas, cfg, *arrays):
    """``[N + 1]`` bounds on the trajectory (``x_T`` first): ``tolerances.stepwise_atol`` at the
    scale of ``arrays``, with ``multistep_gains`` for the noise-prediction algorithms (doubled for
    ``"sde-dpmsolver"``) and for the data-prediction ones on an eps model."""
    algorithm = cfg.get("algorithm_type", "dpmsolver++")
    gains = multistep_gains(sigmas, cfg.get("solver_order", 2))
    if algorithm.endswith("++") and cfg.get("prediction_type", "epsilon") != "epsilon":
        gains = 0 * gains
    if algorithm == "sde-dpmsolver":
        gains = 2 * gains
    scale = max(np.abs(a).max() for a in arrays)
    return np.concatenate([[0.0], stepwise_atol(scale, gains)[0]])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_dpmpp_trajectory(case, monkeypatch):
    case_id, name, n, cfg, noise_source = case
    traj, ref_traj, bounds = _run_pair(name, n, cfg, noise_source, monkeypatch)
    assert np.isfinite(ref_traj).all()
    diffs = [float(np.abs(a - b).max()) for a, b in zip(traj, ref_traj)]
    print(f"{case_id}: max abs diff {max(diffs):.3g}")
    within(diffs, bounds, "trajectory")


@pytest.mark.parametrize("cfg", [dict(solver_type="heun"), dict(solver_order=3)],
                         ids=["heun", "3m"])
def test_step_between_equal_sigmas_returns_x_where_diffusers_gives_nan(cfg, monkeypatch):
    """Karras sigmas end at sigma_0; with final_sigmas_type="sigma_min" the last step goes from
    sigma_0 to sigma_0 (h = 0). With >= 15 steps (lower_order_final then does not apply) diffusers'
    heun and third-order updates divide 0 by 0 there; jaxdiff's first-order update returns x."""
    cfg = dict(cfg, use_karras_sigmas=True, final_sigmas_type="sigma_min")
    traj, ref_traj, bounds = _run_pair("linear", 16, cfg, None, monkeypatch)
    assert np.isnan(ref_traj[-1]).all() and np.isfinite(ref_traj[:-1]).all()
    within(np.abs(traj[:-1] - ref_traj[:-1]).reshape(16, -1).max(axis=1), bounds[:-1],
           "trajectory")
    np.testing.assert_array_equal(traj[-1], traj[-2])
