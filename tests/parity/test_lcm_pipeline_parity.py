"""An LCM-distilled UNet (``time_cond_proj_dim``, as LCM_Dreamshaper_v7) through jaxdiff's one
:func:`~jaxdiff.pipelines.generate` against diffusers' ``LatentConsistencyModelPipeline`` on a
tiny random SD 1.x folder written by ``save_pretrained``: the guidance scale goes in as the
UNet's guidance-scale embedding (``w_embedding``), with no classifier-free guidance. And an
LCM-SDXL folder (a ``text_time`` UNet with ``time_cond_proj_dim``, ``LCMScheduler``) against
``StableDiffusionXLPipeline``, which also passes the embedding and turns guidance off for such a
UNet.

Both sides get the same initial latents and the same re-noising draws between LCM steps
(``scheduling_lcm.randn_tensor`` patched). Tolerances as the SD pipeline's parity tests
(``pipeline_rtol`` with guidance weight 1: one UNet branch), and the issue's 1e-5 on images.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxdiff.convert.diffusers_scheduler import sampler_from_diffusers_config  # noqa: E402
from jaxdiff.pipelines import generate, load_stable_diffusion  # noqa: E402
from jaxdiff.pipelines.tiny import (  # noqa: E402
    write_tiny_stable_diffusion,
    write_tiny_stable_diffusion_xl,
)
from tests.parity.test_sdxl_pipeline_parity import (  # noqa: E402
    check_latents,
    latents,
    nchw,
    patched_randn,
)

pytestmark = pytest.mark.slow

PROMPTS = ["a cat", "the dog of a cat"]


@pytest.fixture(scope="module")
def lcm(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("lcm"))
    pipe = write_tiny_stable_diffusion(path, seed=3, unet_options={"time_cond_proj_dim": 16})
    config = {**dict(pipe.scheduler.config), "_class_name": "LCMScheduler"}
    ref = diffusers.LatentConsistencyModelPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        scheduler=diffusers.LCMScheduler.from_config(pipe.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    lcm_path = str(tmp_path_factory.mktemp("lcm_folder"))
    ref.save_pretrained(lcm_path)  # laid out as LCM_Dreamshaper_v7: LCMScheduler, LCM pipeline
    sd = load_stable_diffusion(lcm_path)
    assert sd.pipeline_class == "LatentConsistencyModelPipeline" and sd.sampler.name == "lcm"
    return ref, sd, sampler_from_diffusers_config(config)


def test_lcm_unet_takes_the_guidance_embedding(lcm):
    """At one scale (test_lcm_errors shows that the scale reaches the UNet)."""
    pipe, sd, sampler = lcm
    scale = 8.5
    steps = 3
    lat = latents(2)
    step_noise = np.random.default_rng(9).standard_normal((steps, 2, 16, 16, 4)).astype(
        np.float32)  # the re-noising between steps (the last row is unused)
    with patched_randn("diffusers.schedulers.scheduling_lcm", list(step_noise[:-1])):
        ref = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=scale, latents=nchw(lat),
                   height=32, width=32, output_type="latent").images
    out = generate(sd, PROMPTS, num_steps=steps, guidance_scale=scale, latents=lat,
                   noise=step_noise, sampler=sampler, seed=0)
    img_err, _ = check_latents(pipe, ref, out, 1.0)
    assert img_err <= 1e-5


def test_lcm_errors(lcm):
    _, sd, sampler = lcm
    kw = dict(num_steps=2, latents=latents(1), sampler=sampler, seed=0)
    a, b = (generate(sd, "a cat", guidance_scale=w, **kw).latents for w in (1.0, 8.5))
    assert np.abs(a - b).max() > 1e-3 * np.abs(a).max()  # the embedding reaches the UNet
    with pytest.raises(ValueError, match="negative_prompt is not used by an LCM-distilled UNet"):
        generate(sd, "a cat", "a dog", num_steps=1, seed=0)
    with pytest.raises(ValueError, match="guidance_rescale needs classifier-free guidance"):
        generate(sd, "a cat", num_steps=1, guidance_rescale=0.5, seed=0)


def test_lcm_sdxl(tmp_path):
    path = str(tmp_path / "lcm_sdxl")
    pipe = write_tiny_stable_diffusion_xl(path, seed=4, scheduler="LCMScheduler",
                                          unet_options={"time_cond_proj_dim": 16})
    sd = load_stable_diffusion(path)
    assert sd.is_sdxl and sd.sampler.name == "lcm" and sd.unet_config.time_cond_dim == 16
    steps = 2
    lat = latents(2)
    step_noise = np.random.default_rng(10).standard_normal((steps, 2, 16, 16, 4)).astype(
        np.float32)
    with patched_randn("diffusers.schedulers.scheduling_lcm", list(step_noise[:-1])):
        ref = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=6.0, latents=nchw(lat),
                   height=32, width=32, output_type="latent").images
    out = generate(sd, PROMPTS, num_steps=steps, guidance_scale=6.0, latents=lat,
                   noise=step_noise, seed=0)
    img_err, _ = check_latents(pipe, ref, out, 1.0)
    assert img_err <= 1e-5
