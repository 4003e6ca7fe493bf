"""LCM sampling against diffusers' ``LCMScheduler`` (PyTorch, float32), whole trajectories.

Both sides run the stand-in model of test_sampler_parity.py (``standin``: the near-exact denoiser
of ``N(0, 0.25 I)`` data, O(1) outputs) and draw the same re-noising noise: diffusers'
``randn_tensor`` is patched to return ``noise[step_index]``, which it calls on every step but the
last, exactly the rows jaxdiff reads. The scheduler gets jaxdiff's ``alphas_cumprod`` (schedules
are compared in test_schedule_parity.py); one case keeps diffusers' own float32 schedule.

Tolerance: every step's sample and ``denoised`` (all O(1)) within ``tolerances.stepwise_atol``
(see ``_bounds``): an eps model's ``denoised`` is ``c_out`` times its predicted x0, ``(x_t -
sqrt(1 - abar_t) eps) / sqrt(abar_t)``, which divides the float32 rounding of that cancellation by
``sqrt(abar_t)`` (157x at t = 999 linear), and the re-noising carries it into the next sample with
``sqrt(abar_prev)``. Timestep grids must be equal exactly, including the
``original_inference_steps`` / ``strength`` variants, against ``LCMScheduler.set_timesteps``.
"""

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler
from diffusers.schedulers import scheduling_lcm

from jaxdiff.samplers.lcm import lcm_sample, lcm_timesteps
from jaxdiff.schedules import make_schedule, schedule_from_betas
from tests.parity.test_sampler_parity import DIFFUSERS_PRED, standin
from tests.parity.tolerances import (
    float32_alpha_rtol,
    stepwise_atol,
    within,
)

T = 1000
SHAPE = (2, 8, 8, 3)
SD = dict(beta_start=0.00085, beta_end=0.012)
SCHEDULES = {
    "scaled_linear": make_schedule("scaled_linear", T, **SD),
    "linear": make_schedule("linear", T),
}


def _ref(name, pred, orig, clip, scaling, own_schedule=False):
    ref = LCMScheduler(
        num_train_timesteps=T, beta_schedule=name, original_inference_steps=orig,
        clip_sample=clip is not None, clip_sample_range=clip or 1.0,
        prediction_type=DIFFUSERS_PRED[pred], timestep_scaling=scaling,
        **(SD if name == "scaled_linear" else {}),
    )
    if not own_schedule:
        ref.alphas_cumprod = torch.from_numpy(np.array(SCHEDULES[name].alphas_cumprod))
    return ref


@pytest.mark.parametrize("num_steps, orig, strength", [
    (1, 50, 1.0), (4, 50, 1.0), (6, 50, 1.0), (7, 13, 1.0), (50, 50, 1.0), (3, 50, 0.6),
    (8, 100, 0.35), (2, 1000, 1.0),
])
def test_timesteps_match(num_steps, orig, strength):
    ref = LCMScheduler(num_train_timesteps=T, original_inference_steps=orig)
    ref.set_timesteps(num_steps, strength=strength)
    grid = lcm_timesteps(SCHEDULES["linear"], num_steps, original_inference_steps=orig,
                         strength=strength)
    np.testing.assert_array_equal(grid.timesteps, ref.timesteps.numpy())
    np.testing.assert_array_equal(grid.prev_timesteps[:-1], grid.timesteps[1:])
    assert grid.prev_timesteps[-1] == -1 and grid.sigmas[-1] == 0


@pytest.mark.parametrize("num_steps, orig, strength", [(51, 50, 1.0), (4, 50, 0.05)])
def test_timesteps_reject_what_diffusers_rejects(num_steps, orig, strength):
    ref = LCMScheduler(num_train_timesteps=T, original_inference_steps=orig)
    with pytest.raises(ValueError):
        ref.set_timesteps(num_steps, strength=strength)
    with pytest.raises(ValueError, match="num_steps"):
        lcm_timesteps(SCHEDULES["linear"], num_steps, original_inference_steps=orig,
                      strength=strength)


CASES = [
    # name, pred, num_steps, original_inference_steps, clip, timestep_scaling, own_schedule
    ("scaled_linear", "eps", 4, 50, None, 10.0, False),
    ("scaled_linear", "eps", 4, 50, None, 10.0, True),  # diffusers' own float32 schedule
    ("scaled_linear", "v", 6, 50, None, 10.0, False),
    ("scaled_linear", "x0", 3, 20, 1.0, 10.0, False),
    ("linear", "eps", 5, 50, 0.5, 1.0, False),  # clipping that bites, a small scaling
    ("linear", "v", 1, 50, None, 10.0, False),  # one step: no noise at all
]


