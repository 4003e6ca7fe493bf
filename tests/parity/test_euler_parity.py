"""The sigma-space samplers (Euler, Euler ancestral, Heun, KDPM2, KDPM2 ancestral) against
diffusers' EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler,
KDPM2DiscreteScheduler and KDPM2AncestralDiscreteScheduler (PyTorch, float32).

Each test runs jaxdiff's jitted ``*_sample`` over the WHOLE trajectory and diffusers' pipeline
loop (``set_timesteps``, ``latents = x_T * init_noise_sigma``, ``scale_model_input`` -> model ->
``step``) on the same standard normal ``x_T``, and compares every full step's sample and the
final x0. The stochastic schedulers draw through ``randn_tensor`` in their own module, which the
tests patch to return the noise jaxdiff is given (``noise=``).

The stand-in is test_sampler_parity.py's ``standin`` (the exact denoiser for data ``N(0, 0.25 I)``
plus a smooth nonlinear term), with ``alphas_cumprod`` linearly interpolated at the fractional
timesteps that sigma-space samplers evaluate the model at. Being (nearly) the true denoiser, it
keeps every predicted x0 O(1).

Each diffusers scheduler gets jaxdiff's ``alphas_cumprod`` before ``set_timesteps``, so that both
sides build their grids from the same float32 values (the Euler grid itself is compared in
test_sigma_grid_parity.py; Heun's and KDPM2's interleaved grids here).

Tolerance (float32, ``trajectory_bounds``): the path (every full step's sample) divided by
``max(1, sigma)`` and x_0, within sums of per-step roundings at the scale of the normalised path.
A step from ``sigma_i`` to ``sigma_{i+1}`` rounds ``x + d (sigma_{i+1} - sigma_i)`` at ``|x_i| ~
sigma_i`` and cancels it down to ``sigma_{i+1}``: that rounding weighs ``max(1, sigma_i) / max(1,
sigma_{i+1})`` on the normalised path (4000x from the cosine schedule's sigma 2.0e4: torch rounds
``x + d * dt`` twice, XLA once, an FMA; neither is more exact). A second stage (Heun, KDPM2)
divides the first stage's rounding by the sigma it evaluates at and weighs it by the step
(``stage_gains``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
)
from diffusers.schedulers import (
    scheduling_euler_ancestral_discrete,
    scheduling_euler_discrete,
    scheduling_k_dpm_2_ancestral_discrete,
)

from jaxdiff.samplers.euler import euler_ancestral_sample, euler_sample
from jaxdiff.samplers.heun import heun_sample, heun_timesteps
from jaxdiff.samplers.kdpm2 import kdpm2_ancestral_sample, kdpm2_sample, kdpm2_timesteps
from jaxdiff.schedules import make_schedule
from tests.parity.tolerances import CONVERSION_ULPS, STEP_ULPS, ulps, within

# diffusers' KDPM2 schedulers call np.array on torch tensors (numpy 2 deprecation, thousands).
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")

T = 1000
SHAPE = (2, 4, 4, 3)
DIFFUSERS_PRED = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
SCHEDULES = {
    "scaled_linear": make_schedule("scaled_linear", T, beta_start=0.00085, beta_end=0.012),
    "linear": make_schedule("linear", T),
    "cosine": make_schedule("cosine", T),
}
SIGMA_FLAGS = {"discrete": {}, "karras": {"use_karras_sigmas": True},
               "exponential": {"use_exponential_sigmas": True}, "beta": {"use_beta_sigmas": True}}


def standin_sigma(m, x, t, acp, pred):
    """The stand-in model for ``m = torch`` or ``m = jnp``: ``x: [B, ...]`` the scaled model input,
    ``t: [B]`` float32 timesteps, ``acp: [T]`` jaxdiff's ``alphas_cumprod``."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    last = acp.shape[0] - 2
    if m is torch:
        lo = t.floor().long().clamp(0, last)
    else:
        lo = jnp.clip(jnp.floor(t).astype(jnp.int32), 0, last)
    w = (t - lo).reshape(shape)
    abar = acp[lo].reshape(shape) * (1 - w) + acp[lo + 1].reshape(shape) * w
    tf = t.reshape(shape)
    a, s = m.sqrt(abar), m.sqrt(1.0 - abar)
    x0 = a * 0.25 * x / (abar * 0.25 + 1.0 - abar) + 0.05 * m.tanh(x) * m.cos(tf / 300.0)
    eps = (x - a * x0) / s
    return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[pred]


