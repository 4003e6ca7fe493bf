"""The UNet's extra embeddings: SDXL's ``"text_time"`` (``added_cond``) and the LCM guidance
embedding (``timestep_cond``): config checks, input checks at trace time, the params they add,
that they change the output, and the config import from / export to diffusers (the numbers are
compared with diffusers in tests/parity/test_sdxl_unet_parity.py)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.convert import unet_config_from_diffusers
from jaxdiff.convert.export_diffusers import unet_config_to_diffusers
from jaxdiff.models import (
    UNet,
    UNetConfig,
    guidance_scale_embedding,
    init_unet,
    unet_dummy_inputs,
    unet_param_shapes,
)

B, POOLED, TIME_DIM = 2, 10, 4
# SDXL-shaped: no attention at full resolution, per-level depth and heads, linear projections,
# the text_time embedding (6 ids); plus an LCM guidance embedding.
XL = UNetConfig(
    in_channels=4, out_channels=4, block_channels=(16, 32), layers_per_block=1,
    attention=(None, "cross"), num_heads=(1, 2), transformer_depth=(1, 2),
    use_linear_projection=True, context_dim=8, norm_groups=8, added_cond="text_time",
    added_time_dim=TIME_DIM, added_cond_input_dim=POOLED + 6 * TIME_DIM, time_cond_dim=6,
)  # fmt: skip
PLAIN = dataclasses.replace(XL, added_cond=None, added_time_dim=None, added_cond_input_dim=None,
                            time_cond_dim=None)


def inputs(config=XL, seed=0, n_ids=6):
    k = jax.random.split(jax.random.key(seed), 4)
    kw = dict(context=jax.random.normal(k[1], (B, 3, 8)))
    if config.added_cond:
        kw["added_cond"] = {"text_embeds": jax.random.normal(k[2], (B, POOLED)),
                            "time_ids": jnp.array([[64, 64, 0, 0, 64, 64],
                                                   [32, 48, 4, 2, 64, 64]][:B])[:, :n_ids]}
    if config.time_cond_dim:
        kw["timestep_cond"] = guidance_scale_embedding(jnp.array([1.0, 8.0]), 6)
    return jax.random.normal(k[0], (B, 8, 8, 4)), jnp.array([0, 999]), kw


def _trace(config, x, t, **kw):
    fn = lambda p, x, t, kw: UNet(config).apply({"params": p}, x, t, **kw)  # noqa: E731
    return jax.eval_shape(fn, unet_param_shapes(config), x, t, kw)


def test_params_of_the_extra_embeddings():
    shapes = unet_param_shapes(XL)
    assert shapes["time_embedding"]["cond_proj"]["kernel"].shape == (6, 16)
    assert set(shapes["time_embedding"]["cond_proj"]) == {"kernel"}  # no bias, as diffusers
    assert shapes["add_embedding"]["linear_1"]["kernel"].shape == (POOLED + 6 * TIME_DIM, 64)
    assert shapes["add_embedding"]["linear_2"]["kernel"].shape == (64, 64)
    plain = unet_param_shapes(PLAIN)
    assert "add_embedding" not in plain and "cond_proj" not in plain["time_embedding"]
    (_, _), kw = unet_dummy_inputs(XL, batch=3)
    assert kw["timestep_cond"].shape == (3, 6)
    assert kw["added_cond"]["text_embeds"].shape[1] + TIME_DIM == XL.added_cond_input_dim


@pytest.mark.slow
def test_each_embedding_changes_the_output():
    """``init_unet`` initialises the new layers, and real inputs reach the output: other time
    ids, pooled embeddings or guidance scales give other predictions (int and float time ids
    alike give the same)."""
    params = init_unet(XL, jax.random.key(1))  # the host init covers the new layers too
    assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(
        lambda s: s.shape, unet_param_shapes(XL))
    assert np.all(np.asarray(params["time_embedding"]["cond_proj"]["kernel"]) != 0)
    apply = jax.jit(lambda p, x, t, kw: UNet(XL).apply({"params": p}, x, t, **kw))
    x, t, kw = inputs()
    base = np.asarray(apply(params, x, t, kw))
    ids = kw["added_cond"]["time_ids"]
    changes = {
        "time_ids": {**kw, "added_cond": {**kw["added_cond"], "time_ids": ids + 8}},
        "text_embeds": {**kw, "added_cond": {**kw["added_cond"],
                                             "text_embeds": kw["added_cond"]["text_embeds"] + 1}},
        "timestep_cond": {**kw, "timestep_cond": guidance_scale_embedding(
            jnp.array([2.0, 4.0]), 6)},
    }
    for name, changed in changes.items():
        out = np.asarray(apply(params, x, t, changed))
        assert np.abs(out - base).max() > 1e-3 * np.abs(base).max(), name
    as_int = {**kw, "added_cond": {**kw["added_cond"], "time_ids": ids.astype(jnp.int32)}}
    np.testing.assert_allclose(np.asarray(apply(params, x, t, as_int)), base, rtol=0, atol=0)


@pytest.mark.parametrize(
    "config, change, match",
    [
        (XL, dict(added_cond=None), "added_cond is required by the UNet's 'text_time'"),
        (XL, dict(timestep_cond=None), r"timestep_cond \(\[B, 6\].*\) is required"),
        (PLAIN, dict(added_cond={"text_embeds": jnp.ones((B, 10)), "time_ids": jnp.ones((B, 6))}),
         "added_cond was given but the UNet has no added embedding"),
        (PLAIN, dict(timestep_cond=jnp.ones((B, 6))),
         r"timestep_cond \(an LCM guidance embedding\) was given but the UNet has none"),
        (XL, dict(added_cond=jnp.ones((B, 34))), "added_cond must be a mapping"),
        (XL, dict(added_cond={"text_embeds": jnp.ones((B, 10))}),
         r"added_cond must have exactly the keys \['text_embeds', 'time_ids'\]"),
        (XL, dict(added_cond={"text_embeds": jnp.ones((B, 10)), "time_ids": jnp.ones((B, 6)),
                              "image_embeds": jnp.ones((B, 3))}), "exactly the keys"),
        (XL, dict(added_cond={"text_embeds": jnp.ones((B, 10)), "time_ids": jnp.ones((B, 5))}),
         r"time_ids \[B, 5\] give 10 \+ 5 \* 4 = 30 features, but .* is 34"),
        (XL, dict(added_cond={"text_embeds": jnp.ones((B, 12)), "time_ids": jnp.ones((B, 6))}),
         "added_cond_input_dim is 34"),
        (XL, dict(added_cond={"text_embeds": jnp.ones((B + 1, 10)), "time_ids": jnp.ones((B, 6))}),
         r"added_cond\['text_embeds'\] must be \[B, N\] = \[2, N\]"),
        (XL, dict(added_cond={"text_embeds": jnp.ones((B, 10)), "time_ids": jnp.ones((B * 6,))}),
         r"added_cond\['time_ids'\] must be \[B, N\]"),
        (XL, dict(added_cond={"text_embeds": jnp.ones((B, 10)),
                              "time_ids": jnp.ones((B, 6), bool)}),
         r"added_cond\['time_ids'\] must hold numbers"),
        (XL, dict(timestep_cond=jnp.ones((B, 5))), r"timestep_cond must be \[B, time_cond_dim\]"),
        (XL, dict(timestep_cond=jnp.ones((B + 1, 6))), "timestep_cond must be"),
        (XL, dict(timestep_cond=jnp.ones((B, 6), jnp.int32)), "timestep_cond must be .* float"),
    ],
)
def test_bad_inputs_raise_at_trace_time(config, change, match):
    x, t, kw = inputs(config)
    kw = {k: v for k, v in {**kw, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        _trace(config, x, t, **kw)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(added_cond="text"), r"added_cond must be one of \(None, 'text_time'\)"),
        (dict(added_time_dim=None), "added_cond='text_time' needs added_time_dim"),
        (dict(added_time_dim=None, added_cond_input_dim=None),
         "needs added_time_dim and added_cond_input_dim"),
        (dict(added_cond=None, time_cond_dim=None), "added_time_dim, added_cond_input_dim set "
                                                    "but added_cond=None"),
        (dict(added_cond_input_dim=4), "added_cond_input_dim=4 must exceed added_time_dim=4"),
        (dict(added_time_dim=0), "added_time_dim must be"),
        (dict(added_time_dim=2, freq_shift=1.0), "added_time_dim=2 with freq_shift=1.0 divides"),
        (dict(time_cond_dim=0), "time_cond_dim must be"),
        (dict(time_cond_dim="8"), "time_cond_dim must be"),
    ],
)
def test_config_validation(fields, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(XL, **fields)


@pytest.mark.parametrize(
    "w, dim, match",
    [
        (jnp.ones((2, 2)), 8, r"guidance_scale must be \[B\] or a scalar"),
        (jnp.ones((2,), bool), 8, "guidance_scale must hold numbers"),
        (jnp.ones((2,)), 3, "dim must be an int >= 4"),
        (jnp.ones((2,)), 8.0, "dim must be an int >= 4"),
    ],
)
def test_guidance_scale_embedding_errors(w, dim, match):
    with pytest.raises(ValueError, match=match):
        guidance_scale_embedding(w, dim)


def test_guidance_scale_embedding_shapes_and_no_guidance():
    emb = guidance_scale_embedding(jnp.float32(1.0), 9)  # a scalar; odd width: one zero column
    assert emb.shape == (1, 9) and emb.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(emb), [[0, 0, 0, 0, 1, 1, 1, 1, 0]])  # w - 1 = 0


# ----------------------------------------------------------------------- diffusers configs

# The shapes of stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0 unet/config.json
# (the keys that differ from UNet2DConditionModel's defaults).
SDXL_BASE = dict(
    addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=[1, 2, 10], use_linear_projection=True, upcast_attention=None,
)  # fmt: skip
SDXL_REFINER = dict(
    addition_embed_type="text_time", addition_time_embed_dim=256,
    attention_head_dim=[6, 12, 24, 24],
    block_out_channels=[384, 768, 1536, 1536], cross_attention_dim=1280,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    projection_class_embeddings_input_dim=2560, sample_size=128, transformer_layers_per_block=4,
    use_linear_projection=True,
)  # fmt: skip


def test_real_sdxl_configs_map_and_export_back():
    base = unet_config_from_diffusers(SDXL_BASE, model_class="UNet2DConditionModel")
    assert base.attention == (None, "cross", "cross") and base.mid_attention == "cross"
    assert base.transformer_depth == (1, 2, 10) and base.num_heads == (5, 10, 20)
    assert (base.added_cond, base.added_time_dim, base.added_cond_input_dim) == (
        "text_time", 256, 2816)
    assert base.time_cond_dim is None and base.context_dim == 2048
    refiner = unet_config_from_diffusers(SDXL_REFINER, model_class="UNet2DConditionModel")
    assert refiner.attention == (None, "cross", "cross", None) and refiner.depth(3) == 4
    lcm = unet_config_from_diffusers({**SDXL_BASE, "time_cond_proj_dim": 256},
                                     model_class="UNet2DConditionModel")
    assert lcm.time_cond_dim == 256
    for cfg, raw in ((base, SDXL_BASE), (refiner, SDXL_REFINER), (lcm, SDXL_BASE)):
        out = unet_config_to_diffusers(cfg, sample_size=128)
        for key in ("addition_embed_type", "addition_time_embed_dim",
                    "projection_class_embeddings_input_dim", "block_out_channels",
                    "down_block_types", "up_block_types", "use_linear_projection"):
            assert out[key] == raw[key], key
        assert out["time_cond_proj_dim"] == cfg.time_cond_dim
        assert unet_config_from_diffusers(out) == cfg


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(addition_time_embed_dim=None), "'text_time' needs addition_time_embed_dim"),
        (dict(projection_class_embeddings_input_dim=None),
         "'text_time' needs projection_class_embeddings_input_dim"),
        (dict(addition_embed_type=None),
         "projection_class_embeddings_input_dim=2816 without addition_embed_type='text_time'"),
        (dict(addition_embed_type="text_image"), "addition_embed_type='text_image'"),
        (dict(transformer_layers_per_block=[1, 2, [10, 10]]), "nested tuples are not supported"),
        (dict(reverse_transformer_layers_per_block=[[10, 10, 10], 2, 1]),
         "reverse_transformer_layers_per_block"),
    ],
)
def test_unsupported_sdxl_options(options, match):
    with pytest.raises(ValueError, match=match):
        unet_config_from_diffusers({**SDXL_BASE, **options}, model_class="UNet2DConditionModel")


def test_lora_names_cover_deeper_transformers_and_the_new_layers():
    """LoRA layer names are read off the params, so a level with 2 transformer blocks and the new
    embedding layers are targets under their diffusers names, and kohya's names (diffusers
    module names with ``_``) resolve to them."""
    from jaxdiff.convert.lora_kohya import kohya_names
    from jaxdiff.convert.lora_names import lora_targets

    targets = lora_targets({"unet": init_unet(XL, jax.random.key(0))})
    deep = "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"
    for name in (deep, "unet.up_blocks.0.attentions.1.transformer_blocks.1.ff.net.2",
                 "unet.add_embedding.linear_1", "unet.time_embedding.cond_proj"):
        assert name in targets, name
    assert targets[deep].shape == (8, 32)
    names = kohya_names(targets)
    assert names["lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k"] == deep
