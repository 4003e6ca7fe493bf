"""The host-side step loop: feed batches, check finiteness, checkpoint, stop on signals.

:func:`train_loop` is the inner loop of :func:`jaxdiff.training.fit` (which adds the mesh, the
optimizer, the resume, the logs and the periodic work around it). It runs ``step_fn`` from
``state.step`` up to ``num_steps``. It

- reads the metrics back to the host only every ``sync_every`` steps, before every checkpoint save
  and at the end (one transfer of all the steps since the last read), so the device queue never
  drains for a per-step host round-trip. ``on_metrics`` still sees every step, in order;
- stops with :class:`NonFiniteLossError` on a non-finite loss or gradient norm. The step function
  already refuses such an update (the state stays the last good one), and the metrics are always
  read *before* a save, so a checkpoint is never written after a non-finite step;
- saves every ``checkpointer.save_interval_steps``, at the end, and when SIGTERM/SIGINT arrives
  (:class:`StopOnSignal` only sets a flag; the loop finishes the current step, saves and returns).

Multi-host: every process has its own signal flag, but a save is a collective that every process
must join. With ``jax.process_count() > 1`` the flag is therefore combined over all processes
(``process_allgather`` + ``any``) at the sync points only (multiples of ``sync_every`` and
checkpoint steps, the same on every host), and all processes stop together at the first sync point
after any of them was signalled. On one process the flag is read after every step (free).
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import numpy as np

from jaxdiff.sharding import shard_batch
from jaxdiff.training.checkpoint import Checkpointer

__all__ = ["StopOnSignal", "train_loop", "NonFiniteLossError", "nonfinite_advice"]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss or gradient norm."""


class StopOnSignal:
    """Context manager: SIGTERM/SIGINT set ``self.requested`` instead of killing the process.

    A second SIGINT (Ctrl-C pressed twice) raises ``KeyboardInterrupt`` at once. Handlers are only
    installed in the main thread (elsewhere this is a flag that :meth:`request` can set); the
    previous handlers are restored on exit.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.requested: Optional[int] = None
        self._sigints = 0
        self._old: Dict[int, Any] = {}

    def request(self, signum: int = signal.SIGTERM) -> None:
        self.requested = signum

    def _handler(self, signum, frame):
        if signum == signal.SIGINT:
            self._sigints += 1
            if self._sigints > 1:
                raise KeyboardInterrupt
        self.requested = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


def _process_count() -> int:
    return jax.process_count()


def _any_process(flag: bool) -> bool:
    """True if ``flag`` is True on any process (a collective: every process must call it)."""
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))
    return bool(np.asarray(flags).any())


def nonfinite_advice(checkpointer: Optional[Checkpointer], last_saved: Optional[int]) -> str:
    """What a :class:`NonFiniteLossError` tells the user about their checkpoints: the last good
    one (``last_saved``, a step of ``checkpointer``; nothing after a non-finite step is ever
    saved), or that none was written."""
    fix = "lower the learning rate (training.learning_rate) or check the data"
    if checkpointer is None:
        return f"Nothing was saved (no checkpointer); {fix}."
    if last_saved is None:
        return (f"No checkpoint was written yet ({checkpointer.directory} holds none), so a rerun "
                f"starts from step 0; {fix}.")
    return (f"The last good checkpoint is step {last_saved} "
            f"({checkpointer.step_dir(last_saved)}; nothing after it was saved): {fix}, then "
            "rerun to resume from it.")


def train_loop(
    state: Any,
    step_fn: Callable,
    batches: Any,
    mesh: jax.sharding.Mesh,
    num_steps: int,
    *,
    checkpointer: Optional[Checkpointer] = None,
    on_metrics: Optional[Callable[[int, Dict[str, float]], None]] = None,
    on_step: Optional[Callable[[int, Any], None]] = None,
    stop: Optional[StopOnSignal] = None,
    sync_every: int = 100,
) -> Any:
    """Trains until ``state.step == num_steps`` or a stop signal; returns the final state.

    Args:
      state: replicated TrainState (donated to ``step_fn``; use only the returned one).
      step_fn: from :func:`jaxdiff.training.step.make_train_step`.
      batches: iterator of host-local numpy batches with a ``state`` property (its position after
        the last batch it returned), e.g. a :class:`jaxdiff.data.Prefetcher`.
      mesh: the mesh the batch is sharded over.
      num_steps: total number of optimizer steps of the run (not "steps from now").
      checkpointer: saves at its interval, at the end and on a stop signal.
      on_metrics: ``(step, {"loss": float, ...})`` for every step, in order (``step`` counts
        completed steps, 1-based), called in bursts at the sync points.
      on_step: ``(step, state)`` after every completed step (for periodic sampling; it decides
        itself whether to act); it must not keep or donate ``state``. A non-finite step is only
        noticed at the next sync point, so ``state`` may then still be that of an earlier step.
      stop: a :class:`StopOnSignal` already entered by the caller; one is made if None.
      sync_every: steps between host reads of the metrics (and, on several processes, between
        agreements on the stop flag); e.g. the logging interval.

    Raises:
      NonFiniteLossError: at the first sync point after a non-finite loss (naming that step, and
        the last good checkpoint or that there is none: :func:`nonfinite_advice`); no checkpoint
        is written after it.
    """
    if sync_every <= 0:
        raise ValueError(f"sync_every must be positive, got {sync_every}")
    own_stop = stop is None
    stop = stop or StopOnSignal()
    if own_stop:
        stop.__enter__()
    multi = _process_count() > 1
    try:
        step = int(jax.device_get(state.step))
        pending: List[Tuple[int, Any]] = []  # (step, device metrics) not yet read
        # The latest checkpoint on disk (a resumed run's, then each save of this run's).
        saved = [None if checkpointer is None else checkpointer.latest_step()]

        def flush():
            host_all = jax.device_get([m for _, m in pending])
            steps = [n for n, _ in pending]
            pending.clear()
            for n, host in zip(steps, host_all):
                host = {k: float(np.asarray(v)) for k, v in host.items()}
                if not host.pop("finite", 1.0) or not np.isfinite(host["loss"]):
                    raise NonFiniteLossError(
                        f"non-finite loss at step {n} (loss={host['loss']}, "
                        f"grad_norm={host.get('grad_norm')}); stopping. "
                        f"{nonfinite_advice(checkpointer, saved[0])}")
                if on_metrics is not None:
                    on_metrics(n, host)

        agreed_stop = False  # multi-process: the flag combined at the last sync point

        def stopping():
            return agreed_stop if multi else stop.requested is not None

        while step < num_steps and not stopping():
            batch = shard_batch(next(batches), mesh)
            data_state = batches.state
            state, metrics = step_fn(state, batch)
            step += 1
            pending.append((step, metrics))
            save_now = checkpointer is not None and checkpointer.should_save(step)
            sync_now = save_now or step % sync_every == 0
            if sync_now:
                flush()  # never checkpoint a step whose loss was not checked
            if multi and sync_now:  # the same steps on every process: all stop together
                agreed_stop = _any_process(stop.requested is not None)
            if save_now and checkpointer.save(step, state, data_state):
                saved[0] = step
            if on_step is not None:
                on_step(step, state)
        if pending:
            flush()
        if checkpointer is not None and step > 0:
            checkpointer.save(step, state, batches.state, force=True)
            checkpointer.wait()
        return state
    finally:
        if own_stop:
            stop.__exit__(None, None, None)
