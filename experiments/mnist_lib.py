"""The class-conditional MNIST diffusion model from a config (``experiments/configs/mnist.py``):
its checks, UNet, schedule, parameters, loss and compatibility keys; :func:`train`, its trainer on
the one training loop (``python -m experiments.train_mnist`` is the command line); and
:func:`load_run`, which reads a trained workdir back. Sampling is
:mod:`experiments.mnist_sampling`; the ``seed`` / ``data`` / ``training`` fields are
:mod:`experiments.train_lib`'s.

A run's config has one source for each fact: the number of classes is ``config.model.num_classes``
(labels ``0 .. num_classes - 1``; ``num_classes`` itself is the null label of classifier-free
guidance), and one root key ``jax.random.key(config.seed)`` is split once into the init, train and
sample keys (:func:`experiments.train_lib.run_keys`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Dict, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import mnist_sampling, train_lib
from experiments.cli import ConfigError, config_check
from jaxdiff.data import BatchIterator
from jaxdiff.diffusion import canonical_prediction_type
from jaxdiff.losses import LOSS_TYPES, WEIGHTINGS, diffusion_loss
from jaxdiff.models import UNet, UNetConfig, init_unet, unet_param_shapes
from jaxdiff.schedules import BETA_SCHEDULES, Schedule, make_schedule
from jaxdiff.sharding import make_mesh
from jaxdiff.training import Checkpointer
from jaxdiff.validation import check_choice, check_float, check_int, read_json

__all__ = ["validate_config", "compat_config", "resume_hyperparams", "build_model",
           "build_schedule", "init_params", "init_state", "make_loss_fn", "load_train_data",
           "train", "Run", "load_run"]


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every value of a training config (no files are touched, nothing is compiled).

    Covers ``seed``, ``data.*`` (the source; not whether the data exists), ``model.*`` (through
    ``UNetConfig``), ``diffusion.*``, ``training.*`` (including that the batch divides over the
    devices) and ``sampling.*`` (the sampler is built and its timestep grid checked against
    ``diffusion.num_timesteps``, so a bad sampling setting fails before training, not at the first
    sample grid).

    Raises:
      ConfigError: naming the first invalid field and what was expected.
    """
    t, s, d = config.training, config.sampling, config.diffusion
    train_lib.validate_seed_and_data(config)
    model = build_model(config)   # UNetConfig checks model.*
    if model.config.num_classes is None:
        raise ConfigError("model.num_classes must be an int >= 1 (a class-conditional model), "
                          "got None")
    config_check("", check_choice, "diffusion.schedule", d.schedule, sorted(BETA_SCHEDULES))
    config_check("", check_int, "diffusion.num_timesteps", d.num_timesteps, 1)
    config_check("diffusion.", canonical_prediction_type, d.prediction_type)
    config_check("", check_choice, "diffusion.loss_type", d.loss_type, LOSS_TYPES)
    config_check("", check_choice, "diffusion.weighting", d.weighting, WEIGHTINGS)
    train_lib.validate_training(config)
    config_check("", check_float, "training.cond_drop_prob", t.cond_drop_prob, minimum=0.0,
                 maximum=1.0, exclusive_maximum=True)
    config_check("", check_int, "sampling.every", s.every, 1)
    config_check("", check_int, "sampling.per_class", s.per_class, 1)
    mnist_sampling.make_sampler(s, d.prediction_type, build_schedule(config))


def compat_config(config: ml_collections.ConfigDict) -> Dict[str, Any]:
    """The part of the config a checkpoint must match to be resumed (with the seed: it orders the
    data). ``num_classes`` repeats ``model.num_classes`` so that runs written before it had one
    home still compare equal."""
    return json.loads(json.dumps({
        "model": train_lib.model_compat(config.model), "diffusion": config.diffusion.to_dict(),
        "num_classes": config.model.num_classes, "batch_size": config.training.batch_size,
        "seed": config.seed}))


def resume_hyperparams(config: ml_collections.ConfigDict) -> Dict[str, Any]:
    """Training settings that may change on resume (e.g. extending a run); changes are logged."""
    return train_lib.resume_hyperparams(config, ("cond_drop_prob",))


