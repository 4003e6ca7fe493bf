"""jaxdiff's SDXL pipeline (one :func:`~jaxdiff.pipelines.generate`, the folder loaded by
:func:`~jaxdiff.pipelines.load_stable_diffusion`) against diffusers' ``StableDiffusionXLPipeline``
on the same tiny random folder (:func:`~jaxdiff.pipelines.tiny.write_tiny_stable_diffusion_xl`,
written by ``save_pretrained``, read from disk), float32, 32x32 images, 3 steps.

Both sides get the same initial latents (diffusers' ``latents=``). Cases: the folder's own
``EulerDiscreteScheduler`` (SDXL base's config) and ``DPMSolverMultistepScheduler``; the
negative embedding as zeros (``force_zeros_for_empty_prompt`` with no negative prompt) or
encoded (negative prompts, ``prompt_2`` / ``negative_prompt_2``, non-default micro-conditioning
with negative sizes); guided and unguided (``guidance_scale = 1``).

Tolerances (tests/parity/tolerances.py, as the SD pipeline's parity tests): final latents
relative to ``max(1, max |latents|)`` within ``pipeline_rtol`` with both text encoders counted in
the network, images within ``image_atol``.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from jaxdiff.convert.diffusers_scheduler import sampler_from_diffusers_config  # noqa: E402
from jaxdiff.pipelines import generate, load_stable_diffusion  # noqa: E402
from jaxdiff.pipelines.tiny import write_tiny_stable_diffusion_xl  # noqa: E402
from tests.parity.tolerances import image_atol, pipeline_rtol, within  # noqa: E402

pytestmark = pytest.mark.slow  # every test here takes > 1.5 s on 2 cores

PROMPTS = ["a cat", "the dog of a cat"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sdxl"))
    pipe = write_tiny_stable_diffusion_xl(path, seed=0)
    return pipe, load_stable_diffusion(path)


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def latents(batch, side=16, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, side, side, 4)).astype(np.float32)


def bound_pipe(pipe):
    """A stand-in for :func:`pipeline_rtol` / :func:`image_atol`: both text encoders as the
    text network."""
    encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")]
    encoders = [m for m in encoders if m is not None]
    return types.SimpleNamespace(scheduler=pipe.scheduler, unet=pipe.unet, vae=pipe.vae,
                                 text_encoder=torch.nn.ModuleList(encoders))


def check_latents(pipe, ref_lat, out, scale, encode=False):
    """``out`` (jaxdiff) against diffusers' final latents ``ref_lat`` ([B, C, h, w] torch),
    decoded by the pipeline's own VAE; returns ``(img_err, lat_err)``."""
    with torch.no_grad():
        dec = pipe.vae.decode(ref_lat / pipe.vae.config.scaling_factor).sample
    ref = (dec / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    img_err = float(np.abs(out.float_images - ref).max())
    ref_lat = ref_lat.numpy().transpose(0, 2, 3, 1)
    lat_err = float(np.abs(out.latents - ref_lat).max() / max(1.0, np.abs(ref_lat).max()))
    print(f"image max err {img_err:.2e}, latent max err (relative) {lat_err:.2e}")
    shim = bound_pipe(pipe)
    lat_bound = pipeline_rtol(shim, scale, encode=encode)
    within(img_err, image_atol(shim, lat_bound, ref_lat, dec.numpy()), "images")
    within(lat_err, lat_bound, "latents / max(1, max|latents|)")
    return img_err, lat_err


def with_scheduler(pipe, name):
    cls = getattr(diffusers, name)
    config = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
    sched = cls.from_config(config)
    flags = {k: pipe.config[k] for k in ("force_zeros_for_empty_prompt",
                                         "requires_aesthetics_score") if k in pipe.config}
    pipe = type(pipe)(**{**pipe.components, "scheduler": sched}, **flags)
    pipe.set_progress_bar_config(disable=True)
    return pipe, sampler_from_diffusers_config({**dict(sched.config), "_class_name": name})


ENCODED = dict(negative_prompt=["", "a dog"], prompt_2=["the cat", "an owl"],
               negative_prompt_2=["a dog", "the dog"], original_size=(64, 48),
               crops_coords_top_left=(4, 8), target_size=(32, 40))
# Negative sizes with one prompt only: for B > 1 StableDiffusionXLPipeline repeats the stacked
# [negative; positive] rows B times (``torch.cat([neg, pos]).repeat(B, 1)``), so its rows
# alternate between the two branches instead of giving each branch its own row; jaxdiff gives
# each branch its row (what B = 1 shows).
NEGATIVE_SIZES = dict(negative_prompt="a dog", negative_original_size=(16, 16),
                      negative_target_size=(24, 32), negative_crops_coords_top_left=(2, 0))


@pytest.mark.parametrize("scheduler,scale,prompts,options", [
    ("EulerDiscreteScheduler", 5.0, PROMPTS, {}),   # SDXL's scheduler, zeros as the negative
    ("EulerDiscreteScheduler", 7.0, PROMPTS, ENCODED),  # encoded negatives, micro-conditioning
    ("DPMSolverMultistepScheduler", 5.0, PROMPTS[:1], NEGATIVE_SIZES),
    ("DPMSolverMultistepScheduler", 1.0, PROMPTS, {"original_size": (64, 64)}),  # unguided
])
def test_text_to_image(base, scheduler, scale, prompts, options):
    pipe, sd = base
    sampler = None
    if scheduler != "EulerDiscreteScheduler":
        pipe, sampler = with_scheduler(pipe, scheduler)
    lat = latents(len(prompts))
    ref = pipe(prompts, num_inference_steps=3, guidance_scale=scale, latents=nchw(lat),
               height=32, width=32, output_type="latent", **options).images
    out = generate(sd, prompts, num_steps=3, guidance_scale=scale, latents=lat,
                   sampler=sampler, seed=0, **options)
    img_err, _ = check_latents(pipe, ref, out, scale)
    assert img_err <= 1e-5  # the bar (also well inside the derived bound)
    assert out.images.shape == (len(prompts), 32, 32, 3) and out.images.dtype == np.uint8


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sdxl_refiner"))
    pipe = write_tiny_stable_diffusion_xl(path, refiner=True, seed=1)
    return pipe, load_stable_diffusion(path)


def patched_randn(module_name, draws):
    """``<module>.randn_tensor`` returns ``draws`` (NHWC numpy arrays) in order, as NCHW."""
    import sys
    from unittest import mock

    it = iter(draws)

    def fake(shape, generator=None, device=None, dtype=None, layout=None):
        out = nchw(next(it))
        assert tuple(out.shape) == tuple(shape), (out.shape, shape)
        return out.to(dtype or torch.float32)

    return mock.patch.object(sys.modules[module_name], "randn_tensor", fake)


IMG2IMG = "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img"


@pytest.mark.parametrize("which,options", [
    ("base", {"negative_prompt": ["", "a dog"], "crops_coords_top_left": (0, 8)}),
    ("refiner", {}),                                         # aesthetic scores 6.0 / 2.5
    ("refiner", {"aesthetic_score": 7.0, "negative_aesthetic_score": 1.0,
                 "negative_original_size": (16, 24)}),
])
def test_image_to_image(base, refiner, which, options):
    """``StableDiffusionXLImg2ImgPipeline`` with ``strength``: the base folder's components
    (both encoders, the image-to-image rule for the negative row) and the refiner folder
    (``requires_aesthetics_score``, ``text_encoder_2`` only); the VAE encodes the posterior mean
    on both sides."""
    pipe, sd = base if which == "base" else refiner
    if which == "base":
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(**pipe.components)
        pipe.set_progress_bar_config(disable=True)
    image = np.random.default_rng(3).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    noise = latents(2, seed=7)
    with patched_randn(IMG2IMG, [noise]), \
            patched_randn("diffusers.models.autoencoders.vae", [np.zeros((2, 16, 16, 4))]):
        ref = pipe(PROMPTS, image=image, strength=0.6, num_inference_steps=5,
                   guidance_scale=5.0, output_type="latent", **options).images
    out = generate(sd, PROMPTS, image=image, strength=0.6, num_steps=5, guidance_scale=5.0,
                   latents=noise, sample_posterior=False, seed=0, **options)
    img_err, _ = check_latents(pipe, ref, out, 5.0, encode=True)
    assert img_err <= 1e-5


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_base_to_refiner_hand_off(base, refiner, scheduler):
    """diffusers' ensemble of expert denoisers: the base with ``denoising_end`` returns noisy
    latents, the refiner continues from them with ``denoising_start``; jaxdiff's two calls to
    :func:`generate` give the same latents at the hand-off and the same final images."""
    (base_pipe, base_sd), (ref_pipe, ref_sd) = base, refiner
    sampler = None
    if scheduler != "EulerDiscreteScheduler":
        base_pipe, sampler = with_scheduler(base_pipe, scheduler)
        ref_pipe, _ = with_scheduler(ref_pipe, scheduler)
    lat = latents(2)
    steps, split = 5, 0.7
    mid = base_pipe(PROMPTS, num_inference_steps=steps, guidance_scale=5.0, latents=nchw(lat),
                    height=32, width=32, denoising_end=split, output_type="latent").images
    ref = ref_pipe(PROMPTS, image=mid, num_inference_steps=steps, guidance_scale=5.0,
                   denoising_start=split, output_type="latent").images
    ours_mid = generate(base_sd, PROMPTS, num_steps=steps, guidance_scale=5.0, latents=lat,
                        sampler=sampler, denoising_end=split, seed=0)
    mid_np = mid.numpy().transpose(0, 2, 3, 1)
    mid_err = np.abs(ours_mid.latents - mid_np).max() / max(1.0, np.abs(mid_np).max())
    within(mid_err, pipeline_rtol(bound_pipe(base_pipe), 5.0), "hand-off latents")
    assert np.abs(mid_np).max() > 2.0  # still noisy: the base stopped early
    # the refiner from diffusers' own hand-off latents (each half checked on its own)
    out = generate(ref_sd, PROMPTS, image=mid_np, num_steps=steps, guidance_scale=5.0,
                   sampler=sampler, denoising_start=split, seed=0)
    img_err, _ = check_latents(ref_pipe, ref, out, 5.0)
    assert img_err <= 1e-5
