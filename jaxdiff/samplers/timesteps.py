"""Inference timesteps and the checked lookups every sampler shares.

The timestep grids are computed on the host (numpy), exactly as diffusers' ``set_timesteps``
computes them, so that a sampler's ``lax.scan`` runs over a concrete ``[num_steps]`` int32 array:

    >>> ts, ts_prev = ddim_timesteps(1000, 10)
    >>> ts[:3].tolist(), ts_prev[:3].tolist()
    ([900, 800, 700], [800, 700, 600])

A negative ``ts_prev`` means "before the first training step" (the sampler's final step).

Lookups into the ``[T]`` schedule arrays go through :func:`gather`, which reads NaN for an
out-of-range index instead of clamping it like a plain JAX gather; a concrete out-of-range timestep
raises a ``ValueError`` at trace time (:func:`check_timestep`).
"""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

from jaxdiff.diffusion import _concrete as concrete
from jaxdiff.diffusion import extract

__all__ = ["SPACINGS", "ddim_timesteps", "ddpm_timesteps", "gather"]

SPACINGS = ("leading", "trailing", "linspace")


def check_int(name: str, value, minimum: int) -> int:
    """``int(value)`` for a Python or numpy int ``>= minimum``; ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _diffusers_timesteps(
    num_train_timesteps: int, num_steps: int, spacing: str, steps_offset: int
) -> np.ndarray:
    """The descending int64 grid of ``{DDIM,DDPM}Scheduler.set_timesteps`` (diffusers 0.42)."""
    T = check_int("num_train_timesteps", num_train_timesteps, 1)
    n = check_int("num_steps", num_steps, 1)
    if n > T:
        raise ValueError(f"num_steps must be <= num_train_timesteps ({T}), got {n}")
    offset = check_int("steps_offset", steps_offset, 0)
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        step_ratio = T // n
        ts = (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.int64)
        ts += offset
    elif spacing == "trailing":
        # diffusers' float arange sometimes yields one extra element (e.g. T=1000, n=61), which
        # becomes timestep -1 and wraps around to alphas_cumprod[-1] in torch. Keep the first n.
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64)[:n]
        ts -= 1
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if ts[0] >= T:
        raise ValueError(
            f"steps_offset={offset} pushes the first timestep to {int(ts[0])} >= "
            f"num_train_timesteps={T}"
        )
    return ts


def ddim_timesteps(
    num_train_timesteps: int, num_steps: int, spacing: str = "leading", steps_offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """DDIM's timesteps and the previous timesteps its step reads, as ``DDIMScheduler`` has them.

    ``ts`` is ``DDIMScheduler.set_timesteps`` for ``spacing`` in ``"leading"`` (plus
    ``steps_offset``), ``"trailing"`` or ``"linspace"`` (which, as in diffusers, ignore
    ``steps_offset``). ``ts_prev = ts - num_train_timesteps // num_steps`` as in
    ``DDIMScheduler.step``; for ``"linspace"`` and ``"trailing"`` that is not always the next entry
    of ``ts`` (diffusers' behaviour, kept for parity). Negative ``ts_prev`` marks the final step.

    Returns ``(ts, ts_prev)``: two ``[num_steps]`` int32 numpy arrays, ``ts`` strictly descending.
    Raises ``ValueError`` unless ``1 <= num_steps <= num_train_timesteps`` and ``spacing`` is known.
    """
    ts = _diffusers_timesteps(num_train_timesteps, num_steps, spacing, steps_offset)
    ts_prev = ts - num_train_timesteps // num_steps
    return ts.astype(np.int32), ts_prev.astype(np.int32)


def ddpm_timesteps(
    num_train_timesteps: int,
    num_steps: int | None = None,
    spacing: str = "leading",
    steps_offset: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """DDPM's timesteps and previous timesteps, as ``DDPMScheduler`` computes them.

    ``num_steps=None`` means every training step (``T-1, ..., 0``). ``ts_prev`` is the next entry of
    ``ts`` and ``-1`` after the last one (``DDPMScheduler.previous_timestep``).

    Returns ``(ts, ts_prev)``: two ``[num_steps]`` int32 numpy arrays.
    """
    if num_steps is None:
        T = check_int("num_train_timesteps", num_train_timesteps, 1)
        ts = np.arange(T - 1, -1, -1, dtype=np.int64)
    else:
        ts = _diffusers_timesteps(num_train_timesteps, num_steps, spacing, steps_offset)
    ts_prev = np.concatenate([ts[1:], [-1]])
    return ts.astype(np.int32), ts_prev.astype(np.int32)


def gather(arr: jax.Array, t: jax.Array) -> jax.Array:
    """``arr[t]`` for a ``[T]`` array and integer ``t`` of any shape; NaN where ``t`` is outside
    ``[0, T)`` (no clamping, no wrapping of negative indices). See
    :func:`jaxdiff.diffusion.extract`."""
    return extract(arr, t, jnp.ndim(t))


def check_timestep(name: str, t, num_timesteps: int, *, allow_negative: bool = False) -> None:
    """Validate a step function's scalar timestep; ``ValueError`` naming ``name`` unless ``t`` is
    a 0-d integer (a ``[B]`` array would broadcast against the channel axis). A concrete ``t`` must
    also lie in ``[0, T)`` (with ``allow_negative``, any negative value is allowed: "before the
    first step"); a traced one passes the range check and reads NaN where it is out of range."""
    dtype = jnp.result_type(t)  # works on tracers: the dtype is known before the value
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer timestep, got dtype {dtype}")
    if jnp.ndim(t) != 0:
        raise ValueError(
            f"{name} must be a scalar (0-d) timestep shared by the batch, got shape {jnp.shape(t)}"
        )
    value = concrete(t)
    if value is None:
        return
    low_ok = True if allow_negative else value >= 0
    if not (low_ok and value < num_timesteps):
        bounds = f"< {num_timesteps}" if allow_negative else f"in [0, {num_timesteps})"
        raise ValueError(f"{name} must be {bounds}, got {value.tolist()}")


def check_nonnegative_float(name: str, value) -> float:
    """``float(value)`` for a concrete number ``>= 0``; ``ValueError`` naming ``name`` otherwise."""
    c = concrete(value)
    if c is None or c.shape != ():
        raise ValueError(f"{name} must be a concrete float >= 0 (static under jit), got {value!r}")
    v = float(c)
    if not v >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def check_clip(clip_x0) -> float | None:
    """``None`` (no clipping) or a concrete positive float."""
    if clip_x0 is None:
        return None
    c = concrete(clip_x0)
    if c is None or c.shape != () or not float(c) > 0:
        raise ValueError(f"clip_x0 must be None or a concrete float > 0, got {clip_x0!r}")
    return float(c)