def build_model(config: ml_collections.ConfigDict) -> UNet:
    """``UNet(UNetConfig(**config.model))``: lists (from JSON) become tuples, the string ``"None"``
    resets an optional field, dtype names become dtypes.

    Raises:
      ConfigError: ``UNetConfig`` rejects a field (the message names ``model.<field>``).
    """
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config.model.to_dict().items()}
    optional = {f.name for f in dataclasses.fields(UNetConfig) if "None" in str(f.type)}
    for k in optional & fields.keys():  # "--config.model.mid_attention=None" arrives as a string
        if fields[k] in ("None", "none"):
            fields[k] = None
    for k in ("dtype", "param_dtype"):
        if isinstance(fields.get(k), str):
            fields[k] = config_check(f"model.{k}: ", jnp.dtype, fields[k])
    try:
        return UNet(UNetConfig(**fields))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None


def build_schedule(config: ml_collections.ConfigDict) -> Schedule:
    """``make_schedule(diffusion.schedule, diffusion.num_timesteps)``."""
    return make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)


def init_params(config: ml_collections.ConfigDict, model: UNet, abstract: bool = False):
    """``{"params": ...}``, the variables that ``model.apply`` takes: drawn by
    ``jaxdiff.models.init_unet(model.config, run_keys(seed)["init"])`` (host-side, nothing to
    compile), or with ``abstract=True`` their shapes."""
    if abstract:
        return {"params": unet_param_shapes(model.config)}
    return {"params": init_unet(model.config, train_lib.run_keys(config.seed)["init"])}


def init_state(config: ml_collections.ConfigDict, model: UNet, mesh, *, abstract: bool = False):
    """``(state, tx, lr_fn)``: the replicated ``TrainState`` of :func:`init_params` (identical on
    every host: seeded; :func:`experiments.train_lib.initial_state`). ``abstract=True`` computes
    nothing: ``state`` is then a pytree of ``jax.ShapeDtypeStruct`` with replicated shardings, a
    restore target for a checkpoint."""
    return train_lib.initial_state(config, init_params(config, model, abstract), mesh,
                                   abstract=abstract)


def make_loss_fn(config: ml_collections.ConfigDict, model: UNet, schedule: Schedule) -> Callable:
    """``(variables, batch, key) -> (loss, aux)``: the diffusion loss of ``config.diffusion`` with
    label dropout (``training.cond_drop_prob``) to the null label ``model.num_classes``.
    ``batch``: ``{"image": [B, 28, 28, C], "label": [B] int32}``."""
    d, t = config.diffusion, config.training
    null = jnp.int32(model.config.num_classes)

    def loss_fn(variables, batch, key):
        k_loss, k_drop = jax.random.split(key)

        def apply_fn(v, x, ts, c):
            return model.apply(v, x, ts, labels=c, train=True, rngs={"dropout": k_drop})

        return diffusion_loss(apply_fn, variables, schedule, batch["image"], k_loss,
                              batch["label"], prediction_type=d.prediction_type,
                              weighting=d.weighting, loss_type=d.loss_type,
                              cond_drop_prob=t.cond_drop_prob, null_cond=null)

    return loss_fn


def load_train_data(config: ml_collections.ConfigDict):
    """MNIST's training split per ``config.data``; ``(images, labels)``.

    Raises:
      ConfigError: the data cannot be found, or a label is not below ``model.num_classes``
        (``num_classes`` itself is the null label).
    """
    images, labels = train_lib.load_split(config, "train")
    n = int(config.model.num_classes)
    if len(labels) and (labels.min() < 0 or labels.max() >= n):
        raise ConfigError(f"model.num_classes is {n}, but the data's labels lie in "
                          f"[{labels.min()}, {labels.max()}]: labels must be in [0, {n}) "
                          f"({n} is the null label)")
    return images, labels


