"""A seconds-sized MNIST setup for smoke tests and CI: a 2-level UNet without attention (class
embedding added to the time embedding), batch 8, a few steps, 2-step sampling.

    python -m experiments.train_mnist --workdir /tmp/smoke \
        --config=experiments/configs/mnist_smoke.py
"""

from experiments.configs import mnist

TINY_MODEL = dict(block_channels=(8, 16), layers_per_block=(1, 1), attention=(None, None),
                  up_attention=(None, None), mid_attention=None, num_heads=(1, 1),
                  transformer_depth=(1, 1), norm_groups=4, context_dim=None,
                  class_conditioning="embedding", num_class_tokens=1)


def get_config():
    c = mnist.get_config()
    c.model = mnist.unet_fields(10, **TINY_MODEL)
    c.training.batch_size = 8
    c.training.num_steps = 3
    c.training.warmup_steps = 1
    c.training.log_every = 1
    c.training.checkpoint_every = 2
    c.sampling.every = 1000
    c.sampling.per_class = 1
    c.sampling.num_steps = 2
    return c
