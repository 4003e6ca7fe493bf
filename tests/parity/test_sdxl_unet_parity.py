"""SDXL-shaped and LCM UNets against diffusers' ``UNet2DConditionModel`` (PyTorch), and the
weights' round trip diffusers -> jaxdiff -> diffusers.

Tiny random models (every torch parameter overwritten first, as in tests/parity/
test_unet_parity.py) of the shapes the real configs have:

- SDXL base (stabilityai/stable-diffusion-xl-base-1.0): ``DownBlock2D`` first (no attention at
  full resolution), transformer depth and heads per level (``[1, 2, 10]``, ``[5, 10, 20]`` there),
  linear projections, ``addition_embed_type="text_time"`` with 6 time ids;
- the refiner: 5 time ids (the aesthetic score), one int for the heads, one int for the
  transformer depth (4 there, 2 here), attention only in the middle levels and the mid block;
- an SD 1.x-shaped LCM UNet (LCM_Dreamshaper_v7): ``time_cond_proj_dim``, the guidance-scale
  embedding as ``timestep_cond``;
- the LCM-SDXL UNet: both.

Tolerance: relative error ``max|jax - torch| / max|torch|`` within ``unet_rtol`` (the network's
float32 bound plus the sinusoidal features' at their largest argument, tests/parity/
test_unet_parity.py), where that argument is the largest of the timesteps, the time ids
(image sizes up to 1024) and the guidance embedding's ``1000 (w - 1)``: all three are sinusoids of
the same form (``tolerances.timestep_embedding_atol``) entering the time-embedding MLPs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, UNet2DConditionModel
from flax.traverse_util import flatten_dict

from jaxdiff.convert import from_diffusers, unet_to_diffusers
from jaxdiff.models import UNet, guidance_scale_embedding
from tests.parity.test_unet_parity import randomize, rel_err, unet_rtol
from tests.parity.tolerances import timestep_embedding_atol, within

CONTEXT_DIM, POOLED_DIM, TIME_DIM = 24, 16, 8

# SDXL base's 6 ids: original size, crop top-left, target size; the refiner's 5: the aesthetic
# score instead of the target size.
BASE_IDS = np.array([[1024, 1024, 0, 0, 1024, 1024], [512, 768, 16, 8, 1024, 1024]], np.float32)
REFINER_IDS = np.array([[1024, 1024, 0, 0, 6.0], [768, 512, 32, 0, 2.5]], np.float32)
GUIDANCE = np.array([1.0, 8.5], np.float32)


def sdxl_base(**kw) -> UNet2DConditionModel:
    args = dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32),
        layers_per_block=1, norm_num_groups=8, cross_attention_dim=CONTEXT_DIM,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=[1, 1, 2], attention_head_dim=[1, 2, 4],
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=POOLED_DIM + 6 * TIME_DIM,
    )  # fmt: skip
    args.update(kw)
    return randomize(UNet2DConditionModel(**args), seed=2)


def sdxl_refiner() -> UNet2DConditionModel:
    return sdxl_base(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=2, attention_head_dim=2,
        projection_class_embeddings_input_dim=POOLED_DIM + 5 * TIME_DIM,
    )  # fmt: skip


def lcm_sd15(**kw) -> UNet2DConditionModel:
    args = dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, norm_num_groups=8, cross_attention_dim=CONTEXT_DIM,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
        time_cond_proj_dim=12,
    )  # fmt: skip
    args.update(kw)
    return randomize(UNet2DConditionModel(**args), seed=3)


def compare(model, *, time_ids=None, guidance=None, seed=0):
    """Both models on the same random inputs (batch 2, 8x8, 5 context tokens); returns the
    relative error after checking it against the bound (module docstring)."""
    rng = np.random.default_rng(seed)
    batch = 2
    x = rng.standard_normal((batch, 4, 8, 8)).astype(np.float32)
    t = np.array([999, 3])
    ctx = rng.standard_normal((batch, 5, CONTEXT_DIM)).astype(np.float32)
    kw_t = dict(encoder_hidden_states=torch.from_numpy(ctx))
    kw_j = dict(context=jnp.asarray(ctx))
    args_max = float(t.max())
    if time_ids is not None:
        pooled = rng.standard_normal((batch, POOLED_DIM)).astype(np.float32)
        kw_t["added_cond_kwargs"] = {"text_embeds": torch.from_numpy(pooled),
                                     "time_ids": torch.from_numpy(time_ids)}
        kw_j["added_cond"] = {"text_embeds": jnp.asarray(pooled), "time_ids": jnp.asarray(time_ids)}
        args_max = max(args_max, float(np.abs(time_ids).max()))
    if guidance is not None:
        dim = model.config.time_cond_proj_dim
        w_emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
            None, torch.from_numpy(guidance - 1), embedding_dim=dim)
        kw_t["timestep_cond"] = w_emb
        kw_j["timestep_cond"] = guidance_scale_embedding(jnp.asarray(guidance), dim)
        args_max = max(args_max, 1000 * float(np.abs(guidance - 1).max()))
    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.from_numpy(t), **kw_t).sample.numpy()
    config, params = from_diffusers(model)
    apply = jax.jit(lambda p, x, t, kw: UNet(config).apply({"params": p}, x, t, **kw))
    out = apply(params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), kw_j)
    out = np.asarray(out).transpose(0, 3, 1, 2)
    assert out.shape == ref.shape
    err = rel_err(out, ref)
    print(f"relative error {err:.2e} (max |ref| {np.abs(ref).max():.3g})")
    within(err, unet_rtol(model, args_max), "relative error")
    return config, params


def check_round_trip(model, config, params):
    """jaxdiff's export gives back diffusers' config (on every key the model reads) and exactly
    its weights, under the same keys."""
    state, exported = unet_to_diffusers(params, config, sample_size=model.config.sample_size)
    ref = {k: v.numpy() for k, v in model.state_dict().items()}
    assert set(state) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(state[k], ref[k], err_msg=k)
    for key in ("addition_embed_type", "addition_time_embed_dim", "time_cond_proj_dim",
                "projection_class_embeddings_input_dim", "use_linear_projection"):
        assert exported[key] == model.config[key], key
    rebuilt = UNet2DConditionModel.from_config(
        {k: v for k, v in exported.items() if not k.startswith("_")})
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in ref.items()}


@pytest.mark.slow
def test_sdxl_base_shaped_unet():
    model = sdxl_base()
    config, params = compare(model, time_ids=BASE_IDS)
    assert (config.added_cond, config.added_time_dim, config.added_cond_input_dim) == (
        "text_time", TIME_DIM, POOLED_DIM + 6 * TIME_DIM)
    assert config.attention == (None, "cross", "cross")
    assert [config.depth(lv) for lv in range(3)] == [1, 1, 2]
    # the deepest level's second transformer block exists (and was converted)
    assert "transformer_blocks_1" in params["down_blocks_2"]["attentions_0"]
    check_round_trip(model, config, params)


@pytest.mark.slow
def test_sdxl_refiner_shaped_unet():
    model = sdxl_refiner()
    config, params = compare(model, time_ids=REFINER_IDS, seed=1)
    assert config.added_cond_input_dim == POOLED_DIM + 5 * TIME_DIM
    assert config.attention == (None, "cross", None) and config.mid_attention == "cross"
    check_round_trip(model, config, params)


@pytest.mark.slow
def test_lcm_unet_guidance_embedding():
    model = lcm_sd15()
    config, params = compare(model, guidance=GUIDANCE, seed=2)
    assert config.time_cond_dim == 12
    assert params["time_embedding"]["cond_proj"]["kernel"].shape == (12, 32)
    check_round_trip(model, config, params)


@pytest.mark.slow
def test_lcm_sdxl_unet_both_embeddings():
    model = sdxl_base(time_cond_proj_dim=12)
    config, params = compare(model, time_ids=BASE_IDS, guidance=GUIDANCE, seed=3)
    check_round_trip(model, config, params)


@pytest.mark.parametrize("dim", [4, 13, 256])
def test_guidance_scale_embedding_matches_diffusers(dim):
    """The LCM pipelines' ``w_embedding``: ``get_guidance_scale_embedding(w - 1, dim)``; the
    arguments reach ``1000 (w - 1)``: the timestep features' bound at that argument, per row."""
    w = np.array([1.0, 1.5, 4.0, 8.5, 15.0], np.float32)
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None, torch.from_numpy(w - 1), embedding_dim=dim).numpy()
    out = np.asarray(guidance_scale_embedding(jnp.asarray(w), dim))
    assert out.shape == ref.shape == (5, dim) and out.dtype == np.float32
    bound = np.array([timestep_embedding_atol(1000 * (wi - 1)) for wi in w])[:, None]
    within(np.abs(out - ref), bound, "guidance embedding")
    assert (out[0, : dim // 2] == 0).all() and (out[0, dim // 2: 2 * (dim // 2)] == 1).all()


def test_converted_param_names():
    """The new weights convert by diffusers' names (``add_embedding.linear_1/2``,
    ``time_embedding.cond_proj``, no bias), in a model small enough to build without a test
    tier."""
    model = lcm_sd15(addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
                     projection_class_embeddings_input_dim=POOLED_DIM + 6 * TIME_DIM)
    _, params = from_diffusers(model)
    names = {"/".join(p) for p in flatten_dict(params)}
    assert {"time_embedding/cond_proj/kernel", "add_embedding/linear_1/kernel",
            "add_embedding/linear_1/bias", "add_embedding/linear_2/kernel"} <= names
    assert "time_embedding/cond_proj/bias" not in names
    w = model.state_dict()["time_embedding.cond_proj.weight"].numpy()
    np.testing.assert_array_equal(params["time_embedding"]["cond_proj"]["kernel"], w.T)
