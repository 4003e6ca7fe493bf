"""``AutoencoderKLConfig``: the KL autoencoder's hyper-parameters as a small frozen dataclass, and
the checks of its inputs.

Every field is validated when the config is built (a ``ValueError`` naming the field), and every
image / latent input when the model is traced (a ``ValueError`` naming the argument).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxdiff.validation import check_bool, check_choice, check_float, check_int

__all__ = ["AutoencoderKLConfig", "VAE_NORM_EPS", "check_images", "check_latents"]

VAE_NORM_EPS = 1e-6  # every GroupNorm of diffusers' Encoder / Decoder (hard-coded there)
_IMPLEMENTATIONS = (None, "xla", "cudnn")


def _floating(name: str, value) -> np.dtype:
    try:
        dtype = None if value is None else jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating dtype (float32, bfloat16, ...), got {value!r}")
    return dtype


def _floats(name: str, value, n: int, *, positive: bool = False) -> tuple[float, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple, np.ndarray)) or len(value) != n:
        raise ValueError(f"{name} must hold one number per latent channel ({n}), got {value!r}")
    bounds = dict(minimum=0.0, exclusive_minimum=True) if positive else {}
    return tuple(check_float(f"{name}[{i}]", v, **bounds) for i, v in enumerate(value))


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """The hyper-parameters of :class:`jaxdiff.models.AutoencoderKL` (diffusers'
    ``AutoencoderKL`` with ``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` blocks).

    Attributes:
      in_channels, out_channels: image channels in and out.
      block_channels: channels per level; every level but the last halves the image (the latent
        is ``2 ** (len(block_channels) - 1)`` times smaller per side).
      layers_per_block: resnets per encoder level (the decoder has ``layers_per_block + 1``).
      latent_channels: ``C`` of the latent ``[B, h, w, C]``.
      norm_groups: GroupNorm groups (epsilon ``VAE_NORM_EPS`` = 1e-6 everywhere, as diffusers).
      mid_attention: self-attention in the encoder's and decoder's mid blocks
        (diffusers ``mid_block_add_attention``).
      use_quant_conv, use_post_quant_conv: the 1x1 convs after the encoder / before the decoder.
      scaling_factor, shift_factor: latents for a diffusion model are
        ``(z - shift_factor) * scaling_factor`` (``shift_factor`` None: 0).
      latents_mean, latents_std: per-channel statistics (one number per latent channel); when set,
        the latents are ``(z - mean) * scaling_factor / std`` instead. Exclusive with
        ``shift_factor``; both or neither.
      force_upcast: decode in float32 even when ``dtype`` is lower precision
        (:func:`jaxdiff.models.vae_decode_latents`).
      sample_size: the default tile size in pixels of the tiled encode / decode (diffusers'
        ``tile_sample_min_size``).
      dtype: computation dtype (``bfloat16`` works); param_dtype: parameter dtype.
      attention_implementation: ``jax.nn.dot_product_attention``'s (``None``, ``"xla"``,
        ``"cudnn"``).

    Raises:
      ValueError: naming the field, for a field of the wrong type or out of range (counts and
        widths ints >= 1, bools bools, ``block_channels`` divisible by ``norm_groups``,
        ``scaling_factor`` > 0, ``latents_std`` entries > 0, per-channel statistics of length
        ``latent_channels``, ``shift_factor`` together with ``latents_mean``, one of
        ``latents_mean`` / ``latents_std`` without the other).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_groups: int = 32
    mid_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    sample_size: int = 32
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_implementation: str | None = None

    def __post_init__(self):
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        chans = self.block_channels
        if isinstance(chans, (list, np.ndarray)):
            chans = tuple(chans)
        if not isinstance(chans, tuple) or not chans:
            raise ValueError(
                f"block_channels must be a non-empty tuple of ints, one per level, got {chans!r}"
            )
        put("block_channels", tuple(check_int("block_channels", c, 1) for c in chans))
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels",
                     "norm_groups", "sample_size"):  # fmt: skip
            put(name, check_int(name, getattr(self, name), 1))
        for name in ("mid_attention", "use_quant_conv", "use_post_quant_conv", "force_upcast"):
            put(name, check_bool(name, getattr(self, name)))
        if any(c % self.norm_groups for c in self.block_channels):
            raise ValueError(
                f"block_channels {self.block_channels} must be divisible by "
                f"norm_groups={self.norm_groups}"
            )
        put("scaling_factor", check_float("scaling_factor", self.scaling_factor, minimum=0.0,
                                          exclusive_minimum=True))  # fmt: skip
        if self.shift_factor is not None:
            put("shift_factor", check_float("shift_factor", self.shift_factor))
        n = self.latent_channels
        put("latents_mean", _floats("latents_mean", self.latents_mean, n))
        put("latents_std", _floats("latents_std", self.latents_std, n, positive=True))
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError("latents_mean and latents_std must be given together (or neither)")
        if self.latents_mean is not None and self.shift_factor is not None:
            raise ValueError(
                "shift_factor and latents_mean / latents_std are exclusive latent scalings; "
                "give one of them"
            )
        put("dtype", _floating("dtype", self.dtype))
        put("param_dtype", _floating("param_dtype", self.param_dtype))
        check_choice("attention_implementation", self.attention_implementation, _IMPLEMENTATIONS)

    @property
    def downscale(self) -> int:
        """Pixels per latent pixel along each side: ``2 ** (len(block_channels) - 1)``."""
        return 2 ** (len(self.block_channels) - 1)


def check_images(cfg: AutoencoderKLConfig, x) -> jnp.ndarray:
    """``x`` as a float array ``[B, H, W, in_channels]``; ``ValueError`` naming ``x`` otherwise."""
    return _check(x, "x", cfg.in_channels, "in_channels")


def check_latents(cfg: AutoencoderKLConfig, z, name: str = "z") -> jnp.ndarray:
    """``z`` as a float array ``[B, h, w, latent_channels]``; ``ValueError`` naming it."""
    return _check(z, name, cfg.latent_channels, "latent_channels")


def _check(x, name: str, channels: int, field: str):
    x = jnp.asarray(x)
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(
            f"{name} must be [B, H, W, {field}={channels}] (NHWC), got shape {x.shape}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a float array, got dtype {x.dtype}")
    if 0 in x.shape:
        raise ValueError(f"{name} must not be empty, got shape {x.shape}")
    return x
