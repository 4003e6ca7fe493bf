"""The training configs' side of the one training loop (:func:`jaxdiff.training.fit`), shared by
every trainer (``mnist_lib``, ``score_mnist``, ``vae_lib``, ``latent_lib``): the checks of the
``seed`` / ``data`` / ``training`` fields, the run's keys, the optimizer, the mesh and the
:class:`~jaxdiff.training.TrainerSettings` a config maps onto, the workdir, and MNIST's splits.

A training config has ``seed``, ``data.{source, data_dir, prefetch}`` and ``training.{batch_size,
num_steps, learning_rate, warmup_steps, lr_schedule, end_lr_factor, weight_decay, grad_clip_norm,
ema_decay, log_every, checkpoint_every, keep_checkpoints}`` (and optionally ``training.fsdp``,
``training.tensorboard``). One root key ``jax.random.key(config.seed)`` is split once into the
init, train and sample keys (:func:`run_keys`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import ml_collections
import numpy as np

from experiments.cli import ConfigError, config_check
from experiments.images import save_grid
from jaxdiff.data import HOW_TO_GET_MNIST, load_mnist
from jaxdiff.sharding import check_batch_divisible, make_mesh
from jaxdiff.training import (OptimizerConfig, Periodic, TrainerSettings, TrainState, TrainTask,
                              abstract_train_state, fit, make_optimizer, new_train_state)
from jaxdiff.validation import check_bool, check_choice, check_float, check_int

__all__ = ["DATA_SOURCES", "RESUMABLE", "run_keys", "validate_seed_and_data",
           "validate_training", "check_paths", "check_tensorboard_available", "optimizer_config",
           "optimizer", "resume_hyperparams", "make_train_mesh", "trainer_settings",
           "make_workdir", "load_split", "initial_state", "grid_job", "run_task",
           "COMPUTE_ONLY_MODEL_FIELDS", "model_compat"]

DATA_SOURCES = ("auto", "local", "tfds")
# training.* fields that may change on resume (e.g. extending a run); a change is logged.
RESUMABLE = ("num_steps", "learning_rate", "warmup_steps", "lr_schedule", "end_lr_factor",
             "weight_decay", "grad_clip_norm", "ema_decay")


# UNetConfig fields that change how a model computes, not what it is: left out of the
# compatibility keys, so that a run can resume with them changed (and runs written before they
# existed still resume).
COMPUTE_ONLY_MODEL_FIELDS = ("remat",)


def model_compat(model: ml_collections.ConfigDict) -> Dict[str, Any]:
    """``model.to_dict()`` without :data:`COMPUTE_ONLY_MODEL_FIELDS`: a UNet config's part of a
    run's compatibility keys."""
    return {k: v for k, v in model.to_dict().items() if k not in COMPUTE_ONLY_MODEL_FIELDS}


def run_keys(seed: int) -> Dict[str, jax.Array]:
    """The run's keys: ``jax.random.key(seed)`` split once into ``{"init", "train", "sample"}``
    (typed keys). ``init`` draws the parameters, ``train`` is the train state's key (each step
    folds in the step number), ``sample`` draws the grids' noise (the same every time, so that
    grids are comparable)."""
    init, train, sample = jax.random.split(jax.random.key(check_int("seed", seed, 0)), 3)
    return {"init": init, "train": train, "sample": sample}


def validate_seed_and_data(config: ml_collections.ConfigDict) -> None:
    """Checks ``seed`` (an int >= 0) and ``data.source`` / ``data.prefetch`` (not whether the data
    exists); ConfigError naming the field."""
    config_check("", check_int, "seed", config.seed, 0)
    config_check("", check_choice, "data.source", config.data.source, DATA_SOURCES)
    config_check("", check_int, "data.prefetch", config.data.prefetch, 1)


