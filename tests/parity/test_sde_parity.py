"""jaxdiff.sde's VE predictor-corrector sampler against diffusers' ``ScoreSdeVeScheduler``, and
its VP Euler-Maruyama predictor against the deprecated ``ScoreSdeVpScheduler`` (PyTorch,
float32).

The diffusers side is ``ScoreSdeVePipeline``'s loop: ``set_timesteps(N)``, ``set_sigmas(N)``, then
per step ``correct_steps`` x (model -> ``step_correct``) and model -> ``step_pred``, returning the
last ``prev_sample_mean``. jaxdiff runs :func:`jaxdiff.sde.pc_sample` (reverse-diffusion predictor,
Langevin corrector, ``denoise=True``) jitted over the whole trajectory. Both get the same ``x_T``
and the same noise: diffusers draws through ``randn_tensor`` imported into
``scheduling_sde_ve``, which the tests patch to return, in order, the noise jaxdiff is given
(corrector noises first, then the predictor's, as ``pc_sample`` lays them out).

The score is an O(1) analytic stand-in, the exact score ``-x / (1 + sigma^2)`` of data ``N(0, I)``
under the VE SDE (diffusers passes the model ``sigma``, jaxdiff ``t``; the stand-in turns ``t``
into ``sigma(t)``).

Tolerance (float32): every step's sample relative to ``max(1, max|x_step|)`` (the states are
``O(sigma)``, up to ~3600 at ``sigma_max = 1348``, where a float32 ulp is 2.4e-4), and the final
sample absolutely, within the steps' errors (``_path_rtol``): ``STEP_ULPS`` ulps per predictor or
corrector step, and the noise levels' float32 bounds (see test_grid_and_noise_levels_...) times
the step's sensitivity to them. The reverse VE process shrinks an error relative to the state by
``sqrt((1 + sigma_i^2) / (1 + sigma_j^2))`` from step j to step i (the state falls like sigma),
the VP one keeps it (O(1) states, a contracting flow).
"""

import jax
import numpy as np
import pytest
import torch
from diffusers import ScoreSdeVeScheduler
from diffusers.schedulers import scheduling_sde_ve

from jaxdiff.sde import (
    VESDE,
    VPSDE,
    pc_sample,
    reverse_diffusion_predictor,
    score_from_eps,
    sde_timesteps,
)
from tests.parity.tolerances import STEP_ULPS, ulps, within

B, H, W, C = 2, 4, 4, 3


def _path_rtol(n, steps_per_step=1, sde=None):
    """``[N + 1]`` bounds, relative to each step's ``max(1, max|x|)``, after 0..N steps of
    ``steps_per_step`` model calls each (module docstring). For the VE ``sde``, each step also
    moves with its noise levels: the predictor adds ``sqrt(s_i^2 - s_{i-1}^2) z`` and ``(s_i^2 -
    s_{i-1}^2) score``, whose derivatives in ``log s_i`` and ``log s_{i-1}`` are at most
    ``s_i^2 / sqrt(s_i^2 - s_{i-1}^2)`` and 2 (relative to the state, the score being ``-x / (1 +
    s^2)``), times the discrete sigmas' bound (``_sigma_rtols``); every model call's score moves by
    twice the continuous sigma's bound."""
    local = np.full(n, ulps(STEP_ULPS * steps_per_step))
    if sde is None:
        return np.concatenate([[0.0], np.cumsum(local)])
    s = np.asarray(sde.discrete_sigmas, np.float64)[::-1]  # the order the sampler visits them
    prev = np.concatenate([s[1:], [0.0]])
    discrete, continuous = _sigma_rtols(sde.sigma_min, sde.sigma_max)
    sens = 2 * (s**2 / np.sqrt(s**2 - prev**2) + 2) / np.maximum(1.0, s)
    local = local + sens * discrete + 2 * steps_per_step * continuous
    weight = np.sqrt((1 + s[None, :] ** 2) / (1 + s[:, None] ** 2))  # [i, j]: step j -> i
    path = (np.tril(np.minimum(1.0, 1 / weight)) * local[None, :]).sum(axis=1)
    return np.concatenate([[0.0], path])


def _sigma_rtols(sigma_min, sigma_max):
    """Relative bounds on diffusers' float32 noise levels (test_grid_and_noise_levels_...):
    ``discrete_sigmas = exp(linspace(log sigma_min, log sigma_max))`` (the linspace's six roundings
    a side at ``|log sigma|``, then exp and the cast); ``sigmas = sigma_min (sigma_max / sigma_min)
    ** t`` (``t``'s 12 ulps and the ratio's rounding times ``log(sigma_max / sigma_min)``, pow's 2
    ulps a side and the product)."""
    log_max = np.abs(np.log([sigma_min, sigma_max])).max()
    return ulps(12 * log_max + 4), ulps(14 * np.log(sigma_max / sigma_min) + 6)


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.numpy().transpose(0, 2, 3, 1)


