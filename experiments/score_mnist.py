"""The score-SDE MNIST setup (``experiments/configs/mnist_ve_sde.py``) as functions: the SDE, the
score model, the DSM loss and a sampler, each built from the config; :func:`train` runs them on
the one training loop (:func:`jaxdiff.training.fit`: checkpoints, exact resume, logging, grids;
``python -m experiments.train_score_mnist`` is its command line) and :func:`load_run` reads a
trained workdir back::

    from experiments.configs import mnist_ve_sde
    config = mnist_ve_sde.get_config()
    sde, model = build_sde(config), build_score_model(config)
    loss_fn = make_loss_fn(config, model, sde)      # (params, x0, key) -> (loss, aux)
    sample = make_sample_fn(config, model, sde)
    images = sample(params, jax.random.key(0), 16)  # [16, 28, 28, 1] in [-1, 1]
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import mnist_lib, train_lib
from experiments.cli import ConfigError, config_check
from jaxdiff.compile_options import cpu_compiler_options
from jaxdiff.data import BatchIterator
from jaxdiff.models import init_unet, unet_param_shapes
from jaxdiff.sde import (
    CORRECTORS,
    ODE_SOLVERS,
    PREDICTORS,
    SDE_TYPES,
    ScoreUNet,
    ode_sample,
    pc_sample,
)
from jaxdiff.losses import REDUCTIONS, SDE_WEIGHTINGS, dsm_loss
from jaxdiff.training import Checkpointer
from jaxdiff.sharding import make_mesh
from jaxdiff.validation import check_bool, check_choice, check_float, check_int

__all__ = ["build_sde", "build_score_model", "make_loss_fn", "make_sample_fn", "validate_config",
           "compat_config", "resume_hyperparams", "init_params", "init_state", "train",
           "ScoreRun", "load_run"]

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
    unet = mnist_lib.build_model(config)
    if unet.config.num_classes is not None:
        raise ConfigError("model.num_classes must be None: the score-SDE setup is unconditional")
    return ScoreUNet(config=unet.config, sde=build_sde(config),
                     time_scale=float(config.model_time_scale))


def make_loss_fn(config: ml_collections.ConfigDict, model: ScoreUNet,
                 sde) -> Callable[..., tuple[jax.Array, dict]]:
    """``loss_fn(params, x0 [B, 28, 28, 1] in [-1, 1], key) -> (loss, aux)``:
    :func:`jaxdiff.losses.dsm_loss` with ``config.training``'s options."""
    tr = config.training

    def apply(params, x_t, t, cond):
        del cond
        return model.apply({"params": params}, x_t, t)

    def loss_fn(params, x0, key):
        return dsm_loss(apply, params, sde, x0, key, weighting=tr.weighting,
                        importance_sampling=tr.importance_sampling, eps=tr.eps, reduce=tr.reduce)

    return loss_fn


def make_sample_fn(config: ml_collections.ConfigDict, model: ScoreUNet, sde, *,
                   compiler_options=None) -> Callable[[dict, jax.Array, int], jax.Array]:
    """``sample(params, key, num) -> [num, 28, 28, 1]`` in ``[-1, 1]`` (clipped): a prior draw,
    then :func:`jaxdiff.sde.pc_sample` or :func:`jaxdiff.sde.ode_sample` per
    ``config.sampling.method``; one jitted computation per ``num`` (``compiler_options`` go to
    that ``jax.jit``: only for a top-level call, e.g. :func:`jaxdiff.cpu_compiler_options`)."""
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

    return jax.jit(sample, static_argnums=2, compiler_options=compiler_options)


def validate_config(config: ml_collections.ConfigDict):
    """Checks every field of a score-SDE training config (nothing read, written or compiled):
    ``seed`` and ``data.*``, ``sde.*``, ``model.*`` (unconditional, ``out_channels ==
    in_channels``), ``training.*`` (:func:`experiments.train_lib.validate_training` plus the loss's
    options) and ``sampling.*``. Returns ``(sde, model)``.

    Raises:
      ConfigError: naming the first invalid field.
    """
    c, t, s = config, config.training, config.sampling
    train_lib.validate_seed_and_data(config)
    sde = build_sde(config)
    config_check("", check_float, "model_time_scale", c.model_time_scale, minimum=0.0,
          exclusive_minimum=True)
    model = build_score_model(config)
    if model.config.out_channels != model.config.in_channels:
        raise ConfigError(f"model.out_channels must equal model.in_channels for a score model, "
                          f"got {model.config.out_channels} != {model.config.in_channels}")
    train_lib.validate_training(config)
    config_check("", check_choice, "training.weighting", t.weighting, SDE_WEIGHTINGS)
    config_check("", check_bool, "training.importance_sampling", t.importance_sampling)
    if t.importance_sampling and t.weighting != "likelihood":
        raise ConfigError("training.importance_sampling needs training.weighting='likelihood'")
    config_check("", check_float, "training.eps", t.eps, minimum=0.0, maximum=sde.T,
          exclusive_minimum=True, exclusive_maximum=True)
    config_check("", check_choice, "training.reduce", t.reduce, REDUCTIONS)
    for name in ("every", "grid", "grid_columns", "num_steps", "ode_steps"):
        config_check("", check_int, f"sampling.{name}", s[name], 1)
    if s.method not in ("pc", "ode"):
        raise ConfigError(f"sampling.method must be 'pc' or 'ode', got {s.method!r}")
    config_check("", check_choice, "sampling.predictor", s.predictor, tuple(PREDICTORS))
    config_check("", check_choice, "sampling.corrector", s.corrector, tuple(CORRECTORS))
    config_check("", check_float, "sampling.snr", s.snr, minimum=0.0, exclusive_minimum=True)
    config_check("", check_int, "sampling.n_corrector_steps", s.n_corrector_steps, 0)
    config_check("", check_choice, "sampling.ode_solver", s.ode_solver, ODE_SOLVERS)
    config_check("", check_float, "sampling.eps", s.eps, minimum=0.0, maximum=sde.T,
          exclusive_minimum=True, exclusive_maximum=True)
    return sde, model


