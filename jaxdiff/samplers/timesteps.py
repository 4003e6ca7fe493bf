"""Inference timesteps and the checked lookups every sampler shares.

The timestep grids are computed on the host (numpy), exactly as diffusers' ``set_timesteps``
computes them, so that a sampler's ``lax.scan`` runs over a concrete ``[num_steps]`` int32 array:

    >>> from jaxdiff.schedules import make_schedule
    >>> grid = ddim_timesteps(make_schedule("linear", 1000), 10)
    >>> grid.timesteps[:3].tolist(), grid.prev_timesteps[:3].tolist()
    ([900, 800, 700], [800, 700, 600])

A negative previous timestep means "before the first training step" (the sampler's final step).

Lookups into the ``[T]`` schedule arrays go through :func:`gather`, which reads NaN for an
out-of-range index instead of clamping it like a plain JAX gather; a concrete out-of-range timestep
raises a ``ValueError`` at trace time (:func:`jaxdiff.validation.check_timestep`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

import jax
import jax.numpy as jnp

from jaxdiff.diffusion import extract
from jaxdiff.schedules import Schedule
from jaxdiff.validation import check_int, concrete

__all__ = ["SPACINGS", "Grid", "ddim_timesteps", "ddpm_timesteps", "gather", "sigmas_at"]

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


class Grid(NamedTuple):
    """A sampler's host-side grid: concrete numpy arrays, so that the ``lax.scan`` runs over
    static shapes.

    Attributes:
      timesteps: ``[N]`` int32, descending: the model is evaluated at ``timesteps[i]`` on step
        ``i``.
      prev_timesteps: ``[N]`` int32: the timestep step ``i`` moves to; negative means "before the
        first training step" (the clean sample).
      sigmas: ``[N + 1]`` float32, ``sigma = sqrt((1 - abar) / abar)`` at each timestep, then
        the final sigma (``0``: the last step returns the predicted clean sample). A JAX array
        when the schedule is traced (DDIM and DDPM accept a traced schedule; their steps read
        ``alphas_cumprod`` directly).
    """

    timesteps: np.ndarray
    prev_timesteps: np.ndarray
    sigmas: np.ndarray


def sigmas_at(
    schedule: Schedule, timesteps: np.ndarray, *, host_dtype: type = np.float64
) -> np.ndarray | jax.Array:
    """``sqrt((1 - abar_t) / abar_t)`` at integer ``timesteps``: float64 numpy on the host, or a
    float32 JAX array when the schedule is traced (passed through ``jit`` as an argument); ``inf``
    where ``abar_t = 0`` (a zero-terminal-SNR schedule's last step).

    The one home of this formula (:func:`jaxdiff.samplers.sigmas.train_sigmas` is this at every
    training step, in float32).

    Args:
      schedule: the training schedule.
      timesteps: integer indices into ``schedule.alphas_cumprod`` (any shape).
      host_dtype: the precision of the host arithmetic, ``np.float64`` (the default) or
        ``np.float32`` (diffusers' sigmas, computed from float32 ``alphas_cumprod``); the result
        is float64 either way. Ignored for a traced schedule.
    """
    acp = concrete(schedule.alphas_cumprod)
    if acp is None:
        a = schedule.alphas_cumprod[timesteps]
        return jnp.sqrt((1 - a) / a)
    acp = acp.astype(host_dtype)
    with np.errstate(divide="ignore"):  # abar = 0 (zero terminal SNR): sigma = inf
        return np.sqrt((1 - acp[timesteps]) / acp[timesteps]).astype(np.float64, copy=False)


def _grid(schedule: Schedule, ts: np.ndarray, ts_prev: np.ndarray, final_sigma: float) -> Grid:
    sig = sigmas_at(schedule, ts)
    xp = np if isinstance(sig, np.ndarray) else jnp
    sigmas = xp.concatenate([sig, xp.asarray([final_sigma], sig.dtype)]).astype(xp.float32)
    return Grid(ts.astype(np.int32), ts_prev.astype(np.int32), sigmas)


def ddim_timesteps(
    schedule: Schedule, num_steps: int, spacing: str = "leading", steps_offset: int = 0
) -> Grid:
    """DDIM's grid, as ``DDIMScheduler`` has it.

    ``timesteps`` is ``DDIMScheduler.set_timesteps`` for ``spacing`` in ``"leading"`` (plus
    ``steps_offset``), ``"trailing"`` or ``"linspace"`` (which, as in diffusers, ignore
    ``steps_offset``). ``prev_timesteps = timesteps - T // num_steps`` as in
    ``DDIMScheduler.step``; for ``"linspace"`` and ``"trailing"`` that is not always the next entry
    of ``timesteps`` (diffusers' behaviour, kept for parity). Negative entries mark the final
    step; the final sigma is 0.

    Args:
      schedule: the training schedule (``T = schedule.num_timesteps``).
      num_steps: ``1 <= num_steps <= T``.
      spacing: one of :data:`SPACINGS`.
      steps_offset: ``>= 0``, added to ``"leading"`` timesteps.

    Returns:
      A :class:`Grid` of ``N = num_steps`` steps.

    Raises:
      ValueError: naming the argument, for the cases above.
    """
    T = schedule.num_timesteps
    ts = _diffusers_timesteps(T, num_steps, spacing, steps_offset)
    return _grid(schedule, ts, ts - T // num_steps, 0.0)


def ddpm_timesteps(
    schedule: Schedule, num_steps: int, spacing: str = "leading", steps_offset: int = 0
) -> Grid:
    """DDPM's grid, as ``DDPMScheduler`` computes it.

    ``num_steps = T`` is every training step (``T-1, ..., 0``) for the default spacings.
    ``prev_timesteps`` is the next entry of ``timesteps`` and ``-1`` after the last one
    (``DDPMScheduler.previous_timestep``). Arguments and errors as :func:`ddim_timesteps`.
    """
    ts = _diffusers_timesteps(schedule.num_timesteps, num_steps, spacing, steps_offset)
    return _grid(schedule, ts, np.concatenate([ts[1:], [-1]]), 0.0)


def gather(arr: jax.Array, t: jax.Array) -> jax.Array:
    """``arr[t]`` for a ``[T]`` array and integer ``t`` of any shape; NaN where ``t`` is outside
    ``[0, T)`` (no clamping, no wrapping of negative indices). See
    :func:`jaxdiff.diffusion.extract`."""
    return extract(arr, t, jnp.ndim(t))
