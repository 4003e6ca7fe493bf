"""Loading SDXL folders into :class:`~jaxdiff.pipelines.StableDiffusion` (base and refiner), and
the one-line errors for bad folders and bad SDXL arguments. The images themselves are checked
against diffusers in tests/parity/test_sdxl_pipeline_parity.py."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from experiments import text_to_image  # noqa: E402
from jaxdiff.pipelines import generate, load_stable_diffusion  # noqa: E402
from jaxdiff.pipelines.tiny import write_tiny_stable_diffusion_xl  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_load")
    base, refiner = str(root / "base"), str(root / "refiner")
    write_tiny_stable_diffusion_xl(base, unet_channels=(16, 32))
    write_tiny_stable_diffusion_xl(refiner, refiner=True, unet_channels=(16, 32))
    return base, refiner


@pytest.fixture(scope="module")
def loaded(folders):
    return tuple(load_stable_diffusion(f) for f in folders)


def _edit(path, remove=(), **changes):
    with open(path) as f:
        d = json.load(f)
    d.update(changes)
    for k in remove:
        d.pop(k)
    with open(path, "w") as f:
        json.dump(d, f)


def _copy(folder, tmp_path, name="copy"):
    dst = str(tmp_path / name)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(folder, dst)
    return dst


def test_loads_base_and_refiner(loaded):
    base, refiner = loaded
    assert base.is_sdxl and refiner.is_sdxl
    assert base.pipeline_class == "StableDiffusionXLPipeline"
    assert (base.force_zeros_for_empty_prompt, base.requires_aesthetics_score) == (True, False)
    assert (refiner.force_zeros_for_empty_prompt, refiner.requires_aesthetics_score) == (False,
                                                                                       True)
    assert set(base.params) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert set(refiner.params) == {"unet", "vae", "text_encoder_2"}
    assert refiner.text_config is None and refiner.tokenizer is None
    assert base.text_config_2.projection_dim == 16
    assert base.unet_config.context_dim == (base.text_config.hidden_size
                                            + base.text_config_2.hidden_size)
    assert refiner.unet_config.context_dim == refiner.text_config_2.hidden_size
    assert base.tokenizer_2.pad_token_id == 0  # "!"
    assert base.sampler.name == "euler"


def test_bad_folders(folders, tmp_path):
    base, refiner = folders
    copy = _copy(base, tmp_path)
    _edit(os.path.join(copy, "model_index.json"), remove=("text_encoder_2",))
    with pytest.raises(ValueError, match="text_encoder_2 is missing or null: an SDXL folder"):
        load_stable_diffusion(copy)
    copy = _copy(refiner, tmp_path)
    _edit(os.path.join(copy, "model_index.json"),
          text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers",
                                                                      "CLIPTokenizer"])
    with pytest.raises(ValueError, match="has no text_encoder/ folder"):
        load_stable_diffusion(copy)
    copy = _copy(refiner, tmp_path)
    _edit(os.path.join(copy, "model_index.json"),
          text_encoder=["transformers", "CLIPTextModel"])
    with pytest.raises(ValueError, match="text_encoder is named but tokenizer is null"):
        load_stable_diffusion(copy)
    copy = _copy(refiner, tmp_path)  # a refiner's UNet (5 time ids) read as a base model's
    _edit(os.path.join(copy, "model_index.json"), requires_aesthetics_score=False)
    with pytest.raises(ValueError, match="set requires_aesthetics_score = true"):
        load_stable_diffusion(copy)
    copy = _copy(base, tmp_path)
    _edit(os.path.join(copy, "unet", "config.json"), addition_embed_type=None)
    with pytest.raises(ValueError, match="an SDXL UNet needs 'text_time'"):
        load_stable_diffusion(copy)
    copy = _copy(base, tmp_path)
    _edit(os.path.join(copy, "model_index.json"), force_zeros_for_empty_prompt="yes")
    with pytest.raises(ValueError, match="force_zeros_for_empty_prompt must be true or false"):
        load_stable_diffusion(copy)


def test_bad_arguments(loaded):
    base, refiner = loaded
    kw = dict(num_steps=1, seed=0)
    cases = [
        (base, dict(original_size=(32, 32, 1)), "original_size must be a pair"),
        (base, dict(crops_coords_top_left=5), "crops_coords_top_left must be a pair"),
        (base, dict(aesthetic_score=6.0), "aesthetic_score is used only by a refiner"),
        (base, dict(height=36), "height must be a multiple of 8"),
        (base, dict(prompt_embeds=None, negative_prompt_embeds=[[[0.0]]]),
         "not supported for SDXL"),
        (refiner, dict(prompt_2="a dog"), "prompt_2 is for a second tokenizer"),
        (refiner, dict(target_size=(32, 32)), "target_size / negative_target_size are not used"),
    ]
    for sd, extra, match in cases:
        with pytest.raises(ValueError, match=match):
            generate(sd, "a cat", **{**kw, **extra})


@pytest.mark.slow  # a generation through the command line (compiles the SDXL program)
def test_command_line(folders, tmp_path, capsys):
    """text_to_image loads an SDXL folder with the same flags, plus SDXL's; SDXL's flags for an SD
    folder, and bad pairs, are one ``error:`` line (exit 2)."""
    base, refiner = folders
    out = tmp_path / "cat.png"
    images = text_to_image.main(["--model", base, "--prompt", "a cat", "--steps", "2",
                                 "--guidance_scale", "5", "--original_size", "64,64",
                                 "--crops_coords_top_left", "0,8", "--negative_prompt", "dog",
                                 "--prompt_2", "the cat", "--out", str(out)])
    assert images.shape == (1, 32, 32, 3) and out.is_file()
    with pytest.raises(SystemExit) as e:
        text_to_image.cli_main(["--model", base, "--prompt", "a cat", "--steps", "2",
                                "--aesthetic_score", "6", "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: aesthetic_score is used only by a refiner (model_index.json "
                   "requires_aesthetics_score: true); this model's is false"]


@pytest.mark.slow  # two diffusers pipelines loaded and run per case
@pytest.mark.parametrize("which", ["base", "refiner"])
def test_export_round_trip(folders, tmp_path, which):
    """jaxdiff -> folder: diffusers loads it and gives the same images as from the original
    folder (same weights, float32: equal); folder -> jaxdiff gives the same params, bit for
    bit, and the same flags."""
    import diffusers
    import jax
    import torch

    from jaxdiff.pipelines import export_stable_diffusion

    from jaxdiff.pipelines import GenerationDefaults

    folder = folders[0] if which == "base" else folders[1]
    sd = load_stable_diffusion(folder)
    if which == "base":  # a Turbo-like folder says how it wants to be sampled
        sd = sd.replace(generation_defaults=GenerationDefaults(num_steps=1, guidance_scale=0.0))
    out = export_stable_diffusion(sd, str(tmp_path / "exported"))
    back = load_stable_diffusion(out)
    assert back.generation_defaults == sd.generation_defaults   # None for the refiner
    assert os.path.isfile(os.path.join(out, "jaxdiff_generation.json")) == (which == "base")
    assert jax.tree.structure(back.params) == jax.tree.structure(sd.params)
    for a, b in zip(jax.tree.leaves(sd.params), jax.tree.leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for name in ("unet_config", "vae_config", "text_config", "text_config_2", "pipeline_class",
                 "force_zeros_for_empty_prompt", "requires_aesthetics_score", "sample_size"):
        assert getattr(back, name) == getattr(sd, name), name
    cls = (diffusers.StableDiffusionXLPipeline if which == "base"
           else diffusers.StableDiffusionXLImg2ImgPipeline)
    pipes = [cls.from_pretrained(f) for f in (folder, out)]
    lat = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(
        np.float32))
    kw = dict(num_inference_steps=2, guidance_scale=5.0, output_type="np")
    if which == "base":
        kw.update(latents=lat, height=32, width=32)
    else:
        kw.update(image=np.full((1, 32, 32, 3), 0.5, np.float32), strength=0.9,
                  generator=torch.Generator().manual_seed(0))
    images = []
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
        if which != "base":
            kw["generator"] = torch.Generator().manual_seed(0)
        images.append(pipe("a cat", **kw).images)
    np.testing.assert_array_equal(images[0], images[1])


def test_denoising_split_steps_and_errors(loaded):
    """The steps each side of the hand-off runs (Euler's leading grid, 5 steps: 801, 601, 401,
    201, 1; cutoff round(1000 - 0.7 * 1000) = 300), and the one-line errors."""
    from jaxdiff.pipelines.denoising_split import denoising_split
    from jaxdiff.samplers import get_sampler
    from jaxdiff.samplers.img2img import img2img_start_step

    sd = loaded[0]
    s = denoising_split(sd.sampler, sd.schedule, 5, denoising_end=0.7)
    assert (s.strength, s.start, s.end, s.end_t) == (None, 0, 3, 201.0)  # 801, 601, 401 run
    s = denoising_split(sd.sampler, sd.schedule, 5, denoising_start=0.7)
    assert (s.start, s.end) == (3, None)  # 201, 1 run
    assert img2img_start_step(sd.sampler, sd.schedule, 5, s.strength) == 3
    s = denoising_split(sd.sampler, sd.schedule, 5, denoising_start=0.3, denoising_end=0.7)
    assert (s.start, s.end) == (1, 3)  # cutoffs 700 and 300: 601, 401 run
    cases = [
        (dict(denoising_end=1.0), "denoising_end must lie strictly between 0 and 1"),
        (dict(denoising_start=0.9999), "denoising_start=0.9999 keeps no step"),
        (dict(denoising_start=0.7, denoising_end=0.5), "must be larger than denoising_start"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            denoising_split(sd.sampler, sd.schedule, 5, **kw)
    with pytest.raises(ValueError, match="denoising_end is not supported with sampler 'heun'"):
        denoising_split(get_sampler("heun"), sd.schedule, 5, denoising_end=0.7)
    with pytest.raises(ValueError, match="denoising_start needs image: the latents"):
        generate(sd, "a cat", num_steps=5, denoising_start=0.7, seed=0)
    with pytest.raises(ValueError, match=r"image must be latents \[B, H/f, W/f, 4\]"):
        generate(sd, "a cat", num_steps=5, denoising_start=0.7, seed=0,
                 image=np.zeros((1, 32, 32, 3), np.float32))
