"""DDIM (Song et al. 2021): a step function and one ``lax.scan`` over the timesteps.

Matches ``diffusers.DDIMScheduler`` (0.42): the same timestep grids (:func:`ddim_timesteps`), the
same ``prev_timestep = t - T // num_steps``, ``set_alpha_to_one`` for the final step, clipping of
the predicted ``x0`` and ``use_clipped_model_output``. ``eta = 0`` is deterministic; ``eta = 1`` is
DDPM-like ancestral sampling on the sub-sequence.

Clipping: with ``clip_x0`` and the default ``use_clipped_model_output=False`` (diffusers'
default, kept for parity) the update combines the clipped ``x0`` with the model's unclipped eps,
two predictions that disagree wherever clipping bites, which happens most on schedules whose early
``x0`` predictions lie far outside the data range (cosine, near ``T``); ``python -m
experiments.eval_sweep --ddim_clip diffusers`` measures the effect on a trained model. Pass
``use_clipped_model_output=True`` whenever you clip.

Example (``apply(params, x, t)`` a denoiser)::

    sample = jax.jit(lambda p, x: ddim_sample(partial(apply, p), sched, x, None, num_steps=50))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.diffusion import canonical_prediction_type, x0_and_eps
from jaxdiff.samplers.diffusers_names import (
    THRESHOLD_KEYS,
    clip_option,
    config_key,
    prediction_option,
)
from jaxdiff.samplers.driver import checked_model, prepare_x_T, run_scan, strength_start_step
from jaxdiff.samplers.spec import DiffusersTwin, SamplerSpec
from jaxdiff.samplers.timesteps import Grid, ddim_timesteps, gather
from jaxdiff.schedules import Schedule
from jaxdiff.types import ModelFn
from jaxdiff.validation import check_bool, check_clip, check_float, check_timestep, concrete

__all__ = ["ddim_step", "ddim_sample", "check_eta", "DDIM", "SPECS"]


def check_eta(eta) -> float | jax.Array:
    """A concrete ``eta`` as a float in ``[0, 1]``; a traced one unchanged.

    Above 1 the DDIM noise ``std = eta * sqrt(variance)`` exceeds ``sqrt(1 - abar_prev)``, the
    direction term ``sqrt(1 - abar_prev - std^2)`` is the square root of a negative number and the
    sample is NaN; diffusers returns NaN silently, jaxdiff raises.
    """
    if concrete(eta) is None:
        return eta
    return check_float("eta", eta, minimum=0.0, maximum=1.0)


def ddim_step(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array | int,
    t_prev: jax.Array | int,
    noise: jax.Array | None,
    *,
    eta: float | jax.Array,
    prediction_type: str,
    clip_x0: float | None,
    set_alpha_to_one: bool,
    use_clipped_model_output: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM update ``x_t -> x_{t_prev}`` (``DDIMScheduler.step``).

    Args:
      schedule: the training schedule (``[T]`` arrays).
      model_output: ``[B, ...]`` like ``x_t``: eps, x0 or v by ``prediction_type``.
      x_t: ``[B, ...]`` the current sample.
      t: 0-d int timestep in ``[0, T)``; t_prev: 0-d int, negative for the final step (then
        ``alpha_cumprod_prev`` is 1 with ``set_alpha_to_one``, else ``alphas_cumprod[0]``). Concrete
        out-of-range values raise; traced ones read NaN. Non-integer dtypes and non-scalar shapes
        (a ``[B]`` t would broadcast against the channel axis) raise ``ValueError``.
      noise: ``[B, ...]`` standard normal noise, used when ``eta > 0`` (may be ``None`` at
        ``eta == 0``).
      eta: in ``[0, 1]`` (:func:`check_eta`); may be traced (then noise is always required and
        scaled by ``std = 0`` at 0; a traced ``eta > 1`` gives NaN).
      prediction_type: ``"eps"``/``"epsilon"``, ``"x0"``/``"sample"`` or ``"v"``/``"v_prediction"``.
      clip_x0: clip the predicted ``x0`` to ``[-clip_x0, clip_x0]``; ``None`` for no clipping.
      use_clipped_model_output: re-derive eps from the clipped ``x0`` (GLIDE).

    Returns:
      ``(x_prev, pred_x0)``, both ``[B, ...]``; ``x_prev`` has ``x_t``'s dtype (computed in at
      least float32).
    """
    prediction_type = canonical_prediction_type(prediction_type)
    clip_x0 = check_clip(clip_x0)
    T = schedule.num_timesteps
    check_timestep("t", t, T)
    check_timestep("t_prev", t_prev, T, allow_negative=True)
    if model_output.shape != x_t.shape:
        raise ValueError(
            f"model_output must have x_t's shape {x_t.shape}, got {model_output.shape}"
        )
    eta = check_eta(eta)
    stochastic = not isinstance(eta, float) or eta > 0
    if stochastic:
        if noise is None:
            raise ValueError("noise is required when eta > 0 (or eta is traced)")
        if noise.shape != x_t.shape:
            raise ValueError(f"noise must have x_t's shape {x_t.shape}, got {noise.shape}")

    dtype = jnp.promote_types(x_t.dtype, jnp.float32)  # compute in >= float32 (bf16 models)
    out_dtype = x_t.dtype
    x_t, model_output = x_t.astype(dtype), model_output.astype(dtype)
    acp = schedule.alphas_cumprod
    final_alpha = jnp.float32(1.0) if set_alpha_to_one else acp[0]
    t_prev = jnp.asarray(t_prev)
    a_t = gather(acp, t)
    # Gather at max(t_prev, 0): the final step's negative t_prev is never read (checkify flags it).
    a_prev = jnp.where(t_prev >= 0, gather(acp, jnp.maximum(t_prev, 0)), final_alpha)
    b_t = 1.0 - a_t
    b_prev = 1.0 - a_prev

    pred_x0, pred_eps = x0_and_eps(model_output, x_t, jnp.sqrt(a_t), jnp.sqrt(b_t), prediction_type)
    if clip_x0 is not None:
        pred_x0 = jnp.clip(pred_x0, -clip_x0, clip_x0)
    variance = (b_prev / b_t) * (1.0 - a_t / a_prev)
    std = eta * jnp.sqrt(variance)
    if use_clipped_model_output:
        pred_eps = (x_t - jnp.sqrt(a_t) * pred_x0) / jnp.sqrt(b_t)
    direction = jnp.sqrt(1.0 - a_prev - std**2) * pred_eps
    x_prev = jnp.sqrt(a_prev) * pred_x0 + direction
    if stochastic:
        x_prev = x_prev + std * noise
    return x_prev.astype(out_dtype), pred_x0


