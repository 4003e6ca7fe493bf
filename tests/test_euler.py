"""Unit tests of the sigma-space samplers (Euler, Euler ancestral, Heun, KDPM2, KDPM2 ancestral):
argument checks, the float32 carry under a bf16 model, key folding, guidance, the step functions
driven by hand, and the sigma-space contract. Parity with diffusers: tests/parity/
test_euler_parity.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.samplers import (
    churn_gammas,
    classifier_free_guidance,
    euler_ancestral_sample,
    euler_ancestral_step,
    euler_sample,
    euler_step,
    euler_timesteps,
    get_sampler,
    heun_sample,
    heun_step,
    heun_timesteps,
    kdpm2_ancestral_sample,
    kdpm2_step,
    kdpm2_timesteps,
)
from jaxdiff.samplers.sigmas import init_noise_sigma, scale_model_input
from jaxdiff.schedules import make_schedule

SCHED = make_schedule("scaled_linear", 100, beta_start=0.00085, beta_end=0.012)
SHAPE = (2, 4, 4, 3)
NAMES = ("euler", "euler_ancestral", "heun", "kdpm2", "kdpm2_ancestral")
STOCHASTIC = {"euler": dict(s_churn=2.0), "euler_ancestral": {}, "kdpm2_ancestral": {}}


def model(x, t):
    """An O(1) eps model taking float timesteps."""
    return 0.5 * jnp.tanh(x) + 0.01 * jnp.cos(t / 30.0)[:, None, None, None].astype(x.dtype)


def x_T():
    return jax.random.normal(jax.random.key(0), SHAPE)


@pytest.mark.parametrize("name, options, match", [
    ("euler", dict(prediction_type="score"), "prediction_type"),
    ("euler", dict(spacing="middle"), "spacing"),
    ("euler", dict(sigma_schedule="polyexponential"), "sigma_schedule"),
    ("euler", dict(final_sigmas_type="one"), "final_sigmas_type"),
    ("euler", dict(steps_offset=-1), "steps_offset"),
    ("euler", dict(s_churn=-1.0), "s_churn"),
    ("euler", dict(s_noise=-0.5), "s_noise"),
    ("euler", dict(s_tmax="inf"), "s_tmax"),
    ("euler", dict(s_tmin=5.0, s_tmax=1.0), "s_tmin"),
    ("euler", dict(sigma_min=-1.0, sigma_schedule="karras"), "sigma_min"),
    ("euler_ancestral", dict(spacing="linear"), "spacing"),
    ("heun", dict(clip_x0=0.0), "clip_x0"),
    ("heun", dict(sigma_schedule="lu"), "sigma_schedule"),
    ("kdpm2", dict(prediction_type="eps2"), "prediction_type"),
    ("kdpm2_ancestral", dict(eta=0.5), "does not take option 'eta'"),
])
def test_bad_options_raise_naming_the_argument(name, options, match):
    with pytest.raises(ValueError, match=match):
        get_sampler(name, **options)


@pytest.mark.parametrize("name", NAMES)
def test_driver_checks(name):
    s = get_sampler(name, **STOCHASTIC.get(name, {}))
    with pytest.raises(ValueError, match="num_steps"):
        s(model, SCHED, x_T(), jax.random.key(0), num_steps=0)
    with pytest.raises(ValueError, match="num_steps"):
        s.check(SCHED, 101)
    with pytest.raises(ValueError, match="model_fn's output must have shape"):
        s(lambda x, t: x[..., :1], SCHED, x_T(), jax.random.key(0), num_steps=3)
    assert s.stochastic == (name in STOCHASTIC)
    if s.stochastic:
        with pytest.raises(ValueError, match="key is required"):
            s(model, SCHED, x_T(), None, num_steps=3)
    else:
        assert np.isfinite(np.asarray(s(model, SCHED, x_T(), None, num_steps=3))).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_bf16_model_keeps_a_float32_carry(name):
    def bf16_model(x, t):
        assert x.dtype == jnp.float32  # the scaled carry, never re-rounded
        return model(x.astype(jnp.bfloat16), t.astype(jnp.bfloat16))

    s = get_sampler(name, **STOCHASTIC.get(name, {}))
    x0, xs, x0s = jax.jit(lambda x: s(bf16_model, SCHED, x, jax.random.key(1), num_steps=4,
                                      return_trajectory=True))(x_T().astype(jnp.bfloat16))
    assert x0.dtype == xs.dtype == jnp.float32
    assert xs.shape == (5, *SHAPE) and x0s.shape == (4, *SHAPE)
    assert np.isfinite(np.asarray(xs)).all()
    # xs[0] is the scaled start x_T * init_noise_sigma; the last entry is x_0.
    sigma0 = init_noise_sigma(euler_timesteps(SCHED, 4), "linspace")
    np.testing.assert_allclose(np.asarray(xs[0]),
                               np.asarray(x_T().astype(jnp.bfloat16), np.float32) * sigma0,
                               rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(xs[-1]), np.asarray(x0))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_stochastic_samplers_fold_the_key_per_step(name):
    key, n = jax.random.key(7), 5
    noise = jnp.stack([jax.random.normal(jax.random.fold_in(key, i), SHAPE) for i in range(n)])
    s = get_sampler(name, **STOCHASTIC[name])
    a = s(model, SCHED, x_T(), key, num_steps=n)
    b = s(model, SCHED, x_T(), None, num_steps=n, noise=noise)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    c = s(model, SCHED, x_T(), jax.random.key(8), num_steps=n)
    assert np.abs(np.asarray(c) - np.asarray(a)).max() > 1e-3  # the noise matters


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_classifier_free_guidance_through_every_sampler(name):
    def cond_model(x, t, labels):
        return model(x, t) + 0.1 * labels[:, None, None, None].astype(x.dtype)

    labels, w = jnp.array([1, 2]), 3.0
    guided = classifier_free_guidance(cond_model, labels, 0, w)

    def by_hand(x, t):
        u, c = model(x, t), cond_model(x, t, labels)
        return u + w * (c - u)

    s = get_sampler(name, **STOCHASTIC.get(name, {}))
    a = jax.jit(lambda x: s(guided, SCHED, x, jax.random.key(2), num_steps=4))(x_T())
    b = jax.jit(lambda x: s(by_hand, SCHED, x, jax.random.key(2), num_steps=4))(x_T())
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    plain = s(model, SCHED, x_T(), jax.random.key(2), num_steps=4)
    assert np.abs(np.asarray(plain) - np.asarray(a)).max() > 1e-3


def _call(t, x, sigma):
    return model(scale_model_input(x, sigma), jnp.full((SHAPE[0],), t, jnp.float32))


@pytest.mark.slow
def test_step_functions_driven_by_hand_equal_the_scan():
    n, key = 6, jax.random.key(3)
    noise = jax.random.normal(key, (n, *SHAPE))
    # Euler with churn.
    g = euler_timesteps(SCHED, n, sigma_schedule="karras")
    gam = churn_gammas(g.sigmas, 2.0, s_tmin=0.5)
    assert gam[0] > 0 and gam[-1] == 0  # sigma_{N-1} < s_tmin
    x = x_T() * init_noise_sigma(g, "linspace")
    for i in range(n):
        x, _ = euler_step(_call(g.timesteps[i], x, g.sigmas[i]), x, g.sigmas[i], g.sigmas[i + 1],
                          noise[i], gamma=gam[i])
    want = euler_sample(model, SCHED, x_T(), None, num_steps=n, sigma_schedule="karras",
                        s_churn=2.0, s_tmin=0.5, noise=noise)
    np.testing.assert_allclose(np.asarray(x), np.asarray(want), atol=1e-5)
    # Euler ancestral.
    g = euler_timesteps(SCHED, n)
    x = x_T() * init_noise_sigma(g, "linspace")
    for i in range(n):
        x, _ = euler_ancestral_step(_call(g.timesteps[i], x, g.sigmas[i]), x, g.sigmas[i],
                                    g.sigmas[i + 1], noise[i])
    want = euler_ancestral_sample(model, SCHED, x_T(), None, num_steps=n, noise=noise)
    np.testing.assert_allclose(np.asarray(x), np.asarray(want), atol=1e-5)
    # Heun: concrete sigmas, so the last step's second call is skipped by a Python branch.
    g = heun_timesteps(SCHED, n, spacing="trailing")
    x = x_T() * init_noise_sigma(g, "trailing")
    for i in range(n):
        t_next = g.timesteps[min(i + 1, n - 1)]
        x, _ = heun_step(model, x, g.timesteps[i], t_next, g.sigmas[i], g.sigmas[i + 1])
    want = heun_sample(model, SCHED, x_T(), None, num_steps=n, spacing="trailing")
    np.testing.assert_allclose(np.asarray(x), np.asarray(want), atol=1e-5)
    # KDPM2 ancestral.
    g = kdpm2_timesteps(SCHED, n, ancestral=True)
    x = x_T() * init_noise_sigma(g, "linspace")
    for i in range(n):
        x, _ = kdpm2_step(model, x, g.timesteps[i], g.mid_timesteps[i], g.sigmas[i],
                          g.mid_sigmas[i], g.sigmas_down[i], g.sigmas_up[i], noise[i])
    want = kdpm2_ancestral_sample(model, SCHED, x_T(), None, num_steps=n, noise=noise)
    np.testing.assert_allclose(np.asarray(x), np.asarray(want), atol=1e-5)


def test_two_stage_steps_skip_the_second_call_at_sigma_zero():
    calls = []

    def counting(x, t):
        calls.append(t)
        return model(x, t)

    x = x_T()
    heun_step(counting, x, 50.0, 30.0, 2.0, 1.0)
    assert len(calls) == 2
    calls.clear()
    out, x0 = heun_step(counting, x, 50.0, -1.0, 2.0, 0.0)
    assert len(calls) == 1
    np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=1e-6)  # Euler to sigma 0
    calls.clear()
    kdpm2_step(counting, x, 50.0, 0.0, 2.0, 0.0, 0.0)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="noise is required"):
        kdpm2_step(counting, x, 50.0, 40.0, 2.0, 1.5, 1.0, 0.5, None)


def test_kdpm2_grids():
    n = 7
    plain, anc = kdpm2_timesteps(SCHED, n), kdpm2_timesteps(SCHED, n, ancestral=True)
    s = plain.sigmas
    np.testing.assert_allclose(plain.mid_sigmas[:-1], np.sqrt(s[:-2] * s[1:-1]), rtol=1e-5)
    np.testing.assert_array_equal(plain.sigmas_down, s[1:])
    assert not plain.sigmas_up.any() and plain.mid_sigmas[-1] == 0
    # Ancestral (eta = 1): the midpoint sqrt(sigma sigma_down) is the next sigma.
    np.testing.assert_allclose(anc.mid_sigmas[:-1], s[1:-1], rtol=1e-5)
    np.testing.assert_allclose(anc.sigmas_up**2 + anc.sigmas_down**2, s[1:] ** 2, rtol=1e-5)
    # Karras timesteps are rounded, as diffusers' KDPM2 rounds them.
    k = kdpm2_timesteps(SCHED, n, sigma_schedule="karras")
    np.testing.assert_array_equal(k.timesteps, np.round(k.timesteps))
    with pytest.raises(ValueError, match="ancestral"):
        kdpm2_timesteps(SCHED, n, ancestral="yes")


@pytest.mark.slow
def test_euler_churn_only_where_sigma_is_in_range():
    """s_tmin above every sigma: no churn, the deterministic result (noise is drawn, unused)."""
    key = jax.random.key(4)
    a = euler_sample(model, SCHED, x_T(), key, num_steps=5, s_churn=5.0, s_tmin=1e3)
    b = euler_sample(model, SCHED, x_T(), None, num_steps=5)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    c = euler_sample(model, SCHED, x_T(), key, num_steps=5, s_churn=5.0)
    assert np.abs(np.asarray(c) - np.asarray(b)).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_prediction_types_agree_on_a_consistent_model(name):
    """An eps model and its exact v / x0 rewrites (integer "leading" timesteps, where the grid's
    sigma is the training sigma) give the same samples: covers x0 for Euler ancestral and KDPM2,
    which diffusers does not implement. KDPM2's midpoints are fractional timesteps, where the
    rewrite uses the interpolated abar: there within 1e-3. Euler runs without churn: with it,
    diffusers (and so jaxdiff) converts eps at sigma_hat but v at sigma, not equivalently."""
    acp = SCHED.alphas_cumprod

    def as_pred(pred):
        def fn(x, t):
            lo = jnp.floor(t).astype(jnp.int32)
            w = (t - lo)[:, None, None, None]
            abar = acp[lo][:, None, None, None] * (1 - w) + acp[jnp.minimum(lo + 1, 99)][
                :, None, None, None] * w
            a, s = jnp.sqrt(abar), jnp.sqrt(1 - abar)
            eps = model(x, t)
            x0 = (x - s * eps) / a
            return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[pred]
        return fn

    outs = []
    for pred in ("eps", "v", "x0"):
        opts = {} if name == "euler" else STOCHASTIC.get(name, {})
        s = get_sampler(name, spacing="leading", steps_offset=1, prediction_type=pred, **opts)
        outs.append(s(as_pred(pred), SCHED, x_T(), jax.random.key(5), num_steps=5))
    tol = 1e-3 if name.startswith("kdpm2") else 1e-4
    for o in outs[1:]:
        np.testing.assert_allclose(np.asarray(o), np.asarray(outs[0]), atol=tol)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # sigmas.train_sigmas
@pytest.mark.parametrize("name", NAMES)
def test_zero_terminal_snr_schedule_raises_then_works_with_diffusers_fix(name):
    sched = make_schedule("scaled_linear", 100, beta_start=0.00085, beta_end=0.012,
                          rescale_to_zero_terminal_snr=True)
    s = get_sampler(name, spacing="trailing", **STOCHASTIC.get(name, {}))
    with pytest.raises(ValueError, match="zero terminal SNR"):
        s(model, sched, x_T(), jax.random.key(0), num_steps=4)
    fixed = sched.replace(alphas_cumprod=sched.alphas_cumprod.at[-1].set(2.0**-24))
    out = s(model, fixed, x_T(), jax.random.key(0), num_steps=4)
    assert np.isfinite(np.asarray(out)).all()
