"""Timestep and class embeddings.

:func:`timestep_embedding` reproduces ``diffusers.models.embeddings.get_timestep_embedding``
operation for operation (float32, the same order of multiplies), so a converted model sees the
same time features as the PyTorch one. :class:`TimestepEmbedding` is the two-layer MLP on top
(``linear_1``, SiLU, ``linear_2``, named as in diffusers so that weights convert by name).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["timestep_embedding", "TimestepEmbedding", "ClassTokens"]


def timestep_embedding(
    t: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal timestep features, as diffusers' ``get_timestep_embedding``.

    ``freq_i = exp(-log(max_period) * i / (dim // 2 - freq_shift))`` for ``i < dim // 2``; the
    features are ``[sin(t * freq), cos(t * freq)]``, swapped to ``[cos, sin]`` with
    ``flip_sin_to_cos``, zero-padded by one column when ``dim`` is odd. diffusers' ``UNet2DModel``
    and ``UNet2DConditionModel`` default to ``flip_sin_to_cos=True, freq_shift=0``; DDPM's original
    code is ``flip_sin_to_cos=False, freq_shift=1``.

    Args:
      t: ``[B]`` int or float timesteps (fractional allowed).
      dim: the feature width.

    Returns:
      ``[B, dim]`` float32.
    """
    t = jnp.asarray(t)
    if t.ndim != 1:
        raise ValueError(f"t must have shape [B], got shape {t.shape}")
    half = dim // 2
    if half - freq_shift == 0:
        raise ValueError(f"freq_shift={freq_shift} divides by zero for dim={dim}")
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
    exponent = exponent / jnp.float32(half - freq_shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    args = jnp.float32(scale) * args
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """``linear_1 -> SiLU -> linear_2`` (diffusers ``TimestepEmbedding`` with ``act_fn="silu"``).

    Attributes:
      features: the output width (diffusers' ``time_embed_dim``, by default
        ``4 * block_channels[0]``).
    """

    features: int
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x: [B, D]`` -> ``[B, features]``."""
        dense = lambda name: nn.Dense(  # noqa: E731
            self.features, dtype=self.dtype, param_dtype=self.param_dtype, name=name
        )
        return dense("linear_2")(nn.silu(dense("linear_1")(x)))


class ClassTokens(nn.Module):
    """Class labels as ``num_tokens`` learned context tokens for cross-attention.

    One table of ``num_embeddings`` rows of ``num_tokens * features`` values; row ``num_classes``
    (the last) is the null label for classifier-free guidance.

    Attributes:
      num_embeddings: rows of the table (``num_classes + 1``).
      num_tokens: tokens per label.
      features: the width of one token (the cross-attention context width).
    """

    num_embeddings: int
    num_tokens: int
    features: int
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, labels: jax.Array) -> jax.Array:
        """``labels: [B]`` int -> ``[B, num_tokens, features]``."""
        emb = nn.Embed(
            self.num_embeddings,
            self.num_tokens * self.features,
            embedding_init=nn.initializers.normal(stddev=1.0),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="embedding",
        )(labels)
        return emb.reshape(labels.shape[0], self.num_tokens, self.features)
