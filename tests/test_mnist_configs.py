"""experiments/configs/latent_mnist.py reuses vae_mnist.py's blocks (its whole ``vae`` sub-config,
and the ``data`` / ``training`` fields through ``vae_mnist.data_config`` /
``vae_mnist.training_config``): the resulting fields, values and their order (``config.json``
is written in insertion order) are the ones the two files spelt out before the reuse."""

import json

from experiments.configs import latent_mnist, vae_mnist

# Snapshots of the blocks as the configs wrote them out field by field (before the reuse).
VAE_DATA = [("source", "auto"), ("data_dir", ""), ("prefetch", 2)]
VAE_TRAINING = [("batch_size", 64), ("num_steps", 2000), ("learning_rate", 1e-3),
                ("warmup_steps", 100), ("lr_schedule", "cosine"), ("end_lr_factor", 0.05),
                ("weight_decay", 0.0), ("grad_clip_norm", 1.0), ("ema_decay", 0.999),
                ("log_every", 50), ("checkpoint_every", 500), ("keep_checkpoints", 3),
                ("fsdp", 1)]   # fsdp: added after the reuse (issue 17)
LATENT_DATA = VAE_DATA + [("pad_to", 32)]
LATENT_TRAINING = [("batch_size", 64), ("num_steps", 3500), ("learning_rate", 2e-3),
                   ("warmup_steps", 200), ("lr_schedule", "cosine"), ("end_lr_factor", 0.05),
                   ("weight_decay", 0.0), ("grad_clip_norm", 1.0), ("ema_decay", 0.998),
                   ("cond_drop_prob", 0.1), ("log_every", 50), ("checkpoint_every", 500),
                   ("keep_checkpoints", 3), ("fsdp", 1)]


def _items(config, block):
    """``config.<block>`` as (field, value) pairs in config.json's order, with their types."""
    items = list(json.loads(config.to_json())[block].items())
    return [(k, v, type(v)) for k, v in items]


def _typed(pairs):
    return [(k, v, type(v)) for k, v in pairs]


def test_vae_blocks_are_the_spelt_out_ones():
    c = vae_mnist.get_config()
    assert _items(c, "data") == _typed(VAE_DATA)
    assert _items(c, "training") == _typed(VAE_TRAINING)


def test_latent_config_reuses_the_vae_blocks_with_the_same_values():
    c = latent_mnist.get_config()
    assert c.vae.to_json() == vae_mnist.get_config().to_json()
    assert _items(c, "data") == _typed(LATENT_DATA)
    assert _items(c, "training") == _typed(LATENT_TRAINING)
    # Each get_config() builds its own blocks: a change to one run's config leaves the other's.
    c.training.batch_size = 8
    c.data.prefetch = 1
    assert vae_mnist.get_config().training.batch_size == 64
    assert latent_mnist.get_config().data.prefetch == 2


def test_training_config_overrides_and_added_fields():
    t = vae_mnist.training_config(log_every=10, cond_drop_prob=0.2)
    keys = list(json.loads(t.to_json()))
    assert t.log_every == 10 and t.cond_drop_prob == 0.2
    i = keys.index("cond_drop_prob")
    assert keys[i - 1] == "ema_decay" and keys[i + 1] == "log_every"
