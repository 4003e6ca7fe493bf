"""Orbax checkpoints of the train state, the data position and the run's config.

Each checkpoint step directory holds three items written by one ``ocp.CheckpointManager``:

- ``state``: the :class:`~jaxdiff.training.state.TrainState` (``StandardSave``),
- ``data``: the data iterator position ``{"epoch", "index"}`` (JSON),
- ``meta``: ``{"config": <the compatibility-relevant config>, "shapes": {param path: shape},
  "opt_state": <str of the optimizer state's tree structure>, "hyperparams": <values that may
  change on resume>}``.

Orbax writes each step to a temporary directory and renames it when complete (atomic on POSIX), so a
crash mid-save leaves the previous checkpoint intact and the half-written one is ignored.

Before restoring, :meth:`Checkpointer.restore_latest` compares ``meta`` with the current run: a
different config, different parameter shapes or a different optimizer-state structure (e.g. gradient
clipping switched on or off) is a ``ValueError`` saying what differs, instead of a failure deep
inside Orbax. Changed ``hyperparams`` (e.g. more steps or another learning rate when extending a
run) are legitimate and only logged as a warning, ``old -> new``. Config keys that the checkpoint
does not have (written before they were compared) are logged and not compared.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "param_shapes", "tree_structure", "IncompatibleCheckpointError"]

_log = logging.getLogger(__name__)


class IncompatibleCheckpointError(ValueError):
    """The checkpoint in the workdir was written by a run with a different model/config."""


def param_shapes(tree: Any) -> Dict[str, list]:
    """``{"/"-joined key path: shape list}`` of a pytree of arrays (or ShapeDtypeStructs)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): list(x.shape)
            for path, x in flat}


def tree_structure(tree: Any) -> str:
    """The pytree structure of ``tree`` as a string (leaves: arrays or ShapeDtypeStructs)."""
    return str(jax.tree.structure(tree))


def _diff(a: Any, b: Any, prefix: str = "") -> list:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            p = f"{prefix}.{k}" if prefix else str(k)
            if k not in a or k not in b:
                out.append(f"{p}: {'missing' if k not in a else a[k]!r} (checkpoint) vs "
                           f"{'missing' if k not in b else b[k]!r} (now)")
            else:
                out.extend(_diff(a[k], b[k], p))
        return out
    if (list(a) if isinstance(a, tuple) else a) != (list(b) if isinstance(b, tuple) else b):
        return [f"{prefix}: {a!r} (checkpoint) vs {b!r} (now)"]
    return []


class Checkpointer:
    """A thin layer over ``ocp.CheckpointManager``: save every ``save_interval_steps``, keep the
    last ``max_to_keep``, and restore the latest after checking compatibility.

    Args:
      directory: where step directories go (created unless ``read_only``).
      config: JSON-able dict describing what must match to resume (model config, data shape...);
        None compares nothing but the shapes and the optimizer-state structure.
      max_to_keep: number of checkpoints kept.
      save_interval_steps: ``save(step, ...)`` without ``force`` only saves on multiples of this.
      async_save: write in a background thread (call :meth:`wait` / :meth:`close` before exit).
      hyperparams: JSON-able dict of values that may change on resume; changes are logged.
      read_only: for readers (sampling, evaluation): neither creates ``directory`` nor removes
        temporary directories (which may belong to a save in progress).
    """

    def __init__(self, directory: str, config: Optional[Dict[str, Any]], *, max_to_keep: int = 3,
                 save_interval_steps: int = 1000, async_save: bool = True,
                 hyperparams: Optional[Dict[str, Any]] = None, read_only: bool = False):
        if max_to_keep <= 0 or save_interval_steps <= 0:
            raise ValueError("max_to_keep and save_interval_steps must be positive")
        self.directory = os.path.abspath(directory)
        self.config = config
        self.hyperparams = hyperparams
        self.save_interval_steps = save_interval_steps
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=not read_only,
            enable_async_checkpointing=async_save and not read_only,
            cleanup_tmp_directories=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self):
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return step % self.save_interval_steps == 0

    def save(self, step: int, state: Any, data_state: Dict[str, int], *,
             force: bool = False) -> bool:
        """Saves ``state`` (a TrainState of jax Arrays) and ``data_state`` at ``step``.

        Returns True if a checkpoint was started. ``force`` saves regardless of the interval.
        Saving a step that already exists is a no-op.
        """
        if self.read_only:
            raise RuntimeError(f"Checkpointer({self.directory!r}) is read-only")
        if step in self.manager.all_steps():
            return False
        if not (force or self.should_save(step)):
            return False
        meta = {"config": self.config, "shapes": param_shapes(state.params),
                "opt_state": tree_structure(state.opt_state), "hyperparams": self.hyperparams}
        return self.manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(dict(data_state)),
            meta=ocp.args.JsonSave(meta)))

    def check_compatible(self, step: int, target_state: Any) -> None:
        """IncompatibleCheckpointError unless checkpoint ``step`` matches config, parameter shapes
        and optimizer-state structure; logs a warning for changed ``hyperparams``."""
        meta = self.manager.restore(step,
                                    args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        where = os.path.join(self.directory, str(step))
        if self.config is not None:
            old = dict(meta.get("config") or {})
            new = dict(self.config)
            unknown = sorted(set(new) - set(old), key=str)
            if unknown:
                _log.warning("checkpoint %s predates the compatibility check of %s; not compared",
                             where, ", ".join(map(str, unknown)))
            diffs = _diff(old, {k: v for k, v in new.items() if k in old})
            if diffs:
                raise IncompatibleCheckpointError(
                    f"checkpoint {where} was written with a different config; use a new --workdir "
                    "or the original config. Differences: " + "; ".join(diffs[:10]))
        diffs = _diff(meta.get("shapes"), param_shapes(target_state.params))
        if diffs:
            raise IncompatibleCheckpointError(
                f"checkpoint {where} has different parameter shapes: " + "; ".join(diffs[:10]))
        saved, now = meta.get("opt_state"), tree_structure(target_state.opt_state)
        if saved is not None and saved != now:
            i = next((i for i, (a, b) in enumerate(zip(saved, now)) if a != b),
                     min(len(saved), len(now)))
            lo = max(0, i - 60)
            raise IncompatibleCheckpointError(
                f"checkpoint {where} has a different optimizer-state structure (gradient clipping "
                "switched between on (grad_clip_norm > 0) and off, or another optimizer); use the "
                "original optimizer settings or a new --workdir. First difference, checkpoint: "
                f"...{saved[lo:i + 100]}... vs now: ...{now[lo:i + 100]}...")
        if meta.get("hyperparams") and self.hyperparams:
            changed = [f"{k}: {meta['hyperparams'][k]!r} -> {v!r}"
                       for k, v in self.hyperparams.items()
                       if k in meta["hyperparams"] and meta["hyperparams"][k] != v]
            if changed:
                _log.warning("resuming %s with changed settings: %s", where, "; ".join(changed))

    def restore_latest(self, target_state: Any) -> Optional[Tuple[Any, Dict[str, int], int]]:
        """Restores the latest checkpoint into the structure/sharding of ``target_state`` (arrays,
        or ``jax.ShapeDtypeStruct`` with shardings, e.g. from ``jax.eval_shape``).

        Returns ``(state, data_state, step)``, or None if there is no checkpoint.
        """
        step = self.manager.latest_step()
        if step is None:
            return None
        self.check_compatible(step, target_state)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target_state)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        return out["state"], dict(out["data"]), step

    def wait(self) -> None:
        """Blocks until any asynchronous save has been committed (renamed into place)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
