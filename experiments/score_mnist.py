"""The score-SDE MNIST setup (``experiments/configs/mnist_ve_sde.py``) as functions: the SDE, the
score model, the DSM loss and a sampler, each built from the config. A training loop can use
:func:`make_loss_fn` with optax as ``experiments.train_lib`` does for the discrete models::

    from experiments.configs import mnist_ve_sde
    config = mnist_ve_sde.get_config()
    sde, model = build_sde(config), build_score_model(config)
    loss_fn = make_loss_fn(config, model, sde)      # (params, x0, key) -> (loss, aux)
    sample = make_sample_fn(config, model, sde)
    images = sample(params, jax.random.key(0), 16)  # [16, 28, 28, 1] in [-1, 1]
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from experiments import lib
from experiments.cli import ConfigError
from jaxdiff.sde import SDE_TYPES, ScoreUNet, dsm_loss, ode_sample, pc_sample

__all__ = ["build_sde", "build_score_model", "make_loss_fn", "make_sample_fn"]

_SDE_FIELDS = {"ve": ("sigma_min", "sigma_max"), "tutorial_ve": ("sigma",),
               "vp": ("beta_min", "beta_max"), "subvp": ("beta_min", "beta_max")}


def build_sde(config: ml_collections.ConfigDict):
    """The SDE ``config.sde.type`` with its parameters and ``N = config.sde.num_scales``.

    Raises:
      ConfigError: an unknown type or a parameter the SDE rejects (the message names
        ``sde.<field>``).
    """
    kind = config.sde.type
    if kind not in SDE_TYPES:
        raise ConfigError(f"sde.type must be one of {sorted(SDE_TYPES)}, got {kind!r}")
    kwargs = {k: float(config.sde[k]) for k in _SDE_FIELDS[kind]}
    try:
        return SDE_TYPES[kind](N=int(config.sde.num_scales), **kwargs)
    except ValueError as e:
        raise ConfigError(f"sde: {e}") from None


def build_score_model(config: ml_collections.ConfigDict) -> ScoreUNet:
    """``ScoreUNet(UNetConfig(**config.model), sde, config.model_time_scale)``."""
    unet = lib.build_model(config)
    if unet.config.num_classes is not None:
        raise ConfigError("model.num_classes must be None: the score-SDE setup is unconditional")
    return ScoreUNet(config=unet.config, sde=build_sde(config),
                     time_scale=float(config.model_time_scale))


def make_loss_fn(config: ml_collections.ConfigDict, model: ScoreUNet,
                 sde) -> Callable[..., tuple[jax.Array, dict]]:
    """``loss_fn(params, x0 [B, 28, 28, 1] in [-1, 1], key) -> (loss, aux)``:
    :func:`jaxdiff.sde.dsm_loss` with ``config.training``'s options."""
    tr = config.training

    def apply(params, x_t, t, cond):
        del cond
        return model.apply({"params": params}, x_t, t)

    def loss_fn(params, x0, key):
        return dsm_loss(apply, params, sde, x0, key, weighting=tr.weighting,
                        importance_sampling=tr.importance_sampling, eps=tr.eps, reduce=tr.reduce)

    return loss_fn


def make_sample_fn(config: ml_collections.ConfigDict, model: ScoreUNet,
                   sde) -> Callable[[dict, jax.Array, int], jax.Array]:
    """``sample(params, key, num) -> [num, 28, 28, 1]`` in ``[-1, 1]`` (clipped): a prior draw,
    then :func:`jaxdiff.sde.pc_sample` or :func:`jaxdiff.sde.ode_sample` per
    ``config.sampling.method``; one jitted computation per ``num``."""
    s = config.sampling
    if s.method not in ("pc", "ode"):
        raise ConfigError(f"sampling.method must be 'pc' or 'ode', got {s.method!r}")
    shape = (28, 28, model.config.in_channels)

    def sample(params, key, num):
        def score_fn(x, t):
            return model.apply({"params": params}, x, t)

        k_prior, k_sample = jax.random.split(key)
        x_T = sde.prior_sampling(k_prior, (num, *shape))
        if s.method == "pc":
            x0 = pc_sample(score_fn, sde, x_T, k_sample, predictor=s.predictor,
                           corrector=s.corrector, snr=s.snr,
                           n_corrector_steps=s.n_corrector_steps, eps=s.eps,
                           num_steps=s.num_steps)
        else:
            x0 = ode_sample(score_fn, sde, x_T, solver=s.ode_solver, num_steps=s.ode_steps,
                            eps=s.eps, return_stats=False)
        return jnp.clip(x0, -1.0, 1.0)

    return jax.jit(sample, static_argnums=2)
