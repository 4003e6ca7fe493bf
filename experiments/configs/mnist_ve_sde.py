"""Unconditional MNIST with the VE SDE (Song et al. 2021's SMLD / NCSN++ recipe, narrowed to a
2-core CPU): a :class:`jaxdiff.sde.ScoreUNet` (the ``mnist`` config's 16/32/64-channel UNet with
self-attention at 7x7 and in the middle) trained by denoising score matching, sampled by
predictor-corrector (reverse diffusion + Langevin) or the probability-flow ODE.

    python -m experiments.train_score_mnist --workdir runs/ve_sde
    python -m experiments.eval_score_mnist --workdir runs/ve_sde

The hookup is :mod:`experiments.score_mnist` (``build_sde``, ``build_score_model``,
``make_loss_fn``, ``make_sample_fn``, ``train``). Images are in ``[-1, 1]``, so
``sigma_max = 50`` is about the largest distance between two MNIST images (``score_sde``'s rule
of thumb for VE). Sized like the discrete ``mnist`` config for 2 CPU cores (its training time is
in docs/results.md, "Score SDEs"): batch 64, 2000 steps, a higher learning rate than
``score_sde``'s 2e-4 (which is meant for hundreds of thousands of steps) with warm-up and cosine
decay. ``training.*`` has the fields of ``mnist.py``'s (checked by
``experiments.train_lib.validate_training``) plus the DSM loss's options; ``sampling.*`` sets the
sample grid written during training (``grid`` images, ``grid_columns`` wide, every ``every``
steps and at the end).
"""

import ml_collections

from experiments.configs import mnist

UNCONDITIONAL_MODEL = dict(block_channels=(16, 32, 64), attention=(None, None, "self"),
                           up_attention=(None, None, "self"), mid_attention="self")


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.source = "auto"            # auto | local | tfds (jaxdiff.data.load_mnist)
    c.data.data_dir = ""              # "" = load_mnist's search ($JAXDIFF_MNIST_DIR, ...)
    c.data.prefetch = 2

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
    c.training.batch_size = 64        # global, over all devices and hosts
    c.training.num_steps = 2000
    c.training.learning_rate = 1e-3
    c.training.warmup_steps = 100
    c.training.lr_schedule = "cosine"  # cosine | constant
    c.training.end_lr_factor = 0.05
    c.training.weight_decay = 0.0
    c.training.grad_clip_norm = 1.0
    c.training.ema_decay = 0.999
    c.training.log_every = 50
    c.training.checkpoint_every = 250
    c.training.keep_checkpoints = 3
    c.training.tensorboard = False    # True: TensorBoard events in WORKDIR/tb (needs tensorboardX)
    c.training.weighting = "none"     # none | likelihood
    c.training.importance_sampling = False
    c.training.eps = 1e-5             # t ~ U[eps, 1]
    c.training.reduce = "sum"         # sum | mean over pixels

    c.sampling = ml_collections.ConfigDict()
    c.sampling.every = 1000           # sample grid interval in steps (and always at the end)
    c.sampling.grid = 64              # images in the grid
    c.sampling.grid_columns = 8
    c.sampling.method = "pc"          # pc | ode
    c.sampling.predictor = "reverse_diffusion"
    c.sampling.corrector = "langevin"
    c.sampling.snr = 0.16
    c.sampling.n_corrector_steps = 1
    c.sampling.num_steps = 500        # PC steps (replaces sde.num_scales when sampling)
    c.sampling.ode_solver = "rk4"     # any of jaxdiff.sde.ODE_SOLVERS
    c.sampling.ode_steps = 100
    c.sampling.eps = 1e-5
    return c
