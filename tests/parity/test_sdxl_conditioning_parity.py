"""SDXL micro-conditioning (jaxdiff.pipelines.sdxl_conditioning) against diffusers: the
``time_ids`` that ``StableDiffusionXLPipeline`` and ``StableDiffusionXLImg2ImgPipeline`` (a
refiner with ``requires_aesthetics_score``, and without) pass to their UNet, captured with a
forward pre-hook on the tiny pipelines of test_sdxl_text_parity.py (one denoising step, latents
out), so that the pipelines' own defaulting of the negative sizes is compared, not only
``_get_add_time_ids``. The ids are integers and scores exactly representable or rounded once to
float32 on both sides: compared exactly.

``check_add_embedding_dim`` against ``_get_add_time_ids``' width check: the same widths raise.
Where diffusers adds a hint, jaxdiff's says the opposite: SDXL base has 6 ids (``2816 = 6 * 256 +
1280``), the refiner 5 (``2560``), so a UNet wanting one id more needs
``requires_aesthetics_score`` *off*; diffusers' message says to enable it."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from jaxdiff.pipelines.sdxl_conditioning import check_add_embedding_dim, sdxl_time_ids
from tests.parity.test_sdxl_text_parity import torch_pipeline, tokenizer_dirs  # noqa: F401

SIZE = 16  # pixels (the one-level tiny VAE does not downsample: 16x16 latents)


class _Captured(Exception):
    pass


def captured_time_ids(pipe, **kw) -> np.ndarray:
    """The ``added_cond_kwargs["time_ids"]`` of the pipeline's first UNet call (the hook stops
    the pipeline there)."""
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone())
        raise _Captured

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), pytest.raises(_Captured):
            pipe(prompt="a cat", num_inference_steps=2, output_type="latent",
                 generator=torch.Generator().manual_seed(0), **kw)
    finally:
        handle.remove()
    return seen[0].numpy()


# name -> (pipeline: "text2img" / "img2img" / "refiner", pipeline call kwargs)
CASES = {
    "text2img_defaults": ("text2img", dict(height=SIZE, width=SIZE)),
    "text2img_sizes": ("text2img", dict(height=SIZE, width=SIZE, original_size=(4096, 3072),
                                  crops_coords_top_left=(128, 64), target_size=(1024, 768))),
    "text2img_negative_sizes": ("text2img", dict(
        height=SIZE, width=SIZE, original_size=(4096, 3072), crops_coords_top_left=(8, 16),
        negative_original_size=(512, 512), negative_target_size=(256, 384),
        negative_crops_coords_top_left=(4, 2))),
    "text2img_negative_sizes_default_crop": ("text2img", dict(
        height=SIZE, width=SIZE, crops_coords_top_left=(8, 16),
        negative_original_size=(512, 512), negative_target_size=(256, 384))),
    "refiner_aesthetics": ("refiner", dict(aesthetic_score=7.25, negative_aesthetic_score=2.1,
                                      original_size=(2048, 1024), crops_coords_top_left=(3, 5),
                                      negative_crops_coords_top_left=(1, 2))),
    "refiner_aesthetics_defaults": ("refiner", dict(negative_original_size=(100, 200))),
    "img2img_no_aesthetics": ("img2img", dict(original_size=(640, 480), target_size=(320, 240),
                                          crops_coords_top_left=(7, 9),
                                          negative_target_size=(64, 48))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_time_ids_match_the_diffusers_pipelines(name, tokenizer_dirs):  # noqa: F811
    kind, kw = CASES[name]
    pipe = torch_pipeline(tokenizer_dirs, refiner=kind == "refiner", img2img=kind == "img2img")
    aesthetics = kind == "refiner"
    rule = "text2img" if kind == "text2img" else "img2img"
    image = None
    if kind != "text2img":
        image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    extra = {} if image is None else dict(image=image, strength=0.6)
    got_torch = captured_time_ids(pipe, guidance_scale=5.0, **extra, **kw)  # [neg; pos]

    h, w = (kw.get("height", SIZE), kw.get("width", SIZE))
    ours = dict(original_size=kw.get("original_size", (h, w)),
                crops_coords_top_left=kw.get("crops_coords_top_left", (0, 0)),
                pipeline=rule, requires_aesthetics_score=aesthetics)
    if not aesthetics:
        ours["target_size"] = kw.get("target_size", (h, w))
    for key in ("negative_original_size", "negative_target_size",
                "negative_crops_coords_top_left", "aesthetic_score", "negative_aesthetic_score"):
        if key in kw:
            ours[key] = kw[key]
    ids = sdxl_time_ids(**ours)
    want = np.concatenate([ids.negative_time_ids, ids.time_ids])
    np.testing.assert_array_equal(got_torch, want)
    assert want.shape == (2, 5 if aesthetics else 6)


@pytest.mark.parametrize("d, n, pooled, expected", [
    (256, 6, 1280, 2816), (256, 5, 1280, 2816), (256, 6, 1280, 2560), (256, 6, 1280, 2000),
    (8, 6, 24, 72), (8, 5, 24, 64), (8, 5, 24, 72),
])
def test_width_check_raises_where_diffusers_does(d, n, pooled, expected):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    aesthetics = n == 5  # diffusers' row length follows requires_aesthetics_score
    fake = types.SimpleNamespace(
        config=types.SimpleNamespace(requires_aesthetics_score=aesthetics),
        unet=types.SimpleNamespace(config=types.SimpleNamespace(addition_time_embed_dim=d),
                                   add_embedding=types.SimpleNamespace(
                                       linear_1=types.SimpleNamespace(in_features=expected))))
    try:
        StableDiffusionXLImg2ImgPipeline._get_add_time_ids(
            fake, (1, 2), (0, 0), (3, 4), 6.0, 2.5, (1, 2), (0, 0), (3, 4), torch.float32,
            text_encoder_projection_dim=pooled)
        diffusers_error = None
    except ValueError as e:
        diffusers_error = str(e)
    if diffusers_error is None:
        check_add_embedding_dim(d, n, pooled, expected)
        return
    with pytest.raises(ValueError) as e:
        check_add_embedding_dim(d, n, pooled, expected)
    for hint, ours in (("enable `requires_aesthetics_score`", "= false"),
                       ("disable `requires_aesthetics_score`", "= true")):
        if hint in diffusers_error:
            assert f"requires_aesthetics_score {ours}" in str(e.value)
