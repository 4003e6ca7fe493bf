"""An MNIST KL autoencoder on a 2-core CPU: 28x28x1 images -> 7x7x4 latents (f = 4).

    python -m experiments.train_vae_mnist --workdir runs/vae_mnist
    python -m experiments.train_vae_mnist --workdir runs/vae_mnist --config.loss.beta=1e-4

``config.model`` holds the :class:`jaxdiff.models.AutoencoderKLConfig` fields the run sets
(three levels 16 / 32 / 32 channels, one resnet per level, single-head attention in the 7x7 mid
blocks); ``--config.model.<field>=...`` overrides them (tuples:
``--config.model.block_channels="(8,16,16)"``).
``config.loss``: the objective of :func:`jaxdiff.losses.vae_loss` (per-pixel L1 + ``beta`` *
KL per pixel). ``config.eval``: reconstruction MSE / PSNR on the test split with the EMA params
every ``eval.every`` steps and at the end, written to ``WORKDIR/eval.jsonl`` with a grid of
originals over reconstructions in ``WORKDIR/recon/``.
"""

import ml_collections


def data_config(**extra) -> ml_collections.ConfigDict:
    """``config.data``: where the MNIST images come from, with ``extra`` fields after these
    (``experiments/configs/latent_mnist.py`` adds ``pad_to``)."""
    return ml_collections.ConfigDict(dict(
        source="auto",            # auto | local | tfds
        data_dir="",              # IDX directory; "" = jaxdiff.data.load_mnist's search
        prefetch=2,
        **extra))


def training_config(**values) -> ml_collections.ConfigDict:
    """``config.training``: the autoencoder's optimisation, EMA and checkpoint settings.

    ``values`` replace the defaults or add fields; an added field goes after ``ema_decay``,
    before the logging and checkpoint intervals (``experiments/configs/latent_mnist.py`` passes
    its own steps, learning rate, warm-up and EMA decay, and adds ``cond_drop_prob``).
    The last field, ``fsdp`` (default 1), > 1 splits the train state over an ``fsdp`` mesh axis
    that big (it must divide the device count; ``experiments.train_lib.make_train_mesh``).
    """
    fields = dict(batch_size=64, num_steps=2000, learning_rate=1e-3, warmup_steps=100,
                  lr_schedule="cosine", end_lr_factor=0.05, weight_decay=0.0,
                  grad_clip_norm=1.0, ema_decay=0.999)
    intervals = dict(log_every=50, checkpoint_every=500, keep_checkpoints=3)
    last = dict(fsdp=1)
    fields.update((k, v) for k, v in values.items() if k not in intervals and k not in last)
    intervals.update((k, v) for k, v in values.items() if k in intervals)
    last.update((k, v) for k, v in values.items() if k in last)
    return ml_collections.ConfigDict({**fields, **intervals, **last})


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = data_config()

    c.model = ml_collections.ConfigDict()
    c.model.in_channels = 1
    c.model.out_channels = 1
    c.model.block_channels = (16, 32, 32)
    c.model.layers_per_block = 1
    c.model.latent_channels = 4
    c.model.norm_groups = 8
    c.model.mid_attention = True
    c.model.dtype = "float32"

    c.loss = ml_collections.ConfigDict()
    c.loss.beta = 1e-3            # KL weight (latent-diffusion convention, per input element)
    c.loss.recon_type = "l1"      # l1 | l2

    c.training = training_config()

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 1000           # steps between evaluations (and always at the end)
    c.eval.num_examples = 2000    # test images evaluated; 0 = the whole test split
    c.eval.batch_size = 250
    c.eval.grid = 16              # images in the reconstruction grid (originals over recons)
    # An MNIST classifier (jaxdiff.metrics.save_classifier; eval_mnist trains one): its accuracy
    # on the reconstructions is reported too. "" = none.
    c.eval.classifier_path = ""
    return c
