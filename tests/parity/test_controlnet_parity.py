"""The ControlNet against diffusers' ``ControlNetModel`` (PyTorch), the UNet given ControlNet
residuals against ``UNet2DConditionModel``, ``from_unet`` against ``ControlNetModel.from_unet``,
several ControlNets against ``MultiControlNetModel``, and the export round trip (jaxdiff ->
folder -> ``ControlNetModel.from_pretrained``).

Tiny random models (every torch parameter overwritten first, as in tests/parity/
test_unet_parity.py: diffusers zeroes the zero convolutions at init, which would hide a wrong or
missing conversion) of two shapes: SD 1.x (cross-attention at the first level, 32x32 control
images, 4x4 latents, the default 4-width conditioning network) and SDXL (no attention at the
first level, linear projections, transformer depth and heads per level, the ``text_time``
embedding with 6 time ids; 3 conditioning widths, 32x32 control images for 8x8 latents).

Tolerance: each residual's ``max |jax - torch|`` within ``unet_rtol`` (tests/parity/
test_unet_parity.py: the network's float32 bound from its layer count and widest sum, plus the
sinusoidal features' at their largest argument, the timesteps' or the time ids') times the
residual's reference magnitude: ``max |zero conv output|`` times its scale, read from diffusers
by forward hooks (the magnitude the errors are relative to; for a globally pooled residual the
mean can be much smaller than the values it averages, and so its error relative to it larger).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from jaxdiff.convert import (
    controlnet_config_from_diffusers,
    controlnet_from_diffusers,
    from_diffusers,
    save_controlnet,
)
from jaxdiff.models import (
    ControlNet,
    UNet,
    controlnet_from_unet,
    guess_mode_scales,
    multi_controlnet_residuals,
)
from tests.parity.test_unet_parity import randomize, unet_rtol
from tests.parity.tolerances import within

CONTEXT_DIM, POOLED_DIM, TIME_DIM = 24, 16, 8
BATCH = 2
T = np.array([999, 3])
TIME_IDS = np.array([[1024, 1024, 0, 0, 1024, 1024], [512, 768, 16, 8, 1024, 1024]], np.float32)

SD = dict(
    in_channels=4, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=2,
    cross_attention_dim=CONTEXT_DIM,
)  # fmt: skip
SDXL = dict(
    in_channels=4, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=(1, 2),
    transformer_layers_per_block=(1, 2), use_linear_projection=True,
    cross_attention_dim=CONTEXT_DIM, addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=POOLED_DIM + 6 * TIME_DIM,
)  # fmt: skip
SHAPES = {"sd": (SD, (8, 16, 16, 32), 4), "sdxl": (SDXL, (8, 16, 32), 8)}


def tiny_controlnet(kind: str, seed: int = 0, **kw) -> ControlNetModel:
    args, cond_channels, _ = SHAPES[kind]
    return randomize(ControlNetModel(**args, conditioning_embedding_out_channels=cond_channels,
                                     **kw), seed=seed)


def tiny_unet(kind: str, seed: int = 5) -> UNet2DConditionModel:
    args = dict(SHAPES[kind][0])
    args["up_block_types"] = tuple(t.replace("Down", "Up") for t in args["down_block_types"][::-1])
    return randomize(UNet2DConditionModel(**args, sample_size=8, out_channels=4), seed=seed)


def inputs(kind: str, seed: int = 0):
    """The same random inputs for torch (NCHW) and jaxdiff (NHWC), and the largest sinusoid
    argument (timesteps, time ids)."""
    rng = np.random.default_rng(seed)
    size = SHAPES[kind][2]
    x = rng.standard_normal((BATCH, 4, size, size)).astype(np.float32)
    image = rng.uniform(0, 1, (BATCH, 3, 32, 32)).astype(np.float32)
    ctx = rng.standard_normal((BATCH, 5, CONTEXT_DIM)).astype(np.float32)
    kw_t = dict(encoder_hidden_states=torch.from_numpy(ctx))
    kw_j = dict(context=jnp.asarray(ctx))
    args_max = float(T.max())
    if kind == "sdxl":
        pooled = rng.standard_normal((BATCH, POOLED_DIM)).astype(np.float32)
        kw_t["added_cond_kwargs"] = {"text_embeds": torch.from_numpy(pooled),
                                     "time_ids": torch.from_numpy(TIME_IDS)}
        kw_j["added_cond"] = {"text_embeds": jnp.asarray(pooled),
                              "time_ids": jnp.asarray(TIME_IDS)}
        args_max = max(args_max, float(TIME_IDS.max()))
    return (x, image, kw_t), (nhwc(x), nhwc(image), kw_j), args_max


def nhwc(a):
    return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


def torch_residuals(model, x, image, kw, scale, guess_mode):
    """diffusers' residuals, and the magnitude of each (``max |zero conv output| * scale``)."""
    magnitudes = []
    convs = [*model.controlnet_down_blocks, model.controlnet_mid_block]
    hooks = [c.register_forward_hook(lambda m, i, o: magnitudes.append(float(o.abs().max())))
             for c in convs]
    try:
        with torch.no_grad():
            down, mid = model(torch.from_numpy(x), torch.from_numpy(T),
                              controlnet_cond=torch.from_numpy(image), conditioning_scale=scale,
                              guess_mode=guess_mode, return_dict=False, **kw)
    finally:
        for h in hooks:
            h.remove()
    scales = (guess_mode_scales(len(convs)) * scale
              if guess_mode and not model.config.global_pool_conditions else [scale] * len(convs))
    return [r.numpy() for r in (*down, mid)], np.abs(magnitudes) * np.abs(scales)


