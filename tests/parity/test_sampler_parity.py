"""DDIM / DDPM samplers against diffusers' DDIMScheduler and DDPMScheduler (PyTorch, float32).

Both sides run the same analytic stand-in model and receive the same noise arrays (DDIM through
``step(..., variance_noise=...)``, DDPM through a freshly seeded ``torch.Generator`` per step, which
draws exactly the ``torch.randn`` we hand to jaxdiff).

The diffusers scheduler gets jaxdiff's ``alphas_cumprod`` (schedules are compared separately, in
test_schedule_parity.py), so these tests isolate the sampler arithmetic. With diffusers' own
float32-built schedule, differences of ~1 ulp in ``alphas_cumprod`` near 1 are amplified by
``1/sqrt(1 - alphas_cumprod[1])`` at the last steps; see ``test_ddim_native_diffusers_schedule``.

Tolerance (float32), per step: ``x_prev`` and ``pred_x0`` within the bounds of
``tolerances.stepwise_atol`` (see ``_bounds``): every step adds its float32 roundings at the scale
of the inputs (the stand-in is (nearly) the exact denoiser, so every value is O(1) and these are
absolute bounds), and an eps model's ``pred_x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``
divides the rounding of that cancellation by ``sqrt(abar_t)`` (up to 2e4x at t = 999 on the cosine
schedule), which the update carries into ``x_prev`` with its coefficient of ``pred_x0``.
Timestep arrays must be equal exactly.
"""

from itertools import product

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from jaxdiff.samplers import (
    ddim_sample,
    ddim_timesteps,
    ddpm_posterior,
    ddpm_sample,
    ddpm_step,
    ddpm_timesteps,
)
from jaxdiff.schedules import make_schedule
from tests.parity.tolerances import (
    float32_betas_atol,
    float32_cumprod_rtol,
    stepwise_atol,
    ulps,
    within,
)

T = 1000
SHAPE = (2, 8, 8, 3)  # NHWC; the schedulers are elementwise except DDPM's learned-variance split
DIFFUSERS_NAME = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
DIFFUSERS_PRED = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
SCHEDULES = {name: make_schedule(name, T) for name in DIFFUSERS_NAME}


