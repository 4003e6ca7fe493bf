"""``python -m experiments.text_to_image`` as a new user meets it: every user error is ONE line
``error: ...`` naming the flag or file, with exit status 2, and what can be checked before the
work (flags, output path, init image) is checked before the model is loaded. A tiny random folder
written by diffusers (``jaxdiff.pipelines.tiny``)."""

from __future__ import annotations

import json
import re
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import jax

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import jaxdiff.pipelines  # noqa: E402
from experiments import text_to_image  # noqa: E402
from jaxdiff.pipelines.tiny import write_tiny_stable_diffusion  # noqa: E402


pytestmark = pytest.mark.slow  # > 1.5 s a test on 2 cores (a tiny diffusers folder; generates)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_sd_cli") / "sd")
    write_tiny_stable_diffusion(path)
    return path


def _error(capsys, argv):
    """The one stderr line of a refused command (exit status 2)."""
    with pytest.raises(SystemExit) as e:
        text_to_image.cli_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if the model would be loaded (the error must come before the work)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")
    monkeypatch.setattr(jaxdiff.pipelines, "load_stable_diffusion", refuse)


def test_flag_errors_come_before_any_work(folder, tmp_path, capsys, no_loading):
    base = ["--model", folder, "--prompt", "a cat", "--steps", "2"]
    a_file = tmp_path / "file.txt"
    a_file.write_text("")
    cases = {
        "--strength needs --init_image": ["--strength", "0.5"],
        "--width must lie in [8, --max_image_side=8192], got 800000": ["--width", "800000"],
        "--height must lie in [8, --max_image_side=64], got 128": ["--height", "128",
                                                                   "--max_image_side", "64"],
        "--out 'x' has no extension": ["--out", "x"],
        "is a file, not a directory": ["--out", str(a_file / "x.png")],
        "--negative_prompt has no effect with --guidance_scale 1": [
            "--negative_prompt", "dog", "--guidance_scale", "1"],
        "--init_image: give both --height and --width": [
            "--init_image", str(a_file), "--height", "32"],
        "--steps must be >= 1": ["--steps", "0"],
        "--guidance_scale must be a finite number, got nan": ["--guidance_scale", "nan"],
        "--option needs --sampler": ["--option", "eta=0.5"],
        "--height must be a multiple of 8, got 36": ["--height", "36"],
        "--original_size must be two ints >= 0 as A,B": ["--original_size", "1024"],
        "--negative_target_size must be two ints >= 0 as A,B": [
            "--negative_target_size", "a,b"],
    }
    for expected, extra in cases.items():
        assert expected in _error(capsys, base + extra), expected
    assert "--model is required" in _error(capsys, ["--prompt", "x"])
    assert "--prompt is required" in _error(capsys, ["--model", folder])
    msg = _error(capsys, base + ["--init_image", str(tmp_path / "nope.png")])
    assert msg.startswith("error: --init_image ") and "nope.png" in msg


def test_folder_errors_spell_the_flags(folder, tmp_path, capsys):
    base = ["--prompt", "a cat", "--steps", "2", "--out", str(tmp_path / "o.png")]
    msg = _error(capsys, ["--model", folder, "--variant", "fp16"] + base)
    assert msg.endswith("leave out --variant") and "variant=None" not in msg, msg
    copy = str(tmp_path / "copy")
    shutil.copytree(folder, copy)
    cfg = os.path.join(copy, "scheduler", "scheduler_config.json")
    with open(cfg) as f:
        data = json.load(f)
    with open(cfg, "w") as f:
        json.dump({**data, "_class_name": "FancyUnknownScheduler"}, f)
    msg = _error(capsys, ["--model", copy] + base)
    assert "pass --sampler dpmpp_2m" in msg and "sampler=" not in msg, msg
    msg = _error(capsys, ["--model", folder, "--steps", "5000"] + base[:2])
    assert "--steps must be <= 1000" in msg, msg
    msg = _error(capsys, ["--model", os.path.join(folder, "unet")] + base)
    assert "has no model_index.json" in msg
    msg = _error(capsys, ["--model", folder, "--original_size", "64,64"] + base)
    assert msg.startswith("error: original_size is an SDXL argument: this model has no "
                          "text_encoder_2"), msg


def test_out_of_memory_is_one_line(folder, tmp_path, capsys, monkeypatch):
    def oom(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 3e14 "
                                         "bytes.\nmore detail")
    monkeypatch.setattr(jaxdiff.pipelines, "generate", oom)
    msg = _error(capsys, ["--model", folder, "--prompt", "a cat", "--out",
                          str(tmp_path / "o.png")])
    assert "out of memory" in msg and "--height" in msg and "RESOURCE_EXHAUSTED" in msg


