"""The score-SDE MNIST hookup (experiments/configs/mnist_ve_sde.py + experiments.score_mnist) at
smoke size: a tiny UNet, the DSM loss and its gradient, PC and ODE sampling; config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import score_mnist
from experiments.cli import ConfigError
from experiments.configs import mnist, mnist_ve_sde

TINY = dict(block_channels=(8, 16), layers_per_block=(1, 1), attention=(None, None),
            up_attention=(None, None), mid_attention=None, num_heads=(1, 1),
            transformer_depth=(1, 1), norm_groups=4, context_dim=None)


def tiny_config():
    c = mnist_ve_sde.get_config()
    c.model = mnist.unet_fields(None, **TINY)
    c.sde.num_scales = 3
    c.sampling.num_steps = 3
    c.sampling.ode_steps = 2
    return c


def test_loss_and_sampler_run_on_the_score_unet():
    c = tiny_config()
    sde, model = score_mnist.build_sde(c), score_mnist.build_score_model(c)
    assert sde.N == 3 and sde.sigma_max == 50.0 and model.time_scale == 999.0
    x0 = jnp.zeros((2, 28, 28, 1))
    shapes = jax.eval_shape(model.init, jax.random.key(0), x0, jnp.ones((2,)))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype),
                          shapes)
    loss_fn = score_mnist.make_loss_fn(c, model, sde)
    sample = score_mnist.make_sample_fn(c, model, sde)   # PC (the config's default)
    # one compilation for both (the UNet's is the cost here)
    loss, aux, images = jax.jit(lambda p: (*loss_fn(p, x0, jax.random.key(1)),
                                           sample(p, jax.random.key(2), 2)))(params)
    assert np.isfinite(float(loss)) and aux["per_example"].shape == (2,)
    assert images.shape == (2, 28, 28, 1) and float(jnp.abs(images).max()) <= 1.0
    assert float(jnp.std(images)) > 0


def test_config_errors():
    c = tiny_config()
    c.sde.type = "edm"
    with pytest.raises(ConfigError, match="sde.type"):
        score_mnist.build_sde(c)
    c = tiny_config()
    c.sde.sigma_max = 0.001
    with pytest.raises(ConfigError, match="sigma_min"):
        score_mnist.build_sde(c)
    c = tiny_config()
    c.model.num_classes = 10
    with pytest.raises(ConfigError, match="num_classes"):
        score_mnist.build_score_model(c)
    c = tiny_config()
    c.sampling.method = "ddim"
    with pytest.raises(ConfigError, match="sampling.method"):
        score_mnist.make_sample_fn(c, None, score_mnist.build_sde(c))
