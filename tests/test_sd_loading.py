"""Loading a Stable Diffusion folder: what a downloaded folder must not be able to do (a sharded
index naming files outside its folder), sharded and variant files as diffusers writes them, the
tokenizer checked against the text encoder (ids beyond its vocabulary would give a silently
wrong image), and errors whose remedy the caller spells its own way (``LoadOptionError``)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import jax

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from jaxdiff.models.clip_text_config import CLIPTextConfig  # noqa: E402
from jaxdiff.pipelines import (  # noqa: E402
    LoadOptionError,
    check_tokenizer,
    load_stable_diffusion,
)
from jaxdiff.pipelines.checkpoint_files import read_weights  # noqa: E402
from jaxdiff.pipelines.tiny import write_tiny_stable_diffusion, write_tiny_tokenizer  # noqa: E402
from jaxdiff.text import CLIPTokenizer  # noqa: E402

STEM = ("diffusion_pytorch_model",)


pytestmark = pytest.mark.slow  # > 1.5 s a test on 2 cores (writes a tiny diffusers folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_sd_loading") / "sd")
    pipe = write_tiny_stable_diffusion(path)
    return path, pipe


@pytest.fixture
def copy(tiny, tmp_path):
    dst = str(tmp_path / "model")
    shutil.copytree(tiny[0], dst)
    return dst


def _shard(unet_dir, names):
    """Replace unet/'s weights by two safetensors shards saved under ``names`` (relative to
    unet/, as the index will name them) and an index naming them; returns the index path."""
    from safetensors.numpy import load_file, save_file

    src = os.path.join(unet_dir, "diffusion_pytorch_model.safetensors")
    tensors = load_file(src)
    os.remove(src)
    keys = sorted(tensors)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for name, part in zip(names, halves):
        path = os.path.normpath(os.path.join(unet_dir, name))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file({k: tensors[k] for k in part}, path)
        weight_map.update({k: name for k in part})
    index = os.path.join(unet_dir, "diffusion_pytorch_model.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return index


def _leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_sharded_index_inside_the_folder_loads(tiny, copy):
    ref = load_stable_diffusion(tiny[0])
    unet = os.path.join(copy, "unet")
    _shard(unet, ["part-1.safetensors", "sub/part-2.safetensors"])
    # a shard that is a symbolic link to a file elsewhere (the Hugging Face cache's layout)
    blob = os.path.join(copy, "blob")
    shutil.move(os.path.join(unet, "part-1.safetensors"), blob)
    os.symlink(blob, os.path.join(unet, "part-1.safetensors"))
    sd = load_stable_diffusion(copy)
    assert _leaves_equal(sd.params["unet"], ref.params["unet"])


@pytest.mark.parametrize("bad", ["../outside.safetensors", "sub/../../outside.safetensors",
                                 "ABSOLUTE", "..\\outside.safetensors", "linked/x.safetensors"])
def test_sharded_index_cannot_name_files_outside_the_folder(copy, bad):
    unet = os.path.join(copy, "unet")
    outside = os.path.join(copy, "outside.safetensors")      # exists: refused, not "not found"
    index = _shard(unet, ["part-1.safetensors", "part-2.safetensors"])
    shutil.copy(os.path.join(unet, "part-2.safetensors"), outside)
    os.makedirs(os.path.join(copy, "elsewhere"))
    shutil.copy(outside, os.path.join(copy, "elsewhere", "x.safetensors"))
    os.symlink(os.path.join(copy, "elsewhere"), os.path.join(unet, "linked"))  # dir link out
    bad = outside if bad == "ABSOLUTE" else bad
    with open(index) as f:
        data = json.load(f)
    data["weight_map"] = {k: (bad if v == "part-2.safetensors" else v)
                          for k, v in data["weight_map"].items()}
    with open(index, "w") as f:
        json.dump(data, f)
    with pytest.raises(ValueError, match="is not a file inside .*; refusing to read it") as e:
        read_weights(unet, STEM, None)
    assert str(e.value).startswith(index) and repr(bad) in str(e.value)  # the file and entry
    with pytest.raises(ValueError, match="refusing to read it"):
        load_stable_diffusion(copy)


def test_sharded_index_errors_name_the_index(copy):
    unet = os.path.join(copy, "unet")
    index = _shard(unet, ["part-1.safetensors", "part-2.safetensors"])
    os.remove(os.path.join(unet, "part-2.safetensors"))
    with pytest.raises(ValueError, match=r"index.json: a shard it names is missing .*part-2"):
        read_weights(unet, STEM, None)
    for bad in ({"metadata": {}}, ["not", "an", "object"]):
        with open(index, "w") as f:
            json.dump(bad, f)
        with pytest.raises(ValueError, match='index.json: expected a JSON object with a "weight_'):
            read_weights(unet, STEM, None)


def test_variant_files_as_diffusers_writes_them(tiny, tmp_path):
    """diffusers names a sharded variant's index <stem>.safetensors.index.<variant>.json."""
    path, pipe = tiny
    unet = str(tmp_path / "unet")
    pipe.unet.save_pretrained(unet, max_shard_size="100KB", variant="fp16")
    names = os.listdir(unet)
    assert "diffusion_pytorch_model.safetensors.index.fp16.json" in names, names
    ref = load_stable_diffusion(path)
    state = read_weights(unet, STEM, "fp16")
    from jaxdiff.convert.diffusers_unet import convert_unet_state_dict
    assert _leaves_equal(convert_unet_state_dict(state, ref.unet_config), ref.params["unet"])
    with pytest.raises(LoadOptionError) as e:
        read_weights(unet, STEM, None)                  # only the fp16 variant is there
    assert (e.value.option, e.value.value) == ("variant", "fp16")