def _torch_pc(monkeypatch, x_T, noise, *, n, sigma_min, sigma_max, eps, snr, n_c):
    """diffusers' pipeline loop with the stand-in score; returns the path ``[N + 1, B, H, W, C]``
    (the last entry is the final ``prev_sample_mean``)."""
    draws = iter([_nchw(noise[i, j]) for i in range(n) for j in range(n_c + 1)])
    monkeypatch.setattr(scheduling_sde_ve, "randn_tensor", lambda shape, **kw: next(draws))
    sched = ScoreSdeVeScheduler(num_train_timesteps=n, snr=snr, sigma_min=sigma_min,
                                sigma_max=sigma_max, sampling_eps=eps, correct_steps=n_c)
    sched.set_timesteps(n)
    sched.set_sigmas(n)
    x = _nchw(x_T)
    path = [x]
    for i, t in enumerate(sched.timesteps):
        sigma = (sched.sigmas[i] * torch.ones(B))[:, None, None, None]
        for _ in range(n_c):
            x = sched.step_correct(-x / (1 + sigma**2), x).prev_sample
        out = sched.step_pred(-x / (1 + sigma**2), t, x)
        x, x_mean = out.prev_sample, out.prev_sample_mean
        path.append(x)
    path[-1] = x_mean
    assert next(draws, None) is None  # diffusers consumed exactly the noise jaxdiff was given
    return np.stack([_nhwc(p) for p in path])


@pytest.mark.slow
@pytest.mark.parametrize("n, sigma_max, n_c, snr", [(50, 1.0, 1, 0.15), (100, 50.0, 2, 0.16),
                                                     (200, 1348.0, 1, 0.15)])
def test_pc_trajectory_matches_score_sde_ve_scheduler(monkeypatch, n, sigma_max, n_c, snr):
    sigma_min, eps = 0.01, 1e-5
    sde = VESDE(sigma_min=sigma_min, sigma_max=sigma_max, N=n)
    key = jax.random.key(n)
    x_T = sde.prior_sampling(jax.random.fold_in(key, 0), (B, H, W, C))
    noise = jax.random.normal(jax.random.fold_in(key, 1), (n, n_c + 1, B, H, W, C))

    def score_fn(x, t):
        return -x / (1.0 + sde.sigma(t)[:, None, None, None] ** 2)

    run = jax.jit(lambda x_T, noise: pc_sample(
        score_fn, sde, x_T, None, predictor="reverse_diffusion", corrector="langevin", snr=snr,
        n_corrector_steps=n_c, eps=eps, noise=noise, return_trajectory=True))
    x0, xs, _ = run(x_T, noise)
    ref = _torch_pc(monkeypatch, x_T, noise, n=n, sigma_min=sigma_min, sigma_max=sigma_max,
                    eps=eps, snr=snr, n_c=n_c)
    xs = np.asarray(xs)
    assert xs.shape == ref.shape
    err = np.abs(xs - ref).reshape(n + 1, -1).max(axis=1)
    scale = np.maximum(1.0, np.abs(ref).reshape(n + 1, -1).max(axis=1))
    rtol = _path_rtol(n, n_c + 1, sde)
    np.testing.assert_allclose(np.asarray(x0), ref[-1], rtol=0, atol=rtol[-1] * scale[-1])
    within(err / scale, rtol, "path / max(1, max|x|)")


def test_grid_and_noise_levels_match_set_timesteps_and_set_sigmas():
    n, sigma_min, sigma_max, eps = 30, 0.01, 1348.0, 1e-5
    sched = ScoreSdeVeScheduler(num_train_timesteps=n, sigma_min=sigma_min, sigma_max=sigma_max,
                                sampling_eps=eps)
    sched.set_timesteps(n)
    sched.set_sigmas(n)
    sde = VESDE(sigma_min=sigma_min, sigma_max=sigma_max, N=n)
    ts = sde_timesteps(sde, eps)
    # torch's float32 linspace of values <= 1: six roundings a side (tolerances.float32_betas_atol)
    np.testing.assert_allclose(ts, sched.timesteps.numpy(), rtol=0, atol=ulps(12))
    # the discrete chain's index floor(t (N - 1)) is the same on both grids
    np.testing.assert_array_equal(np.asarray(sde.timestep_index(ts)),
                                  (sched.timesteps * (n - 1)).long().numpy())
    discrete, continuous = _sigma_rtols(sigma_min, sigma_max)
    np.testing.assert_allclose(np.asarray(sde.discrete_sigmas), sched.discrete_sigmas.numpy(),
                               rtol=discrete)
    np.testing.assert_allclose(np.asarray(sde.sigma(ts)), sched.sigmas.numpy(), rtol=continuous)


