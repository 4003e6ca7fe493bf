"""jaxdiff: diffusion models in JAX/Flax as pure functions.

This module only re-exports the public API; see the submodules for documentation.
"""

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
from jaxdiff.losses import diffusion_loss, drop_condition, loss_weights
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
