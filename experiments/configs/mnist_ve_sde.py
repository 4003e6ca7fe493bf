"""Unconditional MNIST with the VE SDE (Song et al. 2021's SMLD / NCSN++ recipe, narrowed to a
2-core CPU): a :class:`jaxdiff.sde.ScoreUNet` (the ``mnist`` config's 16/32/64-channel UNet with
self-attention at 7x7 and in the middle) trained by denoising score matching, sampled by
predictor-corrector (reverse diffusion + Langevin) or the probability-flow ODE.

The hookup is :mod:`experiments.score_mnist` (``build_sde``, ``build_score_model``,
``make_loss_fn``, ``make_sample_fn``); there is no training command line for it yet. Images are
in ``[-1, 1]``, so ``sigma_max = 50`` is about the largest distance between two MNIST images
(``score_sde``'s rule of thumb for VE).
"""

import ml_collections

from experiments.configs import mnist

UNCONDITIONAL_MODEL = dict(block_channels=(16, 32, 64), attention=(None, None, "self"),
                           up_attention=(None, None, "self"), mid_attention="self")


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.sde = ml_collections.ConfigDict()
    c.sde.type = "ve"                 # any of jaxdiff.sde.SDE_TYPES
    c.sde.sigma_min = 0.01            # ve
    c.sde.sigma_max = 50.0            # ve
    c.sde.sigma = 25.0                # tutorial_ve
    c.sde.beta_min = 0.1              # vp / subvp
    c.sde.beta_max = 20.0             # vp / subvp
    c.sde.num_scales = 1000           # N: the discrete chain and the PC sampler's steps

    c.model = mnist.unet_fields(None, **UNCONDITIONAL_MODEL)
    c.model_time_scale = 999.0        # the UNet sees t * time_scale

    c.training = ml_collections.ConfigDict()
    c.training.batch_size = 32
    c.training.learning_rate = 2e-4
    c.training.grad_clip_norm = 1.0
    c.training.ema_decay = 0.999
    c.training.weighting = "none"     # none | likelihood
    c.training.importance_sampling = False
    c.training.eps = 1e-5             # t ~ U[eps, 1]
    c.training.reduce = "sum"         # sum | mean over pixels

    c.sampling = ml_collections.ConfigDict()
    c.sampling.method = "pc"          # pc | ode
    c.sampling.predictor = "reverse_diffusion"
    c.sampling.corrector = "langevin"
    c.sampling.snr = 0.16
    c.sampling.n_corrector_steps = 1
    c.sampling.num_steps = 1000
    c.sampling.ode_solver = "rk4"     # any of jaxdiff.sde.ODE_SOLVERS
    c.sampling.ode_steps = 100
    c.sampling.eps = 1e-5
    return c
