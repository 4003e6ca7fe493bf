"""Heun's second-order method (Karras et al. 2022, Algorithm 1) in sigma space, as one
``lax.scan``.

Matches diffusers' ``HeunDiscreteScheduler`` (0.42): prediction types eps / v / x0, timestep
spacing and ``steps_offset``, Karras / exponential / beta sigmas, and ``clip_sample`` (here
``clip_x0``, applied to both stages' predicted x0). The sigma-space contract (standard normal
``x_T`` scaled by ``init_noise_sigma`` here, the model fed ``scale_model_input`` at fractional
float32 timesteps, x_0 returned in data space) is :mod:`jaxdiff.samplers.euler`'s.

diffusers interleaves the two stages into one list of ``2N - 1`` model calls (timesteps ``[t_0,
t_1, t_1, t_2, t_2, ..., t_{N-1}, t_{N-1}]``, one ``step()`` per call). Here one scan step is one
Heun step and makes both calls: :func:`heun_step` takes the model function. Step ``i`` goes from
``sigma_i`` to ``sigma_{i+1}``:

    d = (x - x0(x, sigma_i, t_i)) / sigma_i;  x' = x + d (sigma_{i+1} - sigma_i)
    d' = (x' - x0(x', sigma_{i+1}, t_{i+1})) / sigma_{i+1};  x_next = x + (d + d')/2 (sigma_{i+1}
    - sigma_i)

except the last step, whose ``sigma_N = 0``: it is the Euler step ``x'`` alone (one model call,
as in diffusers; ``2N - 1`` calls in all).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.diffusion import canonical_prediction_type
from jaxdiff.samplers.diffusers_names import (
    K_DIFFUSION_DEFAULTS,
    K_DIFFUSION_OPTIONS,
    SCHEDULE_KEYS_NO_RESCALE,
    clip_option,
    sigma_schedule_option,
)
from jaxdiff.samplers.driver import checked_model, prepare_x_T, run_scan, strength_start_step
from jaxdiff.samplers.euler import euler_timesteps, sigma_x0
from jaxdiff.samplers.sigmas import init_noise_sigma, scale_model_input
from jaxdiff.samplers.spec import DiffusersTwin, SamplerSpec
from jaxdiff.samplers.timesteps import Grid
from jaxdiff.schedules import Schedule
from jaxdiff.types import ModelFn
from jaxdiff.validation import check_clip, concrete

__all__ = ["heun_timesteps", "heun_step", "heun_sample", "second_stage", "HEUN", "SPECS"]


def heun_timesteps(
    schedule: Schedule,
    num_steps: int,
    *,
    spacing: str = "linspace",
    steps_offset: int = 0,
    sigma_schedule: str = "discrete",
) -> Grid:
    """Heun's grid: ``HeunDiscreteScheduler.set_timesteps`` before its interleaving, which is
    :func:`~jaxdiff.samplers.euler.euler_timesteps` with a final sigma of 0 (fractional float32
    ``timesteps [N]``, ``sigmas [N + 1]``). Step ``i``'s second model call is at ``timesteps[i +
    1]``, ``sigmas[i + 1]``. Arguments and errors: see ``euler_timesteps``."""
    return euler_timesteps(schedule, num_steps, spacing=spacing, steps_offset=steps_offset,
                           sigma_schedule=sigma_schedule)


def second_stage(sigma_stage: jax.Array | float, stage, first_order: jax.Array):
    """``stage(None)`` where ``sigma_stage > 0``, else ``first_order``: a Python branch for a
    concrete ``sigma_stage``, a ``lax.cond`` (so only one branch runs) for a traced one. The
    second model call of the two-stage samplers (Heun, KDPM2) is skipped at ``sigma = 0``."""
    c = concrete(sigma_stage)
    if c is not None:
        return stage(None) if float(c) > 0 else first_order
    return jax.lax.cond(sigma_stage > 0, stage, lambda _: first_order, None)


def heun_step(
    model_fn: ModelFn,
    x: jax.Array,
    t: jax.Array | float,
    t_next: jax.Array | float,
    sigma: jax.Array | float,
    sigma_next: jax.Array | float,
    *,
    prediction_type: str = "eps",
    clip_x0: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One Heun step from ``sigma`` to ``sigma_next``: both of diffusers' ``step()`` calls.

    Args:
      model_fn: ``model_fn(x_t [B, ...], t [B] float32) -> [B, ...]``; called at
        ``(scale_model_input(x, sigma), t)`` and, when ``sigma_next > 0``, at the Euler
        prediction ``(scale_model_input(x', sigma_next), t_next)``.
      x: ``[B, ...]`` the sigma-space sample (at least float32).
      t, t_next: scalar (fractional) timesteps of ``sigma`` and ``sigma_next``; ``t_next`` is
        unused when ``sigma_next = 0``.
      sigma, sigma_next: scalars, ``sigma > 0``, ``sigma_next >= 0`` (0: one Euler step to the
        predicted x0). Traced values are fine (the second call then runs under ``lax.cond``).
      prediction_type: ``"eps"``, ``"x0"`` or ``"v"`` (or diffusers' names).
      clip_x0: clip both predicted x0 to ``[-clip_x0, clip_x0]``; ``None`` for no clipping.

    Returns:
      ``(x_next, pred_x0)``: ``[B, ...]`` in ``x``'s dtype (at least float32), and the first
      stage's predicted x0.
    """
    kind = canonical_prediction_type(prediction_type)
    clip_x0 = check_clip(clip_x0)
    x = jnp.asarray(x)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    x = x.astype(dtype)
    model = checked_model(model_fn, x.shape)
    sigma = jnp.asarray(sigma, jnp.float32)
    s_next = jnp.asarray(sigma_next, jnp.float32)

    def x0_at(y, s, tt):
        pred = sigma_x0(model(scale_model_input(y, s), tt).astype(dtype), y, s, kind)
        return pred if clip_x0 is None else jnp.clip(pred, -clip_x0, clip_x0)

    pred_x0 = x0_at(x, sigma, t)
    derivative = (x - pred_x0) / sigma
    dt = s_next - sigma
    x_euler = x + derivative * dt

    def correct(_):
        d2 = (x_euler - x0_at(x_euler, s_next, t_next)) / s_next
        return x + ((derivative + d2) / 2) * dt

    return second_stage(sigma_next, correct, x_euler).astype(dtype), pred_x0


