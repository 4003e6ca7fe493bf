r"""Stable Diffusion (1.x, 2.x, SDXL) text-to-image (and image-to-image) from a diffusers-format
folder, with no network: the whole generation (text encoders, denoising scan with guidance, VAE
decode) is one jitted program.

    python -m experiments.text_to_image --model DIR --prompt "a photo of a cat" \
        --negative_prompt "blurry" --steps 30 --guidance_scale 7.5 --seed 0 --out out.png
    python -m experiments.text_to_image --model DIR --prompt "..." --sampler dpmpp_2m \
        --option sigma_schedule=karras --num_images 4 --out grid.png
    python -m experiments.text_to_image --model DIR --prompt "..." --init_image in.png \
        --strength 0.6 --out out.png
    python -m experiments.text_to_image --model DIR --prompt "..." --init_image in.png \
        --mask mask.png --strength 1 --out out.png
    python -m experiments.text_to_image --model DIR --prompt "..." --lora style.safetensors:0.8 \
        --lora subject.safetensors --out out.png

Writes ``out`` (one image, or ``<stem>_<i>.<ext>`` for several; the format follows the
extension).

A folder that jaxdiff exported may carry the settings it was measured with, in
``jaxdiff_generation.json`` (:mod:`jaxdiff.pipelines.generation_defaults`): its sampler (with
options), steps, guidance scale, image size and crop. Each of ``--sampler``, ``--steps``,
``--guidance_scale``, ``--height`` and ``--width`` that is not given takes the folder's value
(over the flag's default), and one log line names those that came from the file. A recorded
``crop`` (the text-to-MNIST folder's 28x28 centre of its 32x32 images) is applied to the images
written when they have the recorded size (``--nocrop``: write the whole image).

Logs a line before the compile and one after the generation. Every user error (a flag, the
model folder, the init image, the output path, a size that does not fit in memory)
is one ``error: ...`` line naming the flag or file, exit status 2, and everything that can be
checked before the work starts is checked first.

``--mask PATH`` (with ``--init_image``) inpaints: white (``>= 0.5`` after conversion to
grayscale) is repainted, the rest of the init image kept (:mod:`jaxdiff.pipelines.inpaint`), with
an inpainting (9-channel) UNet or by diffusers' mask blending with an ordinary one (samplers
``ddim``, ``pndm`` / ``plms``, ``euler``, ``dpm_solver``, ``unipc``, ``lms``, ``deis``). The
mask file must have the init image's size; it is converted to grayscale and resized with it
(Lanczos). An inpainting folder needs ``--mask``.

``--guidance_scale w`` means diffusers' formula ``uncond + w * (cond - uncond)`` for every ``w``
(``1``: the prompt alone; ``0``: the negative prompt alone); diffusers' pipelines switch guidance
off for every ``w <= 1`` instead, so the two differ for ``w < 1`` only
(:mod:`jaxdiff.pipelines.stable_diffusion`).

``--lora PATH[:SCALE]`` (repeatable) applies LoRA files (diffusers / peft or kohya / A1111
format; a folder holding ``pytorch_lora_weights.safetensors``) with their weights (default 1):
``PATH:SCALE`` is split at the last ``:`` only when what follows is a number, so paths with
``:`` in them work. The LoRAs are merged inside the generation program (their scales traced),
or once before it with ``--fuse_lora`` (:mod:`jaxdiff.pipelines.lora`).

An SDXL folder (``StableDiffusionXLPipeline``, or a refiner's ``StableDiffusionXLImg2ImgPipeline``
with ``--init_image``) loads with the same flags; SDXL adds ``--prompt_2``,
``--negative_prompt_2``, the micro-conditioning pairs ``--original_size H,W``,
``--crops_coords_top_left TOP,LEFT``, ``--target_size H,W`` (and their ``--negative_*``), and a
refiner's ``--aesthetic_score`` / ``--negative_aesthetic_score``; given to an SD 1.x / 2.x folder
they are an error.

    python -m experiments.text_to_image --model SDXL_DIR --prompt "a cat" --steps 30 \
        --guidance_scale 5 --original_size 1024,1024 --out cat.png

``--controlnet FOLDER --control_image PATH`` (both repeatable, one image per ControlNet, in
order; several ControlNets sum their residuals) steers text-to-image with diffusers
``ControlNetModel`` folders (:func:`~jaxdiff.pipelines.load_controlnet`); ``--control_scale S``
is given once for all or once per ControlNet (default 1), ``--guess_mode`` and
``--control_guidance_start`` / ``--control_guidance_end`` as diffusers'. The control images are
read as RGB and resized to ``--height`` x ``--width`` (default: the first control image's size
rounded down to a multiple of 8).

    python -m experiments.text_to_image --model DIR --prompt "a house" \
        --controlnet canny_controlnet/ --control_image edges.png --control_scale 0.8 --out h.png
"""

