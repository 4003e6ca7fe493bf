"""The EDM sampler against diffusers' ``EDMEulerScheduler`` (PyTorch, float32), whole trajectories.

Both sides run the same analytic stand-in network ``F(x_in, c_noise)`` (written once for torch
and jnp) and, with churn, the same noise arrays (diffusers' ``randn_tensor`` is patched to return
row ``step_index`` of jaxdiff's pre-drawn ``noise``).

- Euler, no churn: the diffusers pipeline loop as shipped (``scale_model_input``, the network at
  ``timesteps[i]``, ``step``), over the sigma grid options, both prediction types and
  ``sigma_data``.
- Euler with churn: diffusers' pipelines evaluate the network at ``(x_i, sigma_i)`` before
  ``step`` adds the churn noise, where Algorithm 2 (and jaxdiff) evaluates it at ``(x_hat,
  sigma_hat)``; the reference loop therefore evaluates the network at ``x_hat`` itself and hands
  ``step`` the result as ``pred_original_sample``. ``step`` still draws the churn (gamma,
  ``sigma_hat``, ``x_hat``) and takes the Euler step, which is what is compared.
- Heun: diffusers has no EDM Heun scheduler; the reference is Algorithm 2 written out in torch over
  ``EDMEulerScheduler``'s sigmas and its ``precondition_*`` functions.

Tolerance (``_bounds``): every O(1) quantity (each step's ``denoised``, the final sample, and the
trajectory ``xs[i]`` divided by ``max(1, sigma_i)``: at ``sigma_max = 80`` the samples are O(100))
within ``tolerances.trajectory_atol``-style sums of per-step roundings at the scale of the
normalised path. In the noise-dominated regime the flow is linear in ``x`` with ``x ~ sigma``, so
a relative error made at one step is carried with a factor <= 1. Heun's correction divides by
``sigma_{i+1}`` a rounding made at ``|x_i| ~ sigma_i``'s scale and weighs it by ``|sigma_{i+1} -
sigma_i| / 2``: gain ``sigma_i |sigma_{i+1} - sigma_i| / (2 sigma_{i+1} max(1, sigma_{i+1}))`` on
the normalised path. The sigma grids: see ``test_sigma_grid_matches``.
"""

import numpy as np
import pytest
import torch
from diffusers import EDMEulerScheduler
from diffusers.schedulers import scheduling_edm_euler

from jaxdiff.samplers.edm import edm_churn, edm_sample, edm_sigmas
from tests.parity.tolerances import STEP_ULPS, ulps, within

SHAPE = (2, 4, 4, 3)
DIFFUSERS_PRED = {"eps": "epsilon", "v": "v_prediction"}


def standin(m, x_in, c_noise):
    """The stand-in network, for ``m = torch`` and ``m = jnp``: ``x_in = c_in x`` is O(1), so is
    ``F``. (``F = 0`` is the exact denoiser of data ``N(0, sigma_data^2)``; this is a smooth
    nonlinear departure from it, with a dependence on ``c_noise``.)"""
    c = c_noise.reshape((-1,) + (1,) * (x_in.ndim - 1))
    return 0.4 * m.tanh(x_in) * m.cos(c) + 0.2 * x_in * m.sin(c)


def jax_model(x_in, c_noise):
    import jax.numpy as jnp

    return standin(jnp, x_in, c_noise)


def _scheduler(grid, pred, sigma_data):
    return EDMEulerScheduler(
        sigma_min=grid["sigma_min"], sigma_max=grid["sigma_max"], sigma_data=sigma_data,
        sigma_schedule=grid["sigma_schedule"], prediction_type=DIFFUSERS_PRED[pred],
        rho=grid["rho"], final_sigmas_type=grid["final_sigmas_type"],
    )


def _torch_model(x_in, c_noise):
    return standin(torch, x_in, c_noise.reshape(-1).expand(x_in.shape[0]))