def compat_config(config: ml_collections.ConfigDict) -> Dict[str, Any]:
    """What a checkpoint must match to be resumed: the model, the SDE, the time scale, the loss,
    the batch size and the seed (it orders the data)."""
    t = config.training
    loss = {k: t[k] for k in ("weighting", "importance_sampling", "eps", "reduce")}
    return json.loads(json.dumps({
        "model": train_lib.model_compat(config.model), "sde": config.sde.to_dict(),
        "model_time_scale": config.model_time_scale, "loss": loss,
        "batch_size": t.batch_size, "seed": config.seed}))


def resume_hyperparams(config: ml_collections.ConfigDict) -> Dict[str, Any]:
    """Training settings that may change on resume (logged when they do)."""
    return train_lib.resume_hyperparams(config)


def init_params(config: ml_collections.ConfigDict, model: ScoreUNet, abstract: bool = False):
    """``{"params": {"unet": ...}}`` (``ScoreUNet``'s variables), drawn by
    :func:`jaxdiff.models.init_unet` from ``run_keys(seed)["init"]``, or with ``abstract=True``
    their shapes."""
    if abstract:
        return {"params": {"unet": unet_param_shapes(model.config)}}
    return {"params": {"unet": init_unet(model.config, train_lib.run_keys(config.seed)["init"])}}


def init_state(config: ml_collections.ConfigDict, model: ScoreUNet, mesh, *,
               abstract: bool = False):
    """``(state, tx, lr_fn)`` as :func:`experiments.mnist_lib.init_state`, for the score model
    (:func:`init_params`); ``abstract=True`` gives the replicated shapes only (a restore
    target)."""
    return train_lib.initial_state(config, init_params(config, model, abstract), mesh,
                                   abstract=abstract)


def train(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """Trains (or resumes) the score model in ``workdir`` on MNIST's training images with
    :func:`jaxdiff.training.fit`; returns its summary. Writes ``config.json``, ``checkpoints/``,
    ``metrics.jsonl`` (the DSM loss, gradient norm, learning rate, throughput) and
    ``samples/step_XXXXXX.png`` (``sampling.grid`` EMA samples by ``sampling.method``, the same
    noise every time).

    Raises:
      ConfigError: an invalid config field, data directory or workdir (nothing written).
      jaxdiff.training.IncompatibleCheckpointError: ``workdir`` holds a run of another config.
    """
    sde, model = validate_config(config)
    train_lib.check_paths(config, workdir)
    train_lib.check_tensorboard_available(config)
    images, _ = train_lib.load_split(config, "train")
    mesh = train_lib.make_train_mesh(config)
    workdir = train_lib.make_workdir(workdir)
    dsm = make_loss_fn(config, model, sde)
    sample = make_sample_fn(config, model, sde, compiler_options=cpu_compiler_options())
    sample_key, num = train_lib.run_keys(config.seed)["sample"], int(config.sampling.grid)

    def loss_fn(variables, batch, key):
        return dsm(variables["params"], batch["image"], key)

    def sample_grid(state):
        return np.asarray(jax.device_get(sample(state.ema_params["params"], sample_key, num)))

    s = config.sampling
    return train_lib.run_task(
        config, workdir, mesh, init_params=lambda abstract: init_params(config, model, abstract),
        loss_fn=loss_fn, compat=compat_config(config), hyperparams=resume_hyperparams(config),
        data=BatchIterator.source({"image": images}, config.training.batch_size, config.seed),
        periodic=[train_lib.grid_job(workdir, s.every, sample_grid, int(s.grid_columns))])


class ScoreRun(NamedTuple):
    """A trained score model loaded by :func:`load_run`."""
    config: ml_collections.ConfigDict
    sde: Any
    model: ScoreUNet
    ema_params: Any      # model.apply({"params": ema_params}, x, t)
    step: int


def load_run(workdir: str) -> ScoreRun:
    """The latest checkpoint's EMA params of a ``train_score_mnist`` workdir, with its config,
    SDE and model.

    Raises:
      ConfigError: ``workdir`` has no ``config.json`` or no checkpoint, or is not a score run.
    """
    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"--workdir: {cfg_path} not found: is {workdir!r} a "
                          "train_score_mnist workdir?")
    with open(cfg_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if "sde" not in config:
        raise ConfigError(f"--workdir: {cfg_path} has no 'sde' section: not a score-SDE run")
    sde, model = build_sde(config), build_score_model(config)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    mesh = make_mesh()
    target, _, _ = init_state(config, model, mesh, abstract=True)
    ckpt = Checkpointer(ckpt_dir, None, read_only=True) if os.path.isdir(ckpt_dir) else None
    try:
        restored = None if ckpt is None else ckpt.restore_latest(target)
    finally:
        if ckpt is not None:
            ckpt.close()
    if restored is None:
        raise ConfigError(f"--workdir: no checkpoint in {ckpt_dir}")
    state, _, step = restored
    return ScoreRun(config, sde, model, state.ema_params["params"], int(step))
