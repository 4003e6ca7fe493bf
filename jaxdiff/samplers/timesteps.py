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

from jaxdiff.diffusion import extract
from jaxdiff.validation import check_int

__all__ = ["SPACINGS", "ddim_timesteps", "ddpm_timesteps", "gather"]

SPACINGS = ("leading", "trailing", "linspace")


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
