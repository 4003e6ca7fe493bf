"""Sigma grids (jaxdiff.samplers.sigmas) against EulerDiscreteScheduler.set_timesteps."""

import numpy as np
import pytest

from diffusers import EulerDiscreteScheduler

from jaxdiff.samplers.sigmas import (
    init_noise_sigma,
    scale_model_input,
    sigma_grid,
    sigma_to_t,
    train_sigmas,
)
from jaxdiff.schedules import make_schedule

DIFFUSERS_NAME = {"linear": "linear", "scaled_linear": "scaled_linear",
                  "cosine": "squaredcos_cap_v2"}
BETAS = {"linear": {}, "scaled_linear": dict(beta_start=0.00085, beta_end=0.012), "cosine": {}}


def _pair(name, **cfg):
    ref = EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_NAME[name],
                                 **BETAS[name], **cfg)
    return ref, make_schedule(name, 1000, **BETAS[name])


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("spacing, offset", [("linspace", 0), ("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("sigma_schedule", ["discrete", "karras", "exponential", "beta"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("n", [1, 7, 25])
def test_sigma_grid_matches_euler_set_timesteps(name, spacing, offset, sigma_schedule, final, n):
    flags = {f"use_{sigma_schedule}_sigmas": True} if sigma_schedule != "discrete" else {}
    ref, sched = _pair(name, timestep_spacing=spacing, steps_offset=offset,
                       final_sigmas_type=final, **flags)
    ref.set_timesteps(n)
    grid = sigma_grid(sched, n, spacing=spacing, steps_offset=offset,
                      sigma_schedule=sigma_schedule, final_sigmas_type=final)
    # sigmas span 1e-2 .. 2e4; diffusers computes alphas_cumprod by a float32 cumprod, jaxdiff in
    # float64 then rounds, so they differ by an ulp of abar near 1, where sigma = sqrt(1/abar - 1)
    # cancels: measured 1.4e-4 relative at t = 1 (leading, offset 1, linear), which the Karras
    # and exponential grids spread to 8.4e-5 relative over their whole range; 6.5e-6 relative at
    # the cosine schedule's sigma_max; at most 2e-6 relative elsewhere.
    small_t = spacing == "leading" and sigma_schedule in ("karras", "exponential")
    np.testing.assert_allclose(grid.sigmas, ref.sigmas.numpy(), rtol=1e-4 if small_t else 2e-5,
                               atol=5e-6)
    # Timesteps follow the sigmas (up to 0.0135 where the sigmas differ by 8.4e-5, above).
    np.testing.assert_allclose(grid.timesteps, ref.timesteps.numpy(), rtol=0,
                               atol=2e-2 if small_t else 2e-3)
    assert grid.prev_timesteps[-1] == -1
    np.testing.assert_allclose(init_noise_sigma(grid, spacing), float(ref.init_noise_sigma),
                               rtol=2e-5)


def test_sigma_to_t_inverts_the_training_sigmas():
    sched = make_schedule("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
    s = train_sigmas(sched)
    t = sigma_to_t(s[[0, 10, 500, 999]], np.log(s))
    np.testing.assert_allclose(t, [0, 10, 500, 999], atol=1e-6)
    mid = sigma_to_t(np.sqrt(s[10] * s[11]), np.log(s))  # the log-midpoint
    np.testing.assert_allclose(mid, 10.5, atol=1e-6)


def test_scale_model_input_matches_diffusers():
    import torch

    ref, sched = _pair("linear")
    ref.set_timesteps(10)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    t = ref.timesteps[3]
    want = ref.scale_model_input(torch.from_numpy(x), t).numpy()
    grid = sigma_grid(sched, 10)
    np.testing.assert_allclose(np.asarray(scale_model_input(x, grid.sigmas[3])), want,
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kw, match", [
    (dict(sigma_schedule="polyexponential"), "sigma_schedule"),
    (dict(final_sigmas_type="one"), "final_sigmas_type"),
    (dict(spacing="middle"), "spacing"),
    (dict(sigma_schedule="karras", sigma_min=2.0, sigma_max=1.0), "sigma_min"),
    (dict(sigma_schedule="karras", rho=0.0), "rho"),
])
def test_sigma_grid_rejects_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        sigma_grid(make_schedule("linear", 100), 10, **kw)
    with pytest.raises(ValueError, match="num_steps"):
        sigma_grid(make_schedule("linear", 100), 101)