@pytest.mark.parametrize("name, pred, n, orig, clip, scaling, own_schedule", CASES)
def test_trajectory_matches_lcm_scheduler(name, pred, n, orig, clip, scaling, own_schedule,
                                          monkeypatch):
    rng = np.random.default_rng(n)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal((n, *SHAPE)).astype(np.float32)
    ref = _ref(name, pred, orig, clip, scaling, own_schedule)
    ref.set_timesteps(n)
    calls = []

    def randn(shape, **kw):
        calls.append(ref.step_index)
        return torch.from_numpy(noise[ref.step_index])

    monkeypatch.setattr(scheduling_lcm, "randn_tensor", randn)
    acp_ref = ref.alphas_cumprod
    x, ref_xs, ref_dens = torch.from_numpy(x_T), [x_T], []
    for t in ref.timesteps:
        out = standin(torch, x, torch.full((SHAPE[0],), int(t)), acp_ref, pred)
        x, den = ref.step(out, t, x, return_dict=False)
        ref_xs.append(x.numpy())
        ref_dens.append(den.numpy())
    assert calls == list(range(n - 1))  # diffusers draws on every step but the last

    sched = SCHEDULES[name]
    if own_schedule:
        sched = schedule_from_betas(ref.betas.numpy())
    acp = sched.alphas_cumprod

    def model(x, t):
        import jax.numpy as jnp

        return standin(jnp, x, t, acp, pred)

    _, xs, dens = lcm_sample(model, sched, x_T, None, num_steps=n, original_inference_steps=orig,
                             timestep_scaling=scaling, prediction_type=pred, clip_x0=clip,
                             noise=noise, return_trajectory=True)
    tol_x, tol_d = _bounds(sched, n, orig, scaling, pred, own_schedule, x_T, noise)
    err_x = np.abs(np.asarray(xs, np.float64) - np.stack(ref_xs)).max(axis=(1, 2, 3, 4))
    within(err_x, tol_x, "samples")
    err_d = np.abs(np.asarray(dens, np.float64) - np.stack(ref_dens)).max(axis=(1, 2, 3, 4))
    within(err_d, tol_d, "denoised")


def _bounds(sched, n, orig, scaling, pred, own_schedule, *arrays):
    """``(samples [N + 1], denoised [N])`` bounds: ``tolerances.stepwise_atol`` at the scale of
    ``arrays``; an eps model's predicted x0 divides its conversion's rounding by ``sqrt(abar_t)``,
    scaled by ``c_out`` in ``denoised`` and by ``c_out sqrt(abar_prev)`` in the next sample. With
    diffusers' own float32 schedule (``own_schedule``; jaxdiff has the same float32 betas, so the
    schedules differ by the cumprod's roundings, ``float32_alpha_rtol`` with exact betas), each
    re-noising ``sqrt(a) d + sqrt(1 - a) z`` moves by ``m (sqrt(a) + a / sqrt(1 - a)) rel / 2``
    and the stand-in's x0, ``c_out`` times at most twice ``rel`` of it (``m`` the largest input):
    added per step, carried with a factor <= 1."""
    grid = lcm_timesteps(sched, n, original_inference_steps=orig)
    acp = np.asarray(sched.alphas_cumprod, np.float64)
    a_t = acp[grid.timesteps]
    a_p = np.where(grid.prev_timesteps >= 0, acp[np.maximum(grid.prev_timesteps, 0)], 1.0)
    s = scaling * grid.timesteps.astype(np.float64)
    c_out = s / np.sqrt(s**2 + 0.25)
    zero = np.zeros(n)
    gains = (c_out / np.sqrt(a_t), c_out * np.sqrt(a_p / a_t)) if pred == "eps" else (zero, zero)
    scale = max(np.abs(a).max() for a in arrays)
    samples, denoised = stepwise_atol(scale, *gains)
    if own_schedule:
        betas = np.asarray(sched.betas, np.float64)
        rel = np.cumsum(float32_alpha_rtol(betas, 0 * betas))
        r_p = np.where(grid.prev_timesteps >= 0, rel[np.maximum(grid.prev_timesteps, 0)], 0.0)
        moves = scale * ((np.sqrt(a_p) + a_p / np.sqrt(1 - a_p + 1e-30)) * r_p / 2
                         + 2 * c_out * rel[grid.timesteps])
        samples, denoised = samples + np.cumsum(moves), denoised + np.cumsum(moves)
    return np.concatenate([[0.0], samples]), denoised
