"""Schedules: construction, invariants (hypothesis), validation, pytree behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxdiff.schedules import (
    BETA_SCHEDULES,
    Schedule,
    make_schedule,
    rescale_zero_terminal_snr,
    schedule_from_betas,
)

NAMES = sorted(BETA_SCHEDULES)


@pytest.mark.slow
@given(name=st.sampled_from(NAMES), T=st.integers(2, 2000))
def test_alphas_cumprod_strictly_decreasing_in_unit_interval(name, T):
    s = make_schedule(name, T)
    acp = np.asarray(s.alphas_cumprod, dtype=np.float64)
    assert acp.shape == (T,)
    assert np.all(acp > 0) and np.all(acp < 1)
    # Strictly decreasing in float64 before the cast; in float32 adjacent values may round equal
    # for long, slowly-varying schedules, so check the float64 source and non-increase after.
    betas64 = BETA_SCHEDULES[name](T)
    assert np.all(np.diff(np.cumprod(1 - betas64)) < 0)
    assert np.all(np.diff(acp) <= 0)


@pytest.mark.slow
@given(name=st.sampled_from(NAMES), T=st.integers(2, 2000))
def test_posterior_variance_positive_after_first_step(name, T):
    s = make_schedule(name, T)
    pv = np.asarray(s.posterior_variance)
    assert pv[0] == 0.0
    assert np.all(pv[1:] > 0)
    assert np.all(np.isfinite(np.asarray(s.posterior_log_variance_clipped)))
    # The posterior variance never exceeds beta_t (it is beta_t shrunk by
    # (1-abar_{t-1})/(1-abar_t)).
    assert np.all(pv <= np.asarray(s.betas) * (1 + 1e-6))


def test_linear_defaults_and_derived_quantities():
    s = make_schedule("linear", 1000)
    b = np.asarray(s.betas)
    np.testing.assert_allclose([b[0], b[-1]], [1e-4, 0.02], rtol=1e-6)
    acp = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(s.alphas_cumprod, acp, rtol=1e-5)
    np.testing.assert_allclose(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    assert float(s.alphas_cumprod_prev[0]) == 1.0
    np.testing.assert_allclose(s.sqrt_alphas_cumprod**2, s.alphas_cumprod, rtol=1e-5)
    np.testing.assert_allclose(s.sqrt_recip_alphas_cumprod * s.sqrt_alphas_cumprod, 1.0, rtol=1e-5)
    # posterior mean coefficients reproduce x0 when x_t is the noiseless forward sample
    coef_sum = s.posterior_mean_coef1 + s.posterior_mean_coef2 * s.sqrt_alphas_cumprod
    np.testing.assert_allclose(coef_sum, s.sqrt_alphas_cumprod / np.sqrt(s.alphas), rtol=1e-4)


def test_cosine_matches_closed_form_and_clips():
    T = 1000
    s = make_schedule("cosine", T)
    f = lambda u: np.cos((u / T + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    t = np.arange(T)
    expected = np.minimum(1 - f(t + 1) / f(t), 0.999)
    np.testing.assert_allclose(s.betas, expected, rtol=1e-6)
    assert float(s.betas[-1]) == pytest.approx(0.999)


def test_zero_terminal_snr():
    for name in NAMES:
        s = make_schedule(name, 1000, rescale_to_zero_terminal_snr=True)
        acp = np.asarray(s.alphas_cumprod)
        assert acp[-1] == 0.0
        assert float(s.betas[-1]) == 1.0
        # the first alpha_bar is kept
        ref = make_schedule(name, 1000)
        np.testing.assert_allclose(acp[0], ref.alphas_cumprod[0], rtol=1e-6)
        assert np.all(np.diff(acp) < 0)


def test_schedule_is_a_pytree_with_static_length():
    s = make_schedule("linear", 10)
    leaves, treedef = jax.tree.flatten(s)
    assert len(leaves) == 13 and all(leaf.shape == (10,) for leaf in leaves)
    s2 = jax.tree.unflatten(treedef, leaves)
    assert isinstance(s2, Schedule) and s2.num_timesteps == 10

    traces = []

    @jax.jit
    def f(sched):
        traces.append(1)
        return sched.alphas_cumprod[sched.num_timesteps - 1]

    f(s)
    f(make_schedule("cosine", 10))  # same structure and length: no retrace
    assert len(traces) == 1
    assert float(f(s)) == pytest.approx(float(s.alphas_cumprod[-1]))
    out = jax.vmap(lambda sc: sc.betas.sum())(jax.tree.map(lambda a: jnp.stack([a, a]), s))
    assert out.shape == (2,)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: make_schedule("quadratic", 10), "name"),
        (lambda: make_schedule("linear", 0), "num_timesteps"),
        (lambda: make_schedule("linear", 2.5), "num_timesteps"),
        (lambda: make_schedule("linear", 10, beta_start=0.0), "beta_start"),
        (lambda: make_schedule("linear", 10, beta_end=1.5), "beta_end"),
        (lambda: make_schedule("cosine", 10, max_beta=1.0), "max_beta"),
        (lambda: make_schedule("linear", 10, s=0.1), "keyword"),
        (lambda: schedule_from_betas([0.1, -0.2, 0.3]), "betas"),
        (lambda: schedule_from_betas([0.1, 1.0, 0.3]), "betas"),
        (lambda: schedule_from_betas([0.1, np.nan]), "betas"),
        (lambda: schedule_from_betas(np.ones((2, 2)) * 0.1), "betas"),
        (lambda: schedule_from_betas([]), "betas"),
        (lambda: rescale_zero_terminal_snr([0.1]), "betas"),
        (lambda: make_schedule("linear", 10, beta_start="0.001"), "beta_start"),
        (lambda: make_schedule("linear", 10, beta_end=float("nan")), "beta_end"),
        (lambda: make_schedule("cosine", 10, s="0.008"), "s must be a concrete real number"),
        (lambda: make_schedule("linear", True), "num_timesteps"),
        (lambda: make_schedule("linear", 10, rescale_to_zero_terminal_snr="False"),
         "rescale_to_zero_terminal_snr must be a bool"),
    ],
)
def test_bad_input_raises_naming_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_schedule_from_traced_betas_is_a_clear_error():
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(schedule_from_betas)(jnp.full((4,), 0.1))


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "sigmoid"])
def test_beta_start_above_beta_end_is_rejected(name):
    # It used to build a schedule whose noise shrinks with t (a sigmoid or linear ramp downwards).
    with pytest.raises(ValueError, match=r"beta_start must be <= beta_end.*0\.02 > beta_end="):
        make_schedule(name, 10, beta_start=0.02, beta_end=0.001)
    constant = make_schedule(name, 10, beta_start=0.01, beta_end=0.01)  # equal is allowed
    np.testing.assert_allclose(constant.betas, 0.01, rtol=1e-6)
