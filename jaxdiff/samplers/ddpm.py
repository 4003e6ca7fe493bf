"""DDPM ancestral sampling (Ho et al. 2020): a step function and one ``lax.scan``.

Matches ``diffusers.DDPMScheduler.step`` (0.42), including the general previous timestep of a
shortened schedule (``num_steps < T``: the effective ``beta_t = 1 - abar_t / abar_prev``) and the
variance types:

- ``"fixed_small"``: the posterior variance ``(1 - abar_prev) / (1 - abar_t) * beta_t`` (clamped to
  ``>= 1e-20``); ``"fixed_small_log"`` the same through ``exp(0.5 * log(var))``;
- ``"fixed_large"``: ``beta_t``;
- ``"learned"``: the model predicts the variance itself;
- ``"learned_range"`` (Nichol & Dhariwal 2021): the model predicts ``v in [-1, 1]`` and the log
  variance is ``(v+1)/2 * log(beta_t) + (1-v)/2 * log(fixed_small)``.

For the learned types the model output carries ``2C`` channels on the LAST axis (NHWC): the
first ``C`` are the mean prediction, the last ``C`` the variance prediction.

Noise on the last step: as in diffusers, a step adds ``std * noise`` whenever ``t > 0``. The
default (``"leading"``/``"linspace"``) grids end at ``t == 0`` and return the mean, but a grid
ending at ``t > 0`` (``"trailing"`` spacing, or ``steps_offset=1``) adds noise to the returned
sample: negligible for ``"fixed_small"`` (its variance at ``t_prev = -1`` is the ``1e-20`` clamp),
``sqrt(1 - abar_t)`` for ``"fixed_large"``. Pass ``final_noise=False`` to return the mean on every
step whose ``t_prev < 0``.

The sampler's carry is at least float32 whatever ``x_T``'s dtype (a bf16 model output is promoted
at each step, and the state is never re-rounded to bf16).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.diffusion import canonical_prediction_type, x0_and_eps
from jaxdiff.samplers.diffusers_names import (
    BETA_SCHEDULES_COMMON,
    THRESHOLD_KEYS,
    clip_option,
    config_key,
    prediction_option,
)
from jaxdiff.samplers.driver import checked_model, prepare_x_T, run_scan, strength_start_step
from jaxdiff.samplers.spec import DiffusersTwin, SamplerSpec
from jaxdiff.samplers.timesteps import Grid, ddpm_timesteps, gather
from jaxdiff.schedules import Schedule
from jaxdiff.types import ModelFn
from jaxdiff.validation import check_bool, check_choice, check_clip, check_timestep

__all__ = ["VARIANCE_TYPES", "ddpm_posterior", "ddpm_step", "ddpm_sample", "DDPM", "SPECS"]

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
_LEARNED = ("learned", "learned_range")


def _check_variance_type(variance_type: str) -> str:
    return check_choice("variance_type", variance_type, VARIANCE_TYPES)


def _output_shape(x_shape: tuple, variance_type: str) -> tuple:
    if variance_type in _LEARNED:
        return (*x_shape[:-1], 2 * x_shape[-1])
    return tuple(x_shape)


def _posterior(schedule, model_output, x_t, t, t_prev, variance_type, prediction_type, clip_x0):
    """``(pred_x0, mean, std)`` with ``std`` computed in diffusers' operation order."""
    prediction_type = canonical_prediction_type(prediction_type)
    variance_type = _check_variance_type(variance_type)
    clip_x0 = check_clip(clip_x0)
    T = schedule.num_timesteps
    check_timestep("t", t, T)
    check_timestep("t_prev", t_prev, T, allow_negative=True)
    expected = _output_shape(x_t.shape, variance_type)
    if model_output.shape != expected:
        raise ValueError(
            f"model_output must have shape {expected} for variance_type={variance_type!r} "
            f"and x_t of shape {x_t.shape}, got {model_output.shape}"
        )
    dtype = jnp.promote_types(x_t.dtype, jnp.float32)  # compute in >= float32 (bf16 models)
    x_t, model_output = x_t.astype(dtype), model_output.astype(dtype)
    predicted_variance = None
    if variance_type in _LEARNED:
        C = x_t.shape[-1]
        model_output, predicted_variance = model_output[..., :C], model_output[..., C:]

    acp = schedule.alphas_cumprod
    t_prev = jnp.asarray(t_prev)
    a_t = gather(acp, t)
    # Gather at max(t_prev, 0): the final step's t_prev = -1 is never read (checkify would flag it).
    a_prev = jnp.where(t_prev >= 0, gather(acp, jnp.maximum(t_prev, 0)), jnp.float32(1.0))
    b_t = 1.0 - a_t
    b_prev = 1.0 - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = 1.0 - cur_alpha

    pred_x0, _ = x0_and_eps(model_output, x_t, jnp.sqrt(a_t), jnp.sqrt(b_t), prediction_type)
    if clip_x0 is not None:
        pred_x0 = jnp.clip(pred_x0, -clip_x0, clip_x0)
    mean = (jnp.sqrt(a_prev) * cur_beta) / b_t * pred_x0 + jnp.sqrt(cur_alpha) * b_prev / b_t * x_t

    small = jnp.maximum(b_prev / b_t * cur_beta, 1e-20)
    if variance_type == "fixed_small":
        std = jnp.sqrt(small)
    elif variance_type == "fixed_small_log":
        std = jnp.exp(0.5 * jnp.log(small))
    elif variance_type == "fixed_large":
        std = jnp.sqrt(cur_beta)
    elif variance_type == "learned":
        std = jnp.sqrt(predicted_variance)
    else:  # learned_range
        frac = (predicted_variance + 1) / 2
        log_var = frac * jnp.log(cur_beta) + (1 - frac) * jnp.log(small)
        std = jnp.exp(0.5 * log_var)
    return pred_x0, mean, std


