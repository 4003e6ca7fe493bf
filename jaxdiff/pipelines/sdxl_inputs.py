"""The host-side inputs of an SDXL generation program: the two tokenizers' ids and the
micro-conditioning rows, as the ``cond`` / ``uncond`` pytrees that
:func:`~jaxdiff.pipelines.sd_program.build_program` encodes inside its ``jit``.

:func:`~jaxdiff.pipelines.generate` calls these for a model with ``text_encoder_2``
(:attr:`~jaxdiff.pipelines.StableDiffusion.is_sdxl`); the arguments that only SDXL reads
(:data:`SDXL_ARGUMENTS`) are refused, naming them, for an SD 1.x / 2.x model.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np

from jaxdiff.pipelines.loading import StableDiffusion
from jaxdiff.pipelines.sdxl_conditioning import sdxl_time_ids
from jaxdiff.pipelines.sdxl_text import SDXLTokens, tokenize_sdxl_prompts

__all__ = ["SDXL_ARGUMENTS", "check_sdxl_arguments", "sdxl_conditions", "sdxl_tokens"]

SDXL_ARGUMENTS = ("prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left",
                  "target_size", "negative_original_size", "negative_crops_coords_top_left",
                  "negative_target_size", "aesthetic_score", "negative_aesthetic_score")
""":func:`~jaxdiff.pipelines.generate`'s arguments for SDXL models only (``None``: not given)."""


def check_sdxl_arguments(sd: StableDiffusion, given: Mapping[str, Any]) -> None:
    """Refuse SDXL-only arguments (``given``: name -> value, ``None`` when not given) for a model
    without ``text_encoder_2``, and the aesthetic scores for an SDXL model without
    ``requires_aesthetics_score`` (they would be ignored).

    Raises:
      ValueError: naming the argument.
    """
    named = [k for k in SDXL_ARGUMENTS if given.get(k) is not None]
    if not sd.is_sdxl and named:
        raise ValueError(f"{named[0]} is an SDXL argument: this model has no text_encoder_2 "
                         f"(model_index.json _class_name {sd.pipeline_class!r})")
    if sd.is_sdxl and not sd.requires_aesthetics_score:
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            if given.get(name) is not None:
                raise ValueError(f"{name} is used only by a refiner (model_index.json "
                                 "requires_aesthetics_score: true); this model's is false")


def sdxl_tokens(sd: StableDiffusion, prompt: Any, prompt_2: Any, negative_prompt: Any,
                negative_prompt_2: Any, *, guided: bool,
                logger: logging.Logger) -> tuple[SDXLTokens, SDXLTokens | None, int]:
    """``(tokens, negative_tokens, B)``: :func:`~jaxdiff.pipelines.tokenize_sdxl_prompts` with
    the model's tokenizers and ``force_zeros_for_empty_prompt``; ``negative_tokens`` is ``None``
    for zeros, and always when not ``guided`` (the negative prompts are then not read, but still
    checked)."""
    tokens, negative = tokenize_sdxl_prompts(
        prompt, prompt_2, negative_prompt, negative_prompt_2, tokenizer=sd.tokenizer,
        tokenizer_2=sd.tokenizer_2, force_zeros_for_empty_prompt=sd.force_zeros_for_empty_prompt,
        text_config=sd.text_config, text_config_2=sd.text_config_2, logger=logger)
    return tokens, negative if guided else None, int(np.shape(tokens.input_ids_2)[0])


def sdxl_conditions(sd: StableDiffusion, tokens: SDXLTokens, negative: SDXLTokens | None, *,
                    guided: bool, height: int, width: int, img2img: bool,
                    micro: Mapping[str, Any]) -> tuple[dict, dict | None]:
    """The program's ``(cond, uncond)``: ``{"tokens": ..., "time_ids": [B, K] float32}`` each
    (``uncond`` ``None`` when not ``guided``), the rows from
    :func:`~jaxdiff.pipelines.sdxl_time_ids` with ``original_size`` and ``target_size``
    defaulting to ``(height, width)`` as diffusers', the negative rule of
    ``StableDiffusionXLImg2ImgPipeline`` for image-to-image or a refiner, of
    ``StableDiffusionXLPipeline`` otherwise.

    Args:
      micro: the micro-conditioning arguments of :data:`SDXL_ARGUMENTS` (``None``: default).

    Raises:
      ValueError: as :func:`~jaxdiff.pipelines.sdxl_time_ids` (naming the argument: a size that
        is not a pair, micro-conditioning the rule would ignore, ...).
    """
    rule = "img2img" if img2img or sd.requires_aesthetics_score else "text2img"
    kw = {k: v for k, v in micro.items() if v is not None}
    original = kw.pop("original_size", (height, width))
    if "target_size" not in kw and not sd.requires_aesthetics_score:
        kw["target_size"] = (height, width)
    batch = int(np.shape(tokens.input_ids_2)[0])
    ids = sdxl_time_ids(original, pipeline=rule,
                        requires_aesthetics_score=sd.requires_aesthetics_score,
                        batch_size=batch, **kw)
    cond = {"tokens": tokens, "time_ids": ids.time_ids}
    uncond = {"tokens": negative, "time_ids": ids.negative_time_ids} if guided else None
    return cond, uncond