def standin(m, x, t, acp, pred):
    """The stand-in model, written once for ``m = torch`` and ``m = jnp``; ``t: [B]`` int,
    ``acp``: jaxdiff's ``alphas_cumprod`` (the same float32 values on both sides).

    The exact denoiser for data ``N(0, 0.25 I)``, perturbed by a smooth nonlinear term, returned
    in the requested parametrisation (also used by test_dpm_solver_parity.py). Being (nearly)
    the true denoiser, it keeps every trajectory and every predicted x0 O(1), so that an absolute
    tolerance means what it says."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    abar = acp[t].reshape(shape)
    tf = t.reshape(shape) * 1.0
    a, s = m.sqrt(abar), m.sqrt(1.0 - abar)
    x0 = a * 0.25 * x / (abar * 0.25 + 1.0 - abar) + 0.05 * m.tanh(x) * m.cos(tf / 300.0)
    eps = (x - a * x0) / s
    return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[pred]


def standin_var(m, x, t, variance_type="learned_range"):
    """The variance head: ``v`` in [-1, 1] for "learned_range", a variance > 0 for "learned"."""
    tf = t.reshape((-1,) + (1,) * (x.ndim - 1)) * 1.0
    v = m.tanh(x * m.cos(tf / 170.0))
    return 0.01 * (1.5 + v) if variance_type == "learned" else v


def jax_model(name, pred):
    acp = SCHEDULES[name].alphas_cumprod
    return lambda x, t: standin(jnp, x, t, acp, pred)


def jax_model_learned(name, pred, variance_type):
    acp = SCHEDULES[name].alphas_cumprod
    return lambda x, t: jnp.concatenate(
        [standin(jnp, x, t, acp, pred), standin_var(jnp, x, t, variance_type)], axis=-1
    )


def torch_model(name, x, t, pred):
    acp = torch.from_numpy(np.array(SCHEDULES[name].alphas_cumprod))
    return standin(torch, x, torch.full((x.shape[0],), int(t)), acp, pred)


def _bounds(name, pred, ts, next_coefs, *arrays):
    """``(x_prev [N], pred_x0 [N])`` bounds for the steps at timesteps ``ts [N]``: see
    ``tolerances.stepwise_atol``, at the scale of the largest input (``arrays``: ``x_T``, the
    noise). An eps model's predicted x0, ``(x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``, has a
    numerator that cancels to ``sqrt(abar_t) x0``: its rounding (at ``|x_t|``'s scale) is divided
    by ``sqrt(abar_t)`` (157x at t = 999 linear, 2e4x cosine) and carried into ``x_prev`` by the
    update's coefficient of x0, ``next_coefs [N]`` (DDIM: ``sqrt(abar_prev)``; DDPM: the posterior
    mean's ``coef1``). No float32 implementation can do better."""
    scale = max(np.abs(a).max() for a in arrays)
    if pred != "eps":
        return stepwise_atol(scale, np.zeros(len(ts)))
    a = np.sqrt(np.asarray(SCHEDULES[name].alphas_cumprod, np.float64)[np.asarray(ts)])
    return stepwise_atol(scale, 1 / a, np.asarray(next_coefs) / a)


def _ddim_next_coefs(name, ts, n, sa1):
    """``sqrt(abar_prev)`` of each DDIM step (``prev = t - T // n``, the final alpha past 0)."""
    acp = np.asarray(SCHEDULES[name].alphas_cumprod, np.float64)
    prev = np.asarray(ts) - T // n
    final = 1.0 if sa1 else acp[0]
    return np.sqrt(np.where(prev >= 0, acp[np.maximum(prev, 0)], final))


def _ddpm_coef1(name, t, t_prev):
    """The posterior mean's coefficient of x0 on the (shortened) schedule: ``beta' sqrt(abar_prev)
    / (1 - abar_t)`` with ``beta' = 1 - abar_t / abar_prev``."""
    acp = np.asarray(SCHEDULES[name].alphas_cumprod, np.float64)
    a_t, a_p = acp[t], np.where(np.asarray(t_prev) >= 0, acp[np.maximum(t_prev, 0)], 1.0)
    return (1 - a_t / a_p) * np.sqrt(a_p) / (1 - a_t)


def _assert_close(ours, ref, what, bound):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    within(np.abs(ours - ref).max(), bound, what)


def _ddim_ref(name, spacing, offset, pred, sa1, clip):
    ref = DDIMScheduler(
        num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[name], clip_sample=clip is not None,
        clip_sample_range=clip or 1.0, set_alpha_to_one=sa1, steps_offset=offset,
        prediction_type=DIFFUSERS_PRED[pred], timestep_spacing=spacing,
    )
    ref.alphas_cumprod = torch.from_numpy(np.array(SCHEDULES[name].alphas_cumprod))
    ref.final_alpha_cumprod = torch.tensor(1.0) if sa1 else ref.alphas_cumprod[0]
    return ref


# spacing -> (steps_offset, num_steps): 13 and 15 do not divide T.
SPACINGS = {"leading": (0, 10), "leading+1": (1, 20), "trailing": (0, 13), "linspace": (0, 15)}


def _ddim_cases():
    """Every (spacing, prediction, eta); schedule, set_alpha_to_one and clipping derived from the
    indices so that every pair of values of any two of the six factors occurs (a pairwise covering:
    24 trajectories instead of 192)."""
    for (s, sp), (p, pred), (e, eta) in product(
        enumerate(SPACINGS), enumerate(DIFFUSERS_PRED), enumerate((0.0, 0.5))
    ):
        name = ("linear", "cosine")[(s + e) % 2]
        sa1 = (s + p) % 2 == 0
        clip = (None, 1.0)[(p + e) % 2]
        yield pytest.param(name, sp, pred, eta, sa1, clip, False, id=f"{name}-{sp}-{pred}-eta{eta}-"
                           f"{'a1' if sa1 else 'a0'}-{'clip' if clip else 'noclip'}")
    for pred in ("eps", "v"):  # use_clipped_model_output
        yield pytest.param("linear", "leading", pred, 0.5, False, 1.0, True,
                           id=f"clipped-out-{pred}")


def _run_ddim_pair(name, spacing_key, pred, eta, sa1, clip, use_clipped):
    spacing = spacing_key.split("+")[0]
    offset, n = SPACINGS[spacing_key]
    ref = _ddim_ref(name, spacing, offset, pred, sa1, clip)
    ref.set_timesteps(n)
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal((n, *SHAPE)).astype(np.float32)
    ts = ddim_timesteps(make_schedule("linear", T), n, spacing, offset).timesteps
    np.testing.assert_array_equal(ts, ref.timesteps.numpy())

    sample = jax.jit(lambda x, z: ddim_sample(
        jax_model(name, pred), SCHEDULES[name], x, num_steps=n, eta=eta, spacing=spacing,
        steps_offset=offset,
        set_alpha_to_one=sa1, prediction_type=pred, clip_x0=clip,
        use_clipped_model_output=use_clipped, noise=z, return_trajectory=True,
    ))
    x_0, xs, pred_x0s = sample(x_T, noise)
    x = torch.from_numpy(x_T)
    tol_x, tol_x0 = _bounds(name, pred, ts, _ddim_next_coefs(name, ts, n, sa1), x_T, noise)
    for i, t in enumerate(ref.timesteps):
        out = torch_model(name, x, t, pred)
        step = ref.step(out, int(t), x, eta=eta, use_clipped_model_output=use_clipped,
                        variance_noise=torch.from_numpy(noise[i]))
        _assert_close(pred_x0s[i], step.pred_original_sample, f"pred_x0 at step {i} (t={int(t)})",
                      tol_x0[i])
        _assert_close(xs[i + 1], step.prev_sample, f"x_prev at step {i} (t={int(t)})", tol_x[i])
        x = step.prev_sample
    np.testing.assert_array_equal(np.asarray(x_0), np.asarray(xs[-1]))


@pytest.mark.parametrize("name, spacing, pred, eta, sa1, clip, use_clipped", list(_ddim_cases()))
def test_ddim_trajectory_matches_diffusers(name, spacing, pred, eta, sa1, clip, use_clipped):
    _run_ddim_pair(name, spacing, pred, eta, sa1, clip, use_clipped)


@pytest.mark.parametrize("name", list(DIFFUSERS_NAME))
def test_ddim_native_diffusers_schedule(name):
    """End to end with diffusers' own float32 schedule (no alphas_cumprod hand-over; the model on
    both sides is the stand-in on jaxdiff's schedule). The schedules differ by float32 rounding
    (``float32_cumprod_rtol``); the x0 model's DDIM step forms ``eps = (x - sqrt(abar_t) x0) /
    sqrt(1 - abar_t)``, which amplifies that difference near t = 0 (steps_offset=1 ends at t = 1,
    ``sqrt(1 - abar_1) = 0.015``). Bound: ``_native_schedule_atol``."""
    n, eta, sa1 = 20, 0.5, False
    ref = DDIMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[name],
                        clip_sample=False, set_alpha_to_one=sa1, steps_offset=1,
                        prediction_type="sample")
    ref.set_timesteps(n)
    rng = np.random.default_rng(1)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal((n, *SHAPE)).astype(np.float32)
    _, xs, _ = ddim_sample(jax_model(name, "x0"), SCHEDULES[name], x_T, num_steps=n, eta=eta,
                           steps_offset=1, set_alpha_to_one=sa1, prediction_type="x0",
                           noise=noise, return_trajectory=True)
    x = torch.from_numpy(x_T)
    bound = _native_schedule_atol(name, ref.timesteps.numpy(), n, eta, sa1, x_T, noise)
    for i, t in enumerate(ref.timesteps):
        out = torch_model(name, x, t, "x0")
        x = ref.step(out, int(t), x, eta=eta, variance_noise=torch.from_numpy(noise[i])).prev_sample
        err = np.abs(np.asarray(xs[i + 1]) - x.numpy()).max()
        within(err, bound[i], f"step {i} (t={int(t)})")


