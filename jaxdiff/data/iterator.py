"""Deterministic, resumable, prefetching batch iterator over in-memory arrays, and the protocol
that the training loop (:func:`jaxdiff.training.fit`) asks of any data source.

:class:`ResumableIterator` is that protocol: ``next(it)`` gives the next host batch (a dict of numpy
arrays, this process's share of the global batch) and ``it.state`` is the position of the batch
after the last one returned, a small JSON-able dict that goes into the checkpoint. A data source is
then a ``from_state(state) -> ResumableIterator`` function (``state`` None: the beginning) that
continues with exactly the batch ``state`` names; the loop calls it once per run (fresh or resumed).
An image-folder dataset with captions fits it as the in-memory arrays do.

Batch ``i`` of epoch ``e`` is a pure function of ``(seed, e, i)``: the epoch's permutation is
``np.random.default_rng([seed, e]).permutation(N)`` and the global batch is its slice
``[i * G, (i + 1) * G)`` (the remainder of an epoch is dropped). Each process of a multi-host job
takes its contiguous ``G / process_count`` share of that global batch, so all hosts agree on the
global batch without communicating.

The position is a small JSON-able dict ``{"epoch": e, "index": i}`` naming the *next* batch; it goes
into the checkpoint, and :func:`BatchIterator.from_state` continues with exactly that batch.
(A ``grain`` pipeline was measured against this iterator, ``benchmarks/bench_data.py`` and its
stored output: both resume exactly; grain's per-record pipeline is far slower on in-memory arrays
and grain's whole-batch form is this iterator again, so jaxdiff keeps it and needs no grain.)

:class:`Prefetcher` wraps an iterator with a background thread and a small queue so that the
device never waits on numpy; its ``state`` is the position after the last batch *consumed*, not the
last one produced, so checkpoints stay exact while the thread runs ahead.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Dict, Iterator, Optional, Protocol, runtime_checkable

import numpy as np

__all__ = ["ResumableIterator", "DataSource", "BatchIterator", "Prefetcher"]

Batch = Dict[str, np.ndarray]


@runtime_checkable
class ResumableIterator(Protocol):
    """An endless iterator of host batches whose position can be saved and restored.

    ``next(it)`` returns this process's share of the next global batch, ``{name: [b, ...]}``
    numpy arrays (``b = global batch / process count``); ``state`` is the position after the
    last batch returned, a JSON-able dict (the checkpoint's ``data`` item) that the source's
    ``from_state`` accepts. :class:`BatchIterator` and :class:`Prefetcher` are ones.
    """

    def __next__(self) -> Batch:
        ...

    @property
    def state(self) -> Dict[str, Any]:
        ...


# ``from_state(state)``: an iterator at ``state`` (a ``ResumableIterator.state``; None = the
# beginning). What :func:`jaxdiff.training.fit` takes as a task's data.
DataSource = Callable[[Optional[Dict[str, Any]]], ResumableIterator]


class BatchIterator:
    """Iterates ``{"image": [b, ...], "label": [b]}`` host batches, ``b = G / process_count``.

    Args:
      arrays: dict of arrays sharing the leading dimension ``N``.
      global_batch_size: ``G``, the batch over all processes and devices.
      seed: shuffling seed.
      process_index: this host's slot (default: ``jax.process_index()``).
      process_count: the number of hosts (default: ``jax.process_count()``).
      epoch: the starting epoch (see :meth:`from_state`).
      index: the starting batch within ``epoch``, in ``[0, batches_per_epoch)``.
      shuffle: if False, the order is ``0..N-1`` in every epoch.
    """

    def __init__(self, arrays: Batch, global_batch_size: int, seed: int, *,
                 process_index: Optional[int] = None, process_count: Optional[int] = None,
                 epoch: int = 0, index: int = 0, shuffle: bool = True):
        if process_index is None or process_count is None:
            import jax
            process_index, process_count = jax.process_index(), jax.process_count()
        sizes = {k: len(v) for k, v in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"arrays must share their leading dimension, got {sizes}")
        self.num_examples = next(iter(sizes.values()))
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        if global_batch_size % process_count:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                             f"process count {process_count}")
        if global_batch_size > self.num_examples:
            raise ValueError(f"global batch size {global_batch_size} exceeds the dataset size "
                             f"{self.num_examples}")
        self.arrays = arrays
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index = process_index
        self.seed = int(seed)
        self.shuffle = shuffle
        self.batches_per_epoch = self.num_examples // global_batch_size
        self.epoch, self.index = int(epoch), int(index)
        if not 0 <= self.index < self.batches_per_epoch:
            raise ValueError(f"index {index} outside 0..{self.batches_per_epoch - 1}")
        self._perm_epoch, self._perm = None, None

    @classmethod
    def from_state(cls, arrays: Batch, global_batch_size: int, seed: int,
                   state: Optional[Dict[str, int]], **kw) -> "BatchIterator":
        """An iterator positioned at ``state = {"epoch", "index"}`` (from :attr:`state`); None:
        the beginning (epoch 0, batch 0).

        Raises:
          ValueError: ``state`` is not such a dict, or its index is outside the epoch.
        """
        if state is None:
            return cls(arrays, global_batch_size, seed, **kw)
        if not (isinstance(state, dict) and all(
                isinstance(state.get(k), int) and not isinstance(state.get(k), bool)
                for k in ("epoch", "index"))):
            raise ValueError(f"state must be {{'epoch': int, 'index': int}} (a BatchIterator's "
                             f"state), got {state!r:.200}")
        return cls(arrays, global_batch_size, seed, epoch=state["epoch"], index=state["index"],
                   **kw)

    @classmethod
    def source(cls, arrays: Batch, global_batch_size: int, seed: int, **kw) -> DataSource:
        """``from_state(state)`` over ``arrays``: a :data:`DataSource` for
        :func:`jaxdiff.training.fit` (``kw``: as the constructor's, e.g. ``shuffle``)."""
        return lambda state: cls.from_state(arrays, global_batch_size, seed, state, **kw)

    @property
    def state(self) -> Dict[str, int]:
        """Position of the next batch: ``{"epoch": int, "index": int}``."""
        return {"epoch": self.epoch, "index": self.index}

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            if self.shuffle:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(
                    self.num_examples)
            else:
                self._perm = np.arange(self.num_examples)
            self._perm_epoch = epoch
        return self._perm

    def batch_at(self, epoch: int, index: int) -> Batch:
        """This process's share of global batch ``index`` of ``epoch`` (pure in its arguments)."""
        perm = self._permutation(epoch)
        start = index * self.global_batch_size + self.process_index * self.local_batch_size
        idx = np.sort(perm[start:start + self.local_batch_size])  # sorted: a faster gather
        return {k: v[idx] for k, v in self.arrays.items()}

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = self.batch_at(self.epoch, self.index)
        self.index += 1
        if self.index == self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return batch


class Prefetcher:
    """Runs ``iterator`` in a daemon thread, ``buffer_size`` batches ahead.

    ``state`` is the wrapped iterator's position after the last batch returned by ``__next__``.
    An exception in the thread is re-raised in the consumer, and again on every later ``next``
    (as is ``StopIteration`` once the iterator is exhausted); ``next`` after :meth:`close` raises
    ``StopIteration``. Call :meth:`close` (or use ``with``) to stop the thread.
    """

    _DONE = object()

    def __init__(self, iterator: ResumableIterator, buffer_size: int = 2):
        self._it = iterator
        self._state = dict(iterator.state)
        self._queue: "queue.Queue" = queue.Queue(maxsize=max(1, buffer_size))
        self._stop = threading.Event()
        self._final: Optional[object] = None  # _DONE or the worker's exception, once seen
        self._thread = threading.Thread(target=self._run, daemon=True, name="jaxdiff-prefetch")
        self._thread.start()

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self):
        try:
            while not self._stop.is_set():
                batch = next(self._it)
                self._put((batch, dict(self._it.state)))
        except StopIteration:
            self._put((self._DONE, None))
        except BaseException as e:  # surfaced in __next__
            self._put((e, None))

    @property
    def state(self) -> Dict[str, int]:
        return dict(self._state)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        while self._final is None:
            try:
                item, state = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._thread.is_alive() or not self._queue.empty():
                    continue
                self._final = self._DONE  # the thread is gone and will send nothing
                break
            if item is self._DONE or isinstance(item, BaseException):
                self._final = item
                break
            self._state = state
            return item
        if self._final is self._DONE:
            raise StopIteration
        raise self._final

    def _drain(self):
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    def close(self):
        self._stop.set()
        if self._final is None:
            self._final = self._DONE
        self._drain()  # unblocks a put, then the thread sees the stop flag
        self._thread.join(timeout=5)
        self._drain()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
