"""Trajectory Consistency Distillation (Zheng et al. 2024): TCD's strategic stochastic sampling as
one ``lax.scan``; the sampler of TCD LoRAs and of Hyper-SD's one-step SDXL UNet.

Matches ``diffusers.TCDScheduler`` (0.42). Its grid is LCM's
(:func:`jaxdiff.samplers.lcm_timesteps`: ``num_steps`` evenly spaced indices into the
``original_inference_steps``-step distillation grid), with the step after the last one at
``t = 0`` (not "before the first training step"). A step from ``t`` to ``t_prev`` with ``gamma``
(diffusers' ``eta``) goes to the intermediate timestep ``s = floor((1 - gamma) t_prev)``::

    x0, eps = the model's x0 and eps predictions (eps / x0 / v, as DDIM; no clipping)
    x_s     = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps                    (deterministic, DDIM-like)
    x_prev  = sqrt(abar_prev / abar_s) x_s + sqrt(1 - abar_prev / abar_s) z    (fresh z ~ N(0, I))

with no noise when ``gamma = 0`` (then ``s = t_prev``: DDIM with eta 0) or on the last step, which
returns ``x_s`` at ``s = 0``: ``sqrt(abar_0) x0 + sqrt(1 - abar_0) eps``, not ``x0``. The sampler
is stochastic when ``gamma > 0``: step ``i`` draws ``z`` from ``fold_in(key, i)`` or reads
``noise[i]``; the last step's draw is made and unused (diffusers draws nothing there).

``gamma`` is not part of a scheduler config: diffusers takes it as ``step(..., eta=0.3)``, and its
pipelines pass their own ``eta`` argument (default ``0.0``) to every scheduler whose ``step``
takes one. jaxdiff's default is the scheduler's and the TCD authors' ``0.3``; pass ``eta=0.0`` to
reproduce a diffusers pipeline called without ``eta``.

Image-to-image (``strength < 1``) runs the tail of the grid, as ``StableDiffusionXLImg2ImgPipeline``
does with this scheduler (``get_timesteps``). ``TCDScheduler`` options without an effect:
``clip_sample``, ``clip_sample_range``, the thresholding keys (its ``step`` applies neither),
``set_alpha_to_one`` (no step reads the final alpha), ``steps_offset``, ``timestep_spacing``,
``timestep_scaling``. Custom ``timesteps`` lists (Hyper-SD's ``timesteps=[800]`` for its one-step
UNet) are not supported: the grid is always the distillation grid's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion import canonical_prediction_type, x0_and_eps
from jaxdiff.samplers.diffusers_names import THRESHOLD_KEYS, config_key, prediction_option
from jaxdiff.samplers.driver import checked_model, prepare_x_T, run_scan, strength_start_step
from jaxdiff.samplers.lcm import lcm_timesteps
from jaxdiff.samplers.spec import DiffusersTwin, SamplerSpec
from jaxdiff.samplers.timesteps import Grid, gather, sigmas_at
from jaxdiff.schedules import Schedule
from jaxdiff.types import ModelFn
from jaxdiff.validation import check_float, check_timestep

__all__ = ["tcd_timesteps", "tcd_step", "tcd_sample", "TCD", "SPECS"]


def tcd_timesteps(schedule: Schedule, num_steps: int, *,
                  original_inference_steps: int = 50) -> Grid:
    """TCD's grid, as ``TCDScheduler.set_timesteps(num_steps)`` has it: LCM's timesteps
    (:func:`~jaxdiff.samplers.lcm_timesteps`), ``prev_timesteps`` the next entry and ``0`` after
    the last. ``sigmas`` ``[N + 1]`` ends with ``sigma(0)``.

    Raises:
      ValueError: as :func:`~jaxdiff.samplers.lcm_timesteps`.
    """
    grid = lcm_timesteps(schedule, num_steps, original_inference_steps=original_inference_steps)
    prev = grid.prev_timesteps.copy()
    prev[-1] = 0
    xp = np if isinstance(grid.sigmas, np.ndarray) else jnp
    sigma_0 = xp.asarray(sigmas_at(schedule, np.zeros(1, np.int64)), xp.float32)
    return Grid(grid.timesteps, prev, xp.concatenate([grid.sigmas[:-1], sigma_0]))


def tcd_step(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array | int,
    t_prev: jax.Array | int,
    noise: jax.Array | None,
    *,
    eta: float = 0.3,
    last: bool = False,
    prediction_type: str = "eps",
) -> tuple[jax.Array, jax.Array]:
    """One TCD step ``x_t -> x_{t_prev}`` (``TCDScheduler.step(..., eta=eta)``).

    Args:
      schedule: the training schedule.
      model_output: ``[B, ...]`` like ``x_t``: eps, x0 or v by ``prediction_type``.
      x_t: ``[B, ...]`` the current sample.
      t: 0-d int timestep in ``[0, T)``.
      t_prev: 0-d int in ``[0, T)``, the next timestep of the grid (0 after the last).
      noise: ``[B, ...]`` standard normal for the re-noising; may be ``None`` when ``eta = 0`` or
        ``last``.
      eta: ``gamma`` in ``[0, 1]``, a concrete float (module docstring).
      last: the grid's last step: no re-noising.
      prediction_type: ``"eps"``, ``"x0"`` or ``"v"`` (or diffusers' names).

    Returns:
      ``(x_prev, x0)``, both ``[B, ...]``: ``x_prev`` in ``x_t``'s dtype (computed in at least
      float32), ``x0`` the model's clean estimate.

    Raises:
      ValueError: naming the argument: concrete timesteps out of range, ``eta`` outside
        ``[0, 1]``, a missing or mis-shaped ``noise`` / ``model_output``.
    """
    kind = canonical_prediction_type(prediction_type)
    gamma = check_float("eta", eta, minimum=0.0, maximum=1.0)
    T = schedule.num_timesteps
    check_timestep("t", t, T)
    check_timestep("t_prev", t_prev, T)
    if model_output.shape != x_t.shape:
        raise ValueError(f"model_output must have x_t's shape {x_t.shape}, got "
                         f"{model_output.shape}")
    renoise = gamma > 0 and not last
    if renoise and (noise is None or noise.shape != x_t.shape):
        raise ValueError(f"noise must be given with x_t's shape {x_t.shape} when eta > 0 and "
                         f"not last, got {None if noise is None else noise.shape}")
    dtype = jnp.promote_types(x_t.dtype, jnp.float32)
    out_dtype = x_t.dtype
    x_t, model_output = x_t.astype(dtype), model_output.astype(dtype)
    acp = schedule.alphas_cumprod
    a_t = gather(acp, t)
    x0, eps = x0_and_eps(model_output, x_t, jnp.sqrt(a_t), jnp.sqrt(1.0 - a_t), kind)
    t_prev = jnp.asarray(t_prev)
    s = jnp.floor(jnp.float32(1.0 - gamma) * t_prev.astype(jnp.float32)).astype(jnp.int32)
    a_s = gather(acp, s)
    x_s = jnp.sqrt(a_s) * x0 + jnp.sqrt(1.0 - a_s) * eps
    if not renoise:
        return x_s.astype(out_dtype), x0
    ratio = gather(acp, t_prev) / a_s
    x_prev = jnp.sqrt(ratio) * x_s + jnp.sqrt(1.0 - ratio) * noise.astype(dtype)
    return x_prev.astype(out_dtype), x0


def tcd_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array | None = None,
    *,
    num_steps: int,
    original_inference_steps: int = 50,
    eta: float = 0.3,
    prediction_type: str = "eps",
    noise: jax.Array | None = None,
    return_trajectory: bool = False,
    strength: float = 1.0,
):
    """TCD sampling in one ``lax.scan`` over ``num_steps`` timesteps (1-8 is typical).

    Args:
      model_fn: ``model_fn(x: [B, ...], t: [B] int32) -> [B, ...]`` (eps, x0 or v), a
        TCD-distilled model.
      schedule: the training schedule.
      x_T: ``[B, ...]`` standard normal starting noise, carried in at least float32.
      key: PRNG key for the re-noising (step ``i`` draws from ``fold_in(key, i)``); required when
        ``eta > 0``, ``noise`` is None and more than one step runs.
      num_steps: ``1 <= num_steps <= original_inference_steps``.
      original_inference_steps: see :func:`tcd_timesteps`.
      eta: ``gamma`` in ``[0, 1]`` (module docstring); default 0.3.
      prediction_type: see :func:`tcd_step`.
      noise: optional ``[M, B, ...]`` pre-drawn noise (``M`` the steps that run; the last row is
        unused).
      return_trajectory: also return the path.
      strength: image-to-image strength in ``(0, 1]``: run the last ``int(num_steps *
        strength)`` steps of the grid.

    Returns:
      ``x_0 [B, ...]``; with ``return_trajectory`` ``(x_0, xs [M + 1, B, ...], x0s [M, B,
      ...])`` (``xs[0] = x_T``).

    Raises:
      ValueError: naming the argument, for a bad grid or option, a missing key, a mis-shaped
        ``noise`` or model output.
    """
    kind = canonical_prediction_type(prediction_type)
    gamma = check_float("eta", eta, minimum=0.0, maximum=1.0)
    grid = tcd_timesteps(schedule, num_steps, original_inference_steps=original_inference_steps)
    n = len(grid.timesteps)
    start = strength_start_step(n, strength)
    x_T = prepare_x_T(x_T)
    model = checked_model(model_fn, x_T.shape)
    ts, ts_prev = jnp.asarray(grid.timesteps), jnp.asarray(grid.prev_timesteps)
    stochastic = gamma > 0 and n - start > 1

    def body(state, x, i, z):
        t, t_prev = ts[i], ts_prev[i]
        out = model(x, t)
        final, x0 = tcd_step(schedule, out, x, t, t_prev, None, eta=gamma, last=True,
                             prediction_type=kind)
        if not stochastic:  # eta = 0 (s = t_prev, nothing to add) or a single, last step
            return state, final, x0
        renoised, _ = tcd_step(schedule, out, x, t, t_prev, z, eta=gamma, prediction_type=kind)
        return state, jnp.where(i == n - 1, final, renoised), x0

    return run_scan(body, None, x_T, key, n, stochastic=stochastic, noise=noise,
                    return_trajectory=return_trajectory, start_step=start)


def _grid(schedule: Schedule, num_steps: int, *, strength: float = 1.0,
          original_inference_steps: int = 50, **_) -> Grid:
    return tcd_timesteps(schedule, num_steps, original_inference_steps=original_inference_steps)


TCD = SamplerSpec(
    name="tcd",
    sample=tcd_sample,
    grid=_grid,
    options=dict(original_inference_steps=50, eta=0.3, prediction_type="eps"),
    noise_space="alphas_cumprod",
    stochastic=lambda o: float(o["eta"]) > 0,
    diffusers=DiffusersTwin(
        "TCDScheduler",
        defaults=dict(original_inference_steps=50, clip_sample=False, clip_sample_range=1.0,
                      set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
                      thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                      timestep_spacing="leading", timestep_scaling=10.0),
        options=dict(original_inference_steps=config_key("original_inference_steps"),
                     prediction_type=prediction_option),
        # TCDScheduler.step reads none of these (module docstring).
        no_effect=THRESHOLD_KEYS | {"thresholding", "clip_sample", "clip_sample_range",
                                    "set_alpha_to_one", "steps_offset", "timestep_spacing",
                                    "timestep_scaling"},
        schedule_defaults=dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    ),
)
SPECS = (TCD,)