def ddim_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array | None = None,
    *,
    num_steps: int,
    eta: float = 0.0,
    spacing: str = "leading",
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
    prediction_type: str = "eps",
    clip_x0: float | None = None,
    use_clipped_model_output: bool = False,
    noise: jax.Array | None = None,
    return_trajectory: bool = False,
    strength: float = 1.0,
    after_step=None,
):
    """Sample with DDIM in one ``lax.scan`` over ``num_steps`` timesteps.

    Args:
      model_fn: ``model_fn(x: [B, ...], t: [B] int32) -> [B, ...]`` (eps, x0 or v).
      schedule: the training schedule; ``T = schedule.num_timesteps``.
      x_T: ``[B, ...]`` the starting noise, carried in at least float32.
      key: a PRNG key, required when ``eta > 0`` and ``noise`` is None (step ``i`` draws from
        ``fold_in(key, i)``); may be ``None`` otherwise.
      num_steps: ``1 <= num_steps <= T``.
      eta: a concrete float in ``[0, 1]``.
      spacing, steps_offset: the timestep grid (:func:`ddim_timesteps`).
      set_alpha_to_one, prediction_type, clip_x0, use_clipped_model_output: see :func:`ddim_step`.
      noise: optional ``[M, B, ...]`` pre-drawn noise used instead of drawing from ``key``, ``M``
        the steps that run (``num_steps`` unless ``strength < 1``); shape-checked and unused when
        ``eta = 0``.
      return_trajectory: also return the path.
      strength: image-to-image strength in ``(0, 1]``: run the last ``int(num_steps *
        strength)`` steps of the grid only, from ``x_T`` noised to the first of them
        (:func:`jaxdiff.samplers.noise_to_img2img`); 1 (the default) is text-to-image.
      after_step: optional ``(x_next, i) -> x_next`` applied to each step's output
        (:func:`jaxdiff.samplers.driver.run_scan`; 4-channel inpainting's blending).

    Returns:
      ``x_0: [B, ...]`` float32 (or wider); with ``return_trajectory``, ``(x_0, xs, pred_x0s)``
      where ``xs: [M + 1, B, ...]`` holds ``x_T`` then every step's output and ``pred_x0s:
      [M, B, ...]`` every step's predicted ``x0``.

    Raises:
      ValueError: naming the argument, for a bad grid, ``eta`` outside ``[0, 1]``, a
        ``strength`` keeping no step, a missing key, a mis-shaped ``noise`` or model output.
    """
    prediction_type = canonical_prediction_type(prediction_type)
    eta = check_float("eta", eta, minimum=0.0, maximum=1.0)
    clip_x0 = check_clip(clip_x0)
    set_alpha_to_one = check_bool("set_alpha_to_one", set_alpha_to_one)
    use_clipped_model_output = check_bool("use_clipped_model_output", use_clipped_model_output)
    grid = ddim_timesteps(schedule, num_steps, spacing, steps_offset)
    start = strength_start_step(num_steps, strength)
    x_T = prepare_x_T(x_T)
    model = checked_model(model_fn, x_T.shape)
    ts, ts_prev = jnp.asarray(grid.timesteps), jnp.asarray(grid.prev_timesteps)

    def body(state, x, i, z):
        t = ts[i]
        x_prev, pred_x0 = ddim_step(
            schedule, model(x, t), x, t, ts_prev[i], z,
            eta=eta, prediction_type=prediction_type, clip_x0=clip_x0,
            set_alpha_to_one=set_alpha_to_one, use_clipped_model_output=use_clipped_model_output,
        )
        return state, x_prev, pred_x0

    return run_scan(body, None, x_T, key, len(ts), stochastic=eta > 0, noise=noise,
                    return_trajectory=return_trajectory, start_step=start,
                    after_step=after_step)


