"""Sigma-space grids: the noise levels the k-diffusion family of samplers (Euler, Heun, DPM++ with
Karras sigmas, ...) step through, computed on the host as diffusers computes them.

A discrete-time model trained on a schedule with cumulative alphas ``abar_t`` sees
``x_t = sqrt(abar_t) (x_0 + sigma_t eps)`` with ``sigma_t = sqrt((1 - abar_t) / abar_t)``. Samplers
in sigma space carry ``x = x_0 + sigma eps`` (variance ``sigma^2 + 1`` at the start), scale it by
:func:`scale_model_input` before the model call, and evaluate the model at the (possibly
fractional) timestep whose log-sigma interpolates the requested sigma (:func:`sigma_to_t`).

    >>> from jaxdiff.schedules import make_schedule
    >>> grid = sigma_grid(make_schedule("scaled_linear", 1000, beta_start=0.00085,
    ...                                 beta_end=0.012), 4, sigma_schedule="karras")
    >>> [round(float(s), 3) for s in grid.sigmas]
    [14.615, 3.169, 0.447, 0.029, 0.0]
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.samplers.timesteps import SPACINGS, Grid, sigmas_at
from jaxdiff.schedules import Schedule
from jaxdiff.validation import check_choice, check_float, check_int

__all__ = [
    "SIGMA_SCHEDULES",
    "FINAL_SIGMAS_TYPES",
    "train_sigmas",
    "sigma_to_t",
    "karras_sigmas",
    "exponential_sigmas",
    "beta_sigmas",
    "spaced_timesteps",
    "sigma_grid",
    "scale_model_input",
    "alpha_sigma_lambda",
    "init_noise_sigma",
]

SIGMA_SCHEDULES = ("discrete", "karras", "exponential", "beta")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


def train_sigmas(schedule: Schedule) -> np.ndarray:
    """``sigma_t = sqrt((1 - abar_t) / abar_t)`` for ``t = 0 .. T-1``: ``[T]`` float64 numpy,
    ascending; ``inf`` where ``abar_t = 0``. ``schedule`` must be concrete (not traced).

    :func:`jaxdiff.samplers.timesteps.sigmas_at` at every training step, computed in float32 as
    diffusers computes them (from float32 ``alphas_cumprod``), then widened.
    """
    np.asarray(schedule.alphas_cumprod)   # a traced schedule raises here, as it always has
    return sigmas_at(schedule, np.arange(schedule.num_timesteps), host_dtype=np.float32)


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """The fractional timesteps whose log-sigma interpolates ``sigmas`` linearly between the
    neighbouring training steps (diffusers' ``_sigma_to_t``); clamped to ``[0, T - 1]``.

    Args:
      sigmas: ``[N]`` sigmas (any order).
      log_train_sigmas: ``[T]`` ``log(train_sigmas(schedule))``, ascending.

    Returns:
      ``[N]`` float64 timesteps.
    """
    sigmas = np.asarray(sigmas, np.float64)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_train_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_train_sigmas.shape[0] - 2)
    high = low + 1
    lo, hi = log_train_sigmas[low], log_train_sigmas[high]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigmas.shape)


def _check_range(sigma_min: float, sigma_max: float) -> tuple[float, float]:
    lo = check_float("sigma_min", sigma_min, minimum=0.0, exclusive_minimum=True)
    hi = check_float("sigma_max", sigma_max, minimum=0.0, exclusive_minimum=True)
    if lo > hi:
        raise ValueError(f"sigma_min ({lo}) must be <= sigma_max ({hi})")
    return lo, hi


def karras_sigmas(
    sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0
) -> np.ndarray:
    """Karras et al. (2022), eq. 5: ``(max^(1/rho) + i/(N-1) (min^(1/rho) - max^(1/rho)))^rho``.
    Returns ``[num_steps]`` float64, descending from ``sigma_max`` to ``sigma_min``."""
    lo, hi = _check_range(sigma_min, sigma_max)
    n = check_int("num_steps", num_steps, 1)
    rho = check_float("rho", rho, minimum=0.0, exclusive_minimum=True)
    ramp = np.linspace(0, 1, n)
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """Log-linear sigmas from ``sigma_max`` to ``sigma_min``: ``[num_steps]`` float64."""
    lo, hi = _check_range(sigma_min, sigma_max)
    n = check_int("num_steps", num_steps, 1)
    return np.exp(np.linspace(math.log(hi), math.log(lo), n))


def beta_sigmas(
    sigma_min: float, sigma_max: float, num_steps: int, alpha: float = 0.6, beta: float = 0.6
) -> np.ndarray:
    """Sigmas at the quantiles of a Beta(alpha, beta) distribution (Lee et al. 2024, "Beta
    Sampling is All You Need"): ``[num_steps]`` float64, descending."""
    from scipy import stats  # a dependency of jax

    lo, hi = _check_range(sigma_min, sigma_max)
    n = check_int("num_steps", num_steps, 1)
    a = check_float("alpha", alpha, minimum=0.0, exclusive_minimum=True)
    b = check_float("beta", beta, minimum=0.0, exclusive_minimum=True)
    ppf = stats.beta.ppf(1 - np.linspace(0, 1, n), a, b)
    return lo + ppf * (hi - lo)


def spaced_timesteps(
    num_train_timesteps: int, num_steps: int, spacing: str = "linspace", steps_offset: int = 0
) -> np.ndarray:
    """The descending float64 timesteps of ``EulerDiscreteScheduler.set_timesteps`` (also Heun,
    KDPM2, Euler ancestral): ``"linspace"`` keeps fractional values, ``"leading"`` adds
    ``steps_offset``, ``"trailing"`` ends at ``T / num_steps - 1``.

    Raises ``ValueError`` unless ``1 <= num_steps <= num_train_timesteps`` and ``spacing`` is one
    of :data:`~jaxdiff.samplers.timesteps.SPACINGS`.
    """
    T = check_int("num_train_timesteps", num_train_timesteps, 1)
    n = check_int("num_steps", num_steps, 1, T)
    offset = check_int("steps_offset", steps_offset, 0)
    check_choice("spacing", spacing, SPACINGS)
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].astype(np.float64)
    elif spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float64) + offset
    else:
        ts = np.arange(T, 0, -T / n).round()[:n].astype(np.float64) - 1
    if ts[0] > T - 1:
        raise ValueError(
            f"steps_offset={offset} pushes the first timestep to {ts[0]:g} > {T - 1}"
        )
    return ts


