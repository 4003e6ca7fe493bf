"""Text-to-MNIST latent diffusion on a 2-core CPU: the Stable Diffusion recipe, small.

    python -m experiments.train_latent_mnist --workdir runs/latent_mnist
    python -m experiments.train_latent_mnist --workdir runs/latent_mnist \
        --config.vae_workdir=runs/vae          # an already trained MNIST autoencoder

Two stages. ``config.vae`` is ``experiments/configs/vae_mnist.py``'s config: the KL autoencoder
(28x28x1 -> 7x7x4) trained into ``WORKDIR/vae`` when ``vae_workdir`` is ``""`` (the default) and
that directory holds no finished run; ``vae_workdir`` names a finished run to use instead (its own
``config.json`` then decides the model). The latent stage pads the images to 32x32 with the
background value (-1), so that the latents are 8x8x4 and the image side is a multiple of 8, as
diffusers' Stable Diffusion pipeline requires; it encodes the training set once (the posterior's
mean and standard deviation, kept in ``WORKDIR/latents.npz``; every step draws a fresh sample
``z ~ q(z | x)``), scales the latents by ``1 / std`` measured on them, and trains, jointly and
from scratch, a small CLIP text encoder (``config.text``) and a UNet (``config.model``, every
field of ``UNetConfig``) that cross-attends to the encoder's last hidden states. The prompts come
from ``experiments/mnist_prompts.py``'s training templates, with adjectives true of the image:
each training digit's stroke thickness, size and slant are measured when the latents are built
(``jaxdiff.metrics.digit_attributes``) and binned by per-class tertiles (the bins in
``latents.npz``, the thresholds in ``latent_stats.json``), and a caption only uses the words of
its image's bins ("thin" / "thick" / "bold", "small" / "large", "upright" / "slanted"; never a
thickness word with a slant word). ``training.cond_drop_prob`` of the prompts become the empty
prompt, for classifier-free guidance. ``text.max_length`` must hold the longest prompt (checked).
``config.diffusion`` is a diffusers scheduler config (the training noise schedule; Stable
Diffusion's ``scaled_linear`` by default), ``config.sampling`` the sampler of the sample grids and
of the evaluation.
"""

import ml_collections
from ml_collections import config_dict

from experiments.configs import vae_mnist

# Diffusers' Stable Diffusion v1 training schedule (DDIMScheduler config keys), with v-prediction
# (SD 2.x's target): its loss weights the high-noise steps, where a digit's global shape (its slant)
# is decided, far more than epsilon's; with epsilon the slant words were not learnt (separation 0.12
# against 4.02, benchmarks/results/cpu/eval_latent_mnist_v3.md and eval_latent_mnist_vpred.md).
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                 beta_end=0.012, prediction_type="v_prediction")


def unet_fields(**overrides) -> ml_collections.ConfigDict:
    """Every ``UNetConfig`` field for the 8x8x4 latents, as a ConfigDict (typed placeholders for
    optional fields that are None), with ``overrides``."""
    import dataclasses

    from experiments.configs.mnist import _SCALAR_TYPES, _plain
    from jaxdiff.models import UNetConfig

    fields = dict(in_channels=4, out_channels=4, block_channels=(32, 64), layers_per_block=1,
                  attention=("cross", "cross"), mid_attention="cross", num_heads=2,
                  context_dim=64, norm_groups=8)
    fields.update(overrides)
    cfg = UNetConfig(**fields)
    out = {}
    for f in dataclasses.fields(cfg):
        value = _plain(getattr(cfg, f.name))
        if value is None:
            kind = _SCALAR_TYPES.get(str(f.type).split(" ")[0])
            value = config_dict.placeholder(kind) if kind else None
        out[f.name] = value
    return ml_collections.ConfigDict(out)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # vae_mnist.py's data fields; images padded (with -1) to pad_to x pad_to, a multiple of 8
    c.data = vae_mnist.data_config(pad_to=32)

    # Stage 1: the autoencoder. "" = WORKDIR/vae, trained with config.vae if not finished.
    c.vae_workdir = ""
    c.vae = vae_mnist.get_config()  # its data.* fields are replaced by config.data's

    # The text encoder: a CLIP text transformer, small, trained with the UNet from scratch.
    c.text = ml_collections.ConfigDict()
    c.text.hidden_size = 64
    c.text.intermediate_size = 256
    c.text.num_hidden_layers = 2
    c.text.num_attention_heads = 4
    c.text.max_length = 12        # tokens per prompt, with <|startoftext|> and <|endoftext|>
    c.text.hidden_act = "quick_gelu"

    c.model = unet_fields()       # context_dim must equal text.hidden_size

    # The latents' scaling factor: 0 = 1 / std of z ~ q(z | x), measured on the training set
    # (the default); > 0 = this factor instead (1.0: unscaled), for the scaling lever.
    c.latent_scaling = 0.0

    c.diffusion = ml_collections.ConfigDict(SCHEDULER)

    # vae_mnist.py's training fields (batch 64, cosine to 0.05, clipping 1.0, intervals) with the
    # latent model's steps, learning rate, warm-up and EMA decay; cond_drop_prob: prompts
    # replaced by "" (classifier-free guidance)
    c.training = vae_mnist.training_config(num_steps=3500, learning_rate=2e-3, warmup_steps=200,
                                           ema_decay=0.998, cond_drop_prob=0.1)

    c.sampling = ml_collections.ConfigDict()
    c.sampling.every = 1750          # sample grid interval in steps (and at the end); 0: none
    c.sampling.per_prompt = 8        # columns of the grid; one row per prompt
    c.sampling.split = "heldout"     # the grid's prompts: one per digit from these templates
    # DDPM's ancestral steps at guidance 1.5, as the pixel-space recipe samples: the setting of the
    # stored sampling sweep closest to the real data (benchmarks/latent_mnist_sampling_sweep.py);
    # the exported folder's jaxdiff_generation.json records these.
    c.sampling.sampler = "ddpm"      # any of jaxdiff.samplers.sampler_names()
    c.sampling.num_steps = 50
    c.sampling.guidance_scale = 1.5  # uncond + w (cond - uncond): 1 conditional, 0 uncond.

    # At the end of training: the EMA model as a diffusers folder in WORKDIR/diffusers.
    c.export_diffusers = True
    return c
