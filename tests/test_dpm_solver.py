"""DPM-Solver++: accuracy on an exactly solvable case, compile-once, timestep grid, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import diffusion as D
from jaxdiff.samplers.dpm_solver import dpm_solver_sample, dpm_solver_timesteps
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
