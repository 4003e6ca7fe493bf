"""Data-parallel train step over a ``jax.sharding.Mesh`` with a ``data`` axis, and optional
FSDP-style parameter sharding over a second ``fsdp`` axis.

The batch is sharded over ``data`` (``NamedSharding(mesh, P("data"))``), the train state replicated
(``P()``); ``jax.jit`` with explicit in/out shardings inserts the gradient all-reduce. The same code
runs on one CPU, 8 GPUs, or many hosts after ``jax.distributed.initialize()`` (each process feeds
its own slice of the global batch through :func:`shard_batch`).

For a model whose parameters and optimizer state do not fit one device, ``make_mesh(fsdp=k)``
adds a second axis ``fsdp`` of size ``k``: the batch is split over both axes (every device still
sees its own examples), and :func:`fsdp_sharding` splits each large leaf of the train state
(parameters, both Adam moments, EMA) over ``fsdp`` along its largest dimension divisible by ``k``;
``make_train_step(..., state_sharding=...)`` keeps it that way, and XLA inserts the all-gathers of
the parameters and the reduce-scatters of the gradients. It computes the same step as the
replicated state (``tests/test_training.py`` compares them on 8 simulated devices).

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jaxdiff.training import OptimizerConfig, create_train_state, make_optimizer
    >>> def loss_fn(params, batch, key):              # -> (loss [], aux dict)
    ...     return jnp.mean((params["w"] * batch["x"]) ** 2), {}
    >>> tx, _ = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0))
    >>> mesh = make_mesh()
    >>> state = replicate(create_train_state({"w": jnp.ones(3)}, tx, jax.random.key(0)), mesh)
    >>> step_fn = make_train_step(loss_fn, tx, mesh, ema_decay=0.999)
    >>> state, metrics = step_fn(state, shard_batch({"x": np.ones((8, 3), np.float32)}, mesh))
    >>> int(state.step), bool(metrics["finite"]), float(metrics["loss"])
    (1, True, 1.0)
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxdiff.compile_options import cpu_compiler_options
from jaxdiff.training.state import TrainState, ema_update

__all__ = ["DATA_AXIS", "FSDP_AXIS", "make_mesh", "replicated_sharding", "batch_sharding",
           "check_batch_divisible", "shard_batch", "replicate", "FSDP_MIN_SIZE", "fsdp_sharding",
           "place", "make_train_step"]

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
FSDP_MIN_SIZE = 2 ** 14   # leaves with fewer elements stay replicated (their gathers cost more)
LossFn = Callable[[Any, Dict[str, jax.Array], jax.Array], Tuple[jax.Array, Dict[str, jax.Array]]]


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


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    ema_decay: float,
    lr_schedule: Optional[optax.Schedule] = None,
    donate: bool = True,
    compiler_options: Optional[Dict[str, str]] = None,
    state_sharding: Any = None,
) -> Callable[[TrainState, Dict[str, jax.Array]], Tuple[TrainState, Dict[str, jax.Array]]]:
    """Builds the jitted ``(state, batch) -> (state, metrics)``.

    Args:
      loss_fn: ``(params, batch, key) -> (loss [], aux dict)``; the batch mean loss.
      tx: the optimizer.
      mesh: mesh with a ``data`` axis (and maybe ``fsdp``); the batch is sharded over it.
      ema_decay: maximum EMA decay (warm-up ``(1 + step) / (10 + step)``).
      lr_schedule: if given, ``metrics["lr"]`` reports it.
      donate: donate the input state's buffers (do not use ``state`` after the call).
      compiler_options: XLA options for ``jax.jit``; None means
        :func:`jaxdiff.cpu_compiler_options` (faster convolutions on the CPU, nothing elsewhere).
      state_sharding: the state's sharding in and out, a pytree of ``NamedSharding`` like the
        state (e.g. :func:`fsdp_sharding`; place the state with :func:`place`). None: replicated.

    The step's key is ``fold_in(state.key, state.step)``. If the loss or the gradient norm is not
    finite, the returned state is the input state unchanged and ``metrics["finite"]`` is False; the
    caller decides to stop (see :func:`jaxdiff.training.loop.train_loop`).

    Returns:
      ``step_fn(state, batch) -> (state, metrics)``; metrics: ``loss, grad_norm, finite, lr``
      (replicated scalars).
    """

    def step(state: TrainState, batch: Dict[str, jax.Array]):
        key = jax.random.fold_in(state.key, state.step)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, state.step, ema_decay)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            ema_params=ema)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite}
        if lr_schedule is not None:
            metrics["lr"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
        return new, metrics

    repl, data = replicated_sharding(mesh), batch_sharding(mesh)
    state_in = repl if state_sharding is None else state_sharding
    if compiler_options is None:
        compiler_options = cpu_compiler_options()
    return jax.jit(step, in_shardings=(state_in, data), out_shardings=(state_in, repl),
                   donate_argnums=(0,) if donate else (), compiler_options=compiler_options)
