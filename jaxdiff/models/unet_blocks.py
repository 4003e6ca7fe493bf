"""The UNet's building blocks and the parts of its forward pass that the ControlNet shares.

:class:`DownBlock`, :class:`MidBlock` and :class:`UpBlock` are diffusers' down / mid / up blocks
(parameter names as diffusers' modules). :func:`embed_conditions` (the time embedding, SDXL's
added embedding, class labels), :func:`level_block` (one block of a level, as the config says)
and :func:`down_and_mid` (``conv_in``'s output through the down blocks and the mid block) are the
one home of that code: :class:`~jaxdiff.models.UNet` and :class:`~jaxdiff.models.ControlNet`
both call them, so a ControlNet copied from a UNet has the same parameter tree under the same
names (``time_embedding``, ``add_embedding``, ``down_blocks_<l>``, ``mid_block``).

The three functions create Flax submodules: call them inside a module's ``@nn.compact`` method
(the submodules then belong to that module).
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.attention import SpatialSelfAttention, Transformer2D
from jaxdiff.models.embeddings import ClassTokens, TimestepEmbedding, timestep_embedding
from jaxdiff.models.resnet import Downsample, ResnetBlock, Upsample
from jaxdiff.models.unet_config import UNetConfig

__all__ = [
    "DownBlock",
    "MidBlock",
    "UpBlock",
    "REMAT_STATIC",
    "embed_conditions",
    "level_block",
    "down_and_mid",
]


class _Level(nn.Module):
    """Shared fields of the down/mid/up blocks of one resolution level."""

    features: int
    num_layers: int
    attention: str | None
    heads: int
    depth: int
    groups: int
    eps: float
    dropout: float
    use_linear_projection: bool
    dtype: jnp.dtype | None
    param_dtype: jnp.dtype
    attention_implementation: str | None = None

    def _resnet(self, i: int, scale: float = 1.0) -> ResnetBlock:
        return ResnetBlock(
            self.features, self.groups, self.eps, self.dropout, scale,
            dtype=self.dtype, param_dtype=self.param_dtype, name=f"resnets_{i}",
        )  # fmt: skip

    def _attend(self, i: int, h: jax.Array, context: jax.Array | None, scale: float = 1.0):
        kw = dict(
            dtype=self.dtype, param_dtype=self.param_dtype, name=f"attentions_{i}",
            implementation=self.attention_implementation,
        )  # fmt: skip
        if self.attention == "self":
            return SpatialSelfAttention(self.heads, self.groups, self.eps, scale, **kw)(h)
        if self.attention == "cross":
            return Transformer2D(
                self.heads, self.depth, self.groups, self.use_linear_projection, **kw
            )(h, context)
        return h


class DownBlock(_Level):
    """``num_layers`` x (resnet [+ attention]), then an optional stride-2 downsample.

    diffusers ``DownBlock2D`` / ``AttnDownBlock2D`` / ``CrossAttnDownBlock2D``. Returns the output
    and the skip connections (every layer's output, then the downsampled one).
    """

    add_downsample: bool = True

    @nn.compact
    def __call__(self, h, temb, context, train: bool = False):
        """``h: [B, H, W, C_in]`` -> ``([B, H', W', features], skips)``."""
        skips = []
        for i in range(self.num_layers):
            h = self._resnet(i)(h, temb, train=train)
            h = self._attend(i, h, context)
            skips.append(h)
        if self.add_downsample:
            h = Downsample(
                self.features, self.dtype, self.param_dtype, name="downsamplers_0"
            )(h)
            skips.append(h)
        return h, skips


class MidBlock(_Level):
    """resnet, then ``num_layers`` x ([attention +] resnet), all scaled by ``scale_factor``.

    diffusers ``UNetMidBlock2D`` (self-attention; ``num_layers=0`` is the attention-free mid block
    of ``UNet2DConditionModel``) and ``UNetMidBlock2DCrossAttn`` (the transformer is not rescaled).
    """

    scale_factor: float = 1.0

    @nn.compact
    def __call__(self, h, temb, context, train: bool = False):
        """``h: [B, H, W, C]`` -> ``[B, H, W, C]``."""
        h = self._resnet(0, self.scale_factor)(h, temb, train=train)
        for i in range(self.num_layers):
            h = self._attend(i, h, context, self.scale_factor)
            h = self._resnet(i + 1, self.scale_factor)(h, temb, train=train)
        return h


class UpBlock(_Level):
    """``num_layers`` x (concat skip, resnet [+ attention]), then an optional upsample.

    diffusers ``UpBlock2D`` / ``AttnUpBlock2D`` / ``CrossAttnUpBlock2D``: the skips are consumed
    last-first and concatenated after ``h`` on the channel axis.
    """

    add_upsample: bool = True

    @nn.compact
    def __call__(self, h, skips, temb, context, upsample_size=None, train: bool = False):
        """``h: [B, H, W, C]``, ``skips``: ``num_layers`` arrays -> ``[B, H', W', features]``."""
        skips = list(skips)
        for i in range(self.num_layers):
            h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
            h = self._resnet(i)(h, temb, train=train)
            h = self._attend(i, h, context)
        if self.add_upsample:
            h = Upsample(self.features, self.dtype, self.param_dtype, name="upsamplers_0")(
                h, upsample_size
            )
        return h


# The static (non-array) arguments of each block's ``__call__`` for ``nn.remat`` (``self`` is 0).
REMAT_STATIC = {DownBlock: (4,), MidBlock: (4,), UpBlock: (5, 6)}


def level_block(cfg: UNetConfig, cls: type, level: int, attention: str | None, num_layers: int,
                **extra) -> nn.Module:
    """The block ``cls`` (:class:`DownBlock`, :class:`MidBlock` or :class:`UpBlock`) of ``level``
    with the config's channels, heads, transformer depth, norms and dtypes, under ``nn.remat``
    when ``cfg.remat``. ``extra``: the block's own fields and its ``name``."""
    if cfg.remat:  # recompute the block's activations in the backward pass
        cls = nn.remat(cls, static_argnums=REMAT_STATIC[cls])
    return cls(
        cfg.block_channels[level], num_layers, attention, cfg.heads(level), cfg.depth(level),
        cfg.norm_groups, cfg.norm_eps, cfg.dropout, cfg.use_linear_projection,
        dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        attention_implementation=cfg.attention_implementation, **extra,
    )  # fmt: skip


def embed_conditions(
    cfg: UNetConfig,
    t: jax.Array,
    labels: jax.Array | None,
    context: jax.Array | None,
    added_cond: Mapping[str, jax.Array] | None,
    timestep_cond: jax.Array | None,
) -> tuple[jax.Array, jax.Array | None]:
    """The time embedding ``temb: [B, time_dim]`` (sinusoid -> ``time_embedding``, plus SDXL's
    ``add_embedding`` and the class embedding) and the cross-attention context (with the class
    tokens prepended under ``class_conditioning="cross_attention"``).

    The inputs are those :func:`~jaxdiff.models.unet_inputs.check_inputs` returns (validated).
    A traced label outside ``[0, num_classes]`` reads NaN (the lookup's fill value) instead of a
    clamped or wrapped-around row (-1 would silently be the null label).
    """
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    temb = timestep_embedding(
        t, cfg.block_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
    ).astype(cfg.dtype)
    if timestep_cond is not None:
        timestep_cond = timestep_cond.astype(cfg.dtype)
    temb = TimestepEmbedding(cfg.time_dim, name="time_embedding", **kw)(temb, timestep_cond)
    if added_cond is not None:  # "text_time": SDXL's pooled text + micro-conditioning
        ids = added_cond["time_ids"]
        ids = timestep_embedding(
            ids.reshape(-1), cfg.added_time_dim, flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
        ).reshape(ids.shape[0], -1)  # fmt: skip
        add = jnp.concatenate([added_cond["text_embeds"], ids], axis=-1).astype(cfg.dtype)
        temb = temb + TimestepEmbedding(cfg.time_dim, name="add_embedding", **kw)(add)
    if cfg.num_classes is None:
        return temb, context
    valid = (labels >= 0) & (labels <= cfg.num_classes)
    labels = jnp.where(valid, labels, cfg.num_classes + 1)
    if cfg.class_conditioning == "embedding":
        emb = nn.Embed(
            cfg.num_classes + 1, cfg.time_dim, embedding_init=nn.initializers.normal(1.0),
            name="class_embedding", **kw,
        )  # fmt: skip
        return temb + emb(labels), context
    tokens = ClassTokens(
        cfg.num_classes + 1, cfg.num_class_tokens, cfg.context_dim, name="class_tokens", **kw,
    )(labels)  # fmt: skip
    context = tokens if context is None else jnp.concatenate(
        [tokens, context.astype(tokens.dtype)], axis=1
    )  # fmt: skip
    return temb, context


def down_and_mid(
    cfg: UNetConfig, h: jax.Array, temb: jax.Array, context: jax.Array | None, train: bool
) -> tuple[jax.Array, list[jax.Array]]:
    """``conv_in``'s output ``h: [B, H, W, block_channels[0]]`` through the down blocks
    (``down_blocks_<l>``) and the mid block (``mid_block``, if the config has one).

    Returns:
      ``(h, skips)``: ``h`` the mid block's output (the last down block's without a mid block);
      ``skips`` the skip connections in diffusers' order (``down_block_res_samples``): the input
      ``h``, then each down block's layer outputs and its downsampled output.
    """
    n_levels = len(cfg.block_channels)
    skips = [h]
    for lv in range(n_levels):
        block = level_block(
            cfg, DownBlock, lv, cfg.attention[lv], cfg.layers(lv),
            add_downsample=lv < n_levels - 1, name=f"down_blocks_{lv}",
        )  # fmt: skip
        h, s = block(h, temb, context, train)
        skips += s
    if cfg.mid_block:
        mid = level_block(
            cfg, MidBlock, n_levels - 1, cfg.mid_attention, cfg.mid_layers,
            scale_factor=cfg.mid_block_scale_factor, name="mid_block",
        )  # fmt: skip
        h = mid(h, temb, context, train)
    return h, skips
