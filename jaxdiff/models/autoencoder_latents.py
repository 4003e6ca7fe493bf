"""What a pipeline calls on an :class:`~jaxdiff.models.AutoencoderKL`: images -> scaled latents
and back (the latent scaling belongs to the model's config, so no caller multiplies by 0.18215
by hand), and the memory savers: tiled encode / decode and batch-sliced decode.

- :func:`scale_latents` / :func:`unscale_latents`: ``(z - shift) * scaling_factor`` or, with
  per-channel statistics, ``(z - latents_mean) * scaling_factor / latents_std``, and the inverse.
- :func:`vae_encode_latents` / :func:`vae_decode_latents`: encode + scale / unscale + decode,
  with the options below.
- :func:`tiled_encode` / :func:`tiled_decode`: diffusers' ``enable_tiling()``: overlapping tiles
  of ``tile_sample_min_size`` pixels (``tile_latent_min_size = tile_sample_min_size / f``
  latents) starting every ``(1 - tile_overlap_factor)`` tile, each encoded / decoded alone, the
  overlaps blended linearly (``blend_v`` / ``blend_h``: each tile with its already blended upper
  and left neighbours, as diffusers' in-place blending) and cropped. Inputs no larger than one
  tile go through the untiled path. The tiles are a Python loop over a jitted per-tile function
  (one compilation per tile shape), so the peak memory is one tile's; under an outer ``jit`` the
  loop is traced into one program.
- :func:`sliced_decode`: decode ``slice_size`` examples at a time with :func:`jax.lax.map` (one
  compiled body, jittable).

``params`` is always the ``"params"`` collection (what :func:`jaxdiff.models.init_autoencoder`
and :func:`jaxdiff.convert.convert_vae_state_dict` return).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.autoencoder import AutoencoderKL, DiagonalGaussian
from jaxdiff.models.autoencoder_config import AutoencoderKLConfig, check_images, check_latents
from jaxdiff.validation import check_bool, check_float, check_int

__all__ = [
    "scale_latents",
    "unscale_latents",
    "vae_encode_latents",
    "vae_decode_latents",
    "tiled_encode",
    "tiled_decode",
    "sliced_decode",
    "blend_v",
    "blend_h",
]


def _stats(cfg: AutoencoderKLConfig, dtype):
    """``(shift, scale)`` broadcastable to ``[B, h, w, C]``: ``latents = (z - shift) * scale``."""
    if cfg.latents_mean is not None:
        mean = jnp.asarray(cfg.latents_mean, jnp.float32)
        std = jnp.asarray(cfg.latents_std, jnp.float32)
        return mean.astype(dtype), (cfg.scaling_factor / std).astype(dtype)
    shift = 0.0 if cfg.shift_factor is None else cfg.shift_factor
    return jnp.asarray(shift, dtype), jnp.asarray(cfg.scaling_factor, dtype)


def scale_latents(config: AutoencoderKLConfig, z: jax.Array) -> jax.Array:
    """VAE latents ``z: [B, h, w, C]`` -> the diffusion model's latents, same shape and dtype:
    ``(z - shift_factor) * scaling_factor``, or ``(z - latents_mean) * scaling_factor /
    latents_std`` per channel when the config has per-channel statistics."""
    z = check_latents(config, z)
    shift, scale = _stats(config, z.dtype)
    return (z - shift) * scale


def unscale_latents(config: AutoencoderKLConfig, latents: jax.Array) -> jax.Array:
    """The inverse of :func:`scale_latents`: ``latents / scale + shift``."""
    latents = check_latents(config, latents, "latents")
    shift, scale = _stats(config, latents.dtype)
    return latents / scale + shift


@partial(jax.jit, static_argnames=("config", "method"))
def _apply(config: AutoencoderKLConfig, params, x: jax.Array, method: str):
    return AutoencoderKL(config).apply({"params": params}, x, method=method)


def _tile_sizes(cfg: AutoencoderKLConfig, tile_sample_min_size, tile_overlap_factor):
    sample = cfg.sample_size if tile_sample_min_size is None else tile_sample_min_size
    sample = check_int("tile_sample_min_size", sample, cfg.downscale)
    overlap = check_float("tile_overlap_factor", tile_overlap_factor, minimum=0.0, maximum=1.0,
                          exclusive_maximum=True)  # fmt: skip
    latent = int(sample / cfg.downscale)  # diffusers' tile_latent_min_size
    if int(latent * (1 - overlap)) < 1:
        raise ValueError(
            f"tile_sample_min_size={sample} with tile_overlap_factor={overlap} leaves latent "
            f"tiles of {latent} that do not advance (need int(latent * (1 - overlap)) >= 1)"
        )
    return sample, latent, overlap


def _blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    w = np.arange(extent, dtype=np.float64) / extent  # torch's Python-float weights
    shape = [1] * b.ndim
    shape[axis] = extent
    w_b = jnp.asarray(w.reshape(shape), b.dtype)
    w_a = jnp.asarray((1.0 - w).reshape(shape), b.dtype)
    head = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis) * w_a
    head = head + jax.lax.slice_in_dim(b, 0, extent, axis=axis) * w_b
    return jnp.concatenate([head, jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)],
                           axis=axis)  # fmt: skip


def blend_v(a: jax.Array, b: jax.Array, extent: int) -> jax.Array:
    """``b: [B, H, W, C]`` with its first ``e = min(extent, H_a, H_b)`` rows replaced by
    ``a[:, -e + y] * (1 - y / e) + b[:, y] * (y / e)`` (diffusers' ``blend_v``)."""
    return _blend(a, b, extent, 1)


def blend_h(a: jax.Array, b: jax.Array, extent: int) -> jax.Array:
    """:func:`blend_v` along the width (diffusers' ``blend_h``)."""
    return _blend(a, b, extent, 2)


def _tiled(fn, x: jax.Array, tile: int, step: int, blend: int, keep: int) -> jax.Array:
    """Run ``fn`` on overlapping ``tile``-sized tiles of ``x`` starting every ``step``, blend
    ``blend`` rows / columns with the upper and left neighbours, keep ``keep`` of each."""
    rows = []
    for i in range(0, x.shape[1], step):
        row = [fn(x[:, i:i + tile, j:j + tile]) for j in range(0, x.shape[2], step)]
        rows.append(row)
    return _stitch(rows, blend, keep)


@partial(jax.jit, static_argnums=(1, 2))
def _stitch(rows: list, blend: int, keep: int) -> jax.Array:
    """Blend each tile of ``rows`` with its upper and left neighbours, crop, concatenate."""
    rows = [list(row) for row in rows]
    out_rows = []
    for i, row in enumerate(rows):
        for j in range(len(row)):
            t = row[j]
            if i > 0:
                t = blend_v(rows[i - 1][j], t, blend)
            if j > 0:
                t = blend_h(row[j - 1], t, blend)
            row[j] = t  # diffusers blends in place: later neighbours see the blended tile
        out_rows.append(jnp.concatenate([t[:, :keep, :keep] for t in row], axis=2))
    return jnp.concatenate(out_rows, axis=1)


def tiled_encode(
    vae: AutoencoderKL,
    params,
    x: jax.Array,
    *,
    tile_sample_min_size: int | None = None,
    tile_overlap_factor: float = 0.25,
) -> DiagonalGaussian:
    """The posterior of ``x: [B, H, W, in_channels]`` encoded in overlapping tiles (diffusers'
    ``AutoencoderKL.encode`` after ``enable_tiling()``).

    Args:
      vae: the model; params: its ``"params"``.
      x: images; tiled only when ``H`` or ``W`` exceeds ``tile_sample_min_size``.
      tile_sample_min_size: tile size in pixels (default ``vae.config.sample_size``), an int
        ``>= 2 ** (levels - 1)``.
      tile_overlap_factor: the overlap of neighbouring tiles, in ``[0, 1)``.

    Returns:
      A :class:`~jaxdiff.models.DiagonalGaussian` over ``[B, h, w, latent_channels]`` (the
      untiled shape when every side is a multiple of the tile step).

    Raises:
      ValueError: naming ``x``, ``tile_sample_min_size`` or ``tile_overlap_factor``.
    """
    cfg = vae.config
    x = check_images(cfg, x)
    sample, latent, overlap = _tile_sizes(cfg, tile_sample_min_size, tile_overlap_factor)
    fn = partial(_apply, cfg, params, method="encode_moments")
    if x.shape[1] <= sample and x.shape[2] <= sample:
        return DiagonalGaussian.from_moments(fn(x))
    blend = int(latent * overlap)
    moments = _tiled(fn, x, sample, int(sample * (1 - overlap)), blend, latent - blend)
    return DiagonalGaussian.from_moments(moments)


def tiled_decode(
    vae: AutoencoderKL,
    params,
    z: jax.Array,
    *,
    tile_sample_min_size: int | None = None,
    tile_overlap_factor: float = 0.25,
) -> jax.Array:
    """``z: [B, h, w, latent_channels]`` (unscaled) decoded in overlapping latent tiles of
    ``tile_sample_min_size / f`` (diffusers' ``decode`` after ``enable_tiling()``; untiled when
    ``h`` and ``w`` fit in one tile) -> ``[B, H, W, out_channels]``. Arguments and errors as
    :func:`tiled_encode` (naming ``z``)."""
    cfg = vae.config
    z = check_latents(cfg, z)
    sample, latent, overlap = _tile_sizes(cfg, tile_sample_min_size, tile_overlap_factor)
    fn = partial(_apply, cfg, params, method="decode")
    if z.shape[1] <= latent and z.shape[2] <= latent:
        return fn(z)
    blend = int(sample * overlap)
    return _tiled(fn, z, latent, int(latent * (1 - overlap)), blend, sample - blend)


def sliced_decode(vae: AutoencoderKL, params, z: jax.Array, slice_size: int = 1) -> jax.Array:
    """``z: [B, h, w, latent_channels]`` (unscaled) decoded ``slice_size`` examples at a time
    (diffusers' ``enable_slicing()`` with ``slice_size=1``) through :func:`jax.lax.map`:
    the result equals ``vae.decode``'s, with the activations of ``slice_size`` examples alive at
    once. Jittable.

    Raises:
      ValueError: naming ``z`` or ``slice_size`` (an int >= 1).
    """
    z = check_latents(vae.config, z)
    slice_size = check_int("slice_size", slice_size, 1)

    def one(zi):
        return vae.apply({"params": params}, zi[None], method="decode")[0]

    return jax.lax.map(one, z, batch_size=slice_size if slice_size > 1 else None)


def vae_encode_latents(
    vae: AutoencoderKL,
    params,
    images: jax.Array,
    key: jax.Array | None = None,
    *,
    tiled: bool = False,
    tile_sample_min_size: int | None = None,
    tile_overlap_factor: float = 0.25,
) -> jax.Array:
    """Images -> the diffusion model's (scaled) latents.

    Args:
      vae: the model; params: its ``"params"``.
      images: ``[B, H, W, in_channels]`` in the VAE's range (``[-1, 1]`` for Stable Diffusion).
      key: draws ``z ~ q(z | x)``; ``None`` takes the posterior's mean.
      tiled: encode in tiles (:func:`tiled_encode`, with ``tile_sample_min_size`` and
        ``tile_overlap_factor``).

    Returns:
      :func:`scale_latents` of ``z``: ``[B, h, w, latent_channels]``, in ``vae.config.dtype``.

    Raises:
      ValueError: naming ``images`` or a tiling argument.
    """
    check_bool("tiled", tiled)
    images = check_images(vae.config, images)
    if tiled:
        posterior = tiled_encode(vae, params, images, tile_sample_min_size=tile_sample_min_size,
                                 tile_overlap_factor=tile_overlap_factor)  # fmt: skip
    else:
        posterior = vae.apply({"params": params}, images, method="encode")
    z = posterior.mode() if key is None else posterior.sample(key)
    return scale_latents(vae.config, z)


def vae_decode_latents(
    vae: AutoencoderKL,
    params,
    latents: jax.Array,
    *,
    force_upcast: bool | None = None,
    tiled: bool = False,
    slice_size: int | None = None,
    tile_sample_min_size: int | None = None,
    tile_overlap_factor: float = 0.25,
) -> jax.Array:
    """The diffusion model's (scaled) latents -> images.

    Args:
      vae: the model; params: its ``"params"``.
      latents: ``[B, h, w, latent_channels]`` as :func:`vae_encode_latents` returns them.
      force_upcast: decode with float32 computation and parameters whatever ``vae.config.dtype``
        is (diffusers pipelines upcast a float16 VAE this way); ``None``: the config's
        ``force_upcast``. Without effect when the config computes in float32 already.
      tiled: decode in tiles (:func:`tiled_decode`, with ``tile_sample_min_size`` and
        ``tile_overlap_factor``).
      slice_size: decode this many examples at a time (:func:`sliced_decode`); not with
        ``tiled``.

    Returns:
      ``[B, h * f, w * f, out_channels]``: float32 when upcast, else ``vae.config.dtype``.

    Raises:
      ValueError: naming ``latents``, ``slice_size``, ``tiled`` or a tiling argument.
    """
    cfg = vae.config
    check_bool("tiled", tiled)
    upcast = cfg.force_upcast if force_upcast is None else check_bool("force_upcast", force_upcast)
    if slice_size is not None and tiled:
        raise ValueError("slice_size and tiled=True are exclusive: give one of them")
    z = unscale_latents(cfg, latents)
    if upcast and jnp.dtype(cfg.dtype) != jnp.float32:
        cfg = dataclasses.replace(cfg, dtype=jnp.float32, param_dtype=jnp.float32)
        vae = AutoencoderKL(cfg)
        params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
        z = z.astype(jnp.float32)
    if tiled:
        return tiled_decode(vae, params, z, tile_sample_min_size=tile_sample_min_size,
                            tile_overlap_factor=tile_overlap_factor)  # fmt: skip
    if slice_size is not None:
        return sliced_decode(vae, params, z, slice_size)
    return vae.apply({"params": params}, z, method="decode")