def jax_model(name, pred):
    acp = SCHEDULES[name].alphas_cumprod
    return lambda x, t: standin_sigma(jnp, x, t, acp, pred)


def torch_model(name, pred):
    acp = torch.from_numpy(np.array(SCHEDULES[name].alphas_cumprod))

    def fn(x, t):
        # diffusers' Heun/KDPM2 timesteps are float64 with Karras sigmas; models take float32.
        t = torch.full((x.shape[0],), float(t), dtype=torch.float32)
        return standin_sigma(torch, x, t, acp, pred)

    return fn


def make_ref(cls, name, **config):
    """A diffusers scheduler with jaxdiff's ``alphas_cumprod``."""
    ref = cls(num_train_timesteps=T, **config)
    ref.alphas_cumprod = torch.from_numpy(np.array(SCHEDULES[name].alphas_cumprod))
    return ref


def x_T(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def ref_loop(ref, num_steps, x_T, model, **step_kw):
    """diffusers' pipeline loop: ``latents = x_T * init_noise_sigma``, then ``scale_model_input``
    -> model -> ``step`` over ``ref.timesteps``. Returns every intermediate latent, starting with
    the scaled ``x_T``, as float64 numpy ``[len(timesteps) + 1, B, ...]``."""
    ref.set_timesteps(num_steps)
    latents = torch.from_numpy(x_T) * ref.init_noise_sigma
    out = [latents.numpy().astype(np.float64)]
    for t in ref.timesteps:
        inp = ref.scale_model_input(latents, t)
        latents = ref.step(model(inp, t), t, latents, **step_kw).prev_sample
        out.append(latents.numpy().astype(np.float64))
    return np.stack(out)


def max_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max())


def jax_noise(n, seed=1):
    """``[n, *SHAPE]`` standard normal noise, drawn by JAX (float32 numpy)."""
    return np.asarray(jax.random.normal(jax.random.key(seed), (n, *SHAPE)))


def patch_randn(monkeypatch, module, noise, index):
    """Make ``module.randn_tensor`` return ``noise[index()]`` (a fresh tensor each call)."""
    calls = []

    def fake(shape, generator=None, device=None, dtype=None, layout=None):
        i = index(len(calls))
        calls.append(i)
        assert tuple(shape) == noise.shape[1:], shape
        return torch.from_numpy(noise[i].copy())

    monkeypatch.setattr(module, "randn_tensor", fake)
    return calls


def check_trajectory(ours, ref_xs, sigmas, tol):
    """``ours = (x_0, xs, pred_x0s)``; ``ref_xs [N + 1, ...]`` diffusers' sample after each full
    step, at noise levels ``sigmas [N + 1]``; ``tol = (bound on x_0, bounds on the path [N + 1])``
    (``trajectory_bounds``).

    x_0 is compared absolutely; the path at noise level ``sigma_i`` divided by ``max(1,
    sigma_i)``: there ``|x| ~ sigma_i |z|`` (up to 60 at sigma 14.6), which float32 itself
    resolves only to ~1e-7 of that (both sides round it, differently). Returns both max errors
    (the path's divided by ``max(1, sigma_i)``)."""
    x0, xs, _ = ours
    err_x0 = max_err(x0, ref_xs[-1])
    scale = np.maximum(1.0, np.asarray(sigmas, np.float64)).reshape(-1, *(1,) * len(SHAPE))
    path = np.abs(np.asarray(xs, np.float64) / scale - ref_xs / scale)
    within(err_x0, tol[0], "x_0")
    within(path.reshape(len(path), -1).max(axis=1), tol[1], "path / max(1, sigma)")
    return err_x0, float(path.max())


