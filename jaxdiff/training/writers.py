"""Metric writers: scalars per step to a JSON-lines file or to TensorBoard event files.

One small protocol, :class:`MetricWriter` (``write_scalars(step, scalars)``, ``flush()``,
``close()``), and three implementations:

- :class:`JsonlWriter`: one JSON object a line, ``{"step": 10, "loss": 0.25, ...}``; no
  dependency.
- :class:`TensorBoardWriter`: TensorBoard event files through the ``tensorboardX`` package, which
  needs only numpy and protobuf (neither PyTorch nor TensorFlow). Install it with
  ``pip install tensorboardX`` or ``pip install 'jaxdiff[tensorboard]'``; without it the
  constructor raises ``ImportError`` saying so.
- :class:`MultiWriter`: the same scalars to several writers.

Writers are host-side and not thread-safe. In a multi-process run create them on one process
(``jax.process_index() == 0``) only, or every process writes the same lines.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from jaxdiff.validation import check_array, check_int

__all__ = ["MetricWriter", "JsonlWriter", "TensorBoardWriter", "MultiWriter"]

_INSTALL = "pip install tensorboardX (or pip install 'jaxdiff[tensorboard]')"


@runtime_checkable
class MetricWriter(Protocol):
    """Writes scalar metrics against an integer step."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Records each ``name: value`` of ``scalars`` at ``step``."""

    def flush(self) -> None:
        """Pushes what was written so far to storage."""

    def close(self) -> None:
        """Flushes and releases the file; later writes raise ``ValueError``."""


def _scalars(step: Any, scalars: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
    """``(step, {name: float})``; ``ValueError`` naming the offending argument or key."""
    step = check_int("step", step, minimum=0)
    if not isinstance(scalars, Mapping):
        raise ValueError(f"scalars must be a mapping {{name: number}}, got {type(scalars)}")
    out = {}
    for name, value in scalars.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"scalars keys must be non-empty strings, got {name!r}")
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
                value, (bool, np.bool_)):
            out[name] = float(value)  # host numbers keep float64 (a wall-clock time has 10 digits)
            continue
        arr = check_array(f"scalars[{name!r}]", value)
        if arr.ndim != 0 and arr.size != 1:
            raise ValueError(f"scalars[{name!r}] must be a single number (0-d or one element), "
                             f"got shape {arr.shape}")
        out[name] = float(arr.reshape(()))
    return step, out


class JsonlWriter:
    """Appends ``{"step": step, name: value, ...}`` as one line of JSON per :meth:`write_scalars`.

    Args:
      path: the file; its parent directories are created; an existing file is appended to (a
        resumed run continues it). Non-finite values are written as ``NaN`` / ``Infinity``, which
        Python's ``json`` reads back.

    Raises:
      ValueError: from :meth:`write_scalars` for a negative or non-int ``step``, a non-string key
        or a value that is not a single number, and after :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        step, values = _scalars(step, scalars)
        if self._file is None:
            raise ValueError(f"JsonlWriter({self.path!r}) is closed")
        if "step" in values:
            raise ValueError("scalars must not have a key 'step' (it is the line's step)")
        self._file.write(json.dumps({"step": step, **values}) + "\n")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorBoardWriter:
    """Writes scalars as TensorBoard summaries (``simple_value``, tag = the key) to an event file
    ``events.out.tfevents.*`` under ``logdir``, with ``tensorboardX`` (no PyTorch/TensorFlow).

    Args:
      logdir: the directory, created if needed; point ``tensorboard --logdir`` at it or a parent.
      flush_secs: the background writer flushes at least this often (seconds, > 0).

    Raises:
      ImportError: ``tensorboardX`` is not installed; the message says how to install it.
      ValueError: ``flush_secs`` is not a positive int; from :meth:`write_scalars` as in
        :class:`JsonlWriter`, and after :meth:`close`.
    """

    def __init__(self, logdir: str | os.PathLike, *, flush_secs: int = 30):
        flush_secs = check_int("flush_secs", flush_secs, minimum=1)
        try:
            from tensorboardX import SummaryWriter
        except ModuleNotFoundError as e:
            if e.name != "tensorboardX":  # installed but broken: show the real error
                raise
            raise ImportError(
                f"TensorBoardWriter needs the tensorboardX package (it does not need PyTorch or "
                f"TensorFlow): {_INSTALL}. Or log to a JSON-lines file with JsonlWriter."
            ) from None
        self.logdir = os.fspath(logdir)
        self._writer = SummaryWriter(logdir=self.logdir, flush_secs=flush_secs)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        step, values = _scalars(step, scalars)
        if self._writer is None:
            raise ValueError(f"TensorBoardWriter({self.logdir!r}) is closed")
        for name, value in values.items():
            self._writer.add_scalar(name, value, global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "TensorBoardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MultiWriter:
    """Forwards every call to each of ``writers`` in order (e.g. a JSON-lines file and
    TensorBoard). ``close`` closes them all, even if one raises (the first error is re-raised)."""

    def __init__(self, writers: Sequence[MetricWriter]):
        writers = list(writers)
        for i, w in enumerate(writers):
            if not isinstance(w, MetricWriter):
                raise ValueError(f"writers[{i}] must be a MetricWriter (write_scalars, flush, "
                                 f"close), got {type(w).__name__}")
        self.writers = writers

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for w in self.writers:
            w.write_scalars(step, scalars)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        error = None
        for w in self.writers:
            try:
                w.close()
            except Exception as e:  # noqa: BLE001 - close the others, then re-raise
                error = error or e
        if error is not None:
            raise error

    def __enter__(self) -> "MultiWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
