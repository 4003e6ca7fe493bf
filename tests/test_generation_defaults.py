"""``jaxdiff_generation.json``: the settings a folder was measured with. Written and read back
unchanged; every unknown key or bad value is one ``ValueError`` line naming the file and the
key; :func:`crop_images` cuts the recorded box. No model here (the folders that carry the file:
tests/test_export_diffusers.py, tests/test_text_to_image.py, tests/parity/test_export_parity.py
for diffusers ignoring it)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jaxdiff.pipelines import (
    GENERATION_DEFAULTS_FILE,
    GenerationDefaults,
    crop_images,
    read_generation_defaults,
    write_generation_defaults,
)
from jaxdiff.samplers import get_sampler

FULL = {"sampler": "dpmpp_2m", "sampler_options": {"sigma_schedule": "karras"},
        "num_steps": 25, "guidance_scale": 3.0, "height": 32, "width": 32,
        "crop": [2, 2, 28, 28]}


def test_written_file_reads_back_and_holds_only_what_was_recorded(tmp_path):
    d = GenerationDefaults.from_json(FULL)
    path = write_generation_defaults(tmp_path, d)
    assert path == os.path.join(tmp_path, GENERATION_DEFAULTS_FILE)
    assert json.load(open(path)) == FULL
    back = read_generation_defaults(tmp_path)
    assert back == d and back.crop == (2, 2, 28, 28) and back.guidance_scale == 3.0
    assert back.describe() == "sampler dpmpp_2m, 25 steps, guidance 3, 32x32, crop 28x28 at (2, 2)"
    write_generation_defaults(tmp_path, GenerationDefaults(num_steps=7))
    assert json.load(open(path)) == {"num_steps": 7}
    assert read_generation_defaults(tmp_path / "elsewhere") is None   # no file: no defaults


@pytest.mark.parametrize("name, options", [
    ("ddim", {"eta": 0.3, "spacing": "trailing", "steps_offset": 1}),
    ("dpmpp_2m_karras", {}),                # a preset: its fixed options are in its name
    ("euler", {"sigma_schedule": "karras"}),
])
def test_from_sampler_gives_back_the_same_sampler(tmp_path, name, options):
    sampler = get_sampler(name, **options)
    d = GenerationDefaults.from_sampler(sampler, num_steps=10)
    write_generation_defaults(tmp_path, d)
    back = read_generation_defaults(tmp_path)
    again = get_sampler(back.sampler, **back.sampler_options)
    assert again.name == sampler.name and dict(again.options) == dict(sampler.options)


@pytest.mark.parametrize("data, needle", [
    ({"steps": 25}, "unknown key 'steps'"),
    ({"num_steps": "25"}, "num_steps: expected an integer >= 1, got '25'"),
    ({"num_steps": 0}, "num_steps: expected an integer >= 1"),
    ({"num_steps": True}, "num_steps: expected an integer >= 1"),
    ({"guidance_scale": "high"}, "guidance_scale: expected a finite number"),
    ({"guidance_scale": float("inf")}, "guidance_scale: expected a finite number"),
    ({"sampler": "fancy"}, "sampler: expected one of"),
    ({"sampler_options": {"eta": 0.1}}, "sampler_options: given without sampler"),
    ({"sampler": "ddim", "sampler_options": {"order": 3}},
     "sampler_options: sampler 'ddim' does not take option 'order'"),
    ({"sampler": "ddim", "sampler_options": [1]}, "sampler_options: expected an object"),
    ({"height": 30, "width": 32}, "height: expected a multiple of 8"),
    ({"height": 32}, "height, width: give both or neither"),
    ({"crop": [2, 2, 28, 28]}, "crop: needs height and width"),
    ({"height": 32, "width": 32, "crop": [2, 2, 28]}, "crop: expected [top, left, height, width]"),
    ({"height": 32, "width": 32, "crop": [8, 2, 28, 28]},
     "crop: expected a box inside height x width = 32x32"),
    ({"height": 32, "width": 32, "crop": [2, 2, 28.0, 28]}, "crop: expected [top, left"),
])
def test_bad_files_are_one_line_naming_the_file_and_the_key(tmp_path, data, needle):
    path = tmp_path / GENERATION_DEFAULTS_FILE
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as e:
        read_generation_defaults(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and needle in msg and "\n" not in msg, msg


def test_a_file_that_is_not_a_json_object(tmp_path):
    path = tmp_path / GENERATION_DEFAULTS_FILE
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"^{path}: cannot read it as JSON"):
        read_generation_defaults(tmp_path)
    path.write_text("[25]")
    with pytest.raises(ValueError, match=f"^{path}: expected a JSON object, got list"):
        read_generation_defaults(tmp_path)
    with pytest.raises(ValueError, match="defaults must be a GenerationDefaults"):
        write_generation_defaults(tmp_path, FULL)


def test_crop_images_cuts_the_recorded_box():
    x = np.arange(2 * 32 * 32 * 3).reshape(2, 32, 32, 3)
    d = GenerationDefaults.from_json(FULL)
    out = crop_images(x, d.crop)
    assert out.shape == (2, 28, 28, 3)
    np.testing.assert_array_equal(out, x[:, 2:30, 2:30])
    np.testing.assert_array_equal(crop_images(x, (0, 4, 8, 16)), x[:, 0:8, 4:20])
    assert crop_images(x, None) is x
    with pytest.raises(ValueError, match="inside the images' 32x32"):
        crop_images(x, (2, 2, 31, 28))
    with pytest.raises(ValueError, match=r"images must be \[N, H, W, C\]"):
        crop_images(x[0], d.crop)
