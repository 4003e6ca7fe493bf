"""DPM-Solver++: accuracy on an exactly solvable case, compile-once, timestep grid, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import diffusion as D
from jaxdiff.convert import sampler_options_from_diffusers_config
from jaxdiff.samplers import get_sampler
from jaxdiff.samplers.dpm_solver import (
    DPMSolverState,
    dpm_solver_init,
    dpm_solver_sample,
    dpm_solver_step,
    dpm_solver_timesteps,
)
from jaxdiff.schedules import make_schedule

SCHED = make_schedule("linear", 1000)


def gaussian_oracle(scale):
    """The exact eps-prediction for data N(0, scale^2 I): E[eps | x_t] = sigma_t x_t / std_t^2 with
    std_t^2 = abar_t scale^2 + 1 - abar_t. Its probability-flow ODE is linear, x_t / std_t is
    constant along it, so the exact ODE solution from t = 999 to t = 0 is known in closed form."""

    def model_fn(x, t):
        abar = D.extract(SCHED.alphas_cumprod, t, x.ndim)
        return jnp.sqrt(1 - abar) * x / (abar * scale**2 + 1 - abar)

    return model_fn


def _ode_error(order, n, x_T, scale=0.5):
    out = dpm_solver_sample(gaussian_oracle(scale), SCHED, x_T, num_steps=n, solver_order=order,
                            spacing="trailing", final_sigmas_type="sigma_min")

    def std(abar):
        return np.sqrt(abar * scale**2 + 1 - abar)

    a_T, a_0 = float(SCHED.alphas_cumprod[999]), float(SCHED.alphas_cumprod[0])
    return np.abs(np.asarray(out) - np.asarray(x_T) * std(a_0) / std(a_T)).max()


@pytest.mark.slow
@pytest.mark.parametrize("order, expected_ratio", [(1, 2.0), (2, 4.0)])
def test_convergence_order_on_gaussian_probability_flow(order, expected_ratio):
    """Doubling the steps divides the global error by ~2 (first order, DDIM) or ~4
    (DPM-Solver++(2M)); measured ratios 1.97-1.99 and 3.98-4.28 for 50 -> 100 -> 200 steps."""
    x_T = jax.random.normal(jax.random.key(1), (4, 8))
    errs = [_ode_error(order, n, x_T) for n in (50, 100, 200)]
    for coarse, fine in zip(errs, errs[1:]):
        assert 0.8 * expected_ratio < coarse / fine < 1.25 * expected_ratio, errs
    assert errs[-1] < (0.02 if order == 1 else 0.005), errs


def test_compiles_once_for_new_inputs():
    traces = []

    @jax.jit
    def run(w, x):
        traces.append(1)
        return dpm_solver_sample(lambda x, t: w * x, SCHED, x, num_steps=10)

    run(0.1, jnp.ones((2, 3)))
    run(0.2, jnp.zeros((2, 3)))
    assert len(traces) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_steps=0), "num_steps"),
        (dict(num_steps=1001), "num_steps"),
        (dict(num_steps=10, solver_order=4), "solver_order"),
        (dict(num_steps=10, solver_type="rk4"), "solver_type"),
        (dict(num_steps=10, spacing="uniform"), "spacing"),
        (dict(num_steps=10, prediction_type="score"), "prediction_type"),
        (dict(num_steps=10, final_sigmas_type="one"), "final_sigmas_type"),
        (dict(num_steps=10, clip_x0=0.0), "clip_x0"),
        (dict(num_steps=1000, spacing="leading"), "num_steps"),  # 1000 // 1001 == 0: all t = 0
        (dict(num_steps=1000, spacing="linspace"), "num_steps"),  # rounding repeats timesteps
        (dict(num_steps=10, spacing="leading", steps_offset=200), "steps_offset"),
        (dict(num_steps=10, steps_offset=-1), "steps_offset"),
        (dict(num_steps=10, lambda_min_clipped=10.0), "lambda_min_clipped"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpm_solver_sample(lambda x, t: x, SCHED, jnp.ones((2, 3)), **kwargs)


def test_wrong_model_output_shape():
    with pytest.raises(ValueError, match="model_fn"):
        dpm_solver_sample(lambda x, t: x[:, :1], SCHED, jnp.ones((2, 3)), num_steps=5)


SMALL = make_schedule("linear", 40)


@pytest.mark.parametrize("spacing, offset", [("linspace", 0), ("leading", 0), ("leading", 1),
                                             ("trailing", 0)])
def test_grid_is_strictly_decreasing_in_range_or_raises(spacing, offset):
    """Every 1 <= num_steps <= T gives a strictly decreasing grid in [0, T) with num_steps entries,
    or (leading / linspace past T - 1 steps, where diffusers repeats timesteps) a ValueError naming
    num_steps (steps_offset where the offset pushes T - 1 leading steps up to t = T). Trailing
    works for every num_steps, including T = 1000, n = 61, where the float arange overshoots to
    t = -1."""
    T = SMALL.num_timesteps
    for n in range(1, T + 1):
        try:
            ts, _, sigmas = dpm_solver_timesteps(SMALL, n, spacing=spacing, steps_offset=offset)
        except ValueError as e:
            name = "steps_offset" if offset and n == T - 1 else "num_steps"
            assert spacing != "trailing" and n >= T - 1 and name in str(e), (n, e)
            continue
        assert ts.shape == (n,) and sigmas.shape == (n + 1,), n
        assert (np.diff(ts) < 0).all() and ts[-1] >= 0 and ts[0] < T, (n, ts)
        assert np.isfinite(sigmas).all()
    ts = dpm_solver_timesteps(SCHED, 61, spacing="trailing").timesteps
    assert ts.shape == (61,) and ts[-1] >= 0


def test_sigma_min_after_a_grid_ending_at_t0_is_finite():
    """Trailing with num_steps = T ends at t = 0; with final_sigmas_type="sigma_min" the last step
    goes from sigma_0 to sigma_0 (h = 0), where the heun update divided 0 by 0."""
    x = jnp.ones((2, 3))
    out = dpm_solver_sample(lambda x, t: 0.1 * x, SMALL, x, num_steps=40, spacing="trailing",
                            solver_type="heun", final_sigmas_type="sigma_min")
    assert np.isfinite(np.asarray(out)).all()


# --- DPMSolverMultistepScheduler coverage: orders 1-3, algorithm types, sigma schedules ---


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(solver_order=4), "solver_order"),
        (dict(solver_order=0), "solver_order"),
        (dict(algorithm_type="dpmsolver+++"), "algorithm_type"),
        (dict(sigma_schedule="karas"), "sigma_schedule"),
        (dict(round_timesteps=1), "round_timesteps"),
        (dict(euler_at_final="True"), "euler_at_final"),
        (dict(algorithm_type="dpmsolver"), "final_sigmas_type"),  # zero final sigma: as diffusers
        (dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min", solver_order=3),
         "solver_order"),
        (dict(algorithm_type="sde-dpmsolver++"), "key"),  # stochastic: key or noise
        (dict(algorithm_type="sde-dpmsolver++", noise=jnp.zeros((5, 2, 3))), "noise"),
    ],
)
def test_bad_multistep_options_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpm_solver_sample(lambda x, t: x, SCHED, jnp.ones((2, 3)), None, num_steps=10, **kwargs)


def dpm_solver_options_from_diffusers(config):
    """The DPM-Solver options of a DPMSolverMultistepScheduler config (its spec's twin)."""
    return sampler_options_from_diffusers_config(
        {**config, "_class_name": "DPMSolverMultistepScheduler"})


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(use_karras_sigmas=True, use_beta_sigmas=True), "use_karras_sigmas, use_beta_sigmas"),
        (dict(use_exponential_sigmas=True, use_beta_sigmas=True), "at most one"),
        (dict(thresholding=True), "thresholding"),
        (dict(use_flow_sigmas=True), "use_flow_sigmas"),
        (dict(variance_type="learned_range"), "variance_type"),
        (dict(prediction_type="flow_prediction"), "prediction_type"),
    ],
)
def test_options_from_diffusers_rejects_conflicts_and_unsupported(config, match):
    with pytest.raises(ValueError, match=match):
        dpm_solver_options_from_diffusers(config)


