"""Caching the frozen encoders' outputs: the VAE posterior and the text embeddings of every
training example, computed once, so that each step runs the UNet alone.

Valid when the VAE and the text encoder are frozen and the images are deterministic (resized,
center-cropped, not flipped): then the step would compute exactly these arrays again. The
posterior is kept as ``(mean, std)``, and each step still draws its own ``z = mean + std * eps``
(:mod:`jaxdiff.finetune.loss`), so caching changes neither the loss nor its randomness.
"""

from __future__ import annotations

from functools import partial
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.finetune.loss import posterior_moments
from jaxdiff.finetune.modes import FinetuneConfig, compute_configs
from jaxdiff.pipelines.loading import StableDiffusion
from jaxdiff.pipelines.sd_program import embed_tokens
from jaxdiff.validation import check_int

__all__ = ["cache_examples"]


@partial(jax.jit, static_argnums=(0, 1, 2))
def _encode(vae_cfg, text_cfg, dtype, vae_params, text_params, pixel_values, input_ids):
    mean, std = posterior_moments(vae_cfg, vae_params, pixel_values)
    return mean, std, embed_tokens(text_cfg, dtype, text_params, input_ids)


def cache_examples(sd: StableDiffusion, cfg: FinetuneConfig, examples: Dict[str, np.ndarray],
                   *, chunk: int = 16) -> Dict[str, np.ndarray]:
    """``examples`` with ``pixel_values [N, R, R, 3]`` / ``input_ids [N, L]`` replaced by
    ``latent_mean`` / ``latent_std [N, h, w, C]`` float32 and ``context [N, L, D]`` (the UNet's
    compute dtype), computed ``chunk`` examples at a time with ``cfg``'s compute dtype; other
    keys (``prior``) are kept. Host numpy in and out.

    Raises:
      ValueError: ``examples`` lacks ``pixel_values`` or ``input_ids``, or ``chunk < 1``.
    """
    chunk = check_int("chunk", chunk, 1)
    missing = {"pixel_values", "input_ids"} - set(examples)
    if missing:
        raise ValueError(f"examples to cache need {sorted(missing)}, got {sorted(examples)}")
    unet_cfg, vae_cfg, text_cfg = compute_configs(sd, cfg)
    images, ids = examples["pixel_values"], examples["input_ids"]
    parts = []
    for i in range(0, len(images), chunk):
        parts.append(jax.device_get(_encode(
            vae_cfg, text_cfg, jnp.dtype(unet_cfg.dtype), sd.params["vae"],
            sd.params["text_encoder"], jnp.asarray(images[i:i + chunk], jnp.float32),
            jnp.asarray(ids[i:i + chunk], jnp.int32))))
    mean, std, context = (np.concatenate([p[j] for p in parts]) for j in range(3))
    out = {k: v for k, v in examples.items() if k not in ("pixel_values", "input_ids")}
    out.update(latent_mean=mean, latent_std=std, context=context)
    return out
