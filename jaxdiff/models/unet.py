"""The diffusion UNet (NHWC, Flax linen), its fast init, and the MNIST preset.

The hyper-parameters are a :class:`UNetConfig` (:mod:`jaxdiff.models.unet_config`).

One architecture covers diffusers' ``UNet2DModel`` (``DownBlock2D`` / ``AttnDownBlock2D``,
``UNetMidBlock2D``, class embeddings) and ``UNet2DConditionModel`` (``CrossAttnDownBlock2D``,
``UNetMidBlock2DCrossAttn``, cross-attention to a ``[B, L, D]`` context), SDXL's included (its
``"text_time"`` added embedding: ``added_cond``) and the LCM-distilled UNets (the guidance-scale
embedding: ``timestep_cond``); it adds a ControlNet's residuals to its skip connections and mid
block (``down_residuals``, ``mid_residual``: :class:`~jaxdiff.models.ControlNet`). The blocks
live in :mod:`jaxdiff.models.unet_blocks`; the parameter tree uses diffusers' module names, so
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

from jaxdiff.models.host_init import host_init
from jaxdiff.models.resnet import conv3x3, group_norm
from jaxdiff.models.unet_blocks import (  # noqa: F401 (DownBlock, MidBlock: re-exported)
    DownBlock,
    MidBlock,
    UpBlock,
    down_and_mid,
    embed_conditions,
    level_block,
)
from jaxdiff.models.unet_config import UNetConfig
from jaxdiff.models.unet_inputs import check_inputs, check_residuals

__all__ = [
    "UNetConfig",
    "UNet",
    "init_unet",
    "unet_dummy_inputs",
    "unet_param_shapes",
    "mnist_unet_config",
]


class UNet(nn.Module):
    """The diffusion UNet. ``UNet(config).apply({"params": p}, x, t, labels=, context=,
    added_cond=, timestep_cond=, down_residuals=, mid_residual=)``.

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
        down_residuals: Sequence[jax.Array] | None = None,
        mid_residual: jax.Array | None = None,
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
          down_residuals: a ControlNet's residuals for the skip connections (diffusers'
            ``down_block_additional_residuals``; :class:`~jaxdiff.models.ControlNet` returns
            them): one array per skip, in diffusers' order (``conv_in``'s output, then each down
            block's layer outputs and its downsampled output), each ``[B, h, w, C]`` with the
            skip's shape, or ``[B, 1, 1, C]`` (a globally pooled ControlNet's, broadcast); added
            to the skips (the down path itself is unchanged). Given together with
            ``mid_residual``.
          mid_residual: ``[B, h, w, C]`` (or ``[B, 1, 1, C]``), added to the mid block's output
            (diffusers' ``mid_block_additional_residual``). Neither given: no extra operation.
          train: enables dropout (then pass ``rngs={"dropout": key}``).

        Returns:
          ``[B, H, W, out_channels]`` in ``x``'s dtype.

        Raises:
          ValueError at trace time, naming the argument, for a wrong rank / channel count / batch
          / width, a missing or unexpected ``labels`` / ``context`` / ``added_cond`` (or a key of
          it) / ``timestep_cond``, concrete out-of-range labels, or ``down_residuals`` /
          ``mid_residual`` given alone, of the wrong count, shape or dtype.
        """
        cfg = self.config
        x, t, labels, context, added_cond, timestep_cond = check_inputs(
            cfg, x, t, labels, context, added_cond=added_cond, timestep_cond=timestep_cond
        )
        out_dtype = x.dtype
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        n_levels = len(cfg.block_channels)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        temb, context = embed_conditions(cfg, t, labels, context, added_cond, timestep_cond)
        h = conv3x3(cfg.block_channels[0], name="conv_in", **kw)(x)
        h, skips = down_and_mid(cfg, h, temb, context, train)
        if down_residuals is not None or mid_residual is not None:
            down_residuals, mid_residual = check_residuals(skips, h, down_residuals, mid_residual)
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_residuals)]
            h = h + mid_residual.astype(h.dtype)
        for i, lv in enumerate(reversed(range(n_levels))):
            n = cfg.layers(lv) + 1
            res, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[1:3]) if lv > 0 else None
            block = level_block(
                cfg, UpBlock, lv, cfg.up_kinds[lv], n, add_upsample=lv > 0, name=f"up_blocks_{i}"
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
    return host_init(unet_param_shapes(config), key, config.param_dtype, what="init_unet")


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
