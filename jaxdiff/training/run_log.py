"""What a training run tells its user and writes for later: :class:`RunLog` averages the step
metrics over ``every`` steps and writes each mean (with the throughput) to ``metrics.jsonl``, to
TensorBoard when asked, and to a progress display; :func:`truncate_jsonl` cuts a JSON-lines log
back to a resumed step.

A row is written at every multiple of ``every`` and at the run's last step (:meth:`RunLog.close`),
so a run shorter than ``every`` still shows its loss. A resumed run first truncates its logs to the
checkpoint's step: rows written after that step (a run killed before its next checkpoint) would
otherwise appear twice.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Mapping, Optional

import numpy as np

from jaxdiff.training.writers import JsonlWriter, MultiWriter, TensorBoardWriter

__all__ = ["RunLog", "truncate_jsonl", "METRICS_FILE", "TENSORBOARD_DIR"]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"


def truncate_jsonl(path: str, step: int) -> int:
    """Keeps the rows of the JSON-lines file ``path`` whose ``"step"`` is at most ``step``, in
    order; drops the later ones and any line that is not a JSON object with an int ``step`` (the
    half-written last line of a killed process). Rewritten atomically (a temporary file, then a
    rename). A missing file is left missing. Returns the number of rows dropped."""
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
                ok = isinstance(row, dict) and isinstance(row.get("step"), int)
            except ValueError:
                ok = False
            if ok and row["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
            elif line.strip():
                dropped += 1
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


class RunLog:
    """Averages the step metrics over ``every`` steps; writes each mean with ``steps_per_sec``,
    ``images_per_sec`` and the wall-clock ``time`` to ``WORKDIR/metrics.jsonl`` (and to
    TensorBoard events in ``WORKDIR/tb`` with ``tensorboard``), and shows a progress bar (tqdm,
    on stderr) with the latest loss and learning rate. :meth:`message` prints a line above it.

    Args:
      workdir: the run directory.
      every: steps per row (> 0).
      batch_size: the global batch, for ``images_per_sec``.
      start, total: the first and the last step of the run (the bar's range).
      enabled: False on processes other than the first: nothing is written or shown.
      tensorboard: also write TensorBoard events (needs ``tensorboardX``).
      progress: show the bar (messages are printed either way).
    """

    def __init__(self, workdir: str, *, every: int, batch_size: int, start: int, total: int,
                 enabled: bool = True, tensorboard: bool = False, progress: bool = True):
        self.every, self.batch_size, self.enabled = every, batch_size, enabled
        self.acc: list = []
        self.t0, self.last_step, self.step = time.perf_counter(), start, start
        self.last_row: Optional[Dict[str, float]] = None
        self.bar, self.writer = None, None
        if enabled:
            writers = [JsonlWriter(os.path.join(workdir, METRICS_FILE))]
            if tensorboard:
                writers.append(TensorBoardWriter(os.path.join(workdir, TENSORBOARD_DIR)))
            self.writer = MultiWriter(writers)
            if progress:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def message(self, text: str) -> None:
        """Prints ``text`` as a line on stdout (above the bar while it is shown)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        """Takes step ``step``'s host metrics; writes a row when ``step % every == 0``."""
        if not self.enabled:
            return
        self.acc.append(metrics)
        self.step = step
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
        if step % self.every == 0:
            self._write(step)

    def _write(self, step: int) -> None:
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.t0, 1e-9)
        row = {k: float(np.mean([a[k] for a in self.acc])) for k in self.acc[0]}
        row.update(steps_per_sec=rate, images_per_sec=rate * self.batch_size, time=time.time())
        self.acc, self.t0, self.last_step = [], now, step
        self.writer.write_scalars(step, row)
        self.writer.flush()   # readable while the run goes on
        self.last_row = dict(row, step=step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row.get('lr', 0):.1e}")

    def close(self) -> None:
        """Writes the row of the steps since the last row (at the latest step seen: the run's
        last step), then closes the bar and the files."""
        if self.enabled and self.acc:
            self._write(self.step)
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def describe(self, row: Optional[Mapping[str, Any]] = None) -> str:
        """``"loss 0.1234, lr 2.0e-04, 12.3 steps/s"`` of ``row`` (default: the last row)."""
        row = self.last_row if row is None else row
        if not row:
            return "no step logged"
        parts = [f"loss {row['loss']:.4f}"]
        if "lr" in row:
            parts.append(f"lr {row['lr']:.1e}")
        parts.append(f"{row['steps_per_sec']:.2f} steps/s")
        return ", ".join(parts)
