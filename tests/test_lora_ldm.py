"""The LDM / SGM UNet names -> diffusers names map (jaxdiff.convert.lora_ldm), derived from the
UNet config: SDXL base's (3 levels, no attention in the first), SD 1.5's (4 levels, no attention
in the last), per-level resnet counts; and LoRA files in SDXL's layouts read against a model's
layers (kohya LDM names, ``lora_te2_`` and peft ``text_encoder_2.*`` keys, the unknown-keys
error). The expected names are written out by hand from the original UNets' block lists
(CompVis' and Stability's ``openaimodel.py``), as kohya's SDXL LoRAs name them. Parity with
diffusers' ``load_lora_weights`` is in tests/parity/test_sdxl_lora_parity.py."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxdiff.convert import lora_state_dict, lora_targets, read_lora
from jaxdiff.convert.lora_kohya import kohya_names
from jaxdiff.convert.lora_ldm import ldm_module_name, ldm_unet_blocks, ldm_unet_names
from jaxdiff.models import UNet, UNetConfig
from jaxdiff.models.unet import unet_dummy_inputs

SDXL = UNetConfig(in_channels=4, out_channels=4, block_channels=(320, 640, 1280),
                  layers_per_block=2, attention=(None, "cross", "cross"), mid_attention="cross",
                  num_heads=(5, 10, 20), transformer_depth=(1, 2, 10),
                  use_linear_projection=True, context_dim=2048, added_cond="text_time",
                  added_time_dim=256, added_cond_input_dim=2816)
SD15 = UNetConfig(in_channels=4, out_channels=4, block_channels=(320, 640, 1280, 1280),
                  layers_per_block=2, attention=("cross", "cross", "cross", None),
                  mid_attention="cross", num_heads=8, context_dim=768)


def test_sdxl_blocks():
    b = ldm_unet_blocks(SDXL)
    expected = {
        "input_blocks.0.0": "conv_in",
        "input_blocks.1.0": "down_blocks.0.resnets.0",
        "input_blocks.2.0": "down_blocks.0.resnets.1",
        "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks.4.0": "down_blocks.1.resnets.0",
        "input_blocks.4.1": "down_blocks.1.attentions.0",
        "input_blocks.5.1": "down_blocks.1.attentions.1",
        "input_blocks.6.0.op": "down_blocks.1.downsamplers.0.conv",
        "input_blocks.7.1": "down_blocks.2.attentions.0",
        "input_blocks.8.1": "down_blocks.2.attentions.1",
        "middle_block.0": "mid_block.resnets.0",
        "middle_block.1": "mid_block.attentions.0",
        "middle_block.2": "mid_block.resnets.1",
        "output_blocks.0.1": "up_blocks.0.attentions.0",
        "output_blocks.2.1": "up_blocks.0.attentions.2",
        "output_blocks.2.2.conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks.3.0": "up_blocks.1.resnets.0",
        "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
        "output_blocks.6.0": "up_blocks.2.resnets.0",
        "output_blocks.8.0": "up_blocks.2.resnets.2",
        "label_emb.0.0": "add_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "out.2": "conv_out",
    }
    assert {k: b.get(k) for k in expected} == expected
    # no attention in the first level (down and up), no upsampler at full resolution
    for absent in ("input_blocks.1.1", "input_blocks.9.0", "output_blocks.6.1",
                   "output_blocks.8.1", "output_blocks.8.1.conv", "output_blocks.9.0"):
        assert absent not in b
    assert len(set(b.values())) == len(b)  # one to one


def test_sd15_blocks():
    b = ldm_unet_blocks(SD15)
    expected = {
        "input_blocks.1.1": "down_blocks.0.attentions.0",
        "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks.4.1": "down_blocks.1.attentions.0",
        "input_blocks.9.0.op": "down_blocks.2.downsamplers.0.conv",
        "input_blocks.10.0": "down_blocks.3.resnets.0",
        "input_blocks.11.0": "down_blocks.3.resnets.1",
        # up level 0 (no attention): the upsampler is the block's second module, not third
        "output_blocks.2.1.conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks.3.1": "up_blocks.1.attentions.0",
        "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
        "output_blocks.8.2.conv": "up_blocks.2.upsamplers.0.conv",
        "output_blocks.11.1": "up_blocks.3.attentions.2",
        "middle_block.1": "mid_block.attentions.0",
    }
    assert {k: b.get(k) for k in expected} == expected
    assert "input_blocks.10.1" not in b and "input_blocks.12.0.op" not in b
    assert "output_blocks.11.2.conv" not in b and "output_blocks.12.0" not in b


def test_per_level_resnets_and_no_mid_attention():
    cfg = UNetConfig(block_channels=(32, 64), layers_per_block=(1, 3), attention=("cross", None),
                     mid_attention=None, mid_layers=2, context_dim=8)
    b = ldm_unet_blocks(cfg)
    assert b["input_blocks.1.1"] == "down_blocks.0.attentions.0"
    assert b["input_blocks.2.0.op"] == "down_blocks.0.downsamplers.0.conv"
    assert b["input_blocks.5.0"] == "down_blocks.1.resnets.2"
    assert b["middle_block.2"] == "mid_block.resnets.2"
    assert b["output_blocks.3.1.conv"] == "up_blocks.0.upsamplers.0.conv"  # 3 + 1 blocks up
    assert b["output_blocks.5.1"] == "up_blocks.1.attentions.1"
    assert "output_blocks.6.0" not in b and "input_blocks.6.0" not in b


def test_module_names_inside_blocks():
    b = ldm_unet_blocks(SDXL)
    cases = {
        "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k":
            "input_blocks.4.1.transformer_blocks.1.attn2.to_k",
        "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
        "up_blocks.1.resnets.2.conv1": "output_blocks.5.0.in_layers.2",
        "up_blocks.1.resnets.2.conv2": "output_blocks.5.0.out_layers.3",
        "up_blocks.1.resnets.2.time_emb_proj": "output_blocks.5.0.emb_layers.1",
        "up_blocks.1.resnets.2.conv_shortcut": "output_blocks.5.0.skip_connection",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "conv_in": "input_blocks.0.0",
    }
    assert {d: ldm_module_name(d, b) for d in cases} == cases
    for none in ("up_blocks.1.resnets.2.norm1", "conv_in.x", "down_blocks.9.resnets.0.conv1",
                 "time_embedding.cond_proj"):
        assert ldm_module_name(none, b) is None, none


@pytest.fixture(scope="module")
def tiny():
    """A small SDXL-shaped UNet's parameter shapes (3 levels, no attention in the first, 2
    resnets each) and its config."""
    cfg = UNetConfig(in_channels=4, out_channels=4, block_channels=(8, 16, 16),
                     layers_per_block=2, attention=(None, "cross", "cross"),
                     mid_attention="cross", num_heads=2, transformer_depth=(1, 1, 2),
                     use_linear_projection=True, context_dim=8, norm_groups=4,
                     added_cond="text_time", added_time_dim=4, added_cond_input_dim=16)
    args, kwargs = unet_dummy_inputs(cfg)
    shapes = jax.eval_shape(lambda: UNet(cfg).init(jax.random.key(0), *args, **kwargs))
    return cfg, {"unet": shapes["params"]}


def test_every_unet_layer_has_one_ldm_name(tiny):
    cfg, params = tiny
    modules = [t.split(".", 1)[1] for t in lora_targets(params)]
    names = ldm_unet_names(cfg, modules)
    assert sorted(names.values()) == sorted(modules)  # total and one to one
    assert names["input_blocks.7.1.transformer_blocks.1.ff.net.2"] == \
        "down_blocks.2.attentions.0.transformer_blocks.1.ff.net.2"


def _random_lora(params, part, rank=2, seed=0):
    rng = np.random.default_rng(seed)
    flat = {}
    for path, leaf in flatten_dict(dict(params[part])).items():
        if path[-1] == "kernel":
            shape = leaf.shape
            flat[path[:-1] + ("down",)] = rng.normal(size=(*shape[:-1], rank)).astype(np.float32)
            flat[path[:-1] + ("up",)] = rng.normal(size=(rank, shape[-1])).astype(np.float32)
    return {part: unflatten_dict(flat)}


def _kohya(state, rename=lambda name: name):
    """A peft state dict (``lora_state_dict``) as kohya keys, the module names ``rename``d."""
    out = {}
    for key, value in state.items():
        part, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_",
                  "text_encoder_2": "lora_te2_"}[part]
        name = prefix + rename(module).replace(".", "_")
        out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        out[f"{name}.alpha"] = np.float32(value.shape[0] if kind.startswith("A") else
                                          value.shape[1])
    return out


def test_ldm_named_kohya_file_reads_as_the_diffusers_named_one(tiny):
    cfg, params = tiny
    lora = _random_lora(params, "unet")
    state = lora_state_dict(lora)
    ldm = ldm_unet_blocks(cfg)
    diffusers_named = read_lora(_kohya(state), params)
    ldm_named = read_lora(_kohya(state, lambda m: ldm_module_name(m, ldm)), params,
                          unet_config=cfg)
    assert any(k.startswith("lora_unet_output_blocks_2_2_conv")
               for k in _kohya(state, lambda m: ldm_module_name(m, ldm)))
    flat_a, flat_b = flatten_dict(diffusers_named), flatten_dict(ldm_named)
    assert sorted(flat_a) == sorted(flat_b) == sorted(flatten_dict(lora))
    for k in flat_a:
        np.testing.assert_array_equal(flat_a[k], flat_b[k])
        np.testing.assert_allclose(flat_a[k], flatten_dict(lora)[k], rtol=1e-6)
    # without the UNet config the LDM names are unknown, and the error says what is missing
    with pytest.raises(ValueError, match=r"keys name no LoRA layer.*LDM-named UNet keys .*need "
                                         r"unet_config.*lora_unet_input_blocks_0_0"):
        read_lora(_kohya(state, lambda m: ldm_module_name(m, ldm)), params)


@pytest.fixture(scope="module")
def sdxl_text():
    rng = np.random.default_rng(1)
    q = ("text_model", "encoder", "layers_0", "self_attn", "q_proj", "kernel")

    def tree(projection):
        flat = {q: rng.normal(size=(8, 8)).astype(np.float32)}
        if projection:
            flat[("text_projection", "kernel")] = rng.normal(size=(8, 4)).astype(np.float32)
        return unflatten_dict(flat)

    return {"text_encoder": tree(False), "text_encoder_2": tree(True), "vae": {}}


def test_second_text_encoder_in_peft_and_kohya_files(sdxl_text):
    lora = {**_random_lora(sdxl_text, "text_encoder", seed=2),
            **_random_lora(sdxl_text, "text_encoder_2", seed=3)}
    state = lora_state_dict(lora)
    assert "text_encoder_2.text_projection.lora_A.weight" in state
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in state
    without_text_model = {k.replace("text_model.", ""): v for k, v in state.items()}
    kohya = _kohya(state)
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha" in kohya
    assert "lora_te2_text_projection.lora_down.weight" in kohya
    for source in (state, without_text_model, kohya,
                   _kohya(state, lambda m: m.replace("text_model.", ""))):
        back = flatten_dict(read_lora(source, sdxl_text))
        assert sorted(back) == sorted(flatten_dict(lora))
        for k, v in flatten_dict(lora).items():
            np.testing.assert_allclose(back[k], v, rtol=1e-6)
    # an SD 1.x model (no text_encoder_2): the second encoder's keys are unknown, all listed
    sd1 = {"text_encoder": sdxl_text["text_encoder"]}
    with pytest.raises(ValueError, match=r"6 keys name no LoRA layer.*parts: text_encoder\)"
                                         r".*lora_te2_text_model"):
        read_lora(kohya, sd1)


def test_kohya_names_resolve_te1_and_te2(sdxl_text):
    names = kohya_names(lora_targets(sdxl_text))
    assert names["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"] == \
        names["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] == \
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert names["lora_te2_text_projection"] == "text_encoder_2.text_projection"
    assert "lora_te2_projection" not in names
