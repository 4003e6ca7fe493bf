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
from jaxdiff.training import (FSDP_AXIS, Checkpointer, StopOnSignal, fsdp_sharding, make_mesh,
                              make_train_step, replicated_sharding, train_loop)
from jaxdiff.training.writers import JsonlWriter, MultiWriter, TensorBoardWriter

__all__ = ["train", "run_training", "load_train_data", "check_tensorboard_available",
           "make_train_mesh"]


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
    :func:`jaxdiff.training.fsdp_sharding`; :func:`run_training` does it for such a mesh).

    Raises:
      ConfigError: ``training.fsdp`` does not divide the number of devices.
    """
    try:
        return make_mesh(fsdp=config.training.get("fsdp", 1))
    except ValueError as e:
        raise ConfigError(f"training.{e}") from None


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
        (:func:`jaxdiff.training.fsdp_sharding`; the sample grids gather the EMA params).
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
    target, tx, lr_fn = init_state(True)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), compat,
                        max_to_keep=t.keep_checkpoints, save_interval_steps=t.checkpoint_every,
                        hyperparams=hyperparams)
    data_state = {"epoch": 0, "index": 0}
    restored = ckpt.restore_latest(target)
    if restored is not None:
        state, data_state, step = restored
        if is_main:
            print(f"resumed from step {step} ({ckpt.directory})")
    else:
        state, tx, lr_fn = init_state(False)
    if is_main:  # after the compatibility check: a refused resume leaves the workdir as it was
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))
    state_sharding = None
    if FSDP_AXIS in mesh.axis_names:  # training.fsdp > 1: the state's large leaves split
        state_sharding = fsdp_sharding(target, mesh)
        state = jax.device_put(state, state_sharding)
    start = int(jax.device_get(state.step))
    step_fn = make_train_step(loss_fn, tx, mesh, ema_decay=t.ema_decay, lr_schedule=lr_fn,
                              state_sharding=state_sharding)
    last_grid: list[Optional[str]] = [None]

    def write_grid(step, st):
        if state_sharding is not None:  # the sampler takes replicated params: gather the EMA
            st = st.replace(ema_params=jax.device_put(st.ema_params, replicated_sharding(mesh)))
        imgs = grid_fn(st)
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
