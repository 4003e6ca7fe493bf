"""Image-to-image: start a sampler part-way down its grid (SDEdit, diffusers' img2img pipelines).

With ``strength`` in ``(0, 1]`` and ``N`` steps, diffusers' ``StableDiffusionImg2ImgPipeline``
keeps the last ``int(N * strength)`` steps of the scheduler's grid (``get_timesteps``), noises the
encoded image to the first kept step with ``scheduler.add_noise`` and runs the scheduler from
there. jaxdiff does the same in three pieces:

- :func:`strength_start_step`: the first kept step ``s = N - int(N * strength)``;
- :func:`noise_to_start`: ``add_noise`` at step ``s`` of the sampler's own grid, in the sampler's
  own space: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` for DDIM and DDPM
  (``t = timesteps[s]``), the same written with the grid's sigma, ``(x0 + sigma noise) / sqrt(1 +
  sigma^2)``, for DPM-Solver and UniPC (their grids may hold interpolated sigmas: Karras, ...),
  and ``x0 + sigma noise`` for the sigma-space samplers (Euler, Euler ancestral, Heun, KDPM2);
- the sampler itself, called with ``start_step=s`` (the scan driver runs steps ``s .. N - 1``).

LCM is different in diffusers (``LatentConsistencyModelImg2ImgPipeline``): ``strength`` cuts the
distillation grid before the ``N`` steps are chosen from it, and all ``N`` steps run (see
:mod:`jaxdiff.samplers.lcm`). ``start_step`` cannot express that grid, so LCM takes ``strength``
itself as a call argument. Callers that serve every sampler use the two functions that hide the
difference: :func:`img2img_kwargs` (the call arguments: ``{"start_step": s}`` or ``{"strength":
strength}``) and :func:`noise_to_img2img` (the start sample for those arguments).

    >>> import jax.numpy as jnp
    >>> from jaxdiff.samplers import get_sampler
    >>> from jaxdiff.schedules import make_schedule
    >>> sched, sampler = make_schedule("linear", 1000), get_sampler("ddim")
    >>> s = strength_start_step(10, 0.5)
    >>> x = noise_to_start(sampler, sched, 10, s, jnp.zeros((1, 4)), jnp.ones((1, 4)))
    >>> s, sampler(lambda x, t: 0.1 * x, sched, x, num_steps=10, start_step=s).shape
    (5, (1, 4))

The multistep samplers (DPM-Solver++, UniPC) start their history empty at step ``s``, so the tail
warms up at lower order, as diffusers' schedulers do after ``set_begin_index``; the two-stage
samplers (Heun, KDPM2) start at step ``s``'s first stage (diffusers' interleaved index ``2 s``).
Every registered sampler (:data:`IMG2IMG_SAMPLERS`, and their presets) supports image-to-image:
LCM through ``strength``, the others through ``start_step``; a :class:`Sampler` over another
function raises ``ValueError`` naming it (EDM is not registered: it has no ``Schedule``).

    >>> lcm = get_sampler("lcm")
    >>> kw = img2img_kwargs(lcm, sched, 4, 0.5)
    >>> kw, img2img_kwargs(sampler, sched, 10, 0.5)
    ({'strength': 0.5}, {'start_step': 5})
    >>> x = noise_to_img2img(lcm, sched, 4, jnp.zeros((1, 4)), jnp.ones((1, 4)), **kw)
    >>> lcm(lambda x, t: 0.1 * x, sched, x, noise=jnp.zeros((4, 1, 4)), num_steps=4, **kw).shape
    (1, 4)
"""

from __future__ import annotations

import inspect
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.samplers.dpm_solver import dpm_solver_timesteps
from jaxdiff.samplers.euler import euler_timesteps
from jaxdiff.samplers.heun import heun_timesteps
from jaxdiff.samplers.kdpm2 import kdpm2_timesteps
from jaxdiff.samplers.lcm import lcm_min_strength, lcm_timesteps
from jaxdiff.samplers.registry import Sampler
from jaxdiff.samplers.timesteps import Grid, ddim_timesteps, ddpm_timesteps
from jaxdiff.samplers.unipc import unipc_timesteps
from jaxdiff.schedules import Schedule
from jaxdiff.validation import check_float, check_int

__all__ = ["IMG2IMG_SAMPLERS", "strength_start_step", "sampler_grid", "noise_to_start",
           "img2img_kwargs", "noise_to_img2img"]

