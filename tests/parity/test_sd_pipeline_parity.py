"""jaxdiff's Stable Diffusion pipeline against diffusers' ``StableDiffusionPipeline`` /
``StableDiffusionImg2ImgPipeline`` on the same tiny random checkpoint folder (written by diffusers,
loaded by jaxdiff from disk), float32, 32x32 images, 3-4 steps.

Both sides get the same initial latents (diffusers' ``latents=``) and, for stochastic samplers
and image-to-image, the same noise (the scheduler / pipeline module's ``randn_tensor`` patched);
image-to-image encodes with the VAE posterior's mean on both sides (diffusers' posterior
``randn_tensor`` patched to zeros, jaxdiff's ``sample_posterior=False``).

An SD 1.5-style folder (``PNDMScheduler`` with ``skip_prk_steps=True``, ``steps_offset=1`` and
the ``clip_sample`` key its config carries) loads with its own scheduler as jaxdiff's ``pndm``
(PLMS) and runs text-to-image and image-to-image as diffusers' pipelines do.

LCM image-to-image runs against ``LatentConsistencyModelImg2ImgPipeline`` (its own recipe: the
grid cut by ``strength``, all steps run); the tiny UNet has no guidance-scale embedding
(``time_cond_proj_dim=None``, as an SD UNet under LCM-LoRA), so that pipeline's ``w_embedding`` is
patched to ``None`` (the UNet gets no ``timestep_cond``), and jaxdiff runs without guidance.

Tolerances (tests/parity/tolerances.py): final latents relative to ``max(1, max |latents|)``
within ``pipeline_rtol`` (the UNet and text encoder as float32 networks per call, weighted by the
guidance and the sampler's gains), images (in [0, 1]) within ``image_atol`` (the VAE's own bound
on top of the latents').
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from jaxdiff.convert.diffusers_scheduler import sampler_from_diffusers_config  # noqa: E402
from jaxdiff.pipelines import generate, load_stable_diffusion  # noqa: E402
from jaxdiff.pipelines.tiny import write_tiny_stable_diffusion  # noqa: E402
from tests.parity.tolerances import image_atol, pipeline_rtol, within  # noqa: E402

pytestmark = pytest.mark.slow  # every test here takes > 1.5 s on 2 cores

PROMPTS = ["a cat", "the dog of a cat"]
NEGATIVES = ["", "a dog"]


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sd1"))
    pipe = write_tiny_stable_diffusion(path, seed=0)
    return pipe, load_stable_diffusion(path)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sd2"))
    pipe = write_tiny_stable_diffusion(path, sd2=True, prediction_type="v_prediction", seed=1)
    return pipe, load_stable_diffusion(path)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """A tiny folder laid out as SD 1.5's: PNDMScheduler (PLMS) with SD 1.5's config keys."""
    path = str(tmp_path_factory.mktemp("sd15"))
    pipe = write_tiny_stable_diffusion(
        path, scheduler="PNDMScheduler", seed=2,
        scheduler_options=dict(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False))
    config_path = os.path.join(path, "scheduler", "scheduler_config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump({**config, "clip_sample": False}, f)  # DDIM's key, as in SD 1.5's file
    return pipe, load_stable_diffusion(path)  # no sampler=: the folder's own scheduler


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _latents(batch, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 16, 16, 4)).astype(np.float32)


@contextlib.contextmanager
def _patched_randn(module_name, draws):
    """``<module>.randn_tensor`` returns ``draws`` (NHWC numpy arrays) in order, as NCHW."""
    module = sys.modules[module_name]
    original, it = module.randn_tensor, iter(draws)

    def fake(shape, generator=None, device=None, dtype=None, layout=None):
        out = _nchw(next(it))
        assert tuple(out.shape) == tuple(shape), (out.shape, shape)
        return out.to(dtype or torch.float32)

    module.randn_tensor = fake
    try:
        yield
    finally:
        module.randn_tensor = original


def _with_scheduler(pipe, name, **extra):
    """``pipe`` with its scheduler replaced by ``name`` built from the same config."""
    cls = getattr(diffusers, name)
    accepted = inspect.signature(cls.__init__).parameters
    config = {k: v for k, v in {**dict(pipe.scheduler.config), **extra}.items()
              if k in accepted}
    pipe = diffusers.StableDiffusionPipeline(**{**pipe.components, "scheduler": cls(**config)})
    pipe.set_progress_bar_config(disable=True)
    return pipe, sampler_from_diffusers_config({**config, "_class_name": name})


def _check_against_pipeline(pipe, ref_lat, out, label, scale=1.0, rescale=False, encode=False):
    """Asserts jaxdiff's ``out`` matches the diffusers latents ``ref_lat`` ([B, C, h, w] torch)
    decoded by the pipeline's own VAE + postprocess (no safety checker): latents within
    ``pipeline_rtol`` relative (guidance ``scale``), images within ``image_atol``; returns
    ``(img_err, lat_err)``."""
    with torch.no_grad():
        dec = pipe.vae.decode(ref_lat / pipe.vae.config.scaling_factor).sample
    ref = (dec / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    img_err = float(np.abs(out.float_images - ref).max())
    ref_lat = ref_lat.numpy().transpose(0, 2, 3, 1)
    lat_err = float(np.abs(out.latents - ref_lat).max() / max(1.0, np.abs(ref_lat).max()))
    print(f"{label} image max err {img_err:.2e}, latent max err (relative) {lat_err:.2e}")
    lat_bound = pipeline_rtol(pipe, scale, rescale=rescale, encode=encode)
    within(img_err, image_atol(pipe, lat_bound, ref_lat, dec.numpy()), "images")
    within(lat_err, lat_bound, "latents / max(1, max|latents|)")
    return img_err, lat_err


def _compare(pipe, sd, *, prompts, negatives, scale, steps=3, rescale=0.0, sampler=None,
             noise=None, noise_module=None, clip_skip=None):
    lat = _latents(len(prompts))
    kw = dict(num_inference_steps=steps, guidance_scale=scale, guidance_rescale=rescale,
              latents=_nchw(lat), height=32, width=32, clip_skip=clip_skip)
    with (_patched_randn(noise_module, list(noise)) if noise is not None
          else contextlib.nullcontext()):
        ref_lat = pipe(prompts, negative_prompt=negatives, output_type="latent", **kw).images
    out = generate(sd, prompts, negatives, num_steps=steps, guidance_scale=scale,
                   guidance_rescale=rescale, latents=lat, noise=noise, sampler=sampler,
                   seed=0, clip_skip=clip_skip)
    img_err, lat_err = _check_against_pipeline(pipe, ref_lat, out, "parity", scale, rescale > 0)
    assert out.images.dtype == np.uint8 and out.images.shape == (len(prompts), 32, 32, 3)
    return img_err, lat_err


@pytest.mark.parametrize("scale,negatives,rescale", [
    (7.5, NEGATIVES, 0.0), (1.0, None, 0.0), (5.0, NEGATIVES, 0.7),
])
def test_text_to_image_ddim(sd1, scale, negatives, rescale):
    pipe, sd = sd1
    _compare(pipe, sd, prompts=PROMPTS, negatives=negatives, scale=scale, rescale=rescale)


@pytest.mark.parametrize("name,extra", [
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("EulerDiscreteScheduler", {}),
])
def test_text_to_image_other_schedulers(sd1, name, extra):
    pipe, sd = sd1
    pipe, sampler = _with_scheduler(pipe, name, **extra)
    _compare(pipe, sd, prompts=PROMPTS, negatives=NEGATIVES, scale=7.5, sampler=sampler)


def test_text_to_image_euler_ancestral_same_noise(sd1):
    pipe, sd = sd1
    pipe, sampler = _with_scheduler(pipe, "EulerAncestralDiscreteScheduler")
    noise = np.random.default_rng(5).standard_normal((3, 2, 16, 16, 4)).astype(np.float32)
    _compare(pipe, sd, prompts=PROMPTS, negatives=NEGATIVES, scale=7.5, sampler=sampler,
             noise=noise,
             noise_module="diffusers.schedulers.scheduling_euler_ancestral_discrete")


def test_text_to_image_clip_skip(sd1):
    """diffusers' ``clip_skip=1``: the prompt's embedding from the second-to-last CLIP layer
    through the final LayerNorm (the negative prompt's unskipped); and it changes the image."""
    pipe, sd = sd1
    # diffusers 0.42 reaches the final LayerNorm as ``text_encoder.text_model.final_layer_norm``,
    # which transformers 5 flattened into ``text_encoder.final_layer_norm``: an alias (not a
    # registered submodule) restores the path diffusers expects.
    te = pipe.text_encoder
    object.__setattr__(te, "text_model", te)
    try:
        _compare(pipe, sd, prompts=PROMPTS, negatives=NEGATIVES, scale=7.5, clip_skip=1)
    finally:
        object.__delattr__(te, "text_model")
    kw = dict(num_steps=3, guidance_scale=7.5, latents=_latents(len(PROMPTS)), seed=0)
    skipped = generate(sd, PROMPTS, NEGATIVES, clip_skip=1, **kw).float_images
    plain = generate(sd, PROMPTS, NEGATIVES, **kw).float_images
    assert np.abs(skipped - plain).max() > 1e-3
    with pytest.raises(ValueError, match="clip_skip"):
        generate(sd, PROMPTS, NEGATIVES, clip_skip=sd.text_config.num_hidden_layers, **kw)


@pytest.mark.parametrize("name", ["DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_text_to_image_v_prediction_sd2(sd2, name):
    pipe, sd = sd2
    sampler = None
    if name != "DDIMScheduler":
        pipe, sampler = _with_scheduler(pipe, name)
    _compare(pipe, sd, prompts=PROMPTS, negatives=None, scale=7.5, sampler=sampler)


@pytest.mark.parametrize("name,scale", [("DDIMScheduler", 7.5), ("DDIMScheduler", 1.0),
                                        ("DPMSolverMultistepScheduler", 7.5),
                                        ("UniPCMultistepScheduler", 7.5),
                                        ("HeunDiscreteScheduler", 7.5)])
def test_image_to_image(sd1, name, scale):
    pipe, sd = sd1
    sampler = None
    if name != "DDIMScheduler":
        pipe, sampler = _with_scheduler(pipe, name)
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = np.random.default_rng(3).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    noise = _latents(2, seed=7)
    with _patched_randn("diffusers.pipelines.stable_diffusion."
                        "pipeline_stable_diffusion_img2img", [noise]), \
            _patched_randn("diffusers.models.autoencoders.vae", [np.zeros((2, 16, 16, 4))]):
        ref = img2img(PROMPTS, image=image, negative_prompt=NEGATIVES, strength=0.6,
                      num_inference_steps=5, guidance_scale=scale, output_type="np").images
    out = generate(sd, PROMPTS, NEGATIVES, image=image, strength=0.6, num_steps=5,
                   guidance_scale=scale, latents=noise, sample_posterior=False,
                   sampler=sampler, seed=0)
    err = float(np.abs(out.float_images - ref).max())
    print(f"parity img2img image max err {err:.2e}")
    # the bound scales with the VAE's unclamped output: decode jaxdiff's final latents for it
    with torch.no_grad():
        dec = img2img.vae.decode(_nchw(out.latents) / img2img.vae.config.scaling_factor).sample
    bound = pipeline_rtol(img2img, scale, encode=True)
    within(err, image_atol(img2img, bound, out.latents, dec.numpy()), "images")


class _NoEmbedding:
    """Stands for the LCM pipeline's guidance-scale embedding of a UNet without one."""

    def to(self, *args, **kwargs):
        return None


def test_image_to_image_lcm(sd1):
    pipe, sd = sd1
    steps, strength = 4, 0.5  # runs t = 499, 379, 259, 139 (the text-to-image tail: 499, 259)
    config = {**dict(pipe.scheduler.config), "_class_name": "LCMScheduler"}
    lcm = diffusers.LatentConsistencyModelImg2ImgPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        scheduler=diffusers.LCMScheduler.from_config(pipe.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    lcm.set_progress_bar_config(disable=True)
    lcm.get_guidance_scale_embedding = lambda *args, **kwargs: _NoEmbedding()
    image = np.random.default_rng(4).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    noise = _latents(2, seed=8)  # add_noise's noise
    step_noise = np.random.default_rng(9).standard_normal((steps, 2, 16, 16, 4)).astype(
        np.float32)  # the re-noising between steps (the last row is unused)
    with _patched_randn("diffusers.pipelines.latent_consistency_models."
                        "pipeline_latent_consistency_img2img", [noise]), \
            _patched_randn("diffusers.models.autoencoders.vae", [np.zeros((2, 16, 16, 4))]), \
            _patched_randn("diffusers.schedulers.scheduling_lcm", list(step_noise[:-1])):
        ref_lat = lcm(PROMPTS, image=image, strength=strength, num_inference_steps=steps,
                      output_type="latent").images
    out = generate(sd, PROMPTS, image=image, strength=strength, num_steps=steps,
                   guidance_scale=1.0, latents=noise, noise=step_noise, sample_posterior=False,
                   sampler=sampler_from_diffusers_config(config), seed=0)
    _check_against_pipeline(lcm, ref_lat, out, "parity LCM img2img", encode=True)


def test_sd15_folder_runs_with_its_pndm_scheduler(sd15):
    pipe, sd = sd15
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert sd.sampler.name == "pndm" and sd.sampler.options["skip_prk_steps"] is True
    assert sd.sampler.options["steps_offset"] == 1
    _compare(pipe, sd, prompts=PROMPTS, negatives=NEGATIVES, scale=7.5, steps=4)


def test_sd15_image_to_image_with_pndm(sd15):
    """``StableDiffusionImg2ImgPipeline`` + PNDM: the tail ``timesteps[2:]`` of the 6 model
    timesteps (5 steps, strength 0.6) starts at the repeated one, with the history restarted."""
    pipe, sd = sd15
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = np.random.default_rng(5).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    noise = _latents(2, seed=6)
    with _patched_randn("diffusers.pipelines.stable_diffusion."
                        "pipeline_stable_diffusion_img2img", [noise]), \
            _patched_randn("diffusers.models.autoencoders.vae", [np.zeros((2, 16, 16, 4))]):
        ref = img2img(PROMPTS, image=image, negative_prompt=NEGATIVES, strength=0.6,
                      num_inference_steps=5, guidance_scale=7.5, output_type="np").images
    out = generate(sd, PROMPTS, NEGATIVES, image=image, strength=0.6, num_steps=5,
                   guidance_scale=7.5, latents=noise, sample_posterior=False, seed=0)
    err = float(np.abs(out.float_images - ref).max())
    print(f"parity PNDM img2img image max err {err:.2e}")
    # the bound scales with the VAE's unclamped output: decode jaxdiff's final latents for it
    with torch.no_grad():
        dec = img2img.vae.decode(_nchw(out.latents) / img2img.vae.config.scaling_factor).sample
    bound = pipeline_rtol(img2img, 7.5, encode=True)
    within(err, image_atol(img2img, bound, out.latents, dec.numpy()), "images")
