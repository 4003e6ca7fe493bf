"""The training loop every jaxdiff trainer runs on: :func:`fit` runs a :class:`TrainTask` under
:class:`TrainerSettings`.

A trainer supplies only what differs between models (:class:`TrainTask`): its initial parameters
(fresh, and as shapes for a restore target), the train state's key, its loss, its data (a
``from_state`` function: :data:`jaxdiff.data.DataSource`), the config keys a checkpoint must match
to be resumed, and its periodic work (sample grids, evaluations: :class:`Periodic`). The loop owns
the rest:

- the mesh (``data``, or ``data`` x ``fsdp`` with the state split:
  :mod:`jaxdiff.training.placement`);
- the optimizer (optax, from :class:`~jaxdiff.training.OptimizerConfig`), the EMA and the jitted
  step (:func:`~jaxdiff.training.make_train_step`);
- Orbax checkpoints with exact resume, the data position included
  (:class:`~jaxdiff.training.Checkpointer`); a checkpoint of another config is refused before
  anything is written;
- the NaN guard (:class:`~jaxdiff.training.NonFiniteLossError`, naming the last good checkpoint);
- the metrics: ``metrics.jsonl``, TensorBoard, a progress bar, a row at the last step
  (:class:`~jaxdiff.training.run_log.RunLog`); a resumed run first truncates its logs to the
  checkpoint's step;
- SIGTERM / Ctrl-C: finish the step, save, say so (:class:`~jaxdiff.training.StopOnSignal`);
- messages: the train step's compilation (the first call) and its time, each periodic job's first
  (compiling) call, the resume, the stop, and the final summary (a JSON line).

The workdir gets ``checkpoints/``, ``metrics.jsonl``, ``tb/`` (TensorBoard), the task's
``config.json`` and what its periodic jobs write.

Configuration stays at the edge: the command lines in ``experiments/`` map their configs onto
these dataclasses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import jax

from jaxdiff.data.iterator import DataSource, Prefetcher
from jaxdiff.sharding import check_batch_divisible, make_mesh
from jaxdiff.training.checkpoint import Checkpointer
from jaxdiff.training.loop import StopOnSignal, train_loop
from jaxdiff.training.placement import (abstract_train_state, gather_replicated,
                                        new_train_state, place_frozen, restore_or_init)
from jaxdiff.training.run_log import METRICS_FILE, RunLog, truncate_jsonl
from jaxdiff.training.state import OptimizerConfig, TrainState, make_optimizer
from jaxdiff.training.step import LossFn, make_train_step
from jaxdiff.training.writers import JsonlWriter
from jaxdiff.validation import check_bool, check_float, check_int

__all__ = ["TrainerSettings", "TrainTask", "Periodic", "fit", "CHECKPOINT_DIR", "CONFIG_FILE"]

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class TrainerSettings:
    """How a run trains: where, how long, how often it logs and saves.

    Attributes:
      workdir: the run directory (created if needed).
      num_steps: the run's total optimizer steps (a resumed run continues up to it).
      batch_size: the global batch (all processes and devices); a multiple of the device count.
      optimizer: AdamW, warm-up, schedule over ``total_steps``, clipping.
      ema_decay: the EMA's maximum decay, in ``[0, 1)``.
      log_every: steps per metrics row (and between host reads of the metrics).
      checkpoint_every: steps between checkpoints (a run also saves at its end and when stopped).
      keep_checkpoints: checkpoints kept.
      fsdp: > 1 splits the train state over an ``fsdp`` mesh axis that big (it must divide the
        device count); ignored when :func:`fit` is given a mesh.
      prefetch: batches the data thread prepares ahead.
      tensorboard: also write TensorBoard events to ``WORKDIR/tb`` (needs ``tensorboardX``).
      progress: show a progress bar (stderr).
      accumulate_steps: ``k >= 1`` micro-batches per optimizer step (gradient accumulation,
        :func:`~jaxdiff.training.make_train_step`): ``batch_size`` stays the batch of one
        optimizer step (the effective batch), each device holds ``1 / k`` of its share at a
        time; ``batch_size`` must be a multiple of ``k`` times the data-parallel size.
        ``num_steps`` and every interval count optimizer steps, so a resume is exact as
        without accumulation.

    Raises:
      ValueError: a field out of range, naming it.
    """

    workdir: str
    num_steps: int
    batch_size: int
    optimizer: OptimizerConfig = OptimizerConfig()
    ema_decay: float = 0.999
    log_every: int = 100
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    fsdp: int = 1
    prefetch: int = 2
    tensorboard: bool = False
    progress: bool = True
    accumulate_steps: int = 1

    def __post_init__(self):
        if not isinstance(self.workdir, (str, os.PathLike)) or not str(self.workdir):
            raise ValueError(f"workdir must be a non-empty path, got {self.workdir!r}")
        for name in ("num_steps", "batch_size", "log_every", "checkpoint_every",
                     "keep_checkpoints", "fsdp", "prefetch", "accumulate_steps"):
            check_int(name, getattr(self, name), 1)
        check_float("ema_decay", self.ema_decay, minimum=0.0, maximum=1.0,
                    exclusive_maximum=True)
        check_bool("tensorboard", self.tensorboard)
        check_bool("progress", self.progress)
        if not isinstance(self.optimizer, OptimizerConfig):
            raise ValueError(f"optimizer must be an OptimizerConfig, got "
                             f"{type(self.optimizer).__name__}")


@dataclasses.dataclass(frozen=True, eq=False)
class Periodic:
    """Work a run does every ``every`` steps and once at its end (sample grids, evaluations).

    Attributes:
      name: the summary key of the last result (e.g. ``"grid"``, ``"eval"``) and the name in
        messages.
      every: steps between calls; 0: never (not at the end either).
      fn: ``fn(step, state) -> result``, called on every process (sampling is collective); its
        ``state.ema_params`` are whole (gathered when the state is split over ``fsdp``). It writes
        its own files (on process 0). It must not keep or donate ``state``.
      jsonl: a file name in the workdir: a mapping result is appended there as a row of scalars
        (``{"step": step, ...}``), and the file is truncated to the resumed step on resume.
    """

    name: str
    every: int
    fn: Callable[[int, TrainState], Any]
    jsonl: Optional[str] = None

    def __post_init__(self):
        check_int(f"Periodic({self.name!r}).every", self.every, 0)


@dataclasses.dataclass(frozen=True, eq=False)
class TrainTask:
    """What a trainer supplies to :func:`fit`: everything that differs between models.

    Attributes:
      init_params: ``init_params(abstract)``: the fresh trainable params (the same on every
        process: seeded), or with ``abstract=True`` their ``jax.ShapeDtypeStruct`` pytree
        (nothing computed; a restore target). Frozen parts (a VAE, a text encoder, a LoRA's base
        model) belong in ``frozen``, not here.
      key: the train state's base key (typed or raw); each step folds in its number.
      loss_fn: ``(params, batch, key) -> (loss [], aux dict)``, the batch mean; with ``frozen``
        set, ``(params, batch, key, frozen) -> ...``.
      data: ``from_state(state)``: the data at ``state`` (None: the beginning), an iterator of
        host batches with a ``state`` (:class:`jaxdiff.data.ResumableIterator`), e.g.
        :meth:`jaxdiff.data.BatchIterator.source`.
      compat: JSON-able; what a checkpoint must match to be resumed (model, loss, batch, seed...).
      hyperparams: JSON-able; settings that may change on resume (changes are logged).
      periodic: the run's :class:`Periodic` jobs, run in this order.
      config_json: written to ``WORKDIR/config.json`` once the resume is accepted (the run's
        config, for the tools that read the run back).
      finish: ``finish(state, summary) -> extra summary fields``, after the loop and the final
        periodic jobs, on every process (``state.ema_params`` whole; e.g. an export).
      frozen: None, or a pytree of arrays (host or device, the same on every process) that the
        loss reads but does not train. :func:`fit` places it once (replicated, or split over the
        ``fsdp`` axis like the state when ``settings.fsdp > 1``) and passes it to the compiled
        step as an argument (never a constant of the program: a large base model baked into the
        program would be copied into it); it is neither checkpointed nor EMA-averaged, so a
        resume needs the same ``frozen`` (put its identity into ``compat``).
    """

    init_params: Callable[[bool], Any]
    key: jax.Array
    loss_fn: LossFn
    data: DataSource
    compat: Mapping[str, Any]
    hyperparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    periodic: Sequence[Periodic] = ()
    config_json: Optional[str] = None
    finish: Optional[Callable[[TrainState, Dict[str, Any]], Mapping[str, Any]]] = None
    frozen: Any = None


def _initial_state(task: TrainTask, tx, mesh, abstract: bool) -> TrainState:
    if abstract:
        return abstract_train_state(task.init_params(True), tx, task.key, mesh)
    return new_train_state(task.init_params(False), tx, task.key, mesh)


def fit(settings: TrainerSettings, task: TrainTask, *,
        mesh: Optional[jax.sharding.Mesh] = None) -> Dict[str, Any]:
    """Trains (or resumes) ``task`` in ``settings.workdir`` up to ``settings.num_steps``.

    Args:
      settings: the run's settings.
      task: the model's part.
      mesh: the mesh (default: :func:`jaxdiff.sharding.make_mesh` with ``settings.fsdp``).

    Returns:
      The summary, also printed as the last line of stdout (JSON, process 0): ``start_step``,
      ``end_step``, ``wall_s``, ``stopped_by_signal``, ``checkpoint_step`` (the latest on disk),
      ``loss`` (the last row's, None if no step ran), one key per :class:`Periodic` job (its last
      result; a mapping gets its ``step``; None if it did not run) and ``finish``'s fields.

    Raises:
      ValueError: ``settings.fsdp`` does not divide the device count, or the batch does not
        divide over the mesh.
      jaxdiff.training.IncompatibleCheckpointError: the workdir holds a run of another
        ``compat`` (nothing is written).
      jaxdiff.training.CheckpointError: its latest checkpoint cannot be read.
      jaxdiff.training.NonFiniteLossError: a non-finite loss; nothing after the last good step
        is saved, and the message says which checkpoint that is.
    """
    mesh = make_mesh(fsdp=settings.fsdp) if mesh is None else mesh
    check_batch_divisible(settings.batch_size, mesh)
    if settings.accumulate_steps > 1:
        if settings.batch_size % settings.accumulate_steps:
            raise ValueError(f"batch_size {settings.batch_size} must be a multiple of "
                             f"accumulate_steps {settings.accumulate_steps}")
        check_batch_divisible(settings.batch_size // settings.accumulate_steps, mesh)
    workdir = os.path.abspath(settings.workdir)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    tx, lr_fn = make_optimizer(settings.optimizer)
    ckpt = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), dict(task.compat),
                        max_to_keep=settings.keep_checkpoints,
                        save_interval_steps=settings.checkpoint_every,
                        hyperparams=dict(task.hyperparams))
    try:
        begin = restore_or_init(ckpt, mesh, lambda abstract: _initial_state(task, tx, mesh,
                                                                            abstract))
    except BaseException:
        ckpt.close()
        raise
    start = 0 if begin.resumed_step is None else begin.resumed_step
    if is_main:   # after the compatibility check: a refused resume leaves the workdir as it was
        if begin.resumed_step is not None:
            print(f"resumed from step {start} ({ckpt.directory})", flush=True)
        if task.config_json is not None:
            with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
                f.write(task.config_json)
        for name in [METRICS_FILE] + [p.jsonl for p in task.periodic if p.jsonl]:
            dropped = truncate_jsonl(os.path.join(workdir, name), start)
            if dropped:
                print(f"{name}: dropped {dropped} rows after step {start} (written after the "
                      "checkpoint resumed from)", flush=True)
    step_fn = make_train_step(task.loss_fn, tx, mesh, ema_decay=settings.ema_decay,
                              lr_schedule=lr_fn, state_sharding=begin.sharding,
                              frozen=place_frozen(task.frozen, mesh),
                              accumulate_steps=settings.accumulate_steps)
    log = RunLog(workdir, every=settings.log_every, batch_size=settings.batch_size, start=start,
                 total=settings.num_steps, enabled=is_main, tensorboard=settings.tensorboard,
                 progress=settings.progress)
    jsonl = {p.name: JsonlWriter(os.path.join(workdir, p.jsonl))
             for p in task.periodic if p.jsonl and is_main}
    results: Dict[str, Any] = {p.name: None for p in task.periodic}
    done_at: Dict[str, Optional[int]] = {p.name: None for p in task.periodic}
    first_step = [True]

    def step(state, batch):
        if not first_step[0]:
            return step_fn(state, batch)
        first_step[0] = False
        log.message("compiling the train step (first call)...")
        t = time.perf_counter()
        out = step_fn(state, batch)
        jax.block_until_ready(out[1])
        log.message(f"compiled the train step in {time.perf_counter() - t:.1f} s (its first "
                    "call, one step included)")
        return out

    def run_periodic(p: Periodic, n: int, state: TrainState) -> None:
        first = done_at[p.name] is None
        if first:
            log.message(f"running {p.name} at step {n} (its first call compiles)...")
        t = time.perf_counter()
        out = p.fn(n, state.replace(ema_params=gather_replicated(state.ema_params, mesh)))
        if first:
            log.message(f"{p.name} at step {n} done in {time.perf_counter() - t:.1f} s")
        if isinstance(out, Mapping):
            if p.name in jsonl:
                jsonl[p.name].write_scalars(n, out)
                jsonl[p.name].flush()
            out = dict(out, step=n)
        results[p.name], done_at[p.name] = out, n

    def on_step(n, state):
        for p in task.periodic:
            if p.every and n % p.every == 0:
                run_periodic(p, n, state)

    t0 = time.perf_counter()
    state = begin.state
    try:
        with StopOnSignal() as stop, Prefetcher(task.data(begin.data_state),
                                                settings.prefetch) as batches:
            try:
                state = train_loop(state, step, batches, mesh, settings.num_steps,
                                   checkpointer=ckpt, on_metrics=log, on_step=on_step, stop=stop,
                                   sync_every=settings.log_every)
            finally:
                log.close()
                ckpt.close()
        end = int(jax.device_get(state.step))
        stopped = stop.requested is not None
        if not stopped:
            for p in task.periodic:
                if p.every and done_at[p.name] != end:
                    run_periodic(p, end, state)
    finally:
        for writer in jsonl.values():
            writer.close()
    summary: Dict[str, Any] = {
        "start_step": start, "end_step": end, "wall_s": time.perf_counter() - t0,
        "stopped_by_signal": stopped, "checkpoint_step": ckpt.latest_step(),
        "loss": None if log.last_row is None else log.last_row["loss"], **results}
    if task.finish is not None:
        summary.update(task.finish(state.replace(
            ema_params=gather_replicated(state.ema_params, mesh)), dict(summary)))
    if is_main:
        _report(summary, stop.requested, ckpt, log)
    return summary


def _report(summary: Dict[str, Any], signum: Optional[int], ckpt: Checkpointer,
            log: RunLog) -> None:
    """The run's last lines: how it ended, then the summary as JSON."""
    end, saved = summary["end_step"], summary["checkpoint_step"]
    where = f"checkpoint saved: {ckpt.step_dir(end)}" if saved == end else (
        "no checkpoint written" if saved is None else f"latest checkpoint {ckpt.step_dir(saved)}")
    if signum is not None:
        name = signal.Signals(signum).name
        print(f"stopped by {name} at step {end}, {where}. Run the same command again to resume.",
              flush=True)
    else:
        print(f"trained steps {summary['start_step']}..{end} in {summary['wall_s']:.1f} s "
              f"({log.describe()}); {where}", flush=True)
    print(json.dumps(summary, default=str), flush=True)
