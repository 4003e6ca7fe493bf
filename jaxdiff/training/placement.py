"""Where a train state lives on a mesh: built fresh or as shapes (a restore target), resumed from
the latest checkpoint or started, and gathered whole for the samplers and evaluations.

On a mesh with only a ``data`` axis the state is replicated. On a mesh with an ``fsdp`` axis
(:func:`jaxdiff.sharding.make_mesh` with ``fsdp > 1``) its large leaves are split over that axis
(:func:`state_sharding`, i.e. :func:`jaxdiff.sharding.fsdp_sharding`), and a resume reads each leaf
straight into its shards: the state is never whole on one device.

    >>> import jax, jax.numpy as jnp
    >>> from jaxdiff.sharding import make_mesh
    >>> from jaxdiff.training import OptimizerConfig, make_optimizer
    >>> tx, _ = make_optimizer(OptimizerConfig(warmup_steps=0))
    >>> mesh = make_mesh()
    >>> shapes = abstract_train_state({"w": jax.ShapeDtypeStruct((3,), jnp.float32)}, tx,
    ...                               jax.random.key(0), mesh)
    >>> shapes.params["w"].shape, state_sharding(shapes, mesh) is None
    ((3,), True)
"""

from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import optax

from jaxdiff.sharding import (FSDP_AXIS, fsdp_sharding, place, replicate,
                              replicated_sharding)
from jaxdiff.training.checkpoint import Checkpointer, abstract_target
from jaxdiff.training.state import TrainState, create_train_state

__all__ = ["new_train_state", "abstract_train_state", "state_sharding", "gather_replicated",
           "place_frozen", "Start", "restore_or_init"]


def new_train_state(params: Any, tx: optax.GradientTransformation, key: jax.Array,
                    mesh: jax.sharding.Mesh) -> TrainState:
    """A fresh :class:`~jaxdiff.training.TrainState` (step 0, EMA = ``params``, ``tx``'s state)
    of ``params`` (host or device arrays, the same on every process), replicated over ``mesh``."""
    return replicate(create_train_state(params, tx, key), mesh)


def abstract_train_state(param_shapes: Any, tx: optax.GradientTransformation, key: jax.Array,
                         mesh: jax.sharding.Mesh) -> TrainState:
    """What :func:`new_train_state` would give, as ``jax.ShapeDtypeStruct`` leaves with replicated
    shardings over ``mesh``: a restore target; nothing is computed.

    Args:
      param_shapes: the params' pytree of ``jax.ShapeDtypeStruct`` (or arrays).
      tx, key, mesh: as :func:`new_train_state`.
    """
    shapes = jax.eval_shape(lambda p: create_train_state(p, tx, key), param_shapes)
    repl = replicated_sharding(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), shapes)


def state_sharding(target: Any, mesh: jax.sharding.Mesh) -> Optional[Any]:
    """The train state's sharding on ``mesh``: None (replicated) on a ``("data",)`` mesh; on a
    mesh with an ``fsdp`` axis, :func:`jaxdiff.sharding.fsdp_sharding` of ``target`` (a state or
    its shapes)."""
    if FSDP_AXIS not in mesh.axis_names:
        return None
    return fsdp_sharding(target, mesh)


def gather_replicated(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """``tree`` replicated over ``mesh`` (e.g. the EMA params for a sampler, which takes
    replicated params); unchanged on a mesh without an ``fsdp`` axis (replicated already)."""
    if FSDP_AXIS not in mesh.axis_names:
        return tree
    return jax.device_put(tree, replicated_sharding(mesh))


def place_frozen(frozen: Any, mesh: jax.sharding.Mesh) -> Any:
    """A task's frozen arrays (:class:`~jaxdiff.training.TrainTask`'s ``frozen``) placed for
    ``mesh``: replicated, or on a mesh with an ``fsdp`` axis split like the state
    (:func:`~jaxdiff.sharding.fsdp_sharding`: each large leaf along its largest dimension
    divisible by the axis); a leaf already placed that way is used as it is (no copy). None stays
    None."""
    if frozen is None:
        return None
    if FSDP_AXIS in mesh.axis_names:
        shardings = fsdp_sharding(frozen, mesh)
    else:
        shardings = jax.tree.map(lambda _: replicated_sharding(mesh), frozen)

    def put(x, sharding):  # an array already placed so is kept, not copied (a large base model)
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        return place(x, sharding)

    return jax.tree.map(put, frozen, shardings)


class Start(NamedTuple):
    """Where a run starts (:func:`restore_or_init`)."""
    state: TrainState             # placed: replicated, or split when ``sharding`` is not None
    data_state: Optional[Dict[str, Any]]   # the data position; None when fresh
    sharding: Optional[Any]       # the state's sharding (None: replicated), for the train step
    resumed_step: Optional[int]   # the checkpoint's step; None when fresh


def restore_or_init(checkpointer: Checkpointer, mesh: jax.sharding.Mesh,
                    init_state: Callable[[bool], TrainState]) -> Start:
    """Resumes the latest checkpoint of ``checkpointer`` or starts fresh, with the state placed for
    ``mesh``.

    On a mesh with an ``fsdp`` axis the restore target carries the split shardings of
    :func:`state_sharding`, so each leaf is read straight into its shards
    (:meth:`Checkpointer.restore_latest`); a fresh state is built replicated, then split.

    Args:
      checkpointer: the run's checkpointer (its compatibility check applies).
      mesh: the mesh of the run.
      init_state: ``init_state(abstract)``: the replicated fresh state (:func:`new_train_state`),
        or with ``abstract=True`` its shapes (:func:`abstract_train_state`).

    Raises:
      jaxdiff.training.IncompatibleCheckpointError, jaxdiff.training.CheckpointError: from the
        restore.
    """
    target = init_state(True)
    sharding = state_sharding(target, mesh)
    if sharding is not None:
        target = abstract_target(target, sharding)
    restored = checkpointer.restore_latest(target)
    if restored is not None:
        state, data_state, step = restored
        return Start(state, dict(data_state), sharding, int(step))
    state = init_state(False)
    if sharding is not None:
        state = jax.device_put(state, sharding)
    return Start(state, None, sharding, None)
