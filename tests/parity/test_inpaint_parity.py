"""jaxdiff's inpainting (:func:`~jaxdiff.pipelines.generate` with ``mask_image``) against
diffusers' ``StableDiffusionInpaintPipeline`` / ``StableDiffusionXLInpaintPipeline`` on tiny
random folders written by diffusers (``save_pretrained``, read from disk), float32, 32x32 images.

At both UNet widths: a 4-channel UNet (diffusers' mask blending after every step, inside
jaxdiff's scan through the sampler's ``after_step``) and a 9-channel inpainting UNet (latents,
mask and masked-image latents concatenated), with DDIM, PLMS (PNDM) and Euler, ``strength`` 1
(pure noise) and below (the noised image); SDXL's base and refiner (aesthetic scores). Both
sides get the same noise (the pipeline module's
``randn_tensor`` patched to return jaxdiff's ``latents``: diffusers' ``latents=`` would skip the
image noising below strength 1) and encode with the VAE posterior's mean (its ``randn_tensor``
patched to zeros, jaxdiff's ``sample_posterior=False``). The mask is a float array with values on
both sides of 0.5 (binarised by both), ``[H, W]`` for jaxdiff, ``[1, H, W, 1]`` for diffusers.

Tolerances as the other pipeline parity tests (tests/parity/tolerances.py): final images within
``image_atol`` of ``pipeline_rtol`` (the VAE encoding counted), and at most 1e-5.
"""

from __future__ import annotations

import contextlib
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from jaxdiff.convert.diffusers_scheduler import sampler_from_diffusers_config  # noqa: E402
from jaxdiff.pipelines import generate, load_stable_diffusion  # noqa: E402
from jaxdiff.pipelines.tiny import (write_tiny_stable_diffusion,  # noqa: E402
                                    write_tiny_stable_diffusion_xl)
from tests.parity.tolerances import image_atol, pipeline_rtol, within  # noqa: E402

pytestmark = pytest.mark.slow  # every test here takes > 1.5 s on 2 cores

PROMPTS = ["a cat", "the dog of a cat"]
NEGATIVES = ["", "a dog"]
SD_MODULE = "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint"
XL_MODULE = "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint"


def _write(tmp_path_factory, name, writer, **kw):
    path = str(tmp_path_factory.mktemp(name))
    pipe = writer(path, **kw)
    return pipe, load_stable_diffusion(path)


@pytest.fixture(scope="module")
def sd4(tmp_path_factory):
    return _write(tmp_path_factory, "sd4", write_tiny_stable_diffusion, seed=0)


@pytest.fixture(scope="module")
def sd9(tmp_path_factory):
    return _write(tmp_path_factory, "sd9", write_tiny_stable_diffusion, seed=4,
                  unet_options={"in_channels": 9})


@pytest.fixture(scope="module")
def xl4(tmp_path_factory):
    return _write(tmp_path_factory, "xl4", write_tiny_stable_diffusion_xl, seed=0)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


@contextlib.contextmanager
def _patched_randn(module_name, draws=None):
    """``<module>.randn_tensor`` returns ``draws`` (NHWC) in order, or zeros if ``None``."""
    module = sys.modules[module_name]
    original, it = module.randn_tensor, iter(draws or ())

    def fake(shape, generator=None, device=None, dtype=None, layout=None):
        out = torch.zeros(shape) if draws is None else _nchw(next(it))
        assert tuple(out.shape) == tuple(shape), (out.shape, shape)
        return out.to(dtype or torch.float32)

    module.randn_tensor = fake
    try:
        yield
    finally:
        module.randn_tensor = original


def _inputs(seed=3):
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    mask = np.full((32, 32), 0.2, np.float32)
    mask[6:22, 10:30] = 0.7  # repaint a rectangle (binarised at 0.5 on both sides)
    noise = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    return image, mask, noise


def _inpaint_pipe(pipe, cls, scheduler=None, **extra):
    """``cls`` (an inpainting pipeline) from ``pipe``'s components, with ``scheduler`` (a
    diffusers class name built from the same config and ``extra``) and jaxdiff's sampler for
    it."""
    sched, sampler = pipe.scheduler, None
    if scheduler is not None:
        config = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
        sched = getattr(diffusers, scheduler).from_config({**config, **extra})
        sampler = sampler_from_diffusers_config({**dict(sched.config), "_class_name": scheduler})
    out = cls(**{**pipe.components, "scheduler": sched})
    out.set_progress_bar_config(disable=True)
    return out, sampler


