"""DEIS: the step's exactness on polynomials in log-rho, the step driven by hand against the scan,
the grid and the order schedule, order 1 as DDIM, dtypes, compile-once, registry and command-line
name, bad input. Parity with diffusers' ``DEISMultistepScheduler``:
tests/parity/test_deis_parity.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import sample as sample_cli
from experiments.cli import ConfigError
from jaxdiff import diffusion as D
from jaxdiff.samplers import (
    DEISState,
    deis_coefficients,
    deis_init,
    deis_orders,
    deis_sample,
    deis_step,
    deis_timesteps,
    dpm_solver_sample,
    get_sampler,
    noise_to_img2img,
    sampler_names,
    sampler_options,
)
from jaxdiff.schedules import make_schedule

SCHED = make_schedule("linear", 1000)
SHAPE = (2, 4, 4, 3)
U = 2.0**-23  # one float32 ulp at 1


def model(x, t):
    """An eps model near the exact one for data N(0, 0.25 I), so that samples stay O(1)."""
    abar = D.extract(SCHED.alphas_cumprod, t, x.ndim).astype(x.dtype)
    s = jnp.sqrt(1 - abar)
    tf = t.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
    return s * x / (0.25 * abar + 1 - abar) + 0.1 * jnp.tanh(x) * jnp.cos(tf / 200.0)


def x_T():
    return jax.random.normal(jax.random.key(0), SHAPE)


def _max_diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _integral(poly, rho_s, rho_t):
    """``integral_{rho_s}^{rho_t} poly(log rho) d rho`` in float64 (Simpson in ``u = log rho``,
    exact to ~1e-12 for these smooth integrands)."""
    u = np.linspace(np.log(rho_s), np.log(rho_t), 4001)
    w = np.ones_like(u)
    w[1:-1:2], w[2:-1:2] = 4, 2
    return float(np.sum(w * np.polyval(poly, u) * np.exp(u)) * (u[1] - u[0]) / 3)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_step_is_exact_for_polynomials_in_log_rho(order):
    """DEIS of order ``k`` integrates ``d(x / alpha) / d rho = eps`` exactly when ``eps`` is a
    polynomial of degree ``k - 1`` in ``log rho`` (its Lagrange interpolant is then exact), and
    not for degree ``k``. Checked on one step from ``rho_s = 2`` to ``rho_t = 0.7`` with the
    history at ``rho = 5, 11``: exact to float32 rounding (``alpha_t |x / alpha_s| + alpha_t
    |integral|`` ~ 10, 16 ulps of it), and at least 1e-3 off for the next degree."""
    rho_t, rho_s, hist = 0.7, 2.0, [5.0, 11.0]
    a = lambda r: (r * r + 1) ** -0.5  # noqa: E731
    x = jnp.full((1, 3), 0.8)
    rng = np.random.default_rng(order)
    for degree, exact in ((order - 1, True), (order, False)):
        poly = rng.uniform(0.5, 1.5, degree + 1)
        eps = lambda r: jnp.full((1, 3), np.polyval(poly, np.log(r)), jnp.float32)  # noqa: E731
        state = deis_init(x, rho_s, 3)
        if order >= 2:
            state = DEISState(eps(hist[0]), jnp.float32(hist[0]), eps(hist[1]),
                              jnp.float32(hist[1]))
        new_state, x_next, x0 = deis_step(state, eps(rho_s), x, rho_s, rho_t, order=order)
        want = a(rho_t) * (0.8 / a(rho_s) + _integral(poly, rho_s, rho_t))
        err = _max_diff(x_next, want)
        if exact:
            assert err <= 16 * U * 10, (degree, err)
        else:
            assert err >= 1e-3, (degree, err)
    # the coefficients are the integrals of the Lagrange basis polynomials in log rho
    nodes = np.log([rho_s, *hist][:order])
    coefs = deis_coefficients(rho_s, rho_t, hist[0], hist[1], order=order)
    for j in range(3):
        want_c = 0.0
        if j < order:
            basis = np.poly1d([1.0])
            for k in range(order):
                if k != j:
                    basis *= np.poly1d([1.0, -nodes[k]]) / (nodes[j] - nodes[k])
            want_c = _integral(basis.coeffs, rho_s, rho_t)
        assert abs(float(coefs[j]) - want_c) <= 16 * U * max(1.0, abs(want_c)), (j, want_c)
    # the history shifts: this step's eps and sigma in front
    np.testing.assert_array_equal(np.asarray(new_state.prev_eps), np.asarray(eps(rho_s)))
    assert float(new_state.prev_sigma) == rho_s
    # the data prediction of an eps model: (x - sigma_t eps) / alpha_t
    np.testing.assert_allclose(np.asarray(x0), (0.8 - rho_s * a(rho_s) * np.asarray(eps(rho_s)))
                               / a(rho_s), rtol=4 * U)


@pytest.mark.parametrize("options", [dict(), dict(solver_order=3, sigma_schedule="karras"),
                                     dict(solver_order=3, prediction_type="v", spacing="trailing",
                                          lower_order_final=False)])
def test_step_driven_by_hand_equals_the_scan(options):
    """The step function with its explicit history, in a Python loop (concrete orders), is the
    jitted sampler (traced orders in one scan); both with a 7-step grid. The two compilations
    may round differently: each step by 16 ulps of its terms, ``alpha_t / alpha_s |x|`` and
    ``alpha_t |c_j| |eps_j|`` (with ``|x|, |eps| <= 4`` here), carried on by later steps; the
    data prediction of an eps model, ``(x - sigma_t eps) / alpha_t``, divides its step's error
    by ``alpha_t`` (1 / 157 at t = 999)."""
    n, order = 7, options.get("solver_order", 2)
    grid = deis_timesteps(SCHED, n, spacing=options.get("spacing", "linspace"),
                          sigma_schedule=options.get("sigma_schedule", "discrete"))
    orders = deis_orders(grid.sigmas, order,
                         lower_order_final=options.get("lower_order_final", True))
    pred = options.get("prediction_type", "eps")  # (the model's output read as v: still O(1))
    sig = grid.sigmas.astype(np.float64)
    alphas = (sig**2 + 1) ** -0.5
    bounds, total = [0.0], 0.0
    for i in range(n):
        hist = (sig[max(i - 1, 0)], sig[max(i - 2, 0)])
        c = deis_coefficients(sig[i], sig[i + 1], *hist, order=int(orders[i]))
        total += 16 * U * 4 * alphas[i + 1] * (1 / alphas[i] + sum(abs(float(v)) for v in c))
        bounds.append(total)
    x = x_T()
    state = deis_init(x, grid.sigmas[0], order)
    assert isinstance(state, DEISState) and (state.older_eps is None) == (order < 3)
    xs, x0s = [x], []
    for i, t in enumerate(grid.timesteps):
        out = model(x, jnp.full((SHAPE[0],), t, jnp.int32))
        state, x, x0 = deis_step(state, out, x, grid.sigmas[i], grid.sigmas[i + 1],
                                 order=int(orders[i]), prediction_type=pred)
        xs.append(x)
        x0s.append(x0)
    run = jax.jit(lambda x: deis_sample(model, SCHED, x, num_steps=n, return_trajectory=True,
                                        **options))
    final, traj, pred_x0s = run(x_T())
    assert traj.shape == (n + 1, *SHAPE) and pred_x0s.shape == (n, *SHAPE)
    for i in range(n):
        assert _max_diff(traj[i + 1], xs[i + 1]) <= bounds[i + 1], i
        assert _max_diff(pred_x0s[i], x0s[i]) <= bounds[i + 1] / alphas[i], i
    np.testing.assert_array_equal(np.asarray(final), np.asarray(traj[-1]))


def test_grid_and_orders():
    grid = deis_timesteps(SCHED, 10)
    assert grid.timesteps.dtype == np.int32 and len(grid.sigmas) == 11
    assert np.all(np.diff(grid.timesteps) < 0) and np.all(np.diff(grid.sigmas) < 0)
    # the final sigma is the training sigma of t = 0 (diffusers' sigma_last), not 0
    np.testing.assert_allclose(grid.sigmas[-1], np.sqrt((1 - SCHED.alphas_cumprod[0])
                                                        / SCHED.alphas_cumprod[0]), rtol=1e-6)
    for schedule in ("karras", "exponential", "beta"):
        g = deis_timesteps(SCHED, 10, sigma_schedule=schedule)
        assert g.sigmas[-1] == g.sigmas[-2] > 0  # repeated: the last step does not move
    # warm-up, lower_order_final (< 15 steps), the equal-sigma last step, image-to-image
    sig = grid.sigmas
    assert deis_orders(sig, 3).tolist() == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    assert deis_orders(sig, 3, lower_order_final=False).tolist() == [1, 2] + [3] * 8
    assert deis_orders(sig, 2, start_step=4).tolist() == [1, 1, 1, 1, 1, 2, 2, 2, 2, 1]
    assert deis_orders(sig, 1).tolist() == [1] * 10
    long = deis_timesteps(SCHED, 20, sigma_schedule="karras").sigmas
    assert deis_orders(long, 3).tolist() == [1, 2] + [3] * 17 + [1]


@pytest.mark.slow
def test_first_order_is_ddim():
    """Order 1 is DDIM: DPM-Solver's first-order noise-prediction update on the same grid
    (``final_sigmas_type="sigma_min"``), written differently: within 16 ulps per step."""
    for spacing in ("linspace", "trailing"):
        deis = deis_sample(model, SCHED, x_T(), num_steps=9, solver_order=1, spacing=spacing)
        dpm = dpm_solver_sample(model, SCHED, x_T(), num_steps=9, solver_order=1,
                                spacing=spacing, algorithm_type="dpmsolver",
                                final_sigmas_type="sigma_min")
        assert _max_diff(deis, dpm) <= 16 * U * 9


def test_bf16_model_keeps_a_float32_carry():
    def bf16_model(x, t):
        return model(x, t).astype(jnp.bfloat16)

    _, xs, x0s = deis_sample(bf16_model, SCHED, x_T(), num_steps=6, solver_order=3,
                             return_trajectory=True)
    assert xs.dtype == x0s.dtype == jnp.float32
    ref = deis_sample(model, SCHED, x_T(), num_steps=6, solver_order=3)
    assert _max_diff(xs[-1], ref) < 0.05  # bf16 rounding of the model output only
    out = deis_sample(model, SCHED, x_T().astype(jnp.bfloat16), num_steps=4)
    assert out.dtype == jnp.float32


def test_compiles_once_and_ignores_noise():
    traces = []

    @jax.jit
    def run(w, x):
        traces.append(1)
        return deis_sample(lambda x, t: w * x, SCHED, x, num_steps=10, solver_order=3)

    run(0.1, jnp.ones((2, 3)))
    run(0.2, jnp.zeros((2, 3)))
    assert len(traces) == 1
    # deterministic: noise is shape-checked and unused, key may be None
    with_noise = deis_sample(model, SCHED, x_T(), jax.random.key(1), num_steps=5,
                             noise=jnp.ones((5, *SHAPE)))
    np.testing.assert_array_equal(np.asarray(with_noise),
                                  np.asarray(deis_sample(model, SCHED, x_T(), num_steps=5)))
    with pytest.raises(ValueError, match="noise must have shape"):
        deis_sample(model, SCHED, x_T(), num_steps=5, noise=jnp.ones((4, *SHAPE)))


@pytest.mark.slow
def test_registry_command_line_and_image_to_image(tmp_path):
    assert "deis" in sampler_names()
    assert sampler_options("deis") == ("lower_order_final", "prediction_type", "sigma_schedule",
                                       "solver_order", "spacing", "steps_offset")
    s = get_sampler("deis", solver_order=3, prediction_type="v")
    assert not s.stochastic and s.spec.noise_space == "sigma_vp"
    np.testing.assert_array_equal(
        np.asarray(s(model, SCHED, x_T(), None, num_steps=6)),
        np.asarray(deis_sample(model, SCHED, x_T(), num_steps=6, solver_order=3,
                               prediction_type="v")))
    assert s.model_evaluations(SCHED, 6) == 6
    # --sampler deis passes the flag (the run then fails for the empty workdir)
    with pytest.raises(ConfigError, match="config.json not found"):
        sample_cli.main(["--workdir", str(tmp_path), "--sampler", "deis"])
    # image-to-image: the tail of the grid from the image noised to its first step
    x0, z = x_T(), jax.random.normal(jax.random.key(2), SHAPE)
    start = noise_to_img2img(s, SCHED, 10, x0, z, 0.6)
    sigma = deis_timesteps(SCHED, 10).sigmas[4]
    alpha = (sigma**2 + 1) ** -0.5
    np.testing.assert_allclose(np.asarray(start), np.asarray(alpha * x0 + sigma * alpha * z),
                               rtol=4 * U, atol=4 * U)
    _, traj, _ = s(model, SCHED, start, num_steps=10, strength=0.6, return_trajectory=True)
    assert traj.shape == (7, *SHAPE)  # the 6 steps that run


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_steps=0), "num_steps"),
        (dict(num_steps=1001), "num_steps"),
        (dict(num_steps=1000), "num_steps"),  # linspace repeats timesteps
        (dict(solver_order=0), "solver_order"),
        (dict(solver_order=4), "solver_order"),
        (dict(solver_order=2.0), "solver_order"),
        (dict(prediction_type="score"), "prediction_type"),
        (dict(spacing="uniform"), "spacing"),
        (dict(sigma_schedule="lu"), "sigma_schedule"),  # DPM-Solver's, not DEIS's
        (dict(lower_order_final=1), "lower_order_final"),
        (dict(steps_offset=-1, spacing="leading"), "steps_offset"),
        (dict(steps_offset=999, spacing="leading"), "steps_offset"),
        (dict(strength=0.05), "strength"),
        (dict(strength=1.5), "strength"),
    ],
)
def test_bad_input(kwargs, match):
    kwargs = {"num_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        deis_sample(model, SCHED, x_T(), **kwargs)
    options = {k: v for k, v in kwargs.items() if k not in ("num_steps", "strength")}
    if options and "num_steps" not in match:
        with pytest.raises(ValueError, match=match):
            get_sampler("deis", **options)


def test_bad_step_input():
    x = x_T()
    with pytest.raises(ValueError, match="order must be 1 or 2 "):
        deis_step(deis_init(x, 1.0, 2), x, x, 1.0, 0.5, order=3)
    with pytest.raises(ValueError, match="order must be 1 or 2 or 3"):
        deis_step(deis_init(x, 1.0, 3), x, x, 1.0, 0.5, order=0)
    with pytest.raises(ValueError, match="model_output"):
        deis_step(deis_init(x, 1.0), x[:1], x, 1.0, 0.5, order=1)
    with pytest.raises(ValueError, match="prediction_type"):
        deis_step(deis_init(x, 1.0), x, x, 1.0, 0.5, order=1, prediction_type="score")
    with pytest.raises(ValueError, match="solver_order"):
        deis_init(x, 1.0, 4)
    with pytest.raises(ValueError, match="model_fn"):
        deis_sample(lambda x, t: x[..., :1], SCHED, x, num_steps=5)
