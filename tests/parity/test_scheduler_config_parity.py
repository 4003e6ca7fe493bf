"""diffusers scheduler configs -> jaxdiff (jaxdiff.convert.diffusers_scheduler): the schedule and
the sampler built from a config sample the same trajectory as the diffusers scheduler built from
that config."""

import numpy as np
import pytest
import torch

import diffusers
import jax
import jax.numpy as jnp

from jaxdiff.convert import sampler_from_diffusers_config, schedule_from_diffusers_config
from tests.parity.test_euler_parity import standin_sigma as standin
from tests.parity.tolerances import (
    CONVERSION_ULPS,
    STEP_ULPS,
    diffusers_alphas_cumprod_atol,
    multistep_gains,
    ulps,
    within,
)

SHAPE = (2, 6, 6, 3)
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

CONFIGS = [
    dict(_class_name="DDIMScheduler", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
         **SD),
    dict(_class_name="DDIMScheduler", beta_schedule="squaredcos_cap_v2",
         prediction_type="v_prediction", timestep_spacing="trailing", clip_sample_range=1.5),
    dict(_class_name="DDIMScheduler", rescale_betas_zero_snr=True, timestep_spacing="trailing",
         prediction_type="v_prediction", clip_sample=False, **SD),
    dict(_class_name="DDPMScheduler", variance_type="fixed_large", prediction_type="sample",
         _diffusers_version="0.42.1"),
    dict(_class_name="DDPMScheduler", beta_schedule="sigmoid", clip_sample=False),
    dict(_class_name="LCMScheduler"),  # its defaults are Stable Diffusion's betas
    dict(_class_name="LCMScheduler", prediction_type="v_prediction", timestep_scaling=1.0,
         clip_sample=True, original_inference_steps=100, beta_schedule="linear"),
    dict(_class_name="DPMSolverMultistepScheduler", **SD),
    dict(_class_name="DPMSolverMultistepScheduler", solver_order=1, timestep_spacing="leading",
         steps_offset=1, prediction_type="v_prediction", **SD),
    dict(_class_name="DPMSolverMultistepScheduler", beta_schedule="squaredcos_cap_v2",
         solver_type="heun", final_sigmas_type="sigma_min", lambda_min_clipped=-5.1),
    dict(_class_name="DPMSolverMultistepScheduler", solver_order=3, use_karras_sigmas=True,
         euler_at_final=True, **SD),
    dict(_class_name="EulerDiscreteScheduler", use_karras_sigmas=True, **SD),
    dict(_class_name="EulerDiscreteScheduler", rescale_betas_zero_snr=True,
         timestep_spacing="trailing", prediction_type="v_prediction", **SD),
    dict(_class_name="EulerAncestralDiscreteScheduler", timestep_spacing="leading",
         steps_offset=1, **SD),
    dict(_class_name="HeunDiscreteScheduler"),  # SD betas by default
    dict(_class_name="HeunDiscreteScheduler", use_karras_sigmas=True, clip_sample=True,
         prediction_type="sample"),
    dict(_class_name="KDPM2DiscreteScheduler", use_exponential_sigmas=True),
    dict(_class_name="UniPCMultistepScheduler", **SD),
    dict(_class_name="UniPCMultistepScheduler", solver_order=3, disable_corrector=[0, 3],
         prediction_type="v_prediction", use_karras_sigmas=True),
    # bh1: diffusers' last step to sigma = 0 is NaN (jaxdiff returns the predicted x0 there).
    dict(_class_name="UniPCMultistepScheduler", solver_type="bh1",
         final_sigmas_type="sigma_min"),
    dict(_class_name="DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++",
         use_karras_sigmas=True, rescale_betas_zero_snr=True, timestep_spacing="trailing",
         prediction_type="v_prediction", final_sigmas_type="zero", **SD),
]


def _trajectory_atol(ref, acp, two_stage, *arrays):
    """The final sample's bound: per model call ``STEP_ULPS`` ulps of the largest value ``m`` plus
    ``CONVERSION_ULPS`` ulps weighted by ``multistep_gains`` (order <= 3) on the scheduler's
    sigma-space grid (its ``sigmas``, else ``sqrt((1 - abar) / abar)`` at its timesteps, then 0;
    ``abar`` floored at diffusers' ``2**-24`` where it is 0), times ``1 + |d sigma| / sigma_next``
    for a second stage; the errors add (the stand-in's flows contract)."""
    if hasattr(ref, "sigmas"):
        sig = ref.sigmas.numpy().astype(np.float64)
    else:
        a = np.maximum(acp[np.round(ref.timesteps.numpy()).astype(int)], 2.0**-24)
        sig = np.concatenate([np.sqrt((1 - a) / a), [0.0]])
    sig = np.minimum(sig, np.sqrt((1 - 2.0**-24) / 2.0**-24))
    gains = multistep_gains(sig, 3)
    if two_stage:
        with np.errstate(divide="ignore", invalid="ignore"):
            gains = gains * (1 + np.where(sig[1:] > 0, np.abs(np.diff(sig)) / sig[1:], 0.0))
    m = max(np.abs(x).max() for x in arrays)
    return float(np.sum(ulps(STEP_ULPS, m) + ulps(CONVERSION_ULPS, m) * gains))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c["_class_name"])