def ddpm_posterior(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array | int,
    t_prev: jax.Array | int,
    *,
    variance_type: str = "fixed_small",
    prediction_type: str,
    clip_x0: float | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The model's reverse distribution ``p(x_{t_prev} | x_t) = N(mean, variance)``.

    Args:
      model_output: ``[B, ..., C]`` (``[B, ..., 2C]`` for the learned variance types).
      x_t: ``[B, ..., C]``. t: scalar int in ``[0, T)``; t_prev: scalar int, ``-1`` after the
        last step.
      variance_type, prediction_type, clip_x0: as in :func:`ddpm_step`.

    Returns:
      ``(pred_x0, mean, variance)``: ``[B, ..., C]`` each, except that ``variance`` is a scalar
      for the fixed types. The variance applies whenever ``t > 0``; at ``t == 0`` the step adds
      no noise.
    """
    pred_x0, mean, std = _posterior(
        schedule, model_output, x_t, t, t_prev, variance_type, prediction_type, clip_x0
    )
    return pred_x0, mean, std**2


def ddpm_step(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array | int,
    t_prev: jax.Array | int,
    noise: jax.Array,
    *,
    variance_type: str = "fixed_small",
    prediction_type: str,
    clip_x0: float | None,
    final_noise: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """One ancestral step ``x_t -> x_{t_prev}`` (``DDPMScheduler.step``).

    Args:
      schedule: the training schedule (``[T]`` arrays).
      model_output: ``[B, ..., C]`` eps / x0 / v by ``prediction_type``; ``[B, ..., 2C]`` (mean
        prediction then variance prediction on the last axis) for ``"learned"``/``"learned_range"``.
      x_t: ``[B, ..., C]``.
      t: 0-d int in ``[0, T)``. t_prev: 0-d int, the next timestep of the grid or ``-1`` after
        the last (``T``-step sampling: ``t - 1``). Concrete out-of-range values, non-integer
        dtypes and non-scalar shapes (a ``[B]`` t would broadcast against the channels) raise.
      noise: ``[B, ..., C]`` standard normal noise, scaled by the std and added when ``t > 0``
        (and, with ``final_noise=False``, ``t_prev >= 0``).
      variance_type: one of :data:`VARIANCE_TYPES`.
      prediction_type: ``"eps"``/``"epsilon"``, ``"x0"``/``"sample"`` or ``"v"``/``"v_prediction"``.
      clip_x0: clip the predicted ``x0`` to ``[-clip_x0, clip_x0]``; ``None`` for no clipping.
      final_noise: ``True`` (diffusers): a last step (``t_prev < 0``) from ``t > 0`` adds noise too;
        ``False``: it returns the mean. See the module docstring.

    Returns:
      ``(x_prev, pred_x0)``, both ``[B, ..., C]``; ``x_prev`` has ``x_t``'s dtype (computed in
      at least float32).
    """
    if noise is None or noise.shape != x_t.shape:
        got = None if noise is None else noise.shape
        raise ValueError(f"noise must have x_t's shape {x_t.shape} (zeros for the mean), got {got}")
    pred_x0, mean, std = _posterior(
        schedule, model_output, x_t, t, t_prev, variance_type, prediction_type, clip_x0
    )
    final_noise = check_bool("final_noise", final_noise)
    add = jnp.asarray(t) > 0
    if not final_noise:
        add = add & (jnp.asarray(t_prev) >= 0)
    x_prev = mean + jnp.where(add, std, 0.0) * noise
    return x_prev.astype(x_t.dtype), pred_x0


def ddpm_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array | None = None,
    *,
    num_steps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
    variance_type: str = "fixed_small",
    prediction_type: str = "eps",
    clip_x0: float | None = None,
    noise: jax.Array | None = None,
    final_noise: bool = True,
    return_trajectory: bool = False,
    strength: float = 1.0,
):
    """Ancestral DDPM sampling in one ``lax.scan`` (1,000 steps are one XLA computation).

    Args:
      model_fn: ``model_fn(x: [B, ..., C], t: [B] int32) -> [B, ..., C]`` (``2C`` channels for the
        learned variance types).
      schedule: the training schedule; ``T = schedule.num_timesteps``.
      x_T: ``[B, ..., C]`` the starting noise, carried in at least float32.
      key: a PRNG key (step ``i`` draws from ``fold_in(key, i)``); required unless ``noise`` is
        given.
      num_steps: ``1 <= num_steps <= T`` on the ``spacing`` grid (``DDPMScheduler.set_timesteps``;
        see :func:`ddpm_timesteps`); ``num_steps = T`` is the full ancestral chain.
      spacing, steps_offset: the timestep grid.
      variance_type, prediction_type, clip_x0: see :func:`ddpm_step`.
      noise: optional ``[M, B, ..., C]`` pre-drawn noise, used instead of drawing from ``key``,
        ``M`` the steps that run (``num_steps`` unless ``strength < 1``).
      final_noise: ``True`` (the default, as diffusers): the last step adds ``std * noise`` when
        its ``t > 0``, which happens with ``spacing="trailing"`` or ``steps_offset >= 1`` (the
        grid then ends above 0), so the returned sample is not the mean. ``False``: the last step
        (``t_prev = -1``) returns the mean. The default grids end at ``t = 0``: no difference.
      return_trajectory: also return the path.
      strength: image-to-image strength in ``(0, 1]``: run the last ``int(num_steps *
        strength)`` steps of the grid only, from ``x_T`` noised to the first of them
        (:func:`jaxdiff.samplers.noise_to_img2img`); 1 (the default) is text-to-image.

    Returns:
      ``x_0: [B, ..., C]`` float32 (or wider); with ``return_trajectory``, ``(x_0, xs,
      pred_x0s)`` where ``xs: [M + 1, B, ...]`` holds ``x_T`` then every step's output and
      ``pred_x0s: [M, B, ...]`` every step's predicted ``x0``.

    Raises:
      ValueError: naming the argument, for a bad grid or option, a ``strength`` keeping no step,
        a missing key, a mis-shaped ``noise`` or model output.
    """
    prediction_type = canonical_prediction_type(prediction_type)
    variance_type = _check_variance_type(variance_type)
    clip_x0 = check_clip(clip_x0)
    final_noise = check_bool("final_noise", final_noise)
    grid = ddpm_timesteps(schedule, num_steps, spacing, steps_offset)
    x_T = prepare_x_T(x_T)
    model = checked_model(model_fn, _output_shape(x_T.shape, variance_type))
    ts, ts_prev = jnp.asarray(grid.timesteps), jnp.asarray(grid.prev_timesteps)

    def body(state, x, i, z):
        t = ts[i]
        x_prev, pred_x0 = ddpm_step(
            schedule, model(x, t), x, t, ts_prev[i], z,
            variance_type=variance_type, prediction_type=prediction_type, clip_x0=clip_x0,
            final_noise=final_noise,
        )
        return state, x_prev, pred_x0

    start = strength_start_step(num_steps, strength)
    return run_scan(body, None, x_T, key, len(ts), stochastic=True, noise=noise,
                    return_trajectory=return_trajectory, start_step=start)


def _grid(schedule: Schedule, num_steps: int, *, strength: float = 1.0, spacing: str = "leading",
          steps_offset: int = 0, **_) -> Grid:
    return ddpm_timesteps(schedule, num_steps, spacing, steps_offset)


DDPM = SamplerSpec(
    name="ddpm",
    sample=ddpm_sample,
    grid=_grid,
    options=dict(spacing="leading", steps_offset=0, variance_type="fixed_small",
                 prediction_type="eps", clip_x0=None, final_noise=True),
    noise_space="alphas_cumprod",
    stochastic=lambda o: True,
    diffusers=DiffusersTwin(
        "DDPMScheduler",
        defaults=dict(variance_type="fixed_small", clip_sample=True, prediction_type="epsilon",
                      thresholding=False, dynamic_thresholding_ratio=0.995,
                      clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading",
                      steps_offset=0),
        options=dict(clip_x0=clip_option, variance_type=config_key("variance_type"),
                     steps_offset=config_key("steps_offset"),
                     spacing=config_key("timestep_spacing"), prediction_type=prediction_option),
        must_be=dict(thresholding=(False,)),
        no_effect=THRESHOLD_KEYS,
        beta_schedules=BETA_SCHEDULES_COMMON + ("sigmoid",),  # the only class with sigmoid
    ),
)
SPECS = (DDPM,)
