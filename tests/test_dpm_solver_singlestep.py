"""Singlestep DPM-Solver(++): the orders and the grid, bad options named, the step driven by hand
equals the scan (image-to-image included), the first order is the multistep solver's first
order, accuracy on an exactly solvable flow, bf16 models with a float32 carry, the SDE's noise,
gradients, and the registry / command-line / scheduler-config entry points. Parity with diffusers:
tests/parity/test_dpm_solver_singlestep_parity.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import sample as sample_cli
from experiments.cli import ConfigError
from jaxdiff.convert import sampler_from_diffusers_config, scheduler_to_diffusers
from jaxdiff.samplers import (
    DPMSolverSinglestepState,
    dpm_solver_sample,
    dpm_solver_singlestep_init,
    dpm_solver_singlestep_orders,
    dpm_solver_singlestep_sample,
    dpm_solver_singlestep_step,
    dpm_solver_singlestep_timesteps,
    get_sampler,
    sampler_names,
    sampler_options,
    strength_start_step,
)
from jaxdiff.schedules import make_schedule
from tests.test_dpm_solver import gaussian_oracle

SCHED = make_schedule("linear", 1000)
CLASS = "DPMSolverSinglestepScheduler"


def denoiser(prediction_type="eps"):
    """Nearly the exact denoiser of data N(0, 0.25 I) (every value O(1)), perturbed by a smooth
    nonlinear term, as ``prediction_type``."""

    def model_fn(x, t):
        shape = (-1,) + (1,) * (x.ndim - 1)
        abar = SCHED.alphas_cumprod[t].reshape(shape)
        a, s = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
        wobble = jnp.cos(t.reshape(shape) / 300.0)
        x0 = a * 0.25 * x / (abar * 0.25 + 1.0 - abar) + 0.05 * jnp.tanh(x) * wobble
        eps = (x - a * x0) / s
        return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[prediction_type]

    return model_fn


model = denoiser()


def normal(seed, shape):
    """Standard normal float32 from numpy (jax.random's first compile costs seconds here)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def x_T(shape=(2, 3, 4)):
    return normal(0, shape)


def _max_diff(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.mark.parametrize("n,order,lower,final,want", [
    (7, 3, False, "zero", [1, 2, 3, 1, 2, 3, 1]),  # 7 % 3 = 1: lower_order_final forced on
    (6, 3, False, "zero", [1, 2, 3, 1, 2, 1]),  # "zero" forces it on; its last step order 1
    (6, 3, False, "sigma_min", [1, 2, 3, 1, 2, 3]),  # honoured: whole groups
    (6, 3, True, "sigma_min", [1, 2, 3, 1, 2, 1]),
    (8, 3, True, "sigma_min", [1, 2, 3, 1, 2, 3, 1, 2]),
    (4, 2, False, "zero", [1, 2, 1, 1]),
    (4, 2, False, "sigma_min", [1, 2, 1, 2]),
    (5, 2, False, "sigma_min", [1, 2, 1, 2, 1]),  # 5 % 2 = 1: forced on
    (3, 1, False, "sigma_min", [1, 1, 1]),
    (1, 3, False, "sigma_min", [1]),
    (2, 3, True, "sigma_min", [1, 2]),
])
def test_orders_are_diffusers_order_lists(n, order, lower, final, want):
    assert dpm_solver_singlestep_orders(n, order, lower, final).tolist() == want


@pytest.mark.parametrize("options", [
    dict(), dict(solver_order=3, sigma_schedule="karras"),
    dict(sigma_schedule="exponential", final_sigmas_type="sigma_min"),
    dict(sigma_schedule="beta", lambda_min_clipped=-2.0),
])
def test_grid_properties(options):
    """``N`` decreasing timesteps in ``[0, T)`` (strictly for the discrete grid), decreasing
    sigmas ``[N + 1]`` ending in 0 or sigma_0, the orders; ``lambda_min_clipped`` starts the
    discrete grid lower."""
    n = 9
    grid = dpm_solver_singlestep_timesteps(SCHED, n, **options)
    ts, sig = grid.timesteps, grid.sigmas
    assert ts.dtype == grid.orders.dtype == np.int32 and sig.dtype == np.float32
    assert ts.shape == (n,) and sig.shape == (n + 1,)
    assert 0 <= ts.min() and ts.max() < 1000 and np.all(np.diff(ts) <= 0)
    # the sigma schedules end at sigma_0, so "sigma_min" repeats it (the last step stays put)
    assert np.all(np.diff(sig[:-1]) < 0) and sig[-1] <= sig[-2]
    assert grid.prev_timesteps.tolist() == ts[1:].tolist() + [-1]
    sigma_0 = math.sqrt((1 - float(SCHED.alphas_cumprod[0])) / float(SCHED.alphas_cumprod[0]))
    want_last = 0.0 if options.get("final_sigmas_type", "zero") == "zero" else sigma_0
    np.testing.assert_allclose(sig[-1], want_last, rtol=1e-6)
    assert grid.orders.tolist() == dpm_solver_singlestep_orders(
        n, options.get("solver_order", 2), False,
        options.get("final_sigmas_type", "zero")).tolist()
    if options.get("sigma_schedule", "discrete") == "discrete":
        assert ts[0] == 999 and np.all(np.diff(ts) < 0)
    clipped = dpm_solver_singlestep_timesteps(SCHED, n, lambda_min_clipped=-2.0)
    assert clipped.timesteps[0] < 999 and clipped.sigmas[0] < grid.sigmas[0] + 1e-6


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_steps=0), "num_steps"),
    (dict(num_steps=1000), "num_steps"),  # linspace rounding repeats timesteps: h = 0, NaN
    (dict(solver_order=4), "solver_order"),
    (dict(solver_order=2.0), "solver_order"),
    (dict(solver_type="bh2"), "solver_type"),
    (dict(algorithm_type="sde-dpmsolver"), "algorithm_type"),  # multistep only
    (dict(algorithm_type="dpmsolver"), "final_sigmas_type='zero' is not supported"),
    (dict(sigma_schedule="lu"), "sigma_schedule"),  # DPMSolverMultistepScheduler's only
    (dict(final_sigmas_type="one"), "final_sigmas_type"),
    (dict(lower_order_final="yes"), "lower_order_final"),
    (dict(lambda_min_clipped=10.0), "lambda_min_clipped"),
    (dict(prediction_type="score"), "prediction_type"),
    (dict(clip_x0=0.0), "clip_x0"),
    (dict(strength=0.05), "strength"),
])
def test_bad_options_name_the_argument(kwargs, match):
    kwargs = {"num_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        dpm_solver_singlestep_sample(model, SCHED, x_T(), **kwargs)
    options = {k: v for k, v in kwargs.items() if k not in ("num_steps", "strength")}
    if options:  # the registry refuses them when they are bound
        with pytest.raises(ValueError, match=match):
            get_sampler("dpm_solver_singlestep", **options).check(SCHED, kwargs["num_steps"])


def test_step_rejects_bad_orders_noise_and_shapes():
    x = x_T()
    three, five = dpm_solver_singlestep_init(x, 1.0, solver_order=2), dpm_solver_singlestep_init(
        x, 1.0)
    assert isinstance(three, DPMSolverSinglestepState) and three.older_m is None
    assert five.older_m.shape == x.shape
    with pytest.raises(ValueError, match="order must be 1 or 2 \\(a three-field state\\)"):
        dpm_solver_singlestep_step(three, x, x, 1.0, 0.5, order=3)
    with pytest.raises(ValueError, match="order must be 1 or 2 or 3"):
        dpm_solver_singlestep_step(five, x, x, 1.0, 0.5, order=0)
    with pytest.raises(ValueError, match="noise is required"):
        dpm_solver_singlestep_step(five, x, x, 1.0, 0.5, order=1,
                                   algorithm_type="sde-dpmsolver++")
    with pytest.raises(ValueError, match="model_output must have"):
        dpm_solver_singlestep_step(five, x[:1], x, 1.0, 0.5, order=1)
    with pytest.raises(ValueError, match="model_fn's output"):
        dpm_solver_singlestep_sample(lambda x, t: x[:1], SCHED, x, num_steps=4)
    with pytest.raises(ValueError, match="solver_order"):
        dpm_solver_singlestep_init(x, 1.0, solver_order=4)


@pytest.mark.parametrize("options,strength", [
    (dict(solver_order=3, solver_type="heun", sigma_schedule="karras"), 1.0),
    (dict(solver_order=3, prediction_type="v"), 0.6),  # starts on a group's second step
    (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", prediction_type="x0",
          clip_x0=1.0), 1.0),
    (dict(algorithm_type="sde-dpmsolver++"), 0.7),
])
def test_step_driven_by_hand_equals_the_scan(options, strength):
    """The step function with its explicit state, in a Python loop, with the orders of the grid
    lowered where image-to-image starts mid-group, is the jitted sampler."""
    n = 10
    grid_keys = ("solver_order", "final_sigmas_type", "sigma_schedule")
    grid = dpm_solver_singlestep_timesteps(SCHED, n, **{k: v for k, v in options.items()
                                                        if k in grid_keys})
    start = strength_start_step(n, strength)
    orders = [min(int(grid.orders[i]), i - start + 1) for i in range(n)]
    sde = options.get("algorithm_type") == "sde-dpmsolver++"
    noise = normal(5, (n - start, *x_T().shape))
    step_kw = {k: v for k, v in options.items() if k not in grid_keys}
    x = x_T()
    state = dpm_solver_singlestep_init(x, grid.sigmas[start],
                                       solver_order=options.get("solver_order", 2))
    step = jax.jit(dpm_solver_singlestep_step, static_argnames=list(step_kw))
    xs, x0s = [x], []
    model_fn = denoiser({"x0": "x0", "v": "v"}.get(options.get("prediction_type"), "eps"))
    for i in range(start, n):
        out = model_fn(x, jnp.full((x.shape[0],), grid.timesteps[i], jnp.int32))
        state, x, x0 = step(state, out, x, grid.sigmas[i], grid.sigmas[i + 1], order=orders[i],
                            noise=noise[i - start] if sde else None, **step_kw)
        xs.append(x)
        x0s.append(x0)
    _, want, want_x0s = jax.jit(lambda x, z: dpm_solver_singlestep_sample(
        model_fn, SCHED, x, None, num_steps=n, noise=z, return_trajectory=True,
        strength=strength, **options))(x_T(), noise)
    assert want.shape == (n - start + 1, *x_T().shape)
    # float32 rounding (jitted step vs scan), amplified by alpha_t / alpha_s <= 160 (module
    # docstring of the parity test) where an eps is converted
    assert _max_diff(np.stack(xs), want) <= 2e-5
    assert _max_diff(np.stack(x0s), want_x0s) <= 2e-5 / float(np.sqrt(SCHED.alphas_cumprod[-1]))
    if strength < 1 and options.get("solver_order") == 3:
        assert grid.orders[start:start + 3].tolist() == [2, 3, 1]
        assert orders[start:start + 3] == [1, 2, 1]