def test_empty_prompt_and_an_init_image_of_any_size(folder, tmp_path):
    out = str(tmp_path / "empty.png")
    images = text_to_image.main(["--model", folder, "--prompt", "", "--steps", "2",
                                 "--out", out])
    assert images.shape == (1, 32, 32, 3) and os.path.isfile(out)
    src = str(tmp_path / "in.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 100, 3), np.uint8)).save(src)
    out = str(tmp_path / "i2i.webp")
    images = text_to_image.main(["--model", folder, "--prompt", "a cat", "--steps", "2",
                                 "--init_image", src, "--strength", "0.5", "--out", out])
    assert images.shape == (1, 32, 96, 3)   # 37x100 rounded down to multiples of 8, as diffusers
    assert Image.open(out).size == (96, 32) and Image.open(out).format == "WEBP"


@pytest.fixture(scope="module")
def with_defaults(folder, tmp_path_factory):
    """The tiny folder with a jaxdiff_generation.json: euler, 2 steps, guidance 1.5, 32x32, the
    crop (4, 0, 16, 32)."""
    path = str(tmp_path_factory.mktemp("with_defaults") / "sd")
    shutil.copytree(folder, path)
    jaxdiff.pipelines.write_generation_defaults(path, jaxdiff.pipelines.GenerationDefaults(
        sampler="euler", num_steps=2, guidance_scale=1.5, height=32, width=32,
        crop=(4, 0, 16, 32)))
    return path


def test_the_folder_defaults_fill_the_flags_not_given_and_crop(with_defaults, tmp_path, capsys,
                                                               caplog):
    out = str(tmp_path / "o.png")
    base = ["--model", with_defaults, "--prompt", "a cat", "--out", out]
    with caplog.at_level(logging.INFO, logger="experiments.text_to_image"):
        images = text_to_image.main(base)
    said = [r.getMessage() for r in caplog.records if "jaxdiff_generation.json" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith(
        "jaxdiff_generation.json: --sampler euler, --steps 2, --guidance_scale 1.5, --height 32, "
        "--width 32 (flags given override them)"), said
    printed = capsys.readouterr().out
    assert "euler, 2 steps, guidance 1.5, cropped to 16x32 at (4, 0)" in printed, printed
    assert images.shape == (1, 16, 32, 3) and Image.open(out).size == (32, 16)
    whole = text_to_image.main(base + ["--nocrop"])
    np.testing.assert_array_equal(whole[:, 4:20], images)     # the same image, cropped
    # flags given win, and only the others come from the folder
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="experiments.text_to_image"):
        other = text_to_image.main(base + ["--sampler", "ddim", "--steps", "3", "--height", "40"])
    said = [r.getMessage() for r in caplog.records if "jaxdiff_generation.json" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith(": --guidance_scale 1.5, --width 32 (flags given "
                                               "override them)"), said
    assert "ddim, 3 steps, guidance 1.5)" in capsys.readouterr().out
    assert other.shape == (1, 40, 32, 3)                 # not the recorded size: not cropped
    assert any("crop is for 32x32 images, not applied to 40x32" in r.getMessage()
               for r in caplog.records)


def test_a_bad_defaults_file_is_one_line_before_loading(with_defaults, tmp_path, capsys,
                                                        no_loading):
    copy = str(tmp_path / "bad")
    shutil.copytree(with_defaults, copy)
    with open(os.path.join(copy, "jaxdiff_generation.json"), "w") as f:
        json.dump({"num_steps": 2, "sampler": "fancy"}, f)
    msg = _error(capsys, ["--model", copy, "--prompt", "a cat", "--out", str(tmp_path / "o.png")])
    assert msg.startswith(f"error: --model: {copy}/jaxdiff_generation.json: sampler: expected "
                          "one of"), msg


def test_controlnet_flags(folder, tmp_path, capsys):
    """``--controlnet`` / ``--control_image`` / ``--control_scale``: the image written is
    :func:`~jaxdiff.pipelines.generate`'s with the loaded ControlNet at that scale (a random
    ControlNet: scale 0 gives another image), and count / path mistakes are one line before any
    loading."""
    from jaxdiff.pipelines.tiny import write_tiny_controlnet

    cn = str(tmp_path / "cn")
    write_tiny_controlnet(cn, folder, seed=3)
    control = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(control).save(tmp_path / "edges.png")
    edges, out = str(tmp_path / "edges.png"), str(tmp_path / "img.png")
    base = ["--model", folder, "--prompt", "a cat", "--steps", "2", "--seed", "1", "--out", out]
    images = text_to_image.main(base + ["--controlnet", cn, "--control_image", edges,
                                        "--control_scale", "0.5"])
    sd = jaxdiff.pipelines.load_stable_diffusion(folder)
    kw = dict(num_steps=2, guidance_scale=7.5, seed=1, control_image=control,
              controlnet=jaxdiff.pipelines.load_controlnet(cn))
    ref = jaxdiff.pipelines.generate(sd, ["a cat"], controlnet_conditioning_scale=0.5, **kw)
    np.testing.assert_array_equal(images, ref.images)
    off = jaxdiff.pipelines.generate(sd, ["a cat"], controlnet_conditioning_scale=0.0, **kw)
    assert np.abs(images.astype(int) - off.images).max() > 0  # the same program, scale traced
    for extra, match in [
        (["--controlnet", cn], "--control_image given 0 times for 1 --controlnet"),
        (["--controlnet", cn, "--controlnet", cn, "--control_image", edges],
         "--control_image given 1 times for 2"),
        (["--controlnet", cn, "--control_image", edges, "--control_scale", "1",
          "--control_scale", "2"], "--control_scale given 2 times for 1"),
        (["--controlnet", cn, "--control_image", str(tmp_path / "no.png")],
         "--control_image .*no such file"),
        (["--controlnet", str(tmp_path / "none"), "--control_image", edges],
         "--controlnet .*no such folder"),
        (["--control_image", edges], "--control_image needs --controlnet"),
    ]:
        line = _error(capsys, base + extra)
        assert re.search(match, line), (line, match)
