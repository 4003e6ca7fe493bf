"""Devices, meshes and shardings: the one home for what training and inference both place.

A :class:`jax.sharding.Mesh` from :func:`make_mesh` has a ``data`` axis (the batch is split over
it) and, with ``fsdp=k > 1``, a second ``fsdp`` axis over which :func:`fsdp_sharding` splits each
large leaf of a pytree (parameters, Adam moments, EMA) along its largest dimension divisible by
``k``. Batches are placed with :func:`shard_batch` (each process passes its own rows), replicated
trees with :func:`replicate`, per-leaf shardings with :func:`place`; both go through host numpy
and ``jax.make_array_from_callback``, so they work when the mesh spans several processes (after
``jax.distributed.initialize()``). The same code runs on one CPU, 8 GPUs or a TPU pod slice.

Used by :mod:`jaxdiff.training` (the train step's shardings) and :mod:`jaxdiff.pipelines` (the
Stable Diffusion batch); neither imports the other.

    >>> import numpy as np
    >>> mesh = make_mesh()
    >>> mesh.axis_names
    ('data',)
    >>> batch = shard_batch({"x": np.ones((2 * mesh.devices.size, 3), np.float32)}, mesh)
    >>> batch["x"].sharding.spec
    P('data',)
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

__all__ = ["DATA_AXIS", "FSDP_AXIS", "FSDP_MIN_SIZE", "make_mesh", "replicated_sharding",
           "batch_sharding", "check_batch_divisible", "shard_batch", "replicate", "fsdp_sharding",
           "place"]

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
FSDP_MIN_SIZE = 2 ** 14   # leaves with fewer elements stay replicated (their gathers cost more)


def make_mesh(devices: Optional[Sequence[jax.Device]] = None, *, fsdp: int = 1) -> Mesh:
    """A mesh over ``devices`` (default: all devices of all processes).

    Args:
      devices: the devices; default ``jax.devices()``.
      fsdp: size of the parameter-sharding axis. 1 (default): a 1-D mesh named ``data``;
        ``k > 1``: a 2-D mesh ``("data", "fsdp")`` of shape ``(n // k, k)``.

    Built by ``jax.make_mesh`` (which orders the devices for the interconnect, e.g. a ring on TPU;
    the ``fsdp`` axis is the inner, fastest one) with ``Auto`` axes: shardings are given
    explicitly to ``jit``, not carried by the types.

    Raises:
      ValueError: ``fsdp`` is not a positive divisor of the number of devices.
    """
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    if isinstance(fsdp, bool) or not isinstance(fsdp, (int, np.integer)) or fsdp < 1 or n % fsdp:
        raise ValueError(f"fsdp must be a positive divisor of the number of devices {n}, "
                         f"got {fsdp!r}")
    if fsdp == 1:
        return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)
    return jax.make_mesh((n // fsdp, int(fsdp)), (DATA_AXIS, FSDP_AXIS),
                         axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``data`` (and ``fsdp``, when the mesh has it: every
    device gets its own rows); the other dimensions whole."""
    if FSDP_AXIS in mesh.axis_names:
        return NamedSharding(mesh, P((DATA_AXIS, FSDP_AXIS)))
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> None:
    """ValueError unless ``global_batch_size`` is a positive multiple of the mesh's device count."""
    n = mesh.devices.size
    if global_batch_size <= 0 or global_batch_size % n:
        raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of "
                         f"the number of devices {n} (batch is sharded over the "
                         f"'{DATA_AXIS}' axis)")


def shard_batch(batch: Dict[str, np.ndarray], mesh: Mesh) -> Dict[str, jax.Array]:
    """Host-local numpy batch ``{k: [b, ...]}`` -> global arrays ``[b * process_count, ...]``.

    Each process passes its own slice; the result is sharded over ``data``.
    """
    sharding = batch_sharding(mesh)
    local = len(mesh.local_devices)
    out = {}
    for k, v in batch.items():
        if v.shape[0] % local:
            raise ValueError(f"batch['{k}'] has {v.shape[0]} rows on this process, not divisible "
                             f"by its {local} local devices")
        out[k] = jax.make_array_from_process_local_data(sharding, np.asarray(v))
    return out


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of ``tree`` (same value on every process) replicated over ``mesh``.

    Goes through host numpy and ``jax.make_array_from_callback``, which also works when the mesh
    spans devices of other processes (multi-host).
    """
    sharding = replicated_sharding(mesh)

    def put(x):
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree)


def fsdp_sharding(tree: Any, mesh: Mesh, *, min_size: int = FSDP_MIN_SIZE) -> Any:
    """Per-leaf ``NamedSharding`` of a train state (or any pytree of arrays / ShapeDtypeStructs)
    for FSDP: a leaf with at least ``min_size`` elements is split over the mesh's ``fsdp`` axis
    along its largest dimension divisible by the axis size (the last such one on a tie); every
    other leaf, and every leaf when the mesh has no ``fsdp`` axis, is replicated.

    The rule depends on shapes only, so a parameter, its Adam moments and its EMA copy are split
    alike.

    Args:
      tree: the pytree (leaves need ``.shape``).
      mesh: from :func:`make_mesh`.
      min_size: smallest leaf (in elements) to split; >= 0.

    Returns:
      A pytree of the same structure with a ``NamedSharding`` per leaf.

    Raises:
      ValueError: ``min_size`` is negative.
    """
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    k = dict(zip(mesh.axis_names, mesh.devices.shape)).get(FSDP_AXIS, 1)
    repl = replicated_sharding(mesh)

    def rule(x):
        shape = tuple(np.shape(x))
        if k == 1 or int(np.prod(shape, dtype=np.int64)) < max(min_size, 1):
            return repl
        dims = [d for d in range(len(shape)) if shape[d] % k == 0]
        if not dims:
            return repl
        best = max(dims, key=lambda d: (shape[d], d))
        spec = [None] * len(shape)
        spec[best] = FSDP_AXIS
        return NamedSharding(mesh, P(*spec))

    return jax.tree.map(rule, tree)


def place(tree: Any, shardings: Any) -> Any:
    """Places every leaf of ``tree`` (the same value on every process) with its sharding from
    ``shardings`` (a pytree of ``NamedSharding`` of the same structure, e.g. from
    :func:`fsdp_sharding`); like :func:`replicate`, through host numpy and
    ``jax.make_array_from_callback``, so it works on meshes that span several processes."""

    def put(x, sharding):
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree, shardings)