def trajectory_bounds(sigmas, ref_xs, gains=0.0, *noise):
    """``(x_0 bound, path bounds [N + 1])`` for ``check_trajectory``: per step ``STEP_ULPS`` ulps
    of the normalised path's largest value ``m`` (``ref_xs / max(1, sigma)``, and any noise), plus
    the update's ``CONVERSION_ULPS`` roundings at ``|x_i|``'s scale weighted by ``max(1, sigma_i) /
    max(1, sigma_{i+1})`` and by ``1 + gains[i]`` (a second stage, the churn); summed along the
    path (a relative error is carried with a factor <= 1: the flow is linear in x where sigma
    dominates). The start, ``x_T * init_noise_sigma``: the grid's bound on sigma and a rounding a
    side. x_0: the last entry times ``max(1, sigma_N)``."""
    norm = np.maximum(1.0, np.asarray(sigmas, np.float64))
    scaled = np.asarray(ref_xs, np.float64) / norm.reshape(-1, *(1,) * len(SHAPE))
    m = max(np.abs(a).max() for a in (scaled, *noise))
    local = ulps(STEP_ULPS, m) + ulps(CONVERSION_ULPS, m) * norm[:-1] / norm[1:] * (1 + gains)
    path = (GRID_RTOL + ulps(2)) * m + np.concatenate([[0.0], np.cumsum(local)])
    return path[-1] * norm[-1], path