def _grid(schedule: Schedule, num_steps: int, *, strength: float = 1.0, spacing: str = "leading",
          steps_offset: int = 0, **_) -> Grid:
    return ddim_timesteps(schedule, num_steps, spacing, steps_offset)


DDIM = SamplerSpec(
    name="ddim",
    after_step=True,
    sample=ddim_sample,
    grid=_grid,
    options=dict(eta=0.0, spacing="leading", steps_offset=0, set_alpha_to_one=True,
                 prediction_type="eps", clip_x0=None, use_clipped_model_output=False),
    noise_space="alphas_cumprod",
    stochastic=lambda o: float(o["eta"]) > 0,
    diffusers=DiffusersTwin(
        "DDIMScheduler",
        defaults=dict(clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                      prediction_type="epsilon", thresholding=False,
                      dynamic_thresholding_ratio=0.995, clip_sample_range=1.0,
                      sample_max_value=1.0, timestep_spacing="leading"),
        options=dict(clip_x0=clip_option, set_alpha_to_one=config_key("set_alpha_to_one"),
                     steps_offset=config_key("steps_offset"),
                     spacing=config_key("timestep_spacing"), prediction_type=prediction_option),
        must_be=dict(thresholding=(False,)),
        no_effect=THRESHOLD_KEYS,
    ),
)
SPECS = (DDIM,)