@pytest.mark.parametrize("options", [dict(), dict(algorithm_type="dpmsolver",
                                                  final_sigmas_type="sigma_min"),
                                     dict(algorithm_type="sde-dpmsolver++",
                                          sigma_schedule="karras")])
def test_first_order_is_the_multistep_first_order(options):
    """``solver_order=1`` is DDIM on both DPM-Solvers (same grid, the same update)."""
    n = 6
    noise = normal(3, (n, *x_T().shape))
    single = dpm_solver_singlestep_sample(model, SCHED, x_T(), num_steps=n, solver_order=1,
                                          noise=noise, **options)
    multi = dpm_solver_sample(model, SCHED, x_T(), num_steps=n, solver_order=1, noise=noise,
                              **options)
    assert _max_diff(single, multi) <= 1e-6


@pytest.mark.slow
def test_higher_orders_are_more_accurate_on_an_exactly_solvable_flow():
    """Data N(0, 0.25 I): the exact eps model's probability-flow ODE has a closed-form solution
    (tests/test_dpm_solver.py). At 48 steps DPM-Solver++(2S) is over 10x closer to it than DDIM,
    third-order heun over 2x (diffusers' singlestep solver uses the grid's points as the
    intermediate times: its third-order midpoint form, exact for r = 2/3 only, is not better)."""
    x = normal(1, (4, 8))
    scale, n = 0.5, 48

    def std(abar):
        return np.sqrt(abar * scale**2 + 1 - abar)

    exact = np.asarray(x) * std(float(SCHED.alphas_cumprod[0])) / std(
        float(SCHED.alphas_cumprod[999]))

    def err(**options):
        out = dpm_solver_singlestep_sample(gaussian_oracle(scale), SCHED, x, num_steps=n,
                                           final_sigmas_type="sigma_min", **options)
        return float(np.abs(np.asarray(out) - exact).max())

    first = err(solver_order=1)
    assert 0.02 < first < 0.2
    assert err(solver_order=2) < first / 10
    assert err(solver_order=3, solver_type="heun") < first / 2


