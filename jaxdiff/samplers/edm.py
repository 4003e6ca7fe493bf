"""The EDM sampler (Karras et al. 2022, Algorithm 2): Euler or Heun steps on the Karras sigma grid,
with optional stochastic "churn", as one ``lax.scan``.

Each step ``i`` (``N = num_steps``, ``sigma_N`` the final sigma)::

    gamma_i = min(s_churn / N, sqrt(2) - 1) if s_tmin <= sigma_i <= s_tmax else 0
    sigma_hat = sigma_i (1 + gamma_i)
    x_hat = x_i + sqrt(sigma_hat^2 - sigma_i^2) s_noise z_i                  z_i ~ N(0, I)
    d = (x_hat - D(x_hat; sigma_hat)) / sigma_hat
    x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) d                           (Euler)
    x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) (d + d') / 2, d' at x_{i+1}  (Heun; not when
                                                                             sigma_{i+1} = 0)

where ``D`` is the preconditioned denoiser of :func:`jaxdiff.preconditioning.edm_denoise`.

The model contract differs from the discrete samplers': ``model_fn(x_in [B, ...], c_noise [B]
float32) -> F [B, ...]`` is the raw EDM network (:data:`jaxdiff.preconditioning.EDMModelFn`),
called with ``c_in(sigma) x`` and ``c_noise = log(sigma) / 4``; the sampler applies the
preconditioning. There is no discrete :class:`~jaxdiff.schedules.Schedule`, so
:func:`edm_sample` takes none.

EDM is a separate family, deliberately NOT in the sampler registry (it declares no
:class:`~jaxdiff.samplers.spec.SamplerSpec`): every registry user (the experiments' ``--sampler``,
the pipelines, the benchmarks) passes a discrete-time ``ModelFn`` (integer ``t``, eps / x0 / v of a
VP schedule) and a ``Schedule``; an ``"edm"`` entry would accept such a model, feed it float
``c_noise`` and scaled VE inputs, and return garbage without an error. Call :func:`edm_sample`
directly. Its churn options are spelt as :func:`~jaxdiff.samplers.euler.euler_sample`'s
(``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``); it has no image-to-image ``strength``.

Parity (tests/parity/test_edm_parity.py): with ``solver="euler"`` this is diffusers'
``EDMEulerScheduler`` (sigma grid, ``final_sigmas_type``, ``prediction_type``, ``sigma_data``). With
churn, diffusers' pipelines evaluate the model at ``(x_i, sigma_i)`` (``scale_model_input`` runs
before ``step`` adds the churn noise) and then precondition that output at ``sigma_hat``; jaxdiff
follows Algorithm 2 and evaluates at ``(x_hat, sigma_hat)``. No diffusers pipeline passes
``s_churn``, so the two agree wherever diffusers is used as shipped.

Example (``F(params, x_in, c_noise)`` a network)::

    x_T = 80.0 * jax.random.normal(key, (4, 32, 32, 3))
    x_0 = edm_sample(partial(F, params), x_T, None, num_steps=18)           # Heun, 35 NFE
    x_0 = edm_sample(partial(F, params), x_T, key, num_steps=40, s_churn=40.0, s_tmin=0.05,
                     s_tmax=50.0, s_noise=1.003)                           # stochastic
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.preconditioning import EDMModelFn, check_edm_prediction_type, edm_denoise
from jaxdiff.samplers.driver import prepare_x_T, run_scan
from jaxdiff.samplers.sigmas import exponential_sigmas, karras_sigmas
from jaxdiff.validation import check_choice, check_float, check_int, concrete

__all__ = [
    "EDM_SIGMA_SCHEDULES",
    "EDM_SOLVERS",
    "edm_sigmas",
    "edm_churn",
    "edm_step",
    "edm_sample",
]

EDM_SIGMA_SCHEDULES = ("karras", "exponential")
EDM_SOLVERS = ("euler", "heun")
_FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


def edm_sigmas(
    num_steps: int,
    *,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    sigma_schedule: str = "karras",
    final_sigmas_type: str = "zero",
) -> np.ndarray:
    """The noise levels ``[N + 1]`` float32: ``N = num_steps`` descending sigmas from
    ``sigma_max`` to ``sigma_min``, then the final sigma (``0``, or ``sigma_min`` with
    ``final_sigmas_type="sigma_min"``), as ``EDMEulerScheduler.set_timesteps`` computes them.

    ``"karras"`` is eq. 5 of the paper with exponent ``rho``
    (:func:`~jaxdiff.samplers.sigmas.karras_sigmas`); ``"exponential"`` is log-linear (``rho`` is
    then unused). Raises ``ValueError`` naming the argument.
    """
    n = check_int("num_steps", num_steps, 1)
    check_choice("sigma_schedule", sigma_schedule, EDM_SIGMA_SCHEDULES)
    check_choice("final_sigmas_type", final_sigmas_type, _FINAL_SIGMAS_TYPES)
    if sigma_schedule == "karras":
        sig = karras_sigmas(sigma_min, sigma_max, n, rho)
    else:
        sig = exponential_sigmas(sigma_min, sigma_max, n)
    sig = sig.astype(np.float32)
    last = sig[-1] if final_sigmas_type == "sigma_min" else np.float32(0.0)
    return np.concatenate([sig, [last]]).astype(np.float32)


def _check_tmax(s_tmax) -> float:
    if isinstance(s_tmax, (int, float, np.floating, np.integer)) and s_tmax == math.inf:
        return math.inf
    return check_float("s_tmax", s_tmax, minimum=0.0)


def edm_churn(
    sigmas: np.ndarray,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
) -> np.ndarray:
    """``gamma_i = min(s_churn / N, sqrt(2) - 1)`` where ``s_tmin <= sigma_i <= s_tmax``, else 0:
    ``[N]`` float64 for the grid ``sigmas [N + 1]`` of :func:`edm_sigmas`.

    ``s_churn >= 0``, ``s_tmin >= 0`` and ``s_tmax`` (``inf`` allowed) are checked."""
    churn = check_float("s_churn", s_churn, minimum=0.0)
    tmin = check_float("s_tmin", s_tmin, minimum=0.0)
    tmax = _check_tmax(s_tmax)
    sig = np.asarray(sigmas, np.float32)[:-1]
    n = sig.shape[0]
    gamma = min(churn / n, math.sqrt(2.0) - 1.0)
    return np.where((tmin <= sig) & (sig <= tmax), gamma, 0.0).astype(np.float64)


def edm_step(
    denoiser: Callable[[jax.Array, jax.Array], jax.Array],
    x: jax.Array,
    sigma: jax.Array | float,
    sigma_next: jax.Array | float,
    noise: jax.Array | None,
    *,
    gamma: jax.Array | float = 0.0,
    s_noise: float = 1.0,
    second_order: bool | jax.Array = False,
) -> tuple[jax.Array, jax.Array]:
    """One step of Algorithm 2 from ``sigma`` to ``sigma_next``.

    Unlike the discrete samplers' steps this one takes the denoiser rather than one model output:
    the Heun correction evaluates it a second time, at ``x_{i+1}``.

    Args:
      denoiser: ``denoiser(x [B, ...], sigma: 0-d float32) -> D(x; sigma) [B, ...]``, e.g.
        ``partial(jaxdiff.preconditioning.edm_denoise, model_fn, sigma_data=0.5)``.
      x: ``[B, ...]`` the current sample at noise level ``sigma`` (at least float32).
      sigma: 0-d, ``> 0``; sigma_next: 0-d, ``>= 0``.
      noise: ``[B, ...]`` standard normal, used when ``gamma > 0``; may be ``None`` when ``gamma``
        is a concrete 0 (a traced ``gamma`` always needs it).
      gamma: the churn ``>= 0`` (:func:`edm_churn`); ``sigma_hat = sigma (1 + gamma)``.
      s_noise: scales ``noise``.
      second_order: apply Heun's correction (a bool, or a traced bool scalar). Skipped where
        ``sigma_next == 0``, as in the paper.

    Returns:
      ``(x_next, denoised)``: ``x_next [B, ...]`` in ``x``'s dtype and ``D(x_hat; sigma_hat)``.
    """
    g = concrete(gamma)
    if g is not None and float(g) < 0:
        raise ValueError(f"gamma must be >= 0, got {float(g)}")
    stochastic = g is None or float(g) > 0
    if stochastic:
        if noise is None:
            raise ValueError("noise is required when gamma > 0 (or gamma is traced)")
        if jnp.shape(noise) != jnp.shape(x):
            raise ValueError(f"noise must have x's shape {jnp.shape(x)}, got {jnp.shape(noise)}")
    s_noise = check_float("s_noise", s_noise, minimum=0.0)
    dtype = x.dtype
    sigma = jnp.asarray(sigma, jnp.float32)
    sigma_next = jnp.asarray(sigma_next, jnp.float32)
    gamma = jnp.asarray(gamma, jnp.float32)
    sigma_hat = sigma * (gamma + 1.0)
    if stochastic:
        eps = noise.astype(dtype) * s_noise
        # Exactly 0 at gamma = 0: XLA may contract sigma_hat^2 - sigma^2 into an FMA, which leaves
        # the rounding error of sigma^2 (+-1e-5 at sigma ~ 20), and its square root is not small.
        var = jnp.maximum(sigma_hat**2 - sigma**2, 0.0)
        x = x + eps * jnp.where(gamma > 0, jnp.sqrt(var), 0.0)
    denoised = denoiser(x, sigma_hat).astype(dtype)
    d = (x - denoised) / sigma_hat
    dt = sigma_next - sigma_hat
    x_euler = x + d * dt

    def heun(x_euler):
        d_next = (x_euler - denoiser(x_euler, sigma_next).astype(dtype)) / sigma_next
        return x + dt * (0.5 * d + 0.5 * d_next)

    so = concrete(second_order)
    if so is not None and not bool(so):  # Euler: the second evaluation is never traced
        return x_euler.astype(dtype), denoised
    second = jnp.logical_and(second_order, sigma_next > 0)
    s = concrete(second)
    if s is None:
        x_next = jax.lax.cond(second, heun, lambda x_euler: x_euler, x_euler)
    else:
        x_next = heun(x_euler) if bool(s) else x_euler
    return x_next.astype(dtype), denoised


def edm_sample(
    model_fn: EDMModelFn,
    x_T: jax.Array,
    key: jax.Array | None = None,
    *,
    num_steps: int,
    solver: str = "heun",
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    sigma_data: float = 0.5,
    prediction_type: str = "eps",
    sigma_schedule: str = "karras",
    final_sigmas_type: str = "zero",
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    noise: jax.Array | None = None,
    return_trajectory: bool = False,
):
    """Sample with EDM's Algorithm 2 in one ``lax.scan`` over ``num_steps`` noise levels.

    Args:
      model_fn: the raw network ``model_fn(x_in [B, ...], c_noise [B] float32) -> F [B, ...]``
        (:data:`jaxdiff.preconditioning.EDMModelFn`); the sampler applies ``c_skip``, ``c_out``,
        ``c_in``.
      x_T: ``[B, ...]`` the starting sample at noise level ``sigmas[0]`` (``sigma_max``): the
        paper draws ``sigma_max * N(0, I)``; diffusers' pipelines draw ``sqrt(sigma_max^2 + 1) *
        N(0, I)`` (``init_noise_sigma``). Carried in at least float32.
      key: PRNG key, required when churn is active (some ``gamma_i > 0``) and ``noise`` is None:
        step ``i`` draws ``z_i`` from ``fold_in(key, i)`` (drawn on every step, used where
        ``gamma_i > 0``). May be ``None`` otherwise.
      num_steps: ``N >= 1`` noise levels; Heun evaluates the model ``2N - 1`` times (``2N`` with
        ``final_sigmas_type="sigma_min"``), Euler ``N``.
      solver: ``"heun"`` (the paper's 2nd order) or ``"euler"`` (``EDMEulerScheduler``).
      sigma_min, sigma_max, rho, sigma_schedule, final_sigmas_type: the grid (:func:`edm_sigmas`).
      sigma_data, prediction_type: the preconditioning
        (:func:`jaxdiff.preconditioning.edm_precondition`).
      s_churn, s_tmin, s_tmax: the churn (:func:`edm_churn`); ``s_churn = 0`` is deterministic.
      s_noise: the churn noise's scale.
      noise: optional ``[N, B, ...]`` pre-drawn ``z`` used instead of ``key`` (row ``i`` is read
        only where ``gamma_i > 0``).
      return_trajectory: also return the path.

    Returns:
      ``x_0 [B, ...]`` (at least float32); with ``return_trajectory`` ``(x_0, xs [N + 1, B, ...],
      denoised [N, B, ...])``, ``xs[0] = x_T``, ``denoised[i] = D(x_hat_i; sigma_hat_i)``.

    Raises:
      ValueError: naming the argument, for a bad option, a missing key, a mis-shaped ``noise`` or
        model output.
    """
    check_choice("solver", solver, EDM_SOLVERS)
    kind = check_edm_prediction_type(prediction_type)
    check_float("sigma_data", sigma_data, minimum=0.0, exclusive_minimum=True)
    s_noise = check_float("s_noise", s_noise, minimum=0.0)
    sigmas = edm_sigmas(
        num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
        sigma_schedule=sigma_schedule, final_sigmas_type=final_sigmas_type,
    )
    gammas = edm_churn(sigmas, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax)
    stochastic = bool((gammas > 0).any())
    x_T = prepare_x_T(x_T)
    denoiser = partial(edm_denoise, model_fn, sigma_data=sigma_data, prediction_type=kind)
    sig_j, gam_j = jnp.asarray(sigmas), jnp.asarray(gammas, jnp.float32)

    def body(state, x, i, z):
        x_next, denoised = edm_step(
            denoiser, x, sig_j[i], sig_j[i + 1], z if stochastic else None,
            gamma=gam_j[i] if stochastic else 0.0, s_noise=s_noise,
            second_order=solver == "heun",
        )
        return state, x_next, denoised

    return run_scan(body, None, x_T, key, len(gammas), stochastic=stochastic, noise=noise,
                    return_trajectory=return_trajectory)
