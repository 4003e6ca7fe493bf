"""LCM and EDM: options, key folding, the float32 carry, EDM's preconditioning / loss identities and
an exactly solvable EDM ODE. Parity with diffusers: tests/parity/test_lcm_parity.py and
tests/parity/test_edm_parity.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.preconditioning import edm_denoise, edm_precondition
from jaxdiff.losses import edm_loss, edm_loss_weight, edm_sample_sigma
from jaxdiff.samplers import (
    edm_sample,
    edm_sigmas,
    edm_step,
    get_sampler,
    lcm_sample,
    lcm_scalings,
    lcm_step,
    lcm_timesteps,
    sampler_names,
)
from jaxdiff.schedules import make_schedule

SCHED = make_schedule("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
SHAPE = (2, 4, 4, 3)


def lcm_model(x, t):
    return 0.3 * jnp.tanh(x) + 0.01 * t[:, None, None, None].astype(x.dtype) / 1000.0


def edm_model(x_in, c_noise):
    return 0.4 * jnp.tanh(x_in) * jnp.cos(c_noise)[:, None, None, None]


def x_T(scale=1.0, dtype=jnp.float32):
    return (scale * jax.random.normal(jax.random.key(0), SHAPE)).astype(dtype)


# ---- options -----------------------------------------------------------------------------------

@pytest.mark.parametrize("options, match", [
    (dict(num_steps=0), "num_steps"),
    (dict(num_steps=51), "num_steps"),
    (dict(num_steps=4, original_inference_steps=0), "original_inference_steps"),
    (dict(num_steps=4, original_inference_steps=1001), "original_inference_steps"),
    (dict(num_steps=4, timestep_scaling=0.0), "timestep_scaling"),
    (dict(num_steps=4, clip_x0=-1.0), "clip_x0"),
    (dict(num_steps=4, prediction_type="score"), "prediction_type"),
    (dict(num_steps=4, noise=jnp.zeros((3, *SHAPE))), "noise"),
])
def test_lcm_rejects_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        lcm_sample(lcm_model, SCHED, x_T(), jax.random.key(0), **options)


def test_lcm_needs_a_key_for_more_than_one_step_only():
    with pytest.raises(ValueError, match="key"):
        lcm_sample(lcm_model, SCHED, x_T(), None, num_steps=2)
    lcm_sample(lcm_model, SCHED, x_T(), None, num_steps=1)  # one step draws nothing
    with pytest.raises(ValueError, match="strength"):
        lcm_timesteps(SCHED, 2, strength=0.0)


def test_lcm_step_needs_noise_unless_last():
    x = x_T()
    with pytest.raises(ValueError, match="noise"):
        lcm_step(SCHED, x, x, 999, 759, None)
    lcm_step(SCHED, x, x, 999, -1, None)
    with pytest.raises(ValueError, match="t_prev"):
        lcm_step(SCHED, x, x, 999, 1000, x)


@pytest.mark.parametrize("options, match", [
    (dict(solver="rk4"), "solver"),
    (dict(sigma_min=0.0), "sigma_min"),
    (dict(sigma_min=100.0), "sigma_min"),
    (dict(rho=0.0), "rho"),
    (dict(sigma_data=0.0), "sigma_data"),
    (dict(prediction_type="x0"), "prediction_type"),
    (dict(sigma_schedule="beta"), "sigma_schedule"),
    (dict(final_sigmas_type="one"), "final_sigmas_type"),
    (dict(s_churn=-1.0), "s_churn"),
    (dict(s_tmin=-1.0), "s_tmin"),
    (dict(s_tmax=float("nan")), "s_tmax"),
    (dict(s_noise=-0.5), "s_noise"),
    (dict(num_steps=0), "num_steps"),
])
def test_edm_rejects_bad_options(options, match):
    options = {"num_steps": 4, **options}
    with pytest.raises(ValueError, match=match):
        edm_sample(edm_model, x_T(80.0), jax.random.key(0), **options)


def test_edm_needs_a_key_only_with_churn():
    with pytest.raises(ValueError, match="key"):
        edm_sample(edm_model, x_T(80.0), None, num_steps=4, s_churn=1.0)
    edm_sample(edm_model, x_T(80.0), None, num_steps=4)  # deterministic
    # Churn confined to a window that no sigma falls in: deterministic again.
    edm_sample(edm_model, x_T(80.0), None, num_steps=4, s_churn=1.0, s_tmin=1e3, s_tmax=1e4)
    with pytest.raises(ValueError, match="noise"):
        den = lambda x, s: x  # noqa: E731
        edm_step(den, x_T(), 1.0, 0.5, None, gamma=0.1)
    with pytest.raises(ValueError, match="gamma"):
        edm_step(lambda x, s: x, x_T(), 1.0, 0.5, x_T(), gamma=-0.1)


@pytest.mark.slow
def test_registry_has_lcm_not_edm():
    names = sampler_names()
    assert "lcm" in names and "edm" not in names
    s = get_sampler("lcm", original_inference_steps=20, prediction_type="v")
    assert s.stochastic
    key = jax.random.key(3)
    np.testing.assert_array_equal(
        np.asarray(s(lcm_model, SCHED, x_T(), key, num_steps=3)),
        np.asarray(lcm_sample(lcm_model, SCHED, x_T(), key, num_steps=3,
                              original_inference_steps=20, prediction_type="v")),
    )
    with pytest.raises(ValueError, match="original_inference_steps"):
        get_sampler("lcm", original_inference_steps=5000)


# ---- keys and noise ----------------------------------------------------------------------------

@pytest.mark.slow
def test_lcm_key_folding():
    """Step ``i`` draws ``normal(fold_in(key, i))``: the same as passing those rows as noise."""
    key, n = jax.random.key(7), 4
    noise = jnp.stack([jax.random.normal(jax.random.fold_in(key, i), SHAPE) for i in range(n)])
    a = lcm_sample(lcm_model, SCHED, x_T(), key, num_steps=n)
    b = lcm_sample(lcm_model, SCHED, x_T(), None, num_steps=n, noise=noise)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    c = lcm_sample(lcm_model, SCHED, x_T(), jax.random.key(8), num_steps=n)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
    # The last step's row is unused.
    d = lcm_sample(lcm_model, SCHED, x_T(), None, num_steps=n, noise=noise.at[-1].set(9.0))
    np.testing.assert_allclose(np.asarray(b), np.asarray(d), rtol=1e-6)


@pytest.mark.slow
def test_edm_key_folding():
    key, n = jax.random.key(7), 5
    noise = jnp.stack([jax.random.normal(jax.random.fold_in(key, i), SHAPE) for i in range(n)])
    opts = dict(num_steps=n, s_churn=3.0, s_noise=1.003)
    a = edm_sample(edm_model, x_T(80.0), key, **opts)
    b = edm_sample(edm_model, x_T(80.0), None, noise=noise, **opts)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    c = edm_sample(edm_model, x_T(80.0), None, num_steps=n)
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


# ---- dtypes and compilation --------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
def test_float32_carry_with_a_bf16_model(x_dtype):
    def lcm_bf16(x, t):
        return lcm_model(x.astype(jnp.bfloat16), t)

    def edm_bf16(x_in, c_noise):
        return edm_model(x_in.astype(jnp.bfloat16), c_noise)

    _, xs, dens = lcm_sample(lcm_bf16, SCHED, x_T(1.0, x_dtype), jax.random.key(0), num_steps=3,
                             return_trajectory=True)
    assert xs.dtype == jnp.float32 and dens.dtype == jnp.float32
    _, xs, dens = edm_sample(edm_bf16, x_T(80.0, x_dtype), jax.random.key(0), num_steps=3,
                             s_churn=1.0, return_trajectory=True)
    assert xs.dtype == jnp.float32 and dens.dtype == jnp.float32


def test_compile_once():
    traces = []

    @jax.jit
    def run(w, x, key):
        traces.append(1)
        a = lcm_sample(lambda x, t: w * x, SCHED, x, key, num_steps=4)
        b = edm_sample(lambda x, c: w * x, x * 80.0, key, num_steps=4, s_churn=1.0)
        return a, b

    run(0.1, jnp.ones(SHAPE), jax.random.key(0))
    run(0.2, jnp.zeros(SHAPE), jax.random.key(1))
    assert len(traces) == 1


# ---- LCM maths ---------------------------------------------------------------------------------

def test_lcm_boundary_condition():
    c_skip, c_out = lcm_scalings(jnp.array([0, 999]))
    np.testing.assert_allclose(np.asarray(c_skip), [1.0, 0.25 / (9990.0**2 + 0.25)], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(c_out), [0.0, 9990.0 / math.sqrt(9990.0**2 + 0.25)],
                               rtol=1e-6)
    # An x0 model predicting a constant: one step returns ~ that constant.
    out = lcm_sample(lambda x, t: jnp.full_like(x, 0.3), SCHED, x_T(), None, num_steps=1,
                     prediction_type="x0")
    np.testing.assert_allclose(np.asarray(out), 0.3, atol=1e-5)


# ---- EDM maths ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sd", [0.5, 1.0])
def test_edm_precondition_identities(sd):
    sigma = jnp.array([1e-4, 0.002, 0.5, 1.0, 80.0])
    c_skip, c_out, c_in, c_noise = edm_precondition(sigma, sd)
    np.testing.assert_allclose(np.asarray(c_skip + (c_out / sd) ** 2), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(c_in**2 * (sigma**2 + sd**2)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(c_noise), np.log(np.asarray(sigma)) / 4, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(edm_loss_weight(sigma, sd) * c_out**2), 1.0, rtol=1e-6)
    _, c_out_v, _, _ = edm_precondition(sigma, sd, "v_prediction")
    np.testing.assert_array_equal(np.asarray(c_out_v), -np.asarray(c_out))
    # sigma -> 0: the denoiser is the identity, whatever the network says.
    assert abs(float(c_skip[0]) - 1.0) < 1e-7 and abs(float(c_out[0])) < 2e-4 / sd
    x = x_T()
    d = edm_denoise(lambda x_in, c: jnp.ones_like(x_in), x, 1e-6, sigma_data=sd)
    np.testing.assert_allclose(np.asarray(d), np.asarray(x), atol=1e-5)


def test_edm_sigma_sampling_is_log_normal():
    s = edm_sample_sigma(jax.random.key(0), (20000,), P_mean=-1.2, P_std=1.2)
    logs = np.log(np.asarray(s))
    assert abs(logs.mean() + 1.2) < 0.03 and abs(logs.std() - 1.2) < 0.03
    with pytest.raises(ValueError, match="P_std"):
        edm_sample_sigma(jax.random.key(0), (4,), P_std=-1.0)


@pytest.mark.slow
def test_edm_loss_of_the_exact_gaussian_denoiser_is_one():
    """For data ``N(0, sigma_data^2)`` the exact denoiser is ``c_skip x`` (``F = 0``), whose
    squared error has mean ``sigma^2 sigma_data^2 / (sigma^2 + sigma_data^2) = 1 / lambda``: the
    weighted loss is 1 in expectation at every sigma."""
    sd = 0.5
    y = sd * jax.random.normal(jax.random.key(1), (4096, 8))
    loss, aux = edm_loss(lambda x_in, c: jnp.zeros_like(x_in), y, jax.random.key(2),
                         sigma_data=sd)
    assert abs(float(loss) - 1.0) < 0.05, float(loss)
    assert aux["per_example"].shape == (4096,) and aux["sigma"].shape == (4096,)
    grads = jax.grad(lambda w: edm_loss(lambda x_in, c: w * x_in, y[:8], jax.random.key(3))[0])
    assert np.isfinite(float(grads(0.1)))


@pytest.mark.parametrize("solver, ratio", [("euler", 2.0), ("heun", 4.0)])
def test_edm_convergence_order_on_the_gaussian_ode(solver, ratio):
    """With ``F = 0`` and data ``N(0, sigma_data^2)`` the probability-flow ODE ``dx/dsigma = x sigma
    / (sigma^2 + sigma_data^2)`` gives ``x(0) = x_T sd / sqrt(sigma_max^2 + sd^2)``. Doubling the
    steps divides the error by ~2 (Euler) or ~4 (Heun); measured 1.97-1.99 and 4.3-4.5 for
    18 -> 36 -> 72 steps (relative errors 15% / 5.5% at 18 steps: the Karras grid's last steps
    are long)."""
    sd, smax = 0.5, 80.0
    x = x_T(smax)
    exact = np.asarray(x, np.float64) * sd / math.sqrt(smax**2 + sd**2)
    zero = lambda x_in, c: jnp.zeros_like(x_in)  # noqa: E731
    errs = []
    for n in (18, 36, 72):
        out = edm_sample(zero, x, None, num_steps=n, solver=solver, sigma_data=sd)
        errs.append(np.abs(np.asarray(out) - exact).max())
    for coarse, fine in zip(errs, errs[1:]):
        assert 0.8 * ratio < coarse / fine < 1.25 * ratio, errs


def test_edm_sigmas_grid():
    s = edm_sigmas(5)
    assert s.dtype == np.float32 and s.shape == (6,)
    np.testing.assert_allclose([s[0], s[4], s[5]], [80.0, 0.002, 0.0], rtol=1e-6)
    assert (np.diff(s) < 0).all()
    s = edm_sigmas(5, final_sigmas_type="sigma_min", sigma_schedule="exponential")
    assert s[-1] == s[-2] and np.allclose(np.diff(np.log(s[:-1])), np.log(0.002 / 80) / 4)
