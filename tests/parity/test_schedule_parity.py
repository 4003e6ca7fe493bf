"""Schedules and the forward process against diffusers' DDPMScheduler (the PyTorch reference).

Tolerances: diffusers builds its schedules in float32 torch, jaxdiff in float64 and rounds once;
every bound is per entry, derived in tests/parity/tolerances.py (``float32_betas_atol``,
``float32_cumprod_rtol``, ``zero_snr_bounds``) and below from the roundings of diffusers' float32
formulas and the condition numbers of the quantities compared.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from jaxdiff import diffusion as D
from jaxdiff.schedules import BETA_SCHEDULES, make_schedule
from tests.parity.tolerances import (
    EPS32,
    float32_alpha_rtol,
    float32_betas_atol,
    float32_cumprod_rtol,
    ulps,
    within,
    zero_snr_bounds,
)

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


def _betas64(name, T, kw):
    """jaxdiff's float64 betas (before any zero-SNR rescale) and diffusers' float32 bound."""
    betas = BETA_SCHEDULES[name](T, **kw)
    return betas, float32_betas_atol(betas, DIFFUSERS_NAME[name])


def _diff(ours, ref):
    return np.abs(np.asarray(ours, np.float64) - ref.numpy().astype(np.float64))


@pytest.mark.parametrize("name, T, zsnr, kw", CASES)
def test_betas_and_alphas_cumprod(name, T, zsnr, kw):
    ref, ours = _pair(name, T, zsnr, kw)
    betas, atol = _betas64(name, T, kw)
    if zsnr:
        beta_bound, abar_bound = zero_snr_bounds(betas, atol)
    else:  # + jaxdiff's rounding of each stored entry
        beta_bound = atol + ulps(1, betas)
        abar_bound = np.cumprod(1 - betas) * float32_cumprod_rtol(betas, atol)
    within(_diff(ours.betas, ref.betas), beta_bound, "betas")
    # alpha = 1 - beta: one more rounding (of a value <= 1) on either side
    within(_diff(ours.alphas, ref.alphas), beta_bound + ulps(2), "alphas")
    within(_diff(ours.alphas_cumprod, ref.alphas_cumprod), abar_bound, "alphas_cumprod")


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
    # diffusers' float32 alphas_cumprod differs by rel (float32_cumprod_rtol); sqrt(abar) by rel / 2
    # of itself, sqrt(1 - abar) by abar rel / (2 (1 - abar)) of 1 (the cancellation near t = 0);
    # then about 6 roundings a side (two square roots, 1 - abar, two products, the sum) of values
    # up to m = max(|x0|, |noise|).
    betas, atol = _betas64(name, 1000, {})
    a = np.cumprod(1 - betas)[t]
    rel = float32_cumprod_rtol(betas, atol)[t]
    m = max(np.abs(x0).max(), np.abs(noise).max())
    bound = m * (np.sqrt(a) * rel / 2 + a * rel / (2 * np.sqrt(1 - a)) + ulps(12))
    diff = np.abs(np.asarray(got).transpose(0, 3, 1, 2) - expected.numpy())
    within(diff.reshape(len(t), -1).max(axis=1), bound, kind)


# --------------------------------------------------------------------------- the posterior
#
# q(x_{t-1} | x_t, x_0) against DDPMScheduler: its variance is ``_get_variance(t, "fixed_small")``
# and its mean is what ``step`` computes from x0 and x_t (``pred_original_sample_coeff * x0 +
# current_sample_coeff * x_t``), read off with ``prediction_type="sample"``, no clipping and
# zero noise. diffusers' convention at t = 0 (variance clamped to 1e-20) is compared on the
# variance only; jaxdiff's clipped log-variance at t = 0 (that of t = 1, Ho et al. 2020) has no
# diffusers counterpart and is compared for t >= 1.
#
# Tolerances (``_posterior_rtol``). Two references: diffusers' own formulas run on float64
# alphas_cumprod (the cumprod of its float32 betas), where only the betas' float32 rounding and
# jaxdiff's storage differ; and diffusers exactly as it ships (float32), which forms
# beta_t = 1 - abar_t / abar_{t-1} by cancellation: a relative error of order eps32 / beta_t.
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
    within(np.abs(np.asarray(got, np.float64) - want), atol, name)


def _posterior_rtol(name, T, precision):
    """Relative bounds ``(variance, coef1, coef2) [T]`` of jaxdiff's posterior against diffusers'
    (see above), to first order in the roundings, with ``u = EPS32`` a rounding:

    - ``abar_t`` errs by ``A_t = sum_{s <= t} e_s`` relative (the factors' errors,
      ``float32_alpha_rtol``; float32: + u for its storage), so ``1 - abar_t`` by
      ``abar_t A_t / (1 - abar_t)`` (``abar_{-1} = 1`` is exact);
    - ``beta_t``: float64, the float32 beta's own error; float32, ``1 - abar_t / abar_{t-1}``:
      the ratio errs by ``e_t + 3 u`` (its factors' shared errors cancel but for ``e_t``; two
      storage roundings and the division), which the subtraction turns into ``(alpha_t (e_t +
      3 u) + u) / beta_t`` relative; likewise ``alpha_t`` by ``e_t + 3 u``;
    - ``variance = beta_t (1 - abar_{t-1}) / (1 - abar_t)``, ``coef1 = beta_t sqrt(abar_{t-1})
      / (1 - abar_t)``, ``coef2 = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)``: the relative
      errors of the factors add (a square root halves its argument's), plus 4 u for each side's
      remaining operations and jaxdiff's storage."""
    u = EPS32
    betas, atol = _betas64(name, T, {})
    e = float32_alpha_rtol(betas, atol)
    abar = np.cumprod(1 - betas)
    A = np.cumsum(e) + (u if precision == "float32" else 0.0)
    one_minus = abar * A / (1 - abar)
    one_minus_prev = np.concatenate([[0.0], one_minus[:-1]])
    A_prev = np.concatenate([[0.0], A[:-1]])
    if precision == "float64":
        beta_rel, alpha_rel = atol / betas, atol / (1 - betas)
    else:
        beta_rel = ((1 - betas) * (e + 3 * u) + u) / betas
        alpha_rel = e + 3 * u
    var = beta_rel + one_minus_prev + one_minus + 8 * u
    coef1 = beta_rel + A_prev / 2 + one_minus + 8 * u
    coef2 = one_minus_prev + alpha_rel / 2 + one_minus + 8 * u
    return var, coef1, coef2


@pytest.mark.parametrize("name, T", POSTERIOR_CASES)
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_posterior_variance_and_mean_coefficients(name, T, precision, monkeypatch):
    var, coef1, coef2 = _posterior_reference(name, T, precision, monkeypatch)
    ours = make_schedule(name, T)
    var_rel, coef1_rel, coef2_rel = _posterior_rtol(name, T, precision)
    # diffusers clamps the variance (0 at t = 0) to at least 1e-20: compared with the same clamp
    _assert_close("posterior_variance", np.maximum(ours.posterior_variance, 1e-20), var,
                  var_rel * var)
    _assert_close("posterior_mean_coef1", ours.posterior_mean_coef1, coef1,
                  coef1_rel * np.abs(coef1))
    _assert_close("posterior_mean_coef2", ours.posterior_mean_coef2, coef2,
                  coef2_rel * np.abs(coef2))
    # log variance: an absolute gap in log is a relative gap in the variance, + the float32 log
    _assert_close("posterior_log_variance_clipped[1:]", ours.posterior_log_variance_clipped[1:],
                  np.log(var[1:]), var_rel[1:] + ulps(1, np.abs(np.log(var[1:]))))


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
    var_rel, coef1_rel, coef2_rel = _posterior_rtol(name, T, "float64")
    for i, ti in enumerate(t):
        want = ref.step(torch.from_numpy(x0[i]).double(), int(ti),
                        torch.from_numpy(x_t[i]).double()).prev_sample.numpy()
        # coef1 x0 + coef2 x_t: the coefficients' bounds, then a product each and the sum (float32)
        c1, c2 = float(ours.posterior_mean_coef1[ti]), float(ours.posterior_mean_coef2[ti])
        terms = np.abs(c1 * x0[i]) + np.abs(c2 * x_t[i])
        bound = (coef1_rel[ti] * np.abs(c1 * x0[i]) + coef2_rel[ti] * np.abs(c2 * x_t[i])
                 + ulps(3, terms.max()))
        _assert_close(f"mean at t={ti}", mean[i], want, bound)
        want_var = float(ref._get_variance(int(ti), variance_type="fixed_small"))
        _assert_close(f"variance at t={ti}", max(float(var[i, 0, 0, 0]), 1e-20), want_var,
                      var_rel[ti] * want_var)  # diffusers' 1e-20 clamp, as above
