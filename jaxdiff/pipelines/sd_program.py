"""The Stable Diffusion generation program: text encoder, denoising scan with guidance and VAE
decode as ONE ``jax.jit``, one per :class:`ProgramKey`, kept in :data:`PROGRAM_CACHE`.

A program is a function of its static settings only (the key): the model's configs and training
schedule, the sampler, the step count, guided or not, image-to-image or not, the latent shape,
the device mesh, CLIP skip. Parameters, unfused LoRAs and their scales
(:mod:`jaxdiff.pipelines.lora`, merged at the program's start), prompts, seeds, the guidance
scale and initial latents are its arguments, so changing them compiles nothing (``jit`` traces
again only for LoRAs of other layers or ranks). Programs never hold the
:class:`~jaxdiff.pipelines.StableDiffusion` (nor its parameters): every model with the same
configs and schedule (``sd.replace(params=...)``, the same folder loaded twice) shares them, and
dropping a model frees its parameters while its programs stay cached (at most
``PROGRAM_CACHE.max_programs``, least recently used out; ``PROGRAM_CACHE.clear()`` drops them).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Hashable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.compile_options import cpu_compiler_options
from jaxdiff.models.autoencoder import AutoencoderKL
from jaxdiff.models.autoencoder_config import AutoencoderKLConfig
from jaxdiff.models.autoencoder_latents import vae_decode_latents, vae_encode_latents
from jaxdiff.models.clip_text import CLIPTextModel
from jaxdiff.models.clip_text_config import CLIPTextConfig
from jaxdiff.models.embeddings import guidance_scale_embedding
from jaxdiff.models.unet import UNet
from jaxdiff.models.unet_config import UNetConfig
from jaxdiff.pipelines.controlnet import controlnet_residuals
from jaxdiff.pipelines.inpaint import (InpaintInputs, blend_after_step, blend_levels,
                                       concat_inputs, mask_to_latent_grid)
from jaxdiff.pipelines.loading import StableDiffusion
from jaxdiff.pipelines.lora import apply_loras
from jaxdiff.pipelines.program_cache import ProgramCache, fingerprint, freeze
from jaxdiff.pipelines.sdxl_text import encode_sdxl_prompts
from jaxdiff.samplers.guidance import classifier_free_guidance, prompt_guidance
from jaxdiff.samplers.img2img import noise_to_img2img, sampler_grid
from jaxdiff.samplers.registry import Sampler
from jaxdiff.schedules import Schedule
from jaxdiff.sharding import DATA_AXIS

__all__ = ["PROGRAM_CACHE", "ProgramKey", "build_program", "embed_tokens"]

_P = jax.sharding.PartitionSpec

PROGRAM_CACHE = ProgramCache(max_programs=32)
"""Every Stable Diffusion program built by :func:`~jaxdiff.pipelines.generate` (a memo: the
programs are pure functions of their keys)."""


@dataclasses.dataclass(frozen=True)
class ProgramKey:
    """The static settings of one generation program (hashable; equal settings, one program).

    Attributes:
      unet_config, vae_config, text_config: the models' configs (compute dtypes included).
      schedule: :func:`~jaxdiff.pipelines.program_cache.fingerprint` of the training schedule.
      sampler, sampler_options, sampler_fn: the sampler's name, frozen options and function.
      num_steps: sampler steps.
      guided: both guidance branches (batch ``2B``, ``guidance_scale != 1``) or the conditional
        one alone (``guidance_scale == 1``).
      rescale: guidance rescale on (``guidance_rescale > 0``, guided programs only).
      img2img: what image-to-image sampling depends on
        (:func:`~jaxdiff.samplers.img2img.img2img_key`: the start step, or LCM's strength),
        ``None`` for text-to-image.
      sample_posterior: image-to-image encodes with a posterior sample (False: its mean, and
        always False for text-to-image).
      latent_shape: ``(H / f, W / f, C)``.
      mesh: the device mesh (a ``jax.sharding.Mesh`` compares by its devices and axis names,
        so an equal mesh made again finds the same program).
      clip_skip: CLIP layers skipped for the prompt (0: none).
      text_config_2: SDXL's second text encoder's config (``None`` for SD 1.x / 2.x).
      from_latents: ``image`` holds the latents to start from (``denoising_start``: no encoding,
        no noise).
      end_step, end_t: ``denoising_end``: return the carry after ``end_step`` of the steps that
        run (read from the sampler's trajectory); the UNet runs only at timesteps ``>= end_t``
        (the later steps' outputs are discarded), ``None``: everywhere.
      controlnets: the ControlNets' configs (:mod:`jaxdiff.pipelines.controlnet`), ``None``
        without; their parameters, images, scales and windows are arguments.
      guess_mode: the ControlNets in guess mode (the conditional half only when guided).
      inpaint: ``(mode, strength == 1)`` for inpainting (:mod:`jaxdiff.pipelines.inpaint`:
        ``"concat"`` or ``"blend"``; exactly 1 starts from pure noise), ``None`` without.
      guide_prompt: guidance along a guidance prompt's direction
        (:func:`~jaxdiff.samplers.prompt_guidance`, batch ``3B``; ``uncond`` is then
        ``{"null": ..., "guide": ...}``), guided programs only.
    """

    unet_config: UNetConfig
    vae_config: AutoencoderKLConfig
    text_config: CLIPTextConfig
    schedule: Hashable
    sampler: str
    sampler_options: Hashable
    sampler_fn: Callable
    num_steps: int
    guided: bool
    rescale: bool
    img2img: Hashable
    sample_posterior: bool
    latent_shape: tuple[int, ...]
    mesh: jax.sharding.Mesh
    clip_skip: int
    text_config_2: CLIPTextConfig | None = None
    from_latents: bool = False
    end_step: int | None = None
    end_t: float | None = None
    controlnets: tuple | None = None
    guess_mode: bool = False
    inpaint: tuple | None = None
    guide_prompt: bool = False

    @classmethod
    def make(cls, sd: StableDiffusion, sampler: Sampler, *, num_steps: int, guided: bool,
             rescale: bool, img2img: Hashable, sample_posterior: bool,
             latent_shape: tuple[int, ...], mesh: jax.sharding.Mesh,
             clip_skip: int, from_latents: bool = False, end_step: int | None = None,
             end_t: float | None = None, controlnets: tuple | None = None,
             guess_mode: bool = False, inpaint: tuple | None = None,
             guide_prompt: bool = False) -> "ProgramKey":
        """The key of one setting (settings that cannot change the program are normalised:
        ``rescale`` without guidance, ``sample_posterior`` without an image)."""
        return cls(
            unet_config=sd.unet_config, vae_config=sd.vae_config, text_config=sd.text_config,
            schedule=fingerprint(sd.schedule), sampler=sampler.name,
            sampler_options=freeze(dict(sampler.options)), sampler_fn=sampler.fn,
            num_steps=int(num_steps), guided=bool(guided), rescale=bool(guided and rescale),
            img2img=None if img2img is None else freeze(img2img),  # img2img_key
            sample_posterior=bool(sample_posterior and img2img is not None),
            latent_shape=tuple(int(n) for n in latent_shape), mesh=mesh,
            clip_skip=int(clip_skip), text_config_2=sd.text_config_2,
            from_latents=bool(from_latents),
            end_step=None if end_step is None else int(end_step),
            end_t=None if end_t is None else float(end_t),
            controlnets=None if not controlnets else tuple(controlnets),
            guess_mode=bool(guess_mode and controlnets),
            inpaint=None if inpaint is None else (str(inpaint[0]), bool(inpaint[1])),
            guide_prompt=bool(guided and guide_prompt),
        )


def embed_tokens(text_config: CLIPTextConfig, dtype: Any, text_params: Any, input_ids: jax.Array,
                 clip_skip: int = 0) -> jax.Array:
    """``[B, L]`` token ids -> ``[B, L, D]`` CLIP embeddings in ``dtype``: the last hidden state,
    or with ``clip_skip = k >= 1`` the output of the layer ``k`` before the last through the
    final LayerNorm (``k`` already checked). Jittable."""
    model = CLIPTextModel(text_config)
    variables = {"params": text_params}
    out = model.apply(variables, input_ids)
    if not clip_skip:
        return out.last_hidden_state.astype(dtype)
    hidden = model.apply(variables, out.hidden_states[-(clip_skip + 1)],
                         method="final_layer_norm")
    return hidden.astype(dtype)


def build_program(sd: StableDiffusion, sampler: Sampler, key: ProgramKey,
                  img2img: dict | None) -> Callable:
    """The jitted ``(params, loras, cond, uncond, x_init, noise, image, rng, w, phi, control,
    mask) -> (images, latents)`` for ``key`` (see :func:`~jaxdiff.pipelines.generate`): ``loras``
    are ``StableDiffusion.loras`` (merged into ``params`` first), ``cond`` / ``uncond`` are
    token ids (encoded inside) or embeddings, ``uncond`` ``None`` when unguided; for SDXL
    (``key.text_config_2``) each is ``{"tokens": SDXLTokens, "time_ids": [B, K]}``, the negative
    tokens ``None`` for zeros (``force_zeros_for_empty_prompt``); ``x_init``
    ``None`` draws the initial latents from ``rng``; ``w`` and ``phi`` are traced scalars. An
    LCM-distilled UNet (``unet_config.time_cond_dim``) takes ``w`` as its guidance-scale embedding
    (``timestep_cond``, as ``LatentConsistencyModelPipeline``), in an unguided program.
    ``control``: the ControlNets' arguments (``key.controlnets``;
    :func:`~jaxdiff.pipelines.controlnet.controlnet_residuals`), ``None`` without. ``mask``:
    ``[B, H, W, 1]`` the inpainting mask at the image's size (``key.inpaint``), else ``None``.

    Only the configs and the schedule are taken from ``sd`` (the program must not keep the
    model, or its parameters, alive)."""
    unet_config, vae_config, text_config = sd.unet_config, sd.vae_config, sd.text_config
    schedule: Schedule = sd.schedule
    dtype = unet_config.dtype
    unet, vae = UNet(unet_config), AutoencoderKL(vae_config)
    data = jax.sharding.NamedSharding(key.mesh, _P(DATA_AXIS))
    repl = jax.sharding.NamedSharding(key.mesh, _P())
    steps, latent_shape = key.num_steps, key.latent_shape

    def text(params, x, skip=0):
        if jnp.issubdtype(x.dtype, jnp.integer):
            return embed_tokens(text_config, dtype, params["text_encoder"], x, skip)
        return x.astype(dtype)

    def contexts(params, cond, uncond):
        """The UNet's conditions ``(cond, uncond)`` (pytrees; ``uncond`` None when unguided)."""
        if key.guide_prompt:  # the guidance prompt with the prompt's clip skip
            return (text(params, cond, key.clip_skip),
                    {"null": text(params, uncond["null"]),
                     "guide": text(params, uncond["guide"], key.clip_skip)})
        if key.text_config_2 is None:  # the negative prompt without clip skip, as diffusers
            return (text(params, cond, key.clip_skip),
                    None if uncond is None else text(params, uncond))
        emb, neg = encode_sdxl_prompts(
            text_config, key.text_config_2, params, cond["tokens"],
            None if uncond is None else uncond["tokens"], clip_skip=key.clip_skip, dtype=dtype)
        return ({"context": emb.prompt_embeds,
                 "added": {"text_embeds": emb.pooled, "time_ids": cond["time_ids"]}},
                None if uncond is None else
                {"context": neg.prompt_embeds,
                 "added": {"text_embeds": neg.pooled, "time_ids": uncond["time_ids"]}})

    grid = None if key.controlnets is None else np.asarray(
        sampler_grid(sampler, schedule, steps).timesteps)

    def encode(params, image, k):  # [-1, 1] images -> (scaled) latents
        return vae_encode_latents(vae, params["vae"], image.astype(vae_config.dtype),
                                  k if key.sample_posterior else None)

    def _sd_program(params, loras, cond, uncond, x_init, noise, image, rng, w, phi, control,
                    mask=None):
        params = apply_loras(params, loras)
        k_init, k_post, k_sample = jax.random.split(rng, 3)
        cond, uncond = contexts(params, cond, uncond if key.guided else None)
        batch = jax.tree.leaves(cond)[0].shape[0]
        if x_init is None and not key.from_latents:
            x_init = jax.random.normal(k_init, (batch, *latent_shape), jnp.float32)
        if key.from_latents:  # denoising_start: the sample at the first step that runs
            x_T = image.astype(jnp.float32)
        elif image is not None:
            lat0 = encode(params, image * 2 - 1, k_post)
            x_T = noise_to_img2img(sampler, schedule, steps, lat0, x_init, **img2img)
        else:
            x_T = x_init
        inpaint = None
        if key.inpaint is not None:  # diffusers' inpainting (jaxdiff.pipelines.inpaint)
            mode, from_noise = key.inpaint
            x_T = x_init if from_noise else x_T
            masked = (image * 2 - 1) * (mask < 0.5)
            inpaint = InpaintInputs(
                mask_to_latent_grid(mask, *latent_shape[:2]).astype(jnp.float32),
                encode(params, masked, jax.random.fold_in(k_post, 1)) if mode == "concat"
                else None, lat0, x_init)
        x_T = jax.lax.with_sharding_constraint(x_T.astype(jnp.float32), data)

        def model_fn(x, t, c):
            extra = {}
            if inpaint is not None and inpaint.masked_latents is not None:
                x = concat_inputs(x, inpaint)
            if unet_config.time_cond_dim is not None:  # LCM: w as the guidance embedding
                extra["timestep_cond"] = guidance_scale_embedding(
                    jnp.full((x.shape[0],), w, jnp.float32), unet_config.time_cond_dim)
            if key.controlnets is not None:
                inputs = ({"context": c} if key.text_config_2 is None else
                          {"context": c["context"], "added_cond": c["added"]})
                extra["down_residuals"], extra["mid_residual"] = controlnet_residuals(
                    key.controlnets, key.guess_mode, key.guided, grid, control, x, t,
                    dict(inputs, **{k: v for k, v in extra.items() if k == "timestep_cond"}))
            if key.text_config_2 is None:
                return unet.apply({"params": params["unet"]}, x.astype(dtype), t, context=c,
                                  **extra)
            return unet.apply({"params": params["unet"]}, x.astype(dtype), t,
                              context=c["context"], added_cond=c["added"], **extra)

        if key.guide_prompt:  # cond + (w - 1) (guide - uncond), one call on 3B
            guided = prompt_guidance(model_fn, cond, uncond["guide"], uncond["null"], w)
        elif key.guided:  # uncond + w (cond - uncond), w traced: every w != 1 runs here
            guided = classifier_free_guidance(model_fn, cond, uncond, w,
                                              phi if key.rescale else 0.0)
        else:  # w == 1: the conditional model alone
            def guided(x, t):
                return model_fn(x, t, cond)
        if key.end_t is not None:  # denoising_end: the steps after end_step skip the UNet
            def gated(x, t, inner=guided):
                out = jax.eval_shape(inner, x, t)
                run = jnp.reshape(jnp.asarray(t), (-1,))[0] >= key.end_t
                return jax.lax.cond(run, inner, lambda x, t: jnp.zeros(out.shape, out.dtype),
                                    x, t)
            model = gated
        else:
            model = guided
        call = dict(img2img or {})
        if inpaint is not None and inpaint.masked_latents is None:
            call["after_step"] = blend_after_step(*blend_levels(sampler, schedule, steps), inpaint)
        if key.end_step is None:
            latents = sampler(model, schedule, x_T, k_sample, num_steps=steps, noise=noise,
                              **call)
        else:
            _, path, _ = sampler(model, schedule, x_T, k_sample, num_steps=steps, noise=noise,
                                 return_trajectory=True, **(img2img or {}))
            latents = path[key.end_step]
        decoded = vae_decode_latents(vae, params["vae"], latents.astype(vae_config.dtype))
        images = jnp.clip(decoded.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
        return images, latents.astype(jnp.float32)

    return jax.jit(_sd_program, out_shardings=(repl, repl),
                   compiler_options=cpu_compiler_options())  # {} off the CPU
