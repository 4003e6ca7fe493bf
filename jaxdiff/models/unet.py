"""The diffusion UNet (NHWC, Flax linen): its blocks, fast init, and the MNIST preset.

The hyper-parameters are a :class:`UNetConfig` (:mod:`jaxdiff.models.unet_config`).

One architecture covers diffusers' ``UNet2DModel`` (``DownBlock2D`` / ``AttnDownBlock2D``,
``UNetMidBlock2D``, class embeddings) and ``UNet2DConditionModel`` (``CrossAttnDownBlock2D``,
``UNetMidBlock2DCrossAttn``, cross-attention to a ``[B, L, D]`` context), SDXL's included (its
``"text_time"`` added embedding: ``added_cond``) and the LCM-distilled UNets (the guidance-scale
embedding: ``timestep_cond``); the parameter tree uses diffusers' module names, so
:mod:`jaxdiff.convert` maps a PyTorch state dict by name.

    >>> import jax, jax.numpy as jnp
    >>> cfg = mnist_unet_config()
    >>> params = init_unet(cfg, jax.random.key(0))          # numpy on the host, no compilation
    >>> sum(p.size for p in jax.tree.leaves(params))
    1661873
    >>> x, t, y = jnp.zeros((2, 28, 28, 1)), jnp.array([0, 999]), jnp.array([3, 10])  # 10: null
    >>> apply = lambda p: UNet(cfg).apply({"params": p}, x, t, labels=y)
    >>> jax.eval_shape(apply, params).shape                 # traced only; jax.jit(apply) runs it
    (2, 28, 28, 1)

Spatial sizes need not be powers of two: a downsample maps ``H -> ceil(H / 2)`` and the matching
upsample resizes back to the skip connection's size (``28 -> 14 -> 7 -> 4 -> 7 -> 14 -> 28``), as
``UNet2DConditionModel`` does with ``forward_upsample_size``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.attention import SpatialSelfAttention, Transformer2D
from jaxdiff.models.embeddings import ClassTokens, TimestepEmbedding, timestep_embedding
from jaxdiff.models.resnet import Downsample, ResnetBlock, Upsample, conv3x3, group_norm
from jaxdiff.models.unet_config import UNetConfig
from jaxdiff.models.unet_inputs import check_inputs

__all__ = [
    "UNetConfig",
    "UNet",
    "init_unet",
    "unet_dummy_inputs",
    "unet_param_shapes",
    "mnist_unet_config",
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


class UNet(nn.Module):
    """The diffusion UNet. ``UNet(config).apply({"params": p}, x, t, labels=, context=,
    added_cond=, timestep_cond=)``.

    Attributes:
      config: a :class:`UNetConfig`.
    """

    config: UNetConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        *,
        labels: jax.Array | None = None,
        context: jax.Array | None = None,
        added_cond: Mapping[str, jax.Array] | None = None,
        timestep_cond: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        """Predict from a noisy image.

        Args:
          x: ``[B, H, W, in_channels]`` the noisy sample (any ``H, W >= 1``).
          t: ``[B]`` (or a scalar, broadcast) int or float timesteps.
          labels: ``[B]`` int class labels in ``[0, num_classes]`` (``num_classes`` is the null
            label for classifier-free guidance); required iff ``config.num_classes`` is set.
            Concrete out-of-range labels raise; traced ones make that example's output NaN.
          context: ``[B, L, context_dim]`` cross-attention context; required when the config has
            cross-attention layers and no class tokens. With ``class_conditioning=
            "cross_attention"`` the class tokens are prepended to it.
          added_cond: ``{"text_embeds": [B, P], "time_ids": [B, K]}`` (diffusers'
            ``added_cond_kwargs``; SDXL: the pooled text embedding and the 6 micro-conditioning
            ids, 5 for the refiner), int or float; required iff ``config.added_cond`` is set,
            with ``P + K * added_time_dim == added_cond_input_dim``.
          timestep_cond: ``[B, time_cond_dim]`` float, the guidance-scale embedding of an
            LCM-distilled UNet (:func:`jaxdiff.models.guidance_scale_embedding`); required iff
            ``config.time_cond_dim`` is set.
          train: enables dropout (then pass ``rngs={"dropout": key}``).

        Returns:
          ``[B, H, W, out_channels]`` in ``x``'s dtype.

        Raises:
          ValueError at trace time, naming the argument, for a wrong rank / channel count / batch
          / width, a missing or unexpected ``labels`` / ``context`` / ``added_cond`` (or a key of
          it) / ``timestep_cond``, or concrete out-of-range labels.
        """
        cfg = self.config
        x, t, labels, context, added_cond, timestep_cond = check_inputs(
            cfg, x, t, labels, context, added_cond=added_cond, timestep_cond=timestep_cond
        )
        out_dtype = x.dtype
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        c0, n_levels = cfg.block_channels[0], len(cfg.block_channels)
        if cfg.center_input_sample:
            x = 2 * x - 1.0

        temb = timestep_embedding(
            t, c0, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
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
        if cfg.num_classes is not None:
            # A traced label outside [0, num_classes] reads NaN (the lookup's fill value) instead
            # of a clamped or wrapped-around row (-1 would silently be the null label).
            valid = (labels >= 0) & (labels <= cfg.num_classes)
            labels = jnp.where(valid, labels, cfg.num_classes + 1)
        if cfg.num_classes is not None and cfg.class_conditioning == "embedding":
            emb = nn.Embed(
                cfg.num_classes + 1, cfg.time_dim, embedding_init=nn.initializers.normal(1.0),
                name="class_embedding", **kw,
            )  # fmt: skip
            temb = temb + emb(labels)
        elif cfg.num_classes is not None:
            tokens = ClassTokens(
                cfg.num_classes + 1, cfg.num_class_tokens, cfg.context_dim,
                name="class_tokens", **kw,
            )(labels)  # fmt: skip
            context = tokens if context is None else jnp.concatenate(
                [tokens, context.astype(tokens.dtype)], axis=1
            )  # fmt: skip

        def level(cls, l, attention, num_layers, **extra):
            if cfg.remat:  # recompute the block's activations in the backward pass
                cls = nn.remat(cls, static_argnums=REMAT_STATIC[cls])
            return cls(
                cfg.block_channels[l], num_layers, attention, cfg.heads(l), cfg.depth(l),
                cfg.norm_groups, cfg.norm_eps, cfg.dropout, cfg.use_linear_projection, **kw,
                attention_implementation=cfg.attention_implementation, **extra,
            )  # fmt: skip

        h = conv3x3(c0, name="conv_in", **kw)(x)
        skips = [h]
        for l in range(n_levels):
            block = level(
                DownBlock, l, cfg.attention[l], cfg.layers(l),
                add_downsample=l < n_levels - 1, name=f"down_blocks_{l}",
            )  # fmt: skip
            h, s = block(h, temb, context, train)
            skips += s
        if cfg.mid_block:
            mid = level(
                MidBlock, n_levels - 1, cfg.mid_attention, cfg.mid_layers,
                scale_factor=cfg.mid_block_scale_factor, name="mid_block",
            )  # fmt: skip
            h = mid(h, temb, context, train)
        for i, l in enumerate(reversed(range(n_levels))):
            n = cfg.layers(l) + 1
            res, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[1:3]) if l > 0 else None
            block = level(
                UpBlock, l, cfg.up_kinds[l], n, add_upsample=l > 0, name=f"up_blocks_{i}"
            )
            h = block(h, res, temb, context, size, train)

        h = nn.silu(group_norm(cfg.norm_groups, cfg.norm_eps, name="conv_norm_out", **kw)(h))
        h = conv3x3(cfg.out_channels, name="conv_out", **kw)(h)
        return h.astype(out_dtype)


def unet_dummy_inputs(
    config: UNetConfig, *, batch: int = 1, image_size: Sequence[int] = (8, 8)
) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of zeros for ``UNet(config).init(key, *args, **kwargs)``: ``x``,
    ``t`` and whichever of ``labels``, ``context``, ``added_cond`` (one time id, the rest of
    ``added_cond_input_dim`` as ``text_embeds``: the parameters do not depend on the split) and
    ``timestep_cond`` the config requires."""
    x = jnp.zeros((batch, *image_size, config.in_channels), jnp.float32)
    kwargs = {}
    if config.num_classes is not None:
        kwargs["labels"] = jnp.zeros((batch,), jnp.int32)
    if config.needs_context:
        kwargs["context"] = jnp.zeros((batch, 1, config.context_dim), jnp.float32)
    if config.added_cond is not None:
        # the smallest split of added_cond_input_dim: one time id, the rest text_embeds
        kwargs["added_cond"] = {
            "text_embeds": jnp.zeros(
                (batch, config.added_cond_input_dim - config.added_time_dim), jnp.float32
            ),
            "time_ids": jnp.zeros((batch, 1), jnp.float32),
        }
    if config.time_cond_dim is not None:
        kwargs["timestep_cond"] = jnp.zeros((batch, config.time_cond_dim), jnp.float32)
    return (x, jnp.zeros((batch,), jnp.int32)), kwargs


