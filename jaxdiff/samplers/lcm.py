"""Latent Consistency Models (Luo et al. 2023): multistep consistency sampling as one ``lax.scan``.

Matches ``diffusers.LCMScheduler`` (0.42). A consistency model maps ``x_t`` straight to a clean
estimate, with the boundary condition ``f(x, 0) = x`` built in (``c_skip``, ``c_out`` of the
consistency-model paper, at the scaled timestep ``s = timestep_scaling * t``)::

    x0     = the model's x0 prediction (eps / x0 / v, as DDIM), clipped with clip_x0
    c_skip = sigma_data^2 / (s^2 + sigma_data^2),  c_out = s / sqrt(s^2 + sigma_data^2)
    denoised = c_out x0 + c_skip x_t                                    (sigma_data = 0.5)
    x_prev = sqrt(abar_prev) denoised + sqrt(1 - abar_prev) z          (fresh z ~ N(0, I))

and the last step returns ``denoised`` without noise. The sampler is stochastic whenever it takes
more than one step: step ``i`` draws ``z`` from ``fold_in(key, i)`` or reads ``noise[i]``; the
last step's draw is made and unused (diffusers draws nothing there), so diffusers' ``randn``
calls are ``noise[0], ..., noise[N - 2]`` in order.

The timesteps (:func:`lcm_timesteps`) are ``num_steps`` evenly spaced indices into the
``original_inference_steps``-step distillation grid ``k - 1, 2k - 1, ..., T - 1`` (``k = T //
original_inference_steps``), largest first.

Image-to-image (``strength < 1``, the call argument every sampler takes) follows diffusers'
``LatentConsistencyModelImg2ImgPipeline``, which is NOT the tail of the text-to-image grid (as it
is for the other samplers): the distillation grid is cut to its first ``int(original_inference_steps
* strength)`` entries, ALL ``num_steps`` steps run on that shorter grid, and the image is noised to
its first timestep (``add_noise``: :func:`jaxdiff.samplers.img2img.noise_to_img2img`; the spec's
``img2img="grid"``). E.g. with 4 steps of 50 (``T = 1000``), ``strength = 0.5`` runs ``499, 379,
259, 139`` where the tail of the
text-to-image grid ``999, 759, 499, 259`` would run ``499, 259``.

``LCMScheduler`` options without an effect here: ``timestep_spacing``, ``steps_offset`` (unused by
its ``set_timesteps``) and ``set_alpha_to_one`` (its last step never reads the previous alpha).
``thresholding`` (dynamic thresholding) is not implemented; ``clip_sample`` /
``clip_sample_range`` are ``clip_x0``. Custom ``timesteps`` lists are not supported.

Example (``apply(params, x, t)`` an LCM-distilled denoiser, e.g. with its guidance embedding
closed over)::

    x0 = lcm_sample(partial(apply, params), sched, x_T, key, num_steps=4)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.diffusion import canonical_prediction_type, x0_and_eps
from jaxdiff.samplers.diffusers_names import (
    THRESHOLD_KEYS,
    clip_option,
    config_key,
    prediction_option,
)
from jaxdiff.samplers.driver import checked_model, prepare_x_T, run_scan
from jaxdiff.samplers.spec import DiffusersTwin, SamplerSpec
from jaxdiff.samplers.timesteps import Grid, gather, sigmas_at
from jaxdiff.schedules import Schedule
from jaxdiff.types import ModelFn
from jaxdiff.validation import check_clip, check_float, check_int, check_timestep, concrete

__all__ = ["LCM_SIGMA_DATA", "lcm_timesteps", "lcm_min_strength", "lcm_scalings", "lcm_step",
           "lcm_sample", "LCM", "SPECS"]

LCM_SIGMA_DATA = 0.5  # fixed in LCMScheduler.get_scalings_for_boundary_condition_discrete


def lcm_timesteps(
    schedule: Schedule,
    num_steps: int,
    *,
    original_inference_steps: int = 50,
    strength: float = 1.0,
) -> Grid:
    """LCM's :class:`~jaxdiff.samplers.timesteps.Grid`, as ``LCMScheduler.set_timesteps`` has it.

    With ``k = T // original_inference_steps`` the distillation grid is ``k i - 1`` for ``i = 1
    .. int(original_inference_steps * strength)``; ``num_steps`` of its entries are taken, largest
    first, at indices ``floor(linspace(0, len, num_steps, endpoint=False))`` of the reversed grid.
    ``prev_timesteps`` is the next entry and ``-1`` after the last (the last step returns the
    clean estimate); the final sigma is 0.

    Args:
      schedule: the training schedule (``T = schedule.num_timesteps``).
      num_steps: ``1 <= num_steps <= int(original_inference_steps * strength)``.
      original_inference_steps: ``1 <= . <= T``, the distillation schedule's length.
      strength: in ``(0, 1]``; below 1 the grid starts lower (image-to-image: the caller noises
        its image to ``timesteps[0]``).

    Raises:
      ValueError: naming the argument, for the cases above.
    """
    T = schedule.num_timesteps
    orig = check_int("original_inference_steps", original_inference_steps, 1, T)
    strength = check_float("strength", strength, minimum=0.0, maximum=1.0,
                           exclusive_minimum=True)
    n = check_int("num_steps", num_steps, 1)
    k = T // orig
    origin = np.arange(1, int(orig * strength) + 1, dtype=np.int64) * k - 1
    if n > len(origin):
        if strength == 1.0:
            raise ValueError(f"num_steps must be <= original_inference_steps={orig}, got {n}")
        raise ValueError(
            f"strength={strength} keeps int(original_inference_steps * strength) = "
            f"{len(origin)} LCM distillation timesteps (original_inference_steps={orig}), fewer "
            f"than num_steps={n}: use strength >= {lcm_min_strength(n, orig)} or num_steps <= "
            f"{len(origin)}"
        )
    origin = origin[::-1]
    ts = origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)]
    ts_prev = np.concatenate([ts[1:], [-1]])
    sig = sigmas_at(schedule, ts)
    xp = np if isinstance(sig, np.ndarray) else jnp
    sigmas = xp.concatenate([sig, xp.zeros((1,), sig.dtype)]).astype(xp.float32)
    return Grid(ts.astype(np.int32), ts_prev.astype(np.int32), sigmas)


def lcm_min_strength(num_steps: int, original_inference_steps: int = 50) -> float:
    """The smallest ``strength``, rounded up to 4 decimals, with ``int(original_inference_steps *
    strength) >= num_steps`` (floating point included: ``int(100 * 0.29) = 28``); ``> 1`` when
    ``num_steps > original_inference_steps``.

    >>> lcm_min_strength(4, 50), lcm_min_strength(29, 100)
    (0.08, 0.2901)
    """
    n = check_int("num_steps", num_steps, 1)
    orig = check_int("original_inference_steps", original_inference_steps, 1)
    s = round(n / orig, 4)
    while int(orig * s) < n:
        s = round(s + 1e-4, 4)
    return s


def lcm_scalings(t: jax.Array | int, timestep_scaling: float = 10.0) -> tuple[jax.Array, jax.Array]:
    """The boundary-condition scalings ``(c_skip, c_out)`` at integer timestep ``t`` (any shape):
    ``s = timestep_scaling * t``, ``c_skip = 0.25 / (s^2 + 0.25)``, ``c_out = s / sqrt(s^2 +
    0.25)``; ``c_skip = 1``, ``c_out = 0`` at ``t = 0``. float32."""
    s = jnp.asarray(t, jnp.float32) * jnp.float32(timestep_scaling)
    var = s**2 + LCM_SIGMA_DATA**2
    return LCM_SIGMA_DATA**2 / var, s / jnp.sqrt(var)


def lcm_step(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array | int,
    t_prev: jax.Array | int,
    noise: jax.Array | None,
    *,
    prediction_type: str = "eps",
    timestep_scaling: float = 10.0,
    clip_x0: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One LCM step ``x_t -> x_{t_prev}`` (``LCMScheduler.step``).

    Args:
      schedule: the training schedule.
      model_output: ``[B, ...]`` like ``x_t``: eps, x0 or v by ``prediction_type``.
      x_t: ``[B, ...]`` the current sample.
      t: 0-d int timestep in ``[0, T)``.
      t_prev: 0-d int, the next timestep of the grid; negative on the last step, which returns
        the clean estimate (no noise). Concrete out-of-range values raise.
      noise: ``[B, ...]`` standard normal, the fresh noise of the re-noising; may be ``None`` only
        when ``t_prev`` is a concrete negative number.
      prediction_type: ``"eps"``, ``"x0"`` or ``"v"`` (or diffusers' names).
      timestep_scaling: ``> 0``, scales ``t`` in :func:`lcm_scalings`.
      clip_x0: clip the predicted x0 (before the boundary condition) to ``[-clip_x0, clip_x0]``;
        ``None`` for no clipping (diffusers' ``clip_sample`` / ``clip_sample_range``).

    Returns:
      ``(x_prev, denoised)``, both ``[B, ...]``: ``x_prev`` in ``x_t``'s dtype (computed in at
      least float32), ``denoised`` the consistency function's clean estimate.
    """
    kind = canonical_prediction_type(prediction_type)
    clip_x0 = check_clip(clip_x0)
    scaling = check_float("timestep_scaling", timestep_scaling, minimum=0.0,
                          exclusive_minimum=True)
    T = schedule.num_timesteps
    check_timestep("t", t, T)
    check_timestep("t_prev", t_prev, T, allow_negative=True)
    if model_output.shape != x_t.shape:
        raise ValueError(f"model_output must have x_t's shape {x_t.shape}, got "
                         f"{model_output.shape}")
    last = concrete(t_prev)
    last = None if last is None else bool(last < 0)
    if not last:
        if noise is None:
            raise ValueError("noise is required unless t_prev is a concrete negative (last step)")
        if noise.shape != x_t.shape:
            raise ValueError(f"noise must have x_t's shape {x_t.shape}, got {noise.shape}")

    dtype = jnp.promote_types(x_t.dtype, jnp.float32)
    out_dtype = x_t.dtype
    x_t, model_output = x_t.astype(dtype), model_output.astype(dtype)
    acp = schedule.alphas_cumprod
    a_t = gather(acp, t)
    pred_x0, _ = x0_and_eps(model_output, x_t, jnp.sqrt(a_t), jnp.sqrt(1.0 - a_t), kind)
    if clip_x0 is not None:
        pred_x0 = jnp.clip(pred_x0, -clip_x0, clip_x0)
    c_skip, c_out = lcm_scalings(t, scaling)
    denoised = c_out * pred_x0 + c_skip * x_t
    if last:
        return denoised.astype(out_dtype), denoised
    t_prev = jnp.asarray(t_prev)
    a_prev = gather(acp, jnp.maximum(t_prev, 0))
    renoised = jnp.sqrt(a_prev) * denoised + jnp.sqrt(1.0 - a_prev) * noise.astype(dtype)
    x_prev = renoised if last is False else jnp.where(t_prev >= 0, renoised, denoised)
    return x_prev.astype(out_dtype), denoised


