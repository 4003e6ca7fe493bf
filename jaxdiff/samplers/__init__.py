"""Samplers: each a step function plus one ``lax.scan`` over the timesteps."""

from jaxdiff.samplers.ddim import ddim_sample, ddim_step
from jaxdiff.samplers.ddpm import VARIANCE_TYPES, ddpm_posterior, ddpm_sample, ddpm_step
from jaxdiff.samplers.dpm_solver import dpm_solver_sample, dpm_solver_timesteps
from jaxdiff.samplers.guidance import classifier_free_guidance, rescale_guidance
from jaxdiff.samplers.timesteps import SPACINGS, ddim_timesteps, ddpm_timesteps

__all__ = [
    "SPACINGS",
    "VARIANCE_TYPES",
    "classifier_free_guidance",
    "ddim_sample",
    "ddim_step",
    "ddim_timesteps",
    "ddpm_posterior",
    "ddpm_sample",
    "ddpm_step",
    "ddpm_timesteps",
    "dpm_solver_sample",
    "dpm_solver_timesteps",
    "rescale_guidance",
]