def stage_gains(sigmas, stage_sigmas, divisor_sigmas):
    """A second stage's weight on the first stage's rounding: the step ``|stage_sigma - sigma|``
    (Heun: half of it) over the sigma its derivative divides by (0 where that is 0: no stage)."""
    sig = np.asarray(sigmas, np.float64)[:-1]
    div = np.asarray(divisor_sigmas, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(div > 0, np.abs(np.asarray(stage_sigmas, np.float64) - sig) / div, 0.0)


def timestep_atol(name, ts, rel):
    """Timesteps from ``sigma_to_t``: the grid sigma's relative bound ``rel`` and the two
    bracketing training sigmas' (the shared float32 ``alphas_cumprod`` through ``sqrt((1 - abar) /
    abar)``: 3 roundings a side), over the spacing of ``log train_sigmas`` there; plus two
    roundings of a value < T."""
    log = np.log(np.asarray(SCHEDULES[name].sqrt_recipm1_alphas_cumprod, np.float64))
    lo = np.clip(np.floor(np.asarray(ts, np.float64)).astype(int), 0, len(log) - 2)
    return (rel + 2 * ulps(6)) / (log[lo + 1] - log[lo]) + ulps(2, len(log))


GRID_RTOL = ulps(14)  # grid sigmas: the float32 sigma formula (3 roundings a side) at both end
# points, which Karras / exponential / beta grids pass on summed, and the cast of a float64 grid
CHURN_GAIN = 2**0.5 - 1  # the churn raises sigma_i to (1 + gamma) sigma_i, gamma <= this

# ---------------------------------------------------------------------------------------------
# Euler

EULER_CASES = [
    # name, pred, spacing, offset, sigma_schedule, final, n, churn (s_churn, s_tmin, s_tmax)
    ("scaled_linear", "eps", "linspace", 0, "discrete", "zero", 10, None),
    ("scaled_linear", "eps", "leading", 1, "karras", "zero", 12, None),
    ("scaled_linear", "v", "trailing", 0, "discrete", "sigma_min", 9, None),
    ("linear", "x0", "linspace", 0, "exponential", "zero", 8, None),
    ("cosine", "v", "leading", 1, "beta", "sigma_min", 7, None),
    ("cosine", "eps", "linspace", 0, "karras", "zero", 15, None),
    ("linear", "eps", "trailing", 0, "karras", "zero", 10, (3.0, 0.0, float("inf"))),
    ("scaled_linear", "v", "linspace", 0, "discrete", "zero", 10, (20.0, 0.5, 5.0)),
    ("scaled_linear", "x0", "leading", 1, "discrete", "zero", 6, (1.0, 0.0, 3.0)),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", EULER_CASES, ids=lambda c: "-".join(map(str, c)))
def test_euler_matches_diffusers(case, monkeypatch):
    name, pred, spacing, offset, sigma_schedule, final, n, churn = case
    ref = make_ref(EulerDiscreteScheduler, name, prediction_type=DIFFUSERS_PRED[pred],
                   timestep_spacing=spacing, steps_offset=offset, final_sigmas_type=final,
                   **SIGMA_FLAGS[sigma_schedule])
    opts = dict(prediction_type=pred, spacing=spacing, steps_offset=offset,
                sigma_schedule=sigma_schedule, final_sigmas_type=final)
    step_kw, noise = {}, None
    if churn is not None:
        s_churn, s_tmin, s_tmax = churn
        step_kw = dict(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=0.9)
        opts.update(step_kw)
        noise = jax_noise(n)
        # diffusers draws only on steps whose gamma > 0: index the noise by its step index.
        calls = patch_randn(monkeypatch, scheduling_euler_discrete, noise,
                            lambda k: ref.step_index)
    xT = x_T()
    ref_xs = ref_loop(ref, n, xT, torch_model(name, pred), **step_kw)
    sample = jax.jit(lambda x, z: euler_sample(jax_model(name, pred), SCHEDULES[name], x, None,
                                               num_steps=n, noise=z, return_trajectory=True,
                                               **opts))
    ours = sample(xT, noise)
    tol = trajectory_bounds(ref.sigmas.numpy(), ref_xs, CHURN_GAIN if churn else 0.0,
                            *([] if noise is None else [noise]))
    errs = check_trajectory(ours, ref_xs, ref.sigmas.numpy(), tol)
    if churn is not None:
        assert 0 < len(calls), "the churn must bite on some step"
    print(case, "max errors (x0, path):", errs)


# ---------------------------------------------------------------------------------------------
# Euler ancestral (diffusers' scheduler has no x0 prediction and no Karras sigmas)

# The cosine schedule's t = 999 has sigma = 2.0e4: there the sigma-space sample (|x| <= 4.7e4)
# has a float32 ulp of 3.9e-3, and the first ancestral step down to sigma 5.07 cancels it to O(10)
# keeping that absolute error (trajectory_bounds' weight max(1, sigma_i) / max(1, sigma_{i+1})).


@pytest.mark.slow
@pytest.mark.parametrize("name, pred, spacing, offset, n", [
    ("scaled_linear", "eps", "linspace", 0, 10),
    ("scaled_linear", "v", "leading", 1, 12),
    ("linear", "eps", "trailing", 0, 7),
    ("cosine", "eps", "leading", 1, 8),
    ("cosine", "v", "linspace", 0, 9),
])
def test_euler_ancestral_matches_diffusers(name, pred, spacing, offset, n, monkeypatch):
    ref = make_ref(EulerAncestralDiscreteScheduler, name, prediction_type=DIFFUSERS_PRED[pred],
                   timestep_spacing=spacing, steps_offset=offset)
    noise = jax_noise(n)
    calls = patch_randn(monkeypatch, scheduling_euler_ancestral_discrete, noise, lambda k: k)
    xT = x_T()
    ref_xs = ref_loop(ref, n, xT, torch_model(name, pred))
    assert calls == list(range(n))  # one draw per step, the last scaled by sigma_up = 0
    sample = jax.jit(lambda x, z: euler_ancestral_sample(
        jax_model(name, pred), SCHEDULES[name], x, None, num_steps=n, noise=z,
        return_trajectory=True, prediction_type=pred, spacing=spacing, steps_offset=offset))
    errs = check_trajectory(sample(xT, noise), ref_xs, ref.sigmas.numpy(),
                            trajectory_bounds(ref.sigmas.numpy(), ref_xs, 0.0, noise))
    print(name, pred, spacing, n, "max errors (x0, path):", errs)


# ---------------------------------------------------------------------------------------------
# Two-stage samplers: diffusers makes 2N - 1 step() calls; the full steps end after calls 1, 3,
# ..., 2N - 3 and the final (first-order) call 2N - 2.

def full_steps(ref_xs, n):
    """The samples after each full step among ``ref_loop``'s ``[2N, ...]`` latents."""
    assert ref_xs.shape[0] == 2 * n
    return ref_xs[[0, *range(2, 2 * n - 1, 2), 2 * n - 1]]


@pytest.mark.parametrize("name, pred, spacing, offset, sigma_schedule, n, clip", [
    ("scaled_linear", "eps", "linspace", 0, "discrete", 8, None),
    ("scaled_linear", "v", "leading", 1, "karras", 9, None),
    ("linear", "x0", "trailing", 0, "exponential", 6, None),
    ("cosine", "eps", "leading", 1, "beta", 7, None),
    ("scaled_linear", "x0", "linspace", 0, "karras", 7, 0.3),
    ("linear", "eps", "linspace", 0, "discrete", 1, None),
])
def test_heun_matches_diffusers(name, pred, spacing, offset, sigma_schedule, n, clip):
    ref = make_ref(HeunDiscreteScheduler, name, prediction_type=DIFFUSERS_PRED[pred],
                   timestep_spacing=spacing, steps_offset=offset, clip_sample=clip is not None,
                   clip_sample_range=clip or 1.0, **SIGMA_FLAGS[sigma_schedule])
    xT = x_T()
    ref_xs = full_steps(ref_loop(ref, n, xT, torch_model(name, pred)), n)
    sample = jax.jit(lambda x: heun_sample(
        jax_model(name, pred), SCHEDULES[name], x, None, num_steps=n, return_trajectory=True,
        prediction_type=pred, spacing=spacing, steps_offset=offset,
        sigma_schedule=sigma_schedule, clip_x0=clip))
    # diffusers' interleaved grid: timesteps [t0, t1, t1, ...], sigmas [s0, s1, s1, ..., 0].
    grid = heun_timesteps(SCHEDULES[name], n, spacing=spacing, steps_offset=offset,
                          sigma_schedule=sigma_schedule)
    within(np.abs(ref.timesteps.numpy()[0::2] - grid.timesteps),
           timestep_atol(name, grid.timesteps, GRID_RTOL), "timesteps")
    sigmas = ref.sigmas.numpy()[[0, *range(1, 2 * n, 2)]]
    np.testing.assert_allclose(grid.sigmas, sigmas, rtol=GRID_RTOL)
    # Heun's correction divides by sigma_{i+1} and weighs the derivative by half the step
    gains = stage_gains(sigmas, sigmas[1:], 2 * sigmas[1:])
    errs = check_trajectory(sample(xT), ref_xs, sigmas, trajectory_bounds(sigmas, ref_xs, gains))
    print(name, pred, spacing, sigma_schedule, n, clip, "max errors (x0, path):", errs)


KDPM2_CASES = [
    # name, pred, spacing, offset, sigma_schedule, n (diffusers' KDPM2 schedulers have no x0)
    ("scaled_linear", "eps", "linspace", 0, "discrete", 8),
    ("scaled_linear", "v", "leading", 1, "karras", 9),
    ("linear", "eps", "trailing", 0, "exponential", 6),
    ("cosine", "v", "leading", 1, "beta", 7),
    ("scaled_linear", "eps", "linspace", 0, "karras", 1),
]


# KDPM2 ancestral on the cosine schedule with beta sigmas: step 5's midpoint (sigma_mid =
# sigma_{i+1} = 0.00935, t = 0.99992) divides ``x_mid - x0`` by sigma_mid, where float32 keeps
# only ~1e-5 of the derivative: stage_gains with the midpoint as divisor.


@pytest.mark.slow
@pytest.mark.parametrize("case", KDPM2_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("ancestral", [False, True])
def test_kdpm2_matches_diffusers(case, ancestral, monkeypatch):
    name, pred, spacing, offset, sigma_schedule, n = case
    cls = KDPM2AncestralDiscreteScheduler if ancestral else KDPM2DiscreteScheduler
    ref = make_ref(cls, name, prediction_type=DIFFUSERS_PRED[pred], timestep_spacing=spacing,
                   steps_offset=offset, **SIGMA_FLAGS[sigma_schedule])
    opts = dict(prediction_type=pred, spacing=spacing, steps_offset=offset,
                sigma_schedule=sigma_schedule)
    noise = jax_noise(n)
    if ancestral:
        calls = patch_randn(monkeypatch, scheduling_k_dpm_2_ancestral_discrete, noise,
                            lambda k: k)
        fn = lambda x, z: kdpm2_ancestral_sample(  # noqa: E731
            jax_model(name, pred), SCHEDULES[name], x, None, num_steps=n, noise=z,
            return_trajectory=True, **opts)
    else:
        fn = lambda x, z: kdpm2_sample(  # noqa: E731
            jax_model(name, pred), SCHEDULES[name], x, None, num_steps=n,
            return_trajectory=True, **opts)
    xT = x_T()
    ref_xs = full_steps(ref_loop(ref, n, xT, torch_model(name, pred)), n)
    if ancestral:
        assert calls == list(range(n - 1))  # one draw per second stage
    # diffusers' interleaved grid: timesteps [t0, t_mid0, t1, t_mid1, ...]; the midpoints' and
    # ancestral sigmas repeated per call. Both sides compute the ancestral sigma_up = sqrt(s_next^2
    # (sigma^2 - s_next^2) / sigma^2), sigma_down = sqrt(s_next^2 - up^2) and the midpoints
    # exp((log sigma + log s) / 2) in float32: a few roundings each (6 ulps a side), the
    # subtractions' cancellations (sigma_up: sigma^2 / (sigma^2 - s_next^2); sigma_down: up^2 /
    # down^2, i.e. (sigma / s_next)^2, x 227 on the last step into sigma(t = 0); halved by the
    # square roots), the logs' roundings at |log sigma|; on top of the grid's own GRID_RTOL.
    grid = kdpm2_timesteps(SCHEDULES[name], n, ancestral=ancestral, spacing=spacing,
                           steps_offset=offset, sigma_schedule=sigma_schedule)
    ref_ts = ref.timesteps.numpy()
    idx = np.arange(n - 1)
    sig, nxt = (np.asarray(a, np.float64) for a in (grid.sigmas[idx], grid.sigmas[idx + 1]))
    up_rel = GRID_RTOL + ulps(6) * sig**2 / (sig**2 - nxt**2) / 2
    down_rel = up_rel + ulps(6) * (sig / nxt) ** 2 / 2
    end = down_rel if ancestral else GRID_RTOL
    mid_rel = GRID_RTOL + end + ulps(6, np.abs(np.log(sig)) + 1)
    within(np.abs(ref_ts[0::2] - grid.timesteps), timestep_atol(name, grid.timesteps, GRID_RTOL),
           "timesteps")
    within(np.abs(ref_ts[1::2] - grid.mid_timesteps[:-1]),
           timestep_atol(name, grid.mid_timesteps[:-1], mid_rel), "mid_timesteps")
    mid = ref.sigmas_interpol.numpy()[2 * idx if ancestral else 2 * idx + 1]
    within(np.abs(grid.mid_sigmas[:-1] - mid), mid_rel * mid, "mid_sigmas")
    if ancestral:
        up = ref.sigmas_up.numpy()[2 * idx]
        within(np.abs(grid.sigmas_up[:-1] - up), up_rel * up, "sigmas_up")
        down = ref.sigmas_down.numpy()[2 * idx]
        within(np.abs(grid.sigmas_down[:-1] - down), down_rel * down, "sigmas_down")
    sigmas = ref.sigmas.numpy()[[0, *range(1, 2 * n, 2)]]
    np.testing.assert_allclose(grid.sigmas, sigmas, rtol=GRID_RTOL)
    # the second stage's derivative divides by the midpoint and is weighed by the whole step
    stage_end = grid.sigmas_down if ancestral else grid.sigmas[1:]
    gains = stage_gains(grid.sigmas, stage_end, grid.mid_sigmas)
    tol = trajectory_bounds(sigmas, ref_xs, gains, *([noise] if ancestral else []))
    errs = check_trajectory(jax.jit(fn)(xT, noise), ref_xs, sigmas, tol)
    print(case, ancestral, "max errors (x0, path):", errs)