def check_residuals(model, out, ref, magnitudes, args_max):
    assert len(out) == len(ref)
    bound = unet_rtol(model, args_max)
    for i, (o, r, m) in enumerate(zip(out, ref, magnitudes)):
        assert o.shape == r.shape, (i, o.shape, r.shape)
        within(np.abs(o - r).max(), bound * m, f"residual {i}")


@pytest.mark.slow
@pytest.mark.parametrize("kind, scale, guess_mode, extra", [
    ("sd", 1.3, True, {}),
    ("sd", 0.8, True, dict(global_pool_conditions=True, num_class_embeds=3,
                           controlnet_conditioning_channel_order="bgr")),
    ("sdxl", 0.6, False, {}),
])  # fmt: skip
def test_controlnet_residuals(kind, scale, guess_mode, extra):
    """Every residual (conditioning_scale != 1, guess mode's logspace scales, global pooling
    (where guess mode's scales are not applied), BGR control images, class labels)."""
    model = tiny_controlnet(kind, **extra)
    (x, image, kw_t), (xj, imj, kw_j), args_max = inputs(kind)
    if "num_class_embeds" in extra:
        labels = np.array([2, 0])
        kw_t["class_labels"], kw_j["labels"] = torch.from_numpy(labels), jnp.asarray(labels)
    ref, magnitudes = torch_residuals(model, x, image, kw_t, scale, guess_mode)
    config, params = controlnet_from_diffusers(model)
    apply = jax.jit(lambda p, x, t, im, s, kw: ControlNet(config).apply(
        {"params": p}, x, t, im, conditioning_scale=s, guess_mode=guess_mode, **kw))
    down, mid = apply(params, xj, jnp.asarray(T), imj, jnp.float32(scale), kw_j)
    check_residuals(model, [nchw(r) for r in (*down, mid)], ref, magnitudes, args_max)
    if extra:
        assert config.global_pool_conditions and config.conditioning_channel_order == "bgr"
        assert config.unet.num_classes == 2
        assert all(r.shape[1:3] == (1, 1) for r in (*down, mid))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_unet_with_residuals(kind):
    """The UNet given residuals (random, of magnitude 1, the mid one globally pooled for SD)
    against ``UNet2DConditionModel(down_block_additional_residuals=,
    mid_block_additional_residual=)``."""
    unet = tiny_unet(kind)
    cn = tiny_controlnet(kind)
    (x, image, kw_t), (xj, imj, kw_j), args_max = inputs(kind, seed=1)
    ref_res, _ = torch_residuals(cn, x, image, kw_t, 1.0, False)
    rng = np.random.default_rng(2)
    res = [rng.standard_normal(r.shape).astype(np.float32) for r in ref_res]
    if kind == "sd":
        res[-1] = res[-1].mean(axis=(2, 3), keepdims=True)
    with torch.no_grad():
        ref = unet(torch.from_numpy(x), torch.from_numpy(T),
                   down_block_additional_residuals=[torch.from_numpy(r) for r in res[:-1]],
                   mid_block_additional_residual=torch.from_numpy(res[-1]), **kw_t).sample.numpy()
    config, params = from_diffusers(unet)
    apply = jax.jit(lambda p, x, t, d, m, kw: UNet(config).apply(
        {"params": p}, x, t, down_residuals=d, mid_residual=m, **kw))
    out = nchw(apply(params, xj, jnp.asarray(T), [nhwc(r) for r in res[:-1]], nhwc(res[-1]),
                     kw_j))
    err = np.abs(out - ref).max() / np.abs(ref).max()
    within(err, unet_rtol(unet, args_max), "relative error")
    with torch.no_grad():
        plain = unet(torch.from_numpy(x), torch.from_numpy(T), **kw_t).sample.numpy()
    # the residuals move the output far beyond the tolerance
    assert np.abs(plain - ref).max() > 10 * unet_rtol(unet, args_max) * np.abs(ref).max()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_from_unet_matches_diffusers(kind):
    """``controlnet_from_unet`` against ``ControlNetModel.from_unet``: the same config, the
    same copied weights, zero convolutions zero, and the same parameter names and shapes (the
    conditioning network is random on both sides, from different generators)."""
    unet = tiny_unet(kind)
    cond_channels = SHAPES[kind][1]
    ref = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=cond_channels)
    unet_config, unet_params = from_diffusers(unet)
    config, params = controlnet_from_unet(unet_config, unet_params, jax.random.key(0),
                                          conditioning_embedding_channels=cond_channels)
    assert config == controlnet_config_from_diffusers(dict(ref.config))
    from jaxdiff.convert import controlnet_to_diffusers

    state, _ = controlnet_to_diffusers(params, config)
    ref_state = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in ref_state.items()}
    for k, v in ref_state.items():
        if k.startswith("controlnet_cond_embedding.") and "conv_out" not in k:
            if k.endswith(".weight"):  # drawn (flax's biases start at zero, torch's do not)
                assert np.abs(state[k]).max() > 0, k
            continue
        np.testing.assert_array_equal(state[k], v, err_msg=k)
    zero = [k for k in state if k.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                               "controlnet_cond_embedding.conv_out"))]
    assert zero and all(not state[k].any() for k in zero)


