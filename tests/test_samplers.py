"""DDIM / DDPM samplers and classifier-free guidance: randomness, compile-once, the scan against a
Python loop over the step, noise statistics, an oracle model, bf16 models, and input validation.

Tolerances (float32): deterministic identities 1e-5 absolute (1e-6 for scan vs loop); sample
statistics 4% on standard deviations of >= 4,096 draws (the standard error is ~1.1%).
"""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxdiff.samplers import (
    classifier_free_guidance,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    ddpm_sample,
    ddpm_step,
    ddpm_timesteps,
    dpm_solver_sample,
    rescale_guidance,
)
from jaxdiff.schedules import make_schedule

T = 1000
SCHED = make_schedule("linear", T)
SHAPE = (2, 8, 8, 3)


def toy_model(params, x, t):
    """A stand-in network: ``params`` a pytree, so changing it must not recompile."""
    tf = t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.tanh(params["w"] * x) * jnp.cos(tf / 300.0) + params["b"]


PARAMS = {"w": jnp.float32(0.5), "b": jnp.float32(0.01)}
MODEL = partial(toy_model, PARAMS)


def x_T(seed=0, shape=SHAPE):
    return jax.random.normal(jax.random.key(seed), shape)


def _acp(t):
    return 1.0 if t < 0 else float(np.asarray(SCHED.alphas_cumprod, np.float64)[t])