def test_options_from_diffusers_maps_flags():
    o = dpm_solver_options_from_diffusers({})
    assert o["sigma_schedule"] == "discrete" and o["algorithm_type"] == "dpmsolver++"
    assert dpm_solver_options_from_diffusers(dict(use_karras_sigmas=True, use_lu_lambdas=True))[
        "sigma_schedule"] == "karras"  # set_timesteps checks Karras first
    assert dpm_solver_options_from_diffusers(dict(use_exponential_sigmas=True,
                                                  use_lu_lambdas=True))["sigma_schedule"] == "lu"
    o = dpm_solver_options_from_diffusers(dict(use_exponential_sigmas=True,
                                               beta_schedule="squaredcos_cap_v2",
                                               algorithm_type="deis", solver_type="bh2"))
    assert (o["sigma_schedule"], o["round_timesteps"]) == ("exponential", False)
    assert (o["algorithm_type"], o["solver_type"]) == ("dpmsolver++", "midpoint")
    # Every returned key is an option of dpm_solver_sample.
    out = dpm_solver_sample(lambda x, t: 0.1 * x, SCHED, jnp.ones((2, 3)), num_steps=5, **o)
    assert np.isfinite(np.asarray(out)).all()


def test_step_rejects_inconsistent_order_arguments():
    x = jnp.ones((2, 3))
    state = dpm_solver_init(x, 1.0)
    step = lambda s, **kw: dpm_solver_step(s, x, x, 1.0, 0.5, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="first_order and order"):
        step(state)
    with pytest.raises(ValueError, match="first_order and order"):
        step(state, first_order=True, order=1)
    with pytest.raises(ValueError, match="order"):
        step(state, order=4)
    with pytest.raises(ValueError, match="order"):  # a two-field state has no third-order history
        step(DPMSolverState(state.prev_x0, state.prev_sigma), order=3)
    with pytest.raises(ValueError, match="noise"):
        step(state, order=1, algorithm_type="sde-dpmsolver++")