def train(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """Trains (or resumes) the run in ``workdir`` on :func:`jaxdiff.training.fit`; returns its
    summary (``start_step``, ``end_step``, ``wall_s``, ``stopped_by_signal``, ``checkpoint_step``,
    ``loss``, ``grid``: the last sample grid written).

    Writes ``config.json``, ``checkpoints/``, ``metrics.jsonl``, ``samples/step_XXXXXX.png``
    (``sampling.per_class`` EMA samples of each class a row, the same noise every time, every
    ``sampling.every`` steps and at the end) and, with ``training.tensorboard``, ``tb/``.
    Everything that can be checked first is (the config, the data directory and the data, whether
    ``workdir`` can be written), before ``workdir`` is created; a checkpoint written with an
    incompatible config is refused before ``config.json`` is written.

    Raises:
      ConfigError: an invalid config field or path (nothing written).
      jaxdiff.training.IncompatibleCheckpointError: ``workdir`` holds a run of another config.
      jaxdiff.training.NonFiniteLossError: the loss diverged.
    """
    validate_config(config)
    train_lib.check_paths(config, workdir)
    train_lib.check_tensorboard_available(config)
    images, labels = load_train_data(config)
    mesh = train_lib.make_train_mesh(config)
    workdir = train_lib.make_workdir(workdir)
    s = config.sampling
    model, schedule = build_model(config), build_schedule(config)
    sample_fn = mnist_sampling.make_sample_fn(model, schedule, mesh, s,
                                              config.diffusion.prediction_type)
    grid_labels = np.repeat(np.arange(model.config.num_classes), s.per_class)
    sample_key = train_lib.run_keys(config.seed)["sample"]  # the same noise: comparable grids

    def sample_grid(state):
        return mnist_sampling.sample_images(sample_fn, state.ema_params, grid_labels, sample_key,
                                            mesh)

    return train_lib.run_task(
        config, workdir, mesh, init_params=lambda abstract: init_params(config, model, abstract),
        loss_fn=make_loss_fn(config, model, schedule), compat=compat_config(config),
        hyperparams=resume_hyperparams(config),
        data=BatchIterator.source({"image": images, "label": labels},
                                  config.training.batch_size, config.seed),
        periodic=[train_lib.grid_job(workdir, s.every, sample_grid, s.per_class)])


class Run(NamedTuple):
    """A trained run loaded by :func:`load_run`."""
    config: ml_collections.ConfigDict
    model: UNet
    schedule: Schedule
    ema_params: Any      # the variables ({"params": ...}) that model.apply takes
    mesh: Any


def _read_run_config(path: str) -> ml_collections.ConfigDict:
    """``config.json``; a legacy top-level ``num_classes`` (runs written before the model held
    the only copy) must equal ``model.num_classes`` and is dropped."""
    raw = read_json(path)   # not JSON: an InvalidFileError naming the file
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object (a train_mnist config)")
    legacy = raw.pop("num_classes", None)
    model_classes = raw.get("model", {}).get("num_classes")
    if legacy is not None and legacy != model_classes:
        raise ConfigError(f"{path}: num_classes {legacy} differs from model.num_classes "
                          f"{model_classes}; the run's config is inconsistent")
    return ml_collections.ConfigDict(raw)


def load_run(workdir: str) -> Run:
    """The latest checkpoint's EMA params of a ``train_mnist`` workdir, with the run's config,
    model, schedule and a mesh over all devices.

    Raises:
      ConfigError: ``workdir`` has no ``config.json`` or no checkpoint.
    """
    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"--workdir: {cfg_path} not found: is {workdir!r} a train_mnist "
                          "workdir?")
    config = _read_run_config(cfg_path)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise ConfigError(f"--workdir: no checkpoint in {ckpt_dir}")
    mesh = make_mesh()
    model, schedule = build_model(config), build_schedule(config)
    target, _, _ = init_state(config, model, mesh, abstract=True)  # shapes only, no compute
    # The config comes from the same workdir: only shapes and optimizer structure are compared.
    ckpt = Checkpointer(ckpt_dir, None, read_only=True)
    try:
        restored = ckpt.restore_latest(target)
    finally:
        ckpt.close()
    if restored is None:
        raise ConfigError(f"--workdir: no checkpoint in {ckpt_dir}")
    return Run(config, model, schedule, restored[0].ema_params, mesh)
