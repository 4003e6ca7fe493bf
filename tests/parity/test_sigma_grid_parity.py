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
from tests.parity.tolerances import train_sigma_rtol, ulps, within

DIFFUSERS_NAME = {"linear": "linear", "scaled_linear": "scaled_linear",
                  "cosine": "squaredcos_cap_v2"}
BETAS = {"linear": {}, "scaled_linear": dict(beta_start=0.00085, beta_end=0.012), "cosine": {}}


def _pair(name, **cfg):
    ref = EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_NAME[name],
                                 **BETAS[name], **cfg)
    return ref, make_schedule(name, 1000, **BETAS[name])


# Tolerances: diffusers builds ``alphas_cumprod`` in float32, jaxdiff in float64 and rounds once;
# the training sigmas then differ by tolerances.train_sigma_rtol (per step).
def _train_sigma_rtol(sched, name):
    """``[T]`` bound on the relative difference of the training sigmas."""
    return train_sigma_rtol(_pair(name)[0])


def _grid_bounds(name, sched, grid, spaced, sigma_schedule, final):
    """Per-entry bounds ``(sigma rtol [N + 1], timestep atol [N])`` for ``grid``, whose discrete
    form sits at the float32 timesteps ``spaced [N]``. Discrete sigmas interpolate two training
    sigmas (the larger bound of the two). Karras, exponential and beta sigmas are monotone maps of
    the end points ``sigma_max, sigma_min`` (the discrete grid's first and last sigmas), whose
    relative errors they pass on at most summed: for Karras and exponential ``d log sigma_i`` is a
    convex combination of ``d log sigma_min`` and ``d log sigma_max``; for beta, ``sigma_i = lo + p
    (hi - lo)`` gives ``|d sigma_i| / sigma_i <= |d lo| / lo + |d hi| / hi``; plus the float32 cast
    of a float64 grid (``ulps(2)``). Timesteps: a discrete grid's are the same float32 numbers on
    both sides (two roundings of a value < T); the others come from ``sigma_to_t``, which divides
    the differences of ``log sigma_i`` and of the two bracketing ``log train_sigmas`` by their
    spacing ``log sigma_{k+1} - log sigma_k``."""
    rel_train = _train_sigma_rtol(sched, name)
    T = len(rel_train)

    def at(ts):  # the bound of the training sigmas interpolated at (fractional) ``ts``
        lo = np.clip(np.floor(ts).astype(int), 0, T - 2)
        return np.maximum(rel_train[lo], rel_train[lo + 1]), lo

    if sigma_schedule == "discrete":
        rel, _ = at(np.asarray(spaced, np.float64))
        t_atol = np.full(len(rel), ulps(2, T))
    else:
        ends, _ = at(np.asarray(spaced, np.float64)[[0, -1]])
        ts = np.asarray(grid.timesteps, np.float64)
        rel = np.full(len(ts), ends.sum() + ulps(2))
        _, lo = at(ts)
        log_train = np.log(np.asarray(sched.sqrt_recipm1_alphas_cumprod, np.float64))
        t_atol = (rel + rel_train[lo] + rel_train[lo + 1]) / (log_train[lo + 1] - log_train[lo])
        t_atol += ulps(2, T)
    last = rel_train[0] if final == "sigma_min" else 0.0
    return np.concatenate([rel, [last]]), t_atol


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
    # sigmas span 1e-2 .. 2e4, from two roundings of alphas_cumprod: bounds in _grid_bounds.
    spaced = np.asarray(sigma_grid(sched, n, spacing=spacing, steps_offset=offset).timesteps)
    rel, t_atol = _grid_bounds(name, sched, grid, spaced, sigma_schedule, final)
    want = ref.sigmas.numpy().astype(np.float64)
    within(np.abs(grid.sigmas - want), rel * want, "sigmas")
    within(np.abs(grid.timesteps - ref.timesteps.numpy()), t_atol, "timesteps")
    assert grid.prev_timesteps[-1] == -1
    # init_noise_sigma: sigma_max, or sqrt(sigma_max^2 + 1) (no larger relative error)
    within(abs(init_noise_sigma(grid, spacing) - float(ref.init_noise_sigma)),
           (rel[0] + ulps(4)) * float(ref.init_noise_sigma), "init_noise_sigma")


def test_sigma_to_t_inverts_the_training_sigmas():
    sched = make_schedule("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
    s = train_sigmas(sched)
    t = sigma_to_t(s[[0, 10, 500, 999]], np.log(s))
    # float64 throughout: a few roundings of values < T = 1000
    atol = 64 * np.finfo(np.float64).eps * 1000
    np.testing.assert_allclose(t, [0, 10, 500, 999], rtol=0, atol=atol)
    mid = sigma_to_t(np.sqrt(s[10] * s[11]), np.log(s))  # the log-midpoint
    np.testing.assert_allclose(mid, 10.5, rtol=0, atol=atol)


def test_scale_model_input_matches_diffusers():
    import torch

    ref, sched = _pair("linear")
    ref.set_timesteps(10)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    t = ref.timesteps[3]
    want = ref.scale_model_input(torch.from_numpy(x), t).numpy()
    grid = sigma_grid(sched, 10)
    # x / sqrt(sigma^2 + 1): 3 roundings a side, and sigma's own bound (_grid_bounds)
    rel, _ = _grid_bounds("linear", sched, grid, grid.timesteps, "discrete", "zero")
    np.testing.assert_allclose(np.asarray(scale_model_input(x, grid.sigmas[3])), want,
                               rtol=rel[3] + ulps(6), atol=0)


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
