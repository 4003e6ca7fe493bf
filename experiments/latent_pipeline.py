"""The latent model as a Stable Diffusion pipeline: its diffusers scheduler config and sampler,
the in-memory :class:`~jaxdiff.pipelines.StableDiffusion` of a run (sampled by
:func:`jaxdiff.pipelines.generate`: the same program that runs an exported diffusers folder),
prompt grids, and the export as a diffusers folder with the run's generation settings
(``jaxdiff_generation.json``: :func:`generation_defaults`).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence

import jax
import ml_collections
import numpy as np

from experiments.cli import config_check
from jaxdiff.convert.diffusers_scheduler import (sampler_from_diffusers_config,
                                                 schedule_from_diffusers_config)
from jaxdiff.models import UNetConfig
from jaxdiff.models.clip_text_config import CLIPTextConfig
from jaxdiff.pipelines import GenerationDefaults, StableDiffusion, choose_sampler, generate
from jaxdiff.text import CLIPTokenizer

__all__ = ["DIFFUSERS_DIR", "MNIST_SIDE", "scheduler_config", "make_sampler",
           "generation_defaults", "make_pipeline", "sample", "save_prompt_grid", "export"]

DIFFUSERS_DIR = "diffusers"
MNIST_SIDE = 28   # the images' side before padding to data.pad_to


def scheduler_config(config: ml_collections.ConfigDict) -> Dict[str, Any]:
    """The run's diffusers ``DDIMScheduler`` config: ``config.diffusion`` (the training schedule
    and ``prediction_type``) with Stable Diffusion's DDIM settings (no sample clipping: latents
    are not bounded; ``set_alpha_to_one=False``, ``steps_offset=1``, ``"leading"`` spacing)."""
    return {"_class_name": "DDIMScheduler", **config.diffusion.to_dict(), "clip_sample": False,
            "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}


def make_sampler(config: ml_collections.ConfigDict):
    """``sampling.sampler``: ``"ddim"`` is the scheduler config's DDIM (what an exported folder
    samples with); another name is that registered sampler with its default options."""
    sched = scheduler_config(config)
    if config.sampling.sampler == "ddim":
        return sampler_from_diffusers_config(sched)
    return config_check("", choose_sampler, config.sampling.sampler, None, sched)


def generation_defaults(config: ml_collections.ConfigDict) -> GenerationDefaults:
    """The settings the run samples and is evaluated with, for its exported folder's
    ``jaxdiff_generation.json``: ``sampling.sampler`` (:func:`make_sampler`), ``sampling.
    num_steps``, ``sampling.guidance_scale``, the generated size ``data.pad_to`` squared, and the
    crop that undoes the padding (the centred ``28 x 28``, as
    :func:`experiments.latent_data.crop_images`)."""
    from experiments.latent_data import centre_crop

    s, size = config.sampling, int(config.data.pad_to)
    return GenerationDefaults.from_sampler(
        make_sampler(config), num_steps=int(s.num_steps), guidance_scale=float(s.guidance_scale),
        height=size, width=size, crop=centre_crop(size, MNIST_SIDE))


def make_pipeline(config, unet_cfg: UNetConfig, text_cfg: CLIPTextConfig, vae_cfg,
                  tokenizer: CLIPTokenizer, params: dict, vae_params) -> StableDiffusion:
    """An in-memory :class:`~jaxdiff.pipelines.StableDiffusion` of the run: ``params`` (``{"unet",
    "text_encoder"}``) with the frozen VAE's, the run's scheduler config, its sampler
    (``sampling.sampler``), latent size ``data.pad_to / f`` and :func:`generation_defaults`."""
    sched = scheduler_config(config)
    f = 2 ** (len(vae_cfg.block_channels) - 1)
    return StableDiffusion(
        params={"unet": params["unet"], "text_encoder": params["text_encoder"],
                "vae": vae_params},
        unet_config=unet_cfg, vae_config=vae_cfg, text_config=text_cfg, tokenizer=tokenizer,
        schedule=schedule_from_diffusers_config(sched), sampler=make_sampler(config),
        scheduler_config=sched, sample_size=int(config.data.pad_to) // f,
        generation_defaults=generation_defaults(config))


def sample(sd: StableDiffusion, prompts: Sequence[str], key: jax.Array, *, num_steps: int,
           guidance_scale: float, batch_size: int = 250,
           negative_prompts: Optional[Sequence[str]] = None,
           guidance_prompts: Optional[Sequence[str]] = None) -> np.ndarray:
    """Images for ``prompts`` through :func:`jaxdiff.pipelines.generate`, in chunks of
    ``batch_size`` (the last padded; chunk ``i`` uses ``fold_in(key, i)``): ``[N, H, W, 1]``
    float32 in ``[-1, 1]`` at the pipeline's size (``data.pad_to``). ``negative_prompts``: one
    per prompt (guidance's null prompts), or None (the empty prompt for all);
    ``guidance_prompts``: one per prompt (generate's ``guidance_prompt``), or None.

    Raises:
      ValueError: ``negative_prompts`` or ``guidance_prompts`` not one per prompt.
    """
    out = []
    prompts = list(prompts)
    negs = None if negative_prompts is None else list(negative_prompts)
    guides = None if guidance_prompts is None else list(guidance_prompts)
    for name, given in (("negative_prompts", negs), ("guidance_prompts", guides)):
        if given is not None and len(given) != len(prompts):
            raise ValueError(f"{name} must be one per prompt ({len(prompts)}), got "
                             f"{len(given)}")
    for i, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start:start + batch_size]
        neg = None if negs is None else negs[start:start + batch_size]
        guide = None if guides is None else guides[start:start + batch_size]
        n = len(chunk)
        if len(prompts) > batch_size:
            chunk = chunk + [chunk[0]] * (batch_size - n)
            neg = None if neg is None else neg + [neg[0]] * (batch_size - n)
            guide = None if guide is None else guide + [guide[0]] * (batch_size - n)
        res = generate(sd, chunk, negative_prompt=neg, num_steps=num_steps,
                       guidance_scale=guidance_scale, key=jax.random.fold_in(key, i),
                       guidance_prompt=guide)
        out.append(res.float_images[:n] * 2.0 - 1.0)
    return np.concatenate(out)


def save_prompt_grid(images: np.ndarray, prompts: Sequence[str], path: str, scale: int = 2) -> str:
    """A PNG of ``images`` (``[R * C, H, W, 1]`` in ``[-1, 1]``, row-major: row ``r`` holds
    ``C`` samples of ``prompts[r]``) with each row's prompt written on its left. Returns path."""
    from PIL import Image, ImageDraw

    r = len(prompts)
    if r == 0 or len(images) % r:
        raise ValueError(f"images ({len(images)}) must be a multiple of the prompts ({r})")
    c = len(images) // r
    h, w = images.shape[1:3]
    px = np.round((np.clip(images[..., 0], -1, 1) + 1) * 127.5).astype(np.uint8)
    label_w = 6 * max(len(p) for p in prompts) + 16
    canvas = Image.new("L", (label_w + c * w * scale, r * h * scale), 0)
    draw = ImageDraw.Draw(canvas)
    for i, prompt in enumerate(prompts):
        draw.text((4, i * h * scale + h * scale // 2 - 6), f'"{prompt}"', fill=255)
        for j in range(c):
            tile = Image.fromarray(px[i * c + j]).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (label_w + j * w * scale, i * h * scale))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    canvas.save(tmp)
    os.replace(tmp, path)
    with open(os.path.splitext(path)[0] + ".txt", "w") as f:
        f.write("\n".join(prompts) + "\n")
    return path


def export(sd: StableDiffusion, path: str) -> str:
    """Writes the run (``sd``: :func:`make_pipeline` with the EMA params) as a diffusers Stable
    Diffusion folder (:func:`jaxdiff.pipelines.export_stable_diffusion`) that
    ``python -m experiments.text_to_image --model PATH`` and diffusers'
    ``StableDiffusionPipeline.from_pretrained`` load, with ``sd.generation_defaults`` (the run's
    sampler, steps, guidance, size and 28x28 crop) as its ``jaxdiff_generation.json``, which
    ``text_to_image`` uses. Returns ``path``."""
    from jaxdiff.pipelines.export import export_stable_diffusion

    export_stable_diffusion(sd, path)
    print(f"wrote the diffusers folder {path}", flush=True)
    return path