def _native_schedule_atol(name, ts, n, eta, sa1, x_T, noise):
    """``[N]`` bounds for test_ddim_native_diffusers_schedule: the x0 model's trajectory bounds
    (``_bounds``) plus, per step, the first-order change of the DDIM update ``x_prev =
    sqrt(a_p) x0 + sqrt(1 - a_p - std^2) eps + std z`` (``eps = (x - sqrt(a_t) x0) / sqrt(1 -
    a_t)``, ``std = eta sqrt((1 - a_p) / (1 - a_t) (1 - a_t / a_p))``) under the schedule's
    relative difference ``float32_cumprod_rtol`` at ``a_t`` and ``a_p``, by central differences
    in float64 at ``|x| = |x0| = |z| = m`` (the largest input) with every term's sign against us;
    running sums, as errors carry with a factor <= 1."""
    acp = np.asarray(SCHEDULES[name].alphas_cumprod, np.float64)
    betas = 1 - acp / np.concatenate([[1.0], acp[:-1]])
    rel = float32_cumprod_rtol(betas, float32_betas_atol(betas, DIFFUSERS_NAME[name]))
    m = max(np.abs(x_T).max(), np.abs(noise).max())
    prev = ts - T // n

    def terms(a_t, a_p):  # the update's coefficients of x, x0 and z
        std = eta * np.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
        c_eps = np.sqrt(1 - a_p - std**2) / np.sqrt(1 - a_t)
        return np.array([c_eps, np.sqrt(a_p) - c_eps * np.sqrt(a_t), std])

    extra = []
    for t, p in zip(ts, prev):
        a_t, a_p = acp[t], (acp[p] if p >= 0 else (1.0 if sa1 else acp[0]))
        r_t, r_p = rel[t] * a_t, (rel[p] * a_p if p >= 0 else (0.0 if sa1 else rel[0] * a_p))
        d_t = (terms(a_t + r_t, a_p) - terms(a_t - r_t, a_p)) / 2
        d_p = (terms(a_t, a_p + r_p) - terms(a_t, a_p - r_p)) / 2 if r_p else 0 * d_t
        extra.append(m * (np.abs(d_t).sum() + np.abs(d_p).sum()))
    tol_x, _ = _bounds(name, "x0", ts, None, x_T, noise)
    return tol_x + np.cumsum(extra)


