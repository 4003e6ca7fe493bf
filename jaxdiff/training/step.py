"""Data-parallel train step over a ``jax.sharding.Mesh`` with a ``data`` axis.

The batch is sharded over ``data`` (``NamedSharding(mesh, P("data"))``), the train state replicated
(``P()``); ``jax.jit`` with explicit in/out shardings inserts the gradient all-reduce. The same code
runs on one CPU, 8 GPUs, or many hosts after ``jax.distributed.initialize()`` (each process feeds
its own slice of the global batch through :func:`shard_batch`).

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

__all__ = ["DATA_AXIS", "make_mesh", "replicated_sharding", "batch_sharding",
           "check_batch_divisible", "shard_batch", "replicate", "make_train_step"]

DATA_AXIS = "data"
LossFn = Callable[[Any, Dict[str, jax.Array], jax.Array], Tuple[jax.Array, Dict[str, jax.Array]]]


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes) named ``data``.

    Built by ``jax.make_mesh`` (which orders the devices for the interconnect, e.g. a ring on TPU)
    with an ``Auto`` axis: shardings are given explicitly to ``jit``, not carried by the types.
    """
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                         devices=devices)


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``data``; the other dimensions whole."""
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


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    ema_decay: float,
    lr_schedule: Optional[optax.Schedule] = None,
    donate: bool = True,
    compiler_options: Optional[Dict[str, str]] = None,
) -> Callable[[TrainState, Dict[str, jax.Array]], Tuple[TrainState, Dict[str, jax.Array]]]:
    """Builds the jitted ``(state, batch) -> (state, metrics)``.

    Args:
      loss_fn: ``(params, batch, key) -> (loss [], aux dict)``; the batch mean loss.
      tx: the optimizer.
      mesh: mesh with a ``data`` axis; the state is replicated, the batch sharded.
      ema_decay: maximum EMA decay (warm-up ``(1 + step) / (10 + step)``).
      lr_schedule: if given, ``metrics["lr"]`` reports it.
      donate: donate the input state's buffers (do not use ``state`` after the call).
      compiler_options: XLA options for ``jax.jit``; None means
        :func:`jaxdiff.cpu_compiler_options` (faster convolutions on the CPU, nothing elsewhere).

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
    if compiler_options is None:
        compiler_options = cpu_compiler_options()
    return jax.jit(step, in_shardings=(repl, data), out_shardings=(repl, repl),
                   donate_argnums=(0,) if donate else (), compiler_options=compiler_options)
