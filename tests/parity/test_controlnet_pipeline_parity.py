"""jaxdiff's :func:`~jaxdiff.pipelines.generate` with ControlNets against diffusers'
``StableDiffusionControlNetPipeline`` (and ``StableDiffusionXLControlNetPipeline``, last test)
on the SD parity tests' tiny random folder plus tiny random ``ControlNetModel`` folders
(``from_unet``, then every weight random so that the zero convolutions are not zero; written
with ``save_pretrained``, loaded by :func:`~jaxdiff.pipelines.load_controlnet` from disk),
float32, 32x32, 3 DDIM steps, the same initial latents.

Tolerances as the SD pipeline parity tests (tests/parity/tolerances.py): latents relative to
``max(1, max |latents|)`` within ``pipeline_rtol``, images within ``image_atol``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxdiff.pipelines import (  # noqa: E402
    PROGRAM_CACHE,
    generate,
    load_controlnet,
    load_stable_diffusion,
)
from jaxdiff.pipelines.tiny import write_tiny_stable_diffusion  # noqa: E402
from tests.parity.test_sd_pipeline_parity import _check_against_pipeline, _latents, _nchw  # noqa
from tests.parity.test_unet_parity import randomize  # noqa: E402

PROMPTS = ["a cat", "the dog of a cat"]
NEGATIVES = ["", "a dog"]


def write_tiny_controlnet(unet, path: str, seed: int) -> str:
    """A random ``ControlNetModel`` for ``unet`` saved in ``path`` (its weights all random)."""
    net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    randomize(net, seed=seed).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd_cn")
    pipe = write_tiny_stable_diffusion(str(root / "sd"), seed=0)
    folders = [write_tiny_controlnet(pipe.unet, str(root / f"cn{k}"), seed=10 + k)
               for k in range(2)]
    rng = np.random.default_rng(3)
    images = [rng.uniform(0, 1, (1, 32, 32, 3)).astype(np.float32) for _ in folders]
    return pipe, load_stable_diffusion(str(root / "sd")), folders, images


def test_load_controlnet_errors(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        load_controlnet(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="config.json"):
        load_controlnet(str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["plain", "guess_window", "multi"])
def test_controlnet_pipeline_parity(tiny, case):
    """The images and latents of ``StableDiffusionControlNetPipeline``: one ControlNet at scale
    0.7; guess mode with a window (ControlNet steps 1-2 of 3 only); two ControlNets with their
    own scales and windows. Guided (scale 7.5), batch 2, one control image repeated."""
    pipe, sd, folders, images = tiny
    models = [diffusers.ControlNetModel.from_pretrained(f).eval() for f in folders]
    kw_t = dict(guess_mode=case == "guess_window")
    if case == "plain":
        nets_t, nets_j, img, scale = models[0], load_controlnet(folders[0]), images[0], 0.7
        start, end = 0.0, 1.0
    elif case == "guess_window":
        nets_t, nets_j, img, scale = models[0], load_controlnet(folders[0]), images[0], 1.2
        start, end = 0.3, 1.0
    else:
        nets_t, nets_j, img = models, [load_controlnet(f) for f in folders], images
        scale, start, end = [0.7, 1.3], [0.0, 0.0], [1.0, 0.6]
    ref_pipe = diffusers.StableDiffusionControlNetPipeline(
        **{k: v for k, v in pipe.components.items() if k != "image_encoder"},
        controlnet=nets_t, image_encoder=None)
    ref_pipe.set_progress_bar_config(disable=True)
    lat = _latents(len(PROMPTS))
    ref_lat = ref_pipe(
        PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=3, guidance_scale=7.5,
        latents=_nchw(lat), height=32, width=32, output_type="latent",
        image=[_nchw(a) for a in img] if isinstance(img, list) else _nchw(img),
        controlnet_conditioning_scale=scale, control_guidance_start=start,
        control_guidance_end=end, **kw_t).images
    out = generate(sd, PROMPTS, NEGATIVES, num_steps=3, guidance_scale=7.5, latents=lat,
                   seed=0, controlnet=nets_j, control_image=img,
                   controlnet_conditioning_scale=scale, control_guidance_start=start,
                   control_guidance_end=end, guess_mode=case == "guess_window")
    _check_against_pipeline(ref_pipe, ref_lat, out, case, 7.5)
    plain = generate(sd, PROMPTS, NEGATIVES, num_steps=3, guidance_scale=7.5, latents=lat,
                     seed=0)
    assert np.abs(out.latents - plain.latents).max() > 1e-3  # the ControlNets steer
    if case == "plain":  # another ControlNet of the same config, another scale: no new program
        misses = PROGRAM_CACHE.stats()["misses"]
        other = generate(sd, PROMPTS, NEGATIVES, num_steps=3, guidance_scale=7.5, latents=lat,
                         seed=0, controlnet=load_controlnet(folders[1]), control_image=img,
                         controlnet_conditioning_scale=0.3)
        assert PROGRAM_CACHE.stats()["misses"] == misses
        assert np.abs(other.latents - out.latents).max() > 1e-3


@pytest.mark.slow
def test_sdxl_controlnet_pipeline_parity(tmp_path):
    """``StableDiffusionXLControlNetPipeline`` on the SDXL parity tests' tiny folder with an SDXL
    ``ControlNetModel`` (``from_unet``: the ``text_time`` added embedding, weights random), scale
    0.8, guided, micro-conditioning at its defaults, batch 2, the same initial latents."""
    from jaxdiff.pipelines.tiny import write_tiny_stable_diffusion_xl
    from tests.parity.test_sdxl_pipeline_parity import check_latents, latents, nchw

    pipe = write_tiny_stable_diffusion_xl(str(tmp_path / "sdxl"), seed=0)
    folder = write_tiny_controlnet(pipe.unet, str(tmp_path / "cn"), seed=12)
    sd = load_stable_diffusion(str(tmp_path / "sdxl"))
    net = diffusers.ControlNetModel.from_pretrained(folder).eval()
    ref_pipe = diffusers.StableDiffusionXLControlNetPipeline(
        **{k: v for k, v in pipe.components.items()
           if k not in ("image_encoder", "feature_extractor")}, controlnet=net)
    ref_pipe.set_progress_bar_config(disable=True)
    img = np.random.default_rng(5).uniform(0, 1, (1, 32, 32, 3)).astype(np.float32)
    lat = latents(len(PROMPTS))
    ref_lat = ref_pipe(PROMPTS, num_inference_steps=3, guidance_scale=5.0, latents=nchw(lat),
                       height=32, width=32, image=nchw(img), controlnet_conditioning_scale=0.8,
                       output_type="latent").images
    out = generate(sd, PROMPTS, num_steps=3, guidance_scale=5.0, latents=lat, seed=0,
                   controlnet=load_controlnet(folder), control_image=img,
                   controlnet_conditioning_scale=0.8)
    img_err, _ = check_latents(ref_pipe, ref_lat, out, 5.0)
    assert img_err <= 1e-5  # the bar, as the SDXL pipeline's parity tests
    plain = generate(sd, PROMPTS, num_steps=3, guidance_scale=5.0, latents=lat, seed=0)
    assert np.abs(out.latents - plain.latents).max() > 1e-3  # the ControlNet steers
