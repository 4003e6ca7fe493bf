"""Timestep, guidance-scale and class embeddings.

:func:`timestep_embedding` reproduces ``diffusers.models.embeddings.get_timestep_embedding``
operation for operation (float32, the same order of multiplies), so a converted model sees the
same time features as the PyTorch one. :class:`TimestepEmbedding` is the two-layer MLP on top
(``linear_1``, SiLU, ``linear_2``, and the optional ``cond_proj`` of LCM-distilled UNets, named
as in diffusers so that weights convert by name). :func:`guidance_scale_embedding` is the
guidance-scale feature vector (``w_embedding``) that such UNets take as ``timestep_cond``.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["timestep_embedding", "guidance_scale_embedding", "TimestepEmbedding", "ClassTokens"]


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


def guidance_scale_embedding(guidance_scale: jax.Array, dim: int) -> jax.Array:
    """The guidance-scale features an LCM-distilled UNet takes as ``timestep_cond``.

    The pipelines' ``w_embedding``: diffusers' ``LatentConsistencyModelPipeline`` (and the SDXL
    pipelines) call ``get_guidance_scale_embedding(guidance_scale - 1, time_cond_proj_dim)``;
    this function takes the guidance scale itself and subtracts the 1. With ``w = 1000
    (guidance_scale - 1)`` and ``half = dim // 2``, ``freq_i = exp(-log(10000) i / (half - 1))``
    and the features are ``[sin(w freq), cos(w freq)]`` (sin first), zero-padded by one column
    when ``dim`` is odd.

    Args:
      guidance_scale: ``[B]`` (or a scalar, giving ``[1, dim]``) guidance scales, in diffusers'
        convention (1: no guidance).
      dim: the feature width, the UNet's ``time_cond_dim``; at least 4.

    Returns:
      ``[B, dim]`` float32.

    Raises:
      ValueError: ``guidance_scale`` of rank above 1 or not a number; ``dim`` not an int >= 4
        (``half - 1`` must not be 0).
    """
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 4:
        raise ValueError(f"dim must be an int >= 4, got {dim!r}")
    w = jnp.asarray(guidance_scale)
    if not (jnp.issubdtype(w.dtype, jnp.floating) or jnp.issubdtype(w.dtype, jnp.integer)):
        raise ValueError(f"guidance_scale must hold numbers, got dtype {w.dtype}")
    if w.ndim > 1:
        raise ValueError(f"guidance_scale must be [B] or a scalar, got shape {w.shape}")
    w = (w.reshape(-1).astype(jnp.float32) - 1.0) * 1000.0
    half = dim // 2
    step = jnp.log(jnp.float32(10000.0)) / jnp.float32(half - 1)  # float32, as diffusers
    freq = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -step)
    args = w[:, None] * freq[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """``linear_1 -> SiLU -> linear_2`` (diffusers ``TimestepEmbedding`` with ``act_fn="silu"``),
    with diffusers' ``cond_proj`` when a condition is given: ``x + cond_proj(cond)`` (a linear
    map without bias, ``[B, C] -> [B, D]``) enters ``linear_1``.

    Attributes:
      features: the output width (diffusers' ``time_embed_dim``, by default
        ``4 * block_channels[0]``).
    """

    features: int
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array | None = None) -> jax.Array:
        """``x: [B, D]``, ``cond: [B, C]`` or ``None`` -> ``[B, features]``. The ``cond_proj``
        parameter exists only in a module called (and initialised) with ``cond``."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if cond is not None:
            x = x + nn.Dense(x.shape[-1], use_bias=False, name="cond_proj", **kw)(cond)
        h = nn.Dense(self.features, name="linear_1", **kw)(x)
        return nn.Dense(self.features, name="linear_2", **kw)(nn.silu(h))


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
