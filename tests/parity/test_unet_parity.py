"""The converted UNet against diffusers' ``UNet2DModel`` / ``UNet2DConditionModel`` (PyTorch).

Tiny random models; every torch parameter is overwritten with random values first (torch zeros
some layers at init, which would hide a wrong or missing conversion). Inputs are NCHW for torch
and transposed to NHWC for jaxdiff. Timesteps span 0..999 in one batch.

Tolerance: relative error ``max|jax - torch| / max|torch|`` within ``unet_rtol``: the network's
float32 bound (``tolerances.network_rtol`` from its layer count and widest sum) plus that of its
sinusoidal timestep features at the largest timestep (an O(1) input whose error the normalised
network carries with a factor ~1).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from jaxdiff.convert import from_diffusers
from jaxdiff.models import UNet
from tests.parity.tolerances import (
    network_rtol,
    timestep_embedding_atol,
    torch_layers,
    within,
)


def unet_rtol(model, t_max) -> float:
    """The bound on a UNet's relative error (module docstring)."""
    return network_rtol(*torch_layers(model)) + timestep_embedding_atol(t_max)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with random values (norm scales around 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm_scale = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_(1.0 + 0.2 * noise if is_norm_scale else 0.2 * noise)
    return model.eval()


def tiny_unet2d(**kw) -> UNet2DModel:
    """A random class-conditional ``UNet2DModel`` with self-attention at the second level."""
    args = dict(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=16,
        num_class_embeds=5,
    )  # fmt: skip
    args.update(kw)
    return randomize(UNet2DModel(**args))


def tiny_unet2d_condition(**kw) -> UNet2DConditionModel:
    """A random ``UNet2DConditionModel`` with cross-attention (context width 24)."""
    args = dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
        attention_head_dim=2, cross_attention_dim=24,
    )  # fmt: skip
    args.update(kw)
    return randomize(UNet2DConditionModel(**args), seed=1)


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def compare(model, *, batch=4, size=(8, 8), t=None, labels=False, context_len=None, seed=0):
    """Run both models on the same random inputs; return the relative error."""
    rng = np.random.default_rng(seed)
    cin = model.config.in_channels
    x = rng.standard_normal((batch, cin, *size)).astype(np.float32)
    t = np.array([0, 1, 500, 999][:batch] if t is None else t)
    kw_t, kw_j = {}, {}
    if labels:
        y = rng.integers(0, model.config.num_class_embeds, batch)
        kw_t["class_labels"], kw_j["labels"] = torch.from_numpy(y), jnp.asarray(y)
    if context_len is not None:
        ctx = rng.standard_normal((batch, context_len, model.config.cross_attention_dim))
        ctx = ctx.astype(np.float32)
        kw_t["encoder_hidden_states"], kw_j["context"] = torch.from_numpy(ctx), jnp.asarray(ctx)
    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.from_numpy(t), **kw_t).sample.numpy()
    config, params = from_diffusers(model)
    apply = jax.jit(lambda p, x, t, kw: UNet(config).apply({"params": p}, x, t, **kw))
    out = apply(params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), kw_j)
    out = np.asarray(out).transpose(0, 3, 1, 2)
    assert out.shape == ref.shape
    err = rel_err(out, ref)
    print(f"relative error {err:.2e} (max |ref| {np.abs(ref).max():.3g})")
    within(err, unet_rtol(model, float(np.max(t))), "relative error")
    return err


@pytest.mark.slow
def test_unet2d_attention_class_embeddings():
    """Self-attention down/mid/up blocks, class embeddings, two resnets per level."""
    compare(tiny_unet2d(layers_per_block=2), labels=True)


@pytest.mark.slow
def test_unet2d_time_embedding_options():
    """DDPM-style sinusoid (sin first, divisor ``half - 1``), float timesteps, and the other
    UNet2DModel knobs (mid-block scale factor, one head, time-embedding width, centring)."""
    model = tiny_unet2d(
        flip_sin_to_cos=False, freq_shift=1, mid_block_scale_factor=math.sqrt(2),
        attention_head_dim=None, time_embedding_dim=48, center_input_sample=True,
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"), num_class_embeds=None,
    )  # fmt: skip
    t = np.array([0.0, 17.25, 500.0, 998.75], np.float32)
    compare(model, t=t)


@pytest.mark.slow
def test_unet2d_condition_cross_attention_odd_size():
    """Three levels, heads per level, and 10x7 images: 10 -> 5 -> 3 and back, where diffusers
    forwards the skip connection's size to the upsampler."""
    model = tiny_unet2d_condition(
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 2, 4),
    )  # fmt: skip
    compare(model, size=(10, 7), context_len=5)


@pytest.mark.slow
def test_unet2d_condition_linear_projection_classes_depth():
    """Linear proj_in/out, class embeddings, two transformer blocks, per-level resnet counts,
    the attention-free mid block."""
    model = tiny_unet2d_condition(
        use_linear_projection=True, num_class_embeds=3, transformer_layers_per_block=2,
        layers_per_block=(1, 2), mid_block_type="UNetMidBlock2D", mid_block_scale_factor=2.0,
    )  # fmt: skip
    compare(model, labels=True, context_len=2)


@pytest.mark.parametrize("flip, shift", [(True, 0), (False, 1), (True, 1)])
def test_timestep_embedding_matches(flip, shift):
    from diffusers.models.embeddings import get_timestep_embedding

    from jaxdiff.models import timestep_embedding

    t = np.array([0, 1, 10, 250.5, 999])
    for dim in (32, 33):
        ref = get_timestep_embedding(torch.from_numpy(t), dim, flip, shift).numpy()
        out = np.asarray(timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip,
                                            freq_shift=shift))  # fmt: skip
        # float32 sin / cos of arguments up to t: tolerances.timestep_embedding_atol, per row
        bound = np.array([timestep_embedding_atol(ti) for ti in t])[:, None]
        within(np.abs(out - ref), bound, "embedding")
