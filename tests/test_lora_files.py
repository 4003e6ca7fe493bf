"""LoRA files in and out (jaxdiff.convert.lora_files) on a small params tree laid out as a Stable
Diffusion's (UNet attention, 1x1 and 3x3 convs, CLIP attention): save -> read round trips,
diffusers / peft key layouts (current and older), kohya names resolved against the model, alpha
folded in, unknown keys listed, shape mismatches named, corrupt files refused, atomic writes,
and the ``--lora PATH[:SCALE]`` flag. Parity with diffusers' ``load_lora_weights`` is in
tests/parity/test_lora_parity.py."""

from __future__ import annotations

import json
import os
import struct

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from experiments.cli import ConfigError
from experiments.text_to_image import parse_lora_flag
from jaxdiff.convert import lora_format, lora_state_dict, lora_targets, read_lora, save_lora
from jaxdiff.validation import InvalidFileError

ATTN = ("down_blocks_1", "attentions_0", "transformer_blocks_0", "attn1", "to_q")
PROJ = ("down_blocks_1", "attentions_0", "proj_in")
CONV = ("mid_block", "resnets_0", "conv1")
TEXT = ("text_model", "encoder", "layers_0", "self_attn", "q_proj")


def _nest(flat):
    out = {}
    for path, value in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return out


@pytest.fixture(scope="module")
def params():
    rng = np.random.default_rng(0)
    unet = _nest({ATTN + ("kernel",): rng.normal(size=(8, 6)).astype(np.float32),
                  PROJ + ("kernel",): rng.normal(size=(1, 1, 6, 8)).astype(np.float32),
                  CONV + ("kernel",): rng.normal(size=(3, 3, 4, 8)).astype(np.float32),
                  CONV[:-1] + ("norm1", "scale"): np.ones(4, np.float32)})
    text = _nest({TEXT + ("kernel",): rng.normal(size=(8, 8)).astype(np.float32)})
    return {"unet": unet, "text_encoder": text, "vae": {}}


def _adapter(params, rank=2, seed=1):
    rng = np.random.default_rng(seed)
    flat = {}
    for part, path in (("unet", ATTN), ("unet", PROJ), ("unet", CONV), ("text_encoder", TEXT)):
        node = params[part]
        for p in path:
            node = node[p]
        shape = node["kernel"].shape
        flat[(part, *path, "down")] = rng.normal(size=(*shape[:-1], rank)).astype(np.float32)
        flat[(part, *path, "up")] = rng.normal(size=(rank, shape[-1])).astype(np.float32)
    return _nest(flat)


def _merged(params, lora, scale=1.0):
    """The adapted kernels ``W + scale * down @ up`` (numpy: no compilation), by layer path."""
    out = {}
    for part in lora:
        for path, leaf in flatten_dict(lora[part]).items():
            if path[-1] == "down":
                up = flatten_dict(lora[part])[path[:-1] + ("up",)]
                kernel = flatten_dict(params[part])[path[:-1] + ("kernel",)]
                out[(part, *path[:-1])] = kernel + scale * np.tensordot(leaf, up, 1)
    return out


def _assert_same_model(a, b, rtol=1e-6):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=1e-6, err_msg=str(k))


def test_targets_are_torch_module_names(params):
    names = lora_targets(params)
    assert set(names) == {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.down_blocks.1.attentions.0.proj_in", "unet.mid_block.resnets.0.conv1",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"}
    assert names["unet.mid_block.resnets.0.conv1"].shape == (3, 3, 4, 8)


def test_save_read_round_trip(params, tmp_path):
    lora = _adapter(params)
    path = save_lora(tmp_path / "out", lora, scale=0.75)
    assert path == str(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert os.listdir(tmp_path / "out") == ["pytorch_lora_weights.safetensors"]  # no temp left
    back = read_lora(path, params)
    assert jax.tree.structure(back) == jax.tree.structure(lora)
    _assert_same_model(_merged(params, back), _merged(params, lora, 0.75))
    with open(path, "rb") as f:  # diffusers' layout: torch metadata, no adapter metadata
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    assert header["__metadata__"] == {"format": "pt"}
    key = "unet.mid_block.resnets.0.conv1"
    assert header[f"{key}.lora_A.weight"]["shape"] == [2, 4, 3, 3]   # conv [r, in, kh, kw]
    assert header[f"{key}.lora_B.weight"]["shape"] == [8, 2, 1, 1]   # 1x1 conv [out, r]
    text = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert header[f"{text}.lora_A.weight"]["shape"] == [2, 8]
    assert header[f"{text}.lora_B.weight"]["shape"] == [8, 2]


def test_peft_layouts_and_alpha(params):
    lora = _adapter(params)
    sd = lora_state_dict(lora)
    assert lora_format(sd) == "diffusers"
    # older diffusers layouts, an .alpha, keys without prefix, text keys without text_model.
    old = {}
    for k, v in sd.items():
        k = k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight",
                                                                        ".lora.up.weight")
        if k.startswith("unet."):
            k = k[len("unet."):]
        if k.startswith("text_encoder."):
            k = k.replace("text_encoder.text_model.", "text_encoder.").replace(
                ".lora.", ".lora_linear_layer.")
        old[k] = v
    old["down_blocks.1.attentions.0.proj_in.alpha"] = np.float32(1.0)  # rank 2: factor 0.5
    back = read_lora(old, params)
    want = _merged(params, lora)
    half = dict(lora["unet"]["down_blocks_1"]["attentions_0"]["proj_in"])
    half["up"] = half["up"] * 0.5
    lora2 = jax.tree.map(lambda x: x, lora)
    lora2["unet"]["down_blocks_1"]["attentions_0"]["proj_in"] = half
    _assert_same_model(_merged(params, back), _merged(params, lora2))
    assert not np.allclose(want[("unet", *PROJ)], _merged(params, back)[("unet", *PROJ)])


