"""LMS (jaxdiff.samplers.lms) on its own: option validation, the grid, the coefficients' exactness,
the float32 carry under a bf16 model, the step driven by hand against the scan, the registry and
the command lines. Parity with diffusers' LMSDiscreteScheduler: tests/parity/test_lms_parity.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import sample as sample_cli
from experiments import text_to_image as t2i_cli
from experiments.cli import ConfigError
from jaxdiff.samplers import (
    LMSState,
    euler_sample,
    get_sampler,
    lms_coefficients,
    lms_init,
    lms_sample,
    lms_step,
    lms_timesteps,
    noise_to_img2img,
    sampler_names,
    sampler_options,
    sampler_spec,
    strength_start_step,
)
from jaxdiff.samplers.sigmas import init_noise_sigma, scale_model_input, train_sigmas
from jaxdiff.schedules import make_schedule

SCHED = make_schedule("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
EPS = float(np.finfo(np.float32).eps)


def model(x, t):
    """A smooth eps-like stand-in (float timesteps)."""
    tt = t.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
    return 0.4 * jnp.tanh(x) + 0.2 * jnp.cos(tt / 200.0) * x


def x_T(shape=(2, 4, 4, 3), seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("options, match", [
    (dict(order=0), "order"),
    (dict(order=2.5), "order"),
    (dict(spacing="uniform"), "spacing"),
    (dict(sigma_schedule="lu"), "sigma_schedule"),
    (dict(prediction_type="flow"), "prediction_type"),
    (dict(steps_offset=-1), "steps_offset"),
    (dict(final_sigmas_type="zero"), "does not take option 'final_sigmas_type'"),
])
def test_options_are_validated_naming_the_argument(options, match):
    with pytest.raises(ValueError, match=match):
        get_sampler("lms", **options)
    if "final_sigmas_type" not in options:  # the sample function itself, at trace time
        with pytest.raises(ValueError, match=match):
            lms_sample(model, SCHED, x_T(), num_steps=4, **options)


def test_call_errors_name_the_argument():
    s = get_sampler("lms")
    with pytest.raises(ValueError, match="num_steps"):
        s.check(SCHED, 1001)
    with pytest.raises(ValueError, match="steps_offset=999 pushes the first timestep"):
        lms_sample(model, SCHED, x_T(), num_steps=4, spacing="leading", steps_offset=999)
    with pytest.raises(ValueError, match="model_fn's output must have shape"):
        lms_sample(lambda x, t: x[:1], SCHED, x_T(), num_steps=3)
    with pytest.raises(ValueError, match="noise must have shape"):
        lms_sample(model, SCHED, x_T(), num_steps=3, noise=jnp.zeros((2, 2, 4, 4, 3)))
    with pytest.raises(ValueError, match="strength"):
        lms_sample(model, SCHED, x_T(), num_steps=3, strength=0.2)
    x = x_T()
    with pytest.raises(ValueError, match="coefficients must be \\[order\\]"):
        lms_step(x, x, lms_init(x, 4), 1.0, jnp.ones(3))
    with pytest.raises(ValueError, match="model_output must have x's shape"):
        lms_step(x[:1], x, lms_init(x, 2), 1.0, jnp.ones(2))
    with pytest.raises(ValueError, match="order"):
        lms_init(x, 0)
    zero_snr = make_schedule("linear", 1000, rescale_to_zero_terminal_snr=True)
    with pytest.raises(ValueError, match="infinite"):
        lms_timesteps(zero_snr, 10)


@pytest.mark.parametrize("spacing, offset", [("linspace", 0), ("leading", 1), ("trailing", 0)])
@pytest.mark.parametrize("sigma_schedule", ["discrete", "karras", "exponential", "beta"])
def test_grid_properties(spacing, offset, sigma_schedule):
    n, T = 9, SCHED.num_timesteps
    grid = lms_timesteps(SCHED, n, spacing=spacing, steps_offset=offset,
                         sigma_schedule=sigma_schedule)
    ts, sig = grid.timesteps, grid.sigmas
    assert ts.dtype == sig.dtype == np.float32 and ts.shape == (n,) and sig.shape == (n + 1,)
    assert (np.diff(ts) < 0).all() and ts[-1] >= 0 and ts[0] <= T - 1
    assert (np.diff(sig) < 0).all() and sig[-1] == 0.0 and (sig[:-1] > 0).all()
    # each sigma is the training sigma interpolated at its (fractional) timestep
    train = train_sigmas(SCHED)
    np.testing.assert_allclose(np.interp(ts, np.arange(T), train), sig[:-1], rtol=2e-3)
    if sigma_schedule == "discrete":
        np.testing.assert_allclose(np.interp(ts, np.arange(T), train), sig[:-1], rtol=4 * EPS)
    else:  # the range of the discrete grid, respaced
        plain = lms_timesteps(SCHED, n, spacing=spacing, steps_offset=offset)
        np.testing.assert_allclose([sig[0], sig[-2]], [plain.sigmas[0], plain.sigmas[-2]],
                                   rtol=4 * EPS)


def test_coefficients_integrate_polynomials_exactly():
    """Row i of order q integrates every polynomial of degree < q through the nodes sigma_i, ...,
    sigma_{i-q+1} exactly over [sigma_i, sigma_{i+1}]: checked against the antiderivative of
    random polynomials, to float64 rounding."""
    rng = np.random.default_rng(0)
    sigmas = np.concatenate([np.sort(rng.uniform(0.02, 15.0, 9))[::-1], [0.0]])
    for order in (1, 2, 4, 6):
        c = lms_coefficients(sigmas, order)
        assert c.shape == (9, order) and c.dtype == np.float64
        for i in range(9):
            q = min(i + 1, order)
            assert (c[i, q:] == 0).all()
            nodes = sigmas[i - np.arange(q)]
            for degree in range(q):
                p = np.polynomial.Polynomial(rng.standard_normal(degree + 1))
                want = p.integ()(sigmas[i + 1]) - p.integ()(sigmas[i])
                got = float(np.dot(c[i, :q], p(nodes)))
                assert abs(got - want) <= 1e-12 * max(1.0, np.abs(c[i]).sum() *
                                                      np.abs(p(nodes)).max()), (order, i, degree)
    # order 1 is Euler's step; a constant derivative moves by exactly sigma_{i+1} - sigma_i
    np.testing.assert_array_equal(lms_coefficients(sigmas, 1)[:, 0], np.diff(sigmas))
    with pytest.raises(ValueError, match="sigmas must be finite and strictly decreasing"):
        lms_coefficients(np.array([1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="sigmas must be finite"):
        lms_coefficients(np.array([np.inf, 1.0, 0.0]))
    with pytest.raises(ValueError, match="sigmas must be a 1-D grid"):
        lms_coefficients(np.array([1.0]))
    with pytest.raises(ValueError, match="order"):
        lms_coefficients(sigmas, 0)


def test_bf16_model_keeps_a_float32_carry():
    """The model's bf16 output is widened before the step: the same trajectory as a float32 model
    returning the same (bf16-representable) values, and a float32 result."""
    x = x_T()

    def bf16_model(x, t):
        return model(x, t).astype(jnp.bfloat16)

    def widened(x, t):
        return bf16_model(x, t).astype(jnp.float32)

    run = jax.jit(lambda f, x: lms_sample(f, SCHED, x, num_steps=6, return_trajectory=True),
                  static_argnums=0)
    out, xs, x0s = run(bf16_model, x.astype(jnp.bfloat16))  # a bf16 x_T is widened too
    want, want_xs, _ = run(widened, x.astype(jnp.bfloat16).astype(jnp.float32))
    assert out.dtype == xs.dtype == x0s.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(xs), np.asarray(want_xs))
    # and not a bf16 carry: a float32 model on the same x_T differs by bf16's rounding only
    plain = run(model, x.astype(jnp.bfloat16).astype(jnp.float32))[0]
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain), atol=0.05)


@pytest.mark.parametrize("strength, order, pred", [(1.0, 4, "eps"), (0.7, 4, "v"),
                                                   (1.0, 3, "x0")])
def test_step_driven_by_hand_equals_the_scan(strength, order, pred):
    """lms_timesteps + lms_coefficients + lms_init + lms_step in a Python loop (each step jitted
    on its own) give the scan's trajectory; image-to-image starts with an empty history."""
    n, x = 7, x_T()
    spacing = "leading"
    grid = lms_timesteps(SCHED, n, spacing=spacing, steps_offset=1)
    c = lms_coefficients(grid.sigmas, order)
    start = strength_start_step(n, strength)
    if start == 0:
        start_x = x
        xs_hand = [x * init_noise_sigma(grid, spacing)]
    else:
        start_x = noise_to_img2img(get_sampler("lms", spacing=spacing, steps_offset=1,
                                               order=order, prediction_type=pred),
                                   SCHED, n, x, x_T(seed=1), strength)
        xs_hand = [start_x]
    step = jax.jit(lambda out, x, st, s, cc: lms_step(out, x, st, s, cc, prediction_type=pred))
    state = lms_init(xs_hand[0], order)
    assert isinstance(state, LMSState) and state.derivatives.shape == (order - 1, *x.shape)
    for i in range(start, n):
        cur = xs_hand[-1]
        out = model(scale_model_input(cur, grid.sigmas[i]),
                    jnp.full((x.shape[0],), grid.timesteps[i]))
        state, nxt, _ = step(out, cur, state, grid.sigmas[i], c[i])
        xs_hand.append(nxt)
    _, xs, _ = jax.jit(lambda x: lms_sample(
        model, SCHED, x, num_steps=n, spacing=spacing, steps_offset=1, order=order,
        prediction_type=pred, strength=strength, return_trajectory=True))(start_x)
    assert xs.shape[0] == n - start + 1
    scale = max(1.0, float(np.abs(np.asarray(xs_hand[0])).max()))
    np.testing.assert_allclose(np.asarray(xs), np.stack([np.asarray(v) for v in xs_hand]),
                               rtol=0, atol=16 * EPS * scale * (n - start))


