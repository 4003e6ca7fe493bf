r"""Stable Diffusion text-to-image (and image-to-image) from a diffusers-format folder, with no
network: the whole generation (text encoder, denoising scan with guidance, VAE decode) is one
jitted program.

    python -m experiments.text_to_image --model DIR --prompt "a photo of a cat" \
        --negative_prompt "blurry" --steps 30 --guidance_scale 7.5 --seed 0 --out out.png
    python -m experiments.text_to_image --model DIR --prompt "..." --sampler dpmpp_2m \
        --option sigma_schedule=karras --num_images 4 --out grid.png
    python -m experiments.text_to_image --model DIR --prompt "..." --init_image in.png \
        --strength 0.6 --out out.png

Writes ``out`` (one PNG, or ``<stem>_<i>.png`` for several images). Logs a line before the
compile and one after the generation; errors in the flags or the folder are one line.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import cli
from experiments.cli import ConfigError
from jaxdiff.samplers import sampler_names

PROG = "python -m experiments.text_to_image"

__all__ = ["main", "cli_main"]


def _define(fv: flags.FlagValues, argv: list) -> None:
    del argv
    flags.DEFINE_string("model", None, "diffusers Stable Diffusion folder (model_index.json, "
                        "unet/, vae/, text_encoder/, tokenizer/, scheduler/)", flag_values=fv)
    flags.DEFINE_string("prompt", None, "the prompt", flag_values=fv)
    flags.DEFINE_string("negative_prompt", None, "the negative prompt (default: none)",
                        flag_values=fv)
    flags.DEFINE_integer("num_images", 1, "images for the prompt", flag_values=fv)
    flags.DEFINE_integer("steps", 30, "sampling steps", flag_values=fv)
    flags.DEFINE_float("guidance_scale", 7.5, "classifier-free guidance (<= 1: off)",
                       flag_values=fv)
    flags.DEFINE_float("guidance_rescale", 0.0, "guidance rescale phi in [0, 1]", flag_values=fv)
    flags.DEFINE_integer("height", None, "image height (multiple of 8; default: the model's)",
                         flag_values=fv)
    flags.DEFINE_integer("width", None, "image width (multiple of 8; default: the model's)",
                         flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed", flag_values=fv)
    flags.DEFINE_enum("sampler", None, list(sampler_names()),
                      "sampler (default: the folder's scheduler)", flag_values=fv)
    flags.DEFINE_multi_string("option", [], "a sampler option as key=value (with --sampler)",
                              flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype (the VAE "
                      "decodes in float32 when its config asks)", flag_values=fv)
    flags.DEFINE_string("variant", None, "weights variant (e.g. fp16)", flag_values=fv)
    flags.DEFINE_string("init_image", None, "image-to-image: the source image", flag_values=fv)
    flags.DEFINE_float("strength", 0.8, "image-to-image strength in (0, 1]", flag_values=fv)
    flags.DEFINE_integer("clip_skip", None, "skip the last k CLIP layers for the prompt "
                         "(diffusers' clip_skip)", flag_values=fv)
    flags.DEFINE_string("out", "out.png", "output PNG", flag_values=fv)


def main(argv: Optional[Sequence[str]] = None) -> np.ndarray:
    """Parses ``argv`` (without the program name), generates, writes the PNG(s); returns the
    uint8 images ``[N, H, W, 3]``.

    Raises:
      ConfigError: an invalid flag, a bad model folder, or an invalid generation setting.
    """
    from jaxdiff.pipelines import generate, load_stable_diffusion, save_images

    fv = cli.parse_flags(_define, [] if argv is None else argv, PROG, __doc__)
    for name in ("model", "prompt"):
        if not fv[name].value:
            raise ConfigError(f"--{name} is required")
    if fv.num_images < 1:
        raise ConfigError(f"--num_images must be >= 1, got {fv.num_images}")
    if fv.option and not fv.sampler:
        raise ConfigError("--option needs --sampler")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("jaxdiff.pipelines.stable_diffusion").setLevel(logging.INFO)
    dtype = jnp.bfloat16 if fv.dtype == "bfloat16" else jnp.float32
    image = None
    if fv.init_image:
        from PIL import Image

        try:
            image = np.asarray(Image.open(fv.init_image).convert("RGB"))
        except OSError as e:
            raise ConfigError(f"--init_image {fv.init_image!r}: {e}") from None
    try:
        sd = load_stable_diffusion(fv.model, variant=fv.variant, dtype=dtype,
                                   sampler=fv.sampler,
                                   sampler_options=cli.parse_sampler_options(fv.option))
        prompts = [fv.prompt] * fv.num_images
        negatives = None if fv.negative_prompt is None else [fv.negative_prompt] * fv.num_images
        out = generate(sd, prompts, negatives, num_steps=fv.steps,
                       guidance_scale=fv.guidance_scale, guidance_rescale=fv.guidance_rescale,
                       height=fv.height, width=fv.width, seed=fv.seed, image=image,
                       strength=fv.strength, clip_skip=fv.clip_skip)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    paths = save_images(out.images, fv.out)
    print(f"wrote {', '.join(paths)} ({len(paths)} image(s), {sd.sampler.name}, "
          f"{fv.steps} steps, guidance {fv.guidance_scale})")
    return out.images


def cli_main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m experiments.text_to_image``: :func:`main` with errors as one line."""
    cli.run(main, argv)


if __name__ == "__main__":
    cli_main()
