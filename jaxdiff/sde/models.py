"""Score networks for continuous time ``t in [0, T]`` (Flax linen).

- :class:`GaussianFourierProjection`: fixed random Fourier features of ``t`` (Tancik et al. 2020;
  the score-SDE tutorial's time embedding), ``[sin(2 pi t W), cos(2 pi t W)]`` with ``W ~ N(0,
  scale^2)`` initialised once and never trained.
- :class:`ScoreMLP`: an MLP score model for low-dimensional data ``[B, ...]`` (flattened inside):
  the time embedding is added to every hidden layer, the input is divided by the marginal's scale
  ``sqrt(mean_coeff^2 data_std^2 + std^2)`` (optional), and the output is divided by ``std(t)``
  (the noise-conditional scaling of the tutorial: the network then predicts ``-z``-like targets of
  unit scale, and the score has the ``1 / std`` growth of the true one near ``t = 0``).
- :class:`ScoreUNet`: jaxdiff's :class:`~jaxdiff.models.UNet` as a score model: it sees
  ``t * time_scale`` (a float timestep; the UNet's sinusoidal embedding takes fractional
  timesteps) and its output is divided by ``std(t)``.
- :func:`score_from_eps`: the score ``-eps / std`` of a noise-prediction model.

Every module's call is ``module.apply({"params": p}, x, t)`` with ``x: [B, ...]``, ``t: [B]``
float (a scalar is broadcast) and returns the score ``[B, ...]`` in float32.

    >>> import jax, jax.numpy as jnp
    >>> from jaxdiff.sde import TutorialVESDE
    >>> net = ScoreMLP(sde=TutorialVESDE(sigma=25.0), features=(32, 32))
    >>> x, t = jnp.zeros((4, 2)), jnp.full((4,), 0.5)
    >>> params = jax.jit(net.init)(jax.random.key(0), x, t)["params"]
    >>> jax.jit(net.apply)({"params": params}, x, t).shape
    (4, 2)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.sde.sdes import batch_broadcast

__all__ = ["GaussianFourierProjection", "ScoreMLP", "ScoreUNet", "score_from_eps"]


def _time(t: Any, batch: int) -> jax.Array:
    t = jnp.asarray(t, jnp.float32)
    if t.ndim == 0:
        t = jnp.broadcast_to(t, (batch,))
    if t.shape != (batch,):
        raise ValueError(f"t must have shape [B] = ({batch},) or be a scalar, got {t.shape}")
    return t


class GaussianFourierProjection(nn.Module):
    """``t [B]`` -> ``[B, embed_dim]`` random Fourier features (``embed_dim`` even).

    Attributes:
      embed_dim: the output width.
      scale: the std of the frequencies ``W`` (the tutorial uses 30 for ``t in [0, 1]``).
    """

    embed_dim: int
    scale: float = 30.0

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        if self.embed_dim < 2 or self.embed_dim % 2:
            raise ValueError(f"embed_dim must be an even int >= 2, got {self.embed_dim}")
        w = self.param("W", nn.initializers.normal(stddev=self.scale), (self.embed_dim // 2,))
        proj = jnp.asarray(t, jnp.float32)[:, None] * jax.lax.stop_gradient(w)[None, :]
        proj = 2.0 * math.pi * proj
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


class ScoreMLP(nn.Module):
    """A time-conditional MLP score model ``(x [B, ...], t [B]) -> score [B, ...]``.

    Attributes:
      sde: the forward SDE (its ``marginal_coeffs`` give ``std(t)`` for the output scaling).
      features: hidden widths.
      embed_dim: width of the time embedding.
      fourier_scale: see :class:`GaussianFourierProjection`.
      data_std: the data's scale for the input normalisation; ``None`` feeds ``x`` unscaled.
      act: the activation (``swish``, as the tutorial).
    """

    sde: Any
    features: Sequence[int] = (128, 128, 128)
    embed_dim: int = 64
    fourier_scale: float = 30.0
    data_std: float | None = 1.0
    act: Callable[[jax.Array], jax.Array] = nn.swish

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        if x.ndim < 2:
            raise ValueError(f"x must be a batch [B, D, ...], got shape {x.shape}")
        batch = x.shape[0]
        t = _time(t, batch)
        coeff, std = self.sde.marginal_coeffs(t)
        coeff, std = jnp.broadcast_to(coeff, (batch,)), jnp.broadcast_to(std, (batch,))
        h = x.reshape(batch, -1)
        if self.data_std is not None:
            h = h / jnp.sqrt(coeff**2 * self.data_std**2 + std**2)[:, None]
        emb = self.act(nn.Dense(self.embed_dim)(
            GaussianFourierProjection(self.embed_dim, self.fourier_scale)(t)))
        for width in self.features:
            h = self.act(nn.Dense(width)(h) + nn.Dense(width)(emb))
        out = nn.Dense(math.prod(x.shape[1:]))(h)
        return out.reshape(x.shape) / batch_broadcast(std, x)


class ScoreUNet(nn.Module):
    """jaxdiff's UNet as a continuous-time score model.

    ``apply({"params": p}, x [B, H, W, C], t [B] float, labels=, context=, train=)`` runs
    ``UNet(config)(x, t * time_scale, ...)`` and divides its output by ``std(t)``; ``config``
    needs ``out_channels == in_channels``. The UNet's parameters live under ``"unet"``.

    Attributes:
      config: a :class:`~jaxdiff.models.UNetConfig`.
      sde: the forward SDE.
      time_scale: maps ``t in [0, 1]`` to the embedding's timestep range (``999``: the range of a
        1000-step discrete model, as ``score_sde``'s continuous DDPM models).
    """

    config: Any
    sde: Any
    time_scale: float = 999.0

    @nn.compact
    def __call__(self, x, t, *, labels=None, context=None, train: bool = False):
        from jaxdiff.models import UNet

        x = jnp.asarray(x)
        if self.config.out_channels != self.config.in_channels:
            raise ValueError(f"config.out_channels must equal in_channels for a score model, "
                             f"got {self.config.out_channels} != {self.config.in_channels}")
        t = _time(t, x.shape[0])
        out = UNet(self.config, name="unet")(x, t * self.time_scale, labels=labels,
                                            context=context, train=train)
        std = jnp.broadcast_to(self.sde.marginal_coeffs(t)[1], t.shape)
        return out.astype(jnp.float32) / batch_broadcast(std, out)


def score_from_eps(eps_fn: Callable[[jax.Array, jax.Array], jax.Array],
                   sde) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``score_fn(x, t) = -eps_fn(x, t) / std(t)`` for a noise-prediction model
    ``eps_fn(x [B, ...], t [B] float) -> [B, ...]`` trained with
    :func:`jaxdiff.losses.eps_loss`."""

    def score_fn(x, t):
        std = jnp.broadcast_to(sde.marginal_coeffs(t)[1], (x.shape[0],))
        return -eps_fn(x, t) / batch_broadcast(std, x)

    return score_fn
