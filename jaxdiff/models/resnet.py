"""ResNet blocks with time-embedding injection, and the down/up-sampling layers.

NHWC throughout. Names of the submodules follow diffusers (``norm1``, ``conv1``,
``time_emb_proj``, ``norm2``, ``conv2``, ``conv_shortcut``; ``conv`` in the samplers) so that a
diffusers state dict converts by name (:mod:`jaxdiff.convert`).

Padding is explicit, as torch's: a 3x3 conv pads ``((1, 1), (1, 1))``; the stride-2 conv of
:class:`Downsample` too (flax's ``'SAME'`` would pad ``(0, 1)`` and shift the grid by a pixel).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ResnetBlock", "Downsample", "Upsample", "nearest_resize", "conv3x3", "Conv3x3",
           "uses_im2col", "im2col_conv3x3", "group_norm"]

PAD1 = ((1, 1), (1, 1))


# Where XLA:CPU's own convolution loses to im2col + one matmul (the same arithmetic): measured
# per shape, forward and both gradients, by ``python -m benchmarks.bench_conv_shapes``
# (BENCHMARKS.md, "Convolutions per shape"; benchmarks/results/cpu/bench_conv_shapes.md).
# (1) a stride-1 conv over at most IM2COL_MAX_PIXELS pixels per image, any width: the innermost
# level of a UNet on 8x8 latents (SD at 64x64 pixels) runs 2x2 or 1x1 images;
# (2) a wide conv (at least IM2COL_WIDE_MIN_CHANNELS input channels) over at most
# IM2COL_WIDE_MAX_PIXELS pixels per image, stride 1 or 2: SD 1.5's 16x16 and 8x8 levels, where
# im2col ran 1.3-4x faster than the native conv in every direction. Elsewhere (wide images, the
# narrow MNIST-sized models) the native convolution was as fast or faster. CPU backend only: on a
# GPU or TPU the convolution is kept.
IM2COL_MAX_PIXELS = 4
IM2COL_WIDE_MAX_PIXELS = 256
IM2COL_WIDE_MIN_CHANNELS = 512


def uses_im2col(x_shape: tuple, strides: int = 1) -> bool:
    """Whether :class:`Conv3x3` runs a 3x3 conv (torch ``padding=1``) on an NHWC input of
    ``x_shape`` as im2col + one matmul (on the CPU backend; the rule above, from the per-shape
    table). ``strides``: 1 or 2."""
    if len(x_shape) != 4 or strides not in (1, 2) or jax.default_backend() != "cpu":
        return False
    pixels, channels = x_shape[1] * x_shape[2], x_shape[3]
    if strides == 1 and pixels <= IM2COL_MAX_PIXELS:
        return True
    return pixels <= IM2COL_WIDE_MAX_PIXELS and channels >= IM2COL_WIDE_MIN_CHANNELS


def im2col_conv3x3(x: jax.Array, kernel: jax.Array, strides: int = 1) -> jax.Array:
    """``conv(x, kernel)`` with torch's ``padding=1`` as the 9 shifted (strided) slices of the
    padded input, concatenated on the channel axis, times ``kernel`` as a ``[9 C_in, C_out]``
    matrix. ``x: [B, H, W, C_in]``, ``kernel: [3, 3, C_in, C_out]`` ->
    ``[B, (H - 1) // strides + 1, (W - 1) // strides + 1, C_out]``, equal to
    ``lax.conv_general_dilated`` to float32 rounding."""
    h, w = x.shape[1], x.shape[2]
    ho, wo = (h - 1) // strides + 1, (w - 1) // strides + 1
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([xp[:, i:i + strides * (ho - 1) + 1:strides,
                               j:j + strides * (wo - 1) + 1:strides, :]
                            for i in range(3) for j in range(3)], axis=-1)
    return cols @ kernel.reshape(9 * x.shape[-1], kernel.shape[-1])


class Conv3x3(nn.Module):
    """A 3x3 conv with torch's ``padding=1``: ``nn.Conv(features, (3, 3), strides, padding=1)``
    with the same parameters (``kernel [3, 3, C_in, features]``, ``bias [features]``, the same
    initialisers and names, so checkpoints and converters see no difference). On the CPU, the
    shapes :func:`uses_im2col` names (tiny images; wide convs on small images) run as
    :func:`im2col_conv3x3` (same result to float32 rounding), where XLA:CPU's convolution is
    slow."""

    features: int
    strides: int = 1
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x: [B, H, W, C]`` -> ``[B, H', W', features]``."""
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (3, 3, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,),
                          self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if uses_im2col(x.shape, self.strides):
            y = im2col_conv3x3(x, kernel, self.strides)
        else:
            y = jax.lax.conv_general_dilated(x, kernel, (self.strides, self.strides), PAD1,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias


def conv3x3(features: int, *, name: str, dtype, param_dtype, strides: int = 1) -> Conv3x3:
    """A 3x3 conv with torch's ``padding=1`` (:class:`Conv3x3`)."""
    return Conv3x3(features, strides=strides, dtype=dtype, param_dtype=param_dtype, name=name)


def group_norm(groups: int, eps: float, *, name: str, dtype, param_dtype) -> nn.GroupNorm:
    """torch ``GroupNorm(groups, C, eps)`` over NHWC (two-pass variance, as torch)."""
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class ResnetBlock(nn.Module):
    """diffusers ``ResnetBlock2D`` (``time_embedding_norm="default"``, SiLU).

    ``h = conv1(silu(norm1(x))) + time_emb_proj(silu(temb))[:, None, None]``;
    ``h = conv2(dropout(silu(norm2(h))))``; ``out = (shortcut(x) + h) / output_scale_factor``,
    where ``shortcut`` is a 1x1 conv when the channel count changes, else the identity.

    Attributes:
      features: output channels.
      groups: GroupNorm groups (both norms). eps: GroupNorm epsilon.
      dropout: dropout rate before ``conv2`` (active only with ``train=True``; needs a
        ``'dropout'`` rng).
      output_scale_factor: the divisor of the residual sum.
    """

    features: int
    groups: int = 32
    eps: float = 1e-5
    dropout: float = 0.0
    output_scale_factor: float = 1.0
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None, *, train: bool = False) -> jax.Array:
        """``x: [B, H, W, C_in]``, ``temb: [B, D]`` or None -> ``[B, H, W, features]``."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(group_norm(self.groups, self.eps, name="norm1", **kw)(x))
        h = conv3x3(self.features, name="conv1", **kw)(h)
        if temb is not None:
            proj = nn.Dense(self.features, name="time_emb_proj", **kw)(nn.silu(temb))
            h = h + proj[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, name="norm2", **kw)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv3x3(self.features, name="conv2", **kw)(h)
        if x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), padding="VALID", name="conv_shortcut", **kw)(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / jnp.asarray(self.output_scale_factor, out.dtype)
        return out


class Downsample(nn.Module):
    """A 3x3 conv with stride 2 (diffusers ``Downsample2D``, conv).

    ``padding=1`` (the UNet's): torch's ``padding=1``, ``[B, H, W, C] -> [B, ceil(H / 2),
    ceil(W / 2), features]``; any size works, odd ones too. ``padding=0`` (the VAE encoder's,
    diffusers ``downsample_padding=0``): one zero row and column at the bottom / right, then an
    unpadded conv, ``-> [B, H // 2, W // 2, features]``.

    Raises:
      ValueError: ``padding`` is not 0 or 1.
    """

    features: int
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    padding: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x: [B, H, W, C]`` -> ``[B, H', W', features]`` (see the class docstring)."""
        kw = dict(name="conv", dtype=self.dtype, param_dtype=self.param_dtype)
        if self.padding == 1:
            return conv3x3(self.features, strides=2, **kw)(x)
        if self.padding != 0:
            raise ValueError(f"padding must be 0 or 1, got {self.padding!r}")
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return nn.Conv(self.features, (3, 3), strides=(2, 2), padding="VALID", **kw)(x)


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """torch ``F.interpolate(mode="nearest", size=...)``'s source rows (float32 arithmetic)."""
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Nearest-neighbour resize of ``x: [B, H, W, C]`` to ``[B, *size, C]``, as torch's.

    An exact factor-2 resize is a repeat; other sizes (from odd inputs) gather the rows torch's
    ``F.interpolate(mode="nearest", size=size)`` reads.
    """
    for axis, out in zip((1, 2), size):
        n = x.shape[axis]
        if out == n:
            continue
        if out == 2 * n:
            x = jnp.repeat(x, 2, axis=axis)
        else:
            x = jnp.take(x, jnp.asarray(_nearest_indices(n, out)), axis=axis)
    return x


class Upsample(nn.Module):
    """Nearest-neighbour resize, then a 3x3 conv (diffusers ``Upsample2D`` with ``use_conv``).

    No transposed convs. ``size`` defaults to twice the input; the UNet passes the size of the
    matching skip connection, so odd sizes (``7 -> 4 -> 7``) round-trip as in diffusers'
    ``UNet2DConditionModel`` (``forward_upsample_size``).
    """

    features: int
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        """``x: [B, H, W, C]`` -> ``[B, *size, features]`` (``size`` default ``(2H, 2W)``)."""
        if size is None:
            size = (2 * x.shape[1], 2 * x.shape[2])
        x = nearest_resize(x, tuple(size))
        return conv3x3(self.features, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(
            x
        )
