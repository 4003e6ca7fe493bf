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

Tolerance (float32): ``TOL = 1e-5`` absolute on the final sample, and on every step's sample
``TOL * max(1, max|x_step|)`` (the states are ``O(sigma)``, up to ~3600 at ``sigma_max = 1348``,
where a float32 ulp is 2.4e-4; the geometric noise levels agree to float32 rounding, ~1e-6
relative). Measured max errors (final, path / scale): sigma_max 1: 4.8e-7, 1.5e-6 (the whole path
within 1.9e-6 absolute); sigma_max 50 with 2 corrector steps: 6.0e-7, 9.3e-7; sigma_max 1348
(diffusers' default, 200 steps): 8.3e-7, 4.8e-6. The VP test (O(1) states) holds the whole path
to ``TOL`` absolute.
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

TOL = 1e-5
B, H, W, C = 2, 4, 4, 3


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
    np.testing.assert_allclose(np.asarray(x0), ref[-1], rtol=0, atol=TOL)
    err = np.abs(xs - ref).reshape(n + 1, -1).max(axis=1)
    scale = np.maximum(1.0, np.abs(ref).reshape(n + 1, -1).max(axis=1))
    assert np.all(err <= TOL * scale), (err / scale).max()


def test_grid_and_noise_levels_match_set_timesteps_and_set_sigmas():
    n, sigma_min, sigma_max, eps = 30, 0.01, 1348.0, 1e-5
    sched = ScoreSdeVeScheduler(num_train_timesteps=n, sigma_min=sigma_min, sigma_max=sigma_max,
                                sampling_eps=eps)
    sched.set_timesteps(n)
    sched.set_sigmas(n)
    sde = VESDE(sigma_min=sigma_min, sigma_max=sigma_max, N=n)
    ts = sde_timesteps(sde, eps)
    np.testing.assert_allclose(ts, sched.timesteps.numpy(), rtol=0, atol=1e-7)
    # the discrete chain's index floor(t (N - 1)) is the same on both grids
    np.testing.assert_array_equal(np.asarray(sde.timestep_index(ts)),
                                  (sched.timesteps * (n - 1)).long().numpy())
    np.testing.assert_allclose(np.asarray(sde.discrete_sigmas), sched.discrete_sigmas.numpy(),
                               rtol=2e-6)
    np.testing.assert_allclose(np.asarray(sde.sigma(ts)), sched.sigmas.numpy(), rtol=2e-6)


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
        np.testing.assert_allclose(np.asarray(got), _nhwc(ref.prev_sample), rtol=0, atol=TOL)
        np.testing.assert_allclose(np.asarray(got_mean), _nhwc(ref.prev_sample_mean), rtol=0,
                                   atol=TOL)


@pytest.mark.slow
def test_vp_euler_maruyama_trajectory_matches_score_sde_vp_scheduler(monkeypatch):
    """jaxdiff's Euler-Maruyama predictor on the VP SDE (``dt = -1 / N``) against diffusers'
    deprecated ``ScoreSdeVpScheduler.step_pred``, which takes a noise prediction and forms the
    score ``-eps / std``: :func:`jaxdiff.sde.score_from_eps` on the jaxdiff side. The stand-in is
    the exact eps of data ``N(0, 0.25 I)``, ``std x / (c^2 0.25 + std^2)``. Measured max errors
    (final, whole path) over 200 steps: 6.0e-7, 9.5e-7."""
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
    np.testing.assert_allclose(np.asarray(x0), ref[-1], rtol=0, atol=TOL)
    np.testing.assert_allclose(np.asarray(xs), ref, rtol=0, atol=TOL)
