"""Schedules and the forward process against diffusers' DDPMScheduler (the PyTorch reference).

Tolerance: max abs difference <= 1e-5 in float32 (diffusers builds its schedules in float32 torch;
jaxdiff builds them in float64 and casts, so the two differ by float32 rounding, ~1e-7 measured).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from jaxdiff import diffusion as D
from jaxdiff.schedules import make_schedule

TOL = 1e-5
DIFFUSERS_NAME = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "cosine": "squaredcos_cap_v2",
    "sigmoid": "sigmoid",
}
CASES = [
    (name, T, zsnr, kw)
    for name in DIFFUSERS_NAME
    for T in (1000, 37)
    for zsnr in (False, True)
    for kw in ({}, {"beta_start": 0.00085, "beta_end": 0.012})
    if not (name == "cosine" and kw)
]


def _pair(name, T, zsnr, kw):
    ref = DDPMScheduler(
        num_train_timesteps=T,
        beta_schedule=DIFFUSERS_NAME[name],
        rescale_betas_zero_snr=zsnr,
        **kw,
    )
    ours = make_schedule(name, T, rescale_to_zero_terminal_snr=zsnr, **kw)
    return ref, ours


@pytest.mark.parametrize("name, T, zsnr, kw", CASES)
def test_betas_and_alphas_cumprod(name, T, zsnr, kw):
    ref, ours = _pair(name, T, zsnr, kw)
    assert np.abs(np.asarray(ours.betas) - ref.betas.numpy()).max() <= TOL
    assert np.abs(np.asarray(ours.alphas) - ref.alphas.numpy()).max() <= TOL
    assert np.abs(np.asarray(ours.alphas_cumprod) - ref.alphas_cumprod.numpy()).max() <= TOL


@pytest.mark.parametrize("name", list(DIFFUSERS_NAME))
@pytest.mark.parametrize("kind", ["eps", "v"])
def test_q_sample_and_velocity_vs_add_noise(name, kind):
    ref, ours = _pair(name, 1000, False, {})
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((6, 3, 8, 8)).astype(np.float32)  # NCHW for torch
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 1, 250, 500, 998, 999])
    if kind == "eps":
        expected = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
        got = D.q_sample(ours, jnp.asarray(x0.transpose(0, 2, 3, 1)), jnp.asarray(t),
                         jnp.asarray(noise.transpose(0, 2, 3, 1)))
    else:
        expected = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise),
                                    torch.from_numpy(t))
        got = D.velocity(ours, jnp.asarray(x0.transpose(0, 2, 3, 1)), jnp.asarray(t),
                         jnp.asarray(noise.transpose(0, 2, 3, 1)))
    diff = np.abs(np.asarray(got).transpose(0, 3, 1, 2) - expected.numpy()).max()
    assert diff <= TOL, diff
