"""Attention: the spatial self-attention block and the cross-attention transformer block.

Both use :func:`jax.nn.dot_product_attention` (scale ``1 / sqrt(head_dim)``; float32 logits even
for bfloat16 inputs). Its ``implementation`` is the modules' ``implementation`` attribute
(``UNetConfig.attention_implementation``): ``None`` (the default) and ``"xla"`` take the XLA path
on every backend, which is *not* flash attention; ``"cudnn"`` asks for cuDNN's fused (flash)
attention, which needs a GPU, float16/bfloat16 q/k/v (``dtype``) and fails at trace time
otherwise. Submodule names follow
diffusers (``group_norm``, ``to_q``/``to_k``/``to_v``/``to_out_0``; ``norm``, ``proj_in``,
``transformer_blocks_i``, ``proj_out``; ``ff.net_0.proj``, ``ff.net_2``) so that weights convert
by name.

- :class:`SpatialSelfAttention` is diffusers' ``Attention`` as built by ``AttnDownBlock2D`` /
  ``AttnUpBlock2D`` / ``UNetMidBlock2D``: GroupNorm, q/k/v with bias, output projection,
  residual, divided by ``rescale_output_factor``.
- :class:`Transformer2D` is diffusers' ``Transformer2DModel`` on continuous input: GroupNorm
  (eps 1e-6), ``proj_in`` (a 1x1 conv, or a linear layer with ``use_linear_projection``), a
  stack of :class:`BasicTransformerBlock` (LayerNorm eps 1e-5 + self-attention, LayerNorm +
  cross-attention to the context, LayerNorm + GEGLU feed-forward, each residual), ``proj_out``,
  residual.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.resnet import group_norm

__all__ = [
    "MultiHeadAttention",
    "SpatialSelfAttention",
    "GEGLU",
    "FeedForward",
    "attend",
    "BasicTransformerBlock",
    "Transformer2D",
]

TRANSFORMER_GROUP_NORM_EPS = 1e-6  # Transformer2DModel.norm, hard-coded in diffusers
TRANSFORMER_LAYER_NORM_EPS = 1e-5  # BasicTransformerBlock norm1/2/3 (Transformer2DModel default)


class MultiHeadAttention(nn.Module):
    """``to_q``/``to_k``/``to_v`` projections, ``dot_product_attention``, ``to_out_0``.

    Attributes:
      heads: number of heads; ``head_dim = width // heads`` where ``width`` is the query width.
      qkv_bias: bias on the q/k/v projections (True in the spatial block, False in transformers).
      implementation: ``jax.nn.dot_product_attention``'s: ``None``, ``"xla"`` or ``"cudnn"``.
    """

    heads: int
    qkv_bias: bool = True
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """``x: [B, T, C]``, ``context: [B, S, D]`` (None: self-attention) -> ``[B, T, C]``."""
        return attend(
            x, context, self.heads, qkv_bias=self.qkv_bias, dtype=self.dtype,
            param_dtype=self.param_dtype, implementation=self.implementation,
        )  # fmt: skip


def attend(x, context, heads, *, qkv_bias, dtype, param_dtype, implementation=None):
    """Multi-head attention whose layers (``to_q``, ``to_k``, ``to_v``, ``to_out_0``) belong to
    the calling module; call it from inside a ``@nn.compact`` method.

    ``x: [B, T, C]``, ``context: [B, S, D]`` or None -> ``[B, T, C]``. ``implementation`` goes to
    :func:`jax.nn.dot_product_attention` (``None``, ``"xla"`` or ``"cudnn"``).
    """
    width = x.shape[-1]
    if width % heads:
        raise ValueError(f"attention width {width} is not divisible by heads={heads}")
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    context = x if context is None else context
    split = lambda y: y.reshape(*y.shape[:2], heads, width // heads)  # noqa: E731
    q = split(nn.Dense(width, use_bias=qkv_bias, name="to_q", **kw)(x))
    k = split(nn.Dense(width, use_bias=qkv_bias, name="to_k", **kw)(context))
    v = split(nn.Dense(width, use_bias=qkv_bias, name="to_v", **kw)(context))
    out = jax.nn.dot_product_attention(q, k, v, implementation=implementation).astype(q.dtype)
    return nn.Dense(width, name="to_out_0", **kw)(out.reshape(*out.shape[:2], width))


class SpatialSelfAttention(nn.Module):
    """Self-attention over the pixels of ``[B, H, W, C]``, with GroupNorm and a residual.

    ``out = (x + to_out(attention(group_norm(x)))) / rescale_output_factor``.

    Attributes:
      heads: number of heads (diffusers: ``channels // attention_head_dim``).
      groups: GroupNorm groups (diffusers: the resnet ones).
      eps: GroupNorm epsilon (diffusers: the resnet ones).
      rescale_output_factor: divisor of the residual sum (the mid block's scale factor).
      implementation: ``jax.nn.dot_product_attention``'s: ``None``, ``"xla"`` or ``"cudnn"``.
    """

    heads: int
    groups: int = 32
    eps: float = 1e-5
    rescale_output_factor: float = 1.0
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x: [B, H, W, C]`` -> ``[B, H, W, C]``."""
        b, h, w, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = group_norm(self.groups, self.eps, name="group_norm", **kw)(x)
        y = attend(
            y.reshape(b, h * w, c), None, self.heads, qkv_bias=True,
            implementation=self.implementation, **kw,
        )  # fmt: skip
        out = x + y.reshape(b, h, w, c)
        if self.rescale_output_factor != 1.0:
            out = out / jnp.asarray(self.rescale_output_factor, out.dtype)
        return out


class GEGLU(nn.Module):
    """``proj`` to ``2 * features``, then ``a * gelu(gate)`` (exact erf gelu, as torch's)."""

    features: int
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x: [B, T, C]`` -> ``[B, T, features]``."""
        h = nn.Dense(2 * self.features, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)
        a, gate = jnp.split(h(x), 2, axis=-1)
        return a * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers ``FeedForward`` with GEGLU: ``net_0`` (:class:`GEGLU` to ``mult * C``), ``net_2``
    (linear back to C)."""

    mult: int = 4
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x: [B, T, C]`` -> ``[B, T, C]``."""
        c = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(self.mult * c, name="net_0", **kw)(x)
        return nn.Dense(c, name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
    """diffusers ``BasicTransformerBlock`` (``norm_type="layer_norm"``, GEGLU, no q/k/v bias).

    ``x += attn1(norm1(x))``; ``x += attn2(norm2(x), context)``; ``x += ff(norm3(x))``.
    ``implementation``: ``jax.nn.dot_product_attention``'s (``None``, ``"xla"``, ``"cudnn"``).
    """

    heads: int
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """``x: [B, T, C]``, ``context: [B, S, D]`` -> ``[B, T, C]``."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: nn.LayerNorm(  # noqa: E731
            epsilon=TRANSFORMER_LAYER_NORM_EPS, use_fast_variance=False, name=name, **kw
        )
        attn = lambda name: MultiHeadAttention(  # noqa: E731
            self.heads, qkv_bias=False, implementation=self.implementation, name=name, **kw
        )
        x = x + attn("attn1")(norm("norm1")(x))
        x = x + attn("attn2")(norm("norm2")(x), context)
        return x + FeedForward(name="ff", **kw)(norm("norm3")(x))


class Transformer2D(nn.Module):
    """diffusers ``Transformer2DModel`` on ``[B, H, W, C]`` with cross-attention to a context.

    Attributes:
      heads: attention heads (``head_dim = C // heads``).
      depth: number of :class:`BasicTransformerBlock` s (``transformer_layers_per_block``).
      groups: GroupNorm groups (eps 1e-6, as diffusers hard-codes).
      use_linear_projection: ``proj_in``/``proj_out`` as linear layers on the tokens instead of
        1x1 convs on the image (the same maths; only the diffusers weight shapes differ).
      implementation: ``jax.nn.dot_product_attention``'s: ``None``, ``"xla"`` or ``"cudnn"``.
    """

    heads: int
    depth: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    implementation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """``x: [B, H, W, C]``, ``context: [B, S, D]`` -> ``[B, H, W, C]``."""
        b, h, w, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        proj = lambda name: (  # noqa: E731
            nn.Dense(c, name=name, **kw)
            if self.use_linear_projection
            else nn.Conv(c, (1, 1), padding="VALID", name=name, **kw)
        )
        y = group_norm(self.groups, TRANSFORMER_GROUP_NORM_EPS, name="norm", **kw)(x)
        y = proj("proj_in")(y).reshape(b, h * w, c)
        for i in range(self.depth):
            y = BasicTransformerBlock(
                self.heads, implementation=self.implementation, name=f"transformer_blocks_{i}", **kw
            )(y, context)
        y = proj("proj_out")(y.reshape(b, h, w, c))
        return x + y