def sigma_grid(
    schedule: Schedule,
    num_steps: int,
    *,
    spacing: str = "linspace",
    steps_offset: int = 0,
    sigma_schedule: str = "discrete",
    final_sigmas_type: str = "zero",
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
) -> Grid:
    """The grid of ``EulerDiscreteScheduler.set_timesteps`` (diffusers 0.42), shared by the
    Euler-family samplers.

    ``sigma_schedule="discrete"``: the training sigmas interpolated at :func:`spaced_timesteps`.
    ``"karras"`` / ``"exponential"`` / ``"beta"``: ``num_steps`` sigmas from ``sigma_max`` (default:
    the largest of the discrete ones) to ``sigma_min`` (default: the smallest), with their
    timesteps from :func:`sigma_to_t`. Then the final sigma: ``0`` (``final_sigmas_type="zero"``)
    or the training sigma of ``t = 0`` (``"sigma_min"``).

    Args:
      schedule: the (concrete) training schedule.
      num_steps: ``1 <= num_steps <= T``.
      spacing, steps_offset: see :func:`spaced_timesteps`.
      sigma_schedule: one of :data:`SIGMA_SCHEDULES`.
      final_sigmas_type: one of :data:`FINAL_SIGMAS_TYPES`.
      sigma_min, sigma_max: override the range of the non-discrete sigma schedules.
      rho: the Karras exponent.

    Returns:
      A :class:`~jaxdiff.samplers.timesteps.Grid` with float32 (fractional) ``timesteps [N]``,
      ``prev_timesteps [N]`` (the next entry, ``-1`` after the last) and ``sigmas [N + 1]``.
    """
    check_choice("sigma_schedule", sigma_schedule, SIGMA_SCHEDULES)
    check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
    T = schedule.num_timesteps
    ts = spaced_timesteps(T, num_steps, spacing, steps_offset)
    train = train_sigmas(schedule)
    log_train = np.log(train)
    sigmas = np.interp(ts, np.arange(T), train)
    if sigma_schedule != "discrete":
        lo = sigmas[-1] if sigma_min is None else sigma_min
        hi = sigmas[0] if sigma_max is None else sigma_max
        if sigma_schedule == "karras":
            sigmas = karras_sigmas(lo, hi, num_steps, rho)
        elif sigma_schedule == "exponential":
            sigmas = exponential_sigmas(lo, hi, num_steps)
        else:
            sigmas = beta_sigmas(lo, hi, num_steps)
        ts = sigma_to_t(sigmas, log_train)
    last = 0.0 if final_sigmas_type == "zero" else train[0]
    return Grid(
        ts.astype(np.float32),
        np.concatenate([ts[1:], [-1.0]]).astype(np.float32),
        np.concatenate([sigmas, [last]]).astype(np.float32),
    )


def scale_model_input(x: jax.Array, sigma: jax.Array | float) -> jax.Array:
    """``x / sqrt(sigma^2 + 1)``: a sigma-space sample as the discrete-time model expects it."""
    return x / jnp.sqrt(jnp.asarray(sigma, x.dtype) ** 2 + 1)


def alpha_sigma_lambda(sigma: jax.Array | float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(alpha_t, sigma_t, lambda_t)`` of a VP sample at sigma-space noise level ``sigma = sqrt((1
    - abar) / abar)``: ``alpha_t = 1 / sqrt(sigma^2 + 1) = sqrt(abar)``, ``sigma_t = sigma alpha_t
    = sqrt(1 - abar)`` and the half log-SNR ``lambda_t = log(alpha_t) - log(sigma_t)`` (``inf`` at
    ``sigma = 0``), in diffusers' order of operations (its DPM-Solver / UniPC / DEIS schedulers'
    ``_sigma_to_alpha_sigma_t``). Elementwise, jittable; the DPM-Solver family's time variable."""
    alpha = 1.0 / jnp.sqrt(sigma**2 + 1.0)
    sig = sigma * alpha
    return alpha, sig, jnp.log(alpha) - jnp.log(sig)


def init_noise_sigma(grid: Grid, spacing: str) -> float:
    """The standard deviation of the starting sample in sigma space: the largest sigma for
    ``"linspace"`` / ``"trailing"`` spacing, ``sqrt(sigma_max^2 + 1)`` for ``"leading"``
    (diffusers' ``init_noise_sigma``). Samplers multiply a standard normal ``x_T`` by it."""
    check_choice("spacing", spacing, SPACINGS)
    top = float(np.max(grid.sigmas))
    return top if spacing in ("linspace", "trailing") else math.sqrt(top**2 + 1)
