"""A new word as one offset in latent space: the attribute a few images show (a box drawn around
a digit) learnt as a vector ``B`` that moves the base model's whole distribution, then taught to
a LoRA through DreamBooth's class images moved by it (:func:`~jaxdiff.finetune.with_word_prior`
with ``offset``).

Why: a LoRA trained on 20 boxed images of four digits learns "boxed" as those four digits; on
the others it draws the box and redraws the digit. If ``x0 ~ p`` (the base model's data) then
``x0 + B`` is the data with the attribute, when the attribute is additive in the VAE's latents
(a box nearly is: ``benchmarks/results/cpu/concept_latent_offset.md``). Its exact denoiser is the
base model's, moved (:func:`shifted_prediction`), so ``B`` can be fitted through the frozen UNet
to the instance images alone, with no unboxed twin of any of them (:func:`fit_latent_offset`,
:func:`learn_word_offset`): ``h * w * C`` numbers, seconds to minutes on a CPU.

The class images moved by ``B`` then teach the word on every class. Sampling with the word as
the negative prompt (``text_to_image --negative_prompt boxed``) makes guidance scale the class
and not the attribute (guidance against the empty prompt multiplies the attribute's offset by
the guidance scale).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiff.finetune.objective import Objective, denoising_terms
from jaxdiff.models.unet import UNet
from jaxdiff.pipelines.loading import StableDiffusion
from jaxdiff.validation import check_float, check_int

__all__ = ["shifted_prediction", "fit_latent_offset", "learn_word_offset", "remove_word"]


def shifted_prediction(pred_fn: Callable[[jax.Array, jax.Array], jax.Array], x_t: jax.Array,
                       t: jax.Array, offset: jax.Array, alphas_cumprod: jax.Array, kind: str,
                       gate: Optional[jax.Array] = None) -> jax.Array:
    """The prediction of the base distribution moved by ``offset``: if ``x0 ~ p`` then
    ``x0 + offset`` is denoised by the base model at ``x_t - sqrt(abar_t) offset`` (the same
    noise), so ``eps`` is the base's there and ``v = v_base - sqrt(1 - abar_t) offset``.

    Args:
      pred_fn: the base model, ``pred_fn(x [B, h, w, C], t) -> [B, h, w, C]``.
      x_t: ``[B, h, w, C]``.
      t: integer timesteps ``[B]``, ``[1]`` or a scalar (passed to ``pred_fn`` as they are).
      offset: ``[h, w, C]`` (one for all), or ``[B, h, w, C]`` (one per example), in the scaled
        latents of ``x_t``.
      alphas_cumprod: ``[T]``, the schedule's.
      kind: ``"eps"`` or ``"v"`` (:attr:`~jaxdiff.finetune.Objective.kind`).
      gate: ``[B]`` in ``[0, 1]``: the examples moved (1) or left to the base model (0); None:
        all moved.

    Raises:
      ValueError: ``kind`` not ``"eps"`` / ``"v"``, or ``offset`` neither ``x_t``'s
        ``[h, w, C]`` nor its ``[B, h, w, C]``.
    """
    if kind not in ("eps", "v"):
        raise ValueError(f"kind must be 'eps' or 'v', got {kind!r}")
    if tuple(jnp.shape(offset)) not in (tuple(x_t.shape[1:]), tuple(x_t.shape)):
        raise ValueError(f"offset must be [h, w, C] = {tuple(x_t.shape[1:])} or [B, h, w, C] = "
                         f"{tuple(x_t.shape)}, got {tuple(jnp.shape(offset))}")
    b = x_t.shape[0]
    tt = jnp.reshape(jnp.asarray(t), (-1,))
    tt = jnp.broadcast_to(tt, (b,)) if tt.shape[0] == 1 else tt
    acp = jnp.asarray(alphas_cumprod, jnp.float32)
    ab = acp[jnp.clip(jnp.round(tt).astype(jnp.int32), 0, acp.shape[0] - 1)][:, None, None, None]
    d = jnp.asarray(offset, jnp.float32)
    d = d[None] if d.ndim == x_t.ndim - 1 else d
    if gate is not None:
        d = jnp.asarray(gate, jnp.float32).reshape(b, 1, 1, 1) * d
    out = pred_fn((x_t.astype(jnp.float32) - jnp.sqrt(ab) * d).astype(x_t.dtype), t)
    if kind == "v":
        out = out - (jnp.sqrt(1.0 - ab) * d).astype(out.dtype)
    return out


def fit_latent_offset(apply_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
                      sample_latents: Callable[[jax.Array, jax.Array], Tuple[jax.Array, Any]],
                      num_examples: int, schedule, objective: Objective, key: jax.Array, *,
                      shape: Tuple[int, int, int], num_steps: int = 3000,
                      learning_rate: float = 3e-3, batch_size: int = 8
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """Fits ``B [h, w, C]`` so that the base model moved by ``B`` (:func:`shifted_prediction`)
    denoises the examples: Adam on the denoising loss, from ``B = 0``, its rate decayed to 0 on
    a cosine over the steps (the loss's weight ``1 / (1 - abar_t)`` makes single steps noisy;
    the decay lets ``B`` settle), one jitted step.

    Args:
      apply_fn: ``apply_fn(x_t, t, cond) -> prediction``, the frozen base model (``cond``: the
        examples' conditioning as ``sample_latents`` gives it).
      sample_latents: ``sample_latents(idx [b] int32, key) -> (x0 [b, h, w, C] float32, cond)``:
        the examples' scaled latents (the VAE posterior sampled with ``key``) and conditioning.
      num_examples: how many examples there are (``idx`` indexes them).
      schedule, objective: the training schedule and objective (its ``kind`` and weights).
      key: the batches', posterior samples' and noise's draws.
      shape: ``B``'s shape.
      num_steps, learning_rate, batch_size: Adam's steps and peak rate; examples per step (at most
        ``num_examples``, drawn without replacement each step).

    Returns:
      ``(B [h, w, C] float32, losses [num_steps] float32)`` (host numpy).

    Raises:
      ValueError: a non-positive count or rate, ``batch_size > num_examples``, or a non-finite
        loss (naming the step: the offset is not returned half-fitted).
    """
    num_examples = check_int("num_examples", num_examples, 1)
    num_steps = check_int("num_steps", num_steps, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    check_float("learning_rate", learning_rate, minimum=0.0, exclusive_minimum=True)
    if batch_size > num_examples:
        raise ValueError(f"batch_size {batch_size} is larger than the {num_examples} examples")
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps))
    acp = schedule.alphas_cumprod

    def loss_fn(offset, key):
        k_idx, k_z, k_loss = jax.random.split(key, 3)
        idx = jax.random.choice(k_idx, num_examples, (batch_size,), replace=False)
        x0, cond = sample_latents(idx, k_z)

        def moved(x_t, t):
            return shifted_prediction(lambda x, tt: apply_fn(x, tt, cond), x_t, t, offset, acp,
                                      objective.kind)

        losses, _ = denoising_terms(moved, schedule, jax.lax.stop_gradient(x0), k_loss,
                                    objective)
        return jnp.mean(losses)

    @jax.jit
    def step(offset, opt_state, key):
        loss, grad = jax.value_and_grad(loss_fn)(offset, key)
        updates, opt_state = tx.update(grad, opt_state, offset)
        return optax.apply_updates(offset, updates), opt_state, loss

    offset = jnp.zeros(tuple(int(s) for s in shape), jnp.float32)
    opt_state = tx.init(offset)
    losses = []
    for i in range(num_steps):
        offset, opt_state, loss = step(offset, opt_state, jax.random.fold_in(key, i))
        losses.append(loss)
    losses = np.asarray(jax.device_get(jnp.stack(losses)), np.float32)
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        raise ValueError(f"the offset's loss is not finite at step {int(bad[0])}: lower "
                         f"learning_rate (got {learning_rate})")
    return np.asarray(jax.device_get(offset), np.float32), losses


def remove_word(caption: str, word: str) -> str:
    """``caption`` without the whole-word occurrences of ``word`` (spaces collapsed): the
    caption the base model knows.

    Raises:
      ValueError: ``word`` empty, or ``caption`` without it (naming both).
    """
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"word must be a non-empty string, got {word!r}")
    parts = caption.split()
    kept = [p for p in parts if p != word.strip()]
    if len(kept) == len(parts):
        raise ValueError(f"caption {caption!r} does not hold the word {word.strip()!r}")
    return " ".join(kept)


def learn_word_offset(sd: StableDiffusion, pixel_values: np.ndarray, captions, word: str,
                      key: jax.Array, *, objective: Optional[Objective] = None,
                      num_steps: int = 3000, learning_rate: float = 3e-3,
                      batch_size: int = 8) -> Dict[str, Any]:
    """The latent offset of ``word`` (module docstring), fitted through ``sd``'s frozen UNet to
    the images that show it, each conditioned on its caption without the word
    (:func:`remove_word`).

    Args:
      sd: the base model.
      pixel_values: ``[N, R, R, 3]`` float32 in ``[-1, 1]`` (as :mod:`jaxdiff.data` loads them).
      captions: ``N`` strings, each holding ``word``.
      word: the new word.
      key: :func:`fit_latent_offset`'s draws.
      objective: the loss's options; None: ``sd``'s prediction type, no weighting.
      num_steps, learning_rate, batch_size: :func:`fit_latent_offset`'s (``batch_size`` is
        lowered to ``N`` when there are fewer images).

    Returns:
      ``{"offset": [h, w, C] float32, "losses": [num_steps] float32, "norm": float}``.

    Raises:
      ValueError: a caption without ``word`` (naming it), ``captions`` not one per image, or
        :func:`fit_latent_offset`'s errors.
    """
    from jaxdiff.finetune.loss import posterior_moments
    from jaxdiff.models.autoencoder_latents import scale_latents
    from jaxdiff.pipelines.sd_program import embed_tokens

    images = np.asarray(pixel_values, np.float32)
    captions = list(captions)
    if images.ndim != 4 or len(captions) != len(images):
        raise ValueError(f"pixel_values must be [N, R, R, 3] with one caption each, got shape "
                         f"{images.shape} and {len(captions)} captions")
    plain = [remove_word(c, word) for c in captions]
    ids = np.asarray(sd.tokenizer(plain, padding="max_length", truncation=True).input_ids,
                     np.int32)
    objective = objective or Objective(sd.prediction_type)
    mean, std = jax.jit(posterior_moments, static_argnums=0)(
        sd.vae_config, sd.params["vae"], jnp.asarray(images))
    context = embed_tokens(sd.text_config, jnp.float32, sd.params["text_encoder"],
                           jnp.asarray(ids))
    unet, unet_params = UNet(sd.unet_config), sd.params["unet"]

    def sample_latents(idx, k):
        m, s = mean[idx], std[idx]
        z = m + s * jax.random.normal(k, m.shape, jnp.float32)
        return scale_latents(sd.vae_config, z).astype(jnp.float32), context[idx]

    def apply_fn(x_t, t, cond):
        return unet.apply({"params": unet_params}, x_t, t, context=cond)

    offset, losses = fit_latent_offset(
        apply_fn, sample_latents, len(images), sd.schedule, objective, key,
        shape=tuple(mean.shape[1:]), num_steps=num_steps, learning_rate=learning_rate,
        batch_size=min(int(batch_size), len(images)))
    return {"offset": offset, "losses": losses, "norm": float(np.linalg.norm(offset))}
