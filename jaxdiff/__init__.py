"""jaxdiff: diffusion models in JAX/Flax as pure functions.

This module re-exports the core API (schedules, forward process, losses, samplers, the UNet, the
KL autoencoder and weight import); see the submodules for documentation. Data loading, training
and metrics live in ``jaxdiff.data``, ``jaxdiff.training`` and ``jaxdiff.metrics``.
"""

from jaxdiff.compile_options import cpu_compiler_options
from jaxdiff.diffusion import (
    PREDICTION_TYPES,
    canonical_prediction_type,
    checked,
    model_output_to_x0_eps,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    snr,
    target_for,
    velocity,
)
from jaxdiff.convert import (
    convert_unet_state_dict,
    from_diffusers,
    load_torch_state_dict,
    unet_config_from_diffusers,
    vae_from_diffusers,
)
from jaxdiff.losses import diffusion_loss, drop_condition, loss_weights, vae_loss
from jaxdiff.models import (
    AutoencoderKL,
    AutoencoderKLConfig,
    UNet,
    UNetConfig,
    init_unet,
    mnist_unet_config,
    vae_decode_latents,
    vae_encode_latents,
)
from jaxdiff.samplers import (
    classifier_free_guidance,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
    dpm_solver_sample,
    dpm_solver_step,
    get_sampler,
    rescale_guidance,
    sampler_names,
)
from jaxdiff.schedules import (
    Schedule,
    cosine_betas,
    linear_betas,
    make_schedule,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
    schedule_from_betas,
    sigmoid_betas,
)

__version__ = "0.1.0"

__all__ = [
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "PREDICTION_TYPES",
    "Schedule",
    "UNet",
    "UNetConfig",
    "canonical_prediction_type",
    "checked",
    "classifier_free_guidance",
    "convert_unet_state_dict",
    "cosine_betas",
    "cpu_compiler_options",
    "ddim_sample",
    "ddim_step",
    "ddpm_sample",
    "ddpm_step",
    "diffusion_loss",
    "dpm_solver_sample",
    "dpm_solver_step",
    "drop_condition",
    "from_diffusers",
    "get_sampler",
    "init_unet",
    "linear_betas",
    "load_torch_state_dict",
    "loss_weights",
    "make_schedule",
    "mnist_unet_config",
    "model_output_to_x0_eps",
    "predict_eps_from_v",
    "predict_eps_from_x0",
    "predict_x0_from_eps",
    "predict_x0_from_v",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "rescale_guidance",
    "rescale_zero_terminal_snr",
    "sampler_names",
    "scaled_linear_betas",
    "schedule_from_betas",
    "sigmoid_betas",
    "snr",
    "target_for",
    "unet_config_from_diffusers",
    "vae_decode_latents",
    "vae_encode_latents",
    "vae_from_diffusers",
    "vae_loss",
    "velocity",
]
