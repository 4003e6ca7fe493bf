"""Predictor-corrector sampling of a reverse SDE as one ``lax.scan`` (Song et al. 2021, Alg. 1;
``score_sde``'s ``pc_sampler``).

The grid is ``sde_timesteps(sde, eps) = linspace(T, eps, N)`` (``N = sde.N``, or ``num_steps``,
which replaces the SDE's ``N``: the discrete chains of VE / VP are indexed by it). Step ``i`` at
``t_i`` runs the corrector, then the predictor (the order of ``score_sde`` and of diffusers'
``ScoreSdeVePipeline``); with ``denoise`` the last step returns the predictor's noise-free mean.

Every combination of :data:`~jaxdiff.sde.predictors.PREDICTORS` (``"euler_maruyama"``,
``"reverse_diffusion"``, ``"ancestral"``, ``"none"``) and
:data:`~jaxdiff.sde.correctors.CORRECTORS` (``"langevin"``, ``"ald"``, ``"none"``) is one
:func:`pc_sample` call: Euler-Maruyama is ``predictor="euler_maruyama", corrector="none"``;
annealed Langevin dynamics (NCSN) is ``predictor="none", corrector="ald"``.

The scan runs on the shared driver :func:`jaxdiff.samplers.driver.run_scan` in its deterministic
mode: a PC step draws ``n_corrector_steps + 1`` noises, not the driver's one, so step ``i`` draws
them itself as ``normal(fold_in(key, i), (n_corrector_steps + 1, B, ...))`` (corrector noises
first, then the predictor's) or reads ``noise[i]``.

    >>> import jax, jax.numpy as jnp
    >>> from jaxdiff.sde import VESDE
    >>> sde = VESDE(sigma_min=0.01, sigma_max=5.0, N=20)
    >>> score_fn = lambda x, t: -x / (1.0 + sde.marginal_coeffs(t)[1][:, None] ** 2)
    >>> x_T = sde.prior_sampling(jax.random.key(0), (8, 2))
    >>> x0 = pc_sample(score_fn, sde, x_T, jax.random.key(1), eps=1e-5)
    >>> x0.shape
    (8, 2)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.samplers.driver import checked_model, prepare_x_T, run_scan
from jaxdiff.sde.correctors import CORRECTORS
from jaxdiff.sde.predictors import PREDICTORS
from jaxdiff.sde.sdes import ScoreFn
from jaxdiff.validation import check_bool, check_choice, check_float, check_int

__all__ = ["sde_timesteps", "pc_sample", "check_eps"]


def check_eps(sde, eps: Any) -> float:
    """``eps`` as a float in ``(0, T)``; ``ValueError`` naming ``eps`` otherwise."""
    return check_float("eps", eps, minimum=0.0, maximum=sde.T, exclusive_minimum=True,
                       exclusive_maximum=True)


def sde_timesteps(sde, eps: float) -> np.ndarray:
    """``[N]`` float32 ``linspace(T, eps, N)`` (``N = sde.N``), computed on the host."""
    eps = check_eps(sde, eps)
    return np.linspace(sde.T, eps, sde.N).astype(np.float32)


def pc_sample(
    score_fn: ScoreFn,
    sde,
    x_T: jax.Array,
    key: jax.Array | None,
    *,
    predictor: str = "reverse_diffusion",
    corrector: str = "langevin",
    snr: float = 0.16,
    n_corrector_steps: int = 1,
    eps: float = 1e-3,
    num_steps: int | None = None,
    denoise: bool = True,
    noise: jax.Array | None = None,
    return_trajectory: bool = False,
):
    """Sample the reverse SDE from ``x_T`` with a predictor and a corrector.

    Args:
      score_fn: ``score_fn(x [B, ...], t [B] float32) -> [B, ...]``.
      sde: a forward SDE (:mod:`jaxdiff.sde.sdes`).
      x_T: ``[B, ...]`` a draw from the prior (``sde.prior_sampling(key, shape)``); carried in at
        least float32.
      key: PRNG key; step ``i`` draws from ``fold_in(key, i)``. May be ``None`` when ``noise`` is
        given or nothing is stochastic.
      predictor: a name in :data:`~jaxdiff.sde.predictors.PREDICTORS`.
      corrector: a name in :data:`~jaxdiff.sde.correctors.CORRECTORS`.
      snr: the corrector's signal-to-noise ratio (``> 0``).
      n_corrector_steps: Langevin steps per time step (``>= 0``; taken as 0 with
        ``corrector="none"``).
      eps: the last time of the grid, in ``(0, T)`` (``score_sde`` uses ``1e-3`` for VP, ``1e-5``
        for VE).
      num_steps: the number of steps; replaces ``sde.N`` (``None``: keep it).
      denoise: return the last step's mean instead of its noisy sample.
      noise: optional ``[N, n_corrector_steps + 1, B, ...]`` standard normal noise instead of
        ``key``.
      return_trajectory: also return the path.

    Returns:
      ``x_0 [B, ...]``; with ``return_trajectory`` ``(x_0, xs [N + 1, B, ...], x_means [N, B,
      ...])`` with ``xs[0] = x_T``.

    Raises:
      ValueError: an unknown predictor / corrector, ``snr <= 0``, ``n_corrector_steps < 0``,
        ``eps`` outside ``(0, T)``, a ``noise`` of the wrong shape, no ``key`` and no ``noise``
        for a stochastic sampler, the ancestral predictor with an SDE that has no ancestral chain,
        or a ``score_fn`` output of the wrong shape.
    """
    pred_fn = PREDICTORS[check_choice("predictor", predictor, tuple(PREDICTORS))]
    corr_fn = CORRECTORS[check_choice("corrector", corrector, tuple(CORRECTORS))]
    snr = check_float("snr", snr, minimum=0.0, exclusive_minimum=True)
    n_c = check_int("n_corrector_steps", n_corrector_steps, minimum=0)
    if corrector == "none":
        n_c = 0
    denoise = check_bool("denoise", denoise)
    if num_steps is not None:
        num_steps = check_int("num_steps", num_steps, minimum=1)
        try:
            sde = sde.replace(N=num_steps)
        except ValueError as e:
            raise ValueError(f"num_steps={num_steps} is invalid for {type(sde).__name__}: {e}") \
                from None
    ts = jnp.asarray(sde_timesteps(sde, eps))
    n = sde.N
    x_T = prepare_x_T(x_T)
    stochastic = predictor != "none" or (corrector != "none" and n_c > 0)
    shape = (n, n_c + 1, *x_T.shape)
    if noise is not None:
        noise = jnp.asarray(noise, x_T.dtype)
        if noise.shape != shape:
            raise ValueError(f"noise must have shape (num_steps, n_corrector_steps + 1, "
                             f"*x_T.shape) = {shape}, got {noise.shape}")
    elif stochastic and key is None:
        raise ValueError("key is required by a stochastic sampler when no noise is given")
    score = checked_model(score_fn, x_T.shape)

    def body(state, x, i, _):
        t = ts[i]
        if noise is not None:
            zs = noise[i]
        elif stochastic:
            zs = jax.random.normal(jax.random.fold_in(key, i), shape[1:], x.dtype)
        else:
            zs = jnp.zeros(shape[1:], x.dtype)
        x, x_mean = corr_fn(sde, score, x, t, zs[:n_c], snr=snr)
        x, x_mean = pred_fn(sde, score, x, t, zs[n_c])
        if denoise:
            x = jnp.where(i == n - 1, x_mean, x)
        return state, x, x_mean

    return run_scan(body, None, x_T, None, n, stochastic=False,
                    return_trajectory=return_trajectory)