def _ref_euler(sched, n, x_T, noise, churn):
    """diffusers' trajectory: ``(xs [N + 1], denoised [N])``."""
    sched.set_timesteps(n)
    x, xs, dens = torch.from_numpy(x_T), [x_T], []
    for i, t in enumerate(sched.timesteps):
        if churn is None:
            f = _torch_model(sched.scale_model_input(x, t), t)
            x, den = sched.step(f, t, x, return_dict=False)
        else:
            sched.scale_model_input(x, t)  # sets step_index, as a pipeline would
            sigma = sched.sigmas[i]
            gamma = min(churn["s_churn"] / n, 2**0.5 - 1)
            gamma = gamma if churn["s_tmin"] <= sigma <= churn["s_tmax"] else 0.0
            s_hat = sigma * (gamma + 1)
            x_hat = x
            if gamma > 0:
                z = torch.from_numpy(noise[i]) * churn["s_noise"]
                x_hat = x + z * (s_hat**2 - sigma**2) ** 0.5
            f = _torch_model(sched.precondition_inputs(x_hat, s_hat),
                             sched.precondition_noise(s_hat))
            pred = sched.precondition_outputs(x_hat, f, s_hat)
            x, den = sched.step(f, t, x, pred_original_sample=pred, return_dict=False, **churn)
        xs.append(x.numpy())
        dens.append(den.numpy())
    return np.stack(xs), np.stack(dens), sched.sigmas.numpy()


def _ref_heun(sched, n, x_T):
    """Algorithm 2 (no churn) in torch on diffusers' grid and preconditioning."""
    sched.set_timesteps(n)
    sig = sched.sigmas

    def denoise(x, s):
        f = _torch_model(sched.precondition_inputs(x, s), sched.precondition_noise(s))
        return sched.precondition_outputs(x, f, s)

    x, xs, dens = torch.from_numpy(x_T), [x_T], []
    for i in range(n):
        den = denoise(x, sig[i])
        d = (x - den) / sig[i]
        x_next = x + d * (sig[i + 1] - sig[i])
        if sig[i + 1] > 0:
            d2 = (x_next - denoise(x_next, sig[i + 1])) / sig[i + 1]
            x_next = x + (sig[i + 1] - sig[i]) * (0.5 * d + 0.5 * d2)
        x = x_next
        xs.append(x.numpy())
        dens.append(den.numpy())
    return np.stack(xs), np.stack(dens), sig.numpy()


def _bounds(sigmas, norm_xs, sigma_data, heun, *noise):
    """``(path [N + 1], denoised [N])`` bounds: per step ``STEP_ULPS`` ulps of the normalised
    path's largest value ``m`` (``norm_xs``, with any churn noise), times ``1 + gain`` for Heun
    (module docstring), summed along the trajectory; ``denoised = c_skip x + c_out F(c_in x)``
    passes an error of the normalised path on with a factor <= ``1 + sigma_data`` (``c_skip <=
    1``, ``c_out c_in max(1, sigma) <= sigma_data`` times ``|F'| <= 1``) and adds its own."""
    sig = sigmas.astype(np.float64)
    m = max(np.abs(a).max() for a in (norm_xs, *noise))
    gain = np.zeros(len(sig) - 1)
    if heun:
        nxt = sig[1:]
        with np.errstate(divide="ignore", invalid="ignore"):
            gain = np.where(nxt > 0, sig[:-1] * (sig[:-1] - nxt) / (2 * nxt * np.maximum(1, nxt)),
                            0.0)
    local = ulps(STEP_ULPS, m) * (1 + gain)
    path = np.concatenate([[0.0], np.cumsum(local)])
    return path, (1 + sigma_data) * path[1:]


def _compare(ours, ref_xs, ref_dens, sigmas, sigma_data=0.5, heun=False, noise=()):
    _, xs, dens = (np.asarray(a, np.float64) for a in ours)
    scale = np.maximum(1.0, sigmas.astype(np.float64)).reshape((-1,) + (1,) * len(SHAPE))
    tol_x, tol_d = _bounds(sigmas, ref_xs / scale, sigma_data, heun, *noise)
    n = len(tol_x)
    within(np.abs((xs - ref_xs) / scale).reshape(n, -1).max(axis=1), tol_x, "xs / max(1, sigma)")
    within(np.abs(dens - ref_dens).reshape(n - 1, -1).max(axis=1), tol_d, "denoised")
    within(np.abs(xs[-1] - ref_xs[-1]).max(), tol_x[-1] * scale[-1].item(), "final sample")


KARRAS = dict(sigma_min=0.002, sigma_max=80.0, rho=7.0, sigma_schedule="karras",
              final_sigmas_type="zero")
GRIDS = {
    "karras": KARRAS,
    "karras_rho3_sigma_min_final": {**KARRAS, "rho": 3.0, "sigma_max": 20.0,
                                    "final_sigmas_type": "sigma_min"},
    "exponential": {**KARRAS, "sigma_schedule": "exponential", "sigma_min": 0.01},
}


