"""The checks and small conversions of :func:`~jaxdiff.pipelines.generate`'s arguments (host
side, before anything is traced): the guidance scale, prompts as lists and as token ids, image
sides, and padding a batch to a multiple of the device count."""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.pipelines.loading import StableDiffusion
from jaxdiff.text.truncation import warn_truncated
from jaxdiff.validation import check_int

__all__ = ["as_prompt_list", "check_guidance_scale", "check_image_side", "pad_batch",
           "prompt_tokens"]

log = logging.getLogger("jaxdiff.pipelines.stable_diffusion")


def check_guidance_scale(value: Any) -> float:
    """``float(value)`` for a finite real number (any sign: the formula holds for every ``w``)."""
    if isinstance(value, (str, bytes, bool, np.bool_)):
        raise ValueError(f"guidance_scale must be a finite number, got {value!r}")
    try:
        w = float(np.asarray(value).item()) if np.ndim(value) == 0 else None
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError,
            jax.errors.TracerArrayConversionError):
        w = None
    if w is None or not math.isfinite(w):
        raise ValueError(f"guidance_scale must be a finite number, got {value!r}")
    return w


def prompt_tokens(sd: StableDiffusion, prompts: Sequence[str], name: str) -> np.ndarray:
    """Token ids ``[B, L]`` of ``prompts``; warns (``logging``) about text cut off by the
    tokenizer's length, as diffusers does, and refuses ids beyond the text encoder's
    vocabulary (which the embedding lookup would clamp)."""
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"{name}[{i}] must be a str, got {type(p).__name__}")
    tok = sd.tokenizer(list(prompts), padding="max_length", truncation=True)
    warn_truncated(sd.tokenizer, prompts, name=name, logger=log)
    ids = tok.input_ids
    if ids.size and int(ids.max()) >= sd.text_config.vocab_size:
        raise ValueError(f"{name}: token id {int(ids.max())} is beyond the text encoder's "
                         f"vocab_size {sd.text_config.vocab_size} (the tokenizer does not "
                         "belong to this text encoder)")
    return ids


def pad_batch(x: Any, n: int, axis: int = 0) -> Any:
    if x is None or n == 0:
        return x
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    tail = jnp.take(x, jnp.array([x.shape[axis] - 1] * n), axis=axis)
    return jnp.concatenate([jnp.asarray(x), tail], axis=axis)


def as_prompt_list(p: str | Sequence[str] | None, name: str) -> list[str] | None:
    if p is None:
        return None
    if isinstance(p, str):
        return [p]
    if not isinstance(p, Sequence) or not p:
        raise ValueError(f"{name} must be a str or a non-empty sequence of str")
    return list(p)


def check_image_side(name: str, value: Any, unit: int, max_side: int) -> int:
    v = check_int(name, value, 8)
    if v > max_side:
        raise ValueError(
            f"{name}={v} is larger than max_image_side={max_side} pixels (a bound against "
            "typos: the UNet's activations grow with height x width and its attention with the "
            "square of that, so such a size cannot fit in memory; raise max_image_side to "
            "allow it)")
    if v % unit:
        raise ValueError(f"{name} must be a multiple of {unit}, got {v}")
    return v
