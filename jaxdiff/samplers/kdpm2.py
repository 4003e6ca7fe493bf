"""KDPM2 (k-diffusion's ``sample_dpm_2``, "DPM-Solver-2" after Karras et al. 2022) and its
ancestral variant in sigma space, as one ``lax.scan``.

Match diffusers' ``KDPM2DiscreteScheduler`` and ``KDPM2AncestralDiscreteScheduler`` (0.42):
prediction types eps / v (x0 too, which diffusers' schedulers do not implement), timestep spacing
and ``steps_offset``, Karras / exponential / beta sigmas (with Karras sigmas diffusers ROUNDS the
timesteps to integers; so does :func:`kdpm2_timesteps`). The sigma-space contract (standard normal
``x_T`` scaled by ``init_noise_sigma`` here, the model fed ``scale_model_input`` at fractional
float32 timesteps, x_0 returned in data space) is :mod:`jaxdiff.samplers.euler`'s.

Step ``i`` from ``sigma_i`` (a midpoint rule in log sigma, two model calls in one scan step):

    d = (x - x0(x, sigma_i, t_i)) / sigma_i;  x' = x + d (sigma_mid - sigma_i)
    d' = (x' - x0(x', sigma_mid, t_mid)) / sigma_mid;  x_next = x + d' (sigma_down - sigma_i)
                                                                 [+ sigma_up z, ancestral]

- KDPM2: ``sigma_down = sigma_{i+1}``, ``sigma_mid = sqrt(sigma_i sigma_{i+1})``, no noise;
- ancestral: ``sigma_up = sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2)``,
  ``sigma_down = sqrt(sigma_{i+1}^2 - sigma_up^2)``, ``sigma_mid = sqrt(sigma_i sigma_down)``
  (which equals ``sigma_{i+1}``), and standard normal ``z`` from step ``i``'s noise;
- ``t_mid``: the fractional timestep of ``sigma_mid`` (:func:`~jaxdiff.samplers.sigmas.
  sigma_to_t`);
- the last step (``sigma_N = 0``, ``sigma_mid = 0``) is the Euler step ``x'`` to the predicted x0
  alone: one model call, no noise (``2N - 1`` calls in all, as diffusers' interleaved timesteps).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion import canonical_prediction_type
from jaxdiff.samplers.diffusers_names import (
    K_DIFFUSION_DEFAULTS,
    K_DIFFUSION_OPTIONS,
    SCHEDULE_KEYS_NO_RESCALE,
    sigma_schedule_option,
)
from jaxdiff.samplers.driver import checked_model, prepare_x_T, run_scan, strength_start_step
from jaxdiff.samplers.euler import euler_timesteps, sigma_x0
from jaxdiff.samplers.heun import second_stage
from jaxdiff.samplers.sigmas import init_noise_sigma, scale_model_input, sigma_to_t, train_sigmas
from jaxdiff.samplers.spec import DiffusersTwin, SamplerSpec
from jaxdiff.schedules import Schedule
from jaxdiff.types import ModelFn
from jaxdiff.validation import check_bool, concrete

__all__ = ["KDPM2Grid", "kdpm2_timesteps", "kdpm2_step", "kdpm2_sample", "kdpm2_ancestral_sample",
           "KDPM2", "KDPM2_ANCESTRAL", "SPECS"]


class KDPM2Grid(NamedTuple):
    """KDPM2's host-side grid: a :class:`~jaxdiff.samplers.timesteps.Grid` (its first three
    fields) plus each step's midpoint and ancestral sigmas. All numpy float32.

    Attributes:
      timesteps: ``[N]`` fractional timesteps of ``sigmas[:-1]``.
      prev_timesteps: ``[N]`` the next entry of ``timesteps``, ``-1`` after the last.
      sigmas: ``[N + 1]``, ending with 0.
      mid_sigmas: ``[N]`` the second model call's sigma (0 on the last step: no second call).
      mid_timesteps: ``[N]`` its fractional timestep (unused where ``mid_sigmas`` is 0).
      sigmas_down: ``[N]`` the sigma a step moves to before its noise (``sigmas[1:]`` for KDPM2).
      sigmas_up: ``[N]`` the standard deviation of the noise a step adds (0 for KDPM2).
    """

    timesteps: np.ndarray
    prev_timesteps: np.ndarray
    sigmas: np.ndarray
    mid_sigmas: np.ndarray
    mid_timesteps: np.ndarray
    sigmas_down: np.ndarray
    sigmas_up: np.ndarray


def kdpm2_timesteps(
    schedule: Schedule,
    num_steps: int,
    *,
    ancestral: bool = False,
    spacing: str = "linspace",
    steps_offset: int = 0,
    sigma_schedule: str = "discrete",
) -> KDPM2Grid:
    """The grid of ``KDPM2DiscreteScheduler.set_timesteps`` (``ancestral=False``) or
    ``KDPM2AncestralDiscreteScheduler.set_timesteps`` (``True``), before diffusers interleaves
    it: :func:`~jaxdiff.samplers.euler.euler_timesteps` (final sigma 0; Karras timesteps rounded,
    as diffusers does) plus the midpoints, in float32 as diffusers computes them. Arguments and
    errors: see ``euler_timesteps``; ``ancestral`` must be a bool."""
    ancestral = check_bool("ancestral", ancestral)
    base = euler_timesteps(schedule, num_steps, spacing=spacing, steps_offset=steps_offset,
                           sigma_schedule=sigma_schedule)
    ts = base.timesteps
    if sigma_schedule == "karras":
        ts = np.round(ts).astype(np.float32)
    sig = base.sigmas.astype(np.float32)
    s, s_next = sig[:-1], sig[1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        if ancestral:
            up = (s_next**2 * (s**2 - s_next**2) / s**2) ** np.float32(0.5)
            down = np.sqrt(np.maximum(s_next**2 - up**2, 0)).astype(np.float32)
            lo, hi = np.log(s), np.log(down)  # torch.lerp(log s, log down, 0.5)
        else:
            up = np.zeros_like(s)
            down = s_next
            lo, hi = np.log(s_next), np.log(s)  # torch.lerp(log s_next, log s, 0.5)
        mid = np.exp(hi - (hi - lo) * np.float32(0.5)).astype(np.float32)
    mid[-1] = 0.0  # the last step goes to sigma 0 in one Euler step
    up[-1] = 0.0
    mid_ts = np.zeros_like(mid)
    mid_ts[:-1] = sigma_to_t(mid[:-1], np.log(train_sigmas(schedule)))
    return KDPM2Grid(ts, np.concatenate([ts[1:], [-1.0]]).astype(np.float32), sig, mid, mid_ts,
                     down.astype(np.float32), up.astype(np.float32))


def kdpm2_step(
    model_fn: ModelFn,
    x: jax.Array,
    t: jax.Array | float,
    t_mid: jax.Array | float,
    sigma: jax.Array | float,
    sigma_mid: jax.Array | float,
    sigma_down: jax.Array | float,
    sigma_up: jax.Array | float = 0.0,
    noise: jax.Array | None = None,
    *,
    prediction_type: str = "eps",
) -> tuple[jax.Array, jax.Array]:
    """One KDPM2 step (both of diffusers' ``step()`` calls; the module docstring's formulas).

    Args:
      model_fn: ``model_fn(x_t [B, ...], t [B] float32) -> [B, ...]``; called at
        ``(scale_model_input(x, sigma), t)`` and, when ``sigma_mid > 0``, at the midpoint
        ``(scale_model_input(x', sigma_mid), t_mid)`` (under ``lax.cond`` when traced).
      x: ``[B, ...]`` the sigma-space sample (at least float32).
      t, t_mid: scalar (fractional) timesteps of ``sigma`` and ``sigma_mid``.
      sigma, sigma_mid, sigma_down, sigma_up: scalars, one row of a :class:`KDPM2Grid`
        (``sigma_mid = 0``: one Euler step to ``sigma = 0``, no noise).
      noise: ``[B, ...]`` standard normal, added as ``sigma_up * noise``; required unless
        ``sigma_up`` is a concrete 0.
      prediction_type: ``"eps"``, ``"x0"`` or ``"v"`` (or diffusers' names).

    Returns:
      ``(x_next, pred_x0)``: ``[B, ...]`` in ``x``'s dtype (at least float32), and the first
      stage's predicted x0.
    """
    kind = canonical_prediction_type(prediction_type)
    up = concrete(sigma_up)
    ancestral = up is None or float(up) != 0.0
    x = jnp.asarray(x)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    x = x.astype(dtype)
    if ancestral:
        if noise is None:
            raise ValueError("noise is required when sigma_up is not 0 (or is traced)")
        if jnp.shape(noise) != x.shape:
            raise ValueError(f"noise must have x's shape {x.shape}, got {jnp.shape(noise)}")
    model = checked_model(model_fn, x.shape)
    sigma = jnp.asarray(sigma, jnp.float32)
    s_mid = jnp.asarray(sigma_mid, jnp.float32)

    def x0_at(y, s, tt):
        return sigma_x0(model(scale_model_input(y, s), tt).astype(dtype), y, s, kind)

    pred_x0 = x0_at(x, sigma, t)
    derivative = (x - pred_x0) / sigma
    x_mid = x + derivative * (s_mid - sigma)

    def midpoint(_):
        d2 = (x_mid - x0_at(x_mid, s_mid, t_mid)) / s_mid
        x_next = x + d2 * (jnp.asarray(sigma_down, jnp.float32) - sigma)
        if ancestral:
            x_next = x_next + noise.astype(dtype) * jnp.asarray(sigma_up, jnp.float32)
        return x_next

    return second_stage(sigma_mid, midpoint, x_mid).astype(dtype), pred_x0


def _sample(model_fn, schedule, x_T, key, num_steps, ancestral, prediction_type, spacing,
            steps_offset, sigma_schedule, noise, return_trajectory, strength):
    kind = canonical_prediction_type(prediction_type)
    g = kdpm2_timesteps(schedule, num_steps, ancestral=ancestral, spacing=spacing,
                        steps_offset=steps_offset, sigma_schedule=sigma_schedule)
    start = strength_start_step(num_steps, strength)
    x_T = prepare_x_T(x_T)
    if start == 0:
        x_T = x_T * init_noise_sigma(g, spacing)
    ts, ts_mid, sig, sig_mid, down, up = map(
        jnp.asarray, (g.timesteps, g.mid_timesteps, g.sigmas, g.mid_sigmas, g.sigmas_down,
                      g.sigmas_up))

    def body(state, x, i, z):
        x_next, x0 = kdpm2_step(
            model_fn, x, ts[i], ts_mid[i], sig[i], sig_mid[i], down[i],
            up[i] if ancestral else 0.0, z, prediction_type=kind,
        )
        return state, x_next, x0

    return run_scan(body, None, x_T, key, num_steps, stochastic=ancestral, noise=noise,
                    return_trajectory=return_trajectory, start_step=start)


def kdpm2_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array | None = None,
    *,
    num_steps: int,
    prediction_type: str = "eps",
    spacing: str = "linspace",
    steps_offset: int = 0,
    sigma_schedule: str = "discrete",
    noise: jax.Array | None = None,
    return_trajectory: bool = False,
    strength: float = 1.0,
):
    """Sample with KDPM2 (``KDPM2DiscreteScheduler``) in one ``lax.scan`` of ``num_steps`` steps
    (``2 num_steps - 1`` model calls).

    Args:
      model_fn: ``model_fn(x_t [B, ...], t [B] float32) -> [B, ...]`` (eps, x0 or v).
      schedule: the (concrete) training schedule.
      x_T: ``[B, ...]`` STANDARD NORMAL noise; scaled by ``init_noise_sigma`` here.
      key: accepted and unused (deterministic; may be ``None``).
      num_steps: ``1 <= num_steps <= T``.
      prediction_type: ``"eps"``, ``"x0"`` or ``"v"``.
      spacing, steps_offset, sigma_schedule: the grid (:func:`kdpm2_timesteps`).
      noise: accepted for the common contract: ``[M, B, ...]`` (``M`` the steps that run) is
        shape-checked and unused (deterministic).
      return_trajectory: also return ``(xs [M + 1, B, ...], pred_x0s [M, B, ...])``: the sample
        after each full step (``xs[0] = x_T * init_noise_sigma``) and each step's first-stage
        predicted x0.
      strength: image-to-image strength in ``(0, 1]``: run steps ``s .. num_steps - 1`` only,
        ``s = num_steps - int(num_steps * strength)`` (diffusers' ``set_begin_index(2 s)``;
        :func:`jaxdiff.samplers.noise_to_img2img`). With ``strength < 1``, ``x_T`` is the
        SIGMA-SPACE sample at ``sigmas[s]`` (``x0 + sigma noise``), not scaled by
        ``init_noise_sigma``.

    Returns:
      ``x_0 [B, ...]`` float32 (or wider), or ``(x_0, xs, pred_x0s)``.

    Raises:
      ValueError: naming the argument, for a bad grid or option or a mis-shaped model output.
    """
    return _sample(model_fn, schedule, x_T, key, num_steps, False, prediction_type, spacing,
                   steps_offset, sigma_schedule, noise, return_trajectory, strength)


def kdpm2_ancestral_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array | None = None,
    *,
    num_steps: int,
    prediction_type: str = "eps",
    spacing: str = "linspace",
    steps_offset: int = 0,
    sigma_schedule: str = "discrete",
    noise: jax.Array | None = None,
    return_trajectory: bool = False,
    strength: float = 1.0,
):
    """Sample with KDPM2 ancestral (``KDPM2AncestralDiscreteScheduler``) in one ``lax.scan``.

    As :func:`kdpm2_sample`, but stochastic: ``key`` (step ``i`` draws from ``fold_in(key, i)``)
    or ``noise [num_steps, B, ...]`` is required; step ``i < N - 1`` adds ``sigma_up_i *
    noise[i]`` after its second stage (``noise[N - 1]`` is unused: the last step adds none);
    with ``strength < 1``, ``noise`` is ``[M, B, ...]``, ``M`` the steps that run.
    """
    return _sample(model_fn, schedule, x_T, key, num_steps, True, prediction_type, spacing,
                   steps_offset, sigma_schedule, noise, return_trajectory, strength)


def _grid(ancestral: bool):
    def grid(schedule: Schedule, num_steps: int, *, strength: float = 1.0,
             spacing: str = "linspace", steps_offset: int = 0, sigma_schedule: str = "discrete",
             **_) -> KDPM2Grid:
        return kdpm2_timesteps(schedule, num_steps, ancestral=ancestral, spacing=spacing,
                               steps_offset=steps_offset, sigma_schedule=sigma_schedule)
    return grid


def _twin(class_name: str) -> DiffusersTwin:
    return DiffusersTwin(
        class_name,
        defaults=dict(K_DIFFUSION_DEFAULTS),
        options=dict(K_DIFFUSION_OPTIONS,
                     sigma_schedule=lambda c: sigma_schedule_option(c, class_name)),
        schedule_defaults=dict(beta_start=0.00085, beta_end=0.012),
        schedule_keys=SCHEDULE_KEYS_NO_RESCALE,  # diffusers ignores rescale_betas_zero_snr
    )


_OPTIONS = dict(prediction_type="eps", spacing="linspace", steps_offset=0,
                sigma_schedule="discrete")
KDPM2 = SamplerSpec(
    name="kdpm2", sample=kdpm2_sample, grid=_grid(False), options=_OPTIONS,
    noise_space="sigma_ve", stochastic=lambda o: False,
    diffusers=_twin("KDPM2DiscreteScheduler"),
)
KDPM2_ANCESTRAL = SamplerSpec(
    name="kdpm2_ancestral", sample=kdpm2_ancestral_sample, grid=_grid(True), options=_OPTIONS,
    noise_space="sigma_ve", stochastic=lambda o: True,
    diffusers=_twin("KDPM2AncestralDiscreteScheduler"),
)
SPECS = (KDPM2, KDPM2_ANCESTRAL)
