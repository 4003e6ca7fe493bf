"""jaxdiff.pipelines.sdxl_conditioning: the rows' layout, batch and dtype, and the one-line
errors for bad micro-conditioning (the values against diffusers are in
tests/parity/test_sdxl_conditioning_parity.py)."""

import numpy as np
import pytest

from jaxdiff.pipelines.sdxl_conditioning import (
    check_add_embedding_dim,
    check_size_pair,
    sdxl_time_ids,
)


def test_rows_layout_batch_and_dtype():
    ids = sdxl_time_ids((1024, 768), (16, 32), (512, 384), batch_size=3)
    assert ids.time_ids.dtype == np.float32 and ids.time_ids.shape == (3, 6)
    np.testing.assert_array_equal(ids.time_ids[2], [1024, 768, 16, 32, 512, 384])
    np.testing.assert_array_equal(ids.negative_time_ids, ids.time_ids)
    refiner = sdxl_time_ids(np.array([640, 480]), [np.int64(1), 2], pipeline="img2img",
                            requires_aesthetics_score=True, aesthetic_score=6,
                            negative_aesthetic_score=2.5, batch_size=2)
    np.testing.assert_array_equal(refiner.time_ids, [[640, 480, 1, 2, 6.0]] * 2)
    np.testing.assert_array_equal(refiner.negative_time_ids, [[640, 480, 0, 0, 2.5]] * 2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(original_size=(1024,)), r"original_size must be a pair .*wrong length"),
    (dict(original_size=(1024, 1024), crops_coords_top_left=(0, 0, 0)),
     r"crops_coords_top_left must be a pair .*wrong length"),
    (dict(original_size=(1024, 1024), target_size=1024), r"target_size must be a pair"),
    (dict(original_size="1024x1024"), r"original_size must be a pair"),
    (dict(original_size=(1024, 1024.5)), r"original_size\[1\] must be an int"),
    (dict(original_size=(0, 1024)), r"original_size\[0\] must be >= 1"),
    (dict(original_size=(64, 64), crops_coords_top_left=(-1, 0)),
     r"crops_coords_top_left\[0\] must be >= 0"),
    (dict(original_size=(64, 64), negative_original_size=(1, 2, 3)),
     r"negative_original_size must be a pair"),
    (dict(original_size=(64, 64), negative_original_size=(32, 32)),
     "must be given together"),
    (dict(original_size=(64, 64), negative_crops_coords_top_left=(1, 1)),
     "must be given together"),
    (dict(original_size=(64, 64), requires_aesthetics_score=True), "refiner"),
    (dict(original_size=(64, 64), pipeline="img2img", negative_crops_coords_top_left=(1, 1)),
     "negative_crops_coords_top_left is not used"),
    (dict(original_size=(64, 64), pipeline="img2img", requires_aesthetics_score=True,
          target_size=(64, 64)), "target_size"),
    (dict(original_size=(64, 64), pipeline="img2img", requires_aesthetics_score=True,
          aesthetic_score=float("nan")), "aesthetic_score must be finite"),
    (dict(original_size=(64, 64), pipeline="inpaint"), "pipeline"),
    (dict(original_size=(64, 64), batch_size=0), "batch_size"),
    (dict(original_size=(64, 64), requires_aesthetics_score="yes"), "requires_aesthetics_score"),
])
def test_bad_micro_conditioning_is_a_one_line_error(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        sdxl_time_ids(**kwargs)
    assert "\n" not in str(e.value)


def test_size_pair_accepts_sequences_of_ints():
    assert check_size_pair("x", np.array([3, 4])) == (3, 4)
    assert check_size_pair("x", [np.int32(5), 6]) == (5, 6)


@pytest.mark.parametrize("args, match", [
    ((256, 6, 1280, 2816), None),
    ((256, 6, 1280, 3072), "requires_aesthetics_score = false"),
    ((256, 5, 1280, 2816), "requires_aesthetics_score = false"),  # refiner row, base UNet
    ((256, 6, 1280, 2560), "requires_aesthetics_score = true"),  # base row, refiner UNet
    ((256, 6, 1280, 2000), "projection_dim"),
    ((0, 6, 1280, 2816), "addition_time_embed_dim"),
])
def test_add_embedding_width_check(args, match):
    if match is None:
        check_add_embedding_dim(*args)
        return
    with pytest.raises(ValueError, match=match):
        check_add_embedding_dim(*args)