def heun_sample(
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
    clip_x0: float | None = None,
    noise: jax.Array | None = None,
    return_trajectory: bool = False,
    strength: float = 1.0,
):
    """Sample with Heun's method (``HeunDiscreteScheduler``) in one ``lax.scan`` of ``num_steps``
    steps (``2 num_steps - 1`` model calls).

    Args:
      model_fn: ``model_fn(x_t [B, ...], t [B] float32) -> [B, ...]`` (eps, x0 or v).
      schedule: the (concrete) training schedule.
      x_T: ``[B, ...]`` STANDARD NORMAL noise; scaled by ``init_noise_sigma`` here.
      key: accepted and unused (deterministic; may be ``None``).
      num_steps: ``1 <= num_steps <= T``.
      prediction_type: ``"eps"``, ``"x0"`` or ``"v"``.
      spacing, steps_offset, sigma_schedule: the grid (:func:`heun_timesteps`).
      clip_x0: see :func:`heun_step` (diffusers' ``clip_sample`` / ``clip_sample_range``).
      noise: accepted for the common contract: ``[M, B, ...]`` (``M`` the steps that run) is
        shape-checked and unused (deterministic).
      return_trajectory: also return ``(xs [M + 1, B, ...], pred_x0s [M, B, ...])``: the sample
        after each full step (``xs[0] = x_T * init_noise_sigma``) and each step's first-stage
        predicted x0.
      strength: image-to-image strength in ``(0, 1]``: run steps ``s .. num_steps - 1`` only,
        ``s = num_steps - int(num_steps * strength)`` (diffusers' ``set_begin_index(2 s)`` on
        its interleaved list; :func:`jaxdiff.samplers.noise_to_img2img`). With ``strength <
        1``, ``x_T`` is the SIGMA-SPACE sample at ``sigmas[s]`` (``x0 + sigma noise``), not
        scaled by ``init_noise_sigma``.

    Returns:
      ``x_0 [B, ...]`` float32 (or wider), or ``(x_0, xs, pred_x0s)``.

    Raises:
      ValueError: naming the argument, for a bad grid or option or a mis-shaped model output.
    """
    kind = canonical_prediction_type(prediction_type)
    clip_x0 = check_clip(clip_x0)
    grid = heun_timesteps(schedule, num_steps, spacing=spacing, steps_offset=steps_offset,
                          sigma_schedule=sigma_schedule)
    start = strength_start_step(num_steps, strength)
    x_T = prepare_x_T(x_T)
    if start == 0:
        x_T = x_T * init_noise_sigma(grid, spacing)
    # t_{i+1} for the second call; the last step (sigma_N = 0) makes none.
    ts = jnp.asarray(grid.timesteps)
    ts_next = jnp.concatenate([ts[1:], ts[-1:]])
    sig = jnp.asarray(grid.sigmas)

    def body(state, x, i, z):
        x_next, x0 = heun_step(model_fn, x, ts[i], ts_next[i], sig[i], sig[i + 1],
                               prediction_type=kind, clip_x0=clip_x0)
        return state, x_next, x0

    return run_scan(body, None, x_T, key, num_steps, stochastic=False, noise=noise,
                    return_trajectory=return_trajectory, start_step=start)


def _grid(schedule: Schedule, num_steps: int, *, strength: float = 1.0, spacing: str = "linspace",
          steps_offset: int = 0, sigma_schedule: str = "discrete", **_) -> Grid:
    return heun_timesteps(schedule, num_steps, spacing=spacing, steps_offset=steps_offset,
                          sigma_schedule=sigma_schedule)


HEUN = SamplerSpec(
    name="heun",
    sample=heun_sample,
    grid=_grid,
    options=dict(prediction_type="eps", spacing="linspace", steps_offset=0,
                 sigma_schedule="discrete", clip_x0=None),
    noise_space="sigma_ve",
    stochastic=lambda o: False,
    diffusers=DiffusersTwin(
        "HeunDiscreteScheduler",
        defaults=dict(K_DIFFUSION_DEFAULTS, clip_sample=False, clip_sample_range=1.0),
        options=dict(K_DIFFUSION_OPTIONS, clip_x0=clip_option,
                     sigma_schedule=lambda c: sigma_schedule_option(c, "HeunDiscreteScheduler")),
        schedule_defaults=dict(beta_start=0.00085, beta_end=0.012),
        schedule_keys=SCHEDULE_KEYS_NO_RESCALE,  # diffusers ignores rescale_betas_zero_snr
    ),
)
SPECS = (HEUN,)