# --- randomness ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_same_key_same_sample_different_key_different(sampler):
    if sampler == "ddim":
        f = jax.jit(lambda x, k: ddim_sample(MODEL, SCHED, x, k, num_steps=10, eta=1.0))
    else:
        f = jax.jit(lambda x, k: ddpm_sample(MODEL, SCHED, x, k, num_steps=10))
    a, b = f(x_T(), jax.random.key(1)), f(x_T(), jax.random.key(1))
    c = f(x_T(), jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-2


def test_ddim_eta_zero_ignores_key():
    f = lambda k: ddim_sample(MODEL, SCHED, x_T(), k, num_steps=10)  # noqa: E731
    a, b, c = f(None), f(jax.random.key(1)), f(jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_ddim_step_noise_enters_as_std_times_noise():
    """One step at eta=0.7 against a float64 numpy formula; zero noise gives the deterministic part,
    noise of ones adds exactly std."""
    t, t_prev, eta = 600, 500, 0.7
    x = x_T()
    out = MODEL(x, jnp.full((2,), t))
    a_t, a_p = _acp(t), _acp(t_prev)
    xn, on = np.asarray(x, np.float64), np.asarray(out, np.float64)
    x0 = (xn - np.sqrt(1 - a_t) * on) / np.sqrt(a_t)
    std = eta * np.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    det = np.sqrt(a_p) * x0 + np.sqrt(1 - a_p - std**2) * on
    kw = dict(eta=eta, prediction_type="eps", clip_x0=None, set_alpha_to_one=True)
    zero, _ = ddim_step(SCHED, out, x, t, t_prev, jnp.zeros_like(x), **kw)
    ones, _ = ddim_step(SCHED, out, x, t, t_prev, jnp.ones_like(x), **kw)
    np.testing.assert_allclose(zero, det, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(ones) - np.asarray(zero), std, atol=1e-5, rtol=0)
    assert std > 0.05  # the check above is not vacuous


@pytest.mark.slow
def test_ddim_drawn_noise_statistics():
    """x0-model 0 at eta=1: ``x_prev = c_t x_t + std_t z_t`` with ``c_t = sqrt(1 - abar_prev -
    std_t^2) / sqrt(1 - abar_t)`` and fresh z each step, so the variance follows ``v' = c_t^2 v +
    std_t^2`` from v = 1 (float64). Reusing one draw across steps changes it."""
    n, eta = 10, 1.0
    x = jax.random.normal(jax.random.key(3), (1024, 4))
    _, xs, _ = ddim_sample(lambda x, t: jnp.zeros_like(x), SCHED, x, jax.random.key(4),
                           num_steps=n, eta=eta, prediction_type="x0", return_trajectory=True)
    v = 1.0
    for k, (t, tp) in enumerate(zip(*ddim_timesteps(SCHED, n)[:2]), start=1):
        a_t, a_p = _acp(t), _acp(tp)
        std2 = eta**2 * (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        v = (1 - a_p - std2) / (1 - a_t) * v + std2
        got = np.asarray(xs[k]).std()
        assert abs(got / np.sqrt(v) - 1) < 0.04 if v > 0 else got == 0, (k, got, np.sqrt(v))


def test_ddpm_noise_statistics_over_1000_steps():
    """x0-model 0: ``x_{t-1} = coef2_t x_t + sigma_t z_t`` with fresh z each step, so the variance
    of the sample at time s follows ``v_{t-1} = coef2_t^2 v_t + sigma_t^2`` from v_999 = 1
    (float64). Reusing one noise draw across steps, or dropping steps' noise, changes it."""
    x = jax.random.normal(jax.random.key(4), (1024, 4))
    _, xs, _ = jax.jit(lambda x, k: ddpm_sample(lambda x, t: jnp.zeros_like(x), SCHED, x, k,
                                                num_steps=T, prediction_type="x0",
                                                return_trajectory=True))(x, jax.random.key(5))
    betas = np.asarray(SCHED.betas, np.float64)
    acp = np.cumprod(1 - betas)
    v = {T - 1: 1.0}
    for t in range(T - 1, 0, -1):
        coef2 = np.sqrt(1 - betas[t]) * (1 - acp[t - 1]) / (1 - acp[t])
        v[t - 1] = coef2**2 * v[t] + (1 - acp[t - 1]) / (1 - acp[t]) * betas[t]
    for s in (900, 500, 0):
        got = np.asarray(xs[T - 1 - s]).std()  # xs[k]: the sample after k steps, at time T - 1 - k
        assert abs(got / np.sqrt(v[s]) - 1) < 0.04, (s, got, np.sqrt(v[s]))
    np.testing.assert_array_equal(xs[-1], 0.0)  # the last step returns pred_x0, no noise at t = 0


# --- compile once ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_compiles_once_across_keys_params_and_inputs(sampler):
    traces = []

    def apply(params, x, t):
        traces.append(1)
        return toy_model(params, x, t)

    if sampler == "ddim":
        def run(p, x, k):
            return ddim_sample(partial(apply, p), SCHED, x, k, num_steps=5, eta=0.5)
    else:
        def run(p, x, k):
            return ddpm_sample(partial(apply, p), SCHED, x, k, num_steps=5)
    f = jax.jit(chex.assert_max_traces(run, n=1))
    outs = [
        f({"w": jnp.float32(w), "b": jnp.float32(0.0)}, x_T(seed), jax.random.key(seed))
        for seed, w in enumerate([0.5, 0.7, 0.9])
    ]
    assert len(traces) == 1
    assert not np.allclose(outs[0], outs[1])


def test_guidance_scale_traced_does_not_recompile():
    traces = []

    def apply(x, t, y):
        traces.append(1)
        return toy_model(PARAMS, x, t) + 0.1 * y[:, None, None, None]

    y = jnp.array([1.0, 2.0])

    @jax.jit
    def run(w, x):
        fn = classifier_free_guidance(apply, y, 0.0, w)
        return ddim_sample(fn, SCHED, x, num_steps=5)

    a, b = run(1.0, x_T()), run(3.0, x_T())
    assert len(traces) == 1 and not np.allclose(a, b)


# --- scan == Python loop over the step ---------------------------------------------------------
# Both sides call the same step function, so these check the scan driver only (the timestep
# order and pairing, the per-step noise, the carry, jit), not the step's maths: that is compared
# with diffusers in tests/parity/test_sampler_parity.py (DDIM: test_ddim_trajectory_matches_
# diffusers; DDPM: test_ddpm_step_matches_diffusers, test_ddpm_trajectory_matches_diffusers).


@pytest.mark.slow
@pytest.mark.parametrize("pred, clip", [("eps", None), ("v", 1.0)])
def test_ddim_scan_equals_python_loop(pred, clip):
    """The scanned ddim_sample applies ddim_step to the ddim_timesteps pairs in order, with
    noise[i] at step i, carrying x, as a Python loop over the jitted step does."""
    n, eta = 8, 0.5
    noise = jax.random.normal(jax.random.key(6), (n, *SHAPE))
    kw = dict(eta=eta, prediction_type=pred, clip_x0=clip, set_alpha_to_one=False)
    scanned = jax.jit(lambda x: ddim_sample(MODEL, SCHED, x, num_steps=n, spacing="trailing",
                                            noise=noise, **kw))(x_T())
    x = x_T()
    ts, ts_prev, _ = ddim_timesteps(SCHED, n, "trailing")
    step = jax.jit(partial(ddim_step, **kw))
    for i, (t, tp) in enumerate(zip(ts, ts_prev)):
        x, _ = step(SCHED, MODEL(x, jnp.full((2,), t)), x, t, tp, noise[i])
    np.testing.assert_allclose(scanned, x, atol=1e-6 * max(1, np.abs(x).max()), rtol=0)


@pytest.mark.slow
def test_ddpm_scan_equals_python_loop():
    """The scanned ddpm_sample applies ddpm_step to the ddpm_timesteps pairs in order, with
    noise[i] at step i, carrying x, as a Python loop over the step does."""
    n = 12
    noise = jax.random.normal(jax.random.key(7), (n, *SHAPE))
    kw = dict(variance_type="fixed_large", prediction_type="eps", clip_x0=1.0)
    scanned = ddpm_sample(MODEL, SCHED, x_T(), num_steps=n, noise=noise, **kw)
    x = x_T()
    for i, (t, tp) in enumerate(zip(*ddpm_timesteps(SCHED, n)[:2])):
        x, _ = ddpm_step(SCHED, MODEL(x, jnp.full((2,), t)), x, t, tp, noise[i], **kw)
    np.testing.assert_allclose(scanned, x, atol=1e-6, rtol=0)


# --- an oracle model for a single-point data distribution ---------------------------------------


def oracle_eps(c, x, t):
    """The exact eps when all data equals ``c``: ``(x_t - sqrt(abar) c) / sqrt(1 - abar)``."""
    a = SCHED.alphas_cumprod[t].reshape((-1,) + (1,) * (x.ndim - 1))
    return (x - jnp.sqrt(a) * c) / jnp.sqrt(1 - a)


@pytest.mark.slow
def test_oracle_ddpm_1000_steps_lands_on_c_with_the_right_marginals():
    """Fixed-small DDPM with the exact model reproduces q(x_t) = N(sqrt(abar_t) c, 1 - abar_t) at
    every step (checked at three) and ends on c (tolerance 1e-4: float32 through
    1/sqrt(abar_999))."""
    c = jnp.linspace(-0.8, 0.8, 16).reshape(4, 4, 1)
    x = jax.random.normal(jax.random.key(8), (256, 4, 4, 1))
    x0, xs, _ = jax.jit(lambda x, k: ddpm_sample(partial(oracle_eps, c), SCHED, x, k, num_steps=T,
                                                 return_trajectory=True))(x, jax.random.key(9))
    assert np.abs(np.asarray(x0) - np.asarray(c)).max() < 1e-4
    for t in (900, 500, 100):
        xt = np.asarray(xs[T - 1 - t])  # xs[k]: the sample after k steps, at time T - 1 - k
        a = _acp(t)
        z = (xt - np.sqrt(a) * np.asarray(c)) / np.sqrt(1 - a)
        assert abs(z.std() - 1) < 0.04 and abs(z.mean()) < 0.05, (t, z.mean(), z.std())


@pytest.mark.slow
def test_oracle_ddim_50_steps_lands_on_c_along_the_exact_path():
    """DDIM (eta=0) with the exact model keeps eps constant: x_t = sqrt(abar_t) c + sqrt(1-abar_t)
    eps_T at every step (1e-4), and x_0 = c (1e-4)."""
    c = jnp.linspace(-0.8, 0.8, 16).reshape(4, 4, 1)
    x = jax.random.normal(jax.random.key(10), (4, 4, 4, 1))
    x0, xs, _ = ddim_sample(partial(oracle_eps, c), SCHED, x, num_steps=50, return_trajectory=True)
    ts = ddim_timesteps(SCHED, 50).timesteps
    eps_T = np.asarray(oracle_eps(c, x, jnp.full((4,), ts[0])))
    for k, t in enumerate(ts[1:], start=1):
        want = np.sqrt(_acp(t)) * np.asarray(c) + np.sqrt(1 - _acp(t)) * eps_T
        np.testing.assert_allclose(xs[k], want, atol=1e-4, rtol=0)
    assert np.abs(np.asarray(x0) - np.asarray(c)).max() < 1e-4


# --- classifier-free guidance --------------------------------------------------------------------


def _cond_model(calls):
    def fn(x, t, cond):
        calls.append(x.shape[0])
        lab = cond["label"].astype(jnp.float32)[:, None, None, None]
        ctx = cond["context"].mean(axis=(1, 2))[:, None, None, None]
        return toy_model(PARAMS, x, t) * (1 + 0.1 * lab) + ctx
    return fn


COND = {"label": jnp.array([3, 7], jnp.int32),
        "context": jnp.arange(2 * 5 * 4.0).reshape(2, 5, 4) / 40}
NULL = {"label": jnp.int32(10), "context": jnp.zeros((5, 4))}  # broadcast to [2] and [2, 5, 4]


@pytest.mark.parametrize("w", [0.0, 1.0, 4.0])
def test_cfg_combines_one_batched_call(w):
    calls = []
    model = _cond_model(calls)
    x, t = x_T(), jnp.array([500, 500])
    guided = classifier_free_guidance(model, COND, NULL, w)(x, t)
    # ONE call: on the doubled batch, or on batch B where one branch suffices (concrete w 0 or 1)
    assert calls == ([2] if w in (0.0, 1.0) else [4])
    null_full = {"label": jnp.full((2,), 10, jnp.int32), "context": jnp.zeros((2, 5, 4))}
    cond_out, uncond_out = model(x, t, COND), model(x, t, null_full)
    np.testing.assert_allclose(guided, uncond_out + w * (cond_out - uncond_out), atol=1e-5)
    if w in (0.0, 1.0):
        np.testing.assert_allclose(guided, uncond_out if w == 0 else cond_out, atol=1e-6)


def test_cfg_rescale_matches_numpy_reference():
    w, phi = 5.0, 0.7
    model = _cond_model([])
    x, t = x_T(), jnp.array([300, 300])
    got = classifier_free_guidance(model, COND, NULL, w, guidance_rescale=phi)(x, t)
    null_full = {"label": jnp.full((2,), 10, jnp.int32), "context": jnp.zeros((2, 5, 4))}
    c = np.asarray(model(x, t, COND), np.float64)
    u = np.asarray(model(x, t, null_full), np.float64)
    g = u + w * (c - u)
    std_c = c.reshape(2, -1).std(axis=1, ddof=1).reshape(2, 1, 1, 1)  # torch.std: unbiased
    std_g = g.reshape(2, -1).std(axis=1, ddof=1).reshape(2, 1, 1, 1)
    want = phi * g * std_c / std_g + (1 - phi) * g
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert np.abs(want - g).max() > 1e-2  # the rescale does something here


# --- validation -------------------------------------------------------------------------------


def _ddim(**kw):
    args = dict(num_steps=10)
    args.update(kw)
    key = args.pop("key", None)
    return ddim_sample(args.pop("model_fn", MODEL), SCHED, x_T(), key, **args)


def _ddpm(**kw):
    args = dict(num_steps=10)
    args.update(kw)
    key = args.pop("key", jax.random.key(0))
    return ddpm_sample(args.pop("model_fn", MODEL), SCHED, x_T(), key, **args)


BAD = [
    (_ddim, dict(num_steps=0), "num_steps"),
    (_ddim, dict(num_steps=T + 1), "num_steps"),
    (_ddim, dict(num_steps=2.5), "num_steps"),
    (_ddim, dict(eta=-0.1), "eta"),
    (_ddim, dict(spacing="uniform"), "spacing"),
    (_ddim, dict(prediction_type="score"), "prediction_type"),
    (_ddim, dict(eta=0.5), "key"),
    (_ddim, dict(noise=jnp.zeros((9, *SHAPE))), "noise"),
    (_ddim, dict(steps_offset=200), "steps_offset"),
    (_ddim, dict(clip_x0=-1.0), "clip_x0"),
    (_ddim, dict(model_fn=lambda x, t: x[..., :1]), "model_fn's output"),
    (_ddpm, dict(num_steps=0), "num_steps"),
    (_ddpm, dict(num_steps=T + 1), "num_steps"),
    (_ddpm, dict(variance_type="large"), "variance_type"),
    (_ddpm, dict(prediction_type="noise"), "prediction_type"),
    (_ddpm, dict(key=None), "key"),
    (_ddpm, dict(noise=jnp.zeros((10, 2, 8, 8, 1))), "noise"),
    (_ddpm, dict(variance_type="learned_range"), "model_fn's output"),
]


@pytest.mark.parametrize("fn, kw, name", BAD,
                         ids=[f"{f.__name__}-{n}-{i}" for i, (f, _, n) in enumerate(BAD)])
def test_bad_inputs_raise_naming_the_argument(fn, kw, name):
    with pytest.raises(ValueError, match=name.replace("'", ".")):
        fn(**kw)


def test_step_rejects_concrete_out_of_range_timesteps_and_reads_nan_when_traced():
    kw = dict(eta=0.0, prediction_type="eps", clip_x0=None, set_alpha_to_one=True)
    x = x_T()
    with pytest.raises(ValueError, match="t must be"):
        ddim_step(SCHED, x, x, T, 0, None, **kw)
    with pytest.raises(ValueError, match="t_prev"):
        ddim_step(SCHED, x, x, 10, T, None, **kw)
    with pytest.raises(ValueError, match="t must be"):
        ddpm_step(SCHED, x, x, -1, -2, x, prediction_type="eps", clip_x0=None)
    out, _ = jax.jit(lambda t: ddim_step(SCHED, x, x, t, t - 1, None, **kw))(T)  # no clamping
    assert np.isnan(np.asarray(out)).all()
    with pytest.raises(ValueError, match="guidance_rescale"):
        classifier_free_guidance(lambda x, t, c: x, COND, NULL, 2.0, guidance_rescale=1.5)


@pytest.mark.slow
@given(T_=st.integers(1, 2000), frac=st.floats(0, 1),
       spacing=st.sampled_from(["leading", "trailing", "linspace"]))
def test_timestep_grids_are_valid(T_, frac, spacing):
    n = max(1, round(frac * T_))
    S_ = make_schedule("linear", T_)
    for ts, ts_prev, _ in (ddim_timesteps(S_, n, spacing), ddpm_timesteps(S_, n, spacing)):
        assert ts.shape == ts_prev.shape == (n,)
        assert (ts >= 0).all() and (ts < T_).all() and (ts_prev < ts).all()
        assert (np.diff(ts) < 0).all()
    assert ddpm_timesteps(S_, n, spacing)[1][-1] == -1


@pytest.mark.parametrize("w, rescale, batches, uses", [
    (1.0, 0.0, [2], "cond"), (1.0, 0.7, [2], "cond"), (0.0, 0.0, [2], "null"),
    (0.0, 0.7, [4], "both"), (2.0, 0.0, [4], "both"),
])
def test_guidance_single_branch_at_w0_w1_equals_two_branch(w, rescale, batches, uses):
    """Concrete w = 1 (any rescale) or w = 0 (no rescale) runs the model once on batch B; the
    result equals the two-branch formula evaluated with a traced w."""
    seen = []

    def apply(x, t, y):
        seen.append(x.shape[0])
        return toy_model(PARAMS, x, t) * (1.0 + 0.3 * y[:, None, None, None])

    y = jnp.array([1.0, 2.0])
    x, t = x_T(), jnp.array([500, 500])
    fast = classifier_free_guidance(apply, y, 0.0, w, guidance_rescale=rescale)(x, t)
    assert seen == batches
    ref = jax.jit(lambda w_: classifier_free_guidance(apply, y, 0.0, w_,
                                                      guidance_rescale=rescale)(x, t))(w)
    np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-6)
    expect = {"cond": apply(x, t, y), "null": apply(x, t, jnp.zeros_like(y))}.get(uses)
    if expect is not None:
        np.testing.assert_allclose(fast, expect, rtol=1e-6, atol=0)


@pytest.mark.parametrize("step", ["ddim", "ddpm"])
def test_step_timesteps_must_be_0d_integers(step):
    """A ``[B]`` t would broadcast against the channel axis; a traced float t used to pass."""
    x = x_T()
    kw = dict(prediction_type="eps", clip_x0=None)
    if step == "ddim":
        def f(t, tp):
            return ddim_step(SCHED, x, x, t, tp, None, eta=0.0, set_alpha_to_one=True, **kw)
    else:
        def f(t, tp):
            return ddpm_step(SCHED, x, x, t, tp, jnp.zeros_like(x), **kw)
    with pytest.raises(ValueError, match="^t must be a scalar"):
        f(jnp.full((2,), 500), 400)
    with pytest.raises(ValueError, match="^t_prev must be a scalar"):
        f(500, jnp.full((2,), 400))
    with pytest.raises(ValueError, match="^t must be an integer"):
        jax.jit(f)(500.0, 400)
    with pytest.raises(ValueError, match="^t_prev must be an integer"):
        jax.jit(f)(500, 400.0)
    assert np.isfinite(np.asarray(jax.jit(f)(500, 400)[0])).all()


@pytest.mark.slow
def test_ddpm_final_noise():
    """diffusers adds noise at every step with t > 0, the last one included when the grid ends above
    0 (trailing: ..., 199 -> -1); ``final_noise=False`` returns that step's mean instead."""
    n = 5
    noise = jax.random.normal(jax.random.key(11), (n, *SHAPE))
    kw = dict(num_steps=n, spacing="trailing", variance_type="fixed_large", noise=noise)
    default = ddpm_sample(MODEL, SCHED, x_T(), **kw)
    mean = ddpm_sample(MODEL, SCHED, x_T(), **kw, final_noise=False)
    kw["noise"] = noise.at[-1].set(0.0)
    np.testing.assert_allclose(mean, ddpm_sample(MODEL, SCHED, x_T(), **kw), atol=1e-6, rtol=0)
    assert np.abs(np.asarray(default) - np.asarray(mean)).max() > 0.1
    lead = dict(num_steps=n, variance_type="fixed_large", noise=noise)  # ends at t = 0
    np.testing.assert_allclose(ddpm_sample(MODEL, SCHED, x_T(), **lead),
                               ddpm_sample(MODEL, SCHED, x_T(), **lead, final_noise=False),
                               atol=1e-6, rtol=0)


@pytest.mark.slow
def test_cfg_guide_channels_takes_the_variance_from_the_conditional_branch():
    """A learned-variance model ``[B, H, W, 2C]``: only the first C channels are guided (and
    rescaled); the variance channels are the conditional branch's (diffusers' DiTPipeline)."""
    C = SHAPE[-1]

    def apply(x, t, y):
        out = toy_model(PARAMS, x, t) * (1.0 + 0.3 * y[:, None, None, None])
        return jnp.concatenate([out, jnp.tanh(out + y[:, None, None, None])], axis=-1)

    y = jnp.array([1.0, 2.0])
    x, t = x_T(), jnp.array([500, 500])
    cond, uncond = apply(x, t, y), apply(x, t, jnp.zeros_like(y))
    for w, phi in [(3.0, 0.0), (3.0, 0.7), (0.0, 0.0), (1.0, 0.0)]:
        got = classifier_free_guidance(apply, y, 0.0, w, phi, guide_channels=C)(x, t)
        want = uncond[..., :C] + w * (cond[..., :C] - uncond[..., :C])
        if phi:
            want = rescale_guidance(want, cond[..., :C], phi)
        assert got.shape == cond.shape
        np.testing.assert_allclose(got[..., :C], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[..., C:], cond[..., C:], rtol=0, atol=1e-6)
    everything = classifier_free_guidance(apply, y, 0.0, 3.0)(x, t)  # the default extrapolates
    assert np.abs(np.asarray(everything[..., C:] - cond[..., C:])).max() > 1e-2
    with pytest.raises(ValueError, match="guide_channels"):
        classifier_free_guidance(apply, y, 0.0, 3.0, guide_channels=0)
    with pytest.raises(ValueError, match="guide_channels"):
        classifier_free_guidance(apply, y, 0.0, 3.0, guide_channels=2 * C + 1)(x, t)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm_solver"])
def test_bf16_model_output_keeps_a_float32_carry(sampler):
    """A bf16 x_T and an (oracle) model returning bf16: the scan carry (what the model sees) and
    the result stay float32, finite, and within 0.02 absolute of the float32 model's run from the
    same bf16-rounded x_T (values O(1); measured 1.9e-3 DDPM / DDIM, 4.9e-3 DPM-Solver++)."""
    n, seen = 10, []
    noise = jax.random.normal(jax.random.key(12), (n, *SHAPE))
    c = 0.8 * jnp.sin(jnp.arange(8 * 8 * 3.0)).reshape(SHAPE[1:])

    def model(dtype):
        def fn(x, t):
            seen.append(x.dtype)
            return oracle_eps(c, x.astype(dtype), t).astype(dtype)
        return fn

    def run(fn, x):
        if sampler == "ddpm":
            return ddpm_sample(fn, SCHED, x, num_steps=n, noise=noise)
        if sampler == "ddim":
            return ddim_sample(fn, SCHED, x, num_steps=n, eta=0.5, noise=noise)
        return dpm_solver_sample(fn, SCHED, x, num_steps=n)

    x_bf16 = x_T().astype(jnp.bfloat16)
    ref = jax.jit(lambda x: run(model(jnp.float32), x))(x_bf16.astype(jnp.float32))
    out = jax.jit(lambda x: run(model(jnp.bfloat16), x))(x_bf16)
    assert out.dtype == jnp.float32 and set(seen) == {jnp.dtype(jnp.float32)}
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(out, ref, atol=0.02, rtol=0)