def test_order_one_is_euler_and_one_step_is_the_predicted_x0():
    x = x_T()
    for spacing, sigma_schedule in (("linspace", "discrete"), ("trailing", "karras")):
        kw = dict(num_steps=8, spacing=spacing, sigma_schedule=sigma_schedule)
        _, lms, _ = lms_sample(model, SCHED, x, order=1, return_trajectory=True, **kw)
        _, euler, _ = euler_sample(model, SCHED, x, return_trajectory=True, **kw)
        # the same arithmetic (c = sigma_{i+1} - sigma_i rounds as Euler's float32 difference):
        # a few roundings of the largest sample per step
        scale = float(np.abs(np.asarray(euler)).max())
        np.testing.assert_allclose(np.asarray(lms), np.asarray(euler), rtol=0,
                                   atol=4 * EPS * scale * 8)
    # one step goes to sigma 0: x_0 is the step's predicted x0 (any order)
    out, xs, x0s = lms_sample(model, SCHED, x, num_steps=1, return_trajectory=True)
    np.testing.assert_allclose(np.asarray(out), np.asarray(x0s[0]), rtol=0,
                               atol=4 * EPS * float(np.abs(np.asarray(xs[0])).max()))


def test_jitted_sampler_compiles_once_per_configuration():
    traces = []

    def counted(x, t):
        traces.append(1)
        return model(x, t)

    run = jax.jit(lambda x: lms_sample(counted, SCHED, x, num_steps=5))
    a, b = run(x_T(seed=0)), run(x_T(seed=1))
    assert len(traces) == 1 and not np.array_equal(np.asarray(a), np.asarray(b))


