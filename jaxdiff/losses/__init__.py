"""The training objectives, one home for all of them.

- :mod:`jaxdiff.losses.diffusion`: the discrete-time denoising loss (eps / x0 / v targets, min-SNR
  weighting, condition dropout for classifier-free guidance);
- :mod:`jaxdiff.losses.vae`: the KL autoencoder's reconstruction + KL loss;
- :mod:`jaxdiff.losses.score`: continuous-time denoising score matching for the SDEs of
  :mod:`jaxdiff.sde` (likelihood weighting, importance-sampled and antithetic ``t``);
- :mod:`jaxdiff.losses.edm`: the EDM loss (log-normal noise levels, ``1 / c_out^2`` weighting).
"""

from jaxdiff.losses.diffusion import (
    LOSS_TYPES,
    WEIGHTINGS,
    diffusion_loss,
    drop_condition,
    loss_weights,
)
from jaxdiff.losses.edm import edm_loss, edm_loss_weight, edm_sample_sigma
from jaxdiff.losses.score import (
    REDUCTIONS,
    SDE_WEIGHTINGS,
    dsm_loss,
    eps_loss,
    importance_grid,
    importance_sample_t,
    sample_t,
)
from jaxdiff.losses.vae import RECON_TYPES, reconstruction_metrics, vae_loss

__all__ = [
    "LOSS_TYPES",
    "RECON_TYPES",
    "REDUCTIONS",
    "SDE_WEIGHTINGS",
    "WEIGHTINGS",
    "diffusion_loss",
    "drop_condition",
    "dsm_loss",
    "edm_loss",
    "edm_loss_weight",
    "edm_sample_sigma",
    "eps_loss",
    "importance_grid",
    "importance_sample_t",
    "loss_weights",
    "reconstruction_metrics",
    "sample_t",
    "vae_loss",
]
