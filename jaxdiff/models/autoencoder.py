"""The KL autoencoder of latent diffusion (diffusers ``AutoencoderKL``) as Flax linen modules.

NHWC throughout. ``encoder``: ``conv_in``, per level ``layers_per_block`` resnets and (all but the
last level) a stride-2 downsample padded at the bottom / right only (diffusers'
``downsample_padding=0``), a mid block (resnet, optional single-head self-attention, resnet),
GroupNorm + SiLU and ``conv_out`` to ``2 * latent_channels`` moments; ``quant_conv`` (1x1,
optional). The moments split into a :class:`DiagonalGaussian` (mean first, log-variance clamped
to ``[-30, 20]``). ``post_quant_conv`` (1x1, optional), then the ``decoder``: ``conv_in``, the mid
block, per level (deepest first) ``layers_per_block + 1`` resnets and a nearest x2 upsample +
conv, GroupNorm + SiLU, ``conv_out``. Every GroupNorm has epsilon 1e-6; the resnets have no time
embedding. The blocks are the UNet's (:class:`~jaxdiff.models.ResnetBlock`,
:class:`~jaxdiff.models.SpatialSelfAttention`, :class:`~jaxdiff.models.Downsample`,
:class:`~jaxdiff.models.Upsample`).

Submodule names follow diffusers (``encoder/down_blocks_0/resnets_1/conv1``,
``decoder/mid_block/attentions_0/to_q``, ...) so that a state dict converts by name
(:mod:`jaxdiff.convert.diffusers_vae`).

    >>> import jax, jax.numpy as jnp
    >>> cfg = AutoencoderKLConfig(block_channels=(8, 16), latent_channels=2, norm_groups=4)
    >>> vae = AutoencoderKL(cfg)
    >>> params = init_autoencoder(cfg, jax.random.key(0))
    >>> x = jnp.zeros((2, 16, 16, 3))
    >>> posterior = vae.apply({"params": params}, x, method="encode")
    >>> posterior.mean.shape
    (2, 8, 8, 2)
    >>> recon, _ = vae.apply({"params": params}, x, jax.random.key(1))  # sampled z
    >>> recon.shape
    (2, 16, 16, 3)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdiff.models.attention import SpatialSelfAttention
from jaxdiff.models.autoencoder_config import (
    VAE_NORM_EPS,
    AutoencoderKLConfig,
    check_images,
    check_latents,
)
from jaxdiff.models.resnet import Downsample, ResnetBlock, Upsample, conv3x3, group_norm

__all__ = [
    "AutoencoderKL",
    "DiagonalGaussian",
    "VAEEncoder",
    "VAEDecoder",
    "autoencoder_param_shapes",
    "init_autoencoder",
]

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@struct.dataclass
class DiagonalGaussian:
    """The posterior ``q(z | x) = N(mean, exp(logvar))`` (diffusers'
    ``DiagonalGaussianDistribution``), a pytree.

    Attributes:
      mean: ``[B, h, w, C]``.
      logvar: ``[B, h, w, C]``, clamped to ``[-30, 20]``.
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """``moments: [B, h, w, 2C]`` (mean channels first, then log-variance) -> posterior."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        """``mean + std * eps`` with ``eps ~ N(0, I)`` drawn from ``key``; ``[B, h, w, C]``."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        """The mean ``[B, h, w, C]``."""
        return self.mean

    def kl(self) -> jax.Array:
        """``KL(q || N(0, I))`` per example, summed over ``h, w, C``: ``[B]``, float32."""
        mean, logvar = self.mean.astype(jnp.float32), self.logvar.astype(jnp.float32)
        return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))

    def nll(self, sample: jax.Array) -> jax.Array:
        """``-log q(sample)`` per example, summed over ``h, w, C``: ``[B]``, float32."""
        mean, logvar = self.mean.astype(jnp.float32), self.logvar.astype(jnp.float32)
        err = jnp.square(sample.astype(jnp.float32) - mean) * jnp.exp(-logvar)
        return 0.5 * jnp.sum(jnp.log(2.0 * jnp.pi) + logvar + err, axis=(1, 2, 3))


class _MidBlock(nn.Module):
    """diffusers ``UNetMidBlock2D`` without time embedding: resnet, [attention], resnet."""

    config: AutoencoderKLConfig

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        c = h.shape[-1]
        h = ResnetBlock(c, cfg.norm_groups, VAE_NORM_EPS, name="resnets_0", **kw)(h, None)
        if cfg.mid_attention:
            h = SpatialSelfAttention(
                1, cfg.norm_groups, VAE_NORM_EPS, name="attentions_0",
                implementation=cfg.attention_implementation, **kw,
            )(h)  # fmt: skip
        return ResnetBlock(c, cfg.norm_groups, VAE_NORM_EPS, name="resnets_1", **kw)(h, None)


class _Level(nn.Module):
    """``DownEncoderBlock2D`` (``up=False``) or ``UpDecoderBlock2D`` (``up=True``)."""

    config: AutoencoderKLConfig
    features: int
    num_layers: int
    resample: bool
    up: bool

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        for j in range(self.num_layers):
            block = ResnetBlock(self.features, cfg.norm_groups, VAE_NORM_EPS, name=f"resnets_{j}",
                                **kw)  # fmt: skip
            h = block(h, None)
        if self.resample and self.up:
            h = Upsample(self.features, name="upsamplers_0", **kw)(h)
        elif self.resample:
            h = Downsample(self.features, padding=0, name="downsamplers_0", **kw)(h)
        return h


class VAEEncoder(nn.Module):
    """diffusers ``Encoder`` (``double_z=True``): ``[B, H, W, in_channels]`` ->
    ``[B, H / f, W / f, 2 * latent_channels]`` moments, ``f = config.downscale`` (odd sizes
    round down at each level)."""

    config: AutoencoderKLConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        chans, n = cfg.block_channels, len(cfg.block_channels)
        h = conv3x3(chans[0], name="conv_in", **kw)(x)
        for i, c in enumerate(chans):
            h = _Level(cfg, c, cfg.layers_per_block, i < n - 1, False, name=f"down_blocks_{i}")(h)
        h = _MidBlock(cfg, name="mid_block")(h)
        h = nn.silu(group_norm(cfg.norm_groups, VAE_NORM_EPS, name="conv_norm_out", **kw)(h))
        return conv3x3(2 * cfg.latent_channels, name="conv_out", **kw)(h)


class VAEDecoder(nn.Module):
    """diffusers ``Decoder`` (GroupNorm): ``[B, h, w, latent_channels]`` ->
    ``[B, h * f, w * f, out_channels]``, ``f = config.downscale``."""

    config: AutoencoderKLConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        chans = cfg.block_channels[::-1]
        h = conv3x3(chans[0], name="conv_in", **kw)(z)
        h = _MidBlock(cfg, name="mid_block")(h)
        for i, c in enumerate(chans):
            last = i == len(chans) - 1
            h = _Level(cfg, c, cfg.layers_per_block + 1, not last, True, name=f"up_blocks_{i}")(h)
        h = nn.silu(group_norm(cfg.norm_groups, VAE_NORM_EPS, name="conv_norm_out", **kw)(h))
        return conv3x3(cfg.out_channels, name="conv_out", **kw)(h)


class AutoencoderKL(nn.Module):
    """diffusers ``AutoencoderKL``: :meth:`encode` -> :class:`DiagonalGaussian`, :meth:`decode`,
    and ``__call__`` (encode, sample or take the mode, decode).

    Apply a method with ``vae.apply({"params": params}, x, method="encode")``. Inputs are checked
    at trace time (``ValueError`` naming ``x`` / ``z``). The latent scaling
    (``scaling_factor`` ...) is not applied here: see :func:`jaxdiff.models.vae_encode_latents`
    and :func:`jaxdiff.models.vae_decode_latents`.

    Attributes:
      config: an :class:`AutoencoderKLConfig`.
    """

    config: AutoencoderKLConfig

    def setup(self):
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, padding="VALID")
        self.encoder = VAEEncoder(cfg)
        self.decoder = VAEDecoder(cfg)
        c = cfg.latent_channels
        self.quant_conv = nn.Conv(2 * c, (1, 1), **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv(c, (1, 1), **kw) if cfg.use_post_quant_conv else None

    def encode_moments(self, x: jax.Array) -> jax.Array:
        """``x: [B, H, W, in_channels]`` -> moments ``[B, h, w, 2 * latent_channels]``."""
        h = self.encoder(check_images(self.config, x))
        return h if self.quant_conv is None else self.quant_conv(h)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """``x: [B, H, W, in_channels]`` -> the posterior over ``[B, h, w, latent_channels]``."""
        return DiagonalGaussian.from_moments(self.encode_moments(x))

    def decode(self, z: jax.Array) -> jax.Array:
        """``z: [B, h, w, latent_channels]`` (unscaled) -> ``[B, h * f, w * f, out_channels]``."""
        z = check_latents(self.config, z)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(
        self, x: jax.Array, key: jax.Array | None = None
    ) -> tuple[jax.Array, DiagonalGaussian]:
        """``x: [B, H, W, in_channels]`` -> ``(reconstruction, posterior)``.

        ``key``: draws ``z ~ posterior`` (diffusers' ``sample_posterior=True``); ``None`` decodes
        the posterior's mode (``sample_posterior=False``).
        """
        posterior = self.encode(x)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z), posterior


def _dummy_images(config: AutoencoderKLConfig) -> jax.Array:
    size = 2 * config.downscale
    return jnp.zeros((1, size, size, config.in_channels), jnp.float32)


def autoencoder_param_shapes(config: AutoencoderKLConfig) -> dict:
    """The ``"params"`` tree of ``AutoencoderKL(config)`` as ``jax.ShapeDtypeStruct`` s (nothing
    is computed)."""
    variables = jax.eval_shape(
        AutoencoderKL(config).init, jax.random.key(0), _dummy_images(config)
    )
    return variables["params"]


_TRUNC_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2]


def init_autoencoder(config: AutoencoderKLConfig, key: jax.Array) -> dict:
    """The ``"params"`` of ``AutoencoderKL(config)``, initialised on the host (nothing compiled).

    flax's default distributions (conv and dense kernels LeCun-normal: a normal truncated to 2
    std with variance ``1 / fan_in``; biases 0; norm scales 1), drawn with numpy from a generator
    seeded by ``key``'s data: deterministic in ``key``, not the values ``init`` would draw. Use
    ``AutoencoderKL(config).init`` where the init must be traced.

    Args:
      config: the model config.
      key: a concrete PRNG key (typed or raw ``uint32``).

    Returns:
      A nested dict of ``jax.Array`` in ``config.param_dtype``.

    Raises:
      ValueError: ``key`` is a tracer.
    """
    if isinstance(key, jax.core.Tracer):
        raise ValueError("init_autoencoder needs a concrete key; under jit use "
                         "AutoencoderKL(config).init")  # fmt: skip
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    rng = np.random.default_rng(np.asarray(data, np.uint32).ravel().tolist())

    def draw(path, spec):
        name, shape = path[-1].key, spec.shape
        if name == "kernel":
            z = rng.standard_normal(shape)
            while (bad := np.abs(z) > 2).any():
                z[bad] = rng.standard_normal(int(bad.sum()))
            value = z * (np.sqrt(1.0 / np.prod(shape[:-1])) / _TRUNC_STD)
        else:  # biases 0, GroupNorm scales 1
            value = np.ones(shape) if name == "scale" else np.zeros(shape)
        return jnp.asarray(value, config.param_dtype)

    return jax.tree_util.tree_map_with_path(draw, autoencoder_param_shapes(config))