def lcm_sample(
    model_fn: ModelFn,
    schedule: Schedule,
    x_T: jax.Array,
    key: jax.Array | None = None,
    *,
    num_steps: int,
    original_inference_steps: int = 50,
    timestep_scaling: float = 10.0,
    prediction_type: str = "eps",
    clip_x0: float | None = None,
    noise: jax.Array | None = None,
    return_trajectory: bool = False,
    strength: float = 1.0,
):
    """Multistep LCM sampling in one ``lax.scan`` over ``num_steps`` timesteps (1-8 is typical).

    Args:
      model_fn: ``model_fn(x: [B, ...], t: [B] int32) -> [B, ...]`` (eps, x0 or v), an
        LCM-distilled model (its guidance-scale embedding, if any, closed over).
      schedule: the training schedule.
      x_T: ``[B, ...]`` standard normal starting noise, carried in at least float32; for
        ``strength < 1`` the image noised to ``lcm_timesteps(..., strength=strength)
        .timesteps[0]`` instead (:func:`jaxdiff.samplers.img2img.noise_to_img2img`).
      key: PRNG key for the re-noising (step ``i`` draws from ``fold_in(key, i)``); required when
        ``num_steps > 1`` and ``noise`` is None.
      num_steps: ``1 <= num_steps <= int(original_inference_steps * strength)``; all of them
        run, whatever ``strength``.
      original_inference_steps: see :func:`lcm_timesteps`.
      timestep_scaling, prediction_type, clip_x0: see :func:`lcm_step`.
      noise: optional ``[num_steps, B, ...]`` pre-drawn noise (row ``N - 1`` is unused).
      return_trajectory: also return the path.
      strength: image-to-image strength in ``(0, 1]`` (a call argument, not an option): the
        grid is ``lcm_timesteps(..., strength=strength)`` (diffusers'
        ``LatentConsistencyModelImg2ImgPipeline``, module docstring). ``1`` is text-to-image.

    Returns:
      ``x_0 [B, ...]``; with ``return_trajectory`` ``(x_0, xs [N + 1, B, ...], denoised [N, B,
      ...])`` (``xs[0] = x_T``).

    Raises:
      ValueError: naming the argument, for a bad grid or option, a missing key, a mis-shaped
        ``noise`` or model output.
    """
    kind = canonical_prediction_type(prediction_type)
    clip_x0 = check_clip(clip_x0)
    scaling = check_float("timestep_scaling", timestep_scaling, minimum=0.0,
                          exclusive_minimum=True)
    grid = lcm_timesteps(schedule, num_steps, original_inference_steps=original_inference_steps,
                         strength=strength)
    x_T = prepare_x_T(x_T)
    model = checked_model(model_fn, x_T.shape)
    ts, ts_prev = jnp.asarray(grid.timesteps), jnp.asarray(grid.prev_timesteps)
    n = len(grid.timesteps)

    def body(state, x, i, z):
        t = ts[i]
        t_prev = ts_prev[i] if n > 1 else -1  # a single step is the last one: no noise
        x_prev, denoised = lcm_step(
            schedule, model(x, t), x, t, t_prev, z,
            prediction_type=kind, timestep_scaling=scaling, clip_x0=clip_x0,
        )
        return state, x_prev, denoised

    return run_scan(body, None, x_T, key, n, stochastic=n > 1, noise=noise,
                    return_trajectory=return_trajectory)


