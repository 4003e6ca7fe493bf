"""The fine-tuning loss as the training loop takes it: ``loss_fn(params, batch, key, frozen)``.

A batch holds either images and token ids (``pixel_values [B, R, R, 3]`` float32 in ``[-1, 1]``,
``input_ids [B, L]`` int32: the frozen VAE and the text encoder run in the step) or their cached
encodings (``latent_mean`` / ``latent_std [B, h, w, C]``, ``context [B, L, D]``:
:mod:`jaxdiff.finetune.cache`), for DreamBooth ``prior [B]`` (1 for a class example), and
optionally ``loss_mask [B, h, w, 1]``, the weight of each latent position in the example's loss,
and ``latent_offset [B, h, w, C]``, added to the example's scaled latents (the class images moved
by a word's offset: :func:`~jaxdiff.finetune.with_word_prior`). With ``base_input_ids [B, L]``
(LoRA mode, nothing cached) the class examples (``prior`` 1) are distilled from the frozen base
model instead of denoised toward their images: their target is the base UNet's prediction,
with the base text encoder's embedding of ``base_input_ids``, moved by the example's
``latent_offset`` (:func:`~jaxdiff.finetune.shifted_prediction`), at the same ``x_t`` and ``t``.
The base model runs only on the second half of an even batch (a DreamBooth batch is its
instances, then as many class examples: :class:`~jaxdiff.finetune.PairedIterator`); a class
example in the first half keeps its image's target.

The step's key is split into ``(k_z, k_flip, k_loss)``: ``z = mean + std * N(0, I)`` from
``k_z`` (the VAE posterior sample, as diffusers' ``latent_dist.sample()``; the same draw whether
the posterior is computed in the step or cached), the flips from ``k_flip``, and ``t`` / the noise
from ``k_loss`` (:func:`~jaxdiff.finetune.objective.denoising_terms`). The latents are
``scale_latents(z)`` (the VAE config's ``scaling_factor`` / shift), in float32.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp

from jaxdiff.finetune.modes import FinetuneConfig, compute_configs, model_params
from jaxdiff.finetune.objective import denoising_terms, reduce_loss
from jaxdiff.finetune.offset import shifted_prediction
from jaxdiff.finetune.text_prior import TextPrior, text_prior_loss
from jaxdiff.models.autoencoder import AutoencoderKL
from jaxdiff.models.autoencoder_latents import scale_latents
from jaxdiff.models.unet import UNet
from jaxdiff.pipelines.loading import StableDiffusion
from jaxdiff.pipelines.sd_program import embed_tokens

__all__ = ["make_finetune_loss", "posterior_moments", "flip_images", "encode_batch"]


def to_vae_channels(vae_config, pixel_values: jax.Array) -> jax.Array:
    """``pixel_values [B, R, R, c]`` with the VAE's ``in_channels``: RGB images (what
    :mod:`jaxdiff.data` reads) for a one-channel VAE (the text-to-MNIST model) are averaged over
    their channels (exact for grey images stored as RGB); otherwise unchanged.

    Raises:
      ValueError: any other channel mismatch, naming both.
    """
    want, got = vae_config.in_channels, pixel_values.shape[-1]
    if got == want:
        return pixel_values
    if want == 1 and got == 3:
        return jnp.mean(pixel_values, axis=-1, keepdims=True)
    raise ValueError(f"pixel_values have {got} channels; the VAE takes {want}")


def posterior_moments(vae_config, vae_params, pixel_values: jax.Array):
    """``(mean, std)`` ``[B, h, w, C]`` float32 of the VAE posterior of ``pixel_values [B, R, R,
    3]`` (or the VAE's own channel count: :func:`to_vae_channels`) in ``[-1, 1]``. Jittable."""
    x = to_vae_channels(vae_config, jnp.asarray(pixel_values, vae_config.dtype))
    post = AutoencoderKL(vae_config).apply({"params": vae_params}, x, method="encode")
    return post.mean.astype(jnp.float32), post.std.astype(jnp.float32)


def flip_images(key: jax.Array, images: jax.Array) -> jax.Array:
    """Each image of ``[B, H, W, C]`` flipped left-right with probability 1/2 (from ``key``)."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def encode_batch(sd: StableDiffusion, cfg: FinetuneConfig, models: Dict[str, Any],
                 batch: Dict[str, jax.Array], key: jax.Array):
    """``(latents [B, h, w, C] float32, context [B, L, D])`` of a training batch (module
    docstring): the VAE posterior of ``pixel_values`` (or the cached ``latent_mean`` /
    ``latent_std``) sampled with ``key`` and scaled, and the text embedding of ``input_ids`` (or
    the cached ``context``), with ``cfg``'s compute dtype. ``models`` holds the ``"vae"`` /
    ``"text_encoder"`` params the batch needs. Jittable.

    Raises (at trace time):
      ValueError: a batch with neither ``pixel_values`` nor ``latent_mean``, or neither
        ``input_ids`` nor ``context``.
    """
    unet_cfg, vae_cfg, text_cfg = compute_configs(sd, cfg)
    if "pixel_values" in batch:
        mean, std = posterior_moments(vae_cfg, models["vae"], batch["pixel_values"])
    elif "latent_mean" in batch:
        mean, std = batch["latent_mean"], batch["latent_std"]
    else:
        raise ValueError(f"the batch needs 'pixel_values' or cached 'latent_mean' / "
                         f"'latent_std', got keys {sorted(batch)}")
    z = mean + std * jax.random.normal(key, mean.shape, jnp.float32)
    latents = scale_latents(sd.vae_config, z).astype(jnp.float32)
    if "input_ids" in batch:
        context = embed_tokens(text_cfg, unet_cfg.dtype, models["text_encoder"],
                               batch["input_ids"])
    elif "context" in batch:
        context = batch["context"]
    else:
        raise ValueError(f"the batch needs 'input_ids' or cached 'context', got keys "
                         f"{sorted(batch)}")
    return latents, context


def make_finetune_loss(sd: StableDiffusion, cfg: FinetuneConfig,
                       text_prior: Optional[TextPrior] = None):
    """``loss_fn(params, batch, key, frozen) -> (loss, aux)`` for :func:`jaxdiff.training.fit`
    (module docstring): ``params`` the trainable tree, ``frozen`` the frozen one
    (:mod:`jaxdiff.finetune.modes`). Only ``sd``'s configs and schedule are kept (not its
    params). ``aux``: ``instance_loss`` / ``prior_loss`` for DreamBooth batches,
    ``text_prior_loss`` with ``text_prior``. A batch with ``base_input_ids`` distills its class
    examples from the frozen base model (module docstring).

    Args:
      text_prior: adds ``text_prior.weight`` times :func:`~jaxdiff.finetune.text_prior_loss`
        (needs ``cfg.train_text_encoder``); its prompts are drawn from ``fold_in(key, 1)``.

    Raises:
      ValueError: ``text_prior`` with a frozen text encoder. At trace time: a batch with
        neither ``pixel_values`` nor ``latent_mean``, or neither ``input_ids`` nor ``context``;
        ``base_input_ids`` without ``prior``, or outside LoRA mode / with cached encodings (the
        base models must be in ``frozen``).
    """
    if text_prior is not None and not cfg.train_text_encoder:
        raise ValueError("text_prior trains the text encoder: it needs "
                         "cfg.train_text_encoder=True")
    unet_cfg, _, text_cfg = compute_configs(sd, cfg)
    unet = UNet(unet_cfg)
    schedule, objective = sd.schedule, cfg.objective

    def base_teacher(batch, frozen):
        if cfg.mode != "lora" or not {"unet", "text_encoder"} <= set(frozen):
            raise ValueError("base_input_ids (the class examples distilled from the base model) "
                             "need LoRA mode with nothing cached: the frozen tree must hold the "
                             "base UNet and text encoder")
        if "prior" not in batch:
            raise ValueError("base_input_ids need the batch's 'prior' flags (DreamBooth's class "
                             "examples are the ones distilled)")
        b = batch["base_input_ids"].shape[0]
        half = b // 2 if b % 2 == 0 else 0  # DreamBooth's batch: the class examples' half
        base_context = embed_tokens(text_cfg, unet_cfg.dtype, frozen["text_encoder"],
                                    batch["base_input_ids"][half:])
        moved = batch.get("latent_offset")

        def base_fn(x, t):
            return unet.apply({"params": frozen["unet"]}, x, t, context=base_context)

        def teacher_fn(x_t, t):
            x, tt = x_t[half:], t[half:]
            out = base_fn(x, tt) if moved is None else shifted_prediction(
                base_fn, x, tt, jnp.asarray(moved[half:], jnp.float32),
                schedule.alphas_cumprod, objective.kind)
            return jnp.concatenate([jnp.zeros_like(x_t[:half], out.dtype), out])

        rows = (jnp.arange(b) >= half).astype(jnp.float32)
        return teacher_fn, jnp.asarray(batch["prior"], jnp.float32) * rows

    def loss_fn(params: Any, batch: Dict[str, jax.Array], key: jax.Array, frozen: Any):
        teacher = {}
        if "base_input_ids" in batch:
            fn, rows = base_teacher(batch, frozen)
            teacher = dict(teacher_fn=fn, teacher_mask=rows)
        models = model_params(params, frozen, cfg)
        k_z, k_flip, k_loss = jax.random.split(key, 3)
        if "pixel_values" in batch and cfg.random_flip:
            batch = dict(batch, pixel_values=flip_images(k_flip, batch["pixel_values"]))
        latents, context = encode_batch(sd, cfg, models, batch, k_z)
        if "latent_offset" in batch:
            latents = latents + jnp.asarray(batch["latent_offset"], jnp.float32)

        def apply_fn(x_t, t):
            return unet.apply({"params": models["unet"]}, x_t, t, context=context)

        losses, aux = denoising_terms(apply_fn, schedule, latents, k_loss, objective,
                                      mask=batch.get("loss_mask"), **teacher)
        loss, parts = reduce_loss(losses, batch.get("prior"), objective.prior_loss_weight)
        if text_prior is not None:
            tp = text_prior_loss(text_cfg, models["text_encoder"], text_prior,
                                 jax.random.fold_in(key, 1))
            loss = loss + text_prior.weight * tp
            parts = dict(parts, text_prior_loss=tp)
        return loss, dict(aux, **parts)

    return loss_fn
