"""Stable Diffusion text-to-image and image-to-image as ONE jitted program.

Tokenisation runs on the host; text encoding, the whole denoising ``lax.scan`` (classifier-free
guidance as one batched UNet call per step) and the VAE decode run in one ``jax.jit``
(:mod:`jaxdiff.pipelines.sd_program`), compiled once per static setting (image size, steps,
sampler and its options, batch size, guided or not, image-to-image strength, device mesh, CLIP
skip): prompts, seeds, guidance scales and initial latents change without recompiling. The batch
is sharded over a device mesh's ``data`` axis (:func:`jaxdiff.sharding.make_mesh`), padded to a
multiple of the device count.

    sd = load_stable_diffusion("path/to/stable-diffusion-v1-5")
    out = generate(sd, "a photo of a cat", num_steps=30, guidance_scale=7.5, seed=0)
    save_images(out.images, "cat.png")

The guidance scale ``w`` has ONE meaning, diffusers' ``guidance_scale`` formula: the UNet's
prediction is ``uncond + w * (cond - uncond)`` (``cond`` from the prompt, ``uncond`` from the
negative prompt, ``""`` by default). ``w = 1`` is the conditional model alone (the UNet runs on
the batch ``B``, the negative prompt is not used), ``w = 0`` the unconditional one (the negative
prompt alone), ``w > 1`` classifier-free guidance; every finite ``w`` (also in ``(0, 1)``, and
negative) means that formula. Every ``w != 1`` runs one program (the UNet on ``2B``, ``w``
traced), so a new ``w`` compiles nothing except a switch to or from exactly ``1``.

Where this differs from diffusers' pipelines: they switch guidance off for every
``guidance_scale <= 1`` (``do_classifier_free_guidance = guidance_scale > 1``), so for ``w < 1``
they give the conditional model, jaxdiff the formula (``w = 0``: the unconditional model). For
``w >= 1`` the two agree: given the same initial latents and noise, jaxdiff matches
``StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline`` (negative prompts default to
``""``; ``guidance_rescale`` as ``rescale_noise_cfg``; images are ``clip(decode / 2 + 0.5, 0,
1)``; an image-to-image source is resized as their ``VaeImageProcessor`` does:
:mod:`jaxdiff.pipelines.images`). Image-to-image with the LCM sampler follows
``LatentConsistencyModelImg2ImgPipeline`` instead (its grid depends on ``strength``, all steps
run: :mod:`jaxdiff.samplers.img2img`). On a UNet without a guidance-scale embedding guidance
is classifier-free as above (LCM-LoRA style). An LCM-distilled UNet (``time_cond_proj_dim``:
LCM_Dreamshaper_v7, LCM-SDXL) takes ``w`` as that embedding instead
(:func:`~jaxdiff.models.guidance_scale_embedding`, ``timestep_cond``), as
``LatentConsistencyModelPipeline`` does: the UNet runs on the batch ``B`` once per step, there
is no unconditional branch (a negative prompt or ``guidance_rescale`` is an error), and every
``w`` runs the same program.

SDXL folders (``text_encoder_2``) use the same :func:`generate`: both prompts are encoded inside
the program (:mod:`jaxdiff.pipelines.sdxl_text`) with the micro-conditioning rows
(:mod:`jaxdiff.pipelines.sdxl_conditioning`; the SDXL arguments of :func:`generate`), and the
images match ``StableDiffusionXLPipeline`` / ``StableDiffusionXLImg2ImgPipeline`` (the refiner
too) given the same latents and noise. One difference: for a batch ``B > 1`` with negative
micro-conditioning sizes, diffusers' ``StableDiffusionXLPipeline`` stacks the ``[negative;
positive]`` rows and repeats the pair ``B`` times, so its rows alternate between the two
branches; jaxdiff gives each branch its own rows (equal for ``B = 1``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.pipelines.controlnet import prepare_controlnets
from jaxdiff.pipelines.denoising_split import denoising_split, start_latents
from jaxdiff.pipelines.images import prepare_image, to_uint8
from jaxdiff.pipelines.inpaint import inpaint_mode, prepare_mask
from jaxdiff.pipelines.loading import StableDiffusion, choose_sampler
from jaxdiff.pipelines.pipeline_args import (as_prompt_list, check_guidance_scale, check_image_side,
                                             pad_batch, prompt_tokens)
from jaxdiff.pipelines.sd_program import PROGRAM_CACHE, ProgramKey, build_program, embed_tokens
from jaxdiff.pipelines.sdxl_text import check_sdxl_clip_skip
from jaxdiff.pipelines.sdxl_inputs import check_sdxl_arguments, sdxl_conditions, sdxl_tokens
from jaxdiff.samplers.img2img import check_strength, img2img_key, img2img_start_step
from jaxdiff.samplers.registry import Sampler
from jaxdiff.sharding import DATA_AXIS, make_mesh
from jaxdiff.validation import check_float, check_int

__all__ = ["MAX_IMAGE_SIDE", "StableDiffusionOutput", "encode_prompt", "generate"]

log = logging.getLogger(__name__)
_P = jax.sharding.PartitionSpec

MAX_IMAGE_SIDE = 8192
""":func:`generate`'s default bound on ``height`` and ``width`` (pixels)."""