@pytest.mark.slow
@pytest.mark.parametrize("spacing, offset", [("leading", 0), ("leading", 1), ("trailing", 0),
                                             ("linspace", 0)])
@pytest.mark.parametrize("num_train", [1000, 50])
def test_timesteps_equal_diffusers_exactly(spacing, offset, num_train):
    kw = dict(num_train_timesteps=num_train, timestep_spacing=spacing, steps_offset=offset)
    ddim, ddpm = DDIMScheduler(**kw), DDPMScheduler(**kw)
    top = num_train - offset  # with offset 1, n = T would start at t = T
    for n in range(1, top + 1):
        ts, ts_prev, _ = ddim_timesteps(make_schedule("linear", num_train), n, spacing, offset)
        ddim.set_timesteps(n)
        theirs = ddim.timesteps.numpy()
        if spacing == "trailing" and len(theirs) == n + 1:
            # diffusers' float arange overshoots for some n (e.g. 61 of 1000): an extra t = -1.
            assert theirs[-1] == -1
            theirs = theirs[:n]
        np.testing.assert_array_equal(ts, theirs, err_msg=f"num_steps={n}")
        np.testing.assert_array_equal(ts_prev, theirs - num_train // n)  # DDIMScheduler.step
        assert ts.dtype == np.int32 and ts_prev.dtype == np.int32
        if len(theirs) == len(ddim.timesteps):  # DDPMScheduler shares the grid (and the bug)
            ts, ts_prev, _ = ddpm_timesteps(make_schedule("linear", num_train), n, spacing, offset)
            ddpm.set_timesteps(n)
            np.testing.assert_array_equal(ts, ddpm.timesteps.numpy())
            if n in (1, 2, 7, 20, 49):  # previous_timestep is slow (a nonzero() per call)
                np.testing.assert_array_equal(ts_prev, [int(ddpm.previous_timestep(t)) for t in ts])


# ---------------------------------------------------------------------------------------------
# DDPM


def _ddpm_ref(name, variance_type, pred, clip, num_steps=None):
    ref = DDPMScheduler(
        num_train_timesteps=T, beta_schedule=DIFFUSERS_NAME[name], variance_type=variance_type,
        clip_sample=clip is not None, clip_sample_range=clip or 1.0,
        prediction_type=DIFFUSERS_PRED[pred],
    )
    ref.alphas_cumprod = torch.from_numpy(np.array(SCHEDULES[name].alphas_cumprod))
    if num_steps is not None:
        ref.set_timesteps(num_steps)
    return ref


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(a), -1, 1)))


