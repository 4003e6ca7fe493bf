"""Train state, optimizer and EMA.

:class:`TrainState` is a frozen pytree: ``step`` (int32 scalar), ``params``, ``opt_state``,
``ema_params`` and ``key`` (a raw ``uint32[2]`` PRNG key, so it checkpoints like any array). The
per-step randomness is ``jax.random.fold_in(state.key, state.step)``, so a resumed run draws exactly
the noise an uninterrupted run would.

    >>> import jax, jax.numpy as jnp
    >>> tx, lr_fn = make_optimizer(OptimizerConfig(learning_rate=2e-4, warmup_steps=100,
    ...                                            total_steps=10_000))
    >>> state = create_train_state({"w": jnp.ones(3)}, tx, jax.random.key(0))
    >>> int(state.step), state.key.dtype, round(float(lr_fn(50)), 8)   # half-way up the warm-up
    (0, dtype('uint32'), 0.0001)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

__all__ = ["TrainState", "OptimizerConfig", "make_optimizer", "make_lr_schedule",
           "create_train_state", "ema_decay_at", "ema_update"]


@struct.dataclass
class TrainState:
    """Everything a training run needs to continue bit-for-bit.

    step: [] int32; params / ema_params: the model's param pytree; opt_state: optax state;
    key: [2] uint32 raw PRNG key (the run's base key, never advanced: steps fold in ``step``).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    key: jax.Array


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up then cosine decay (or constant), and global-norm clipping.

    ``schedule``: ``"cosine"`` (to ``end_lr_factor * learning_rate`` at ``total_steps``) or
    ``"constant"``. ``end_lr_factor >= 0``. ``grad_clip_norm == 0`` disables clipping (negative
    values are rejected); switching clipping on or off changes the optimizer state's structure, so
    a run cannot be resumed across that change.
    """

    learning_rate: float = 2e-4
    warmup_steps: int = 500
    total_steps: int = 10_000
    schedule: str = "cosine"
    end_lr_factor: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip_norm: float = 1.0

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.warmup_steps < 0 or self.total_steps <= 0:
            raise ValueError(f"need warmup_steps >= 0 and total_steps > 0, got "
                             f"{self.warmup_steps}, {self.total_steps}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.end_lr_factor >= 0:
            raise ValueError(f"end_lr_factor must be >= 0, got {self.end_lr_factor}")
        if not self.grad_clip_norm >= 0:
            raise ValueError(f"grad_clip_norm must be >= 0 (0 = no clipping), got "
                             f"{self.grad_clip_norm}")


def make_lr_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """step -> learning rate: linear warm-up from 0, then cosine decay or constant."""
    if cfg.schedule == "constant":
        if cfg.warmup_steps == 0:
            return optax.constant_schedule(cfg.learning_rate)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps),
             optax.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.end_lr_factor)


def make_optimizer(cfg: OptimizerConfig) -> Tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns ``(tx, lr_schedule)``: clip_by_global_norm -> adamw(lr_schedule)."""
    lr = make_lr_schedule(cfg)
    parts = []
    if cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    return optax.chain(*parts), lr


def create_train_state(params: Any, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
    """A fresh state at step 0; ``ema_params`` start as a copy of ``params``."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=jax.tree.map(jnp.array, params), key=jnp.asarray(key, jnp.uint32))


def ema_decay_at(step: jax.Array, max_decay: float) -> jax.Array:
    """Warm-up EMA decay ``min(max_decay, (1 + step) / (10 + step))``; ``step`` counts updates
    done."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(max_decay), (1.0 + step) / (10.0 + step))


def ema_update(ema_params: Any, params: Any, step: jax.Array, max_decay: float) -> Any:
    """``ema <- d * ema + (1 - d) * params`` with ``d = ema_decay_at(step, max_decay)``."""
    d = ema_decay_at(step, max_decay)
    return optax.incremental_update(params, ema_params, step_size=1.0 - d)