def _x_T(grid, seed=0):
    rng = np.random.default_rng(seed)
    return (grid["sigma_max"] * rng.standard_normal(SHAPE)).astype(np.float32)


@pytest.mark.parametrize("grid_name", sorted(GRIDS))
def test_sigma_grid_matches(grid_name):
    grid = GRIDS[grid_name]
    sched = _scheduler(grid, "eps", 0.5)
    sched.set_timesteps(12)
    ours = edm_sigmas(12, **grid)
    # Karras: float64 on both sides, then one float32 cast each. Exponential: diffusers takes a
    # float32 linspace of log sigma (6 roundings of values up to |log sigma|, as for betas in
    # tolerances.float32_betas_atol), then exp (2) and the cast; jaxdiff float64 and a cast.
    log_max = np.abs(np.log([grid["sigma_min"], grid["sigma_max"]])).max()
    rtol = ulps(2) if grid["sigma_schedule"] == "karras" else ulps(6 * log_max + 4)
    np.testing.assert_allclose(ours, sched.sigmas.numpy(), rtol=rtol, atol=0)
    # c_noise = 0.25 log(sigma): a quarter of sigma's relative difference, + float32 log (2 ulps)
    np.testing.assert_allclose(0.25 * np.log(ours[:-1]), sched.timesteps.numpy(), rtol=0,
                               atol=0.25 * (rtol + ulps(2, log_max)))


@pytest.mark.parametrize(
    "grid_name, pred, sigma_data",
    [("karras", "eps", 0.5), ("karras", "v", 1.0), ("karras_rho3_sigma_min_final", "eps", 0.5),
     ("exponential", "v", 0.5)],
)
def test_euler_trajectory_matches_edm_euler_scheduler(grid_name, pred, sigma_data):
    grid, n = GRIDS[grid_name], 8
    x_T = _x_T(grid)
    ref_xs, ref_dens, sigmas = _ref_euler(_scheduler(grid, pred, sigma_data), n, x_T, None, None)
    ours = edm_sample(jax_model, x_T, None, num_steps=n, solver="euler", sigma_data=sigma_data,
                      prediction_type=pred, return_trajectory=True, **grid)
    _compare(ours, ref_xs, ref_dens, sigmas, sigma_data)


CHURNS = {
    "all_steps": dict(s_churn=2.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0),
    "window": dict(s_churn=40.0, s_tmin=0.05, s_tmax=10.0, s_noise=1.007),
}


@pytest.mark.parametrize("churn_name", sorted(CHURNS))
def test_euler_with_churn_matches_edm_euler_scheduler(churn_name, monkeypatch):
    grid, n, churn = GRIDS["karras"], 10, CHURNS[churn_name]
    x_T = _x_T(grid, 1)
    noise = np.random.default_rng(2).standard_normal((n, *SHAPE)).astype(np.float32)
    sched = _scheduler(grid, "eps", 0.5)
    monkeypatch.setattr(
        scheduling_edm_euler, "randn_tensor",
        lambda shape, **kw: torch.from_numpy(noise[sched.step_index]),
    )
    ref_xs, ref_dens, sigmas = _ref_euler(sched, n, x_T, noise, churn)
    gammas = edm_churn(sigmas, s_churn=churn["s_churn"], s_tmin=churn["s_tmin"],
                       s_tmax=churn["s_tmax"])
    assert 0 < (gammas > 0).sum() <= n  # the churn is active on some steps
    ours = edm_sample(
        jax_model, x_T, None, num_steps=n, solver="euler", s_churn=churn["s_churn"],
        s_tmin=churn["s_tmin"], s_tmax=churn["s_tmax"], s_noise=churn["s_noise"],
        noise=noise, return_trajectory=True, **grid,
    )
    _compare(ours, ref_xs, ref_dens, sigmas, noise=(noise * churn["s_noise"],))


@pytest.mark.parametrize("grid_name, pred", [("karras", "eps"),
                                             ("karras_rho3_sigma_min_final", "v")])
def test_heun_trajectory_matches_algorithm_2(grid_name, pred):
    grid, n = GRIDS[grid_name], 10
    x_T = _x_T(grid, 3)
    ref_xs, ref_dens, sigmas = _ref_heun(_scheduler(grid, pred, 0.5), n, x_T)
    ours = edm_sample(jax_model, x_T, None, num_steps=n, solver="heun", prediction_type=pred,
                      return_trajectory=True, **grid)
    _compare(ours, ref_xs, ref_dens, sigmas, heun=True)
