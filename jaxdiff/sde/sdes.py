"""Continuous-time diffusion SDEs as frozen pytrees (Song et al. 2021, "Score-Based Generative
Modeling through Stochastic Differential Equations"; the reference code is ``score_sde``).

Each SDE ``dx = f(x, t) dt + g(t) dw`` on ``t in [0, T]`` (``T = 1``) is a ``flax.struct.dataclass``
whose float parameters are pytree leaves and whose discretisation size ``N`` is static. Methods:

- ``sde(x, t) -> (drift [B, ...], diffusion [B])``; ``drift`` / ``diffusion`` one at a time;
- ``marginal_coeffs(t) -> (mean_coeff [B], std [B])`` and ``marginal_prob(x0, t) -> (mean, std)``:
  ``p_0t(x_t | x_0) = N(mean_coeff * x_0, std^2 I)``;
- ``prior_sampling(key, shape)`` and ``prior_logp(z) -> [B]``: the prior at ``t = T``;
- ``discretize(x, t) -> (f, G)``: one step of the forward chain, ``x_{i+1} = x_i + f + G z``,
  as ``score_sde``'s ``discretize`` (the generic Euler-Maruyama form ``f = drift dt``,
  ``G = g sqrt(dt)`` with ``dt = T / N``; VE and VP override it with their discrete chains: SMLD's
  noise levels and DDPM's betas, indexed by ``floor(t (N - 1) / T)``);
- ``reverse(score_fn, probability_flow=False)`` -> :class:`ReverseSDE`: ``dx = [f - g^2 s] dt + g
  dw_bar`` or the probability-flow ODE ``dx = [f - g^2 s / 2] dt`` (Song et al. eq. 6 and 13).

``t`` is a scalar or ``[B]`` float array; ``x`` is ``[B, ...]``; per-example coefficients are
broadcast against ``x``'s trailing axes. ``score_fn(x [B, ...], t [B] float32) -> [B, ...]`` is
the (model's) score ``grad_x log p_t(x)``.

The four SDEs:

- :class:`VESDE` (SMLD): ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``, ``f = 0``,
  ``g = sigma(t) sqrt(2 log(sigma_max / sigma_min))``; as in ``score_sde`` the marginal std is
  ``sigma(t)`` (the data is taken to be perturbed by ``sigma_min`` at ``t = 0``).
- :class:`TutorialVESDE`: ``dx = sigma^t dw`` of Song's score-SDE tutorial, marginal std
  ``sqrt((sigma^(2t) - 1) / (2 log sigma))`` (exactly 0 at ``t = 0``).
- :class:`VPSDE` (DDPM): ``beta(t) = beta_min + t (beta_max - beta_min)``, ``f = -beta x / 2``,
  ``g = sqrt(beta)``. Its chain's betas ``linspace(beta_min / N, beta_max / N, N)`` are
  ``make_schedule("linear", N, beta_start=beta_min / N, beta_end=beta_max / N).betas``.
- :class:`SubVPSDE`: VP's drift with ``g^2 = beta(t) (1 - exp(-2 int_0^t beta))``, std
  ``1 - exp(-int_0^t beta)``.

    >>> import jax, jax.numpy as jnp
    >>> sde = VPSDE(beta_min=0.1, beta_max=20.0, N=1000)
    >>> mean, std = sde.marginal_prob(jnp.ones((2, 3)), jnp.array([0.0, 1.0]))
    >>> mean.shape, std.shape
    ((2, 3), (2,))
    >>> f, G = jax.jit(sde.discretize)(jnp.ones((2, 3)), jnp.array([0.5, 0.5]))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = [
    "ScoreFn",
    "SDE",
    "VESDE",
    "TutorialVESDE",
    "VPSDE",
    "SubVPSDE",
    "ReverseSDE",
    "SDE_TYPES",
    "batch_broadcast",
    "vp_schedule",
]

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]


def batch_broadcast(v: jax.Array, x: jax.Array) -> jax.Array:
    """Per-example ``v`` (a scalar or ``[B]``) reshaped to broadcast against ``x: [B, ...]``."""
    v = jnp.asarray(v)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _t(t: Any) -> jax.Array:
    """``t`` as a float array (at least float32)."""
    t = jnp.asarray(t)
    return t.astype(jnp.promote_types(t.dtype, jnp.float32))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _check_positive(name: str, v: Any) -> None:
    """Checks a concrete scalar parameter (tracers and other leaves, as met when a pytree is
    rebuilt inside a transformation, pass unchecked)."""
    if _is_number(v) and not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")


def _check_n(n: Any) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"N must be an int >= 1 (the number of discretisation steps), got {n!r}")


def _check_order(low_name: str, low: Any, high_name: str, high: Any) -> None:
    if _is_number(low) and _is_number(high) and not low < high:
        raise ValueError(f"{low_name} must be < {high_name}, got {low_name}={low}, "
                         f"{high_name}={high}")


@dataclasses.dataclass(frozen=True)
class ReverseSDE:
    """The reverse-time SDE (or the probability-flow ODE) of ``forward`` under ``score_fn``.

    Attributes:
      forward: the forward SDE.
      score_fn: ``score_fn(x [B, ...], t [B] float32) -> [B, ...]``.
      probability_flow: the ODE ``dx = [f - g^2 s / 2] dt`` instead of the SDE
        ``dx = [f - g^2 s] dt + g dw_bar``.
    """

    forward: Any
    score_fn: ScoreFn
    probability_flow: bool = False

    @property
    def N(self) -> int:
        return self.forward.N

    @property
    def T(self) -> float:
        return self.forward.T

    def _score(self, x: jax.Array, t: jax.Array) -> jax.Array:
        out = self.score_fn(x, jnp.broadcast_to(t, (x.shape[0],)))
        if jnp.shape(out) != x.shape:
            raise ValueError(f"score_fn must return an array shaped like x {x.shape}, got "
                             f"{jnp.shape(out)}")
        return out

    def sde(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(drift [B, ...], diffusion [B])`` of the reverse-time process (``dt < 0``);
        diffusion is zero for the probability-flow ODE."""
        t = _t(t)
        drift, g = self.forward.sde(x, t)
        g = jnp.broadcast_to(g, (x.shape[0],))
        w = 0.5 if self.probability_flow else 1.0
        drift = drift - batch_broadcast(g**2, x) * self._score(x, t) * w
        return drift, (jnp.zeros_like(g) if self.probability_flow else g)

    def discretize(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(rev_f [B, ...], rev_G [B])`` with ``rev_f = f - G^2 s`` (half for the ODE): the
        reverse-diffusion step is ``x_mean = x - rev_f``, ``x = x_mean + rev_G z``."""
        t = _t(t)
        f, G = self.forward.discretize(x, t)
        G = jnp.broadcast_to(G, (x.shape[0],))
        w = 0.5 if self.probability_flow else 1.0
        rev_f = f - batch_broadcast(G**2, x) * self._score(x, t) * w
        return rev_f, (jnp.zeros_like(G) if self.probability_flow else G)


class SDE:
    """Methods shared by every SDE; subclasses define ``sde``, ``marginal_coeffs``, ``prior_std``
    and may override ``discretize``. ``T = 1``."""

    T = 1.0

    def sde(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError

    def marginal_coeffs(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError

    @property
    def prior_std(self) -> jax.Array:
        raise NotImplementedError

    def drift(self, x: jax.Array, t: jax.Array) -> jax.Array:
        """``f(x, t)``, ``[B, ...]``."""
        return self.sde(x, t)[0]

    def diffusion(self, t: jax.Array) -> jax.Array:
        """``g(t)`` in ``t``'s shape."""
        t = _t(t)
        return jnp.broadcast_to(self.sde(jnp.zeros(t.shape + (1,)), t)[1], t.shape)

    def marginal_prob(self, x0: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(mean [B, ...], std [B])`` of ``p_0t(x_t | x_0)``."""
        coeff, std = self.marginal_coeffs(_t(t))
        return batch_broadcast(coeff, x0) * x0, std

    def prior_sampling(self, key: jax.Array, shape: tuple, dtype=jnp.float32) -> jax.Array:
        """A draw ``[*shape]`` from the prior ``N(0, prior_std^2 I)`` at ``t = T``."""
        return jax.random.normal(key, shape, dtype) * jnp.asarray(self.prior_std, dtype)

    def prior_logp(self, z: jax.Array) -> jax.Array:
        """Log-density of ``z: [B, ...]`` under the prior, ``[B]`` (nats)."""
        d = math.prod(z.shape[1:])
        var = jnp.asarray(self.prior_std, jnp.float32) ** 2
        sq = jnp.sum(jnp.square(z).reshape(z.shape[0], -1), axis=-1)
        return -0.5 * d * jnp.log(2.0 * jnp.pi * var) - sq / (2.0 * var)

    def timestep_index(self, t: jax.Array) -> jax.Array:
        """The discrete chain's index ``floor(t (N - 1) / T)`` (int32), as ``score_sde``."""
        return (_t(t) * (self.N - 1) / self.T).astype(jnp.int32)

    def discretize(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Euler-Maruyama: ``f = drift * dt``, ``G = g * sqrt(dt)`` with ``dt = T / N``;
        ``(f [B, ...], G [B])``."""
        dt = self.T / self.N
        drift, g = self.sde(x, t)
        return drift * dt, jnp.broadcast_to(g * math.sqrt(dt), (x.shape[0],))

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> ReverseSDE:
        """The reverse-time SDE (or probability-flow ODE) under ``score_fn``."""
        return ReverseSDE(self, score_fn, bool(probability_flow))


@struct.dataclass
class VESDE(SDE):
    """Variance exploding (SMLD) SDE; ``N`` noise levels ``exp(linspace(log sigma_min,
    log sigma_max, N))`` for its discrete chain.

    Raises ``ValueError`` unless ``0 < sigma_min < sigma_max`` and ``N >= 1`` is an int.
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    N: int = struct.field(pytree_node=False, default=1000)

    def __post_init__(self):
        _check_positive("sigma_min", self.sigma_min)
        _check_positive("sigma_max", self.sigma_max)
        _check_order("sigma_min", self.sigma_min, "sigma_max", self.sigma_max)
        _check_n(self.N)

    @property
    def discrete_sigmas(self) -> jax.Array:
        """``[N]`` float32 noise levels from ``sigma_min`` to ``sigma_max``."""
        return jnp.exp(jnp.linspace(jnp.log(jnp.float32(self.sigma_min)),
                                    jnp.log(jnp.float32(self.sigma_max)), self.N))

    def sigma(self, t: jax.Array) -> jax.Array:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** _t(t)

    def sde(self, x, t):
        t = _t(t)
        g = self.sigma(t) * jnp.sqrt(2.0 * (jnp.log(self.sigma_max) - jnp.log(self.sigma_min)))
        return jnp.zeros_like(x), g

    def marginal_coeffs(self, t):
        t = _t(t)
        return jnp.ones_like(t), self.sigma(t)

    @property
    def prior_std(self):
        return self.sigma_max

    def discretize(self, x, t):
        """SMLD's chain: ``f = 0``, ``G = sqrt(sigma_i^2 - sigma_{i-1}^2)`` (``sigma_{-1} = 0``)."""
        i = self.timestep_index(t)
        sigmas = self.discrete_sigmas
        sigma = sigmas[i]
        adjacent = jnp.where(i == 0, 0.0, sigmas[jnp.maximum(i - 1, 0)])
        G = jnp.sqrt(sigma**2 - adjacent**2)
        return jnp.zeros_like(x), jnp.broadcast_to(G, (x.shape[0],))


@struct.dataclass
class TutorialVESDE(SDE):
    """``dx = sigma^t dw``: Song's tutorial VE SDE (``marginal_prob_std``/``diffusion_coeff``).

    Marginal std ``sqrt((sigma^(2t) - 1) / (2 log sigma))``, prior std its value at ``t = 1``;
    Euler-Maruyama discretisation. Raises ``ValueError`` unless ``sigma > 1``.
    """

    sigma: float = 25.0
    N: int = struct.field(pytree_node=False, default=1000)

    def __post_init__(self):
        if _is_number(self.sigma) and not (math.isfinite(self.sigma) and self.sigma > 1):
            raise ValueError(f"sigma must be a finite number > 1, got {self.sigma!r}")
        _check_n(self.N)

    def sde(self, x, t):
        return jnp.zeros_like(x), jnp.asarray(self.sigma, jnp.float32) ** _t(t)

    def marginal_coeffs(self, t):
        t = _t(t)
        log_sigma = jnp.log(jnp.asarray(self.sigma, jnp.float32))
        std = jnp.sqrt(jnp.expm1(2.0 * t * log_sigma) / (2.0 * log_sigma))
        return jnp.ones_like(t), std

    @property
    def prior_std(self):
        return self.marginal_coeffs(jnp.float32(self.T))[1]


@struct.dataclass
class VPSDE(SDE):
    """Variance preserving (DDPM) SDE. ``discrete_betas``/``alphas`` are its ``N``-step chain.

    Raises ``ValueError`` unless ``0 < beta_min < beta_max < N`` and ``N >= 1`` is an int.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    N: int = struct.field(pytree_node=False, default=1000)

    def __post_init__(self):
        _check_positive("beta_min", self.beta_min)
        _check_positive("beta_max", self.beta_max)
        _check_order("beta_min", self.beta_min, "beta_max", self.beta_max)
        _check_n(self.N)
        if _is_number(self.beta_max) and not self.beta_max / self.N < 1:
            raise ValueError(f"N must be > beta_max (the chain's last beta beta_max / N must be "
                             f"below 1), got N={self.N}, beta_max={self.beta_max}")

    @property
    def discrete_betas(self) -> jax.Array:
        """``[N]`` float32 ``linspace(beta_min / N, beta_max / N, N)``."""
        return jnp.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N,
                            dtype=jnp.float32)

    @property
    def alphas(self) -> jax.Array:
        return 1.0 - self.discrete_betas

    def beta(self, t):
        return self.beta_min + _t(t) * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t):
        """``-int_0^t beta / 2 = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2``."""
        t = _t(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def sde(self, x, t):
        beta = self.beta(t)
        return -0.5 * batch_broadcast(beta, x) * x, jnp.sqrt(beta)

    def marginal_coeffs(self, t):
        lmc = self.log_mean_coeff(t)
        return jnp.exp(lmc), jnp.sqrt(-jnp.expm1(2.0 * lmc))

    @property
    def prior_std(self):
        return 1.0

    def discretize(self, x, t):
        """DDPM's chain: ``f = (sqrt(alpha_i) - 1) x``, ``G = sqrt(beta_i)``."""
        i = self.timestep_index(t)
        beta = self.discrete_betas[i]
        f = (batch_broadcast(jnp.sqrt(1.0 - beta), x) - 1.0) * x
        return f, jnp.broadcast_to(jnp.sqrt(beta), (x.shape[0],))


@struct.dataclass
class SubVPSDE(SDE):
    """The sub-VP SDE (its variance is bounded by VP's). Euler-Maruyama discretisation; the
    Langevin corrector and the ancestral predictor read VP's chain (``discrete_betas``/``alphas``)
    with the same ``beta_min``/``beta_max``/``N``.

    Raises ``ValueError`` unless ``0 < beta_min < beta_max < N`` and ``N >= 1`` is an int.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    N: int = struct.field(pytree_node=False, default=1000)

    __post_init__ = VPSDE.__post_init__
    discrete_betas = VPSDE.discrete_betas
    alphas = VPSDE.alphas
    beta = VPSDE.beta
    log_mean_coeff = VPSDE.log_mean_coeff

    def sde(self, x, t):
        t = _t(t)
        beta = self.beta(t)
        discount = -jnp.expm1(-2.0 * self.beta_min * t - (self.beta_max - self.beta_min) * t**2)
        return -0.5 * batch_broadcast(beta, x) * x, jnp.sqrt(beta * discount)

    def marginal_coeffs(self, t):
        lmc = self.log_mean_coeff(t)
        return jnp.exp(lmc), -jnp.expm1(2.0 * lmc)

    @property
    def prior_std(self):
        return 1.0


SDE_TYPES = {"ve": VESDE, "tutorial_ve": TutorialVESDE, "vp": VPSDE, "subvp": SubVPSDE}


def vp_schedule(sde: VPSDE):
    """jaxdiff's discrete :class:`~jaxdiff.schedules.Schedule` of a VP SDE's chain:
    ``make_schedule("linear", N, beta_start=beta_min / N, beta_end=beta_max / N)``.

    Raises ``ValueError`` (from :func:`~jaxdiff.schedules.make_schedule`) when ``beta_max / N``
    is not below 1.
    """
    from jaxdiff.schedules import make_schedule

    return make_schedule("linear", sde.N, beta_start=float(sde.beta_min) / sde.N,
                         beta_end=float(sde.beta_max) / sde.N)
