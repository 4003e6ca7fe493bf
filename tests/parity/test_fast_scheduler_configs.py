"""The scheduler configs that SDXL and its distilled fast models (Turbo, Lightning, Hyper-SD, LCM)
ship or are run with, through ``sampler_from_diffusers_config``, against the diffusers scheduler
built from the same dict, for 1, 2 and 8 steps (issue 27, part 5).

The configs. ``SDXL_BASE`` is stabilityai/stable-diffusion-xl-base-1.0's
``scheduler/scheduler_config.json`` and ``SDXL_TURBO`` stabilityai/sdxl-turbo's, as those folders
hold them (keys of other classes included: ``interpolation_type``, ``skip_prk_steps``, ...). The
other models ship no scheduler of their own; their model cards build one from the base's config
with ``Scheduler.from_config(pipe.scheduler.config, **overrides)``, and a folder saved after that
holds that scheduler's ``config`` (:func:`converted`): SDXL-Lightning's
``EulerDiscreteScheduler`` with ``timestep_spacing="trailing"`` (its 1-step UNet also with
``prediction_type="sample"``), Hyper-SD's ``DDIMScheduler`` with ``"trailing"`` (its N-step
LoRAs) and ``TCDScheduler`` (its 1-step UNet and the TCD LoRAs; the sampler's default ``eta``
0.3 on both sides, diffusers' ``step`` default; Hyper-SD's ``timesteps=[800]`` custom grid is
not supported), the LCM LoRA's ``LCMScheduler``; ``LCM_SDXL`` is latent-consistency/lcm-sdxl's
own file. The Karras variants are the "DPM++ 2M Karras" and "Euler Karras" settings people run
SDXL with.

Checked: the grid jaxdiff's sampler runs (``sampler.spec.grid``) has diffusers' timesteps
exactly and its sigmas (for the sigma-space samplers) within float32 rounding; and the final
sample of an ``N``-step trajectory of the analytic stand-in model, with the same start and noise
(patched into diffusers' ``randn_tensor`` for the ancestral sampler), within the trajectory bound
of test_scheduler_config_parity.py (:func:`compare_config_trajectory`).
"""

from __future__ import annotations

import numpy as np
import pytest

import diffusers

from jaxdiff.convert import sampler_from_diffusers_config
from tests.parity.test_scheduler_config_parity import compare_config_trajectory
from tests.parity.tolerances import ulps, within

SDXL_BASE = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
    "trained_betas": None, "use_karras_sigmas": False,
}
SDXL_TURBO = {
    "_class_name": "EulerAncestralDiscreteScheduler", "_diffusers_version": "0.24.0.dev0",
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "trailing",
    "trained_betas": None,
}
LCM_SDXL = {
    "_class_name": "LCMScheduler", "_diffusers_version": "0.22.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000,
    "original_inference_steps": 50, "prediction_type": "epsilon", "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0, "set_alpha_to_one": True, "steps_offset": 1, "thresholding": False,
    "timestep_spacing": "leading", "trained_betas": None,
}


def converted(class_name: str, **overrides) -> dict:
    """The ``scheduler_config.json`` that ``Class.from_config(SDXL_BASE, **overrides)`` saves."""
    scheduler = getattr(diffusers, class_name).from_config(
        {k: v for k, v in SDXL_BASE.items() if not k.startswith("_")}, **overrides)
    return {"_class_name": class_name, **dict(scheduler.config)}


CONFIGS = {
    "sdxl_base_euler_leading": SDXL_BASE,
    "turbo_euler_ancestral_trailing": SDXL_TURBO,
    "lightning_euler_trailing": converted("EulerDiscreteScheduler", timestep_spacing="trailing"),
    "lightning_1step_sample": converted("EulerDiscreteScheduler", timestep_spacing="trailing",
                                        prediction_type="sample"),
    "hyper_sd_ddim_trailing": converted("DDIMScheduler", timestep_spacing="trailing"),
    "lcm_lora": converted("LCMScheduler"),
    "hyper_sd_tcd": converted("TCDScheduler"),
    "lcm_sdxl": LCM_SDXL,
    "euler_karras": converted("EulerDiscreteScheduler", use_karras_sigmas=True),
    "dpmpp_2m_karras": converted("DPMSolverMultistepScheduler", use_karras_sigmas=True),
}


@pytest.mark.parametrize("n", [1, 2, 8])  # 4 adds nothing 2 and 8 do not check
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fast_config_grid_and_trajectory_match_diffusers(name, n, monkeypatch):
    config = CONFIGS[name]
    ref, sampler, schedule = compare_config_trajectory(config, n, monkeypatch)
    grid = sampler.spec.grid(schedule, n, **sampler.effective_options)
    want_t = ref.timesteps.numpy().astype(np.float64)
    got_t = np.asarray(grid.timesteps, np.float64)
    sig = np.asarray(ref.sigmas, np.float64) if hasattr(ref, "sigmas") else None
    # Both sides take sigma = sqrt((1 - abar) / abar) of the same float32 abar (the helper gives
    # diffusers jaxdiff's): diffusers rounds 1 - abar, the division and the square root in
    # float32, Karras' ramp (powers 1/7 and 7 of the two end sigmas) in float64 and casts,
    # jaxdiff in float64 and casts: <= 8 ulps of sigma a side.
    sigma_rtol = ulps(16)
    if not config.get("use_karras_sigmas"):
        np.testing.assert_array_equal(got_t, want_t)  # integers, the same on both sides
        np.testing.assert_array_equal(want_t % 1, 0)
    else:
        # Karras timesteps are sigma_to_t of the sigmas: log sigma interpolated between the two
        # bracketing training log-sigmas, so a relative sigma error moves t by itself over their
        # spacing (plus the float32 roundings of t < T).
        acp = np.asarray(schedule.alphas_cumprod, np.float64)
        log_train = np.log(np.sqrt((1 - acp) / acp))
        lo = np.clip(np.floor(want_t).astype(int), 0, len(acp) - 2)
        t_atol = sigma_rtol / (log_train[lo + 1] - log_train[lo]) + ulps(4, len(acp))
        within(np.abs(got_t - want_t), t_atol, f"{name} timesteps")
    if sig is not None and sampler.name != "dpm_solver":  # DPM-Solver keeps no sigma grid
        got = np.asarray(grid.sigmas, np.float64)
        assert got.shape == sig.shape
        within(np.abs(got - sig), sigma_rtol * sig, f"{name} sigmas")


def test_tcd_config_maps_to_the_tcd_sampler():
    sampler = sampler_from_diffusers_config(CONFIGS["hyper_sd_tcd"])
    assert sampler.name == "tcd" and sampler.effective_options["eta"] == 0.3
