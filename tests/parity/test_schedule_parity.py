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


# --------------------------------------------------------------------------- the posterior
#
# q(x_{t-1} | x_t, x_0) against DDPMScheduler: its variance is ``_get_variance(t, "fixed_small")``
# and its mean is what ``step`` computes from x0 and x_t (``pred_original_sample_coeff * x0 +
# current_sample_coeff * x_t``), read off with ``prediction_type="sample"``, no clipping and
# zero noise. diffusers' convention at t = 0 (variance clamped to 1e-20) is compared on the
# variance only; jaxdiff's clipped log-variance at t = 0 (that of t = 1, Ho et al. 2020) has no
# diffusers counterpart and is compared for t >= 1.
#
# Tolerances. diffusers keeps alphas_cumprod in float32 and forms beta_t = 1 - abar_t / abar_{t-1}
# by cancellation, so its coefficients carry a relative error of order eps32 / beta_t (up to
# 2e-4 absolute at t <= 8 on these schedules). Two comparisons therefore:
# - POSTERIOR_ATOL = 1e-6 absolute against diffusers' own formulas run on float64
#   alphas_cumprod (cumprod of its float32 betas): only float32 storage differs (~2e-7 seen);
# - against diffusers exactly as it ships (float32): 1e-6 + 2 * eps32 / beta_t absolute, the
#   cancellation bound above (the largest gap seen is 0.27 eps32 / beta_t + 2e-7).
POSTERIOR_ATOL = 1e-6
EPS32 = float(np.finfo(np.float32).eps)
POSTERIOR_CASES = [(name, T) for name in ("linear", "scaled_linear", "cosine") for T in (1000, 37)]


def _posterior_reference(name, T, precision, monkeypatch):
    """diffusers' posterior over every t: (variance [T], coef1 [T], coef2 [T]) in float64 numpy."""
    from diffusers.schedulers import scheduling_ddpm

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor",
                        lambda shape, dtype=None, **kw: torch.zeros(shape, dtype=dtype))
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[name],
                        prediction_type="sample", clip_sample=False)
    if precision == "float64":
        ref.alphas_cumprod = torch.cumprod(1.0 - ref.betas.double(), dim=0)
        ref.one = torch.tensor(1.0, dtype=torch.float64)
    dtype = ref.alphas_cumprod.dtype
    x0, x_t = torch.tensor([[1.0, 0.0]], dtype=dtype), torch.tensor([[0.0, 1.0]], dtype=dtype)
    var, coef1, coef2 = [], [], []
    for t in range(T):
        var.append(float(ref._get_variance(t, variance_type="fixed_small")))
        prev = ref.step(x0, t, x_t).prev_sample  # [[coef1 * 1 + coef2 * 0, coef1 * 0 + coef2]]
        coef1.append(float(prev[0, 0]))
        coef2.append(float(prev[0, 1]))
    return np.array(var), np.array(coef1), np.array(coef2)


def _assert_close(name, got, want, atol):
    gap = np.abs(np.asarray(got, np.float64) - want) - atol
    assert (gap <= 0).all(), (f"{name}: worst entry (flat index) {int(gap.argmax())}, |diff| "
                              f"exceeds its tolerance by {gap.max():.2e}")


@pytest.mark.parametrize("name, T", POSTERIOR_CASES)
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_posterior_variance_and_mean_coefficients(name, T, precision, monkeypatch):
    var, coef1, coef2 = _posterior_reference(name, T, precision, monkeypatch)
    ours = make_schedule(name, T)
    atol = POSTERIOR_ATOL
    if precision == "float32":
        atol = POSTERIOR_ATOL + 2 * EPS32 / np.asarray(ours.betas, np.float64)
    _assert_close("posterior_variance", ours.posterior_variance, var, POSTERIOR_ATOL)
    _assert_close("posterior_mean_coef1", ours.posterior_mean_coef1, coef1, atol)
    _assert_close("posterior_mean_coef2", ours.posterior_mean_coef2, coef2, atol)
    # log variance: an absolute gap in log is a relative gap in the variance (float64: ~3e-7 seen)
    log_atol = 1e-5 if precision == "float64" else 1e-5 + 2 * EPS32 / np.asarray(ours.betas)[1:]
    _assert_close("posterior_log_variance_clipped[1:]", ours.posterior_log_variance_clipped[1:],
                  np.log(var[1:]), log_atol)


@pytest.mark.parametrize("name, T", POSTERIOR_CASES)
def test_q_posterior_mean_variance_vs_step(name, T, monkeypatch):
    """``diffusion.q_posterior_mean_variance`` on random x0, x_t: its mean against the mean of
    ``DDPMScheduler.step`` (float64 state, as above), its variance against ``_get_variance``."""
    from diffusers.schedulers import scheduling_ddpm

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor",
                        lambda shape, dtype=None, **kw: torch.zeros(shape, dtype=dtype))
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[name],
                        prediction_type="sample", clip_sample=False)
    ref.alphas_cumprod = torch.cumprod(1.0 - ref.betas.double(), dim=0)
    ref.one = torch.tensor(1.0, dtype=torch.float64)
    ours = make_schedule(name, T)
    t = np.array(sorted({0, 1, 2, 5, T // 2, T - 2, T - 1}))
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((len(t), 4, 4, 2)).astype(np.float32)  # NHWC
    x_t = rng.standard_normal(x0.shape).astype(np.float32)
    mean, var, _ = D.q_posterior_mean_variance(ours, jnp.asarray(x0), jnp.asarray(x_t),
                                               jnp.asarray(t))
    assert var.shape == (len(t), 1, 1, 1)
    for i, ti in enumerate(t):
        want = ref.step(torch.from_numpy(x0[i]).double(), int(ti),
                        torch.from_numpy(x_t[i]).double()).prev_sample.numpy()
        _assert_close(f"mean at t={ti}", mean[i], want, 1e-5)
        want_var = float(ref._get_variance(int(ti), variance_type="fixed_small"))
        _assert_close(f"variance at t={ti}", var[i, 0, 0, 0], want_var, POSTERIOR_ATOL)