def _bound_pipe(pipe):
    """For the tolerances: every text encoder as the text network."""
    encoders = [getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2")]
    return types.SimpleNamespace(scheduler=pipe.scheduler, unet=pipe.unet, vae=pipe.vae,
                                 text_encoder=torch.nn.ModuleList(
                                     [m for m in encoders if m is not None]))


def _compare(pipe, sd, module, sampler, *, strength, steps, scale, label, **kw):
    image, mask, noise = _inputs()
    with _patched_randn(module, [noise]), \
            _patched_randn("diffusers.models.autoencoders.vae"):
        ref = pipe(PROMPTS, image=image, mask_image=mask[None, :, :, None], strength=strength,
                   num_inference_steps=steps, guidance_scale=scale, height=32, width=32,
                   output_type="np", **kw).images
    out = generate(sd, PROMPTS, image=image, mask_image=mask, strength=strength,
                   num_steps=steps, guidance_scale=scale, latents=noise, sample_posterior=False,
                   sampler=sampler, seed=0, **kw)
    err = float(np.abs(out.float_images - ref).max())
    print(f"parity inpaint {label} image max err {err:.2e}")
    with torch.no_grad():  # the bound scales with the VAE's unclamped output
        dec = pipe.vae.decode(_nchw(out.latents) / pipe.vae.config.scaling_factor).sample
    shim = _bound_pipe(pipe)
    bound = pipeline_rtol(shim, scale, encode=True)
    within(err, image_atol(shim, bound, out.latents, dec.numpy()), "images")
    assert err <= 1e-5
    return out, ref


@pytest.mark.parametrize("scheduler,strength", [
    (None, 1.0),                        # the folder's DDIM, from pure noise
    ("EulerDiscreteScheduler", 0.6),    # sigma space, from the noised image
])
def test_inpaint_4_channel_unet_blends(sd4, scheduler, strength):
    pipe, sd = sd4
    pipe, sampler = _inpaint_pipe(pipe, diffusers.StableDiffusionInpaintPipeline, scheduler)
    _compare(pipe, sd, SD_MODULE, sampler, strength=strength, steps=5, scale=7.5,
             label=f"4ch {scheduler or 'DDIM'} strength {strength}", negative_prompt=NEGATIVES)


@pytest.mark.parametrize("scheduler,strength,scale", [
    (None, 1.0, 7.5),                   # DDIM, guided
    ("PNDMScheduler", 0.6, 1.0),        # PLMS (SD 1.5 inpainting's scheduler), unguided
])
def test_inpaint_9_channel_unet(sd9, scheduler, strength, scale):
    pipe, sd = sd9
    assert sd.unet_config.in_channels == 9
    extra = dict(skip_prk_steps=True) if scheduler == "PNDMScheduler" else {}
    pipe, sampler = _inpaint_pipe(pipe, diffusers.StableDiffusionInpaintPipeline, scheduler,
                                  **extra)
    assert scheduler is None or sampler.name == "pndm" and sampler.options["skip_prk_steps"]
    _compare(pipe, sd, SD_MODULE, sampler, strength=strength, steps=4, scale=scale,
             label=f"9ch {scheduler or 'DDIM'} strength {strength}")


@pytest.fixture(scope="module")
def xl_refiner(tmp_path_factory):
    return _write(tmp_path_factory, "xlr", write_tiny_stable_diffusion_xl, seed=1, refiner=True)


def _sdxl(pipe, sd, which, **kw):
    """SDXL's inpainting with the folder's Euler, strength 0.8."""
    flags = {k: pipe.config[k] for k in ("force_zeros_for_empty_prompt",
                                         "requires_aesthetics_score") if k in pipe.config}
    pipe = diffusers.StableDiffusionXLInpaintPipeline(**pipe.components, **flags)
    pipe.set_progress_bar_config(disable=True)
    _compare(pipe, sd, XL_MODULE, None, strength=0.8, steps=4, scale=5.0,
             label=f"SDXL {which} 4ch Euler strength 0.8", **kw)


def test_inpaint_sdxl_base(xl4):
    """The base folder: both text encoders, image-to-image micro-conditioning rules."""
    _sdxl(*xl4, "base")


def test_inpaint_sdxl_refiner(xl_refiner):
    """A refiner folder (``requires_aesthetics_score``, ``text_encoder_2`` only) with its
    aesthetic scores."""
    _sdxl(*xl_refiner, "refiner", aesthetic_score=7.0, negative_aesthetic_score=1.0)