def _nhwc(t):
    return np.moveaxis(t.numpy(), 1, -1)


def _torch_out(name, pred, x_nchw, t, variance_type):
    out = torch_model(name, x_nchw, t, pred)
    if not variance_type.startswith("learned"):
        return out
    tt = torch.full((x_nchw.shape[0],), int(t))
    return torch.cat([out, standin_var(torch, x_nchw, tt, variance_type)], dim=1)


def _variance_rtol(name, t, t_prev):
    """The bound on the relative difference of DDPM's variance at ``t``: both sides evaluate it in
    float32 from the same float32 ``alphas_cumprod`` (``a_t``, ``a_p``). ``beta' = 1 - a_t / a_p``
    turns the division's rounding into ``a_t / a_p / beta'`` ulps; ``1 - a_p`` and ``1 - a_t``
    cost an ulp each relative to themselves; the learned forms go through ``log`` and ``exp`` of
    values up to ``|log var|`` and a model output (a dozen roundings): all counted, twice."""
    acp = np.asarray(SCHEDULES[name].alphas_cumprod, np.float64)
    a_t, a_p = acp[t], (acp[t_prev] if t_prev >= 0 else 1.0)
    beta = 1 - a_t / a_p
    log_scale = abs(np.log(beta * (1 - a_p) / (1 - a_t) + 1e-20))
    return float(2 * (ulps(a_t / a_p / beta) + ulps(4) + ulps(12, log_scale)))


VARIANCE_CASES = ["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"]


@pytest.mark.parametrize("variance_type", VARIANCE_CASES)
@pytest.mark.parametrize("pred, clip, name", [("eps", None, "linear"), ("eps", 1.0, "cosine"),
                                              ("x0", None, "cosine"), ("v", 1.0, "linear")])