def test_single_predictor_step_matches_step_pred(monkeypatch):
    n, sde = 40, VESDE(sigma_min=0.01, sigma_max=1.0, N=40)
    sched = ScoreSdeVeScheduler(num_train_timesteps=n, sigma_min=0.01, sigma_max=1.0)
    sched.set_timesteps(n)
    sched.set_sigmas(n)
    key = jax.random.key(3)
    x = jax.random.normal(key, (B, H, W, C))
    z = jax.random.normal(jax.random.fold_in(key, 1), (B, H, W, C))
    model_out = jax.random.normal(jax.random.fold_in(key, 2), (B, H, W, C))
    monkeypatch.setattr(scheduling_sde_ve, "randn_tensor", lambda shape, **kw: _nchw(z))
    for i in (0, 17, n - 1):  # first step, a middle one, and the last (adjacent sigma = 0)
        t = sched.timesteps[i]
        got, got_mean = reverse_diffusion_predictor(sde, lambda x_, t_: model_out, x, t.item(), z)
        ref = sched.step_pred(_nchw(model_out), t, _nchw(x))
        # one step's roundings at the scale of its terms (sigma_max = 1: all O(max |input|))
        atol = ulps(STEP_ULPS, 2 * max(np.abs(a).max() for a in (x, z, model_out)))
        np.testing.assert_allclose(np.asarray(got), _nhwc(ref.prev_sample), rtol=0, atol=atol)
        np.testing.assert_allclose(np.asarray(got_mean), _nhwc(ref.prev_sample_mean), rtol=0,
                                   atol=atol)


@pytest.mark.slow
def test_vp_euler_maruyama_trajectory_matches_score_sde_vp_scheduler(monkeypatch):
    """jaxdiff's Euler-Maruyama predictor on the VP SDE (``dt = -1 / N``) against diffusers'
    deprecated ``ScoreSdeVpScheduler.step_pred``, which takes a noise prediction and forms the
    score ``-eps / std``: :func:`jaxdiff.sde.score_from_eps` on the jaxdiff side. The stand-in is
    the exact eps of data ``N(0, 0.25 I)``, ``std x / (c^2 0.25 + std^2)``. Bounds: see the
    module docstring."""
    from diffusers.schedulers.deprecated import scheduling_sde_vp

    n, eps, s2 = 200, 1e-3, 0.25
    sde = VPSDE(N=n)
    key = jax.random.key(0)
    x_T = jax.random.normal(jax.random.fold_in(key, 0), (B, H, W, C))
    noise = jax.random.normal(jax.random.fold_in(key, 1), (n, 1, B, H, W, C))

    def eps_fn(x, t):
        c, std = sde.marginal_coeffs(t)
        return (std / (c**2 * s2 + std**2))[:, None, None, None] * x

    run = jax.jit(lambda x_T, noise: pc_sample(
        score_from_eps(eps_fn, sde), sde, x_T, None, predictor="euler_maruyama",
        corrector="none", eps=eps, noise=noise, return_trajectory=True))
    x0, xs, _ = run(x_T, noise)

    draws = iter([_nchw(noise[i, 0]) for i in range(n)])
    monkeypatch.setattr(scheduling_sde_vp, "randn_tensor", lambda shape, **kw: next(draws))
    sched = scheduling_sde_vp.ScoreSdeVpScheduler(num_train_timesteps=n, sampling_eps=eps)
    sched.set_timesteps(n)
    x = _nchw(x_T)
    path = [x]
    for t in sched.timesteps:
        lmc = -0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1
        c, std = torch.exp(lmc), torch.sqrt(1.0 - torch.exp(2.0 * lmc))
        x, x_mean = sched.step_pred(std / (c**2 * s2 + std**2) * x, x, t * torch.ones(B))
        path.append(x)
    path[-1] = x_mean
    assert next(draws, None) is None
    ref = np.stack([_nhwc(p) for p in path])
    # O(1) states: the steps' roundings at the scale of the largest state or noise, summed
    m = max(np.abs(ref).max(), np.abs(np.asarray(noise)).max())
    atol = _path_rtol(n) * m
    np.testing.assert_allclose(np.asarray(x0), ref[-1], rtol=0, atol=atol[-1])
    within(np.abs(np.asarray(xs) - ref).reshape(n + 1, -1).max(axis=1), atol, "path")
