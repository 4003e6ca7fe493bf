"""The ControlNet (NHWC, Flax linen): diffusers' ``ControlNetModel``.

A copy of a UNet's encoder (the same blocks, :mod:`jaxdiff.models.unet_blocks`, under the same
names) reads the noisy latents plus an embedding of a control image (an edge map, a depth map,
a pose) and returns one residual per skip connection of the UNet and one for its mid block,
through 1x1 convolutions initialised to zero (``controlnet_down_blocks_<i>``,
``controlnet_mid_block``): :class:`~jaxdiff.models.UNet` adds them (``down_residuals=``,
``mid_residual=``). Parameter names follow diffusers' modules, so
:mod:`jaxdiff.convert` maps a ``ControlNetModel`` state dict by name.

    >>> import jax, jax.numpy as jnp
    >>> from jaxdiff.models import UNetConfig, controlnet_config_from_unet
    >>> unet = UNetConfig(in_channels=4, out_channels=4, block_channels=(32, 64),
    ...                   layers_per_block=1, attention=("cross", None), mid_attention="cross",
    ...                   num_heads=2, norm_groups=8, context_dim=24)
    >>> cfg = controlnet_config_from_unet(unet, conditioning_embedding_channels=(8, 16, 16, 32))
    >>> x, t = jnp.zeros((1, 4, 4, 4)), jnp.array([500])
    >>> image, ctx = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 7, 24))  # 8x the latent grid
    >>> net = ControlNet(cfg)
    >>> init = lambda key: net.init(key, x, t, image, context=ctx)["params"]
    >>> params = jax.eval_shape(init, jax.random.key(0))    # traced only; jax.jit(init) runs it
    >>> down, mid = jax.eval_shape(lambda p: net.apply(
    ...     {"params": p}, x, t, image, context=ctx, conditioning_scale=0.5), params)
    >>> [r.shape[1:] for r in down], mid.shape
    ([(4, 4, 32), (4, 4, 32), (2, 2, 32), (2, 2, 64)], (1, 2, 2, 64))
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.controlnet_config import ControlNetConfig
from jaxdiff.models.host_init import host_init
from jaxdiff.models.resnet import conv3x3
from jaxdiff.models.unet_blocks import down_and_mid, embed_conditions
from jaxdiff.models.unet_inputs import check_inputs

__all__ = [
    "ConditioningEmbedding",
    "ControlNet",
    "check_cond_image",
    "controlnet_dummy_inputs",
    "controlnet_param_shapes",
    "guess_mode_scales",
    "init_controlnet",
    "is_zero_conv",
]


class ConditioningEmbedding(nn.Module):
    """The control image -> ``[B, h, w, features]`` on the latent grid (diffusers'
    ``ControlNetConditioningEmbedding``): ``conv_in`` (3x3), then per next width a 3x3 conv and a
    stride-2 3x3 conv (``blocks_<2i>``, ``blocks_<2i+1>``), SiLU after each, and ``conv_out``
    (3x3, initialised to zero).

    Attributes:
      channels: the widths (``conditioning_embedding_channels``).
      features: the output width (the UNet's ``block_channels[0]``).
    """

    channels: tuple[int, ...]
    features: int
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array) -> jax.Array:
        """``image: [B, H, W, C]`` -> ``[B, H', W', features]``, each stride-2 conv mapping a
        side ``s`` to ``ceil(s / 2)``."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(conv3x3(self.channels[0], name="conv_in", **kw)(image))
        for i in range(len(self.channels) - 1):
            h = nn.silu(conv3x3(self.channels[i], name=f"blocks_{2 * i}", **kw)(h))
            h = nn.silu(conv3x3(self.channels[i + 1], strides=2, name=f"blocks_{2 * i + 1}",
                                **kw)(h))
        return zero_conv(self.features, 3, "conv_out", **kw)(h)


def zero_conv(features: int, size: int, name: str, **kw) -> nn.Conv:
    """A ``size x size`` conv with torch's padding (``size // 2``) and zero-initialised kernel
    and bias: the ControlNet's "zero convolutions"."""
    pad = size // 2
    return nn.Conv(features, (size, size), padding=((pad, pad), (pad, pad)),
                   kernel_init=nn.initializers.zeros_init(), name=name, **kw)


def guess_mode_scales(n: int) -> np.ndarray:
    """``[n]`` float32: diffusers' guess-mode scales ``logspace(-1, 0, n)`` (0.1 to 1.0): the
    first ``n - 1`` for the down residuals (shallowest first), the last for the mid residual."""
    return np.logspace(-1.0, 0.0, n).astype(np.float32)


def _side(s: int, halvings: int) -> int:
    for _ in range(halvings):
        s = (s - 1) // 2 + 1  # a stride-2 3x3 conv with padding 1
    return s


def check_cond_image(config: ControlNetConfig, image, x_shape: tuple) -> jax.Array:
    """Validate the control image against the latents ``x`` (shape ``x_shape``) at trace time.

    ``image`` must be ``[B, H, W, conditioning_channels]`` float with ``H, W`` taken to the
    latent grid by the conditioning network (``downscale`` times the latents' side, or any side
    whose repeated ``ceil(s / 2)`` reaches it). Returns it as an array.

    Raises:
      ValueError: naming ``cond_image``, with the expected shape. The model does not resize:
        the pipeline resizes the control image to ``downscale`` times the latent grid first.
    """
    image = jnp.asarray(image)
    b, h, w = x_shape[:3]
    k, f = len(config.conditioning_embedding_channels) - 1, config.downscale
    expect = f"[{b}, {f * h}, {f * w}, {config.conditioning_channels}]"
    why = f"{f}x the latent grid {h}x{w} of x: {k} stride-2 convolutions take it there"
    if image.ndim != 4 or image.shape[0] != b or image.shape[-1] != config.conditioning_channels:
        raise ValueError(f"cond_image must be {expect} (NHWC; {why}), got shape {image.shape}")
    if (_side(image.shape[1], k), _side(image.shape[2], k)) != (h, w):
        raise ValueError(f"cond_image must be {expect} ({why}), got shape {image.shape}; resize "
                         "the control image first")
    if not jnp.issubdtype(image.dtype, jnp.floating):
        raise ValueError(f"cond_image must be a float array (in [0, 1] as diffusers' control "
                         f"images), got dtype {image.dtype}")
    return image


class ControlNet(nn.Module):
    """A ControlNet. ``ControlNet(config).apply({"params": p}, x, t, cond_image, context=, ...)
    -> (down_residuals, mid_residual)``.

    Attributes:
      config: a :class:`~jaxdiff.models.ControlNetConfig`.
    """

    config: ControlNetConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        cond_image: jax.Array,
        *,
        conditioning_scale: float | jax.Array = 1.0,
        guess_mode: bool = False,
        labels: jax.Array | None = None,
        context: jax.Array | None = None,
        added_cond: Mapping[str, jax.Array] | None = None,
        timestep_cond: jax.Array | None = None,
        train: bool = False,
    ) -> tuple[tuple[jax.Array, ...], jax.Array]:
        """The residuals for a UNet step.

        Args:
          x: ``[B, H, W, in_channels]`` the noisy latents (the UNet's ``x``).
          t: ``[B]`` (or a scalar) timesteps.
          cond_image: ``[B, downscale * H, downscale * W, conditioning_channels]`` float, the
            control image (diffusers' ``controlnet_cond``, values in ``[0, 1]``).
          conditioning_scale: a scalar (float, or a traced array: one compilation for every
            value) multiplying every residual.
          guess_mode: scale the residuals by :func:`guess_mode_scales` (0.1 for the shallowest
            down residual to 1.0 for the mid one) times ``conditioning_scale``, as diffusers
            (not with ``global_pool_conditions``). A Python bool (static).
          labels, context, added_cond, timestep_cond: as :class:`~jaxdiff.models.UNet`'s, for
            the encoder config ``config.unet`` (SDXL ControlNets take ``added_cond``).
          train: enables dropout (then pass ``rngs={"dropout": key}``).

        Returns:
          ``(down_residuals, mid_residual)``: a tuple of ``config.num_down_residuals`` arrays
          ``[B, h, w, C]`` of the skip connections' shapes and the mid block's ``[B, h, w, C]``
          (``[B, 1, 1, C]`` each with ``global_pool_conditions``), in ``config.unet.dtype``;
          the UNet's ``down_residuals=`` and ``mid_residual=``.

        Raises:
          ValueError at trace time, naming the argument: as the UNet's inputs; ``cond_image``
          (:func:`check_cond_image`); ``conditioning_scale`` not a scalar; ``guess_mode`` not a
          bool.
        """
        cfg, u = self.config, self.config.unet
        x, t, labels, context, added_cond, timestep_cond = check_inputs(
            u, x, t, labels, context, added_cond=added_cond, timestep_cond=timestep_cond
        )
        cond_image = check_cond_image(cfg, cond_image, x.shape)
        if not isinstance(guess_mode, (bool, np.bool_)):
            raise ValueError(f"guess_mode must be a bool (static), got {guess_mode!r}")
        scale = jnp.asarray(conditioning_scale)
        if scale.ndim != 0 or not (jnp.issubdtype(scale.dtype, jnp.floating)
                                   or jnp.issubdtype(scale.dtype, jnp.integer)):
            raise ValueError(f"conditioning_scale must be a scalar number, got shape "
                             f"{scale.shape} dtype {scale.dtype}")
        kw = dict(dtype=u.dtype, param_dtype=u.param_dtype)
        if u.center_input_sample:
            x = 2 * x - 1.0
        temb, context = embed_conditions(u, t, labels, context, added_cond, timestep_cond)
        h = conv3x3(u.block_channels[0], name="conv_in", **kw)(x)
        if cfg.conditioning_channel_order == "bgr":
            cond_image = cond_image[..., ::-1]
        h = h + ConditioningEmbedding(
            cfg.conditioning_embedding_channels, u.block_channels[0],
            name="controlnet_cond_embedding", **kw,
        )(cond_image)  # fmt: skip
        h, skips = down_and_mid(u, h, temb, context, train)
        down = [zero_conv(s.shape[-1], 1, f"controlnet_down_blocks_{i}", **kw)(s)
                for i, s in enumerate(skips)]
        mid = zero_conv(h.shape[-1], 1, "controlnet_mid_block", **kw)(h)
        if guess_mode and not cfg.global_pool_conditions:
            scales = jnp.asarray(guess_mode_scales(len(down) + 1)) * scale.astype(jnp.float32)
            scales = scales.astype(mid.dtype)
            down = [r * scales[i] for i, r in enumerate(down)]
            mid = mid * scales[-1]
        else:
            scale = scale.astype(mid.dtype)
            down = [r * scale for r in down]
            mid = mid * scale
        if cfg.global_pool_conditions:
            down = [jnp.mean(r, axis=(1, 2), keepdims=True) for r in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return tuple(down), mid


def controlnet_dummy_inputs(
    config: ControlNetConfig, *, batch: int = 1, latent_size: Sequence[int] = (4, 4)
) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of zeros for ``ControlNet(config).init(key, *args, **kwargs)``: ``x``,
    ``t``, ``cond_image`` and whichever of ``labels``, ``context``, ``added_cond`` and
    ``timestep_cond`` the encoder config requires (as :func:`~jaxdiff.models.unet_dummy_inputs`)."""
    from jaxdiff.models.unet import unet_dummy_inputs

    (x, t), kwargs = unet_dummy_inputs(config.unet, batch=batch, image_size=tuple(latent_size))
    f = config.downscale
    image = jnp.zeros((batch, f * latent_size[0], f * latent_size[1],
                       config.conditioning_channels), jnp.float32)
    return (x, t, image), kwargs


def controlnet_param_shapes(config: ControlNetConfig) -> dict:
    """The ``jax.ShapeDtypeStruct`` tree of ``ControlNet(config)``'s params (traced, not
    computed)."""
    args, kwargs = controlnet_dummy_inputs(config)
    init = lambda key: ControlNet(config).init(key, *args, **kwargs)["params"]  # noqa: E731
    return jax.eval_shape(init, jax.random.key(0))


def is_zero_conv(path: tuple[str, ...]) -> bool:
    """Whether the param at ``path`` belongs to a zero-initialised convolution (a
    ``controlnet_down_blocks_<i>``, ``controlnet_mid_block`` or the conditioning network's
    ``conv_out``)."""
    top = path[0]
    return (top.startswith("controlnet_down_blocks_") or top == "controlnet_mid_block"
            or (top == "controlnet_cond_embedding" and path[1] == "conv_out"))


def init_controlnet(config: ControlNetConfig, key: jax.Array) -> dict:
    """Initialise the ``"params"`` of a new ``ControlNet(config)``, fast, on the host (as
    :func:`~jaxdiff.models.init_unet`: flax's default distributions drawn with numpy,
    nothing compiled), the zero convolutions (:func:`is_zero_conv`) zero. To start from a
    UNet's weights, :func:`~jaxdiff.models.controlnet_from_unet`.

    Raises:
      ValueError: ``key`` is a tracer (use ``ControlNet(config).init`` under ``jit``).
    """
    params = host_init(controlnet_param_shapes(config), key, config.unet.param_dtype,
                       what="init_controlnet")
    return jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.zeros_like(v) if is_zero_conv(tuple(p.key for p in path)) else v,
        params)
