"""Zero-terminal-SNR scheduler configs with LINEAR betas against diffusers (issue 24, section 8):
``rescale_betas_zero_snr=True``, ``beta_schedule="linear"``, ``timestep_spacing="trailing"``, for
the four classes that floor the last ``alphas_cumprod`` at ``2**-24`` (Euler, Euler ancestral,
DPM-Solver, UniPC). jaxdiff crashed on these ("betas must lie in (0, 1)"): with linear betas
``abar_{T-2} = 4.2e-9 < 2**-24``, so the floor written as an implied last beta came out negative.

Tolerances, derived rather than measured:

- ``alphas_cumprod``: diffusers computes the rescaled schedule in float32 (a cumulative product
  over ``T = 1000`` factors, then the rescaling's difference of square roots), jaxdiff in float64
  then rounds once. A float32 product of ``k`` factors is within ``k`` ulps (``k * 2**-24``
  relative) of the exact one, and the rescaling ``(sqrt(abar) - sqrt(abar_last)) * c`` at most
  doubles that where it cancels: ``rtol = 3 * 2 * T * 2**-24 = 3.6e-4`` (3x margin over that
  worst case), ``atol = 0`` (both sides end at the same float32 ``2**-24``, which must be exact).
- sigmas ``sqrt((1 - abar) / abar)``: half of ``abar``'s relative error, so the same bound holds.
- trajectories: both sides then read jaxdiff's float32 ``alphas_cumprod`` (patched into the
  scheduler, as tests/parity/test_scheduler_config_parity.py does), so they differ by float32
  rounding of the arithmetic only. The start is ``sigma_max = 4096`` times a standard normal
  (Euler family) or unit-scale (DPM-Solver, UniPC), so one ulp of the sample there is up to
  ``4096 * 2**-23 = 4.9e-4`` before the first step contracts it; each step's update is
  ``x + d (sigma_next - sigma)`` with ``|d| <= |x| / sigma``, so that first-step rounding enters the
  result scaled by ``sigma_next / sigma`` (at most ``sigma_1 / sigma_0``). Bound:
  ``atol = 3 * (ulp(4096) * sigma_1 / sigma_0 + N * ulp(|x| ~ 4))``, computed per case below.
"""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxdiff.convert import sampler_from_diffusers_config, schedule_from_diffusers_config
from jaxdiff.samplers import sampler_grid
from tests.parity.test_euler_parity import standin_sigma as standin

CONFIG = dict(beta_schedule="linear", rescale_betas_zero_snr=True, timestep_spacing="trailing")
CLASSES = ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
           "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"]
T = 1000
RTOL_SCHEDULE = 3 * 2 * T * 2.0**-24
SHAPE = (2, 4, 4, 3)
N = 8


@pytest.mark.parametrize("cls", CLASSES)
def test_schedule_and_sigmas_match_diffusers(cls):
    ref = getattr(diffusers, cls)(**CONFIG)
    config = {**CONFIG, "_class_name": cls}
    schedule = schedule_from_diffusers_config(config)
    acp, want = np.asarray(schedule.alphas_cumprod), ref.alphas_cumprod.numpy()
    assert want[-2] < want[-1] == np.float32(2.0**-24) == acp[-1]  # the floor, exactly
    np.testing.assert_allclose(acp, want, rtol=RTOL_SCHEDULE, atol=0)
    ref.set_timesteps(N)
    grid = sampler_grid(sampler_from_diffusers_config(config), schedule, N)
    np.testing.assert_allclose(np.asarray(grid.sigmas), ref.sigmas.numpy(), rtol=RTOL_SCHEDULE,
                               atol=0)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("cls", CLASSES)
def test_trajectory_matches_diffusers(cls, pred, monkeypatch):
    config = {**CONFIG, "_class_name": cls, "prediction_type": pred}
    ref = getattr(diffusers, cls)(**CONFIG, prediction_type=pred)
    schedule = schedule_from_diffusers_config(config)
    sampler = sampler_from_diffusers_config(config)
    acp = np.array(schedule.alphas_cumprod)
    ref.alphas_cumprod = torch.from_numpy(acp)
    if hasattr(ref, "alpha_t"):  # DPMSolverMultistep / UniPC cache these at construction
        ref.alpha_t = torch.sqrt(ref.alphas_cumprod)
        ref.sigma_t = torch.sqrt(1 - ref.alphas_cumprod)
        ref.lambda_t = torch.log(ref.alpha_t) - torch.log(ref.sigma_t)
        ref.sigmas = ((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5
    short = {"epsilon": "eps", "v_prediction": "v"}[pred]
    ref.set_timesteps(N)
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal((N, *SHAPE)).astype(np.float32)
    module = __import__(type(ref).__module__, fromlist=["randn_tensor"])
    calls = iter(range(N))
    if sampler.stochastic:
        monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: torch.from_numpy(
            noise[next(calls)].transpose(0, 3, 1, 2).copy()))
    x = torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy()) * ref.init_noise_sigma
    acp_t = torch.from_numpy(acp)
    for t in ref.timesteps:
        tt = torch.full((SHAPE[0],), float(t))
        out = standin(torch, ref.scale_model_input(x, t), tt, acp_t, short)
        x = ref.step(out, t, x).prev_sample
    want = x.numpy().transpose(0, 2, 3, 1)

    def model(x, t):
        return standin(jnp, x, t, schedule.alphas_cumprod, short)

    got = jax.jit(lambda x, z: sampler(model, schedule, x, None, num_steps=N,
                                       **({"noise": z} if sampler.stochastic else {})))(
        x_T, noise)
    assert np.isfinite(np.asarray(got)).all() and np.isfinite(want).all()
    sig = np.asarray(sampler_grid(sampler, schedule, N).sigmas, np.float64)
    scale = float(ref.init_noise_sigma)  # 4096 (sigma space) or 1
    ulp = np.spacing(np.float32(max(scale, 1.0)) * 4)  # the start sample: |x| <~ 4 sigma_0
    atol = 3 * (ulp * sig[1] / sig[0] + N * np.spacing(np.float32(4.0)))
    err = float(np.abs(np.asarray(got) - want).max())
    print(f"{cls} {pred}: max abs err {err:.2e} (atol {atol:.2e})")
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=atol)


@pytest.mark.slow
def test_load_stable_diffusion_reads_such_a_folder(tmp_path):
    """A Stable Diffusion folder whose scheduler is such a config loads (it raised before) with
    diffusers' schedule (the sampler's trajectory is compared above)."""
    from jaxdiff.pipelines import load_stable_diffusion
    from jaxdiff.pipelines.tiny import write_tiny_stable_diffusion

    pipe = write_tiny_stable_diffusion(
        str(tmp_path), scheduler="EulerDiscreteScheduler", prediction_type="v_prediction",
        scheduler_options=dict(CONFIG, beta_start=0.0001, beta_end=0.02))
    sd = load_stable_diffusion(str(tmp_path))
    assert sd.sampler.name == "euler" and sd.sampler.options["spacing"] == "trailing"
    np.testing.assert_allclose(np.asarray(sd.schedule.alphas_cumprod),
                               pipe.scheduler.alphas_cumprod.numpy(), rtol=RTOL_SCHEDULE, atol=0)