@pytest.mark.slow
def test_multi_controlnet_matches_diffusers():
    """Two SD ControlNets (different weights, images and scales) against
    ``MultiControlNetModel``: the residuals are summed."""
    nets = [tiny_controlnet("sd", seed=s) for s in (0, 1)]
    (x, image, kw_t), (xj, imj, kw_j), args_max = inputs("sd")
    image2 = image[:, :, ::-1].copy()
    scales = [0.5, 1.5]
    with torch.no_grad():
        down, mid = MultiControlNetModel(nets)(
            torch.from_numpy(x), torch.from_numpy(T), controlnet_cond=[
                torch.from_numpy(image), torch.from_numpy(image2)],
            conditioning_scale=scales, return_dict=False, **kw_t)
    ref = [r.numpy() for r in (*down, mid)]
    # the sum's error is at most the sum of both residuals' bounds
    magnitudes = sum(torch_residuals(net, x, im, kw_t, s, False)[1]
                     for net, im, s in zip(nets, (image, image2), scales))
    converted = [controlnet_from_diffusers(net) for net in nets]
    modules = [ControlNet(config) for config, _ in converted]
    run = jax.jit(lambda ps, ims, x, t, kw: multi_controlnet_residuals(
        list(zip(modules, ps, ims, scales)), x, t, **kw))
    d, m = run([p for _, p in converted], [imj, nhwc(image2)], xj, jnp.asarray(T), kw_j)
    check_residuals(nets[0], [nchw(r) for r in (*d, m)], ref, magnitudes, args_max)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_export_round_trip(kind, tmp_path):
    """diffusers -> jaxdiff -> ``save_controlnet`` folder -> ``ControlNetModel.from_pretrained``:
    the same weights bit for bit, hence the same outputs as the original model."""
    model = tiny_controlnet(kind, global_pool_conditions=kind == "sd")
    config, params = controlnet_from_diffusers(model)
    folder = save_controlnet(params, config, tmp_path / "controlnet")
    back = ControlNetModel.from_pretrained(folder).eval()
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k].numpy(), v.numpy(), err_msg=k)
    for key in ("addition_embed_type", "addition_time_embed_dim", "global_pool_conditions",
                "conditioning_embedding_out_channels", "transformer_layers_per_block",
                "attention_head_dim", "use_linear_projection", "cross_attention_dim"):
        a, b = back.config[key], model.config[key]
        assert (list(a) if isinstance(a, (list, tuple)) else a) == (
            list(b) if isinstance(b, (list, tuple)) else b), key
    (x, image, kw_t), _, _ = inputs(kind)
    out, _ = torch_residuals(back, x, image, kw_t, 0.9, True)
    ref, _ = torch_residuals(model, x, image, kw_t, 0.9, True)
    for o, r in zip(out, ref):
        np.testing.assert_array_equal(o, r)