def validate_training(config: ml_collections.ConfigDict) -> None:
    """Checks the ``training.*`` fields that :func:`trainer_settings` reads (sizes and intervals
    >= 1, the learning-rate schedule, ``ema_decay`` in ``[0, 1)``, ``tensorboard`` a bool), that
    ``batch_size`` divides over the devices and that ``fsdp`` divides the device count;
    ConfigError naming the field."""
    t = config.training
    for name in ("batch_size", "num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        config_check("", check_int, f"training.{name}", t[name], 1)
    config_check("", check_int, "training.warmup_steps", t.warmup_steps, 0)
    config_check("", check_float, "training.learning_rate", t.learning_rate, minimum=0.0,
                 exclusive_minimum=True)
    config_check("", check_choice, "training.lr_schedule", t.lr_schedule, ("cosine", "constant"))
    for name in ("end_lr_factor", "weight_decay", "grad_clip_norm"):
        config_check("", check_float, f"training.{name}", t[name], minimum=0.0)
    config_check("", check_float, "training.ema_decay", t.ema_decay, minimum=0.0, maximum=1.0,
                  exclusive_maximum=True)
    config_check("", check_bool, "training.tensorboard", t.get("tensorboard", False))
    config_check("", check_batch_divisible, t.batch_size, make_mesh())
    make_train_mesh(config)


def check_paths(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Checks, without creating anything, that ``config.data.data_dir`` (if set) exists and that
    ``workdir`` exists as a writable directory or can be created.

    Raises:
      ConfigError: naming the path and what is wrong.
    """
    data_dir = config.data.data_dir
    if data_dir and not os.path.isdir(data_dir):
        raise ConfigError(f"data.data_dir {data_dir!r} does not exist. {HOW_TO_GET_MNIST}")
    path = os.path.abspath(workdir)
    while not os.path.exists(path):  # the nearest existing ancestor decides
        path = os.path.dirname(path)
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"workdir {workdir!r} is not writable: {path!r} is not a writable "
                          "directory")


def check_tensorboard_available(config: ml_collections.ConfigDict) -> None:
    """ConfigError now, before anything is written, if ``training.tensorboard`` is on and cannot
    work (no ``tensorboardX``)."""
    if not config.training.get("tensorboard", False):
        return
    try:
        import tensorboardX  # noqa: F401
    except ImportError as e:
        raise ConfigError("training.tensorboard=True needs the tensorboardX package (pip install "
                          f"tensorboardX, or pip install 'jaxdiff[tensorboard]'): {e}") from None


def optimizer_config(config: ml_collections.ConfigDict) -> OptimizerConfig:
    """``config.training``'s learning rate, warm-up, schedule over ``num_steps``, weight decay and
    clipping as an :class:`~jaxdiff.training.OptimizerConfig` (ConfigError naming the field)."""
    t = config.training
    return config_check("training.", OptimizerConfig,
                        learning_rate=t.learning_rate, warmup_steps=t.warmup_steps,
                        total_steps=t.num_steps, schedule=t.lr_schedule,
                        end_lr_factor=t.end_lr_factor, weight_decay=t.weight_decay,
                        grad_clip_norm=t.grad_clip_norm)


def optimizer(config: ml_collections.ConfigDict):
    """``(tx, lr_fn)``: :func:`jaxdiff.training.make_optimizer` of :func:`optimizer_config`."""
    return make_optimizer(optimizer_config(config))


def resume_hyperparams(config: ml_collections.ConfigDict,
                       extra: Sequence[str] = ()) -> Dict[str, Any]:
    """The ``training.*`` settings that may change on resume (:data:`RESUMABLE`, then ``extra``),
    JSON-able; the checkpointer logs a change."""
    t = config.training
    return json.loads(json.dumps({k: t[k] for k in (*RESUMABLE, *extra)}))


def make_train_mesh(config: ml_collections.ConfigDict):
    """The mesh over all devices: ``("data",)``, or ``("data", "fsdp")`` with ``training.fsdp >
    1`` (the train state's large leaves then split over ``fsdp``:
    :mod:`jaxdiff.training.placement`).

    Raises:
      ConfigError: ``training.fsdp`` does not divide the number of devices.
    """
    return config_check("training.", make_mesh, fsdp=config.training.get("fsdp", 1))


def trainer_settings(config: ml_collections.ConfigDict, workdir: str) -> TrainerSettings:
    """``config.training`` (and ``data.prefetch``) as the loop's
    :class:`~jaxdiff.training.TrainerSettings` for ``workdir``.

    Raises:
      ConfigError: a field the settings reject, named ``training.<field>``.
    """
    t = config.training
    return config_check(
        "training.", TrainerSettings, workdir=workdir, num_steps=t.num_steps,
        batch_size=t.batch_size, optimizer=optimizer_config(config), ema_decay=t.ema_decay,
        log_every=t.log_every, checkpoint_every=t.checkpoint_every,
        keep_checkpoints=t.keep_checkpoints, fsdp=t.get("fsdp", 1),
        prefetch=config.data.prefetch, tensorboard=t.get("tensorboard", False))


def make_workdir(workdir: str) -> str:
    """Creates ``workdir`` (and its parents) once every check has passed; returns its absolute
    path.

    Raises:
      ConfigError: it cannot be created.
    """
    workdir = os.path.abspath(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"workdir {workdir!r} is not writable: {e}") from None
    return workdir


def load_split(config: ml_collections.ConfigDict, split: str):
    """MNIST's ``split`` (``"train"`` / ``"test"``) per ``config.data``: ``(images [N, 28, 28, 1]
    float32 in [-1, 1], labels [N])``.

    Raises:
      ConfigError: the data cannot be found (``data: ...``, naming ``--config.data.data_dir``).
      jaxdiff.validation.InvalidFileError: a file of it is corrupt (the message names it).
    """
    try:
        return load_mnist(split, config.data.data_dir or None, source=config.data.source,
                          data_dir_name="--config.data.data_dir")
    except (FileNotFoundError, ImportError) as e:
        raise ConfigError(f"data: {e}") from None


def initial_state(config: ml_collections.ConfigDict, params: Any, mesh, *,
                  abstract: bool = False):
    """``(state, tx, lr_fn)``: the run's train state of ``params`` (its fresh params, or with
    ``abstract=True`` their ``jax.ShapeDtypeStruct`` shapes), replicated over ``mesh``, with the
    optimizer of ``config.training`` and the train key of :func:`run_keys`; ``abstract=True``
    gives shapes only (a restore target, nothing computed). What :func:`run_task` trains from."""
    tx, lr_fn = optimizer(config)
    key = run_keys(config.seed)["train"]
    make = abstract_train_state if abstract else new_train_state
    return make(params, tx, key, mesh), tx, lr_fn


def grid_job(workdir: str, every: int, sample: Callable[[TrainState], np.ndarray],
             columns: int) -> Periodic:
    """The sample grid every ``every`` steps (and at the end): ``sample(state) -> images [n, H,
    W, C]`` in ``[-1, 1]`` (every process calls it), written by process 0 as
    ``WORKDIR/samples/step_XXXXXX.png`` and ``samples/latest.png``; the result is that path
    (None on other processes)."""

    def write(step: int, state: TrainState) -> Optional[str]:
        images = sample(state)
        if jax.process_index() != 0:
            return None
        path = os.path.join(workdir, "samples", f"step_{step:06d}.png")
        save_grid(images, path, ncols=columns)
        save_grid(images, os.path.join(workdir, "samples", "latest.png"), ncols=columns)
        return path

    return Periodic("grid", every, write)


def run_task(config: ml_collections.ConfigDict, workdir: str, mesh, *,
             init_params: Callable[[bool], Any], **task: Any) -> Dict[str, Any]:
    """Trains (or resumes) a run on :func:`jaxdiff.training.fit`: the settings of
    :func:`trainer_settings`, the train key of :func:`run_keys`, ``config`` as the run's
    ``config.json``, and the trainer's own ``init_params`` (as :func:`initial_state`'s params)
    and ``task`` fields (``loss_fn``, ``data``, ``compat``, ``hyperparams``, ``periodic``,
    ``finish``: :class:`jaxdiff.training.TrainTask`). Returns the summary.

    Raises:
      ConfigError: a ``training.*`` field the settings reject.
      jaxdiff.training.IncompatibleCheckpointError, jaxdiff.training.NonFiniteLossError: as
        :func:`jaxdiff.training.fit`.
    """
    settings = trainer_settings(config, workdir)
    return fit(settings, TrainTask(init_params=init_params, key=run_keys(config.seed)["train"],
                                   config_json=config.to_json(indent=2), **task), mesh=mesh)
