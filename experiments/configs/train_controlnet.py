"""Training a ControlNet on a frozen diffusers Stable Diffusion folder
(``experiments.train_controlnet``).

    python -m experiments.train_controlnet --model FOLDER --data PAIRS --workdir runs/cn
    python -m experiments.train_controlnet ... --config.training.num_steps=5000 \
        --config.memory.cache=True

Every field can be overridden with ``--config.<field>=...``.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.controlnet = ml_collections.ConfigDict()
    c.controlnet.conditioning_channels = 3   # a new ControlNet's control image channels (1 or 3)

    c.data = ml_collections.ConfigDict()
    c.data.resolution = 0                # image side; 0: the model's default size
    c.data.caption_column = "text"       # metadata.jsonl's caption key
    c.data.conditioning_column = "conditioning_image"   # its control image key
    c.data.random_flip = False           # flip an image and its control image together
    c.data.prefetch = 2

    c.objective = ml_collections.ConfigDict()
    c.objective.snr_gamma = config_dict.placeholder(float)   # min-SNR gamma (5.0 is usual)
    c.objective.noise_offset = 0.0

    c.memory = ml_collections.ConfigDict()
    c.memory.remat = False               # gradient checkpointing (UNet and ControlNet)
    c.memory.compute_dtype = "float32"   # "bfloat16": bf16 compute, float32 master weights
    c.memory.cache = False               # encode images and captions once (frozen VAE / CLIP)

    c.training = ml_collections.ConfigDict()
    c.training.batch_size = 4
    c.training.accumulate_steps = 1      # micro-batches per step (memory of batch / k)
    c.training.num_steps = 1000
    c.training.learning_rate = 1e-5
    c.training.warmup_steps = 0
    c.training.lr_schedule = "constant"  # "constant" | "cosine"
    c.training.end_lr_factor = 0.0
    c.training.weight_decay = 1e-2
    c.training.grad_clip_norm = 1.0
    c.training.ema_decay = 0.999
    c.training.use_ema = False           # sample and export the EMA params (else the raw ones)
    c.training.log_every = 10
    c.training.checkpoint_every = 100
    c.training.keep_checkpoints = 2
    c.training.fsdp = 1
    c.training.tensorboard = False

    c.validation = ml_collections.ConfigDict()
    c.validation.num_pairs = 4           # the first examples (caption, control): a row each
    c.validation.per_pair = 2            # samples per pair (a row: control, base, then these)
    c.validation.every = 100             # 0: no grids
    c.validation.num_steps = 25
    c.validation.guidance_scale = 7.5

    c.export = True                      # WORKDIR/controlnet (diffusers ControlNetModel) at the end
    return c