def test_bf16_model_and_x_T_keep_a_float32_carry():
    """A bf16 x_T and bf16 model outputs: the carry and the state stay float32 (the reference
    runs in float32 on the same bf16-rounded values; a bf16 carry would add 4e-3 relative
    rounding at every step)."""
    xb = x_T().astype(jnp.bfloat16)
    options = dict(solver_order=3, sigma_schedule="karras")
    out16, xs, x0s = dpm_solver_singlestep_sample(
        lambda x, t: model(x, t).astype(jnp.bfloat16), SCHED, xb, num_steps=8,
        return_trajectory=True, **options)
    out32 = dpm_solver_singlestep_sample(
        lambda x, t: model(x, t).astype(jnp.bfloat16).astype(jnp.float32), SCHED,
        xb.astype(jnp.float32), num_steps=8, **options)
    assert out16.dtype == xs.dtype == x0s.dtype == jnp.float32
    assert _max_diff(out16, out32) <= 1e-5


def test_sde_needs_key_or_noise_the_ode_neither():
    """Step i's noise is the shared driver's ``normal(fold_in(key, i))`` (tested through the
    multistep solver: tests/test_dpm_solver.py), or ``noise[i]``; the ODE takes neither."""
    with pytest.raises(ValueError, match="key is required"):
        dpm_solver_singlestep_sample(model, SCHED, x_T(), num_steps=4,
                                     algorithm_type="sde-dpmsolver++")
    with pytest.raises(ValueError, match="noise must have shape"):
        dpm_solver_singlestep_sample(model, SCHED, x_T(), num_steps=4,
                                     noise=jnp.zeros((3, *x_T().shape)))


