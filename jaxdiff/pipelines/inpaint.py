"""Inpainting for :func:`~jaxdiff.pipelines.generate`: repaint the white part of a mask, keep the
rest of ``image``, as diffusers' ``StableDiffusionInpaintPipeline`` and
``StableDiffusionXLInpaintPipeline`` do, inside the same jitted program.

Two kinds of UNet (chosen by the UNet's ``in_channels``, :func:`inpaint_mode`):

- ``"concat"``: an inpainting UNet (``in_channels = 2 C + 1``, 9 for SD 1.5 / 2 inpainting
  checkpoints): each step the UNet sees ``[latents, mask, masked-image latents]`` concatenated
  along the channels (after the sampler's input scaling), the mask at the latent grid and the
  masked image ``image * (mask < 0.5)`` encoded by the VAE (:func:`concat_inputs`);
- ``"blend"``: an ordinary UNet (``in_channels = C``): after each sampler step the known region
  (mask 0) is replaced by the image latents noised to the NEXT grid entry with the initial noise,
  unnoised after the last step (diffusers' ``init_latents_proper``; :func:`blend_after_step`).
  The sampler must forward ``after_step``
  (:attr:`~jaxdiff.samplers.spec.SamplerSpec.after_step`: DDIM, PNDM / PLMS, Euler,
  DPM-Solver (multistep), UniPC, LMS, DEIS; :func:`blend_samplers`).

``strength`` as diffusers: exactly 1 starts from pure noise (``latents``, scaled by the sampler's
initial sigma), below 1 from the image latents noised to the first step that runs
(:func:`~jaxdiff.samplers.noise_to_img2img`); in both cases ``latents`` is the noise.

The mask (:func:`prepare_mask`) is one channel: ``[H, W]``, ``[H, W, 1]`` or ``[B, H, W, 1]``,
uint8 (0-255, divided by 255) or float in ``[0, 1]`` (or bool), white (``>= 0.5``) = repaint, of
the source image's size; it is resized with the image (nearest) and binarised at 0.5, then taken
to the latent grid by nearest neighbour, as diffusers' mask ``VaeImageProcessor``
(``do_binarize``) and ``interpolate`` do. An array with 3 channels is refused rather than
converted: diffusers converts only PIL masks to grayscale (``convert("L")``), which is what
:func:`~jaxdiff.pipelines.images.load_image` with ``mode="L"`` does for a mask file.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.autoencoder_config import AutoencoderKLConfig
from jaxdiff.models.unet_config import UNetConfig
from jaxdiff.pipelines.images import prepare_image, resize_nearest
from jaxdiff.samplers.img2img import sampler_grid
from jaxdiff.samplers.registry import Sampler, sampler_specs
from jaxdiff.schedules import Schedule

__all__ = ["INPAINT_MODES", "InpaintInputs", "blend_after_step", "blend_levels",
           "blend_samplers", "concat_inputs", "inpaint_mode", "prepare_mask", "mask_to_latent_grid"]

INPAINT_MODES = ("concat", "blend")


def blend_samplers() -> tuple[str, ...]:
    """The registered samplers that can run 4-channel inpainting (their spec declares
    ``after_step``)."""
    return tuple(s.name for s in sampler_specs() if s.after_step)


def inpaint_mode(unet_config: UNetConfig, vae_config: AutoencoderKLConfig, *, mask: Any,
                 image: Any, sampler: Sampler, split: tuple = (None, None)) -> str | None:
    """``"concat"`` (inpainting UNet), ``"blend"`` (ordinary UNet with a mask) or ``None`` (no
    inpainting), checked on the host.

    Raises:
      ValueError: an inpainting UNet (``in_channels = 2 latent_channels + 1``) without
        ``mask_image`` and ``image``; ``mask_image`` without ``image``; a UNet with another
        channel count; ``"blend"`` with a sampler that does not declare ``after_step``;
        inpainting with ``split``, ``(denoising_start, denoising_end)``, not ``(None, None)``
        (SDXL's base + refiner split of inpainting is not supported).
    """
    c, cin = vae_config.latent_channels, unet_config.in_channels
    if cin == 2 * c + 1:
        if mask is None or image is None:
            raise ValueError(f"this is an inpainting UNet (in_channels {cin} = latents {c} + mask "
                             f"1 + masked-image latents {c}): give image and mask_image")
        if any(v is not None for v in split):
            raise ValueError("denoising_start / denoising_end with mask_image (SDXL inpainting "
                             "split between a base and a refiner) is not supported")
        return "concat"
    if mask is None:
        return None
    if any(v is not None for v in split):
        raise ValueError("denoising_start / denoising_end with mask_image (SDXL inpainting split "
                         "between a base and a refiner) is not supported")
    if image is None:
        raise ValueError("mask_image given without image (the image to inpaint)")
    if cin != c:
        raise ValueError(f"mask_image: the UNet has {cin} input channels; inpainting needs {c} "
                         f"(mask blending) or {2 * c + 1} (an inpainting UNet)")
    if not sampler.spec.after_step:
        raise ValueError(f"sampler {sampler.name!r} cannot run 4-channel inpainting: its steps "
                         "cannot be blended with the known region as diffusers does (samplers "
                         f"that can: {', '.join(blend_samplers())}); or use an inpainting UNet")
    return "blend"


def prepare_mask(mask: Any, image_size: tuple[int, int], height: int, width: int,
                 batch: int) -> np.ndarray:
    """``mask`` -> float32 ``[batch, height, width, 1]`` of 0 (keep) and 1 (repaint).

    Args:
      mask: ``[H, W]``, ``[H, W, 1]`` or ``[B, H, W, 1]``; bool, uint8 (0-255) or float in
        ``[0, 1]`` (module docstring); ``B`` 1 (repeated) or ``batch``.
      image_size: ``(H, W)`` of the source image before resizing: the mask's size must match.
      height, width: the size the image was resized to (the mask follows, nearest).
      batch: the number of images.

    Raises:
      ValueError: naming ``mask_image``: not single-channel, another size than the image, a
        batch other than 1 or ``batch``, or the dtype / range errors of
        :func:`~jaxdiff.pipelines.images.prepare_image`.
    """
    arr = np.asarray(mask)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.float32)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim not in (3, 4) or arr.shape[-1] != 1:
        raise ValueError(f"mask_image must be single-channel: [H, W], [H, W, 1] or [B, H, W, 1], "
                         f"got shape {np.shape(mask)} (convert a colour mask to grayscale, e.g. "
                         "load_image(path, mode='L'))")
    if tuple(arr.shape[-3:-1]) != tuple(image_size):
        raise ValueError(f"mask_image is {arr.shape[-3]}x{arr.shape[-2]} (height x width) but "
                         f"image is {image_size[0]}x{image_size[1]}: give a mask of the image's "
                         "size")
    arr = prepare_image(arr, channels=1, multiple=1, height=height, width=width,
                        name="mask_image")
    if arr.shape[0] == 1 and batch > 1:
        arr = np.repeat(arr, batch, axis=0)
    if arr.shape[0] != batch:
        raise ValueError(f"mask_image has batch {arr.shape[0]} for {batch} images")
    return (arr >= 0.5).astype(np.float32)  # diffusers' binarize: < 0.5 -> 0, >= 0.5 -> 1


def mask_to_latent_grid(mask: jax.Array, h: int, w: int) -> jax.Array:
    """``[B, H, W, 1]`` -> ``[B, h, w, 1]`` by nearest neighbour (``torch``'s
    ``interpolate(mode="nearest")`` rule, as diffusers' ``prepare_mask_latents``). Jittable."""
    return resize_nearest(mask, h, w)


def blend_levels(sampler: Sampler, schedule: Schedule, num_steps: int) -> tuple[np.ndarray,
                                                                                np.ndarray]:
    """``(a, b)``, float32 ``[G]`` over the sampler's scan steps: after step ``i`` the known
    region is ``a[i] x0 + b[i] noise``, diffusers' ``scheduler.add_noise(x0, noise,
    timesteps[i + 1])`` in the sampler's noise space (``timesteps`` its ``model_timesteps`` where
    the grid has them), and ``(1, 0)`` (the image latents) after the last step."""
    grid = sampler_grid(sampler, schedule, num_steps)
    ts = np.asarray(getattr(grid, "model_timesteps", grid.timesteps))
    space, n = sampler.spec.noise_space, len(ts)
    if space == "alphas_cumprod":
        abar = np.asarray(schedule.alphas_cumprod, np.float32)[ts[1:]]
        a, b = np.sqrt(abar), np.sqrt(np.float32(1) - abar)
    else:
        sigma = np.asarray(grid.sigmas, np.float32)[1:n]
        if space == "sigma_ve":
            a, b = np.ones_like(sigma), sigma
        else:  # sigma_vp
            a = np.float32(1) / np.sqrt(sigma * sigma + np.float32(1))
            b = sigma * a
    return (np.append(a, np.float32(1)).astype(np.float32),
            np.append(b, np.float32(0)).astype(np.float32))


class InpaintInputs(NamedTuple):
    """What the program's UNet calls and steps read (arrays in the program).

    Attributes:
      mask: ``[B, h, w, 1]`` the mask at the latent grid (1: repaint).
      masked_latents: ``[B, h, w, C]`` the masked image's latents (``"concat"``), else ``None``.
      image_latents: ``[B, h, w, C]`` the image's latents (``"blend"``), else ``None``.
      noise: ``[B, h, w, C]`` the initial noise (``"blend"``), else ``None``.
    """

    mask: jax.Array
    masked_latents: jax.Array | None
    image_latents: jax.Array | None
    noise: jax.Array | None


def concat_inputs(x: jax.Array, inputs: InpaintInputs) -> jax.Array:
    """``[N, h, w, C]`` (``N`` a multiple of ``B``: the guided batch) -> ``[N, h, w, 2 C + 1]``:
    ``[x, mask, masked_latents]``, as an inpainting UNet takes them."""
    reps = x.shape[0] // inputs.mask.shape[0]
    extra = jnp.concatenate([inputs.mask, inputs.masked_latents], axis=-1).astype(x.dtype)
    return jnp.concatenate([x, jnp.concatenate([extra] * reps, axis=0)], axis=-1)


def blend_after_step(a: np.ndarray, b: np.ndarray, inputs: InpaintInputs) -> Callable:
    """The sampler's ``after_step(x_next, i)`` for ``"blend"``: ``(1 - mask) (a[i] x0 + b[i]
    noise) + mask x_next`` (:func:`blend_levels`), as diffusers' inpainting loop."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    x0 = inputs.image_latents.astype(jnp.float32)
    noise = inputs.noise.astype(jnp.float32)
    mask = inputs.mask.astype(jnp.float32)

    def after_step(x: jax.Array, i: jax.Array) -> jax.Array:
        known = a[i] * x0 + b[i] * noise
        return (1 - mask) * known + mask * x

    return after_step
