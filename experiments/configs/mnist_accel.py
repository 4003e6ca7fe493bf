"""MNIST on an accelerator (GPU/TPU, one or many devices): the cross-attention preset widened to
64/128/256/256 channels, two resnets per level, bf16 compute, batch 256, 40k steps.

    python -m experiments.train_mnist --workdir runs/mnist_accel \
        --config=experiments/configs/mnist_accel.py
"""

from experiments.configs import mnist


def get_config():
    c = mnist.get_config()
    c.model = mnist.unet_fields(10, **mnist.ACCEL_MODEL_OVERRIDES)
    c.training.batch_size = 256
    c.training.num_steps = 40_000
    c.training.learning_rate = 4e-4
    c.training.warmup_steps = 1000
    c.training.ema_decay = 0.9995
    c.training.log_every = 100
    c.training.checkpoint_every = 2000
    c.data.prefetch = 4
    c.sampling.every = 5000
    c.sampling.per_class = 10
    c.sampling.num_steps = 50
    return c
