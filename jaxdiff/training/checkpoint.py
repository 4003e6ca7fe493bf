"""Orbax checkpoints of the train state, the data position and the run's config.

Each checkpoint step directory holds three items written by one ``ocp.CheckpointManager``:

- ``state``: the :class:`~jaxdiff.training.state.TrainState` (``StandardSave``),
- ``data``: the data iterator's position, a JSON object (its ``state``, e.g. ``{"epoch",
  "index"}`` of :class:`jaxdiff.data.BatchIterator`),
- ``meta``: ``{"config": <the compatibility-relevant config>, "shapes": {param path: shape},
  "opt_state": <str of the optimizer state's tree structure>, "hyperparams": <values that may
  change on resume>}``.

Orbax writes each step to a temporary directory and renames it when complete (atomic on POSIX), so a
crash mid-save leaves the previous checkpoint intact and the half-written one is ignored.

Damaged step directories are told apart in two kinds:

- *incomplete*: a step directory that lacks one of the three items (``state/``, ``data/``,
  ``meta/``) or has one of them empty, e.g. an empty ``900/`` left by an interrupted copy or by a
  save on a filesystem without atomic renames. It holds no checkpoint that could be restored, so
  :meth:`Checkpointer.restore_latest` skips it with a ``UserWarning`` naming it and resumes from the
  latest complete step. A writer (not ``read_only``) also renames it to ``<step>.incomplete`` (Orbax
  ignores that name), so that later saves, ``max_to_keep`` and :meth:`Checkpointer.latest_step` do
  not count it; nothing is deleted.
- *corrupt*: all three items are there but reading them fails (a truncated or overwritten array
  file, a damaged JSON file). Restoring it raises :class:`CheckpointError` naming the step
  directory, instead of falling back silently to an older step (which would throw away training
  without anyone noticing). Move or delete that directory to resume from the step before it.

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
import warnings
from typing import Any, Dict, Optional, Tuple

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "abstract_target", "param_shapes", "tree_structure",
           "IncompatibleCheckpointError", "CheckpointError"]

_log = logging.getLogger(__name__)


_ITEMS = ("state", "data", "meta")


class IncompatibleCheckpointError(ValueError):
    """The checkpoint in the workdir was written by a run with a different model/config."""


class CheckpointError(ValueError):
    """A checkpoint step directory that has all its items but cannot be read (corrupt or
    truncated files). The message names the step directory and what to do about it."""


def _short(e: BaseException, limit: int = 600) -> str:
    """``Type: first line of the message``, at most ``limit`` characters."""
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[:limit] + "..."


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


def abstract_target(target_state: Any, shardings: Any = None) -> Any:
    """``target_state`` as a pytree of ``jax.ShapeDtypeStruct(shape, dtype, sharding)``: a
    restore target for :meth:`Checkpointer.restore_latest`.

    Args:
      target_state: a pytree whose leaves have ``shape`` and ``dtype`` (``jax.Array``,
        ``jax.ShapeDtypeStruct``, e.g. from ``jax.eval_shape``).
      shardings: None: each leaf's own ``sharding`` (a ``jax.Array``'s placement, a
        ``ShapeDtypeStruct``'s ``sharding=``); or a pytree of ``jax.sharding.Sharding`` of the
        same structure (e.g. :func:`jaxdiff.sharding.fsdp_sharding` of ``target_state``) that
        replaces them.

    Raises:
      ValueError: a leaf has no ``jax.sharding.Sharding`` (a numpy array, a ShapeDtypeStruct
        without ``sharding=``: Orbax would fall back to the sharding stored in the checkpoint,
        which names the writer's devices), its sharding does not divide its shape, or
        ``shardings`` has another structure; the message names the leaf's path.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(target_state)
    if shardings is None:
        given = [getattr(x, "sharding", None) for _, x in flat]
    else:
        given = jax.tree_util.tree_leaves(
            shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
        if jax.tree_util.tree_structure(
                shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)) != treedef:
            raise ValueError("shardings must have the structure of target_state: "
                             f"{jax.tree_util.tree_structure(shardings)} vs {treedef}")
    out = []
    for (path, x), sharding in zip(flat, given):
        where = jax.tree_util.keystr(path) or "(the root)"
        if not isinstance(sharding, jax.sharding.Sharding):
            raise ValueError(
                f"target_state leaf {where} ({type(x).__name__}) has no sharding: give "
                "jax.Arrays or jax.ShapeDtypeStruct(shape, dtype, sharding=...) leaves, or "
                "shardings=")
        try:
            sharding.shard_shape(tuple(x.shape))
        except ValueError as e:
            raise ValueError(f"target_state leaf {where}: its sharding {sharding} does not fit "
                             f"its shape {tuple(x.shape)} ({_short(e, 200)})") from None
        out.append(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding))
    return jax.tree_util.tree_unflatten(treedef, out)


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
        self._barriers = 0
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=not read_only,
            enable_async_checkpointing=async_save and not read_only,
            cleanup_tmp_directories=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def step_dir(self, step: int) -> str:
        """The directory of checkpoint ``step``."""
        return os.path.join(self.directory, str(step))

    def missing_items(self, step: int) -> list:
        """The items (``"state"``, ``"data"``, ``"meta"``) that step directory ``step`` lacks or
        holds empty; ``[]`` for a complete-looking step (see the module docstring)."""
        out = []
        for item in _ITEMS:
            path = os.path.join(self.step_dir(step), item)
            try:
                if not os.listdir(path):
                    out.append(item)
            except OSError:  # missing, or not a directory
                out.append(item)
        return out

    def latest_step(self) -> Optional[int]:
        """The latest step whose directory is complete-looking (incomplete ones are not counted;
        a corrupt one is), or None."""
        for step in reversed(self.all_steps()):
            if not self.missing_items(step):
                return step
        return None

    def all_steps(self):
        return list(self.manager.all_steps())

    def should_save(self, step: int) -> bool:
        return step % self.save_interval_steps == 0

    def save(self, step: int, state: Any, data_state: Dict[str, Any], *,
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

    def _corrupt(self, step: int, problem: str) -> CheckpointError:
        """The error for step ``step``: ``problem``, then what to do about it."""
        where = self.step_dir(step)
        others = [s for s in self.all_steps() if s < step and not self.missing_items(s)]
        previous = (f"resume from the previous checkpoint (step {others[-1]})" if others
                    else "start again (there is no earlier checkpoint)")
        return CheckpointError(f"checkpoint {where} {problem}. Move or delete {where} to "
                               f"{previous}, or restore that directory from a backup.")

    def _restore(self, step: int, **items: Any) -> Any:
        """``manager.restore`` of ``items`` at ``step``; any failure to read them is one
        :class:`CheckpointError` naming the step directory (not Orbax's traceback)."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - Orbax/tensorstore raise many types
            raise self._corrupt(step, "could not be read, so it is probably corrupt or "
                                f"truncated: reading {'/'.join(items)} failed ({_short(e)})"
                                ) from None

    def check_compatible(self, step: int, target_state: Any) -> None:
        """IncompatibleCheckpointError unless checkpoint ``step`` matches config, parameter shapes
        and optimizer-state structure; logs a warning for changed ``hyperparams``.

        Raises:
          CheckpointError: ``meta`` cannot be read, or is not a JSON object.
        """
        where = self.step_dir(step)
        meta = self._restore(step, meta=ocp.args.JsonRestore())["meta"]
        if not isinstance(meta, dict):
            raise self._corrupt(step, f"is corrupt: its meta holds a {type(meta).__name__}, "
                                "expected a JSON object")
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

    def _skip_incomplete(self) -> None:
        """Warns about each incomplete step directory; a writer renames it to
        ``<step>.incomplete`` (process 0 renames, every process then re-reads the steps)."""
        if not self.read_only:
            self.manager.wait_until_finished()  # a save in flight has no step directory yet
        incomplete = [(s, self.missing_items(s)) for s in self.all_steps()]
        incomplete = [(s, m) for s, m in incomplete if m]
        for step, missing in incomplete:
            where = self.step_dir(step)
            msg = (f"checkpoint {where} is incomplete (no {', '.join(missing)}; an interrupted "
                   "save or copy): skipped, resuming from the latest complete step")
            if not self.read_only and jax.process_index() == 0:
                dest, n = f"{where}.incomplete", 1
                while os.path.exists(dest):
                    dest, n = f"{where}.incomplete-{n}", n + 1
                os.rename(where, dest)
                msg += f"; moved it to {dest} (delete that once you have checked it)"
            warnings.warn(msg, UserWarning, stacklevel=3)
        if not self.read_only:
            if jax.process_count() > 1:
                # Orbax barrier names must be unique per wait: count the calls (every process
                # calls restore_latest the same number of times).
                self._barriers += 1
                ocp.multihost.sync_global_processes(
                    f"jaxdiff_skip_incomplete:{self.directory}:{self._barriers}")
            if incomplete or jax.process_count() > 1:
                self.manager.reload()

    def restore_latest(self, target_state: Any) -> Optional[Tuple[Any, Dict[str, int], int]]:
        """Restores the latest checkpoint into the structure and shardings of ``target_state``
        (``jax.Array`` leaves, or ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)``, e.g. from
        ``jax.eval_shape``; see :func:`abstract_target`).

        Every leaf is read straight into its target sharding: each device reads only its own
        shard of the stored array (Orbax's ``StandardRestore`` of the abstract tree, i.e.
        ``ArrayRestoreArgs(sharding=...)`` per leaf). A train state split over an ``fsdp`` mesh
        axis (:func:`jaxdiff.sharding.fsdp_sharding`) is therefore never whole on one device,
        and the checkpoint may have been written with another sharding (e.g. replicated, or
        another ``fsdp`` size: Orbax reads the stored array's slices that each shard needs).

        Incomplete step directories (missing or empty ``state``/``data``/``meta``) are skipped
        with a ``UserWarning`` naming them; a writer moves them to ``<step>.incomplete``. A
        corrupt latest step is never skipped: see Raises.

        Returns ``(state, data_state, step)``, or None if there is no complete checkpoint.

        Raises:
          CheckpointError: the latest complete-looking step directory cannot be read (a truncated
            or corrupt file); the message names it and says to move or delete it to resume from
            the step before.
          IncompatibleCheckpointError: it was written by a run with a different config, parameter
            shapes or optimizer-state structure.
          ValueError: a leaf of ``target_state`` has no sharding, or one that does not fit its
            shape (checked after the compatibility, before any array is read).
        """
        self._skip_incomplete()
        step = self.latest_step()
        if step is None:
            return None
        self.check_compatible(step, target_state)
        abstract = abstract_target(target_state)
        out = self._restore(step, state=ocp.args.StandardRestore(abstract),
                            data=ocp.args.JsonRestore())
        data = out["data"]
        if not isinstance(data, dict):
            raise self._corrupt(step, f"is corrupt: its data holds {data!r:.200}, expected a "
                                "JSON object (the data position, e.g. {'epoch': int, 'index': "
                                "int})")
        return out["state"], dict(data), step

    def wait(self) -> None:
        """Blocks until any asynchronous save has been committed (renamed into place)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