def test_two_field_state_still_steps():
    """A ``DPMSolverState(prev_x0, prev_sigma)`` built as before the third order existed steps with
    ``first_order`` and comes back with two fields, like the four-field state's first two."""
    x = jnp.linspace(-1, 1, 6).reshape(2, 3)
    old = DPMSolverState(jnp.zeros_like(x), jnp.float32(2.0))
    s_old, x_old, _ = dpm_solver_step(old, 0.3 * x, x, 2.0, 1.0, first_order=True)
    s_new, x_new, _ = dpm_solver_step(dpm_solver_init(x, 2.0), 0.3 * x, x, 2.0, 1.0, order=1)
    np.testing.assert_array_equal(np.asarray(x_old), np.asarray(x_new))
    assert s_old.older_x0 is None and s_new.older_x0 is not None
    np.testing.assert_array_equal(np.asarray(s_old.prev_x0), np.asarray(s_new.prev_x0))


@pytest.mark.slow
def test_third_order_uses_the_older_history():
    """3M differs from 2M (the third-order update reads the step before last), converges at third
    order on the Gaussian probability flow (error ratio ~8 per doubling of steps once the steps
    are small; measured 8.2 and 11.5 for 100 -> 200 -> 400 steps; 2M: 4.3, 3.8) and beats 2M
    there (measured 7x at 400 steps)."""
    x_T = jax.random.normal(jax.random.key(1), (4, 8))
    out2 = dpm_solver_sample(gaussian_oracle(0.5), SCHED, x_T, num_steps=20, solver_order=2)
    out3 = dpm_solver_sample(gaussian_oracle(0.5), SCHED, x_T, num_steps=20, solver_order=3)
    assert np.abs(np.asarray(out2) - np.asarray(out3)).max() > 1e-4
    errs = [_ode_error(3, n, x_T) for n in (100, 200, 400)]
    for coarse, fine in zip(errs, errs[1:]):
        assert 6.0 < coarse / fine < 16.0, errs
    assert errs[-1] < _ode_error(2, 400, x_T) / 4, errs


@pytest.mark.parametrize("sigma_schedule", ["karras", "exponential", "beta", "lu"])
def test_sigma_schedule_grids(sigma_schedule):
    """Sigmas strictly decreasing from the largest training sigma to the smallest, then the final
    sigma; timesteps non-increasing in [0, T) (they may repeat: many sigmas can fall between two
    training steps), ending at t = 0; the solver's output finite."""
    train = np.sqrt((1 - np.asarray(SCHED.alphas_cumprod, np.float64)) /
                    np.asarray(SCHED.alphas_cumprod, np.float64))
    for final in ("zero", "sigma_min"):
        ts, prev, sigmas = dpm_solver_timesteps(SCHED, 12, sigma_schedule=sigma_schedule,
                                                final_sigmas_type=final)
        assert ts.dtype == np.int32 and ts.shape == (12,) and sigmas.shape == (13,)
        np.testing.assert_allclose(sigmas[[0, -2]], train[[-1, 0]], rtol=1e-5)
        assert (np.diff(sigmas[:-1]) < 0).all()
        assert sigmas[-1] == (0.0 if final == "zero" else sigmas[-2])
        assert (np.diff(ts) <= 0).all() and ts[0] <= 999 and ts[-1] == 0 and prev[-1] == -1
    x_T = jax.random.normal(jax.random.key(1), (4, 8))
    out = dpm_solver_sample(gaussian_oracle(0.5), SCHED, x_T, num_steps=12, solver_order=3,
                            sigma_schedule=sigma_schedule)
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("sigma_schedule", ["karras", "exponential", "lu"])
def test_sigma_schedules_solve_the_probability_flow(sigma_schedule):
    """On the Gaussian flow, 3M with these sigmas is within 3e-3 of the exact solution at 60
    steps (measured 0.9e-3 / 1.9e-3 / 0.6e-3). Not to zero: the model is evaluated at the rounded
    (or truncated) timestep of each sigma, as diffusers does, so its input does not quite match
    the sigma the solver steps from."""
    x_T = jax.random.normal(jax.random.key(1), (4, 8))
    out = dpm_solver_sample(gaussian_oracle(0.5), SCHED, x_T, num_steps=60, solver_order=3,
                            sigma_schedule=sigma_schedule, final_sigmas_type="sigma_min")

    def std(abar):
        return np.sqrt(abar * 0.25 + 1 - abar)

    a_T, a_0 = float(SCHED.alphas_cumprod[999]), float(SCHED.alphas_cumprod[0])
    exact = np.asarray(x_T) * std(a_0) / std(a_T)
    assert np.abs(np.asarray(out) - exact).max() < 3e-3