@pytest.mark.parametrize("num_steps", [None, 20])
def test_ddpm_step_matches_diffusers(variance_type, pred, clip, name, num_steps):
    learned = variance_type.startswith("learned")
    ref = _ddpm_ref(name, variance_type, pred, clip, num_steps)
    grid = ref.timesteps.numpy()
    ts = [999, 998, 500, 1, 0] if num_steps is None else [int(grid[0]), int(grid[9]), int(grid[-1])]
    rng = np.random.default_rng(2)
    for k, t in enumerate(ts):
        x = rng.standard_normal(SHAPE).astype(np.float32)
        t_prev = int(ref.previous_timestep(t))
        out = _torch_out(name, pred, _nchw(x), t, variance_type)
        noise = torch.randn(_nchw(x).shape, generator=torch.Generator().manual_seed(k))
        step = ref.step(out, t, _nchw(x), generator=torch.Generator().manual_seed(k))
        mo = jnp.asarray(_nhwc(out))
        kw = dict(variance_type=variance_type, prediction_type=pred, clip_x0=clip)
        x_prev, pred_x0 = ddpm_step(SCHEDULES[name], mo, jnp.asarray(x), t, t_prev,
                                    jnp.asarray(_nhwc(noise)), **kw)
        tol_x, tol_x0 = _bounds(name, pred, [t], [_ddpm_coef1(name, t, t_prev)], x, noise)
        _assert_close(pred_x0, _nhwc(step.pred_original_sample), f"pred_x0 at t={t}", tol_x0[0])
        _assert_close(x_prev, _nhwc(step.prev_sample), f"x_prev at t={t}", tol_x[0])

        # The variance, against diffusers' _get_variance (whose return value depends on the type).
        _, _, var = ddpm_posterior(SCHEDULES[name], mo, jnp.asarray(x), t, t_prev, **kw)
        pv = out[:, 3:] if learned else None
        got = ref._get_variance(t, predicted_variance=pv)
        want = {"fixed_small_log": lambda g: g**2, "learned_range": torch.exp}.get(
            variance_type, lambda g: g)(got)
        want = np.broadcast_to(_nhwc(want) if want.ndim == 4 else want.numpy(), np.shape(var))
        if t > 0:  # at t == 0 diffusers adds no noise and its variance is the 1e-20 clamp
            np.testing.assert_allclose(np.asarray(var), want, rtol=_variance_rtol(name, t, t_prev),
                                       atol=0)


@pytest.mark.parametrize("variance_type, pred, clip", [("fixed_small", "eps", 1.0),
                                                       ("fixed_large", "v", None),
                                                       ("learned", "x0", None),
                                                       ("learned_range", "eps", None)])
def test_ddpm_trajectory_matches_diffusers(variance_type, pred, clip):
    """A 25-step trajectory (num_inference_steps < T: shortened-schedule betas and variances)."""
    n, name = 25, "cosine"
    learned = variance_type.startswith("learned")
    ref = _ddpm_ref(name, variance_type, pred, clip, n)
    rng = np.random.default_rng(3)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    noise = np.stack([_nhwc(torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(i)))
                      for i in range(n)])
    fn = jax_model_learned(name, pred, variance_type) if learned else jax_model(name, pred)
    x_0, xs, pred_x0s = ddpm_sample(fn, SCHEDULES[name], x_T, num_steps=n,
                                    variance_type=variance_type, prediction_type=pred,
                                    clip_x0=clip, noise=noise, return_trajectory=True)
    x = _nchw(x_T)
    ts = ref.timesteps.numpy()
    t_prev = np.array([int(ref.previous_timestep(t)) for t in ts])
    tol_x, tol_x0 = _bounds(name, pred, ts, _ddpm_coef1(name, ts, t_prev), x_T, noise)
    for i, t in enumerate(ref.timesteps):
        step = ref.step(_torch_out(name, pred, x, int(t), variance_type), int(t), x,
                        generator=torch.Generator().manual_seed(i))
        _assert_close(pred_x0s[i], _nhwc(step.pred_original_sample), f"pred_x0 at t={int(t)}",
                      tol_x0[i])
        _assert_close(xs[i + 1], _nhwc(step.prev_sample), f"x_prev at t={int(t)}", tol_x[i])
        x = step.prev_sample
