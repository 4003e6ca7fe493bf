"""SDXL's micro-conditioning: the ``time_ids`` that the UNet's ``text_time`` embedding reads, as
diffusers' ``_get_add_time_ids`` builds them, and the check of the embedding's input width.

A base model's row is ``[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`` (6 ids); a
refiner with ``requires_aesthetics_score`` has ``[orig_h, orig_w, crop_top, crop_left,
aesthetic_score]`` (5). The UNet embeds each id with ``addition_time_embed_dim`` sinusoids and
concatenates them after the pooled text embedding, so its ``add_embedding`` reads
``addition_time_embed_dim * n_ids + pooled_dim`` features (:func:`check_add_embedding_dim`).

The negative row (classifier-free guidance's unconditional branch) follows the rules of the two
diffusers pipelines, which differ (``pipeline`` picks one; jaxdiff refuses, naming it, a negative
argument that the chosen rule would ignore):

- ``"text2img"`` (``StableDiffusionXLPipeline``): the negative row is the positive one, unless both
  ``negative_original_size`` and ``negative_target_size`` are given; then it is
  ``negative_original_size + negative_crops_coords_top_left (default (0, 0)) +
  negative_target_size``.
- ``"img2img"`` (``StableDiffusionXLImg2ImgPipeline``, the refiner's): ``negative_original_size``
  and ``negative_target_size`` default to the positive ones; without aesthetics the negative row
  takes the *positive* crop (``negative_crops_coords_top_left`` is not used), with aesthetics
  ``negative_original_size + negative_crops_coords_top_left (default (0, 0)) +
  (negative_aesthetic_score,)``.

Everything here runs on the host on Python numbers (static per call); the arrays go into the
pipeline's ``jit`` as ``added_cond["time_ids"]``.

    >>> ids = sdxl_time_ids((1024, 768), crops_coords_top_left=(0, 32), target_size=(512, 384))
    >>> ids.time_ids
    array([[1024.,  768.,    0.,   32.,  512.,  384.]], dtype=float32)
    >>> sdxl_time_ids((1024, 1024), pipeline="img2img", requires_aesthetics_score=True,
    ...               batch_size=2).negative_time_ids
    array([[1024. , 1024. ,    0. ,    0. ,    2.5],
           [1024. , 1024. ,    0. ,    0. ,    2.5]], dtype=float32)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from jaxdiff.validation import check_bool, check_choice, check_float, check_int

__all__ = ["PIPELINE_RULES", "TimeIds", "check_add_embedding_dim", "check_size_pair",
           "sdxl_time_ids"]

PIPELINE_RULES = ("text2img", "img2img")


class TimeIds(NamedTuple):
    """``time_ids`` and ``negative_time_ids``: ``[B, 6]`` (``[B, 5]`` with aesthetics) float32
    numpy each, every row the same."""

    time_ids: np.ndarray
    negative_time_ids: np.ndarray


def check_size_pair(name: str, value: Any, minimum: int = 0) -> tuple[int, int]:
    """``(a, b)`` ints ``>= minimum`` from a length-2 tuple / list / array of ints.

    Raises:
      ValueError: naming ``name``: "micro-conditioning of the wrong length" (not two entries) or
        entries that are not ints ``>= minimum``.
    """
    try:
        items = list(value) if not isinstance(value, (str, bytes)) else None
    except TypeError:
        items = None
    if items is None or len(items) != 2:
        raise ValueError(f"{name} must be a pair of ints (height, width) / (top, left): "
                         f"micro-conditioning of the wrong length, got {value!r}")
    items = [x.item() if isinstance(x, np.ndarray) and x.ndim == 0 else x for x in items]
    return tuple(check_int(f"{name}[{i}]", x, minimum) for i, x in enumerate(items))


def check_add_embedding_dim(addition_time_embed_dim: int, num_time_ids: int, pooled_dim: int,
                            expected_in_dim: int) -> None:
    """The UNet's ``add_embedding`` reads ``expected_in_dim`` features
    (``projection_class_embeddings_input_dim``); the conditioning gives
    ``addition_time_embed_dim * num_time_ids + pooled_dim``. Plain ints, for the pipeline to call
    at load time.

    Raises:
      ValueError: the two widths differ, naming both; when they differ by exactly one time id,
        saying to switch ``requires_aesthetics_score`` off (the UNet wants one id more: a base
        model's 6) or on (one id fewer: a refiner's 5). diffusers raises for the same widths but
        its hint has the two the other way round.
    """
    d = check_int("addition_time_embed_dim", addition_time_embed_dim, 1)
    n = check_int("num_time_ids", num_time_ids, 1)
    p = check_int("pooled_dim", pooled_dim, 1)
    want = check_int("expected_in_dim", expected_in_dim, 1)
    got = d * n + p
    if got == want:
        return
    msg = (f"the UNet's add_embedding reads {want} features (projection_class_embeddings_"
           f"input_dim), the conditioning gives {got} = {n} time ids x addition_time_embed_dim "
           f"{d} + pooled {p}")
    if want - got == d:  # a base UNet (6 ids) given a refiner's row (5)
        msg += ("; the UNet expects one time id more: set requires_aesthetics_score = false "
                "(a base model's 6 ids)")
    elif got - want == d:  # a refiner's UNet (5 ids) given a base row (6)
        msg += ("; the UNet expects one time id fewer: set requires_aesthetics_score = true "
                "(a refiner's 5 ids)")
    else:
        msg += "; check the UNet's addition_time_embed_dim and text_encoder_2's projection_dim"
    raise ValueError(msg)


def sdxl_time_ids(
    original_size: Any,
    crops_coords_top_left: Any = (0, 0),
    target_size: Any = None,
    *,
    negative_original_size: Any = None,
    negative_crops_coords_top_left: Any = None,
    negative_target_size: Any = None,
    requires_aesthetics_score: bool = False,
    aesthetic_score: float = 6.0,
    negative_aesthetic_score: float = 2.5,
    pipeline: str = "text2img",
    batch_size: int = 1,
) -> TimeIds:
    """The micro-conditioning rows of diffusers' ``_get_add_time_ids``, with the negative row's
    defaults of ``pipeline`` (module docstring).

    Args:
      original_size: ``(height, width)`` ints >= 1 (the pipelines default it to the output size).
      crops_coords_top_left: ``(top, left)`` ints >= 0.
      target_size: ``(height, width)``; default ``original_size``. Not used with aesthetics.
      negative_original_size, negative_crops_coords_top_left, negative_target_size: see the
        module docstring; ``None``: not given.
      requires_aesthetics_score: the refiner's 5-id row (its pipeline config's flag).
      aesthetic_score, negative_aesthetic_score: finite numbers (diffusers' defaults 6.0, 2.5);
        used only with aesthetics.
      pipeline: ``"text2img"`` or ``"img2img"``: whose negative rule.
      batch_size: rows ``B >= 1``.

    Returns:
      :class:`TimeIds`, ``[B, 6]`` or ``[B, 5]`` float32 each.

    Raises:
      ValueError: naming the argument: a size that is not a pair of ints (wrong length), a bad
        score / flag / ``pipeline`` / ``batch_size``, ``requires_aesthetics_score`` with
        ``pipeline="text2img"``, or a negative argument the rule would ignore.
    """
    check_choice("pipeline", pipeline, PIPELINE_RULES)
    aesthetics = check_bool("requires_aesthetics_score", requires_aesthetics_score)
    batch = check_int("batch_size", batch_size, 1)
    orig = check_size_pair("original_size", original_size, 1)
    crop = check_size_pair("crops_coords_top_left", crops_coords_top_left, 0)
    target = orig if target_size is None else check_size_pair("target_size", target_size, 1)
    neg_orig = (None if negative_original_size is None
                else check_size_pair("negative_original_size", negative_original_size, 1))
    neg_target = (None if negative_target_size is None
                  else check_size_pair("negative_target_size", negative_target_size, 1))
    neg_crop = (None if negative_crops_coords_top_left is None
                else check_size_pair("negative_crops_coords_top_left",
                                     negative_crops_coords_top_left, 0))
    score = check_float("aesthetic_score", aesthetic_score)
    neg_score = check_float("negative_aesthetic_score", negative_aesthetic_score)
    if pipeline == "text2img":
        if aesthetics:
            raise ValueError("requires_aesthetics_score is a refiner's (pipeline='img2img'); "
                             "StableDiffusionXLPipeline's rows have no aesthetic score")
        if (neg_orig is None) != (neg_target is None) or (neg_orig is None and neg_crop):
            raise ValueError(
                "negative_original_size and negative_target_size must be given together (with "
                "negative_crops_coords_top_left optional): the text-to-image rule uses the "
                "positive row otherwise, ignoring them")
        pos = orig + crop + target
        neg = pos if neg_orig is None else neg_orig + (neg_crop or (0, 0)) + neg_target
    else:
        neg_orig = neg_orig or orig
        if aesthetics:
            if target_size is not None or negative_target_size is not None:
                raise ValueError("target_size / negative_target_size are not used with "
                                 "requires_aesthetics_score (the row ends with the aesthetic "
                                 "score)")
            pos = orig + crop + (score,)
            neg = neg_orig + (neg_crop or (0, 0)) + (neg_score,)
        else:
            if neg_crop is not None:
                raise ValueError("negative_crops_coords_top_left is not used by the "
                                 "image-to-image rule without aesthetics (the negative row "
                                 "takes crops_coords_top_left)")
            pos = orig + crop + target
            neg = neg_orig + crop + (neg_target or target)
    rows = [np.tile(np.asarray(r, np.float32)[None], (batch, 1)) for r in (pos, neg)]
    return TimeIds(*rows)