@pytest.mark.parametrize("options", [
    dict(num_steps=9, solver_order=3, solver_type="heun"),  # last step to sigma 0: h = inf
    dict(num_steps=6, solver_order=3, sigma_schedule="karras", final_sigmas_type="sigma_min"),
])
def test_gradients_through_the_sampler_are_finite(options):
    """The branches jnp.where does not take (orders 2 / 3 on a group's first step, h = inf on
    the last) are kept finite, so gradients are not NaN."""
    g = jax.grad(lambda x: dpm_solver_singlestep_sample(
        lambda x, t: 0.3 * jnp.tanh(x), SCHED, x, **options).sum())(jnp.ones((2, 3)))
    assert np.isfinite(np.asarray(g)).all()


def test_registry_and_command_line_name(tmp_path):
    assert "dpm_solver_singlestep" in sampler_names()
    assert sampler_options("dpm_solver_singlestep") == (
        "algorithm_type", "clip_x0", "final_sigmas_type", "lambda_min_clipped",
        "lower_order_final", "prediction_type", "sigma_schedule", "solver_order", "solver_type")
    assert get_sampler("dpm_solver_singlestep").stochastic is False
    assert get_sampler("dpm_solver_singlestep",
                       algorithm_type="sde-dpmsolver++").stochastic is True
    # --sampler accepts the name (the run then fails for the empty workdir), and its options
    with pytest.raises(ConfigError, match="config.json not found"):
        sample_cli.main(["--workdir", str(tmp_path), "--sampler", "dpm_solver_singlestep",
                         "--option", "solver_order=3"])


def test_scheduler_config_import_and_export():
    """diffusers' config names and aliases map onto the options; what jaxdiff does not implement
    (or diffusers ignores for this class) is refused, naming the key; the export round-trips
    and refuses what the class cannot express."""
    sampler = sampler_from_diffusers_config(dict(
        _class_name=CLASS, solver_order=3, algorithm_type="deis", solver_type="logrho",
        prediction_type="v_prediction", use_karras_sigmas=True, final_sigmas_type="sigma_min",
        lower_order_final=False, lambda_min_clipped=-5.1))
    assert sampler.name == "dpm_solver_singlestep"
    assert sampler.options == dict(
        solver_order=3, algorithm_type="dpmsolver++", solver_type="midpoint",
        prediction_type="v", sigma_schedule="karras", final_sigmas_type="sigma_min",
        lower_order_final=False, lambda_min_clipped=-5.1)
    assert sampler_from_diffusers_config({"_class_name": CLASS}).effective_options == \
        get_sampler("dpm_solver_singlestep").effective_options
    for config, match in [
        (dict(thresholding=True), "'thresholding'"),
        (dict(use_flow_sigmas=True), "'use_flow_sigmas'"),
        (dict(prediction_type="flow_prediction"), "'prediction_type'"),
        (dict(variance_type="learned_range"), "'variance_type'"),
        (dict(use_dynamic_shifting=True), "'use_dynamic_shifting'"),
        (dict(no_such_key=1), "'no_such_key'.*would be dropped"),
        (dict(use_karras_sigmas=True, use_beta_sigmas=True), "use_karras_sigmas, use_beta"),
        (dict(algorithm_type="sde-dpmsolver"), "algorithm_type"),
        (dict(algorithm_type="dpmsolver"), "final_sigmas_type='zero' is not supported"),
    ]:
        with pytest.raises(ValueError, match=match):
            sampler_from_diffusers_config({"_class_name": CLASS, **config})
    s = get_sampler("dpm_solver_singlestep", solver_order=3, sigma_schedule="exponential",
                    algorithm_type="sde-dpmsolver++", lower_order_final=True)
    config = scheduler_to_diffusers(s, "cosine", 1000)
    assert config["_class_name"] == CLASS and config["use_exponential_sigmas"] is True
    assert "use_lu_lambdas" not in config and "timestep_spacing" not in config
    assert sampler_from_diffusers_config(config).effective_options == s.effective_options
    with pytest.raises(ValueError, match="cannot express clip_x0=1.0"):
        scheduler_to_diffusers(get_sampler("dpm_solver_singlestep", clip_x0=1.0))
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        scheduler_to_diffusers(s, "linear", 1000, rescale_to_zero_terminal_snr=True)