from __future__ import annotations

import logging
import math
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import cli
from experiments.cli import ConfigError
from jaxdiff.pipelines.images import check_output_path
from jaxdiff.pipelines.stable_diffusion import MAX_IMAGE_SIDE
from jaxdiff.samplers import sampler_names

PROG = "python -m experiments.text_to_image"
SDXL_PAIRS = {
    "original_size": "H,W (default: the image size)",
    "crops_coords_top_left": "TOP,LEFT (default 0,0)",
    "target_size": "H,W (default: the image size)",
    "negative_original_size": "H,W for the negative branch (with --negative_target_size)",
    "negative_crops_coords_top_left": "TOP,LEFT for the negative branch",
    "negative_target_size": "H,W for the negative branch (with --negative_original_size)",
}
"""SDXL's micro-conditioning flags (pairs of ints ``A,B``) and their help."""
log = logging.getLogger(__name__)

__all__ = ["main", "cli_main", "parse_lora_flag", "parse_pair_flag", "folder_settings"]


def _define(fv: flags.FlagValues, argv: list) -> None:
    del argv
    flags.DEFINE_string("model", None, "diffusers Stable Diffusion folder (model_index.json, "
                        "unet/, vae/, text_encoder/, tokenizer/, scheduler/)", flag_values=fv)
    flags.DEFINE_string("prompt", None, "the prompt (\"\" is valid: no text)", flag_values=fv)
    flags.DEFINE_string("negative_prompt", None, "the negative prompt, the unconditional branch "
                        "of guidance (default: \"\")", flag_values=fv)
    flags.DEFINE_integer("num_images", 1, "images for the prompt", flag_values=fv)
    flags.DEFINE_integer("steps", 30, "sampling steps (default: the folder's "
                         "jaxdiff_generation.json, else 30)", flag_values=fv)
    flags.DEFINE_float("guidance_scale", 7.5, "guidance w: the UNet predicts uncond + w * (cond "
                       "- uncond); 1: the prompt alone, 0: the negative prompt alone, > 1: "
                       "classifier-free guidance (any finite w; default: the folder's "
                       "jaxdiff_generation.json, else 7.5)", flag_values=fv)
    flags.DEFINE_float("guidance_rescale", 0.0, "guidance rescale phi in [0, 1]", flag_values=fv)
    flags.DEFINE_integer("height", None, "image height (multiple of 8; default: the model's, or "
                         "--init_image's rounded down to a multiple of 8)", flag_values=fv)
    flags.DEFINE_integer("width", None, "image width (multiple of 8; default: the model's, or "
                         "--init_image's rounded down to a multiple of 8)", flag_values=fv)
    flags.DEFINE_integer("max_image_side", MAX_IMAGE_SIDE, "largest --height / --width accepted "
                         "(a bound against typos)", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed", flag_values=fv)
    flags.DEFINE_enum("sampler", None, list(sampler_names()),
                      "sampler (default: the folder's jaxdiff_generation.json, else its "
                      "scheduler)", flag_values=fv)
    flags.DEFINE_multi_string("option", [], "a sampler option as key=value (with --sampler)",
                              flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype (the VAE "
                      "decodes in float32 when its config asks)", flag_values=fv)
    flags.DEFINE_string("variant", None, "weights variant (e.g. fp16)", flag_values=fv)
    flags.DEFINE_string("init_image", None, "image-to-image: the source image (resized to "
                        "--height x --width if given, else to its size rounded down to a "
                        "multiple of 8, with Lanczos as diffusers)", flag_values=fv)
    flags.DEFINE_float("strength", 0.8, "image-to-image strength in (0, 1] (with --init_image; "
                       "inpainting: 1 starts from noise)", flag_values=fv)
    flags.DEFINE_string("mask", None, "inpainting: a mask file of --init_image's size, white = "
                        "repaint (converted to grayscale, binarised at 0.5)", flag_values=fv)
    flags.DEFINE_string("prompt_2", None, "SDXL: the prompt for tokenizer_2 / text_encoder_2 "
                        "(default: --prompt)", flag_values=fv)
    flags.DEFINE_string("negative_prompt_2", None, "SDXL: the negative prompt for "
                        "text_encoder_2 (default: --negative_prompt)", flag_values=fv)
    for name, what in SDXL_PAIRS.items():
        flags.DEFINE_string(name, None, f"SDXL micro-conditioning: {what}", flag_values=fv)
    flags.DEFINE_float("aesthetic_score", None, "SDXL refiner (requires_aesthetics_score): the "
                       "aesthetic score (default 6.0)", flag_values=fv)
    flags.DEFINE_float("negative_aesthetic_score", None, "SDXL refiner: the negative aesthetic "
                       "score (default 2.5)", flag_values=fv)
    flags.DEFINE_integer("clip_skip", None, "skip the last k CLIP layers for the prompt "
                         "(diffusers' clip_skip)", flag_values=fv)
    flags.DEFINE_multi_string("lora", [], "a LoRA file as PATH[:SCALE] (repeatable; diffusers / "
                              "peft or kohya format; SCALE default 1)", flag_values=fv)
    flags.DEFINE_bool("fuse_lora", False, "merge the --lora files into the weights once "
                      "instead of inside the generation program", flag_values=fv)
    flags.DEFINE_multi_string("controlnet", [], "a diffusers ControlNetModel folder "
                              "(repeatable: several ControlNets)", flag_values=fv)
    flags.DEFINE_multi_string("control_image", [], "the control image of each --controlnet, in "
                              "order (resized to --height x --width)", flag_values=fv)
    flags.DEFINE_multi_float("control_scale", [], "the ControlNets' conditioning scale: once "
                             "for all or once per --controlnet (default 1)", flag_values=fv)
    flags.DEFINE_bool("guess_mode", False, "ControlNet guess mode (diffusers')", flag_values=fv)
    flags.DEFINE_float("control_guidance_start", 0.0, "the fraction of the steps where the "
                       "ControlNets start acting", flag_values=fv)
    flags.DEFINE_float("control_guidance_end", 1.0, "the fraction of the steps where the "
                       "ControlNets stop acting", flag_values=fv)
    flags.DEFINE_bool("crop", True, "apply the folder's recorded crop (jaxdiff_generation.json) "
                      "to the images written, when they have the recorded size; --nocrop "
                      "writes the whole image", flag_values=fv)
    flags.DEFINE_string("out", "out.png", "output image (.png, .jpg, .webp, ...; several "
                        "images: <stem>_<i>.<ext>)", flag_values=fv)


def _flag_remedy(option: str, value) -> str:
    """A :class:`~jaxdiff.pipelines.LoadOptionError`'s remedy spelt as this command's flag."""
    return f"leave out --{option}" if value is None else f"pass --{option} {value}"


def parse_lora_flag(value: str) -> tuple[str, float]:
    """``--lora PATH[:SCALE]`` -> ``(path, scale)``: split at the last ``:`` when what follows
    is a finite number (``C:\\x.safetensors`` stays a path), scale 1 otherwise.

    Raises:
      ConfigError: an empty path, or a non-finite scale.
    """
    path, scale = value, 1.0
    head, sep, tail = value.rpartition(":")
    if sep:
        try:
            scale, path = float(tail), head
        except ValueError:
            pass
    if not math.isfinite(scale):
        raise ConfigError(f"--lora {value!r}: the scale must be a finite number")
    if not path:
        raise ConfigError(f"--lora {value!r}: expected PATH or PATH:SCALE")
    return path, scale


def parse_pair_flag(name: str, value: str | None) -> tuple[int, int] | None:
    """``"A,B"`` -> ``(A, B)`` ints >= 0 for the flag ``--name``; ``None`` stays ``None``.

    Raises:
      ConfigError: naming the flag, for anything but two comma-separated ints >= 0.
    """
    if value is None:
        return None
    parts = value.split(",")
    try:
        pair = tuple(int(p) for p in parts)
    except ValueError:
        pair = ()
    if len(pair) != 2 or min(pair) < 0:
        raise ConfigError(f"--{name} must be two ints >= 0 as A,B (e.g. 1024,1024), got "
                          f"{value!r}")
    return pair


def _check_negative_prompt(fv: flags.FlagValues, guidance_scale: float) -> None:
    if fv.negative_prompt is not None and guidance_scale == 1.0:
        raise ConfigError("--negative_prompt has no effect with --guidance_scale 1 (the prompt "
                          "alone); use another scale, e.g. 7.5")


def folder_settings(fv: flags.FlagValues, defaults) -> tuple[dict, str]:
    """The generation settings: each flag's value where the user gave it (``fv[name].present``),
    else the folder's :class:`~jaxdiff.pipelines.GenerationDefaults` (``None``: none), else the
    flag's default. Returns ``({"sampler", "sampler_options", "steps", "guidance_scale",
    "height", "width"}, log line)``; the log line names the settings taken from the folder
    (``""`` when none were)."""
    out = dict(sampler=fv.sampler, sampler_options=cli.parse_sampler_options(fv.option),
               steps=fv.steps, guidance_scale=fv.guidance_scale, height=fv.height,
               width=fv.width)
    if defaults is None:
        return out, ""
    used = []
    if defaults.sampler is not None and not fv["sampler"].present:
        out.update(sampler=defaults.sampler, sampler_options=dict(defaults.sampler_options))
        used.append(f"--sampler {defaults.sampler}")
    for flag, value in (("steps", defaults.num_steps), ("guidance_scale", defaults.guidance_scale)):
        if value is not None and not fv[flag].present:
            out[flag] = value
            used.append(f"--{flag} {value:g}")
    if defaults.height is not None and not fv.init_image:
        for flag in ("height", "width"):
            if not fv[flag].present:
                out[flag] = getattr(defaults, flag)
                used.append(f"--{flag} {out[flag]}")
    return out, ", ".join(used)


def _check_flags(fv: flags.FlagValues) -> None:
    """The checks that need no model: every one raises :class:`ConfigError` naming the flag."""
    if not fv.model:
        raise ConfigError("--model is required")
    if fv.prompt is None:
        raise ConfigError("--prompt is required (--prompt \"\" for an empty prompt)")
    if fv.num_images < 1:
        raise ConfigError(f"--num_images must be >= 1, got {fv.num_images}")
    if fv.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {fv.steps}")
    if fv.option and not fv.sampler:
        raise ConfigError("--option needs --sampler")
    if fv["strength"].present and not fv.init_image:
        raise ConfigError("--strength needs --init_image (it is the image-to-image strength)")
    if fv.mask and not fv.init_image:
        raise ConfigError("--mask needs --init_image (the image to inpaint)")
    if not math.isfinite(fv.guidance_scale):
        raise ConfigError(f"--guidance_scale must be a finite number, got {fv.guidance_scale}")
    _check_negative_prompt(fv, fv.guidance_scale)
    if fv.max_image_side < 8:
        raise ConfigError(f"--max_image_side must be >= 8, got {fv.max_image_side}")
    for name in ("height", "width"):
        v = fv[name].value
        if v is not None and not 8 <= v <= fv.max_image_side:
            raise ConfigError(f"--{name} must lie in [8, --max_image_side={fv.max_image_side}], "
                              f"got {v} (raise --max_image_side to allow more)")
        if v is not None and v % 8:
            raise ConfigError(f"--{name} must be a multiple of 8, got {v}")
    for name in SDXL_PAIRS:
        parse_pair_flag(name, fv[name].value)
    if fv.init_image and (fv.height is None) != (fv.width is None):
        raise ConfigError("--init_image: give both --height and --width (the size to resize "
                          "it to) or neither")
    if fv.fuse_lora and not fv.lora:
        raise ConfigError("--fuse_lora needs --lora")
    for value in fv.lora:
        path, _ = parse_lora_flag(value)
        if not os.path.exists(path):
            raise ConfigError(f"--lora {value!r}: no such file or folder {path!r}")
    _check_controlnet_flags(fv)
    try:
        check_output_path(fv.out, "--out")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_controlnet_flags(fv: flags.FlagValues) -> None:
    """``--controlnet`` / ``--control_image`` / ``--control_scale`` counts and paths."""
    n = len(fv.controlnet)
    used = [name for name in ("control_image", "control_scale", "guess_mode",
                              "control_guidance_start", "control_guidance_end")
            if fv[name].present]
    if not n:
        if used:
            raise ConfigError(f"--{used[0]} needs --controlnet")
        return
    if fv.init_image:
        raise ConfigError("--controlnet with --init_image (ControlNet image-to-image) is not "
                          "supported yet")
    if len(fv.control_image) != n:
        raise ConfigError(f"--control_image given {len(fv.control_image)} times for {n} "
                          "--controlnet (one image each, in order)")
    if len(fv.control_scale) not in (0, 1, n):
        raise ConfigError(f"--control_scale given {len(fv.control_scale)} times for {n} "
                          "--controlnet (once for all or once each)")
    for folder in fv.controlnet:
        if not os.path.isdir(folder):
            raise ConfigError(f"--controlnet {folder!r}: no such folder")
    for path in fv.control_image:
        if not os.path.isfile(path):
            raise ConfigError(f"--control_image {path!r}: no such file")
    if (fv.height is None) != (fv.width is None):
        raise ConfigError("--controlnet: give both --height and --width or neither")


def _controlnet_kwargs(fv: flags.FlagValues, dtype) -> dict:
    """:func:`~jaxdiff.pipelines.generate`'s ControlNet arguments from the flags (loads the
    ControlNets and reads the control images); ``{}`` without ``--controlnet``."""
    from jaxdiff.pipelines import load_controlnet, load_image

    if not fv.controlnet:
        return {}
    nets, images = [], []
    for folder, path in zip(fv.controlnet, fv.control_image):
        try:
            nets.append(load_controlnet(folder, dtype=dtype, variant=fv.variant))
        except ValueError as e:
            raise ConfigError(f"--controlnet {folder!r}: "
                              f"{str(e).removeprefix('controlnet: ')}") from None
        images.append(load_image(path, height=fv.height, width=fv.width,
                                 name="--control_image"))
    scales = fv.control_scale or [1.0]
    single = len(nets) == 1
    return dict(controlnet=nets[0] if single else nets,
                control_image=images[0] if single else images,
                controlnet_conditioning_scale=scales[0] if len(scales) == 1 else scales,
                guess_mode=fv.guess_mode, control_guidance_start=fv.control_guidance_start,
                control_guidance_end=fv.control_guidance_end)


def _load_mask(fv: flags.FlagValues, image: np.ndarray, load_image) -> np.ndarray:
    """``--mask`` as uint8 ``[H, W, 1]`` at the loaded init image's size; ``ConfigError`` unless
    the files have the same size."""
    mask = load_image(fv.mask, multiple=1, mode="L", name="--mask")
    source = load_image(fv.init_image, multiple=1, name="--init_image")
    if mask.shape[:2] != source.shape[:2]:
        raise ConfigError(f"--mask {fv.mask!r} is {mask.shape[0]}x{mask.shape[1]} (height x "
                          f"width) but --init_image is {source.shape[0]}x{source.shape[1]}: give "
                          "a mask of the image's size")
    return load_image(fv.mask, height=image.shape[0], width=image.shape[1], mode="L",
                      name="--mask")


def main(argv: Optional[Sequence[str]] = None) -> np.ndarray:
    """Parses ``argv`` (without the program name), generates, writes the image(s); returns the
    uint8 images written ``[N, H, W, 3]`` (cropped when the folder records a crop). Everything
    that can be checked before the work (flags, the output path, the init image) is checked
    first.

    Raises:
      ConfigError: an invalid flag, a bad model folder, init image or output path, an invalid
        generation setting, or a generation that does not fit in memory.
    """
    from jaxdiff.pipelines import (
        GENERATION_DEFAULTS_FILE,
        LoadOptionError,
        crop_images,
        fuse_lora,
        generate,
        load_image,
        load_lora,
        load_stable_diffusion,
        read_generation_defaults,
        save_images,
    )

    fv = cli.parse_flags(_define, [] if argv is None else argv, PROG, __doc__)
    _check_flags(fv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("jaxdiff.pipelines.stable_diffusion").setLevel(logging.INFO)
    dtype = jnp.bfloat16 if fv.dtype == "bfloat16" else jnp.float32
    try:
        defaults = read_generation_defaults(fv.model) if os.path.isdir(fv.model) else None
    except ValueError as e:
        raise ConfigError(f"--model: {e}") from None
    settings, from_folder = folder_settings(fv, defaults)
    _check_negative_prompt(fv, settings["guidance_scale"])
    if from_folder:
        log.info("from %s: %s (flags given override them)",
                 os.path.join(fv.model, GENERATION_DEFAULTS_FILE), from_folder)
    try:
        image = None
        if fv.init_image:
            image = load_image(fv.init_image, height=fv.height, width=fv.width,
                               name="--init_image")
        mask = _load_mask(fv, image, load_image) if fv.mask else None
        sd = load_stable_diffusion(fv.model, variant=fv.variant, dtype=dtype,
                                   sampler=settings["sampler"],
                                   sampler_options=settings["sampler_options"] or None)
        control = _controlnet_kwargs(fv, dtype)
        for value in fv.lora:
            path, scale = parse_lora_flag(value)
            try:
                sd = load_lora(sd, path, scale)
            except (OSError, ValueError) as e:
                raise ConfigError(f"--lora {value!r}: {e}") from None
        if fv.fuse_lora:
            sd = fuse_lora(sd)
        steps, w = settings["steps"], settings["guidance_scale"]
        if steps > sd.schedule.num_timesteps:
            raise ConfigError(f"--steps must be <= {sd.schedule.num_timesteps} (the scheduler's "
                              f"num_train_timesteps), got {steps}")
        prompts = [fv.prompt] * fv.num_images
        negatives = None if fv.negative_prompt is None else [fv.negative_prompt] * fv.num_images
        sdxl = {name: parse_pair_flag(name, fv[name].value) for name in SDXL_PAIRS}
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            sdxl[name] = fv[name].value
        sdxl["prompt_2"] = fv.prompt_2
        sdxl["negative_prompt_2"] = fv.negative_prompt_2
        out = generate(sd, prompts, negatives, num_steps=steps,
                       guidance_scale=w, guidance_rescale=fv.guidance_rescale,
                       height=None if image is not None else settings["height"],
                       width=None if image is not None else settings["width"], seed=fv.seed,
                       image=image, mask_image=mask, strength=fv.strength,
                       clip_skip=fv.clip_skip,
                       max_image_side=fv.max_image_side, **sdxl, **control)
    except LoadOptionError as e:
        raise ConfigError(e.message(_flag_remedy)) from None
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise ConfigError(f"out of memory generating {fv.num_images} image(s) of this size on "
                          f"{jax.devices()[0].platform}: lower --height / --width / --num_images"
                          f" or use --dtype bfloat16 ({str(e).splitlines()[0]})") from None
    images, cropped = out.images, ""
    crop = defaults.crop if defaults is not None else None
    if crop is not None and fv.crop:
        if images.shape[1:3] == (defaults.height, defaults.width):
            images = crop_images(images, crop)
            cropped = f", cropped to {crop[2]}x{crop[3]} at ({crop[0]}, {crop[1]}) as " \
                f"{GENERATION_DEFAULTS_FILE} says (--nocrop: the whole image)"
        else:
            log.info("the folder's crop is for %dx%d images, not applied to %dx%d",
                     defaults.height, defaults.width, *images.shape[1:3])
    try:
        paths = save_images(images, fv.out)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--out {fv.out!r}: cannot write the image ({e})") from None
    print(f"wrote {', '.join(paths)} ({len(paths)} image(s), {sd.sampler.name}, "
          f"{steps} steps, guidance {w:g}{cropped})")
    return images


def cli_main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m experiments.text_to_image``: :func:`main` with errors as one line."""
    cli.run(main, argv)


if __name__ == "__main__":
    cli_main()
