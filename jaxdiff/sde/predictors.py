"""Predictors: one reverse-time step of an SDE sampler (Song et al. 2021, Sec. 4 and App. F;
``score_sde``'s ``sampling.py``).

Every predictor has the signature ``predictor(sde, score_fn, x, t, z) -> (x_next, x_mean)``:

- ``sde``: a forward SDE of :mod:`jaxdiff.sde.sdes`;
- ``score_fn(x [B, ...], t [B] float32) -> [B, ...]``;
- ``x``: ``[B, ...]`` the current sample at time ``t`` (a scalar or ``[B]`` float);
- ``z``: ``[B, ...]`` standard normal noise (required: ``None`` raises, except for
  :func:`no_predictor`);
- ``x_mean``: the step without its noise (the "denoised" output of the last step).

The steps, for ``N = sde.N`` and ``i = floor(t (N - 1) / T)``:

- :func:`euler_maruyama_predictor`: ``x_mean = x - [f - g^2 s] dt``, ``x = x_mean + g sqrt(dt) z``
  with ``dt = T / N``;
- :func:`reverse_diffusion_predictor`: ``x_mean = x - f_i + G_i^2 s``, ``x = x_mean + G_i z`` from
  ``sde.discretize`` (for VE this is diffusers' ``ScoreSdeVeScheduler.step_pred``);
- :func:`ancestral_predictor`: SMLD's ancestral step for VE (``x_mean = x + (sigma_i^2 -
  sigma_{i-1}^2) s``, std ``sqrt(sigma_{i-1}^2 (sigma_i^2 - sigma_{i-1}^2) / sigma_i^2)``) and
  DDPM's for VP / sub-VP (``x_mean = (x + beta_i s) / sqrt(1 - beta_i)``, std ``sqrt(beta_i)``);
  other SDEs raise ``ValueError``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.sde.sdes import SubVPSDE, VESDE, VPSDE, ScoreFn, batch_broadcast

__all__ = [
    "PREDICTORS",
    "euler_maruyama_predictor",
    "reverse_diffusion_predictor",
    "ancestral_predictor",
    "no_predictor",
    "score_at",
]


def score_at(score_fn: ScoreFn, x: jax.Array, t: jax.Array) -> jax.Array:
    """``score_fn(x, t [B])`` with ``t`` broadcast to the batch; raises ``ValueError`` unless the
    output has ``x``'s shape."""
    t = jnp.asarray(t)
    out = score_fn(x, jnp.broadcast_to(t.astype(jnp.promote_types(t.dtype, jnp.float32)),
                                       (x.shape[0],)))
    if jnp.shape(out) != x.shape:
        raise ValueError(f"score_fn must return an array shaped like x {x.shape}, got "
                         f"{jnp.shape(out)}")
    return out


def _need_noise(z, name):
    if z is None:
        raise ValueError(f"z (the {name}'s standard normal noise [B, ...]) is required, got None")


def euler_maruyama_predictor(sde, score_fn: ScoreFn, x, t, z):
    """One Euler-Maruyama step of the reverse SDE, ``dt = -T / N``. Returns ``(x, x_mean)``."""
    _need_noise(z, "predictor")
    dt = -sde.T / sde.N
    drift, g = sde.reverse(score_fn).sde(x, t)
    x_mean = x + drift * dt
    return x_mean + batch_broadcast(g, x) * jnp.sqrt(-dt) * z, x_mean


def reverse_diffusion_predictor(sde, score_fn: ScoreFn, x, t, z):
    """One step of the reverse of ``sde.discretize``'s chain. Returns ``(x, x_mean)``."""
    _need_noise(z, "predictor")
    f, G = sde.reverse(score_fn).discretize(x, t)
    x_mean = x - f
    return x_mean + batch_broadcast(G, x) * z, x_mean


def ancestral_predictor(sde, score_fn: ScoreFn, x, t, z):
    """Ancestral sampling of the discrete chain (VE: SMLD, VP / sub-VP: DDPM). Returns
    ``(x, x_mean)``; raises ``ValueError`` for another SDE."""
    _need_noise(z, "predictor")
    i = sde.timestep_index(t)
    if isinstance(sde, VESDE):
        sigmas = sde.discrete_sigmas
        sigma = sigmas[i]
        adjacent = jnp.where(i == 0, 0.0, sigmas[jnp.maximum(i - 1, 0)])
        score = score_at(score_fn, x, t)
        x_mean = x + score * batch_broadcast(sigma**2 - adjacent**2, x)
        std = jnp.sqrt(adjacent**2 * (sigma**2 - adjacent**2) / sigma**2)
        return x_mean + batch_broadcast(jnp.broadcast_to(std, (x.shape[0],)), x) * z, x_mean
    if isinstance(sde, (VPSDE, SubVPSDE)):
        beta = jnp.broadcast_to(sde.discrete_betas[i], (x.shape[0],))
        score = score_at(score_fn, x, t)
        x_mean = (x + batch_broadcast(beta, x) * score) / batch_broadcast(jnp.sqrt(1.0 - beta), x)
        return x_mean + batch_broadcast(jnp.sqrt(beta), x) * z, x_mean
    raise ValueError("predictor 'ancestral' is defined for VESDE, VPSDE and SubVPSDE, got "
                     f"{type(sde).__name__}")


def no_predictor(sde, score_fn: ScoreFn, x, t, z):
    """The identity (corrector-only sampling, e.g. annealed Langevin dynamics)."""
    del sde, score_fn, t, z
    return x, x


PREDICTORS = {
    "euler_maruyama": euler_maruyama_predictor,
    "reverse_diffusion": reverse_diffusion_predictor,
    "ancestral": ancestral_predictor,
    "none": no_predictor,
}
