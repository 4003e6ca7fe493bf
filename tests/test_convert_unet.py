"""diffusers -> jaxdiff UNet conversion: configs, key errors, checkpoint files, legacy names."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import safetensors.torch
import torch

from jaxdiff.convert import (
    convert_unet_state_dict,
    from_diffusers,
    load_sharded_state_dict,
    load_torch_state_dict,
    torch_key,
    unet_config_from_diffusers,
)
from jaxdiff.models import UNetConfig, unet_param_shapes
from jaxdiff.validation import InvalidFileError
from tests.parity.test_unet_parity import tiny_unet2d, tiny_unet2d_condition


@pytest.fixture(scope="module")
def model():
    return tiny_unet2d()


@pytest.fixture(scope="module")
def converted(model):
    return from_diffusers(model)


def _leaves(params, prefix=()):
    for k, v in params.items():
        if isinstance(v, dict):
            yield from _leaves(v, (*prefix, k))
        else:
            yield (*prefix, k), np.asarray(v)


def assert_same_params(a, b):
    a, b = dict(_leaves(a)), dict(_leaves(b))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg="/".join(k))


def test_every_param_comes_from_the_state_dict(model, converted):
    config, params = converted
    state = model.state_dict()
    names = {torch_key(path): path for path, _ in _leaves(params)}
    assert set(names) == set(state)
    w = state["down_blocks.1.attentions.0.to_q.weight"].numpy()
    np.testing.assert_array_equal(params["down_blocks_1"]["attentions_0"]["to_q"]["kernel"], w.T)
    w = state["up_blocks.0.upsamplers.0.conv.weight"].numpy()
    kernel = params["up_blocks_0"]["upsamplers_0"]["conv"]["kernel"]
    np.testing.assert_array_equal(kernel, w.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        params["class_embedding"]["embedding"], state["class_embedding.weight"].numpy()
    )
    assert config.num_classes == model.config.num_class_embeds - 1  # the last row is null


def test_missing_unexpected_and_misshaped_keys_are_listed(model, converted):
    config, _ = converted
    state = dict(model.state_dict())
    del state["mid_block.attentions.0.to_k.bias"]
    del state["conv_out.weight"]
    state["down_blocks.0.extra.weight"] = torch.zeros(3)
    state["time_embedding.linear_1.weight"] = torch.zeros(7, 7)
    with pytest.raises(ValueError) as info:
        convert_unet_state_dict(state, config)
    msg = str(info.value)
    assert "2 missing keys: conv_out.weight, mid_block.attentions.0.to_k.bias" in msg
    assert "1 unexpected keys: down_blocks.0.extra.weight" in msg
    assert "1 mis-shaped keys: time_embedding.linear_1.weight" in msg
    assert "expected (32, 128)" in msg


def test_state_dict_for_another_config_fails(model):
    other = unet_config_from_diffusers(dict(model.config), model_class="UNet2DModel",
                                       layers_per_block=2)  # fmt: skip
    with pytest.raises(ValueError, match="missing keys: .*down_blocks.0.resnets.1"):
        convert_unet_state_dict(model.state_dict(), other)


def test_linear_vs_conv_projection_mismatch_is_a_shape_error():
    model = tiny_unet2d_condition()
    config = unet_config_from_diffusers(dict(model.config), model_class="UNet2DConditionModel",
                                        use_linear_projection=True)  # fmt: skip
    with pytest.raises(ValueError, match="mis-shaped keys: .*proj_in.weight"):
        convert_unet_state_dict(model.state_dict(), config)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_checkpoint_file_round_trip(tmp_path, model, converted, suffix):
    config, params = converted
    path = tmp_path / f"unet{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, str(path))
    else:
        torch.save(state, str(path))
    loaded = load_torch_state_dict(path)
    assert all(isinstance(v, np.ndarray) for v in loaded.values())
    assert_same_params(convert_unet_state_dict(loaded, config), params)


@pytest.mark.slow
def test_bfloat16_safetensors(tmp_path, model, converted):
    config, params = converted
    path = tmp_path / "unet_bf16.safetensors"
    safetensors.torch.save_file({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()},
                                str(path))  # fmt: skip
    out = convert_unet_state_dict(load_torch_state_dict(path), config)
    a, b = dict(_leaves(out)), dict(_leaves(params))
    assert all(a[k].dtype == np.float32 for k in a)
    assert max(np.abs(a[k] - b[k]).max() / (np.abs(b[k]).max() + 1e-12) for k in a) < 1e-2


def test_bad_checkpoint_suffix():
    with pytest.raises(ValueError, match="path must end in"):
        load_torch_state_dict("unet.h5")


def _state(model):
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("content", ["empty", "truncated", "random", "padded"])
def test_invalid_safetensors_names_the_file(tmp_path, model, content):
    """An empty, truncated or random file (an interrupted download) is one InvalidFileError
    naming the file and saying what to do, not safetensors' bare "incomplete metadata"."""
    good = tmp_path / "good.safetensors"
    safetensors.torch.save_file(_state(model), str(good))
    raw = good.read_bytes()
    data = {"empty": b"", "truncated": raw[: len(raw) // 2],
            "random": np.random.default_rng(0).bytes(300), "padded": raw + b"\0" * 7}[content]
    path = tmp_path / "unet.safetensors"
    path.write_bytes(data)
    with pytest.raises(InvalidFileError) as e:
        load_torch_state_dict(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "not a valid safetensors file" in msg
    assert "download it again" in msg and "\n" not in msg


def test_torch_files_that_are_not_state_dicts(tmp_path, model):
    """A bare tensor, a nested dict, a truncated or a random .bin: one InvalidFileError naming
    the file (a bare tensor used to raise torch's "Tensor.__contains__ only supports Tensor")."""
    cases = {"tensor.bin": "holds a torch.Tensor, not a state dict",
             "nested.pt": "not a state dict of tensors: 1 entries",
             "truncated.bin": "not a readable PyTorch weights file",
             "random.bin": "not a readable PyTorch weights file"}
    torch.save(torch.zeros(3), str(tmp_path / "tensor.bin"))
    torch.save({"unet": _state(model), "step": torch.tensor(3)}, str(tmp_path / "nested.pt"))
    torch.save(_state(model), str(tmp_path / "whole.bin"))
    raw = (tmp_path / "whole.bin").read_bytes()
    (tmp_path / "truncated.bin").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "random.bin").write_bytes(np.random.default_rng(0).bytes(300))
    for name, message in cases.items():
        with pytest.raises(InvalidFileError, match=message) as e:
            load_torch_state_dict(tmp_path / name)
        assert str(e.value).startswith(str(tmp_path / name))
    # a training checkpoint's {"state_dict": {...}} and number entries stay readable
    torch.save({"state_dict": {"w": torch.ones(2), "step": 3}}, str(tmp_path / "ckpt.ckpt"))
    assert sorted(load_torch_state_dict(tmp_path / "ckpt.ckpt")) == ["step", "w"]


def test_torch_file_without_torch_says_what_to_install(tmp_path, model, monkeypatch):
    path = tmp_path / "unet.bin"
    torch.save(_state(model), str(path))
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(InvalidFileError) as e:
        load_torch_state_dict(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "pip install torch" in msg and ".safetensors" in msg


def test_missing_file_is_file_not_found(tmp_path):
    for name in ("unet.safetensors", "unet.bin"):
        with pytest.raises(FileNotFoundError, match=name):
            load_torch_state_dict(tmp_path / name)


def test_sharded_index_refuses_shards_outside_its_folder(tmp_path, model):
    """A shard name must stay inside the index's folder: ``..``, absolute paths and symlinked
    folders out of it are refused (a downloaded folder must not make jaxdiff read other files); a
    shard file that is a symlink is read (the Hugging Face cache's layout); a valid index merges
    its shards; a corrupt index names itself."""
    state = _state(model)
    keys = sorted(state)
    folder = tmp_path / "enc"
    folder.mkdir()
    outside = tmp_path / "secret.safetensors"
    safetensors.torch.save_file({"x": torch.ones(1)}, str(outside))
    half = len(keys) // 2
    for i, part in enumerate((keys[:half], keys[half:])):
        safetensors.torch.save_file({k: state[k] for k in part}, str(folder / f"m-{i}.safetensors"))
    index = folder / "model.safetensors.index.json"

    def write(weight_map):
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    write({k: f"m-{int(i >= half)}.safetensors" for i, k in enumerate(keys)})
    assert sorted(load_sharded_state_dict(index)) == keys
    (folder / "link.safetensors").symlink_to(outside)   # a snapshot file linked to its blob
    write({"x": "link.safetensors"})
    assert sorted(load_sharded_state_dict(index)) == ["x"]
    (folder / "linked").symlink_to(tmp_path)            # a folder leading out
    for bad in ("../secret.safetensors", str(outside), "linked/secret.safetensors",
                "..\\secret.safetensors"):
        write({"x": bad})
        with pytest.raises(InvalidFileError, match="is not a file inside") as e:
            load_sharded_state_dict(index)
        assert str(e.value).startswith(str(index)) and repr(bad) in str(e.value)
    index.write_text('{"weight_map": {"x": "m-0.safet')
    with pytest.raises(InvalidFileError, match="not valid JSON"):
        load_sharded_state_dict(index)
    index.write_text('{"weights": {}}')
    with pytest.raises(InvalidFileError, match="weight_map"):
        load_sharded_state_dict(index)


def test_legacy_attention_names(model, converted):
    config, params = converted
    renames = {
        ".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."
    }  # fmt: skip
    legacy = {}
    for k, v in model.state_dict().items():
        for new, old in renames.items():
            if ".attentions." in k:
                k = k.replace(new, old)
        legacy[k] = v
    assert "mid_block.attentions.0.proj_attn.weight" in legacy
    assert_same_params(convert_unet_state_dict(legacy, config), params)


def test_legacy_and_current_name_for_one_weight_is_an_error(model, converted):
    config, _ = converted
    state = dict(model.state_dict())
    state["mid_block.attentions.0.query.weight"] = state["mid_block.attentions.0.to_q.weight"] + 1
    state["down_blocks.1.attentions.0.proj_attn.bias"] = torch.zeros(64)
    with pytest.raises(ValueError, match="2 weights under both") as info:
        convert_unet_state_dict(state, config)
    msg = str(info.value)
    assert "mid_block.attentions.0.to_q.weight and mid_block.attentions.0.query.weight" in msg
    assert "attentions.0.proj_attn.bias (both down_blocks.1.attentions.0.to_out.0.bias)" in msg


def test_config_mapping_condition_model():
    cfg = unet_config_from_diffusers(
        dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
             cross_attention_dim=(24, 24), norm_num_groups=8, layers_per_block=[1, 2],
             _class_name="UNet2DConditionModel", _diffusers_version="0.42.1"),
    )  # fmt: skip
    assert isinstance(cfg, UNetConfig)
    assert cfg.attention == ("cross", None) and cfg.up_kinds == ("cross", None)
    assert cfg.num_heads == (2, 4) and cfg.context_dim == 24 and cfg.in_channels == 4
    assert cfg.layers(1) == 2 and cfg.mid_attention == "cross"


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift='scale_shift'"),
        (dict(time_embedding_type="fourier"), "time_embedding_type"),
        (dict(class_embed_type="timestep"), "class_embed_type"),
        (dict(downsample_type="resnet"), "downsample_type"),
        (dict(attn_norm_num_groups=4), "attn_norm_num_groups"),
        (dict(act_fn="mish"), "act_fn"),
        (dict(not_an_option=1), r"unknown UNet2DModel config options: \['not_an_option'\]"),
        (dict(down_block_types=("SkipDownBlock2D", "DownBlock2D")), "SkipDownBlock2D"),
        (dict(mid_block_type="UNetMidBlock2DCrossAttn"), "mid_block_type"),
        (dict(num_class_embeds=1), "num_class_embeds"),
    ],
)
def test_unsupported_unet2d_options(model, options, match):
    config = {**dict(model.config), **options}
    with pytest.raises(ValueError, match=match):
        unet_config_from_diffusers(config, model_class="UNet2DModel")


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(only_cross_attention=True), "only_cross_attention"),
        (dict(addition_embed_type="text"), "addition_embed_type"),
        (dict(encoder_hid_dim=16), "encoder_hid_dim"),
        (dict(projection_class_embeddings_input_dim=8), "projection_class_embeddings_input_dim"),
        (dict(conv_in_kernel=1), "conv_in_kernel"),
        (dict(class_embeddings_concat=True), "class_embeddings_concat"),
        (dict(cross_attention_dim=(24, 32)), "cross_attention_dim"),
        (dict(transformer_layers_per_block=((1, 1), (1, 1))), "transformer_layers_per_block"),
        (dict(down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D")), "SimpleCrossAttn"),
    ],
)
def test_unsupported_condition_options(options, match):
    config = {**dict(tiny_unet2d_condition().config), **options}
    with pytest.raises(ValueError, match=match):
        unet_config_from_diffusers(config, model_class="UNet2DConditionModel")


def test_model_class_inference():
    with pytest.raises(ValueError, match="model_class"):
        unet_config_from_diffusers({"in_channels": 3})
    with pytest.raises(ValueError, match="model_class must be"):
        unet_config_from_diffusers({}, model_class="UNet3DConditionModel")
    cfg = unet_config_from_diffusers(
        {"add_attention": False, "block_out_channels": (32, 64), "norm_num_groups": 8,
         "down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2}
    )  # fmt: skip
    assert cfg.mid_attention is None and cfg.mid_layers == 1
    assert set(unet_param_shapes(cfg)["mid_block"]) == {"resnets_0", "resnets_1"}
