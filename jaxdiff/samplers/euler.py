"""Euler and Euler ancestral (Karras et al. 2022, k-diffusion) in sigma space, as one ``lax.scan``.

Matches diffusers' ``EulerDiscreteScheduler`` (with its ``s_churn`` / ``s_tmin`` / ``s_tmax`` /
``s_noise`` stochasticity) and ``EulerAncestralDiscreteScheduler`` (0.42). The grid is
:func:`jaxdiff.samplers.sigmas.sigma_grid` (timestep spacing, ``steps_offset``, Karras /
exponential / beta sigmas, ``final_sigmas_type``).

The sigma-space contract, shared with :mod:`~jaxdiff.samplers.heun` and
:mod:`~jaxdiff.samplers.kdpm2`:

- ``x_T`` is STANDARD NORMAL noise ``[B, ...]``. The sampler multiplies it by
  :func:`~jaxdiff.samplers.sigmas.init_noise_sigma` itself (diffusers' pipelines do ``latents *
  scheduler.init_noise_sigma``), so the carry is ``x = x_0 + sigma eps``;
- the model sees :func:`~jaxdiff.samplers.sigmas.scale_model_input` ``(x, sigma) = x / sqrt(sigma^2
  + 1)`` (the discrete-time ``x_t``) at the grid's FRACTIONAL timestep:
  ``model_fn(x [B, ...], t [B] float32)``;
- the result is ``x_0`` in data space; with ``return_trajectory`` ``xs[0]`` is the scaled start
  ``x_T * init_noise_sigma`` and ``xs[i]`` the sigma-space sample at ``sigmas[i]``.

Predicted x0 from a model output at noise level ``sigma`` (:func:`sigma_x0`, diffusers' order of
operations): eps ``x - sigma out``; x0 ``out``; v ``-sigma / sqrt(sigma^2 + 1) out + x / (sigma^2
+ 1)``.

Euler with churn (``s_churn > 0``) follows diffusers exactly, including where it departs from
Karras et al.'s Algorithm 2: the model is evaluated at the sample BEFORE the churn noise is added
(at ``sigma``, not ``sigma_hat``), and its output is then used at ``sigma_hat`` (for eps models;
v models convert at ``sigma``). Step ``i`` raises ``sigma`` to ``sigma_hat = sigma (1 + gamma_i)``
with ``gamma_i = min(s_churn / N, sqrt(2) - 1)`` where ``s_tmin <= sigma_i <= s_tmax`` (else 0),
adding ``s_noise sqrt(sigma_hat^2 - sigma^2) z``.

Example (``apply(params, x, t)`` an eps model taking float timesteps)::

    x0 = euler_sample(partial(apply, params), sched, jax.random.normal(key, shape), None,
                      num_steps=30, sigma_schedule="karras")
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion import canonical_prediction_type
from jaxdiff.samplers.diffusers_names import (
    K_DIFFUSION_OPTIONS,
    config_key,
    sigma_schedule_option,
)
from jaxdiff.samplers.driver import checked_model, prepare_x_T, run_scan, strength_start_step
from jaxdiff.samplers.sigmas import init_noise_sigma, scale_model_input, sigma_grid
from jaxdiff.samplers.spec import DiffusersTwin, SamplerSpec
from jaxdiff.samplers.timesteps import Grid
from jaxdiff.schedules import Schedule
from jaxdiff.types import ModelFn
from jaxdiff.validation import check_float, concrete

__all__ = [
    "sigma_x0",
    "euler_timesteps",
    "churn_gammas",
    "euler_step",
    "euler_sample",
    "euler_ancestral_step",
    "euler_ancestral_sample",
    "EULER",
    "EULER_ANCESTRAL",
    "SPECS",
]


def sigma_x0(
    model_output: jax.Array, x: jax.Array, sigma: jax.Array | float, prediction_type: str
) -> jax.Array:
    """The data prediction from a model output at noise level ``sigma`` for a sigma-space sample
    ``x = x_0 + sigma eps`` (the model having seen ``x / sqrt(sigma^2 + 1)``).

    The formulas of :func:`jaxdiff.diffusion.x0_and_eps` rewritten in sigma space, in diffusers'
    order of operations (``x - sigma eps`` rather than ``(x_t - sqrt(1 - abar) eps) / sqrt(abar)``,
    which rounds differently): eps ``x - sigma out``; x0 ``out``; v ``out (-sigma / sqrt(sigma^2 +
    1)) + x / (sigma^2 + 1)``. ``model_output, x: [B, ...]``; ``sigma`` a scalar.
    """
    kind = canonical_prediction_type(prediction_type)
    if kind == "eps":
        return x - sigma * model_output
    if kind == "x0":
        return model_output
    return model_output * (-sigma / jnp.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)


def euler_timesteps(
    schedule: Schedule,
    num_steps: int,
    *,
    spacing: str = "linspace",
    steps_offset: int = 0,
    sigma_schedule: str = "discrete",
    final_sigmas_type: str = "zero",
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> Grid:
    """The grid of ``EulerDiscreteScheduler.set_timesteps``: :func:`~jaxdiff.samplers.sigmas.
    sigma_grid` (fractional float32 ``timesteps [N]``, ``sigmas [N + 1]``); see there for the
    arguments and errors.

    Also raises ``ValueError`` for a grid with an infinite sigma: a zero-terminal-SNR schedule
    (``alphas_cumprod[-1] = 0``) sampled from ``t = T - 1``. diffusers' ``EulerDiscreteScheduler``
    (``rescale_betas_zero_snr=True``) replaces that ``alphas_cumprod[-1]`` by ``2**-24``; do the
    same to the schedule (``schedule.replace(alphas_cumprod=...)``) to match it."""
    grid = sigma_grid(schedule, num_steps, spacing=spacing, steps_offset=steps_offset,
                      sigma_schedule=sigma_schedule, final_sigmas_type=final_sigmas_type,
                      sigma_min=sigma_min, sigma_max=sigma_max)
    if not np.isfinite(grid.sigmas).all():
        raise ValueError(
            "the schedule's sigma is infinite at a grid timestep (alphas_cumprod = 0: zero "
            "terminal SNR); set alphas_cumprod[-1] to 2**-24 as diffusers' Euler scheduler does"
        )
    return grid


def _check_churn(s_churn, s_tmin, s_tmax, s_noise) -> tuple[float, float, float, float]:
    s_churn = check_float("s_churn", s_churn, minimum=0.0)
    s_tmin = check_float("s_tmin", s_tmin)
    if isinstance(s_tmax, (int, float)) and not isinstance(s_tmax, bool) and s_tmax == math.inf:
        s_tmax = math.inf
    else:
        s_tmax = check_float("s_tmax", s_tmax)
    if s_tmin > s_tmax:
        raise ValueError(f"s_tmin ({s_tmin}) must be <= s_tmax ({s_tmax})")
    s_noise = check_float("s_noise", s_noise, minimum=0.0)
    return s_churn, s_tmin, s_tmax, s_noise


def churn_gammas(
    sigmas: np.ndarray, s_churn: float, s_tmin: float = 0.0, s_tmax: float = math.inf
) -> np.ndarray:
    """Per-step churn ``gamma_i = min(s_churn / N, sqrt(2) - 1)`` where ``s_tmin <= sigmas[i] <=
    s_tmax``, else 0 (``EulerDiscreteScheduler.step``). ``sigmas: [N + 1]`` (a grid's); returns
    ``[N]`` float32. ``s_tmax`` may be ``inf``; ``ValueError`` naming the argument otherwise."""
    s_churn, s_tmin, s_tmax, _ = _check_churn(s_churn, s_tmin, s_tmax, 1.0)
    sig = np.asarray(sigmas, np.float32)[:-1]
    gamma = min(s_churn / sig.shape[0], 2**0.5 - 1)
    return np.where((s_tmin <= sig) & (sig <= s_tmax), gamma, 0.0).astype(np.float32)


def _prepare(model_output, x, noise, needs_noise: bool, why: str):
    if jnp.shape(model_output) != jnp.shape(x):
        raise ValueError(
            f"model_output must have x's shape {jnp.shape(x)}, got {jnp.shape(model_output)}"
        )
    if needs_noise:
        if noise is None:
            raise ValueError(f"noise is required {why}")
        if jnp.shape(noise) != jnp.shape(x):
            raise ValueError(f"noise must have x's shape {jnp.shape(x)}, got {jnp.shape(noise)}")
    dtype = jnp.promote_types(jnp.result_type(x), jnp.float32)
    return jnp.asarray(model_output).astype(dtype), jnp.asarray(x).astype(dtype), dtype


def euler_step(
    model_output: jax.Array,
    x: jax.Array,
    sigma: jax.Array | float,
    sigma_next: jax.Array | float,
    noise: jax.Array | None = None,
    *,
    prediction_type: str = "eps",
    gamma: jax.Array | float = 0.0,
    s_noise: jax.Array | float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """One Euler step from ``sigma`` to ``sigma_next`` (``EulerDiscreteScheduler.step``).

    Args:
      model_output: ``[B, ...]`` the model's output for ``scale_model_input(x, sigma)`` (before any
        churn: diffusers' order, see the module docstring).
      x: ``[B, ...]`` the sigma-space sample.
      sigma, sigma_next: scalars (``sigma > 0``; ``sigma_next = 0`` returns the predicted x0).
      noise: ``[B, ...]`` standard normal, required unless ``gamma`` is a concrete 0.
      prediction_type: ``"eps"``, ``"x0"`` or ``"v"`` (or diffusers' names).
      gamma: the churn (:func:`churn_gammas`): ``x += s_noise sqrt(sigma_hat^2 - sigma^2) noise``
        with ``sigma_hat = sigma (gamma + 1)``.
      s_noise: the churn noise scale.

    Returns:
      ``(x_next, pred_x0)``, both ``[B, ...]`` in at least float32.
    """
    kind = canonical_prediction_type(prediction_type)
    g = concrete(gamma)
    churn = g is None or float(g) > 0
    out, x, dtype = _prepare(model_output, x, noise, churn, "when gamma > 0 (or traced)")
    sigma = jnp.asarray(sigma, jnp.float32)
    sigma_next = jnp.asarray(sigma_next, jnp.float32)
    sigma_hat = sigma
    if churn:
        gamma = jnp.asarray(gamma, jnp.float32)
        sigma_hat = sigma * (gamma + 1)
        # sqrt(sigma_hat^2 - sigma^2), written so that gamma = 0 gives exactly 0 (XLA fuses the
        # difference of squares into an FMA, which can round it below 0: NaN).
        x = x + (noise.astype(dtype) * s_noise) * (sigma * jnp.sqrt(gamma * (gamma + 2)))
    pred_x0 = sigma_x0(out, x, sigma_hat if kind == "eps" else sigma, kind)
    derivative = (x - pred_x0) / sigma_hat
    return x + derivative * (sigma_next - sigma_hat), pred_x0


def euler_sample(
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
    final_sigmas_type: str = "zero",
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    noise: jax.Array | None = None,
    return_trajectory: bool = False,
    strength: float = 1.0,
    after_step=None,
):
    """Sample with Euler (``EulerDiscreteScheduler``) in one ``lax.scan`` of ``num_steps`` model
    calls.

    Args:
      model_fn: ``model_fn(x_t [B, ...], t [B] float32) -> [B, ...]`` (eps, x0 or v).
      schedule: the (concrete) training schedule.
      x_T: ``[B, ...]`` STANDARD NORMAL noise; scaled by ``init_noise_sigma`` here.
      key: required when ``s_churn > 0`` and ``noise`` is None (step ``i`` draws from
        ``fold_in(key, i)``); may be ``None`` otherwise.
      num_steps: ``1 <= num_steps <= T``.
      prediction_type: ``"eps"``, ``"x0"`` or ``"v"`` (or diffusers' names).
      spacing, steps_offset, sigma_schedule, final_sigmas_type, sigma_min, sigma_max: the grid
        (:func:`euler_timesteps`).
      s_churn, s_tmin, s_tmax, s_noise: the churn (module docstring); ``s_churn = 0`` (default)
        is the deterministic Euler ODE solver.
      noise: optional pre-drawn ``[M, B, ...]`` churn noise (used where ``gamma_i > 0``; ``M``
        the steps that run); shape-checked and unused when ``s_churn = 0``.
      return_trajectory: also return ``(xs [M + 1, B, ...], pred_x0s [M, B, ...])``.
      strength: image-to-image strength in ``(0, 1]``: run the last ``int(num_steps *
        strength)`` steps of the grid only, from step ``s = num_steps - int(num_steps *
        strength)`` (:func:`jaxdiff.samplers.noise_to_img2img`). With ``strength < 1``, ``x_T``
        is the SIGMA-SPACE sample at ``sigmas[s]`` (``x0 + sigma noise``), not scaled by
        ``init_noise_sigma``; the noise and trajectory cover the steps that run.
      after_step: optional ``(x_next, i) -> x_next`` applied to each step's output
        (:func:`jaxdiff.samplers.driver.run_scan`; 4-channel inpainting's blending).

    Returns:
      ``x_0 [B, ...]`` float32 (or wider), or ``(x_0, xs, pred_x0s)``.

    Raises:
      ValueError: naming the argument, for a bad grid or option, a missing key, a mis-shaped
        ``noise`` or model output.
    """
    kind = canonical_prediction_type(prediction_type)
    s_churn, s_tmin, s_tmax, s_noise = _check_churn(s_churn, s_tmin, s_tmax, s_noise)
    grid = euler_timesteps(schedule, num_steps, spacing=spacing, steps_offset=steps_offset,
                           sigma_schedule=sigma_schedule, final_sigmas_type=final_sigmas_type,
                           sigma_min=sigma_min, sigma_max=sigma_max)
    stochastic = s_churn > 0
    gammas = jnp.asarray(churn_gammas(grid.sigmas, s_churn, s_tmin, s_tmax))
    start = strength_start_step(num_steps, strength)
    x_T = prepare_x_T(x_T)
    if start == 0:
        x_T = x_T * init_noise_sigma(grid, spacing)
    model = checked_model(model_fn, x_T.shape)
    ts, sig = jnp.asarray(grid.timesteps), jnp.asarray(grid.sigmas)

    def body(state, x, i, z):
        out = model(scale_model_input(x, sig[i]), ts[i])
        x_next, x0 = euler_step(out, x, sig[i], sig[i + 1], z, prediction_type=kind,
                                gamma=gammas[i] if stochastic else 0.0, s_noise=s_noise)
        return state, x_next, x0

    return run_scan(body, None, x_T, key, num_steps, stochastic=stochastic, noise=noise,
                    return_trajectory=return_trajectory, start_step=start,
                    after_step=after_step)


def euler_ancestral_step(
    model_output: jax.Array,
    x: jax.Array,
    sigma: jax.Array | float,
    sigma_next: jax.Array | float,
    noise: jax.Array,
    *,
    prediction_type: str = "eps",
) -> tuple[jax.Array, jax.Array]:
    """One Euler ancestral step (``EulerAncestralDiscreteScheduler.step``): an Euler step to
    ``sigma_down = sqrt(sigma_next^2 - sigma_up^2)``, then ``+ sigma_up noise`` with ``sigma_up =
    sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)``.

    Args:
      model_output: ``[B, ...]`` the model's output for ``scale_model_input(x, sigma)``.
      x: ``[B, ...]`` the sigma-space sample.
      sigma, sigma_next: scalars, ``sigma > 0``, ``0 <= sigma_next <= sigma``.
      noise: ``[B, ...]`` standard normal (required; scaled by 0 when ``sigma_next = 0``).
      prediction_type: ``"eps"``, ``"x0"`` or ``"v"`` (diffusers' scheduler has no x0).

    Returns:
      ``(x_next, pred_x0)``, both ``[B, ...]`` in at least float32.
    """
    kind = canonical_prediction_type(prediction_type)
    out, x, dtype = _prepare(model_output, x, noise, True, "by the ancestral step")
    sigma = jnp.asarray(sigma, jnp.float32)
    sigma_next = jnp.asarray(sigma_next, jnp.float32)
    pred_x0 = sigma_x0(out, x, sigma, kind)
    # Clamped at 0: XLA's FMA contraction can round a zero difference of squares below 0.
    sigma_up = jnp.sqrt(jnp.maximum(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0))
    sigma_down = jnp.sqrt(jnp.maximum(sigma_next**2 - sigma_up**2, 0.0))
    derivative = (x - pred_x0) / sigma
    x_next = x + derivative * (sigma_down - sigma)
    return x_next + noise.astype(dtype) * sigma_up, pred_x0


def euler_ancestral_sample(
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
    """Sample with Euler ancestral (``EulerAncestralDiscreteScheduler``) in one ``lax.scan``.

    Arguments, returns and errors as :func:`euler_sample` (the sigma-space contract), except:
    always stochastic (``key`` or ``noise [M, B, ...]`` is required, ``M`` the steps that run;
    step ``i`` uses ``noise[i]``, the last one scaled by ``sigma_up = 0``); ``sigma_schedule``
    other than ``"discrete"`` (diffusers' scheduler has only that) uses the same Karras /
    exponential / beta grids as :func:`euler_sample`; the final sigma is 0.
    """
    kind = canonical_prediction_type(prediction_type)
    grid = euler_timesteps(schedule, num_steps, spacing=spacing, steps_offset=steps_offset,
                           sigma_schedule=sigma_schedule)
    start = strength_start_step(num_steps, strength)
    x_T = prepare_x_T(x_T)
    if start == 0:
        x_T = x_T * init_noise_sigma(grid, spacing)
    model = checked_model(model_fn, x_T.shape)
    ts, sig = jnp.asarray(grid.timesteps), jnp.asarray(grid.sigmas)

    def body(state, x, i, z):
        out = model(scale_model_input(x, sig[i]), ts[i])
        x_next, x0 = euler_ancestral_step(out, x, sig[i], sig[i + 1], z, prediction_type=kind)
        return state, x_next, x0

    return run_scan(body, None, x_T, key, num_steps, stochastic=True, noise=noise,
                    return_trajectory=return_trajectory, start_step=start)


def _grid(schedule: Schedule, num_steps: int, *, strength: float = 1.0, spacing: str = "linspace",
          steps_offset: int = 0, sigma_schedule: str = "discrete", final_sigmas_type: str = "zero",
          sigma_min: float | None = None, sigma_max: float | None = None, **_) -> Grid:
    return euler_timesteps(schedule, num_steps, spacing=spacing, steps_offset=steps_offset,
                           sigma_schedule=sigma_schedule, final_sigmas_type=final_sigmas_type,
                           sigma_min=sigma_min, sigma_max=sigma_max)


def _ancestral_grid(schedule: Schedule, num_steps: int, *, strength: float = 1.0,
                    spacing: str = "linspace", steps_offset: int = 0,
                    sigma_schedule: str = "discrete", **_) -> Grid:
    return euler_timesteps(schedule, num_steps, spacing=spacing, steps_offset=steps_offset,
                           sigma_schedule=sigma_schedule)


EULER = SamplerSpec(
    name="euler",
    after_step=True,
    sample=euler_sample,
    grid=_grid,
    options=dict(prediction_type="eps", spacing="linspace", steps_offset=0,
                 sigma_schedule="discrete", final_sigmas_type="zero", sigma_min=None,
                 sigma_max=None, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0),
    noise_space="sigma_ve",
    stochastic=lambda o: float(o["s_churn"]) > 0,
    diffusers=DiffusersTwin(
        "EulerDiscreteScheduler",
        defaults=dict(prediction_type="epsilon", interpolation_type="linear",
                      use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                      sigma_min=None, sigma_max=None, timestep_spacing="linspace",
                      timestep_type="discrete", steps_offset=0, final_sigmas_type="zero"),
        options=dict(K_DIFFUSION_OPTIONS,
                     sigma_schedule=lambda c: sigma_schedule_option(c, "EulerDiscreteScheduler"),
                     final_sigmas_type=config_key("final_sigmas_type"),
                     sigma_min=config_key("sigma_min"), sigma_max=config_key("sigma_max")),
        must_be=dict(interpolation_type=("linear",), timestep_type=("discrete",)),
        zero_snr_floor=True,
    ),
)
EULER_ANCESTRAL = SamplerSpec(
    name="euler_ancestral",
    sample=euler_ancestral_sample,
    grid=_ancestral_grid,
    options=dict(prediction_type="eps", spacing="linspace", steps_offset=0,
                 sigma_schedule="discrete"),
    noise_space="sigma_ve",
    stochastic=lambda o: True,
    diffusers=DiffusersTwin(
        "EulerAncestralDiscreteScheduler",
        defaults=dict(prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0),
        options=dict(K_DIFFUSION_OPTIONS),
        zero_snr_floor=True,
    ),
)
SPECS = (EULER, EULER_ANCESTRAL)
