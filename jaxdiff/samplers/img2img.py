"""Image-to-image: start a sampler from a noised clean sample (SDEdit, diffusers' img2img
pipelines), for every registered sampler through ONE call argument, ``strength``.

With ``strength`` in ``(0, 1]`` and ``N`` steps, a sampler runs image-to-image as its spec's
``img2img`` says (:class:`~jaxdiff.samplers.spec.SamplerSpec`):

- ``"tail"`` (DDIM, DDPM, DPM-Solver, UniPC, Euler, Euler ancestral, Heun, KDPM2, ...): diffusers'
  ``StableDiffusionImg2ImgPipeline`` keeps the last ``int(N * strength)`` steps of the scheduler's
  grid (``get_timesteps``; :func:`strength_start_step` gives the first kept step ``s``), noises
  the encoded image to step ``s`` with ``scheduler.add_noise`` and runs the scheduler from there.
  The multistep samplers (DPM-Solver++, UniPC) start their history empty at ``s``, so the tail
  warms up at lower order, as diffusers' schedulers do after ``set_begin_index``; the two-stage
  samplers (Heun, KDPM2) start at step ``s``'s first stage (diffusers' interleaved index ``2 s``);
- ``"grid"`` (LCM: ``LatentConsistencyModelImg2ImgPipeline``): ``strength`` cuts the
  distillation grid before the ``N`` steps are chosen from it, and all ``N`` steps run, from the
  image noised to the grid's first timestep.

The start sample (:func:`noise_to_img2img`) is ``add_noise`` at that grid step in the sampler's
noise space (the spec's ``noise_space``): ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` for
``"alphas_cumprod"`` (``t = timesteps[s]``), the same written with the grid's sigma, ``(x0 +
sigma noise) / sqrt(1 + sigma^2)``, for ``"sigma_vp"`` (grids may hold interpolated sigmas:
Karras, ...), and ``x0 + sigma noise`` for ``"sigma_ve"``. The sampler is then called with the
same ``strength``; the recipe is the same for every sampler::

    x = noise_to_img2img(sampler, schedule, N, x0, noise, strength)
    out = sampler(model_fn, schedule, x, key, num_steps=N, strength=strength)

    >>> import jax.numpy as jnp
    >>> from jaxdiff.samplers import get_sampler
    >>> from jaxdiff.schedules import make_schedule
    >>> sched = make_schedule("linear", 1000)
    >>> for name in ("ddim", "lcm"):
    ...     s = get_sampler(name)
    ...     x = noise_to_img2img(s, sched, 4, jnp.zeros((1, 4)), jnp.ones((1, 4)), 0.5)
    ...     m = 4 - img2img_start_step(s, sched, 4, 0.5)  # the steps that run
    ...     z = jnp.zeros((m, 1, 4))  # per-step noise (LCM re-noises; unused by DDIM, eta = 0)
    ...     out = s(lambda x, t: 0.1 * x, sched, x, num_steps=4, noise=z, strength=0.5)
    ...     print(name, m, out.shape)
    ddim 2 (1, 4)
    lcm 4 (1, 4)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.samplers.driver import strength_start_step
from jaxdiff.samplers.registry import Sampler
from jaxdiff.samplers.sigmas import init_noise_sigma
from jaxdiff.samplers.timesteps import Grid
from jaxdiff.schedules import Schedule
from jaxdiff.validation import check_float, check_int

__all__ = ["strength_start_step", "sampler_grid", "img2img_start_step", "check_strength",
           "img2img_key", "noise_to_img2img"]


def _sampler(sampler) -> Sampler:
    if not isinstance(sampler, Sampler):
        raise ValueError(f"sampler must be a Sampler (jaxdiff.samplers.get_sampler), got "
                         f"{type(sampler).__name__}")
    return sampler


def sampler_grid(sampler: Sampler, schedule: Schedule, num_steps: int,
                 strength: float = 1.0) -> Grid:
    """The host-side grid ``sampler`` runs for ``num_steps`` steps and ``strength`` (its bound
    options applied): the spec's ``grid`` function. For a ``"tail"`` sampler this is the full
    grid whatever ``strength`` (the steps from :func:`img2img_start_step` run).

    Raises:
      ValueError: as the grid function (a bad option, ``num_steps``, or LCM's ``strength``).
    """
    sampler = _sampler(sampler)
    return sampler.spec.grid(schedule, num_steps, strength=strength, **sampler.effective_options)


def img2img_start_step(sampler: Sampler, schedule: Schedule, num_steps: int,
                       strength: float) -> int:
    """The grid step image-to-image starts from: :func:`strength_start_step` for a ``"tail"``
    sampler, 0 for a ``"grid"`` one (LCM), checked on the host.

    Raises:
      ValueError: naming ``strength`` unless it lies in ``(0, 1]`` and keeps at least one step
        (``num_steps`` distillation timesteps for LCM: ``int(original_inference_steps *
        strength) >= num_steps``); naming ``num_steps`` unless it is an int >= 1; as the grid.
    """
    sampler = _sampler(sampler)
    n = check_int("num_steps", num_steps, 1)
    strength = check_float("strength", strength, minimum=0.0, maximum=1.0,
                           exclusive_minimum=True)
    grid = sampler_grid(sampler, schedule, n, strength)
    if sampler.spec.img2img == "grid":
        return 0
    s = strength_start_step(n, strength)
    if s >= len(grid.timesteps):
        raise ValueError(f"strength={strength} starts at step {s} of a {len(grid.timesteps)}-step "
                         f"grid (sampler {sampler.name!r}): use a larger strength")
    return s


def check_strength(sampler: Sampler, schedule: Schedule, num_steps: int,
                   strength: float) -> float:
    """``strength`` as a float, checked on the host for ``sampler`` (before anything is traced):
    the errors of :func:`img2img_start_step`."""
    img2img_start_step(sampler, schedule, num_steps, strength)
    return float(strength)


def img2img_key(sampler: Sampler, schedule: Schedule, num_steps: int, strength: float) -> tuple:
    """What image-to-image sampling with ``strength`` depends on, besides the sampler, schedule and
    ``num_steps``: ``("start_step", s)`` for a ``"tail"`` sampler (strengths that keep the same
    steps sample alike), ``("strength", strength)`` for a ``"grid"`` one (LCM). Equal keys mean
    equal sampling, so a caller may key its compiled programs on them. Errors as
    :func:`img2img_start_step`."""
    s = img2img_start_step(sampler, schedule, num_steps, strength)
    if sampler.spec.img2img == "tail":
        return ("start_step", s)
    return ("strength", float(strength))


def noise_to_img2img(
    sampler: Sampler,
    schedule: Schedule,
    num_steps: int,
    x0: jax.Array,
    noise: jax.Array,
    strength: float,
) -> jax.Array:
    """``x0`` noised to where ``sampler(..., num_steps=N, strength=strength)`` starts (diffusers'
    ``add_noise`` there, in the sampler's noise space: module docstring).

    Args:
      sampler: any registered sampler (or preset), options bound.
      schedule: the (concrete) training schedule.
      num_steps: ``N``, as passed to the sampler.
      x0: ``[B, ...]`` the clean sample (latents).
      noise: ``[B, ...]`` standard normal.
      strength: in ``(0, 1]``, as passed to the sampler.

    Returns:
      ``[B, ...]`` float32 (or wider): the sample to pass as ``x_T`` with the same ``strength``.
      At ``strength = 1`` a ``"sigma_ve"`` sampler scales its ``x_T`` by ``init_noise_sigma``
      (its text-to-image contract), so the sigma-space start ``x0 + sigma noise`` is returned
      divided by it.

    Raises:
      ValueError: as :func:`img2img_start_step`, or for mismatched shapes.
    """
    s = img2img_start_step(sampler, schedule, num_steps, strength)
    grid = sampler_grid(sampler, schedule, num_steps, strength)
    x0, noise = jnp.asarray(x0), jnp.asarray(noise)
    if x0.shape != noise.shape:
        raise ValueError(f"noise must have x0's shape {x0.shape}, got {noise.shape}")
    dtype = jnp.promote_types(x0.dtype, jnp.float32)
    x0, noise = x0.astype(dtype), noise.astype(dtype)
    space = sampler.spec.noise_space
    if space == "alphas_cumprod":
        abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)[int(grid.timesteps[s])]
        return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise
    sigma = jnp.float32(np.asarray(grid.sigmas)[s])
    if space == "sigma_ve":
        x = x0 + sigma * noise
        if s == 0 and sampler.spec.img2img == "tail":
            x = x / init_noise_sigma(grid, sampler.effective_options.get("spacing", "linspace"))
        return x
    alpha_t = 1.0 / jnp.sqrt(sigma**2 + 1.0)
    return alpha_t * x0 + (sigma * alpha_t) * noise
