"""Training a class-conditional MNIST diffusion model from a config: :func:`train` validates
everything, then loads the data, builds or resumes the state and runs the loop, writing
``config.json``, ``checkpoints/``, ``metrics.jsonl``, sample grids and (``training.tensorboard``)
TensorBoard events into the workdir. ``experiments.train_mnist`` is its command line.

:func:`run_training` is the part every MNIST trainer shares (workdir, resume, loop, logging,
grids); ``experiments.score_mnist.train`` (the score-SDE model) calls it with its own state, loss
and sampler.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, Optional

import jax
import ml_collections
import numpy as np

from experiments import lib
from experiments.cli import ConfigError
from experiments.images import save_grid
from jaxdiff.data import BatchIterator, Prefetcher, load_mnist
from jaxdiff.training import (Checkpointer, StopOnSignal, abstract_target, make_train_step,
                              train_loop)
from jaxdiff.sharding import FSDP_AXIS, fsdp_sharding, make_mesh, replicated_sharding
from jaxdiff.training.writers import JsonlWriter, MultiWriter, TensorBoardWriter

__all__ = ["train", "run_training", "load_train_data", "check_tensorboard_available",
           "make_train_mesh", "state_sharding_for", "restore_or_init", "gather_replicated"]


def check_tensorboard_available() -> None:
    """ConfigError now, before anything is written, if ``training.tensorboard`` cannot work."""
    try:
        import tensorboardX  # noqa: F401
    except ImportError as e:
        raise ConfigError("training.tensorboard=True needs the tensorboardX package (pip install "
                          f"tensorboardX, or pip install 'jaxdiff[tensorboard]'): {e}") from None


class _Logger:
    """Averages metrics over ``every`` steps and writes the means with the throughput to
    ``metrics.jsonl`` (a ``JsonlWriter``), to TensorBoard (a ``TensorBoardWriter`` on
    ``WORKDIR/tb``, when ``tensorboard``) and to a tqdm bar. Does nothing when not ``enabled``
    (processes other than the first)."""

    def __init__(self, workdir, every, batch_size, start, total, enabled, tensorboard=False):
        self.every, self.batch_size, self.enabled = every, batch_size, enabled
        self.acc, self.t0, self.last_step = [], time.perf_counter(), start
        self.bar, self.writer = None, None
        if enabled:
            from tqdm import tqdm
            writers = [JsonlWriter(os.path.join(workdir, "metrics.jsonl"))]
            if tensorboard:
                writers.append(TensorBoardWriter(os.path.join(workdir, "tb")))
            self.writer = MultiWriter(writers)
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def __call__(self, step, m):
        if not self.enabled:
            return
        self.acc.append(m)
        self.bar.update(1)
        if step % self.every:
            return
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.t0, 1e-9)
        row = {k: float(np.mean([a[k] for a in self.acc])) for k in self.acc[0]}
        row.update(steps_per_sec=rate, images_per_sec=rate * self.batch_size, time=time.time())
        self.acc, self.t0, self.last_step = [], now, step
        self.writer.write_scalars(step, row)
        self.writer.flush()   # readable while the run goes on
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row.get('lr', 0):.1e}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


# The logger is shared by the training command lines (experiments.latent_lib uses it too).
MetricsLogger = _Logger


def load_train_data(config: ml_collections.ConfigDict):
    """MNIST's training split per ``config.data``; ``(images, labels)``.

    Raises:
      ConfigError: the data cannot be found, or a label is not below ``model.num_classes``
        (``num_classes`` itself is the null label).
    """
    try:
        images, labels = load_mnist("train", config.data.data_dir or None,
                                    source=config.data.source)
    except (FileNotFoundError, ImportError) as e:
        raise ConfigError(f"data: {e}") from None
    n = int(config.model.num_classes)
    if len(labels) and (labels.min() < 0 or labels.max() >= n):
        raise ConfigError(f"model.num_classes is {n}, but the data's labels lie in "
                          f"[{labels.min()}, {labels.max()}]: labels must be in [0, {n}) "
                          f"({n} is the null label)")
    return images, labels


def make_train_mesh(config: ml_collections.ConfigDict):
    """The mesh over all devices: ``("data",)``, or ``("data", "fsdp")`` with
    ``training.fsdp > 1`` (the train state's large leaves then split over ``fsdp``: see
    :func:`jaxdiff.sharding.fsdp_sharding`; :func:`run_training` does it for such a mesh).

    Raises:
      ConfigError: ``training.fsdp`` does not divide the number of devices.
    """
    try:
        return make_mesh(fsdp=config.training.get("fsdp", 1))
    except ValueError as e:
        raise ConfigError(f"training.{e}") from None


def state_sharding_for(target: Any, mesh) -> Optional[Any]:
    """The train state's sharding on ``mesh``: None (replicated) on a ``("data",)`` mesh; on a
    mesh with an ``fsdp`` axis (``training.fsdp > 1``, :func:`make_train_mesh`),
    :func:`jaxdiff.sharding.fsdp_sharding` of ``target`` (a state or its abstract shapes)."""
    if FSDP_AXIS not in mesh.axis_names:
        return None
    return fsdp_sharding(target, mesh)


def restore_or_init(ckpt: Checkpointer, mesh, init_state: Callable[[bool], tuple]) -> tuple:
    """Resumes the latest checkpoint of ``ckpt`` or starts fresh, with the state placed for
    ``mesh`` (the start of every training command line's loop).

    On a mesh with an ``fsdp`` axis the restore target carries the split shardings of
    :func:`state_sharding_for`, so each leaf is read straight into its shards
    (:meth:`jaxdiff.training.Checkpointer.restore_latest`): a resume never puts a whole split
    leaf on one device. A fresh state is built replicated by ``init_state(False)``, then split.

    Args:
      ckpt: the run's checkpointer (its compatibility check applies).
      mesh: from :func:`make_train_mesh`.
      init_state: ``init_state(abstract) -> (state, tx, lr_fn)``: the replicated fresh state,
        or with ``abstract=True`` its ``jax.ShapeDtypeStruct`` shapes; the same ``tx`` either way.

    Returns:
      ``(state, tx, lr_fn, data_state, state_sharding)``; ``state_sharding`` is None when the
      state is replicated (pass it to ``make_train_step(state_sharding=...)`` either way);
      ``data_state`` is the data position (``{"epoch": 0, "index": 0}`` when fresh).

    Raises:
      jaxdiff.training.IncompatibleCheckpointError, jaxdiff.training.CheckpointError: from the
        restore.
    """
    target, tx, lr_fn = init_state(True)
    state_sharding = state_sharding_for(target, mesh)
    if state_sharding is not None:
        target = abstract_target(target, state_sharding)
    restored = ckpt.restore_latest(target)
    if restored is not None:
        state, data_state, step = restored
        if jax.process_index() == 0:
            print(f"resumed from step {step} ({ckpt.directory})", flush=True)
        return state, tx, lr_fn, dict(data_state), state_sharding
    state, tx, lr_fn = init_state(False)
    if state_sharding is not None:
        state = jax.device_put(state, state_sharding)
    return state, tx, lr_fn, {"epoch": 0, "index": 0}, state_sharding


def gather_replicated(tree: Any, mesh) -> Any:
    """``tree`` replicated over ``mesh`` (e.g. the EMA params for a sampler or an evaluation,
    which take replicated params); unchanged on a mesh without an ``fsdp`` axis (its state is
    replicated already)."""
    if FSDP_AXIS not in mesh.axis_names:
        return tree
    return jax.device_put(tree, replicated_sharding(mesh))


def train(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """Trains (or resumes) the run in ``workdir``; returns a summary dict (``start_step``,
    ``end_step``, ``wall_s``, ``stopped_by_signal``, ``grid``, ``checkpoint_step``).

    Everything that can be checked first is (the config, the data directory and the data, whether
    ``workdir`` can be written), before ``workdir`` is created; a checkpoint written with an
    incompatible config is refused before ``config.json`` is written.

    Raises:
      ConfigError: an invalid config field or path (nothing written).
      jaxdiff.training.IncompatibleCheckpointError: ``workdir`` holds a run of another config.
    """
    workdir = os.path.abspath(workdir)
    lib.validate_config(config)
    lib.check_paths(config, workdir)
    s = config.sampling
    if config.training.get("tensorboard", False):
        check_tensorboard_available()
    images, labels = load_train_data(config)
    mesh = make_train_mesh(config)
    model, schedule = lib.build_model(config), lib.build_schedule(config)
    sample_fn = lib.make_sample_fn(model, schedule, mesh, s, config.diffusion.prediction_type)
    grid_labels = np.repeat(np.arange(model.config.num_classes), s.per_class)
    sample_key = lib.run_keys(config.seed)["sample"]  # same noise every time: grids comparable

    def grid_fn(state):
        return lib.sample_images(sample_fn, state.ema_params, grid_labels, sample_key, mesh)

    return run_training(
        config, workdir, mesh,
        init_state=lambda abstract: lib.init_state(config, model, mesh, abstract=abstract),
        loss_fn=lib.make_loss_fn(config, model, schedule), compat=lib.compat_config(config),
        hyperparams=lib.resume_hyperparams(config), data={"image": images, "label": labels},
        grid_fn=grid_fn, grid_columns=s.per_class)


def run_training(config: ml_collections.ConfigDict, workdir: str, mesh, *,
                 init_state: Callable[[bool], tuple], loss_fn: Callable, compat: Dict[str, Any],
                 hyperparams: Dict[str, Any], data: Dict[str, np.ndarray],
                 grid_fn: Callable[[Any], np.ndarray], grid_columns: int) -> Dict[str, Any]:
    """The training run that every MNIST trainer shares, after its own checks: creates
    ``workdir``, resumes the latest compatible checkpoint (or starts fresh), writes
    ``config.json``, and runs :func:`jaxdiff.training.train_loop` (data-parallel step over
    ``mesh``, EMA, NaN guard, Orbax checkpoints with exact resume, SIGTERM / Ctrl-C stop) with
    ``metrics.jsonl`` / TensorBoard / a progress bar, and a sample grid every ``sampling.every``
    steps and at the end.

    Args:
      config: reads ``seed``, ``data.prefetch``, ``training.{batch_size, num_steps, log_every,
        checkpoint_every, keep_checkpoints, ema_decay, tensorboard}`` and ``sampling.every``
        (already validated).
      workdir: the absolute run directory (created here).
      mesh: the device mesh the batch is sharded over; the state is replicated, or, on a mesh
        with an ``fsdp`` axis (:func:`make_train_mesh`), its large leaves split over that axis
        (:func:`jaxdiff.sharding.fsdp_sharding`; a resume reads them straight into their
        shards: :func:`restore_or_init`; the sample grids gather the EMA params).
      init_state: ``init_state(abstract) -> (state, tx, lr_fn)``: the replicated fresh state, or
        with ``abstract=True`` its shapes (a restore target); the same ``tx`` either way.
      loss_fn: ``(state.params, batch, key) -> (loss, aux)``.
      compat, hyperparams: the checkpoint's compatibility config and the settings that may change
        on resume (:class:`jaxdiff.training.Checkpointer`).
      data: the training arrays ``{name: [N, ...]}``, batched by
        :class:`jaxdiff.data.BatchIterator` with ``config.seed``.
      grid_fn: ``grid_fn(state) -> images [n, 28, 28, C]`` in ``[-1, 1]`` (all processes call
        it); written as ``samples/step_XXXXXX.png`` and ``samples/latest.png``.
      grid_columns: the grid's columns.

    Returns:
      ``{"start_step", "end_step", "wall_s", "stopped_by_signal", "grid", "checkpoint_step"}``.

    Raises:
      ConfigError: ``workdir`` cannot be created.
      jaxdiff.training.IncompatibleCheckpointError: ``workdir`` holds a run of another config
        (refused before ``config.json`` is written).
      jaxdiff.training.NonFiniteLossError: a non-finite loss (no checkpoint after it).
    """
    t, s = config.training, config.sampling
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"workdir {workdir!r} is not writable: {e}") from None
    is_main = jax.process_index() == 0
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), compat,
                        max_to_keep=t.keep_checkpoints, save_interval_steps=t.checkpoint_every,
                        hyperparams=hyperparams)
    state, tx, lr_fn, data_state, state_sharding = restore_or_init(ckpt, mesh, init_state)
    if is_main:  # after the compatibility check: a refused resume leaves the workdir as it was
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))
    start = int(jax.device_get(state.step))
    step_fn = make_train_step(loss_fn, tx, mesh, ema_decay=t.ema_decay, lr_schedule=lr_fn,
                              state_sharding=state_sharding)
    last_grid: list[Optional[str]] = [None]

    def write_grid(step, st):
        # The sampler takes replicated params: gather the EMA params (when split over fsdp).
        imgs = grid_fn(st.replace(ema_params=gather_replicated(st.ema_params, mesh)))
        if is_main:
            path = os.path.join(workdir, "samples", f"step_{step:06d}.png")
            save_grid(imgs, path, ncols=grid_columns)
            save_grid(imgs, os.path.join(workdir, "samples", "latest.png"), ncols=grid_columns)
            last_grid[0] = path

    def on_step(step, st):
        if step % s.every == 0:
            write_grid(step, st)

    logger = _Logger(workdir, t.log_every, t.batch_size, start, t.num_steps, is_main,
                     tensorboard=t.get("tensorboard", False))
    it = BatchIterator.from_state(data, t.batch_size, config.seed, data_state)
    t0 = time.perf_counter()
    with StopOnSignal() as stop, Prefetcher(it, config.data.prefetch) as batches:
        try:
            state = train_loop(state, step_fn, batches, mesh, t.num_steps, checkpointer=ckpt,
                               on_metrics=logger, on_step=on_step, stop=stop,
                               sync_every=t.log_every)
        finally:
            logger.close()
            ckpt.close()
    end = int(jax.device_get(state.step))
    if stop.requested is None and end % s.every:
        write_grid(end, state)
    summary = {"start_step": start, "end_step": end, "wall_s": time.perf_counter() - t0,
               "stopped_by_signal": stop.requested is not None, "grid": last_grid[0],
               "checkpoint_step": ckpt.latest_step()}
    if is_main:
        print(json.dumps(summary))
    return summary