@pytest.mark.slow
def test_sde_noise_comes_from_fold_in_key_i():
    """Step i's noise is normal(fold_in(key, i)): passing those arrays as ``noise`` gives the same
    trajectory; another key gives another one; the noise reaches the result."""
    x_T = jax.random.normal(jax.random.key(0), (2, 3))
    model = gaussian_oracle(0.5)
    n = 8
    run = jax.jit(lambda k, z: dpm_solver_sample(model, SCHED, x_T, k, num_steps=n, noise=z,
                                                 algorithm_type="sde-dpmsolver++",
                                                 sigma_schedule="karras"))
    key = jax.random.key(7)
    noise = jnp.stack([jax.random.normal(jax.random.fold_in(key, i), x_T.shape)
                       for i in range(n)])
    a, b = np.asarray(run(key, None)), np.asarray(run(None, noise))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    c = np.asarray(run(jax.random.key(8), None))
    assert np.abs(a - c).max() > 1e-3
    ode = np.asarray(dpm_solver_sample(model, SCHED, x_T, num_steps=n, sigma_schedule="karras"))
    assert np.abs(a - ode).max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("options", [dict(solver_order=3, sigma_schedule="karras"),
                                     dict(algorithm_type="sde-dpmsolver++", solver_order=3)])
def test_bf16_model_and_x_T_keep_a_float32_carry(options):
    """A bf16 x_T and bf16 model outputs: the carry (and the history) stay float32. The reference
    runs in float32 on the same values (x_T and every model output rounded to bf16): a bf16 carry
    would add bf16 rounding (4e-3 relative) at every step; the float32 one agrees to float32
    rounding."""
    x_T = jax.random.normal(jax.random.key(0), (2, 4)).astype(jnp.bfloat16)
    model = gaussian_oracle(0.5)
    key = jax.random.key(1)
    out16 = dpm_solver_sample(lambda x, t: model(x, t).astype(jnp.bfloat16), SCHED, x_T, key,
                              num_steps=10, **options)
    out32 = dpm_solver_sample(
        lambda x, t: model(x, t).astype(jnp.bfloat16).astype(jnp.float32), SCHED,
        x_T.astype(jnp.float32), key, num_steps=10, **options,
    )
    assert out16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out16), np.asarray(out32), rtol=0, atol=1e-5)


def test_presets_and_stochastic_flag():
    assert get_sampler("dpm_solver", algorithm_type="sde-dpmsolver++").stochastic is True
    assert get_sampler("dpm_solver", algorithm_type="dpmsolver++").stochastic is False
    assert get_sampler("dpmpp_2m").stochastic is False
    assert get_sampler("dpmpp_2m_sde_karras").stochastic is True
    s = get_sampler("dpmpp_3m_karras")
    assert (s.options["solver_order"], s.options["sigma_schedule"]) == (3, "karras")
    with pytest.raises(ValueError, match="fixes option"):
        get_sampler("dpmpp_2m_karras", solver_order=3)
    x_T = jax.random.normal(jax.random.key(0), (2, 3))
    out = get_sampler("dpmpp_2m_sde_karras")(gaussian_oracle(0.5), SCHED, x_T,
                                             jax.random.key(1), num_steps=6)
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("options", [
    dict(num_steps=10),
    dict(num_steps=16, solver_order=3, solver_type="heun", sigma_schedule="karras",
         final_sigmas_type="sigma_min", lower_order_final=False),  # ends with h = 0
    dict(num_steps=10, solver_order=3, algorithm_type="sde-dpmsolver++"),
])
def test_gradients_through_the_sampler_are_finite(options):
    """The unused branches of jnp.where (the multistep terms on the first step, where r = 0; the
    heun / third-order terms where h = 0 or inf) are kept finite, so gradients are not NaN."""
    def loss(x):
        return dpm_solver_sample(lambda x, t: 0.3 * jnp.tanh(x), SCHED, x, jax.random.key(0),
                                 **options).sum()

    g = jax.grad(loss)(jnp.ones((2, 3)))
    assert np.isfinite(np.asarray(g)).all()
