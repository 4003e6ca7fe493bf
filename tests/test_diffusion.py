"""Forward process and parametrisation conversions; ``checked`` over the samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxdiff import diffusion as D
from jaxdiff.samplers import ddim_sample, ddim_step, ddpm_sample, ddpm_step, dpm_solver_sample
from jaxdiff.schedules import make_schedule

SCHED = make_schedule("linear", 1000)
COS = make_schedule("cosine", 1000)


def _batch(key, shape=(3, 4, 5, 2)):
    k1, k2, k3 = jax.random.split(key, 3)
    x0 = jax.random.normal(k1, shape)
    noise = jax.random.normal(k2, shape)
    t = jax.random.randint(k3, (shape[0],), 0, 1000)
    return x0, noise, t


@pytest.mark.parametrize("shape", [(4, 7), (2, 3, 5), (2, 4, 4, 3), (2, 2, 3, 3, 1)])
def test_q_sample_any_rank_matches_closed_form(shape):
    x0, noise, t = _batch(jax.random.key(0), shape)
    out = jax.jit(D.q_sample)(SCHED, x0, t, noise)
    acp = np.asarray(SCHED.alphas_cumprod)[np.asarray(t)].reshape((-1,) + (1,) * (len(shape) - 1))
    expected = np.sqrt(acp) * np.asarray(x0) + np.sqrt(1 - acp) * np.asarray(noise)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@given(t=st.integers(0, 999), sched=st.sampled_from([SCHED, COS]))
def test_q_sample_empirical_moments_match_closed_form(t, sched):
    """Mean and variance over 20,000 draws of q(x_t | x_0) agree with sqrt(abar) x0, 1 - abar."""
    n = 20_000
    x0 = jnp.full((n, 1), 0.7)
    noise = jax.random.normal(jax.random.key(t), (n, 1))
    xt = np.asarray(D.q_sample(sched, x0, jnp.full((n,), t), noise), dtype=np.float64)
    abar = float(sched.alphas_cumprod[t])
    # standard errors: var/n for the mean, ~var*sqrt(2/n) for the variance; allow 5 sigma
    var = 1 - abar
    assert abs(xt.mean() - np.sqrt(abar) * 0.7) < 5 * np.sqrt(var / n) + 1e-6
    assert abs(xt.var() - var) < 5 * var * np.sqrt(2 / n) + 1e-7


def test_conversions_round_trip():
    x0, noise, t = _batch(jax.random.key(1))
    for sched in (SCHED, COS):
        xt = D.q_sample(sched, x0, t, noise)
        v = D.velocity(sched, x0, t, noise)
        np.testing.assert_allclose(D.predict_x0_from_eps(sched, xt, t, noise), x0, atol=2e-3)
        np.testing.assert_allclose(D.predict_eps_from_x0(sched, xt, t, x0), noise, atol=2e-3)
        np.testing.assert_allclose(D.predict_x0_from_v(sched, xt, t, v), x0, atol=1e-5)
        np.testing.assert_allclose(D.predict_eps_from_v(sched, xt, t, v), noise, atol=1e-5)
        for kind, out in (("eps", noise), ("x0", x0), ("v", v)):
            x0_hat, eps_hat = D.model_output_to_x0_eps(sched, xt, t, out, kind)
            np.testing.assert_allclose(x0_hat, x0, atol=2e-3)
            np.testing.assert_allclose(eps_hat, noise, atol=2e-3)
            np.testing.assert_allclose(D.target_for(sched, x0, t, noise, kind), out, atol=1e-6)


def test_posterior_matches_closed_form():
    x0, noise, t = _batch(jax.random.key(2))
    xt = D.q_sample(SCHED, x0, t, noise)
    mean, var, log_var = jax.jit(D.q_posterior_mean_variance)(SCHED, x0, xt, t)
    b = np.asarray(SCHED.betas, np.float64)
    acp = np.cumprod(1 - b)
    acp_prev = np.concatenate([[1.0], acp[:-1]])
    tt = np.asarray(t)
    r = lambda a: a[tt].reshape(-1, 1, 1, 1)  # noqa: E731
    expected_mean = (
        r(np.sqrt(acp_prev) * b / (1 - acp)) * np.asarray(x0)
        + r(np.sqrt(1 - b) * (1 - acp_prev) / (1 - acp)) * np.asarray(xt)
    )
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(var, r(b * (1 - acp_prev) / (1 - acp)), rtol=1e-4)
    np.testing.assert_allclose(np.exp(log_var), np.maximum(var, float(SCHED.posterior_variance[1])),
                               rtol=1e-4)


def test_snr_decreasing():
    s = D.snr(SCHED, jnp.arange(1000))
    assert s.shape == (1000,)
    assert np.all(np.diff(np.asarray(s)) < 0)
    np.testing.assert_allclose(s[10], SCHED.alphas_cumprod[10] / (1 - SCHED.alphas_cumprod[10]))


def test_traced_out_of_range_t_reads_nan_and_checked_raises():
    x0, noise, _ = _batch(jax.random.key(3))
    t_bad = jnp.array([0, 1000, -1])
    out = jax.jit(D.q_sample)(SCHED, x0, t_bad, noise)
    assert np.all(np.isfinite(out[0]))
    assert np.all(np.isnan(out[1])) and np.all(np.isnan(out[2]))  # never a clamped neighbour
    err, _ = D.checked(jax.jit(D.q_sample))(SCHED, x0, t_bad, noise)
    with pytest.raises(Exception, match="out-of-bounds"):
        err.throw()
    err, _ = D.checked(jax.jit(D.q_sample))(SCHED, x0, jnp.array([0, 999, 5]), noise)
    err.throw()  # in range: no error


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x0, n, t: D.q_sample(SCHED, x0, t, n[:2]), "noise"),
        (lambda x0, n, t: D.q_sample(SCHED, x0, t[:2], n), "t must have shape"),
        (lambda x0, n, t: D.q_sample(SCHED, x0, t.astype(jnp.float32), n), "integer"),
        (lambda x0, n, t: D.q_sample(SCHED, x0, t + 1000, n), r"\[0, 1000\)"),
        (lambda x0, n, t: D.q_sample(SCHED, x0[0, 0, 0, 0], t, n), "x0"),
        # integer images (uint8 pixels, int32) are refused: they would be noised as 0..255
        (lambda x0, n, t: D.q_sample(SCHED, (x0 * 127).astype(jnp.uint8), t, n),
         r"x0 must be a floating-point array, got dtype uint8: scale images to \[-1, 1\] floats"),
        (lambda x0, n, t: D.q_sample(SCHED, x0.astype(jnp.int32), t, n), "x0 .* int32"),
        (lambda x0, n, t: D.q_sample(SCHED, x0, t, n.astype(jnp.int32)), "noise must be a float"),
        (lambda x0, n, t: D.q_mean_variance(SCHED, x0.astype(jnp.uint8), t), "x0 .* uint8"),
        (lambda x0, n, t: D.model_output_to_x0_eps(SCHED, x0, t, n, "score"), "prediction_type"),
        (lambda x0, n, t: D.predict_x0_from_eps(SCHED, x0, t, n[..., :1]), "eps"),
        (lambda x0, n, t: D.snr(SCHED, jnp.ones((2, 2), jnp.int32)), "t must have shape"),
    ],
)
def test_bad_input_raises_at_trace_time(call, match):
    x0, noise, t = _batch(jax.random.key(4))
    with pytest.raises(ValueError, match=match):
        call(x0, noise, t)
    # also under jit: shape and dtype errors are raised while tracing
    if match not in (r"\[0, 1000\)",):
        with pytest.raises(ValueError, match=match):
            jax.jit(call)(x0, noise, t)


def test_diffusers_prediction_aliases():
    assert D.canonical_prediction_type("epsilon") == "eps"
    assert D.canonical_prediction_type("sample") == "x0"
    assert D.canonical_prediction_type("v_prediction") == "v"


# --- checked() over the samplers ------------------------------------------------------------------


def _sampler_runs():
    sched = make_schedule("linear", 50)

    def model(x, t):
        return 0.5 * jnp.tanh(x) + 0.1 * jnp.cos(t[:, None] / 10.0)

    return sched, {
        "ddpm": lambda x, k: ddpm_sample(model, sched, x, k, num_steps=5),
        "ddpm-all-steps": lambda x, k: ddpm_sample(model, sched, x, k,
                                                   num_steps=sched.num_timesteps),
        "ddpm-trailing": lambda x, k: ddpm_sample(model, sched, x, k, num_steps=5,
                                                  spacing="trailing"),
        "ddim": lambda x, k: ddim_sample(model, sched, x, k, num_steps=5, eta=0.5),
        "ddim-a0-offset": lambda x, k: ddim_sample(model, sched, x, k, num_steps=7,
                                                   set_alpha_to_one=False, steps_offset=1),
        "dpm": lambda x, k: dpm_solver_sample(model, sched, x, k, num_steps=5),
    }


@pytest.mark.parametrize("name", list(_sampler_runs()[1]))
def test_checked_samplers_report_no_error(name):
    """The final step's ``t_prev = -1`` is never gathered (it was, under a ``where``, and checkify
    flagged every sampler run)."""
    _, runs = _sampler_runs()
    err, out = D.checked(jax.jit(runs[name]))(jnp.ones((2, 3)), jax.random.key(0))
    assert err.get() is None, err.get()
    assert np.isfinite(np.asarray(out)).all()


def test_checked_step_still_reports_out_of_range_timesteps():
    sched, _ = _sampler_runs()
    x = jnp.ones((2, 3))
    kw = dict(prediction_type="eps", clip_x0=None)
    ddim = D.checked(jax.jit(lambda t, tp: ddim_step(sched, x, x, t, tp, None, eta=0.0,
                                                     set_alpha_to_one=True, **kw)))
    ddpm = D.checked(jax.jit(lambda t, tp: ddpm_step(sched, x, x, t, tp, x, **kw)))
    for fn in (ddim, ddpm):
        assert fn(10, 5)[0].get() is None
        assert fn(0, -1)[0].get() is None  # the final step
        assert "out-of-bounds" in fn(50, 40)[0].get()  # t = T
        assert "out-of-bounds" in fn(10, 50)[0].get()  # t_prev = T
        assert "out-of-bounds" in fn(-3, -4)[0].get()  # t < 0