# registered sampler function name -> (grid function, how add_noise is written)
_GRIDS: Mapping[str, tuple[Callable[..., Grid], str]] = {
    "ddim_sample": (ddim_timesteps, "alphas_cumprod"),
    "dpm_solver_sample": (dpm_solver_timesteps, "sigma_vp"),
    "euler_sample": (euler_timesteps, "sigma_ve"),
    "euler_ancestral_sample": (euler_timesteps, "sigma_ve"),
    "ddpm_sample": (ddpm_timesteps, "alphas_cumprod"),
    "unipc_sample": (unipc_timesteps, "sigma_vp"),
    "heun_sample": (heun_timesteps, "sigma_ve"),
    "kdpm2_sample": (kdpm2_timesteps, "sigma_ve"),
    "kdpm2_ancestral_sample": (kdpm2_timesteps, "sigma_ve"),
    "lcm_sample": (lcm_timesteps, "alphas_cumprod"),  # image-to-image through strength
}
IMG2IMG_SAMPLERS = ("ddim", "ddpm", "dpm_solver", "euler", "euler_ancestral", "heun", "kdpm2",
                    "kdpm2_ancestral", "lcm", "unipc")


def strength_start_step(num_steps: int, strength: float) -> int:
    """The first grid step that runs for ``strength`` (diffusers' ``get_timesteps``):
    ``num_steps - min(int(num_steps * strength), num_steps)``.

    Raises:
      ValueError: naming ``strength`` unless it lies in ``(0, 1]`` and keeps at least one step
        (``int(num_steps * strength) >= 1``); naming ``num_steps`` unless it is an int >= 1.
    """
    n = check_int("num_steps", num_steps, 1)
    strength = check_float("strength", strength, minimum=0.0, maximum=1.0)
    kept = min(int(n * strength), n)
    if kept < 1:
        raise ValueError(
            f"strength={strength} keeps no step of num_steps={n} (int(num_steps * strength) = 0):"
            f" use strength >= {1.0 / n:.4g}"
        )
    return n - kept


def _spec(sampler: Sampler) -> tuple[Callable[..., Grid], str]:
    name = getattr(sampler.fn, "__name__", "")
    if name not in _GRIDS or not (sampler.supports_start_step or sampler.supports_strength):
        raise ValueError(
            f"sampler {sampler.name!r} does not support image-to-image (strength); use one of "
            f"{IMG2IMG_SAMPLERS}"
        )
    return _GRIDS[name]


def sampler_grid(sampler: Sampler, schedule: Schedule, num_steps: int) -> Grid:
    """The host-side grid ``sampler`` runs for ``num_steps`` steps (its bound options applied).

    Raises:
      ValueError: for a sampler outside :data:`IMG2IMG_SAMPLERS`, and as its grid function.
    """
    return _grid(sampler, schedule, num_steps)