def _grid(schedule: Schedule, num_steps: int, *, strength: float = 1.0,
          original_inference_steps: int = 50, **_) -> Grid:
    return lcm_timesteps(schedule, num_steps, original_inference_steps=original_inference_steps,
                         strength=strength)


LCM = SamplerSpec(
    name="lcm",
    sample=lcm_sample,
    grid=_grid,
    options=dict(original_inference_steps=50, timestep_scaling=10.0, prediction_type="eps",
                 clip_x0=None),
    noise_space="alphas_cumprod",
    stochastic=lambda o: True,  # re-noises between steps (unless num_steps = 1)
    img2img="grid",
    diffusers=DiffusersTwin(
        "LCMScheduler",
        defaults=dict(original_inference_steps=50, clip_sample=False, clip_sample_range=1.0,
                      set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
                      thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                      timestep_spacing="leading", timestep_scaling=10.0),
        options=dict(original_inference_steps=config_key("original_inference_steps"),
                     timestep_scaling=lambda c: float(c["timestep_scaling"]), clip_x0=clip_option,
                     prediction_type=prediction_option),
        must_be=dict(thresholding=(False,)),
        # LCMScheduler reads none of these (its grid comes from original_inference_steps).
        no_effect=THRESHOLD_KEYS | {"set_alpha_to_one", "steps_offset", "timestep_spacing"},
        schedule_defaults=dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    ),
)
SPECS = (LCM,)
