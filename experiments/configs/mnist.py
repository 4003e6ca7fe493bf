"""Class-conditional MNIST on a 2-core CPU: small UNet, label dropout for classifier-free guidance.

    python -m experiments.train_mnist --workdir runs/mnist
    python -m experiments.train_mnist --workdir runs/mnist --config.training.batch_size=64

Sized for a 2-core CPU: the ``mnist_unet_config`` preset narrowed to 16/32/64 channels, with the
cross-attention transformer only at the 7x7 level and in the middle block (attention at 14x14 and
28x28, and the full preset, are far slower on XLA:CPU); the class enters as one learned token of
width 64 that those layers attend to (``model.num_classes = 10``: labels 0-9, and 10 is the null
label, dropped in with probability 0.1 for classifier-free guidance). Its training time and sample
quality are in docs/results.md, its step speed in BENCHMARKS.md
(``python -m benchmarks.bench_train``). ``mnist_accel.py`` is the full cross-attention preset for a
GPU or TPU.

Every field can be overridden from the command line; ``config.model`` holds every field of
``UNetConfig``, so ``--config.model.<field>=...`` works for each (per-level fields are tuples:
``--config.model.block_channels="(32,64,128)"``; fields that default to None are typed
placeholders, e.g. ``--config.model.attention_implementation=cudnn``; ``None`` resets an optional
field).
"""

import dataclasses

import ml_collections
from ml_collections import config_dict


def _plain(v):
    """A JSON-able form of a UNetConfig value (dtypes become their names, e.g. "bfloat16")."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (tuple, list)):
        return tuple(_plain(u) for u in v)
    import numpy as np

    return np.dtype(v).name


def unet_fields(num_classes: int = 10, **overrides) -> ml_collections.ConfigDict:
    """The fields of ``mnist_unet_config(num_classes)`` as a ConfigDict, with ``overrides``."""
    from jaxdiff.models import mnist_unet_config

    # The preset applies the overrides before normalising per-level fields, so overriding
    # block_channels re-derives layers_per_block, num_heads, ... for the new number of levels.
    cfg = mnist_unet_config(num_classes=num_classes, **overrides)
    fields = {}
    for f in dataclasses.fields(cfg):
        value = _plain(getattr(cfg, f.name))
        if value is None:  # typed, so that --config.model.<field>=... parses from the command line
            kind = _SCALAR_TYPES.get(str(f.type).split(" ")[0])
            value = config_dict.placeholder(kind) if kind else None
        fields[f.name] = value
    return ml_collections.ConfigDict(fields)


# The leading type of an optional UNetConfig field ("int | None" -> int) for placeholders.
_SCALAR_TYPES = {"int": int, "str": str, "float": float, "bool": bool}


# The 2-core CPU default: narrower; cross-attention (to one class token) at 7x7 and in the middle.
CPU_MODEL_OVERRIDES = dict(block_channels=(16, 32, 64), attention=(None, None, "cross"),
                           up_attention=(None, None, "cross"), mid_attention="cross",
                           class_conditioning="cross_attention", context_dim=64,
                           num_class_tokens=1)

# The accelerator variant (mnist_accel.py): twice the width, two resnets per level, bf16 compute.
ACCEL_MODEL_OVERRIDES = dict(block_channels=(64, 128, 256, 256), layers_per_block=2,
                             context_dim=128, dtype="bfloat16")


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.source = "auto"        # auto | local | tfds
    c.data.data_dir = ""          # IDX directory; "" = jaxdiff.data.load_mnist's search:
                                  # $JAXDIFF_MNIST_DIR, ./data/mnist, ~/.cache/jaxdiff/mnist, tfds
    c.data.prefetch = 2           # host batches buffered by the prefetch thread

    # model.num_classes is the one number of classes: labels 0..9, 10 is the null label.
    c.model = unet_fields(10, **CPU_MODEL_OVERRIDES)

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.schedule = "cosine"
    c.diffusion.num_timesteps = 1000
    # eps without weighting: docs/results.md, "Training recipes at the same budget"
    c.diffusion.prediction_type = "eps"
    c.diffusion.weighting = "none"   # none | min_snr
    c.diffusion.loss_type = "l2"

    c.training = ml_collections.ConfigDict()
    c.training.batch_size = 32        # global, over all devices and hosts
    c.training.num_steps = 2600
    # 3e-3 over 2e-3: docs/results.md, "Training recipes at the same budget"
    c.training.learning_rate = 3e-3
    c.training.warmup_steps = 100
    c.training.lr_schedule = "cosine"  # cosine | constant
    c.training.end_lr_factor = 0.05
    c.training.weight_decay = 0.0
    c.training.grad_clip_norm = 1.0
    c.training.ema_decay = 0.995
    c.training.cond_drop_prob = 0.1
    c.training.log_every = 50
    c.training.checkpoint_every = 300
    c.training.keep_checkpoints = 3
    c.training.tensorboard = False    # True: TensorBoard events in WORKDIR/tb (needs tensorboardX)
    c.training.fsdp = 1               # > 1: split the train state over an "fsdp" mesh axis this
                                      # big (must divide the device count; see make_train_mesh)

    c.sampling = ml_collections.ConfigDict()
    c.sampling.every = 1300           # sample grid interval in steps (and always at the end)
    c.sampling.per_class = 8          # columns of the grid; one row per digit
    # DDPM's ancestral steps (fresh noise at each step) on 50 leading timesteps, guidance 1.5: the
    # deterministic samplers (DDIM, DPM-Solver++, UniPC) leave a gray haze behind the digits of a
    # run this short. Why, and how the default measures: docs/results.md ("The default MNIST
    # model", "Haze", "Guidance").
    c.sampling.sampler = "ddpm"       # any of jaxdiff.samplers.sampler_names()
    c.sampling.num_steps = 50
    c.sampling.guidance_scale = 1.5   # classifier-free guidance; 1 = none, 0 = unconditional
    # (t_lo, t_hi): guidance only at timesteps in [t_lo, t_hi], the conditional model elsewhere
    # (Kynkaanniemi et al. 2024; --config.sampling.guidance_interval="(200, 800)"); unset
    # (None) = guidance at every step
    c.sampling.guidance_interval = config_dict.placeholder(tuple)
    c.sampling.clip_x0 = 1.0          # 0 = no clipping
    # Options of some samplers only; unset (None) for the others. DDIM: eta (0 when unset) and
    # ddim_clip: "consistent" (eps re-derived from the clipped x0; the default) or "diffusers".
    c.sampling.eta = config_dict.placeholder(float)
    c.sampling.ddim_clip = config_dict.placeholder(str)
    return c
