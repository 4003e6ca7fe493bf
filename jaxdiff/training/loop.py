"""The host-side training loop: feed batches, check finiteness, checkpoint, stop on signals.

:func:`train_loop` runs ``step_fn`` from ``state.step`` up to ``num_steps``. It

- reads each step's metrics one step late (after the next step is dispatched), so the device queue
  never drains for a host round-trip;
- stops with ``FloatingPointError`` on a non-finite loss or gradient norm, *before* any further
  checkpoint is written (the step function already refused the update, so the state stays good);
- saves every ``checkpointer.save_interval_steps``, at the end, and when SIGTERM/SIGINT arrives
  (:class:`StopOnSignal` only sets a flag; the loop finishes the current step, saves and returns).
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable, Dict, Optional

import jax
import numpy as np

from jaxdiff.training.checkpoint import Checkpointer
from jaxdiff.training.step import shard_batch

__all__ = ["StopOnSignal", "train_loop", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss or gradient norm."""


class StopOnSignal:
    """Context manager: SIGTERM/SIGINT set ``self.requested`` instead of killing the process.

    A second SIGINT restores the default behaviour (KeyboardInterrupt). Handlers are only installed
    in the main thread; elsewhere this is a flag that :meth:`request` can set.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.requested: Optional[int] = None
        self._old: Dict[int, Any] = {}

    def request(self, signum: int = signal.SIGTERM) -> None:
        self.requested = signum

    def _handler(self, signum, frame):
        if self.requested is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
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
        completed steps, 1-based).
      on_step: ``(step, state)`` after every completed step (for periodic sampling; it decides
        itself whether to act); it must not keep or donate ``state``.
      stop: a :class:`StopOnSignal` already entered by the caller; one is made if None.

    Raises:
      NonFiniteLossError: on the first non-finite loss; no checkpoint is written after it.
    """
    own_stop = stop is None
    stop = stop or StopOnSignal()
    if own_stop:
        stop.__enter__()
    try:
        step = int(jax.device_get(state.step))
        pending = None  # (step, device metrics) not yet checked

        def check(item):
            n, metrics = item
            host = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
            if not host.pop("finite", 1.0) or not np.isfinite(host["loss"]):
                raise NonFiniteLossError(
                    f"non-finite loss at step {n} (loss={host['loss']}, "
                    f"grad_norm={host.get('grad_norm')}); stopping. The last good checkpoint "
                    "is kept; lower the learning rate or check the data.")
            if on_metrics is not None:
                on_metrics(n, host)

        while step < num_steps and stop.requested is None:
            batch = shard_batch(next(batches), mesh)
            data_state = batches.state
            state, metrics = step_fn(state, batch)
            step += 1
            if pending is not None:
                check(pending)
            pending = (step, metrics)
            if checkpointer is not None and checkpointer.should_save(step):
                check(pending)  # never checkpoint a step whose loss was not checked
                pending = None
                checkpointer.save(step, state, data_state)
            if on_step is not None:
                on_step(step, state)
        if pending is not None:
            check(pending)
        if checkpointer is not None and step > 0:
            checkpointer.save(step, state, batches.state, force=True)
            checkpointer.wait()
        return state
    finally:
        if own_stop:
            stop.__exit__(None, None, None)
