"""The base-to-refiner hand-off ("ensemble of expert denoisers", SDXL): the base model runs the
first part of the schedule and returns noisy latents (``denoising_end``), the refiner runs the
rest from them (``denoising_start``), as diffusers' ``StableDiffusionXLPipeline`` /
``StableDiffusionXLImg2ImgPipeline`` split it.

With ``N`` steps on the sampler's grid of timesteps ``t_0 > t_1 > ... > t_{N-1}`` and ``T``
training timesteps, a fraction ``d`` sets the cutoff ``c = round(T - d T)``:

- ``denoising_end = d``: the first ``k = #{i: t_i >= c}`` steps run; the latents after them
  (the sampler's carry at grid step ``k``, e.g. Euler's sigma-space sample) are returned.
- ``denoising_start = d``: the last ``m = #{i: t_i < c}`` steps run, starting from the given
  latents as the sample at grid step ``N - m`` (no VAE encoding, no noise added): image-to-image's
  tail of the grid (:func:`~jaxdiff.samplers.img2img.img2img_start_step`).

Samplers whose diffusers twin interleaves two model calls per step in its timesteps (Heun, KDPM2)
or repeats one (PNDM / PLMS), and those whose image-to-image cuts the grid itself (LCM, TCD),
count the steps differently in diffusers and are refused.

This module does the host-side arithmetic; :mod:`jaxdiff.pipelines.sd_program` runs it inside
the one program (the steps after ``k`` skip the UNet, and the carry at ``k`` is read from the
sampler's trajectory).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxdiff.samplers.img2img import sampler_grid
from jaxdiff.samplers.registry import Sampler
from jaxdiff.schedules import Schedule
from jaxdiff.validation import check_float

__all__ = ["DenoisingSplit", "denoising_split", "start_latents"]

_COUNTED_OTHERWISE = ("heun", "kdpm2", "kdpm2_ancestral", "pndm", "plms")


class DenoisingSplit(NamedTuple):
    """What the program needs (host numbers, static).

    Attributes:
      strength: for ``denoising_start``: an image-to-image strength whose tail is the last ``m``
        steps; ``None`` otherwise.
      start: the first grid step that runs (``N - m``, or 0).
      end: for ``denoising_end``: ``k``, the grid step whose carry is returned; ``None``
        otherwise.
      end_t: the timestep ``t_k`` (the UNet runs at timesteps ``>= end_t`` only); ``None`` when
        ``end`` is ``None`` or ``N``.
    """

    strength: float | None
    start: int
    end: int | None
    end_t: float | None


def _fraction(name: str, value: float) -> float:
    v = check_float(name, value, minimum=0.0, maximum=1.0)
    if not 0.0 < v < 1.0:
        raise ValueError(f"{name} must lie strictly between 0 and 1 (the fraction of the "
                         f"schedule), got {value!r}")
    return v


def denoising_split(sampler: Sampler, schedule: Schedule, num_steps: int,
                    denoising_start: float | None = None,
                    denoising_end: float | None = None) -> DenoisingSplit:
    """The steps that run for ``denoising_start`` / ``denoising_end`` (module docstring).

    Raises:
      ValueError: naming the argument: a fraction outside ``(0, 1)``, one that keeps no step,
        ``denoising_end <= denoising_start``, or a sampler whose steps diffusers counts
        otherwise.
    """
    if denoising_start is None and denoising_end is None:
        return DenoisingSplit(None, 0, None, None)
    name = "denoising_start" if denoising_start is not None else "denoising_end"
    if sampler.spec.name in _COUNTED_OTHERWISE or sampler.spec.img2img != "tail":
        raise ValueError(f"{name} is not supported with sampler {sampler.name!r} (diffusers "
                         "counts its steps otherwise); use e.g. euler, ddim, dpmpp_2m, unipc")
    ts = np.asarray(sampler_grid(sampler, schedule, num_steps).timesteps, np.float64)[:num_steps]
    big_t = schedule.num_timesteps
    strength, start, end, end_t = None, 0, None, None
    if denoising_start is not None:
        d = _fraction("denoising_start", denoising_start)
        m = int(np.sum(ts < int(round(big_t - d * big_t))))
        if m < 1:
            raise ValueError(f"denoising_start={denoising_start} keeps no step of the "
                             f"{num_steps}-step grid: use a larger value or more steps")
        start = num_steps - m
        # int(N * strength) == m exactly (the image-to-image tail of m steps)
        strength = 1.0 if m == num_steps else (m + 0.5) / num_steps
    if denoising_end is not None:
        d = _fraction("denoising_end", denoising_end)
        if denoising_start is not None and d <= denoising_start:
            raise ValueError(f"denoising_end={denoising_end} must be larger than "
                             f"denoising_start={denoising_start}")
        end = int(np.sum(ts >= int(round(big_t - d * big_t))))
        if end <= start:
            raise ValueError(f"denoising_end={denoising_end} keeps no step of the "
                             f"{num_steps}-step grid: use a larger value or more steps")
        end_t = float(ts[end]) if end < num_steps else None
    return DenoisingSplit(strength, start, end, end_t)


def start_latents(image, channels: int, scale_factor: int, batch: int, height: int | None,
                  width: int | None) -> tuple[np.ndarray, list[int]]:
    """``denoising_start``'s ``image``: latents ``[B, H/f, W/f, channels]`` float32 (a batch of
    one repeated to ``batch``), and the image size ``[H, W]`` they stand for.

    Raises:
      ValueError: naming ``image`` (missing, another shape or batch) or ``height`` / ``width``
        (given, and not the latents' size times ``scale_factor``).
    """
    if image is None:
        raise ValueError("denoising_start needs image: the latents to start from [B, H/f, "
                         "W/f, C] (the base model's output latents with denoising_end)")
    image = np.asarray(image, np.float32)
    if image.ndim != 4 or image.shape[-1] != channels:
        raise ValueError(f"with denoising_start, image must be latents [B, H/f, W/f, {channels}]"
                         f", got shape {image.shape}")
    if image.shape[0] == 1 and batch > 1:
        image = np.repeat(image, batch, axis=0)
    if image.shape[0] != batch:
        raise ValueError(f"image has batch {image.shape[0]} for {batch} prompts")
    sizes = [int(v) * scale_factor for v in image.shape[1:3]]
    for name, given, v in zip(("height", "width"), (height, width), sizes):
        if given is not None and given != v:
            raise ValueError(f"{name}={given} differs from the latents' {v} (denoising_start "
                             "starts from image's latents)")
    return image, sizes