class StableDiffusionOutput(NamedTuple):
    """What :func:`generate` returns (numpy, on the host).

    Attributes:
      images: ``[B, H, W, 3]`` uint8 (``round(255 * float_images)``).
      float_images: ``[B, H, W, 3]`` float32 in ``[0, 1]`` (diffusers' ``output_type="np"``).
      latents: ``[B, H / f, W / f, C]`` float32, the final (scaled) latents before decoding.
    """

    images: np.ndarray
    float_images: np.ndarray
    latents: np.ndarray


def encode_prompt(sd: StableDiffusion, params: dict, input_ids: jax.Array,
                  clip_skip: int | None = None) -> jax.Array:
    """``[B, L]`` token ids -> ``[B, L, D]`` prompt embeddings in the UNet's compute dtype.
    Jittable.

    Args:
      clip_skip: ``None`` (or 0): the CLIP text encoder's last hidden state. ``k >= 1``: the
        output of the layer ``k`` before the last, through the final LayerNorm (diffusers'
        ``clip_skip``: ``hidden_states[-(k + 1)]``); ``k`` at most ``num_hidden_layers - 1``.

    Raises:
      ValueError: naming ``clip_skip`` for a value outside ``[0, num_hidden_layers - 1]``; for an
        SDXL model (:func:`~jaxdiff.pipelines.encode_sdxl_prompts` encodes its prompts).
    """
    if sd.is_sdxl:
        raise ValueError("encode_prompt is for SD 1.x / 2.x: an SDXL model's prompts go through "
                         "two encoders (jaxdiff.pipelines.encode_sdxl_prompts)")
    k = _check_clip_skip(sd, clip_skip)
    return embed_tokens(sd.text_config, sd.unet_config.dtype, params["text_encoder"], input_ids, k)


def _check_clip_skip(sd: StableDiffusion, clip_skip: int | None) -> int:
    if sd.is_sdxl:
        return check_sdxl_clip_skip(sd.text_config, sd.text_config_2, clip_skip)
    if clip_skip is None:
        return 0
    return check_int("clip_skip", clip_skip, 0, sd.text_config.num_hidden_layers - 1)


