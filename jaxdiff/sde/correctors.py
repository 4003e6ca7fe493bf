"""Correctors: Langevin MCMC steps at a fixed time ``t`` (Song et al. 2021, Alg. 4 and 5;
``score_sde``'s ``LangevinCorrector`` and ``AnnealedLangevinDynamics``).

Every corrector has the signature ``corrector(sde, score_fn, x, t, zs, *, snr) -> (x, x_mean)``:
``zs: [n_steps, B, ...]`` standard normal noise, one slice per Langevin step (``n_steps >= 0``);
``score_fn(x [B, ...], t [B] float32) -> [B, ...]``; ``t`` a scalar or ``[B]`` float. Each step is
``x_mean = x + eps * s(x, t)``, ``x = x_mean + sqrt(2 eps) z`` with step size ``eps``:

- :func:`langevin_corrector`: ``eps = 2 alpha (snr ||z|| / ||s||)^2``, the norms averaged over the
  batch (so one ``eps`` for the whole batch, as ``score_sde`` and diffusers'
  ``ScoreSdeVeScheduler.step_correct``); ``alpha = 1`` for VE SDEs and ``alpha_i`` of the VP chain
  (``i = floor(t (N - 1) / T)``) for VP / sub-VP;
- :func:`annealed_langevin_corrector`: ``eps = 2 alpha (snr * std(t))^2`` (NCSN's annealed
  Langevin dynamics, Song & Ermon 2019, with ``snr`` the step-size ratio), per example.

``x_mean`` is the last step's mean (``x`` itself when ``n_steps = 0``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.sde.predictors import score_at
from jaxdiff.sde.sdes import SubVPSDE, VPSDE, ScoreFn, batch_broadcast

__all__ = ["CORRECTORS", "langevin_corrector", "annealed_langevin_corrector", "no_corrector"]


def _alpha(sde, t, batch):
    if isinstance(sde, (VPSDE, SubVPSDE)):
        return jnp.broadcast_to(sde.alphas[sde.timestep_index(t)], (batch,))
    return jnp.ones((batch,), jnp.float32)


def _check_zs(zs, x):
    if zs is None:
        raise ValueError("zs (the corrector's noise [n_steps, B, ...]) is required, got None")
    if zs.shape[1:] != x.shape:
        raise ValueError(f"zs must have shape (n_steps, *x.shape) with x.shape = {x.shape}, "
                         f"got {zs.shape}")


def _norm(v):
    return jnp.linalg.norm(v.reshape(v.shape[0], -1), axis=-1).mean()


def langevin_corrector(sde, score_fn: ScoreFn, x, t, zs, *, snr: float):
    """``zs.shape[0]`` Langevin steps with the signal-to-noise-controlled step size.
    Returns ``(x, x_mean)``."""
    _check_zs(zs, x)
    alpha = _alpha(sde, t, x.shape[0])

    def step(carry, z):
        x, _ = carry
        grad = score_at(score_fn, x, t)
        step_size = (snr * _norm(z) / _norm(grad)) ** 2 * 2.0 * alpha
        x_mean = x + batch_broadcast(step_size, x) * grad
        return (x_mean + batch_broadcast(jnp.sqrt(step_size * 2.0), x) * z, x_mean), None

    (x, x_mean), _ = jax.lax.scan(step, (x, x), zs)
    return x, x_mean


def annealed_langevin_corrector(sde, score_fn: ScoreFn, x, t, zs, *, snr: float):
    """``zs.shape[0]`` annealed Langevin steps, step size ``2 alpha (snr std(t))^2``.
    Returns ``(x, x_mean)``."""
    _check_zs(zs, x)
    alpha = _alpha(sde, t, x.shape[0])
    std = jnp.broadcast_to(sde.marginal_coeffs(t)[1], (x.shape[0],))
    step_size = (snr * std) ** 2 * 2.0 * alpha

    def step(carry, z):
        x, _ = carry
        grad = score_at(score_fn, x, t)
        x_mean = x + batch_broadcast(step_size, x) * grad
        return (x_mean + batch_broadcast(jnp.sqrt(step_size * 2.0), x) * z, x_mean), None

    (x, x_mean), _ = jax.lax.scan(step, (x, x), zs)
    return x, x_mean


def no_corrector(sde, score_fn: ScoreFn, x, t, zs, *, snr: float):
    """The identity (predictor-only sampling)."""
    del sde, score_fn, t, zs, snr
    return x, x


CORRECTORS = {
    "langevin": langevin_corrector,
    "ald": annealed_langevin_corrector,
    "none": no_corrector,
}