def test_variant_errors_suggest_the_variant_present(copy):
    with pytest.raises(LoadOptionError) as e:
        load_stable_diffusion(copy, variant="fp16")     # only the plain files are there
    err = e.value
    assert (err.option, err.value) == ("variant", None)
    assert "variant='fp16': no weights file" in str(err) and "the plain files" in str(err)
    assert str(err).endswith("pass variant=None")
    flag = err.message(lambda o, v: f"leave out --{o}" if v is None else f"pass --{o} {v}")
    assert flag.endswith("leave out --variant") and "variant=None" not in flag
    for bad in ("../x", "fp16/..", "", 16):
        with pytest.raises(ValueError, match="variant must be None or a name"):
            load_stable_diffusion(copy, variant=bad)


def test_scheduler_without_a_sampler_names_the_option(copy):
    cfg = os.path.join(copy, "scheduler", "scheduler_config.json")
    with open(cfg) as f:
        data = json.load(f)
    data["_class_name"] = "FancyUnknownScheduler"
    with open(cfg, "w") as f:
        json.dump(data, f)
    with pytest.raises(LoadOptionError) as e:
        load_stable_diffusion(copy)
    assert (e.value.option, e.value.value) == ("sampler", "dpmpp_2m")
    assert "pass sampler='dpmpp_2m'" in str(e.value)
    assert "pass --sampler dpmpp_2m" in e.value.message(lambda o, v: f"pass --{o} {v}")


def test_tokenizer_must_fit_the_text_encoder(tmp_path):
    tok = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(str(tmp_path / "tok"), 16))
    n = tok.vocab_size
    check_tokenizer(tok, CLIPTextConfig(vocab_size=n, max_position_embeddings=16))  # fits
    with pytest.raises(ValueError, match=rf"ids up to {n - 1} \(among them bos_token=.*"
                                         rf"eos_token=.*vocab_size is {n - 2}"):
        check_tokenizer(tok, CLIPTextConfig(vocab_size=n - 2, max_position_embeddings=16))
    with pytest.raises(ValueError, match="pads prompts to 16 tokens .* 8 positions"):
        check_tokenizer(tok, CLIPTextConfig(vocab_size=n, max_position_embeddings=8))


def test_load_refuses_a_tokenizer_from_another_model(copy, tmp_path):
    tok_dir = os.path.join(copy, "tokenizer")
    with open(os.path.join(tok_dir, "tokenizer.json")) as f:
        data = json.load(f)
    vocab = data["model"]["vocab"]
    vocab["zzzz"] = max(vocab.values()) + 1     # one more id than the encoder has rows
    data["model"]["merges"].append("zz zz")
    vocab["zz"] = max(vocab.values()) + 1
    with open(os.path.join(tok_dir, "tokenizer.json"), "w") as f:
        json.dump(data, f)
    with pytest.raises(ValueError, match=r"tokenizer' does not fit .*text_encoder'.*vocab_size"):
        load_stable_diffusion(copy)
    shutil.rmtree(tok_dir)
    write_tiny_tokenizer(tok_dir, max_length=77)  # more positions than the encoder's 16
    with pytest.raises(ValueError, match="pads prompts to 77 tokens .* 16 positions"):
        load_stable_diffusion(copy)


def test_folder_errors_name_the_folder(copy, tmp_path):
    with pytest.raises(ValueError, match="has no model_index.json"):
        load_stable_diffusion(os.path.join(copy, "unet"))
    with pytest.raises(ValueError, match="is not a folder"):
        load_stable_diffusion(os.path.join(copy, "model_index.json"))
    with open(os.path.join(copy, "model_index.json"), "w") as f:
        json.dump([1, 2], f)
    with pytest.raises(ValueError, match="model_index.json.*must hold a JSON object"):
        load_stable_diffusion(copy)


@pytest.mark.parametrize("part,change,expected", [
    ("unet/config.json", {"in_channels": "four"}, r"unet/config.json: in_channels must be an int"),
    ("unet/config.json", {"cross_attention_dim": 64},
     r"unet: weights: the state dict does not match the UNet config"),
    ("scheduler/scheduler_config.json", {"beta_schedule": "bogus"},
     r"scheduler/scheduler_config.json: config\['beta_schedule'\] = 'bogus'"),
    ("text_encoder/config.json", {"architectures": "CLIPTextModel"}, r"architectures .* not supp"),
    ("tokenizer/tokenizer_config.json", [1, 2], r"tokenizer_config.json' must hold a JSON object"),
])
def test_bad_files_are_named(copy, part, change, expected):
    path = os.path.join(copy, part)
    with open(path) as f:
        data = json.load(f)
    with open(path, "w") as f:
        json.dump({**data, **change} if isinstance(change, dict) else change, f)
    with pytest.raises(ValueError, match=expected) as e:
        load_stable_diffusion(copy)
    assert "/tmp" not in str(e.value).replace(copy, "COPY")   # never a temporary copy's name