def unet_param_shapes(config: UNetConfig) -> dict:
    """The ``jax.ShapeDtypeStruct`` tree of ``UNet(config)``'s params (traced, not computed)."""
    args, kwargs = unet_dummy_inputs(config)
    init = lambda key: UNet(config).init(key, *args, **kwargs)["params"]  # noqa: E731
    return jax.eval_shape(init, jax.random.key(0))


_TRUNC = 0.87962566103423978  # std of a standard normal truncated to [-2, 2]


def _truncated_normal(rng: np.random.Generator, n: int) -> np.ndarray:
    z = rng.standard_normal(n)
    while (bad := np.abs(z) > 2).any():
        z[bad] = rng.standard_normal(int(bad.sum()))
    return z


def init_unet(config: UNetConfig, key: jax.Array) -> dict:
    """Initialise the ``"params"`` of ``UNet(config)``, fast, on the host.

    The same tree and the same distributions as ``UNet(config).init(key, ...)["params"]``
    (flax's defaults: conv and dense kernels LeCun-normal, i.e. a normal truncated to 2 std with
    variance ``1 / fan_in``; biases 0; norm scales 1; embedding tables standard normal), drawn
    with numpy from a generator seeded by ``key``'s data. Deterministic in ``key``. Nothing is
    traced or compiled (``init`` compiles one random draw per parameter); use
    ``UNet(config).init`` where the init must be traced (``vmap`` over keys, init inside ``jit``).
    The values differ from ``init``'s for the same key.

    Args:
      config: the model config.
      key: a concrete PRNG key (typed or raw ``uint32``).

    Returns:
      A nested dict of ``jax.Array`` in ``config.param_dtype``.

    Raises:
      ValueError: ``key`` is a tracer (inside ``jit`` / ``vmap``).
    """
    if isinstance(key, jax.core.Tracer):
        raise ValueError("init_unet needs a concrete key; under jit/vmap use UNet(config).init")
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    rng = np.random.default_rng(np.asarray(data, np.uint32).ravel().tolist())
    flat, treedef = jax.tree_util.tree_flatten_with_path(unet_param_shapes(config))
    leaves = []
    for path, spec in flat:
        name, shape = path[-1].key, spec.shape
        n = int(np.prod(shape))
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            value = _truncated_normal(rng, n) * (np.sqrt(1.0 / fan_in) / _TRUNC)
        elif name == "embedding":
            value = rng.standard_normal(n)
        elif name == "scale":
            value = np.ones(n)
        elif name == "bias":
            value = np.zeros(n)
        else:  # pragma: no cover - a new parameter kind must be added here
            raise NotImplementedError(f"no initializer for parameter {jax.tree_util.keystr(path)}")
        leaves.append(jnp.asarray(value.reshape(shape), config.param_dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def mnist_unet_config(num_classes: int | None = 10, **overrides) -> UNetConfig:
    """A UNet preset for 28x28x1 MNIST (not the model ``experiments/configs/mnist.py`` trains):
    class-conditional through cross-attention to 4 learned class tokens per label.

    Four levels, 28 / 14 / 7 / 4 pixels with 16 / 32 / 64 / 64 channels, one resnet per level
    (two on the way up), cross-attention transformers (4 heads) at 7x7, 4x4 and in the middle,
    GroupNorm 8 groups; no attention at 28x28 and 14x14, where its cost grows with the square of
    the number of pixels. 1,661,873 parameters with ``num_classes=10`` (the module example
    checks it).

    Args:
      num_classes: the number of classes; label ``num_classes`` is the null label for
        classifier-free guidance. ``None``: unconditional, and the transformers become
        self-attention blocks.
      **overrides: :class:`UNetConfig` fields that replace the preset's.

    Returns:
      A :class:`UNetConfig`.

    Raises:
      ValueError: from :class:`UNetConfig` when an override is invalid.
    """
    fields = dict(
        in_channels=1,
        out_channels=1,
        block_channels=(16, 32, 64, 64),
        layers_per_block=1,
        attention=(None, None, "cross", "cross"),
        mid_attention="cross",
        num_heads=4,
        norm_groups=8,
        context_dim=64,
        num_classes=num_classes,
        class_conditioning="cross_attention",
        num_class_tokens=4,
    )
    if num_classes is None:
        fields.update(attention=(None, None, "self", "self"), mid_attention="self")
        fields.update(context_dim=None, class_conditioning="embedding", num_class_tokens=1)
    fields.update(overrides)
    return UNetConfig(**fields)