def test_config_gives_the_diffusers_trajectory(config, monkeypatch):
    compare_config_trajectory(config, 12, monkeypatch)


def compare_config_trajectory(config, n, monkeypatch):
    """Build diffusers' scheduler and jaxdiff's sampler from ``config``, run ``n`` steps of the
    analytic stand-in model on the same start and noise, assert the final samples agree within
    :func:`_trajectory_atol`. Returns ``(diffusers scheduler after set_timesteps, sampler,
    schedule)``."""
    cls = getattr(diffusers, config["_class_name"])
    ref = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    schedule = schedule_from_diffusers_config(config)
    # The schedules agree to float32 rounding (diffusers takes a float32 cumprod).
    within(np.abs(np.asarray(schedule.alphas_cumprod, np.float64) - ref.alphas_cumprod.numpy()),
           diffusers_alphas_cumprod_atol(ref), "alphas_cumprod")
    sampler = sampler_from_diffusers_config(config)
    # From here on both sides use the same float32 alphas_cumprod, so that the trajectories
    # compare the samplers' maths and options, not two roundings of the schedule.
    acp = np.array(schedule.alphas_cumprod)
    ref.alphas_cumprod = torch.from_numpy(acp)
    if hasattr(ref, "final_alpha_cumprod"):
        ref.final_alpha_cumprod = (torch.tensor(1.0) if config.get("set_alpha_to_one", True)
                                   else ref.alphas_cumprod[0])
    if hasattr(ref, "alpha_t"):  # DPMSolverMultistep caches these at construction
        ref.alpha_t = torch.sqrt(ref.alphas_cumprod)
        ref.sigma_t = torch.sqrt(1 - ref.alphas_cumprod)
        ref.lambda_t = torch.log(ref.alpha_t) - torch.log(ref.sigma_t)
        ref.sigmas = ((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5
    pred = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}[ref.config.prediction_type]
    ref.set_timesteps(n)
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal((n, *SHAPE)).astype(np.float32)
    module = __import__(type(ref).__module__, fromlist=["randn_tensor"])
    calls = iter(range(n))
    if sampler.stochastic:
        monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: torch.from_numpy(
            noise[next(calls)].transpose(0, 3, 1, 2).copy()))

    # The pipeline loop: scaled start, scaled model input (both identities outside sigma space).
    x = torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy()) * ref.init_noise_sigma
    acp_t = torch.from_numpy(acp)
    for t in ref.timesteps:
        tt = torch.full((SHAPE[0],), float(t))
        out = standin(torch, ref.scale_model_input(x, t), tt, acp_t, pred)
        x = ref.step(out, t, x).prev_sample
    want = x.numpy().transpose(0, 2, 3, 1)

    def model(x, t):
        return standin(jnp, x, t, schedule.alphas_cumprod, pred)

    got = jax.jit(lambda x, z: sampler(model, schedule, x, None, num_steps=n,
                                       **({"noise": z} if sampler.stochastic else {})))(
        x_T, noise)
    # From the zero-terminal-SNR Euler start at sigma = 4096 one float32 ulp of x is 4.9e-4, and
    # the first steps cancel it down: the gains' sigma ratio.
    two_stage = config["_class_name"] in ("HeunDiscreteScheduler", "KDPM2DiscreteScheduler")
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=_trajectory_atol(
        ref, acp, two_stage, x_T, noise, want))
    return ref, sampler, schedule


def test_kdpm2_ancestral_config_maps_its_options():
    """(Its trajectory parity, with diffusers' noise draws, is in test_euler_parity.py.)"""
    s = sampler_from_diffusers_config(dict(_class_name="KDPM2AncestralDiscreteScheduler",
                                           timestep_spacing="trailing", use_karras_sigmas=True,
                                           prediction_type="v_prediction"))
    assert s.name == "kdpm2_ancestral" and s.stochastic
    assert s.options == dict(prediction_type="v", spacing="trailing", steps_offset=0,
                             sigma_schedule="karras")


@pytest.mark.parametrize("config, match", [
    (dict(_class_name="FlowMatchEulerDiscreteScheduler"), "_class_name"),
    (dict(beta_start=0.1), "_class_name"),
    (dict(_class_name="DDIMScheduler", thresholding=True), "thresholding"),
    (dict(_class_name="DDIMScheduler", some_new_option=1), "some_new_option"),
    (dict(_class_name="DDPMScheduler", variance_type="fixed_large_log"), "variance_type"),
    (dict(_class_name="DPMSolverMultistepScheduler", use_flow_sigmas=True), "use_flow_sigmas"),
    (dict(_class_name="DDIMScheduler", beta_schedule="exp"), "beta_schedule"),
    (dict(_class_name="UniPCMultistepScheduler", use_karras_sigmas=True, use_beta_sigmas=True),
     "use_beta_sigmas"),
    (dict(_class_name="UniPCMultistepScheduler", solver_p={"a": 1}), "solver_p"),
    (dict(_class_name="EulerDiscreteScheduler", timestep_type="continuous"), "timestep_type"),
    (dict(_class_name="HeunDiscreteScheduler", no_such_key="zero"), "no_such_key"),
])
def test_unsupported_configs_are_errors_that_name_the_key(config, match):
    with pytest.raises(ValueError, match=match):
        sampler_from_diffusers_config(config)
        schedule_from_diffusers_config(config)
