"""The text prior of a DreamBooth word written in front of the prompt ("boxed a handwritten
three"): a loss on the text encoder alone that keeps the encoding of what follows the word as the
base encoder gives it without the word.

Why. CLIP's text encoder attends causally, so a word in front of the prompt is encoded the same
whatever follows it: the UNet sees the same keys for the word next to any subject, which is what
lets a concept learnt on a few subjects carry to others. But every token after the word attends to
it, so the subject's own encoding changes (a subject the concept images never showed is then read
worse). The text prior trains the text encoder's adapter so that the tokens after the word encode
as they do without it, on prompts of every subject (text only: no image of them is needed):

    L_text = mean_i || E_theta(word + p_i)[1 + k + j] - E_base(p_i)[1 + j] ||^2 / mean || E_base(p_i) ||^2

over the positions ``j`` of ``p_i``'s tokens after the start token (padding included: the UNet
attends to it), ``k`` the word's token count, ``E_theta`` the trained text encoder and ``E_base``
the base one (its states precomputed once). Added to the denoising loss with a weight.

    prior = make_text_prior(sd, "boxed", ["a handwritten zero", ..., "a handwritten nine"])
    task = build_finetune_task(sd, cfg, examples, ..., text_prior=prior)
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.pipelines.loading import StableDiffusion
from jaxdiff.pipelines.pipeline_args import prompt_tokens
from jaxdiff.pipelines.sd_program import embed_tokens
from jaxdiff.validation import check_float, check_int

__all__ = ["TextPrior", "make_text_prior", "text_prior_loss", "prepend_word"]


class TextPrior(NamedTuple):
    """The text prior's data (:func:`make_text_prior`).

    Attributes:
      input_ids: ``[N, L]`` int32: the word and each prompt.
      target: ``[N, L - 1 - k, D]`` float32: the base encoder's states of each prompt alone at
        positions ``1 .. L - 1 - k``.
      offset: ``k``, the word's token count.
      weight: the loss's weight (> 0).
      batch: prompts per step (all of them when fewer).
    """

    input_ids: np.ndarray
    target: np.ndarray
    offset: int
    weight: float
    batch: int


def make_text_prior(sd: StableDiffusion, word: str, prompts: Sequence[str], *,
                    weight: float = 1.0, batch: int = 16) -> TextPrior:
    """The text prior of ``word`` written in front of ``prompts`` (module docstring), with the
    base encoder's states of ``prompts`` computed now from ``sd.params["text_encoder"]``.

    Raises:
      ValueError: naming ``word`` (empty, or as long as the tokenizer's length), ``prompts``
        (empty, not strings, or one that leaves too little padding for the word),
        ``weight`` (not > 0), ``batch`` (< 1), or ``sd`` (an SDXL model).
    """
    if sd.is_sdxl:
        raise ValueError("sd: the text prior is for SD 1.x / 2.x models (one text encoder)")
    prompts = list(prompts) if not isinstance(prompts, str) else [prompts]
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"prompts must be non-empty strings, got {prompts!r}")
    weight = check_float("weight", weight, minimum=0.0, exclusive_minimum=True)
    batch = check_int("batch", batch, 1)
    plain = prompt_tokens(sd, prompts, "prompts")
    withw, k = prepend_word(sd, plain, word, "prompts")
    length = plain.shape[1]
    base = embed_tokens(sd.text_config, jnp.float32, sd.params["text_encoder"],
                        jnp.asarray(plain, jnp.int32))
    target = np.asarray(base[:, 1:length - k], np.float32)
    return TextPrior(np.asarray(withw, np.int32), target, k, float(weight), batch)


def prepend_word(sd: StableDiffusion, input_ids: np.ndarray, word: str,
                 name: str = "input_ids") -> Tuple[np.ndarray, int]:
    """``(ids [N, L], k)``: ``input_ids [N, L]`` (as the tokenizer pads them) with ``word``'s
    ``k`` tokens after the start token and each prompt's tokens moved right by ``k`` (the
    tokens of ``word + " " + prompt``: CLIP's BPE splits at spaces).

    Raises:
      ValueError: naming ``word`` (empty, or too long for the tokenizer's length) or
        ``name[i]`` (a prompt with fewer than ``k`` padding tokens after its end token).
    """
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"word must be a non-empty string, got {word!r}")
    ids = np.asarray(input_ids)
    n, length = ids.shape
    eos = int(sd.tokenizer.eos_token_id)
    alone = np.asarray(sd.tokenizer([word.strip()], padding="max_length",
                                    truncation=True).input_ids[0])
    k = int(np.argmax(alone[1:] == eos))            # the word's tokens between BOS and EOS
    if k < 1 or k >= length - 2:
        raise ValueError(f"word {word!r} must take 1 to {length - 3} tokens, got {k}")
    ends = np.argmax(ids[:, 1:] == eos, axis=1) + 1  # each prompt's end token
    short = np.flatnonzero(ends + k >= length)
    if short.size:
        raise ValueError(f"{name}[{int(short[0])}] leaves fewer than {k} padding tokens for "
                         f"the word {word!r} in front; shorten it")
    out = np.concatenate([ids[:, :1], np.tile(alone[1:1 + k], (n, 1)), ids[:, 1:length - k]],
                         axis=1)
    return out.astype(ids.dtype), k


def text_prior_loss(text_config, text_params, prior: TextPrior, key: jax.Array) -> jax.Array:
    """The text prior's loss (module docstring, without the weight): a float32 scalar, over
    ``prior.batch`` prompts drawn with ``key`` without replacement (all of them when there are
    no more). Jittable; differentiable in ``text_params``."""
    n = prior.input_ids.shape[0]
    ids, target = jnp.asarray(prior.input_ids), jnp.asarray(prior.target)
    if prior.batch < n:
        pick = jax.random.choice(key, n, (prior.batch,), replace=False)
        ids, target = ids[pick], target[pick]
    states = embed_tokens(text_config, jnp.float32, text_params, ids)[:, 1 + prior.offset:]
    return jnp.mean(jnp.square(states - target)) / jnp.mean(jnp.square(target))
