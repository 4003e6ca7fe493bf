"""The sampler contract: the registry, the shared scan driver, the DPM-Solver step function, and
the argument checks every sampler shares (jaxdiff.samplers' module docstring). The specs
themselves (declared options = the sample functions' keywords, a toy sampler added through one
spec) are tested in test_sampler_spec.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.diffusion import q_sample, x0_and_eps
from jaxdiff.samplers import (
    DPMSolverState,
    Grid,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    ddpm_sample,
    ddpm_timesteps,
    dpm_solver_init,
    dpm_solver_sample,
    dpm_solver_step,
    dpm_solver_timesteps,
    get_sampler,
    register_sampler,
    sampler_names,
    sampler_options,
    sampler_spec,
    unregister_sampler,
)
from jaxdiff.schedules import make_schedule
from jaxdiff.validation import check_array, check_bool, check_float, check_int

SCHED = make_schedule("cosine", 100)
SHAPE = (3, 4, 4, 2)


def model(x, t):
    return 0.3 * jnp.tanh(x) + 0.01 * t[:, None, None, None].astype(x.dtype) / 100.0


def x_T():
    return jax.random.normal(jax.random.key(0), SHAPE)


@pytest.mark.slow
@pytest.mark.parametrize("name, direct, options", [
    ("ddim", ddim_sample, dict(eta=0.5, clip_x0=1.0, use_clipped_model_output=True)),
    ("ddpm", ddpm_sample, dict(variance_type="fixed_large")),
    ("dpm_solver", dpm_solver_sample, dict(solver_type="heun", prediction_type="v")),
])
def test_registry_calls_the_sampler_with_its_options(name, direct, options):
    key = jax.random.key(3)
    s = get_sampler(name, **options)
    got = s(model, SCHED, x_T(), key, num_steps=8)
    want = direct(model, SCHED, x_T(), key, num_steps=8, **options)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # The options matter (the registry does not drop them).
    plain = get_sampler(name)(model, SCHED, x_T(), key, num_steps=8)
    assert np.abs(np.asarray(plain) - np.asarray(got)).max() > 1e-4


def test_registry_stochastic_flag_and_names():
    assert set(sampler_names()) >= {"ddim", "ddpm", "dpm_solver"}
    assert get_sampler("ddim").stochastic is False
    assert get_sampler("ddim", eta=0.3).stochastic is True
    assert get_sampler("ddpm").stochastic is True
    assert get_sampler("dpm_solver").stochastic is False
    assert "eta" in sampler_options("ddim") and "eta" not in sampler_options("ddpm")
    assert "solver_order" in sampler_options("dpm_solver")
    for name in sampler_names():
        for call_arg in ("model_fn", "num_steps", "noise", "key"):
            assert call_arg not in sampler_options(name)


@pytest.mark.parametrize("name, options, match", [
    ("euler_typo", {}, "sampler must be one of"),
    ("ddpm", dict(eta=0.5), "does not take option 'eta'"),
    ("ddim", dict(eta=-0.1), "eta"),
    ("ddim", dict(eta=1.5), "eta"),
    ("ddim", dict(clip_x0=0.0), "clip_x0"),
    ("ddim", dict(spacing="middle"), "spacing"),
    ("ddpm", dict(variance_type="small"), "variance_type"),
    ("ddpm", dict(final_noise="False"), "final_noise"),
    ("dpm_solver", dict(solver_order=4), "solver_order"),
    ("dpm_solver", dict(solver_type="rk4"), "solver_type"),
    ("dpm_solver", dict(prediction_type="score"), "prediction_type"),
])
def test_get_sampler_rejects_bad_names_options_and_values(name, options, match):
    with pytest.raises(ValueError, match=match):
        get_sampler(name, **options)


@pytest.mark.slow
def test_sampler_check_rejects_grids_before_any_compute():
    with pytest.raises(ValueError, match="num_steps must be <= num_timesteps"):
        get_sampler("ddim").check(100, 101)
    with pytest.raises(ValueError, match="num_steps"):
        get_sampler("ddpm").check(100, 0)
    with pytest.raises(ValueError, match="repeats timesteps"):
        get_sampler("dpm_solver").check(100, 100)  # linspace needs num_steps <= T - 1
    get_sampler("dpm_solver", spacing="trailing").check(SCHED, 100)  # fine on the real schedule
    with pytest.raises(ValueError, match="options are bound"):
        get_sampler("ddim")(model, SCHED, x_T(), None, num_steps=5, eta=0.5)


@pytest.mark.slow
def test_ddim_eta_above_one_raises_instead_of_nan():
    """eta > 1 makes ``1 - abar_prev - std^2`` negative: diffusers (and jaxdiff before) returned
    all-NaN samples without an error."""
    with pytest.raises(ValueError, match=r"eta must be <= 1"):
        ddim_sample(model, SCHED, x_T(), jax.random.key(0), num_steps=10, eta=1.5)
    x = x_T()
    with pytest.raises(ValueError, match=r"eta must be <= 1"):
        ddim_step(SCHED, x, x, 50, 40, x, eta=1.5, prediction_type="eps", clip_x0=None,
                  set_alpha_to_one=True)
    out = ddim_sample(model, SCHED, x, jax.random.key(0), num_steps=10, eta=1.0)
    assert np.isfinite(np.asarray(out)).all()


def test_grids_share_one_shape():
    for grid in (ddim_timesteps(SCHED, 10), ddpm_timesteps(SCHED, 10),
                 dpm_solver_timesteps(SCHED, 10)):
        assert isinstance(grid, Grid)
        assert grid.timesteps.shape == grid.prev_timesteps.shape == (10,)
        assert grid.sigmas.shape == (11,) and grid.sigmas[-1] == 0.0
        assert grid.timesteps.dtype == np.int32 and grid.sigmas.dtype == np.float32
        acp = np.asarray(SCHED.alphas_cumprod, np.float64)[grid.timesteps]
        np.testing.assert_allclose(grid.sigmas[:-1], np.sqrt((1 - acp) / acp), rtol=1e-6)
        assert grid.prev_timesteps[-1] < 0


@pytest.mark.slow
def test_dpm_solver_step_driven_by_hand_equals_the_scan():
    """The step function with its explicit history, in a Python loop, is the sampler."""
    n = 7
    grid = dpm_solver_timesteps(SCHED, n)
    x = x_T()
    state = dpm_solver_init(x, grid.sigmas[0])
    assert isinstance(state, DPMSolverState)
    pred_x0s = []
    for i in range(n):
        out = model(x, jnp.full((SHAPE[0],), grid.timesteps[i], jnp.int32))
        first = i == 0 or i == n - 1  # lower_order_final with n < 15; final sigma 0
        state, x, x0 = dpm_solver_step(state, out, x, grid.sigmas[i], grid.sigmas[i + 1],
                                       first_order=first)
        pred_x0s.append(x0)
    want, _, want_x0s = dpm_solver_sample(model, SCHED, x_T(), None, num_steps=n,
                                          return_trajectory=True)
    np.testing.assert_allclose(np.asarray(x), np.asarray(want), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.stack(pred_x0s), np.asarray(want_x0s), atol=1e-5,
                               rtol=1e-5)
    # The history matters: without it (first order everywhere) the result differs.
    ddim_like = dpm_solver_sample(model, SCHED, x_T(), None, num_steps=n, solver_order=1)
    assert np.abs(np.asarray(ddim_like) - np.asarray(want)).max() > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpm_solver"])
def test_driver_checks_are_the_same_for_every_sampler(name):
    s = get_sampler(name, **({"eta": 1.0} if name == "ddim" else {}))
    with pytest.raises(ValueError, match="x_T must be a batch"):
        s(model, SCHED, jnp.float32(1.0), jax.random.key(0), num_steps=5)
    with pytest.raises(ValueError, match="x_T must be a floating-point"):
        s(model, SCHED, jnp.ones(SHAPE, jnp.int32), jax.random.key(0), num_steps=5)
    with pytest.raises(ValueError, match="model_fn's output must have shape"):
        s(lambda x, t: x[..., :1], SCHED, x_T(), jax.random.key(0), num_steps=5)
    if s.stochastic:
        with pytest.raises(ValueError, match="key is required"):
            s(model, SCHED, x_T(), None, num_steps=5)
        with pytest.raises(ValueError, match=r"noise must have shape"):
            s(model, SCHED, x_T(), None, num_steps=5, noise=jnp.zeros((4, *SHAPE)))
    # bf16 x_T: the carry (and so the output) is float32.
    out = s(model, SCHED, x_T().astype(jnp.bfloat16), jax.random.key(0), num_steps=5)
    assert out.dtype == jnp.float32


@pytest.mark.slow
def test_stochastic_samplers_fold_the_key_per_step():
    """Pre-drawn noise ``noise[i] = normal(fold_in(key, i))`` reproduces the key path exactly."""
    key, n = jax.random.key(7), 6
    noise = jnp.stack([jax.random.normal(jax.random.fold_in(key, i), SHAPE) for i in range(n)])
    for name, opts in (("ddpm", {}), ("ddim", {"eta": 0.7})):
        s = get_sampler(name, **opts)
        a = s(model, SCHED, x_T(), key, num_steps=n)
        b = s(model, SCHED, x_T(), None, num_steps=n, noise=noise)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_x0_and_eps_inverts_the_forward_process():
    x0 = jax.random.normal(jax.random.key(1), SHAPE)
    eps = jax.random.normal(jax.random.key(2), SHAPE)
    a = jnp.float32(0.6)
    s = jnp.sqrt(1 - a**2)
    x_t = a * x0 + s * eps
    v = a * eps - s * x0
    for kind, out in (("eps", eps), ("x0", x0), ("v", v), ("v_prediction", v)):
        got_x0, got_eps = x0_and_eps(out, x_t, a, s, kind)
        np.testing.assert_allclose(got_x0, x0, atol=1e-5)
        np.testing.assert_allclose(got_eps, eps, atol=1e-5)


def test_validation_rejects_lookalikes():
    with pytest.raises(ValueError, match="flag must be a bool"):
        check_bool("flag", "False")  # truthy string
    with pytest.raises(ValueError, match="flag must be a bool"):
        check_bool("flag", 1)
    assert check_bool("flag", np.bool_(False)) is False
    with pytest.raises(ValueError, match="scale must be a concrete real number"):
        check_float("scale", "1.0")
    with pytest.raises(ValueError, match="scale must be finite"):
        check_float("scale", float("nan"))
    with pytest.raises(ValueError, match="scale must be > 0"):
        check_float("scale", 0.0, minimum=0.0, exclusive_minimum=True)
    with pytest.raises(ValueError, match="n must be an int"):
        check_int("n", 3.0)
    with pytest.raises(ValueError, match="n must be <= 4"):
        check_int("n", 5, 0, 4)
    with pytest.raises(ValueError, match="x must be an array"):
        check_array("x", "abc")
    with pytest.raises(ValueError, match="x must be"):
        check_array("x", [[1.0], [1.0, 2.0]])


def test_forward_process_accepts_lists():
    """``q_sample`` on nested lists used to raise ``AttributeError`` ('list' has no 'shape')."""
    x0 = [[0.5, -0.5], [1.0, 0.0]]
    noise = [[0.1, 0.2], [0.3, 0.4]]
    got = q_sample(SCHED, x0, [3, 7], noise)
    want = q_sample(SCHED, jnp.asarray(x0), jnp.asarray([3, 7]), jnp.asarray(noise))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="x0 must be an array"):
        q_sample(SCHED, "abc", [3], noise)


@pytest.mark.slow
def test_presets_fix_options():
    """A spec's presets: fixed options, not overridable, registered and unregistered with it."""
    ddim = sampler_spec("ddim")
    spec = dataclasses.replace(ddim, name="ddim_copy", presets={"ddim_eta1": {"eta": 1.0}},
                               diffusers=None)
    register_sampler(spec)
    try:
        assert sampler_names()[-1] == "ddim_eta1" and "ddim_copy" in sampler_names()
        assert "eta" not in sampler_options("ddim_eta1")
        s = get_sampler("ddim_eta1", clip_x0=1.0)
        assert s.options == {"eta": 1.0, "clip_x0": 1.0} and s.stochastic and s.spec is spec
        with pytest.raises(ValueError, match="fixes option 'eta'"):
            get_sampler("ddim_eta1", eta=0.0)
        key = jax.random.key(1)
        np.testing.assert_array_equal(
            np.asarray(s(model, SCHED, x_T(), key, num_steps=5)),
            np.asarray(ddim_sample(model, SCHED, x_T(), key, num_steps=5, eta=1.0, clip_x0=1.0)))
    finally:
        unregister_sampler("ddim_copy")
    assert "ddim_eta1" not in sampler_names() and "ddim_copy" not in sampler_names()