def test_registry_and_command_line_name(tmp_path):
    assert "lms" in sampler_names()
    spec = sampler_spec("lms")
    assert spec.diffusers.class_name == "LMSDiscreteScheduler"
    assert spec.noise_space == "sigma_ve" and spec.img2img == "tail"
    assert sampler_options("lms") == ("order", "prediction_type", "sigma_schedule", "spacing",
                                      "steps_offset")
    s = get_sampler("lms", order=2, sigma_schedule="karras")
    assert not s.stochastic and s.model_evaluations(SCHED, 6) == 6
    np.testing.assert_array_equal(
        np.asarray(s(model, SCHED, x_T(), num_steps=5)),
        np.asarray(lms_sample(model, SCHED, x_T(), num_steps=5, order=2,
                              sigma_schedule="karras")))
    # --sampler lms passes the flag parsers (the runs then fail on the empty folders)
    with pytest.raises(ConfigError, match="config.json not found"):
        sample_cli.main(["--workdir", str(tmp_path), "--sampler", "lms"])
    with pytest.raises(ConfigError) as info:
        t2i_cli.main(["--model", str(tmp_path / "none"), "--prompt", "a cat", "--sampler",
                      "lms", "--option", "order=3", "--out", str(tmp_path / "x.png")])
    assert "--sampler" not in str(info.value) and "--option" not in str(info.value)