def test_kohya_names_resolved_against_the_model(params):
    lora = _adapter(params, rank=4)
    peft = lora_state_dict(lora)
    kohya, alpha = {}, 2.0
    for k, v in peft.items():
        part, rest = k.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        prefix = "lora_unet_" if part == "unet" else "lora_te_"
        name = prefix + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = v
        kohya[f"{name}.alpha"] = np.float32(alpha)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in kohya
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    assert lora_format(kohya) == "kohya"
    back = read_lora(kohya, params)
    _assert_same_model(_merged(params, back), _merged(params, lora, alpha / 4))


def test_unknown_keys_are_listed(params):
    sd = lora_state_dict(_adapter(params))
    bad = {**sd, "unet.up_blocks.3.attentions.2.to_k.lora_A.weight": np.zeros((2, 6)),
           "unet.foo.lora_magnitude_vector": np.zeros(3),  # DoRA
           "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": np.zeros((2, 8))}
    with pytest.raises(ValueError, match=r"3 keys name no LoRA layer.*"
                                         r"text_encoder_2\.text_model\.encoder.*"
                                         r"unet\.foo\.lora_magnitude_vector.*up_blocks\.3"):
        read_lora(bad, params)
    kohya = {"lora_unet_mid_block_resnets_0_conv1.lora_down.weight": np.zeros((2, 4, 3, 3)),
             "lora_unet_mid_block_resnets_0_conv1.lora_up.weight": np.zeros((8, 2, 1, 1)),
             "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": np.zeros((2, 6)),
             "lora_unet_mid_block_resnets_0_conv1.dora_scale": np.zeros(8)}
    with pytest.raises(ValueError, match=r"2 keys.*kohya.*input_blocks_1_1_proj_in.*dora_scale"):
        read_lora(kohya, params)
    with pytest.raises(ValueError, match="lack their down or up.*attn1.to_q"):
        read_lora({k: v for k, v in sd.items() if "to_q.lora_B" not in k}, params)


def test_shape_mismatch_names_the_layer(params):
    sd = lora_state_dict(_adapter(params))
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    sd[key] = np.zeros((2, 16), np.float32)  # another architecture's width
    with pytest.raises(ValueError, match=r"LoRA state dict: unet: .*attn1/to_q: down \(16, 2\) "
                                         r"@ up \(2, 6\) does not make the kernel \(8, 6\)"):
        read_lora(sd, params)


def test_corrupt_and_missing_files(params, tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(InvalidFileError, match="broken.safetensors") as e:
        read_lora(bad, params)
    assert "\n" not in str(e.value)
    good = save_lora(tmp_path / "ok.safetensors", _adapter(params))
    data = open(good, "rb").read()
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidFileError, match="cut.safetensors"):
        read_lora(truncated, params)
    with pytest.raises(FileNotFoundError, match="no weights file"):
        read_lora(tmp_path / "nope.safetensors", params)
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights"):
        read_lora(tmp_path, params)


def test_save_errors_write_nothing(params, tmp_path):
    with pytest.raises(ValueError, match="scale must be a finite number"):
        save_lora(tmp_path / "a.safetensors", _adapter(params), scale=float("nan"))
    with pytest.raises(ValueError, match="'unet': .., 'text_encoder'"):
        save_lora(tmp_path / "a.safetensors", {"vae": {}})
    broken = _adapter(params)
    del broken["unet"]["mid_block"]["resnets_0"]["conv1"]["up"]
    with pytest.raises(ValueError, match="conv1 needs both"):
        save_lora(tmp_path / "a.safetensors", broken)
    assert os.listdir(tmp_path) == []


def test_lora_flag():
    assert parse_lora_flag("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_flag("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_lora_flag("dir/x:-1") == ("dir/x", -1.0)
    assert parse_lora_flag(r"C:\loras\x.safetensors") == (r"C:\loras\x.safetensors", 1.0)
    assert parse_lora_flag(r"C:\loras\x.safetensors:2") == (r"C:\loras\x.safetensors", 2.0)
    with pytest.raises(ConfigError, match="finite"):
        parse_lora_flag("a.safetensors:inf")
    with pytest.raises(ConfigError, match="PATH:SCALE"):
        parse_lora_flag(":0.5")
