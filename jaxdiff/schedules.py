"""Noise schedules as data.

A :class:`Schedule` is a frozen pytree of ``[T]`` float32 arrays holding every quantity the forward
process, the losses and the samplers read, with ``num_timesteps`` as a static (non-pytree) field. It
passes through ``jit``, ``vmap`` and ``lax.scan`` like any array and can be saved with the params.

Schedules are built on the host from concrete numbers (float64 numpy, then cast to float32), so that
every check happens at construction and the values match the PyTorch references to float32 rounding.

    >>> sched = make_schedule("cosine", 1000)
    >>> sched.alphas_cumprod.shape
    (1000,)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff.validation import check_bool, check_float, check_int

__all__ = [
    "Schedule",
    "BETA_SCHEDULES",
    "make_schedule",
    "schedule_from_betas",
    "schedule_from_alphas_cumprod",
    "linear_betas",
    "scaled_linear_betas",
    "cosine_betas",
    "sigmoid_betas",
    "rescale_zero_terminal_snr",
]


@struct.dataclass
class Schedule:
    """Every derived quantity of a discrete beta schedule; all arrays are ``[T]`` float32.

    Index ``t`` runs over ``0 .. T-1``; ``alphas_cumprod_prev[0] == 1``.
    """

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    num_timesteps: int = struct.field(pytree_node=False)


def _check_beta_range(beta_start: float, beta_end: float) -> tuple[float, float]:
    """``(beta_start, beta_end)`` as floats in (0, 1) with ``beta_start <= beta_end``."""
    start, end = (
        check_float(name, value, minimum=0.0, maximum=1.0, exclusive_minimum=True,
                    exclusive_maximum=True)
        for name, value in (("beta_start", beta_start), ("beta_end", beta_end))
    )
    if start > end:
        raise ValueError(
            f"beta_start must be <= beta_end (the noise grows with t), got beta_start={start} > "
            f"beta_end={end}; swap them"
        )
    return start, end


def linear_betas(num_timesteps: int, beta_start: float = 1e-4,
                 beta_end: float = 0.02) -> np.ndarray:
    """Betas evenly spaced from ``beta_start`` to ``beta_end`` (Ho et al. 2020). Returns ``[T]``
    float64.

    Raises ``ValueError`` unless ``num_timesteps`` is an int >= 1 and
    ``0 < beta_start <= beta_end < 1`` (the same for the other beta-range schedules)."""
    num_timesteps = check_int("num_timesteps", num_timesteps, minimum=1)
    beta_start, beta_end = _check_beta_range(beta_start, beta_end)
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def scaled_linear_betas(
    num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """Square roots of the betas evenly spaced (the Stable Diffusion schedule, there used with
    ``beta_start=0.00085, beta_end=0.012``). Returns ``[T]`` float64."""
    num_timesteps = check_int("num_timesteps", num_timesteps, minimum=1)
    beta_start, beta_end = _check_beta_range(beta_start, beta_end)
    return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """The cosine schedule of Nichol & Dhariwal (2021):
    ``alpha_bar(t) = cos((t/T + s)/(1 + s) * pi/2)^2``,
    ``beta_t = min(1 - alpha_bar(t+1)/alpha_bar(t), max_beta)``. Returns ``[T]`` float64."""
    num_timesteps = check_int("num_timesteps", num_timesteps, minimum=1)
    max_beta = check_float("max_beta", max_beta, minimum=0.0, maximum=1.0,
                           exclusive_minimum=True, exclusive_maximum=True)
    s = check_float("s", s, minimum=0.0)

    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return np.array(
        [
            min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
            for i in range(num_timesteps)
        ],
        dtype=np.float64,
    )


def sigmoid_betas(num_timesteps: int, beta_start: float = 1e-4,
                  beta_end: float = 0.02) -> np.ndarray:
    """``sigmoid(linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start`` (as in diffusers'
    DDPMScheduler)."""
    num_timesteps = check_int("num_timesteps", num_timesteps, minimum=1)
    beta_start, beta_end = _check_beta_range(beta_start, beta_end)
    u = np.linspace(-6.0, 6.0, num_timesteps, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-u)) * (beta_end - beta_start) + beta_start


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so the last step has zero signal-to-noise ratio (Lin et al. 2023, Alg. 1).

    ``sqrt(alphas_cumprod)`` is shifted and scaled so that it keeps its first value and ends at 0;
    the last beta then equals 1 exactly. Returns ``[T]`` float64.
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 2:
        raise ValueError(f"betas must be a 1-D array of length >= 2, got shape {betas.shape}")
    abar_sqrt = np.sqrt(np.cumprod(1.0 - betas))
    first, last = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - last) * first / (first - last)
    abar = abar_sqrt**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


BETA_SCHEDULES = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
}


def _concrete_1d(name: str, values) -> np.ndarray:
    try:
        values = np.asarray(values, dtype=np.float64)
    except (TypeError, jax.errors.TracerArrayConversionError) as e:
        raise ValueError(
            f"{name} must be concrete numbers (a schedule is built on the host, outside jit)"
        ) from e
    if values.ndim != 1 or values.shape[0] < 1:
        raise ValueError(f"{name} must be a 1-D array with at least one entry, got shape "
                         f"{values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} must be finite")
    return values


def _check_betas(betas: np.ndarray) -> None:
    inner_ok = np.all((betas[:-1] > 0) & (betas[:-1] < 1))
    last_ok = 0 < betas[-1] <= 1
    if not (inner_ok and last_ok):
        bad = np.flatnonzero(~((betas > 0) & (betas < 1)))
        raise ValueError(
            "betas must lie in (0, 1) (only the last may equal 1, for zero terminal SNR); "
            f"out of range at indices {bad[:10].tolist()}: {betas[bad[:10]].tolist()}"
        )


def schedule_from_betas(betas) -> Schedule:
    """Build a :class:`Schedule` from concrete betas ``[T]``.

    Every beta must lie in (0, 1); the last one may equal 1 (a zero-terminal-SNR schedule). Derived
    quantities are computed in float64 and stored as float32.
    """
    betas = _concrete_1d("betas", betas)
    _check_betas(betas)
    return _schedule(betas, np.cumprod(1.0 - betas))


def schedule_from_alphas_cumprod(alphas_cumprod, *, betas=None) -> Schedule:
    """Build a :class:`Schedule` whose ``alphas_cumprod [T]`` are given, for references that set
    them directly rather than through the betas.

    diffusers' sigma-space and multistep schedulers (Euler, Euler ancestral, DPM-Solver, UniPC)
    with ``rescale_betas_zero_snr=True`` keep the rescaled betas (the last one 1) and then set
    ``alphas_cumprod[-1] = 2**-24`` (a finite last sigma, 4096). The beta that last value implies,
    ``1 - 2**-24 / abar_{T-2}``, is negative where ``abar_{T-2} < 2**-24`` (linear betas), so such
    a schedule cannot come from betas: build it with ``betas`` the reference's own (the
    posterior quantities read them) and ``alphas_cumprod`` its cumulative product.

    Args:
      alphas_cumprod: ``[T]`` concrete numbers in ``(0, 1]``, except that the last may be 0 (zero
        terminal SNR); not necessarily decreasing (the zero-SNR floor above can exceed
        ``abar_{T-2}``).
      betas: ``[T]`` the betas to store (as :func:`schedule_from_betas` checks them); by default
        those implied, ``1 - abar_t / abar_{t-1}`` (``abar_{-1} = 1``), which must then be valid.

    Returns:
      A :class:`Schedule`: ``alphas_cumprod`` and everything computed from it (``sqrt_*``,
      ``log_one_minus_alphas_cumprod``, ``alphas_cumprod_prev``) from the given values, ``betas``
      and ``alphas = 1 - betas`` as given, the posterior quantities from both. Float64 on the
      host, stored as float32.

    Raises:
      ValueError: naming the argument for values that are not concrete, finite, 1-D or in range,
        or ``betas`` of another length.
    """
    acp = _concrete_1d("alphas_cumprod", alphas_cumprod)
    if not (np.all((acp[:-1] > 0) & (acp[:-1] <= 1)) and 0 <= acp[-1] <= 1):
        bad = np.flatnonzero(~((acp > 0) & (acp <= 1)))
        raise ValueError(
            "alphas_cumprod must lie in (0, 1] (only the last may be 0, for zero terminal SNR); "
            f"out of range at indices {bad[:10].tolist()}: {acp[bad[:10]].tolist()}"
        )
    if betas is None:
        betas = 1.0 - acp / np.concatenate([[1.0], acp[:-1]])
    else:
        betas = _concrete_1d("betas", betas)
        if betas.shape != acp.shape:
            raise ValueError(f"betas must have alphas_cumprod's shape {acp.shape}, got "
                             f"{betas.shape}")
    _check_betas(betas)
    return _schedule(betas, acp)


def _schedule(betas: np.ndarray, acp: np.ndarray) -> Schedule:
    """The :class:`Schedule` of float64 ``betas`` and ``alphas_cumprod`` (checked by the caller)."""
    T = betas.shape[0]
    alphas = 1.0 - betas
    acp_prev = np.concatenate([[1.0], acp[:-1]])
    with np.errstate(divide="ignore"):
        # For a zero-terminal-SNR schedule acp[-1] == 0: the reciprocals are inf there, as they
        # should be (x0 cannot be recovered from pure noise with an eps prediction).
        sqrt_recip = np.sqrt(1.0 / acp)
        sqrt_recipm1 = np.sqrt(1.0 / acp - 1.0)
    post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
    # posterior_variance[0] == 0; the clipped log uses posterior_variance[1] there (Ho et al. 2020).
    post_log_var = (np.log(np.concatenate([post_var[1:2], post_var[1:]])) if T > 1
                    else np.array([-np.inf]))
    coef1 = betas * np.sqrt(acp_prev) / (1.0 - acp)
    coef2 = (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp)

    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)  # noqa: E731
    return Schedule(
        betas=f32(betas),
        alphas=f32(alphas),
        alphas_cumprod=f32(acp),
        alphas_cumprod_prev=f32(acp_prev),
        sqrt_alphas_cumprod=f32(np.sqrt(acp)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - acp)),
        log_one_minus_alphas_cumprod=f32(np.log(1.0 - acp)),
        sqrt_recip_alphas_cumprod=f32(sqrt_recip),
        sqrt_recipm1_alphas_cumprod=f32(sqrt_recipm1),
        posterior_variance=f32(post_var),
        posterior_log_variance_clipped=f32(post_log_var),
        posterior_mean_coef1=f32(coef1),
        posterior_mean_coef2=f32(coef2),
        num_timesteps=T,
    )


def make_schedule(
    name: str = "linear",
    num_timesteps: int = 1000,
    *,
    rescale_to_zero_terminal_snr: bool = False,
    **kwargs,
) -> Schedule:
    """Build a named schedule: ``"linear"``, ``"scaled_linear"``, ``"cosine"`` or ``"sigmoid"``.

    Keyword arguments go to the beta function (``beta_start``/``beta_end`` for linear, scaled_linear
    and sigmoid; ``s``/``max_beta`` for cosine). ``rescale_to_zero_terminal_snr`` applies
    :func:`rescale_zero_terminal_snr`.

    Raises:
      ValueError: an unknown ``name`` or keyword; ``num_timesteps`` not an int >= 1;
        ``beta_start``/``beta_end`` not numbers with ``0 < beta_start <= beta_end < 1``;
        ``max_beta`` outside (0, 1) or ``s < 0``; ``rescale_to_zero_terminal_snr`` not a bool.
    """
    if name not in BETA_SCHEDULES:
        raise ValueError(f"name must be one of {sorted(BETA_SCHEDULES)}, got {name!r}")
    rescale_to_zero_terminal_snr = check_bool("rescale_to_zero_terminal_snr",
                                              rescale_to_zero_terminal_snr)
    try:
        betas = BETA_SCHEDULES[name](num_timesteps, **kwargs)
    except TypeError as e:
        raise ValueError(f"invalid keyword arguments for the {name!r} schedule: {e}") from e
    if rescale_to_zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return schedule_from_betas(betas)