def generate(
    sd: StableDiffusion,
    prompt: str | Sequence[str] | None = None,
    negative_prompt: str | Sequence[str] | None = None,
    *,
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    guidance_rescale: float = 0.0,
    height: int | None = None,
    width: int | None = None,
    seed: int | None = None,
    key: jax.Array | None = None,
    latents: Any = None,
    noise: Any = None,
    prompt_embeds: Any = None,
    negative_prompt_embeds: Any = None,
    image: Any = None,
    mask_image: Any = None,
    strength: float = 0.8,
    sample_posterior: bool = True,
    sampler: Sampler | str | None = None,
    sampler_options: dict | None = None,
    mesh: jax.sharding.Mesh | None = None,
    clip_skip: int | None = None,
    max_image_side: int = MAX_IMAGE_SIDE,
    prompt_2: str | Sequence[str] | None = None,
    negative_prompt_2: str | Sequence[str] | None = None,
    original_size: tuple[int, int] | None = None,
    crops_coords_top_left: tuple[int, int] | None = None,
    target_size: tuple[int, int] | None = None,
    negative_original_size: tuple[int, int] | None = None,
    negative_crops_coords_top_left: tuple[int, int] | None = None,
    negative_target_size: tuple[int, int] | None = None,
    aesthetic_score: float | None = None,
    negative_aesthetic_score: float | None = None,
    denoising_end: float | None = None,
    denoising_start: float | None = None,
    controlnet: Any = None,
    control_image: Any = None,
    controlnet_conditioning_scale: float | Sequence[float] = 1.0,
    guess_mode: bool = False,
    control_guidance_start: float | Sequence[float] = 0.0,
    control_guidance_end: float | Sequence[float] = 1.0,
    guidance_prompt: str | Sequence[str] | None = None,
) -> StableDiffusionOutput:
    """Text-to-image (or, with ``image``, image-to-image) with a loaded Stable Diffusion.

    Args:
      sd: from :func:`~jaxdiff.pipelines.load_stable_diffusion`; its unfused LoRAs
        (``sd.loras``, :func:`~jaxdiff.pipelines.load_lora`) are merged inside the program, their
        scales traced (a new scale does not recompile).
      prompt: a prompt or ``B`` prompts (``""`` is a valid prompt); or give ``prompt_embeds``
        instead. Text beyond the tokenizer's length (77 tokens for SD, BOS and EOS included)
        is truncated with a ``logging`` warning that quotes it.
      negative_prompt: ``None`` (``""`` for each prompt), one string for all, or ``B`` strings;
        the ``uncond`` branch of guidance, unused at ``guidance_scale = 1``. Or give
        ``negative_prompt_embeds``.
      num_steps: sampler steps ``N``, from 1 to the schedule's ``num_timesteps``
        (image-to-image runs the last ``int(N * strength)``; with LCM all ``N``, on a grid cut
        by ``strength``).
      guidance_scale: ``w``, any finite number: the UNet's prediction is ``uncond + w * (cond -
        uncond)`` (module docstring): ``1`` the prompt alone (batch ``B``), ``0`` the negative
        prompt alone, ``> 1`` classifier-free guidance; every ``w != 1`` runs the UNet on ``2B``
        per step. Unlike diffusers' pipelines (guidance off for every ``w <= 1``), ``w < 1``
        is the formula too. Changing ``w`` does not recompile (except to or from exactly 1).
      guidance_rescale: ``phi`` in ``[0, 1]`` (Lin et al. 2023); ``0`` disables it.
      height, width: the image size, multiples of 8 (and of the VAE's scale factor), at most
        ``max_image_side``; default ``sample_size * vae_scale_factor``, or the ``image``'s size
        rounded down to such multiples. With ``image``, the image is resized to them.
      seed, key: the randomness: ``key`` (a PRNG key) or ``seed`` (``jax.random.key(seed)``);
        exactly one unless both ``latents`` and (for a stochastic sampler) ``noise`` are given.
        The key draws the initial latents, the VAE posterior sample (image-to-image) and the
        sampler's per-step noise.
      latents: ``[B, H/f, W/f, C]`` standard-normal initial latents (diffusers' ``latents=``,
        NHWC); for image-to-image, the noise that ``add_noise`` mixes into the encoded image.
      noise: ``[M, B, H/f, W/f, C]`` the stochastic sampler's per-step noise (``M`` the steps
        that run), instead of drawing it from the key.
      prompt_embeds, negative_prompt_embeds: ``[B, L, D]`` precomputed text embeddings
        (:func:`encode_prompt`); the negative ones default to the embedding of ``""``.
      image: image-to-image source, ``[B, H, W, 3]`` or ``[H, W, 3]``: uint8 (0-255) or float
        in ``[0, 1]`` (other dtypes, and floats outside ``[0, 1]``, are refused:
        :func:`~jaxdiff.pipelines.images.prepare_image`); a batch of one is repeated over the
        prompts. A size that is not a multiple of 8 is rounded down and the image resized
        (nearest neighbour, as diffusers' ``VaeImageProcessor`` resizes arrays).
      mask_image: inpainting (:mod:`jaxdiff.pipelines.inpaint`): repaint where the mask is white
        (``>= 0.5``), keep ``image`` elsewhere; ``[H, W]``, ``[H, W, 1]`` or ``[B, H, W, 1]``
        (single-channel), the image's size; required by an inpainting (9-channel) UNet, blended
        each step with a 4-channel one (:func:`~jaxdiff.pipelines.inpaint.blend_samplers`).
        A traced argument.
      strength: image-to-image (and inpainting) strength in ``(0, 1]``
        (:func:`~jaxdiff.samplers.check_strength`: :func:`~jaxdiff.samplers.strength_start_step`;
        for LCM ``int(original_inference_steps * strength) >= N``). Inpainting at exactly 1
        starts from pure noise, as diffusers' inpainting pipelines (whose default it is).
      sample_posterior: image-to-image encodes with a sample of the VAE posterior (as diffusers
        does) or, if False, with its mean.
      sampler, sampler_options: a :class:`~jaxdiff.samplers.Sampler`, or a registered name plus
        options, instead of ``sd.sampler`` (the folder's scheduler).
      mesh: the device mesh (default: :func:`~jaxdiff.sharding.make_mesh` over all devices).
      clip_skip: skip the last ``k`` CLIP layers for the prompt (:func:`encode_prompt`); as in
        diffusers, the negative prompt is encoded without skipping, and precomputed embeddings
        are used as given. ``None``/0: no skip.
      max_image_side: the largest ``height`` / ``width`` accepted (default
        :data:`MAX_IMAGE_SIDE`), checked before anything is allocated.
      prompt_2, negative_prompt_2: SDXL only: the prompts for ``tokenizer_2`` /
        ``text_encoder_2`` (default: ``prompt`` / ``negative_prompt``;
        :func:`~jaxdiff.pipelines.tokenize_sdxl_prompts`). With the folder's
        ``force_zeros_for_empty_prompt`` and no ``negative_prompt``, the negative embeddings are
        zeros (SDXL base), else the encoding of ``negative_prompt`` (``""`` by default).
      original_size, crops_coords_top_left, target_size: SDXL only: the micro-conditioning
        pairs (:func:`~jaxdiff.pipelines.sdxl_time_ids`; sizes ``(height, width)``, crops
        ``(top, left)``); the sizes default to the image's ``(height, width)``, the crop to
        ``(0, 0)``.
      negative_original_size, negative_crops_coords_top_left, negative_target_size: SDXL
        only: the unconditional branch's pairs, by default from the others by diffusers' rules
        (``StableDiffusionXLImg2ImgPipeline``'s with ``image`` or a refiner,
        ``StableDiffusionXLPipeline``'s otherwise).
      aesthetic_score, negative_aesthetic_score: an SDXL refiner's
        (``requires_aesthetics_score``) only; defaults 6.0 and 2.5.
      denoising_end: a fraction in ``(0, 1)``: run only the first part of the schedule (the
        steps at timesteps ``>= round(T - denoising_end T)``) and return its latents, still
        noisy, for a refiner (:mod:`jaxdiff.pipelines.denoising_split`; the images are those
        latents decoded). As diffusers' ``denoising_end``.
      denoising_start: a fraction in ``(0, 1)``: ``image`` is then LATENTS ``[B, H/f, W/f, C]``
        (a base model's ``denoising_end`` output), and only the rest of the schedule runs from
        them (no encoding, no noise added; ``strength`` is not read). As diffusers'
        ``denoising_start``. Not for samplers whose steps diffusers counts otherwise (Heun,
        KDPM2, PNDM, LCM, TCD).
      controlnet: a ControlNet ``(config, params)``
        (:func:`~jaxdiff.pipelines.load_controlnet`) or a list of them (diffusers'
        ``MultiControlNetModel``: residuals summed), text-to-image only; checked against the
        UNet (:func:`~jaxdiff.models.check_controlnet_matches_unet`). Its parameters are program
        arguments (another ControlNet of the same config compiles nothing).
      control_image: one image (one ControlNet) or a list of one per ControlNet:
        ``[B, H, W, C]`` / ``[H, W, C]`` uint8 or float in ``[0, 1]``, RESIZED (nearest) to
        ``height`` x ``width`` (default: the first control image's size rounded down to a
        multiple of 8); a batch of one is repeated over the prompts
        (:mod:`jaxdiff.pipelines.controlnet`).
      controlnet_conditioning_scale: the residuals' scale, one for all or one per ControlNet
        (traced: a new scale compiles nothing).
      guess_mode: diffusers' guess mode: the residuals scaled from 0.1 (shallowest) to 1.0
        (mid); with guidance the ControlNets see the conditional half only, the unconditional
        half's residuals are zero. On whenever the (first) ControlNet has
        ``global_pool_conditions``.
      control_guidance_start, control_guidance_end: the fractions of the steps in which each
        ControlNet acts (diffusers' ``controlnet_keep``: step ``i`` of ``N`` is kept unless
        ``i / N < start`` or ``(i + 1) / N > end``; scale 0 outside); one for all or one per
        ControlNet.
      guidance_prompt: ``None`` (classifier-free guidance), one string for all, or ``B``
        strings: guidance along this prompt's direction instead of the prompt's, ``cond + (w -
        1) * (guide - uncond)`` (:func:`~jaxdiff.samplers.prompt_guidance`; the UNet runs on
        ``3B`` per step). The prompt itself as its guidance prompt is classifier-free guidance.
        For a word taught as a latent offset (``dreambooth.word_prior_offset``,
        :mod:`jaxdiff.finetune.offset`), the prompt without the word: the word's attribute is
        drawn once, the rest guided. SD 1.x / 2.x text prompts only (no SDXL, ControlNet,
        ``prompt_embeds``, ``guidance_rescale``), and ``guidance_scale != 1``.

    Returns:
      :class:`StableDiffusionOutput` (uint8 images, float images, final latents), ``B`` rows.

    Raises:
      ValueError: naming the argument: a missing or mis-sized prompt / embedding / latents /
        noise / image, an image of another dtype or range, a size not a multiple of 8 or
        beyond ``max_image_side``, a ``guidance_scale`` that is not a finite number,
        ``num_steps`` beyond the schedule, ``strength`` keeping no step (too few distillation
        timesteps for LCM), a sampler without image-to-image support, a missing key; a mask
        that is not single-channel or not the image's size, an inpainting UNet without
        ``mask_image``, a sampler that cannot blend
        (:func:`~jaxdiff.pipelines.inpaint.inpaint_mode`).

    The programs are cached (:data:`~jaxdiff.pipelines.sd_program.PROGRAM_CACHE`): the first
    call of a setting logs ``compiling Stable Diffusion ...`` at INFO and compiles.
    """
    steps = check_int("num_steps", num_steps, 1)
    if steps > sd.schedule.num_timesteps:
        raise ValueError(f"num_steps must be <= the schedule's num_timesteps "
                         f"({sd.schedule.num_timesteps}), got {steps}")
    w = check_guidance_scale(guidance_scale)
    phi = check_float("guidance_rescale", guidance_rescale, minimum=0.0, maximum=1.0)
    lcm = sd.unet_config.time_cond_dim is not None
    guided = w != 1.0 and not lcm  # an LCM UNet takes w as an embedding, with no second branch
    if lcm:
        for name, value in (("negative_prompt", negative_prompt),
                            ("negative_prompt_embeds", negative_prompt_embeds),
                            ("negative_prompt_2", negative_prompt_2)):
            if value is not None:
                raise ValueError(f"{name} is not used by an LCM-distilled UNet (unet "
                                 "time_cond_proj_dim): it takes guidance_scale as an embedding, "
                                 "with no unconditional branch")
        if phi:
            raise ValueError("guidance_rescale needs classifier-free guidance, which an "
                             "LCM-distilled UNet (time_cond_proj_dim) does not run")
    skip = _check_clip_skip(sd, clip_skip)
    if sampler is None:
        if sampler_options:
            raise ValueError("sampler_options given without sampler")
        sampler = sd.sampler
    elif isinstance(sampler, str):
        sampler = choose_sampler(sampler, sampler_options, sd.scheduler_config)
    elif not isinstance(sampler, Sampler):
        raise ValueError(f"sampler must be a Sampler or a registered name, got {sampler!r}")
    unit = max(8, sd.vae_scale_factor)
    max_side = check_int("max_image_side", max_image_side, unit)
    if height is not None:
        height = check_image_side("height", height, unit, max_side)
    if width is not None:
        width = check_image_side("width", width, unit, max_side)

    # -- the text: token ids (encoded inside the program) or embeddings
    micro = dict(original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                 target_size=target_size, negative_original_size=negative_original_size,
                 negative_crops_coords_top_left=negative_crops_coords_top_left,
                 negative_target_size=negative_target_size, aesthetic_score=aesthetic_score,
                 negative_aesthetic_score=negative_aesthetic_score)
    check_sdxl_arguments(sd, dict(micro, prompt_2=prompt_2, negative_prompt_2=negative_prompt_2))
    prompts = as_prompt_list(prompt, "prompt")
    if (prompts is None) == (prompt_embeds is None):
        raise ValueError("give exactly one of prompt and prompt_embeds")
    uncond = sdxl_negative = None
    if sd.is_sdxl:
        if prompt_embeds is not None or negative_prompt_embeds is not None:
            raise ValueError("prompt_embeds / negative_prompt_embeds are not supported for SDXL "
                             "models yet: give prompt (and negative_prompt)")
        cond, sdxl_negative, batch = sdxl_tokens(sd, prompt, prompt_2, negative_prompt,
                                                 negative_prompt_2, guided=guided, logger=log)
    elif prompts is not None:
        cond = prompt_tokens(sd, prompts, "prompt")
    else:
        cond = jnp.asarray(prompt_embeds)
        if cond.ndim != 3 or cond.shape[-1] != sd.text_config.hidden_size:
            raise ValueError(f"prompt_embeds must be [B, L, {sd.text_config.hidden_size}], got "
                             f"{cond.shape}")
    if not sd.is_sdxl:
        batch = cond.shape[0]
    if guided and not sd.is_sdxl:
        negs = as_prompt_list(negative_prompt, "negative_prompt")
        if negative_prompt_embeds is not None:
            if negs is not None:
                raise ValueError("give at most one of negative_prompt and negative_prompt_embeds")
            uncond = jnp.asarray(negative_prompt_embeds)
            if uncond.shape != cond.shape:
                raise ValueError(f"negative_prompt_embeds must have prompt_embeds' shape "
                                 f"{cond.shape}, got {uncond.shape}")
        else:
            negs = [""] * batch if negs is None else negs
            if len(negs) == 1:
                negs = negs * batch
            if len(negs) != batch:
                raise ValueError(f"negative_prompt has {len(negs)} entries for {batch} prompts")
            uncond = prompt_tokens(sd, negs, "negative_prompt")
    if guidance_prompt is not None:
        why = ("an SDXL model" if sd.is_sdxl else "prompt_embeds" if prompts is None
               else "an unguided program (guidance_scale 1, or an LCM UNet)" if not guided
               else "guidance_rescale" if phi else "controlnet" if controlnet is not None
               else None)
        if why:
            raise ValueError(f"guidance_prompt is not supported with {why}")
        guides = as_prompt_list(guidance_prompt, "guidance_prompt")
        guides = guides * batch if len(guides) == 1 else guides
        if len(guides) != batch:
            raise ValueError(f"guidance_prompt has {len(guides)} entries for {batch} prompts")
        uncond = {"null": uncond, "guide": prompt_tokens(sd, guides, "guidance_prompt")}

    # -- image-to-image source (or the latents to start from) and the image size
    img2img = mask = None
    inpaint = inpaint_mode(sd.unet_config, sd.vae_config, mask=mask_image, image=image,
                           sampler=sampler, split=(denoising_start, denoising_end))
    split = denoising_split(sampler, sd.schedule, steps, denoising_start, denoising_end)
    from_latents = denoising_start is not None
    if from_latents:
        image, sizes = start_latents(image, sd.unet_config.in_channels, sd.vae_scale_factor,
                                     batch, height, width)
        height, width = (check_image_side(n, v, unit, max_side)
                         for n, v in zip(("height", "width"), sizes))
        strength = split.strength
        img2img = {"strength": check_strength(sampler, sd.schedule, steps, strength)}
    elif image is not None:
        source = np.shape(image)[-3:-1]
        image = prepare_image(image, channels=sd.vae_config.in_channels, multiple=unit,
                              height=height, width=width)
        if image.shape[0] == 1 and batch > 1:
            image = np.repeat(image, batch, axis=0)
        if image.shape[0] != batch:
            raise ValueError(f"image has batch {image.shape[0]} for {batch} prompts")
        height, width = (check_image_side(n, v, unit, max_side)
                         for n, v in zip(("height", "width"), image.shape[1:3]))
        img2img = {"strength": check_strength(sampler, sd.schedule, steps, strength)}
        mask = inpaint and prepare_mask(mask_image, source, height, width, batch)
    control = None
    if controlnet is not None:
        if image is not None:
            raise ValueError("controlnet with image (ControlNet image-to-image, inpainting) is not "
                             "supported yet: give control_image without image")
        control = prepare_controlnets(
            sd.unet_config, controlnet, control_image, scale=controlnet_conditioning_scale,
            guess_mode=guess_mode, start=control_guidance_start, end=control_guidance_end,
            batch=batch, num_steps=steps, multiple=unit, height=height, width=width)
        height, width = (check_image_side(n, v, unit, max_side)
                         for n, v in zip(("height", "width"), (control.height, control.width)))
    elif control_image is not None:
        raise ValueError("control_image given without controlnet")
    default = sd.sample_size * sd.vae_scale_factor
    height = check_image_side("height", default, unit, max_side) if height is None else height
    width = check_image_side("width", default, unit, max_side) if width is None else width
    latent_shape = (height // sd.vae_scale_factor, width // sd.vae_scale_factor,
                    sd.vae_config.latent_channels if inpaint else sd.unet_config.in_channels)
    if sd.is_sdxl:
        cond, uncond = sdxl_conditions(sd, cond, sdxl_negative, guided=guided, height=height,
                                       width=width, img2img=image is not None, micro=micro)

    # -- randomness
    if latents is not None:
        latents = jnp.asarray(latents, jnp.float32)
        if latents.shape != (batch, *latent_shape):
            raise ValueError(f"latents must have shape {(batch, *latent_shape)}, got "
                             f"{latents.shape}")
    if noise is not None:
        noise = jnp.asarray(noise, jnp.float32)
    if key is not None and seed is not None:
        raise ValueError("give at most one of seed and key")
    if key is None:
        needs_key = ((latents is None and not from_latents)
                     or (sampler.stochastic and noise is None)
                     or (image is not None and sample_posterior and not from_latents))
        if seed is None and needs_key:
            raise ValueError("seed or key is required (the latents or noise are not all given)")
        key = jax.random.key(0 if seed is None else check_int("seed", seed, 0))

    # -- shard over the mesh (the batch padded to a multiple of the device count)
    mesh = make_mesh() if mesh is None else mesh
    pad = (-batch) % mesh.devices.size
    data = jax.sharding.NamedSharding(mesh, _P(DATA_AXIS))
    repl = jax.sharding.NamedSharding(mesh, _P())
    put = lambda x, s: None if x is None else jax.device_put(x, s)  # noqa: E731
    pad_tree = lambda x: jax.tree.map(lambda a: pad_batch(a, pad), x)  # noqa: E731
    args = (
        put(pad_tree(cond), data), put(pad_tree(uncond), data), put(pad_batch(latents, pad), data),
        put(pad_batch(noise, pad, axis=1), jax.sharding.NamedSharding(mesh, _P(None, DATA_AXIS))),
        put(pad_batch(image, pad), data), put(key, repl),
        put(jnp.float32(w), repl), put(jnp.float32(phi), repl),
        None if control is None else {
            "params": control.args["params"], "scales": put(control.args["scales"], repl),
            "keep": put(control.args["keep"], repl),
            "images": [put(pad_batch(a, pad), data) for a in control.args["images"]]},
        put(pad_batch(mask, pad), data),
    )
    start = None if img2img is None else img2img_key(sampler, sd.schedule, steps, strength)
    program_key = ProgramKey.make(
        sd, sampler, num_steps=steps, guided=guided, rescale=phi > 0, img2img=start,
        sample_posterior=bool(sample_posterior and not from_latents),
        latent_shape=latent_shape, mesh=mesh, clip_skip=skip, from_latents=from_latents,
        end_step=None if split.end is None else split.end - (
            0 if img2img is None else img2img_start_step(sampler, sd.schedule, steps, strength)),
        end_t=split.end_t, controlnets=None if control is None else control.configs,
        guess_mode=control is not None and control.guess_mode,
        inpaint=inpaint and (inpaint, float(strength) == 1.0),
        guide_prompt=guidance_prompt is not None)
    program = PROGRAM_CACHE.get(program_key,
                                lambda: build_program(sd, sampler, program_key, img2img))
    leaves, treedef = jax.tree.flatten((sd.params, sd.loras, args))  # what jit keys on
    signature = (treedef, tuple((a.shape, a.dtype) for a in leaves))
    first = PROGRAM_CACHE.first_call(program_key, signature)
    if first:
        log.info("compiling Stable Diffusion (%dx%d, batch %d, %d steps, %s, %s)...",
                 height, width, batch, steps, sampler.name,
                 "guided" if guided else "conditional only (guidance_scale 1)")
    t0 = time.perf_counter()
    images, lat = program(sd.params, sd.loras, *args)
    images, lat = jax.device_get((images, lat))
    log.info("%s in %.1f s", "compiled and denoised" if first else "denoised",
             time.perf_counter() - t0)
    images, lat = np.asarray(images)[:batch], np.asarray(lat)[:batch]
    return StableDiffusionOutput(to_uint8(images), images, lat)