def _grid(sampler: Sampler, schedule: Schedule, num_steps: int, **extra) -> Grid:
    grid_fn, _ = _spec(sampler)
    defaults = {k: p.default for k, p in inspect.signature(sampler.fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    options = {**defaults, **sampler.options}
    accepted = inspect.signature(grid_fn).parameters
    skip = ("schedule", "num_steps", "strength")
    kwargs = {k: v for k, v in options.items() if k in accepted and k not in skip}
    return grid_fn(schedule, num_steps, **kwargs, **extra)


def noise_to_start(
    sampler: Sampler,
    schedule: Schedule,
    num_steps: int,
    start_step: int,
    x0: jax.Array,
    noise: jax.Array,
) -> jax.Array:
    """``x0`` noised to grid step ``start_step`` of ``sampler`` (diffusers' ``add_noise`` there).

    Args:
      sampler: one of :data:`IMG2IMG_SAMPLERS` (or a preset of one), options bound.
      schedule: the (concrete) training schedule.
      num_steps: the full grid's step count ``N``.
      start_step: ``0 <= s < N`` (:func:`strength_start_step`).
      x0: ``[B, ...]`` the clean sample (latents).
      noise: ``[B, ...]`` standard normal.

    Returns:
      ``[B, ...]`` float32 (or wider): the sample to pass as ``x_T`` with ``start_step=s``.

    Raises:
      ValueError: for an unsupported sampler (or LCM, which starts by ``strength``:
        :func:`noise_to_img2img`), a bad ``start_step`` or mismatched shapes.
    """
    _, kind = _spec(sampler)
    if not sampler.supports_start_step:
        raise ValueError(
            f"sampler {sampler.name!r} takes no start_step: its image-to-image grid depends on "
            "strength; use noise_to_img2img(..., **img2img_kwargs(...))"
        )
    grid = sampler_grid(sampler, schedule, num_steps)
    s = check_int("start_step", start_step, 0, len(grid.timesteps) - 1)
    return _add_noise(kind, schedule, grid, s, x0, noise)


def _add_noise(kind: str, schedule: Schedule, grid: Grid, s: int, x0: jax.Array,
               noise: jax.Array) -> jax.Array:
    x0, noise = jnp.asarray(x0), jnp.asarray(noise)
    if x0.shape != noise.shape:
        raise ValueError(f"noise must have x0's shape {x0.shape}, got {noise.shape}")
    dtype = jnp.promote_types(x0.dtype, jnp.float32)
    x0, noise = x0.astype(dtype), noise.astype(dtype)
    if kind == "alphas_cumprod":
        abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)[int(grid.timesteps[s])]
        return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise
    sigma = jnp.float32(np.asarray(grid.sigmas)[s])
    if kind == "sigma_ve":
        return x0 + sigma * noise
    alpha_t = 1.0 / jnp.sqrt(sigma**2 + 1.0)
    return alpha_t * x0 + (sigma * alpha_t) * noise


def img2img_kwargs(sampler: Sampler, schedule: Schedule, num_steps: int,
                   strength: float) -> dict:
    """The call arguments that make ``sampler`` run image-to-image at ``strength`` (diffusers'
    img2img pipelines), checked on the host.

    Returns ``{"start_step": strength_start_step(num_steps, strength)}`` for the samplers that run
    the tail of their grid, and ``{"strength": float(strength)}`` for LCM, whose grid depends on
    ``strength`` (all ``num_steps`` steps run: ``LatentConsistencyModelImg2ImgPipeline``). Pass
    them to the sampler and to :func:`noise_to_img2img`::

        kw = img2img_kwargs(sampler, schedule, N, strength)
        x = noise_to_img2img(sampler, schedule, N, x0, noise, **kw)
        out = sampler(model_fn, schedule, x, key, num_steps=N, **kw)

    Equal dicts mean equal sampling (a caller may key its compiled programs on them).

    Raises:
      ValueError: naming the sampler if it is not in :data:`IMG2IMG_SAMPLERS`; naming
        ``strength`` unless it lies in ``(0, 1]`` and keeps at least ``1`` step (``num_steps``
        distillation timesteps for LCM: ``int(original_inference_steps * strength) >=
        num_steps``); naming ``num_steps`` unless it is an int >= 1.
    """
    _spec(sampler)
    n = check_int("num_steps", num_steps, 1)
    if sampler.supports_start_step:
        return {"start_step": strength_start_step(n, strength)}
    strength = check_float("strength", strength, minimum=0.0, maximum=1.0,
                           exclusive_minimum=True)
    orig = sampler.options.get(
        "original_inference_steps",
        inspect.signature(sampler.fn).parameters["original_inference_steps"].default)
    kept = int(orig * strength)
    if kept < n:
        raise ValueError(
            f"strength={strength} keeps int(original_inference_steps * strength) = {kept} LCM "
            f"distillation timesteps (original_inference_steps={orig}), fewer than num_steps={n}:"
            f" use strength >= {lcm_min_strength(n, orig)} or num_steps <= {kept}"
        )
    _grid(sampler, schedule, n, strength=strength)  # the rest of the grid's checks
    return {"strength": strength}


def noise_to_img2img(
    sampler: Sampler,
    schedule: Schedule,
    num_steps: int,
    x0: jax.Array,
    noise: jax.Array,
    *,
    start_step: int | None = None,
    strength: float | None = None,
) -> jax.Array:
    """``x0`` noised to where ``sampler(..., num_steps=N, **kwargs)`` starts, ``kwargs`` from
    :func:`img2img_kwargs` (exactly one of ``start_step`` and ``strength``).

    ``start_step=s``: :func:`noise_to_start`. ``strength`` (LCM): ``sqrt(abar_t) x0 + sqrt(1 -
    abar_t) noise`` at ``t = lcm_timesteps(schedule, N, strength=strength, ...).timesteps[0]``
    (``LCMScheduler.add_noise`` at the pipeline's ``latent_timestep``).

    Args:
      sampler: one of :data:`IMG2IMG_SAMPLERS` (or a preset of one), options bound.
      schedule: the (concrete) training schedule.
      num_steps: ``N``, as passed to the sampler.
      x0: ``[B, ...]`` the clean sample (latents).
      noise: ``[B, ...]`` standard normal.
      start_step, strength: the one :func:`img2img_kwargs` returned for ``sampler``.

    Returns:
      ``[B, ...]`` float32 (or wider): the sample to pass as ``x_T`` with the same ``kwargs``.

    Raises:
      ValueError: naming the argument: not exactly one of ``start_step`` / ``strength``, or the
        one the sampler does not take; as :func:`noise_to_start` and :func:`img2img_kwargs`.
    """
    if (start_step is None) == (strength is None):
        raise ValueError("give exactly one of start_step and strength (from img2img_kwargs)")
    if start_step is not None:
        return noise_to_start(sampler, schedule, num_steps, start_step, x0, noise)
    _, kind = _spec(sampler)
    if not sampler.supports_strength:
        raise ValueError(
            f"strength: sampler {sampler.name!r} starts image-to-image by start_step; use "
            "img2img_kwargs to get it"
        )
    img2img_kwargs(sampler, schedule, num_steps, strength)  # validates strength
    grid = _grid(sampler, schedule, num_steps, strength=strength)
    return _add_noise(kind, schedule, grid, 0, x0, noise)
