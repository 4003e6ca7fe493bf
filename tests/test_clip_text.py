"""jaxdiff.models.CLIPTextModel and jaxdiff.convert.transformers_clip without PyTorch: config
checks, jit with padded batches (compiled once), the attention mask, the pooled position, bf16
compute, CLIP skip, input checks, and weight import (key layouts, errors, a folder on disk).
Parity with transformers is in tests/parity/test_clip_parity.py."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from jaxdiff.convert import (
    clip_text_config_from_transformers,
    convert_clip_text_state_dict,
    load_clip_text_encoder,
)
from jaxdiff.convert.transformers_clip import clip_torch_key
from jaxdiff.models import CLIPTextConfig, CLIPTextModel, init_clip_text
from jaxdiff.validation import InvalidFileError

CFG = CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=12, eos_token_id=2)  # fmt: skip
BOS, EOS = 48, 49


@pytest.fixture(scope="module")
def params():
    return init_clip_text(CFG, jax.random.key(0))


def apply(config, params, ids, mask=None):
    return jax.jit(CLIPTextModel(config).apply)({"params": params}, ids, mask)


def batch(lengths, seq_len=10, pad=EOS, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), seq_len), pad, np.int32)
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, : n + 2] = [BOS, *rng.integers(3, 40, n), EOS]
        mask[b, : n + 2] = 1
    return ids, mask


@pytest.mark.parametrize(
    "field, value",
    [("hidden_size", 15), ("hidden_act", "relu"), ("dtype", jnp.int32), ("eos_token_id", [2]),
     ("layer_norm_eps", 0.0), ("num_hidden_layers", 0), ("attention_implementation", "flash"),
     ("projection_dim", 0)],
)  # fmt: skip
def test_config_rejects_bad_fields(field, value):
    name = "num_attention_heads" if field == "hidden_size" else field
    with pytest.raises(ValueError, match=name):
        dataclasses.replace(CFG, **{field: value})


@pytest.mark.slow
def test_outputs_shapes_dtypes_and_compile_once(params):
    model = CLIPTextModel(CFG)
    traces = []

    @jax.jit
    def run(p, ids, mask):
        traces.append(1)
        return model.apply({"params": p}, ids, mask)

    for seed in range(3):  # different prompts, one padded shape: one compilation
        ids, mask = batch([1, 5, 8], seed=seed)
        out = run(params, ids, mask)
    assert len(traces) == 1
    assert out.last_hidden_state.shape == (3, 10, 16) and out.pooler_output.shape == (3, 16)
    assert len(out.hidden_states) == CFG.num_hidden_layers + 1 and out.text_embeds is None
    assert out.last_hidden_state.dtype == jnp.float32
    assert np.isfinite(np.asarray(out.last_hidden_state)).all()


@pytest.mark.slow
def test_causal_and_padding_masks(params):
    ids, mask = batch([3, 6])
    out = apply(CFG, params, ids, mask)
    # causal: changing a later token leaves every earlier position unchanged
    ids2 = ids.copy()
    ids2[:, 4] = 7
    out2 = apply(CFG, params, ids2, mask)
    np.testing.assert_allclose(out.last_hidden_state[:, :4], out2.last_hidden_state[:, :4],
                               rtol=1e-6, atol=1e-6)  # fmt: skip
    assert not np.allclose(out.last_hidden_state[:, 4:], out2.last_hidden_state[:, 4:])
    # padding: with the mask, real tokens ignore (left) padding; without it they do not
    ids, mask = batch([3, 4])  # 5 and 6 real tokens of 10, moved right by 3
    left = np.roll(ids, 3, axis=1)
    left_mask = np.roll(mask, 3, axis=1)
    assert left_mask[:, :3].sum() == 0 and left_mask.sum() == 11
    left[:, :3] = 5
    other = left.copy()
    other[:, :3] = 9
    real = left_mask.astype(bool)
    a = np.asarray(apply(CFG, params, left, left_mask).last_hidden_state)[real]
    b = np.asarray(apply(CFG, params, other, left_mask).last_hidden_state)[real]
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    c = np.asarray(apply(CFG, params, other, None).last_hidden_state)[real]
    assert not np.allclose(a, c)


@pytest.mark.parametrize("eos_token_id, positions", [(2, [0, 2]), (20, [3, 3])])
def test_pooled_position(params, eos_token_id, positions):
    """Legacy rule (eos_token_id == 2): the largest id; otherwise the first ``eos_token_id``."""
    config = dataclasses.replace(CFG, eos_token_id=eos_token_id)
    ids = np.zeros((2, 8), np.int32)
    ids[0, :4] = [48, 10, 11, 20]
    ids[1, :5] = [48, 30, 49, 20, 20]
    out = apply(config, params, ids)
    np.testing.assert_array_equal(
        out.pooler_output, np.asarray(out.last_hidden_state)[[0, 1], positions]
    )


@pytest.mark.slow
def test_projection_head_and_clip_skip():
    config = dataclasses.replace(CFG, projection_dim=6, eos_token_id=EOS)
    params = init_clip_text(config, jax.random.key(1))
    assert "kernel" in params["text_projection"] and "bias" not in params["text_projection"]
    ids, _ = batch([4])
    model = CLIPTextModel(config)
    out = model.apply({"params": params}, ids)
    np.testing.assert_allclose(out.text_embeds, out.pooler_output @ params["text_projection"]
                               ["kernel"], rtol=1e-5, atol=1e-6)  # fmt: skip
    normed = model.apply({"params": params}, out.hidden_states[-1], method="final_layer_norm")
    np.testing.assert_allclose(normed, out.last_hidden_state, rtol=1e-6, atol=1e-6)
    skip1 = model.apply({"params": params}, out.hidden_states[-2], method="final_layer_norm")
    assert skip1.shape == out.last_hidden_state.shape
    assert not np.allclose(skip1, out.last_hidden_state)


def test_bfloat16_compute_with_float32_params(params):
    config = dataclasses.replace(CFG, dtype=jnp.bfloat16)
    ids, mask = batch([3, 7])
    ref = apply(CFG, params, ids, mask)
    out = apply(config, params, ids, mask)
    assert out.last_hidden_state.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    err = np.abs(np.asarray(out.last_hidden_state, np.float32) - np.asarray(ref.last_hidden_state))
    assert err.max() < 0.1 * np.abs(np.asarray(ref.last_hidden_state)).max()


def test_input_checks(params):
    ids, mask = batch([2])
    for bad_ids, match in ((ids[0], "input_ids"), (ids.astype(np.float32), "input_ids"),
                           (np.zeros((1, 13), np.int32), "max_position_embeddings"),
                           (ids + 10, r"\[0, vocab_size=50\)")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            CLIPTextModel(CFG).apply({"params": params}, bad_ids)
    with pytest.raises(ValueError, match="attention_mask"):
        CLIPTextModel(CFG).apply({"params": params}, ids, mask[:, :5])


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_attention_matches_xla(params):
    ids, _ = batch([3, 7])
    xla = apply(dataclasses.replace(CFG, dtype=jnp.bfloat16), params, ids)
    cudnn = apply(
        dataclasses.replace(CFG, dtype=jnp.bfloat16, attention_implementation="cudnn"), params, ids
    )
    np.testing.assert_allclose(
        np.asarray(cudnn.last_hidden_state, np.float32),
        np.asarray(xla.last_hidden_state, np.float32), atol=5e-2,
    )  # fmt: skip


# Weight import -----------------------------------------------------------------------------


def torch_style(params, prefix=True) -> dict[str, np.ndarray]:
    """A transformers-layout state dict of ``params`` (linear weights [out, in])."""
    out = {}
    for path, value in flatten_dict(params).items():
        key = clip_torch_key(path)
        value = np.asarray(value)
        out[key if prefix or not key.startswith("text_model.") else key[11:]] = (
            value.T if path[-1] == "kernel" else value
        )
    return out


@pytest.mark.parametrize("prefix", [True, False])
def test_state_dict_round_trip_both_layouts(params, prefix):
    sd = torch_style(params, prefix)
    assert ("text_model.final_layer_norm.weight" in sd) == prefix
    back = convert_clip_text_state_dict(sd, CFG)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_state_dict_errors_list_every_key(params):
    sd = torch_style(params)
    sd.pop("text_model.encoder.layers.1.mlp.fc2.bias")
    sd["text_model.encoder.layers.2.mlp.fc2.bias"] = np.zeros(16)
    sd["text_model.encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((16, 8))
    with pytest.raises(ValueError) as e:
        convert_clip_text_state_dict(sd, CFG)
    msg = str(e.value)
    assert "1 missing keys: text_model.encoder.layers.1.mlp.fc2.bias" in msg
    assert "1 unexpected keys: text_model.encoder.layers.2.mlp.fc2.bias" in msg
    assert "mis-shaped keys: text_model.encoder.layers.0.self_attn.q_proj.weight" in msg
    both = torch_style(params)
    both["final_layer_norm.weight"] = both["text_model.final_layer_norm.weight"]
    with pytest.raises(ValueError, match="both with and without"):
        convert_clip_text_state_dict(both, CFG)
    with_ids = torch_style(params)
    with_ids["text_model.embeddings.position_ids"] = np.arange(12)[None]
    convert_clip_text_state_dict(with_ids, CFG)  # the old buffer is accepted and dropped
    with_ids["text_model.embeddings.position_ids"] = np.zeros((1, 12))
    with pytest.raises(ValueError, match="position_ids"):
        convert_clip_text_state_dict(with_ids, CFG)
    with pytest.raises(ValueError, match="unexpected keys: text_projection.weight"):
        convert_clip_text_state_dict({**torch_style(params), "text_projection.weight":
                                      np.zeros((6, 16))}, CFG)  # fmt: skip


SD1_CONFIG = {  # SD 1.x text_encoder/config.json (sizes shrunk)
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
    "hidden_act": "quick_gelu", "hidden_size": 16, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 24, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 12, "model_type": "clip_text_model", "num_attention_heads": 2,
    "num_hidden_layers": 2, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0", "vocab_size": 50,
}  # fmt: skip


def test_config_from_transformers():
    assert clip_text_config_from_transformers(SD1_CONFIG) == CFG
    proj = clip_text_config_from_transformers(
        {**SD1_CONFIG, "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu"}
    )
    assert proj.projection_dim == 768 and proj.hidden_act == "gelu"
    assert clip_text_config_from_transformers({}) == CLIPTextConfig()  # transformers' defaults
    bf16 = clip_text_config_from_transformers(SD1_CONFIG, dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.bfloat16
    for change, match in (({"hidden_act": "relu"}, "hidden_act"),
                          ({"eos_token_id": [2, 3]}, "eos_token_id"),
                          ({"rope_theta": 1e4}, "rope_theta"),
                          ({"pruned_heads": {"0": [1]}}, "pruned_heads"),
                          ({"architectures": ["CLIPModel"]}, "architectures"),
                          ({"text_config": {}}, "text_config")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            clip_text_config_from_transformers({**SD1_CONFIG, **change})


def test_load_text_encoder_folder(tmp_path, params):
    import safetensors.numpy

    ids, _ = batch([3])
    ref = apply(CFG, params, ids)
    sd = {k: np.ascontiguousarray(v) for k, v in torch_style(params).items()}
    (tmp_path / "config.json").write_text(json.dumps(SD1_CONFIG))
    with pytest.raises(ValueError, match="model.safetensors"):
        load_clip_text_encoder(tmp_path)
    safetensors.numpy.save_file(sd, str(tmp_path / "model.safetensors"))
    config, loaded = load_clip_text_encoder(tmp_path, dtype=jnp.float32)
    assert config == CFG
    np.testing.assert_array_equal(apply(config, loaded, ids).last_hidden_state,
                                  ref.last_hidden_state)  # fmt: skip
    with pytest.raises(ValueError, match="config.json"):
        load_clip_text_encoder(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps(SD1_CONFIG)[:40])  # a truncated config
    with pytest.raises(InvalidFileError, match="not valid JSON") as e:
        load_clip_text_encoder(tmp_path)
    assert str(e.value).startswith(str(tmp_path / "config.json"))