@pytest.mark.slow
@pytest.mark.parametrize("name, per_step", [("ddim", 1), ("dpmpp_2m_karras", 1), ("unipc", 1),
                                            ("euler_ancestral", 1), ("heun", 2), ("kdpm2", 2)])
def test_model_evaluations_counts_the_model_calls(name, per_step):
    """Heun and KDPM2 call the model twice per step except on the last (to sigma 0)."""
    s = get_sampler(name)
    n = 6
    want = n if per_step == 1 else 2 * n - 1
    assert s.model_evaluations(SCHED, n) == want
    calls = []

    def counting(x, t):
        calls.append(1)  # traced once per call site in the scan body
        return model(x, t)

    s(counting, SCHED, x_T(), jax.random.key(0), num_steps=n)
    assert len(calls) == per_step  # the scan body holds per_step model calls


@pytest.mark.parametrize("name", ["unipc", "heun", "kdpm2", "dpmpp_2m", "ddim", "euler"])
def test_deterministic_samplers_take_noise_uniformly(name):
    """Callers serving every sampler (the pipeline) pass ``noise``; a deterministic sampler
    accepts ``None`` or an array of the right shape (unused: the same result), and rejects a
    mis-shaped one by name, as the stochastic ones do."""
    sched = make_schedule("linear", 100)
    s, x = get_sampler(name), jnp.ones((1, 3))
    assert not s.stochastic
    model = lambda x, t: 0.1 * x  # noqa: E731
    want = np.asarray(s(model, sched, x, None, num_steps=4))
    np.testing.assert_array_equal(np.asarray(s(model, sched, x, None, num_steps=4, noise=None)),
                                  want)
    z = jax.random.normal(jax.random.key(0), (4, 1, 3))
    np.testing.assert_array_equal(np.asarray(s(model, sched, x, None, num_steps=4, noise=z)),
                                  want)
    with pytest.raises(ValueError, match=r"noise must have shape"):
        s(model, sched, x, None, num_steps=4, noise=jnp.zeros((3, 1, 3)))
