"""The train step: data-parallel over a ``jax.sharding.Mesh`` with a ``data`` axis, and optional
FSDP-style parameter sharding over a second ``fsdp`` axis (meshes and shardings:
:mod:`jaxdiff.sharding`).

The batch is sharded over ``data`` (``NamedSharding(mesh, P("data"))``), the train state replicated
(``P()``); ``jax.jit`` with explicit in/out shardings inserts the gradient all-reduce. The same code
runs on one CPU, 8 GPUs, or many hosts after ``jax.distributed.initialize()`` (each process feeds
its own slice of the global batch through :func:`~jaxdiff.sharding.shard_batch`).

For a model whose parameters and optimizer state do not fit one device, ``make_mesh(fsdp=k)``
adds a second axis ``fsdp`` of size ``k``: the batch is split over both axes (every device still
sees its own examples), and :func:`~jaxdiff.sharding.fsdp_sharding` splits each large leaf of the
train state (parameters, both Adam moments, EMA) over ``fsdp`` along its largest dimension
divisible by ``k``;
``make_train_step(..., state_sharding=...)`` keeps it that way, and XLA inserts the all-gathers of
the parameters and the reduce-scatters of the gradients. It computes the same step as the
replicated state (``tests/test_training.py`` compares them on 8 simulated devices).

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jaxdiff.sharding import make_mesh, replicate, shard_batch
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

from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxdiff.compile_options import cpu_compiler_options
from jaxdiff.sharding import batch_sharding, replicated_sharding
from jaxdiff.training.state import TrainState, ema_update

__all__ = ["make_train_step"]

LossFn = Callable[[Any, Dict[str, jax.Array], jax.Array], Tuple[jax.Array, Dict[str, jax.Array]]]


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
    frozen: Any = None,
    accumulate_steps: int = 1,
) -> Callable[[TrainState, Dict[str, jax.Array]], Tuple[TrainState, Dict[str, jax.Array]]]:
    """Builds the jitted ``(state, batch) -> (state, metrics)``.

    Args:
      loss_fn: ``(params, batch, key) -> (loss [], aux dict)`` (``(params, batch, key, frozen)``
        when ``frozen`` is given); the batch mean loss.
      tx: the optimizer.
      mesh: mesh with a ``data`` axis (and maybe ``fsdp``); the batch is sharded over it.
      ema_decay: maximum EMA decay (warm-up ``(1 + step) / (10 + step)``).
      lr_schedule: if given, ``metrics["lr"]`` reports it.
      donate: donate the input state's buffers (do not use ``state`` after the call).
      compiler_options: XLA options for ``jax.jit``; None means
        :func:`jaxdiff.cpu_compiler_options` (faster convolutions on the CPU, nothing elsewhere).
      state_sharding: the state's sharding in and out, a pytree of ``NamedSharding`` like the
        state (e.g. :func:`~jaxdiff.sharding.fsdp_sharding`; place the state with
        :func:`~jaxdiff.sharding.place`). None: replicated.
      frozen: None, or a pytree of placed device arrays that the loss reads but does not train
        (a frozen base model, a VAE, a text encoder): the loss is then called as
        ``loss_fn(params, batch, key, frozen)``. They enter the compiled step as an *argument*
        (with their own shardings, e.g. replicated or :func:`~jaxdiff.sharding.fsdp_sharding`),
        never as constants baked into the program, and are not donated.
      accumulate_steps: ``k >= 1``: the batch (first axis ``B``, a multiple of ``k`` times the
        mesh's data-parallel size) is split into ``k`` micro-batches of ``B / k`` (example ``j``
        goes to micro-batch ``j mod k``, so each device splits its own shard) that run one after
        the other in a ``lax.scan`` (the activations of one micro-batch at a time); their
        gradients and losses are averaged, then ONE optimizer update is made. For a loss that is
        a batch mean this is the gradient of the whole batch (micro-batch ``i`` gets the key
        ``fold_in(key, i)`` instead of ``key``). ``state.step`` counts optimizer updates.

    The step's key is ``fold_in(state.key, state.step)``. If the loss or the gradient norm is not
    finite, the returned state is the input state unchanged and ``metrics["finite"]`` is False; the
    caller decides to stop (see :func:`jaxdiff.training.loop.train_loop`).

    Returns:
      ``step_fn(state, batch) -> (state, metrics)``; metrics: ``loss, grad_norm, finite, lr``
      (replicated scalars).
    """

    if isinstance(accumulate_steps, bool) or not isinstance(accumulate_steps, int) \
            or accumulate_steps < 1:
        raise ValueError(f"accumulate_steps must be an int >= 1, got {accumulate_steps!r}")
    k = accumulate_steps

    def loss_and_grads(params, batch, key, frozen_args):
        args = () if frozen is None else (frozen_args,)
        grad_fn = jax.value_and_grad(lambda p, b, r: loss_fn(p, b, r, *args)[0])
        if k == 1:
            return grad_fn(params, batch, key)

        def split(x):
            if x.shape[0] % k:
                raise ValueError(f"accumulate_steps={k} must divide the batch, got a batch "
                                 f"leaf of shape {x.shape}")
            return jnp.moveaxis(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 1, 0)

        def micro(carry, xs):
            i, b = xs
            loss, grads = grad_fn(params, b, jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(micro, zeros,
                                        (jnp.arange(k), jax.tree.map(split, batch)))
        return loss / k, jax.tree.map(lambda g: g / k, grads)

    def step(state: TrainState, batch: Dict[str, jax.Array], frozen_args=None):
        key = jax.random.fold_in(state.key, state.step)
        loss, grads = loss_and_grads(state.params, batch, key, frozen_args)
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
    if frozen is None:
        return jax.jit(step, in_shardings=(state_in, data), out_shardings=(state_in, repl),
                       donate_argnums=(0,) if donate else (), compiler_options=compiler_options)
    frozen_in = jax.tree.map(lambda x: getattr(x, "sharding", repl), frozen)
    jitted = jax.jit(step, in_shardings=(state_in, data, frozen_in),
                     out_shardings=(state_in, repl), donate_argnums=(0,) if donate else (),
                     compiler_options=compiler_options)

    def step_with_frozen(state: TrainState, batch: Dict[str, jax.Array]):
        return jitted(state, batch, frozen)

    step_with_frozen.jitted = jitted   # ``jitted(state, batch, frozen)``, e.g. to ``.lower``
    return step_with_frozen
