"""SDXL's prompt encoding: two CLIP text encoders (or one, for a refiner), as diffusers'
``StableDiffusionXLPipeline.encode_prompt`` does it, for token ids.

SDXL base holds ``text_encoder`` (CLIP ViT-L, transformers' ``CLIPTextModel``) with ``tokenizer``
(pads with ``<|endoftext|>``) and ``text_encoder_2`` (OpenCLIP bigG,
``CLIPTextModelWithProjection``) with ``tokenizer_2`` (pads with ``"!"``, id 0). A refiner
(``StableDiffusionXLImg2ImgPipeline`` with ``requires_aesthetics_score``) holds only the second
pair. Per prompt:

- ``prompt_embeds [B, L, D1 + D2]``: each encoder's *penultimate* hidden state
  (``hidden_states[-2]`` of transformers' ``output_hidden_states``, before the final LayerNorm;
  with ``clip_skip = k`` ``hidden_states[-(k + 2)]``), concatenated on the feature axis,
  encoder 1 first. A refiner's is encoder 2's alone, ``[B, L, D2]``.
- ``pooled [B, P]``: encoder 2's ``text_embeds``, the final-normed state at the EOS position
  projected by ``text_projection`` (:func:`jaxdiff.models.clip_text.pooled_positions`: with
  ``eos_token_id == 2``, as SDXL's configs have it, ``argmax(input_ids)``, where EOS is the
  largest id and ``tokenizer_2``'s padding is id 0; otherwise the first EOS).

Split between host and ``jit``: tokenizing (:func:`tokenize_sdxl_prompts`, Python strings) runs
on the host, before the program; :func:`encode_sdxl_prompt` / :func:`encode_sdxl_prompts` are
pure functions of ``(params, token ids)`` meant to run INSIDE the pipeline's one ``jit`` (the
configs, ``clip_skip``, ``dtype`` and whether the negative is zeros are static).

Where jaxdiff refuses what diffusers silently ignores (each a ``ValueError`` naming it):
``prompt_2`` / ``negative_prompt_2`` for a refiner (diffusers encodes ``prompt`` with
``tokenizer_2`` and drops ``prompt_2``), and ``negative_prompt_2`` without ``negative_prompt``
under ``force_zeros_for_empty_prompt`` (diffusers then returns zeros and drops it). As diffusers,
``clip_skip`` applies to the prompt only, not to the negative prompt.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.clip_text import CLIPTextModel
from jaxdiff.models.clip_text_config import CLIPTextConfig
from jaxdiff.pipelines.loading import check_tokenizer
from jaxdiff.text.tokenizer import CLIPTokenizer
from jaxdiff.text.truncation import warn_truncated
from jaxdiff.validation import check_bool, check_int

__all__ = [
    "SDXLEmbeddings",
    "SDXLTokens",
    "check_sdxl_clip_skip",
    "check_sdxl_text_encoders",
    "encode_sdxl_prompt",
    "encode_sdxl_prompts",
    "negative_is_zeros",
    "tokenize_sdxl_prompts",
]

log = logging.getLogger(__name__)


class SDXLTokens(NamedTuple):
    """Token ids of one batch of prompts (a pytree: passes through ``jit``).

    Attributes:
      input_ids: ``[B, L]`` int32 from ``tokenizer`` for ``text_encoder``; ``None`` for a refiner.
      input_ids_2: ``[B, L]`` int32 from ``tokenizer_2`` for ``text_encoder_2``.
    """

    input_ids: Any
    input_ids_2: Any


class SDXLEmbeddings(NamedTuple):
    """Encoded prompts (a pytree).

    Attributes:
      prompt_embeds: ``[B, L, D1 + D2]`` (a refiner: ``[B, L, D2]``), the UNet's
        ``encoder_hidden_states``.
      pooled: ``[B, P]`` (``P = text_encoder_2``'s ``projection_dim``), the UNet's
        ``added_cond["text_embeds"]``.
    """

    prompt_embeds: jax.Array
    pooled: jax.Array


def check_sdxl_text_encoders(text_config: CLIPTextConfig | None, text_config_2: CLIPTextConfig,
                             tokenizer: CLIPTokenizer | None = None,
                             tokenizer_2: CLIPTokenizer | None = None) -> None:
    """Refuse text encoders and tokenizers that cannot make SDXL's conditioning: no
    ``text_encoder_2``, or one without a projection (``projection_dim``: its ``text_embeds`` is the
    pooled embedding); a tokenizer missing for its encoder, or present without it; tokenizers that
    do not fit their encoders (:func:`~jaxdiff.pipelines.check_tokenizer`); two tokenizers of
    different lengths (the hidden states are concatenated position by position).

    Raises:
      ValueError: naming the folder (``text_encoder_2``, ``tokenizer``, ...) and the problem.
    """
    if text_config_2 is None:
        raise ValueError("text_encoder_2 is required: SDXL's pooled prompt embedding comes from "
                         "it (a folder without text_encoder_2 is not an SDXL model)")
    if text_config_2.projection_dim is None:
        raise ValueError("text_encoder_2 must be a CLIPTextModelWithProjection (projection_dim "
                         "set): SDXL's pooled prompt embedding is its text_embeds")
    if (text_config is None) != (tokenizer is None) and tokenizer_2 is not None:
        have, lack = (("text_encoder", "tokenizer") if tokenizer is None
                      else ("tokenizer", "text_encoder"))
        raise ValueError(f"{have} is given without {lack}: SDXL's first text encoder needs both")
    pairs = [(tokenizer, text_config, "tokenizer", "text_encoder"),
             (tokenizer_2, text_config_2, "tokenizer_2", "text_encoder_2")]
    for tok, config, tok_name, text_name in pairs:
        if tok is not None and config is not None:
            check_tokenizer(tok, config, tok_name, text_name)
    if tokenizer is not None and tokenizer_2 is not None \
            and tokenizer.max_length != tokenizer_2.max_length:
        raise ValueError(f"tokenizer pads to {tokenizer.max_length} tokens, tokenizer_2 to "
                         f"{tokenizer_2.max_length}: SDXL concatenates the two encoders' hidden "
                         "states position by position, so the lengths must be equal")


def check_sdxl_clip_skip(text_config: CLIPTextConfig | None, text_config_2: CLIPTextConfig,
                         clip_skip: int | None) -> int:
    """``clip_skip`` as an int: ``None`` -> 0; ``k`` selects ``hidden_states[-(k + 2)]`` of each
    encoder, so ``0 <= k <= num_hidden_layers - 1`` of the shallower one.

    Raises:
      ValueError: naming ``clip_skip`` and the allowed range.
    """
    if clip_skip is None:
        return 0
    layers = [c.num_hidden_layers for c in (text_config, text_config_2) if c is not None]
    return check_int("clip_skip", clip_skip, 0, min(layers) - 1)


def _hidden(config: CLIPTextConfig, params: Any, input_ids: jax.Array, skips: tuple[int, ...]):
    """One forward pass of ``input_ids [n B, L]`` (``n = len(skips)`` stacked groups of ``B``
    rows): group ``g``'s ``hidden_states[-(skips[g] + 2)]`` and every row's ``text_embeds``."""
    out = CLIPTextModel(config).apply({"params": params}, input_ids)
    groups = [jnp.split(out.hidden_states[-(k + 2)], len(skips))[g] for g, k in enumerate(skips)]
    return jnp.concatenate(groups), out.text_embeds


def _encode(text_config, text_config_2, params, tokens: SDXLTokens, skips, dtype):
    """:func:`encode_sdxl_prompt` for ``len(skips)`` groups of rows stacked in ``tokens``."""
    if (text_config is None) != (tokens.input_ids is None):
        raise ValueError("tokens.input_ids must be None exactly when text_config is None (a "
                         f"refiner), got text_config={'None' if text_config is None else 'set'} "
                         f"and input_ids={'None' if tokens.input_ids is None else 'set'}")
    if text_config is not None and jnp.shape(tokens.input_ids) != jnp.shape(tokens.input_ids_2):
        raise ValueError(f"tokens.input_ids {jnp.shape(tokens.input_ids)} and input_ids_2 "
                         f"{jnp.shape(tokens.input_ids_2)} must have the same shape [B, L]")
    hidden_2, pooled = _hidden(text_config_2, params["text_encoder_2"], tokens.input_ids_2, skips)
    if text_config is None:
        embeds = hidden_2
    else:
        hidden_1, _ = _hidden(text_config, params["text_encoder"], tokens.input_ids, skips)
        embeds = jnp.concatenate([hidden_1, hidden_2], axis=-1)
    return SDXLEmbeddings(embeds.astype(dtype), pooled.astype(dtype))


def encode_sdxl_prompt(text_config: CLIPTextConfig | None, text_config_2: CLIPTextConfig,
                       params: Mapping[str, Any], tokens: SDXLTokens, *, clip_skip: int = 0,
                       dtype: Any = jnp.float32) -> SDXLEmbeddings:
    """Token ids -> SDXL's prompt embeddings and pooled embedding (diffusers' ``encode_prompt``
    for one set of prompts). Pure and jittable: call it inside the pipeline's ``jit`` (configs,
    ``clip_skip`` and ``dtype`` static).

    Args:
      text_config: ``text_encoder``'s config, ``None`` for a refiner (then ``tokens.input_ids``
        must be ``None`` too).
      text_config_2: ``text_encoder_2``'s config (with ``projection_dim``).
      params: ``{"text_encoder": ..., "text_encoder_2": ...}`` (a refiner: the second only; other
        keys are ignored, so the pipeline's whole parameter dict can be passed).
      tokens: :class:`SDXLTokens`, ``[B, L]`` ids each.
      clip_skip: ``k >= 0`` reads ``hidden_states[-(k + 2)]`` of both encoders (checked by
        :func:`check_sdxl_clip_skip`; this function assumes it is valid).
      dtype: the outputs' dtype (the UNet's compute dtype).

    Returns:
      :class:`SDXLEmbeddings`: ``prompt_embeds [B, L, D1 + D2]`` (refiner ``[B, L, D2]``),
      ``pooled [B, projection_dim]``.

    Raises:
      ValueError: ``tokens.input_ids`` given for a refiner or missing for a base model, or the two
        id arrays of different shapes.
    """
    return _encode(text_config, text_config_2, params, tokens, (clip_skip,), dtype)


def encode_sdxl_prompts(text_config: CLIPTextConfig | None, text_config_2: CLIPTextConfig,
                        params: Mapping[str, Any], tokens: SDXLTokens,
                        negative_tokens: SDXLTokens | None, *, clip_skip: int = 0,
                        dtype: Any = jnp.float32) -> tuple[SDXLEmbeddings, SDXLEmbeddings]:
    """The prompt and the negative prompt for classifier-free guidance: ``(cond, uncond)``, each
    an :class:`SDXLEmbeddings` of the same shapes. Pure and jittable (inside the pipeline's
    ``jit``; whether ``negative_tokens`` is ``None`` is static). Both go through each encoder as
    one batch of ``2B`` rows.

    ``negative_tokens=None`` is SDXL's ``force_zeros_for_empty_prompt`` rule (decided on the host
    by :func:`negative_is_zeros`): ``uncond`` is all zeros, embeddings and pooled alike, not the
    encoding of ``""``. Otherwise the negative prompt is encoded as the prompt, without
    ``clip_skip`` (as diffusers).

    Raises:
      ValueError: as :func:`encode_sdxl_prompt`, or ``negative_tokens`` of other shapes than
        ``tokens``.
    """
    if negative_tokens is None:
        cond = encode_sdxl_prompt(text_config, text_config_2, params, tokens,
                                  clip_skip=clip_skip, dtype=dtype)
        return cond, jax.tree.map(jnp.zeros_like, cond)
    shapes = [jax.tree.map(jnp.shape, t) for t in (tokens, negative_tokens)]
    if shapes[0] != shapes[1]:
        raise ValueError(f"negative_tokens' shapes {shapes[1]} must be tokens' {shapes[0]}")
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), tokens, negative_tokens)
    out = _encode(text_config, text_config_2, params, both, (clip_skip, 0), dtype)
    cond, uncond = zip(*(jnp.split(x, 2) for x in out))
    return SDXLEmbeddings(*cond), SDXLEmbeddings(*uncond)


def negative_is_zeros(negative_prompt: Any, negative_prompt_2: Any,
                      force_zeros_for_empty_prompt: bool) -> bool:
    """Whether the guided negative embedding is zeros: no ``negative_prompt`` (``None``) and the
    pipeline's ``force_zeros_for_empty_prompt`` (``model_index.json``; SDXL base: true). An
    explicit ``""`` is encoded, as diffusers.

    Raises:
      ValueError: ``negative_prompt_2`` without ``negative_prompt`` under the flag (diffusers
        would drop it silently); a non-bool flag.
    """
    force = check_bool("force_zeros_for_empty_prompt", force_zeros_for_empty_prompt)
    if negative_prompt is not None or not force:
        return False
    if negative_prompt_2 not in (None, ""):
        raise ValueError("negative_prompt_2 is given without negative_prompt: with "
                         "force_zeros_for_empty_prompt the negative embedding is zeros and "
                         "negative_prompt_2 would be ignored; pass negative_prompt too")
    return True


def _as_list(p: Any, name: str, batch: int | None = None) -> list[str]:
    """``p`` as a list of ``batch`` strs (a str is repeated to ``batch``)."""
    if isinstance(p, str):
        p = [p] * (batch or 1)
    elif not isinstance(p, Sequence) or not p:
        raise ValueError(f"{name} must be a str or a non-empty sequence of str, got {p!r}")
    p = list(p)
    for i, s in enumerate(p):
        if not isinstance(s, str):
            raise ValueError(f"{name}[{i}] must be a str, got {type(s).__name__}")
    if batch is not None and len(p) != batch:
        raise ValueError(f"{name} has {len(p)} entries, the prompt {batch}")
    return p


def _ids(tokenizer: CLIPTokenizer, config: CLIPTextConfig | None, prompts: list[str], name: str,
         logger: logging.Logger) -> np.ndarray:
    ids = tokenizer(prompts, padding="max_length", truncation=True).input_ids
    warn_truncated(tokenizer, prompts, name=name, logger=logger)
    if config is not None and ids.size and int(ids.max()) >= config.vocab_size:
        raise ValueError(f"{name}: token id {int(ids.max())} is beyond the text encoder's "
                         f"vocab_size {config.vocab_size} (the tokenizer does not belong to it)")
    return ids


def tokenize_sdxl_prompts(
    prompt: str | Sequence[str],
    prompt_2: str | Sequence[str] | None = None,
    negative_prompt: str | Sequence[str] | None = None,
    negative_prompt_2: str | Sequence[str] | None = None,
    *,
    tokenizer: CLIPTokenizer | None,
    tokenizer_2: CLIPTokenizer,
    force_zeros_for_empty_prompt: bool = True,
    text_config: CLIPTextConfig | None = None,
    text_config_2: CLIPTextConfig | None = None,
    logger: logging.Logger | None = None,
) -> tuple[SDXLTokens, SDXLTokens | None]:
    """Host-side tokenizing of SDXL prompts: ``(tokens, negative_tokens)`` for
    :func:`encode_sdxl_prompts`, with diffusers' defaults.

    Args:
      prompt: a str or ``B`` strs, for ``tokenizer`` (and for ``tokenizer_2`` unless
        ``prompt_2``).
      prompt_2: for ``tokenizer_2``; default (also for ``""``, as diffusers) ``prompt``. A refiner
        (``tokenizer=None``) refuses it.
      negative_prompt: a str (repeated to ``B``) or ``B`` strs, or ``None``: zeros under
        ``force_zeros_for_empty_prompt`` (``negative_tokens`` is then ``None``), else ``""``.
      negative_prompt_2: for ``tokenizer_2``; default (also for ``""``) ``negative_prompt``.
      tokenizer, tokenizer_2: the folders' tokenizers (``tokenizer=None`` for a refiner). Each
        pads to its ``max_length`` (``"!"`` for SDXL's ``tokenizer_2``).
      force_zeros_for_empty_prompt: the pipeline config's flag.
      text_config, text_config_2: when given, ids beyond the encoders' vocabularies raise.
      logger: where the truncation warnings go (one per tokenizer and text that loses tokens,
        :func:`~jaxdiff.text.truncation.warn_truncated`, named ``prompt`` / ``prompt_2`` / ...).

    Raises:
      ValueError: naming the argument: not a str / list of str, a negative prompt list of another
        length, ``prompt_2`` / ``negative_prompt_2`` for a refiner, as :func:`negative_is_zeros`.
    """
    logger = logger or log
    prompts = _as_list(prompt, "prompt")
    batch = len(prompts)
    if tokenizer is None:
        for name, value in (("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2)):
            if value not in (None, ""):
                raise ValueError(f"{name} is for a second tokenizer: a refiner has only "
                                 "tokenizer_2, which encodes prompt / negative_prompt")
    # As diffusers (``prompt_2 or prompt``): an empty str counts as not given.
    prompts_2 = prompts if prompt_2 in (None, "") else _as_list(prompt_2, "prompt_2", batch)

    def tokens(p1: list[str], p2: list[str], names: tuple[str, str]) -> SDXLTokens:
        if tokenizer is None:
            return SDXLTokens(None, _ids(tokenizer_2, text_config_2, p1, names[0], logger))
        return SDXLTokens(_ids(tokenizer, text_config, p1, names[0], logger),
                          _ids(tokenizer_2, text_config_2, p2, names[1], logger))

    cond = tokens(prompts, prompts_2, ("prompt", "prompt_2"))
    if negative_is_zeros(negative_prompt, negative_prompt_2, force_zeros_for_empty_prompt):
        return cond, None
    neg = _as_list("" if negative_prompt is None else negative_prompt, "negative_prompt", batch)
    neg_2 = neg if negative_prompt_2 in (None, "") else _as_list(negative_prompt_2,
                                                                 "negative_prompt_2", batch)
    return cond, tokens(neg, neg_2, ("negative_prompt", "negative_prompt_2"))
