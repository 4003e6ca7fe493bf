"""PNDM (jaxdiff.samplers.pndm) on its own: option errors that name the argument, the grid's and
the plan's structure, the float32 carry under bf16, the step driven by hand against the scan, and
the registry / command-line names. Its diffusers parity is tests/parity/test_pndm_parity.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import sample as sample_cli
from experiments.cli import ConfigError
from jaxdiff.convert import (
    sampler_from_diffusers_config,
    schedule_from_diffusers_config,
    scheduler_to_diffusers,
)
from jaxdiff.samplers import (
    get_sampler,
    pndm_init,
    pndm_plan,
    pndm_sample,
    pndm_step,
    pndm_timesteps,
    sampler_names,
    sampler_options,
    sampler_spec,
)
from jaxdiff.schedules import make_schedule

SCHED = make_schedule("linear", 100)
SHAPE = (2, 3, 3, 2)


def model(x, t):
    return 0.3 * jnp.tanh(x) + 0.002 * t.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


def x_T():
    return jax.random.normal(jax.random.key(0), SHAPE)


@pytest.mark.parametrize("options, match", [
    (dict(skip_prk_steps="yes"), "skip_prk_steps must be a bool"),
    (dict(set_alpha_to_one=1), "set_alpha_to_one must be a bool"),
    (dict(spacing="uniform"), "spacing must be one of"),
    (dict(steps_offset=-1), "steps_offset"),
    (dict(steps_offset=1.0), "steps_offset must be an int"),
    (dict(prediction_type="x0"), "prediction_type must be 'eps' or 'v' for PNDM"),
    (dict(prediction_type="score"), "prediction_type must be one of"),
])
def test_bad_options_are_errors_that_name_them(options, match):
    with pytest.raises(ValueError, match=match):
        get_sampler("pndm", **options)
    with pytest.raises(ValueError, match=match):
        pndm_sample(model, SCHED, x_T(), num_steps=5, **options)


def test_bad_calls_are_errors_that_name_the_argument():
    s = get_sampler("plms")
    with pytest.raises(ValueError, match="num_steps must be <= num_train_timesteps"):
        s(model, SCHED, x_T(), num_steps=101)
    with pytest.raises(ValueError, match="num_steps"):
        s(model, SCHED, x_T(), num_steps=0)
    with pytest.raises(ValueError, match="steps_offset=50 pushes the first timestep"):
        pndm_timesteps(SCHED, 2, steps_offset=50, spacing="leading", skip_prk_steps=True)
    with pytest.raises(ValueError, match="strength=0.1 keeps no step"):
        s(model, SCHED, x_T(), num_steps=5, strength=0.1)
    with pytest.raises(ValueError, match="noise must have shape"):
        s(model, SCHED, x_T(), num_steps=5, noise=jnp.zeros((6, *SHAPE)))
    with pytest.raises(ValueError, match="model_fn's output must have shape"):
        s(lambda x, t: x[..., :1], SCHED, x_T(), num_steps=5)
    grid = pndm_timesteps(SCHED, 5, skip_prk_steps=True)
    with pytest.raises(ValueError, match="start must be <= 4"):
        pndm_plan(grid, 100, 5)
    row = pndm_plan(grid, 100).row(0)
    with pytest.raises(ValueError, match="model_output must have x's shape"):
        pndm_step(SCHED, pndm_init(x_T()), jnp.zeros((2, 3)), x_T(), row)
    with pytest.raises(ValueError, match="state holds outputs of shape"):
        pndm_step(SCHED, pndm_init(jnp.zeros((1, 3))), x_T(), x_T(), row)


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("linspace", 0), ("trailing", 0)])
def test_grid_and_plan_structure(skip, spacing, offset):
    """Evaluations: N + 1 for PLMS (the second level twice), N + 9 for F-PNDM (N >= 4; 4 (N - 1)
    + 1 below), all timesteps in [0, T) and non-increasing; every plan (any start) ends exactly
    N - start steps, its last evaluation among them; each noise estimate is an affine
    combination of model outputs (weights summing to 1, the Runge-Kutta sum counting its
    stages' weights)."""
    T = SCHED.num_timesteps
    for n in (1, 2, 3, 4, 5, 9, 20):
        grid = pndm_timesteps(SCHED, n, skip_prk_steps=skip, spacing=spacing,
                              steps_offset=offset)
        ts = grid.model_timesteps
        k = 0 if skip else min(3, n - 1)
        assert len(ts) == (n + 1 if skip and n > 1 else 4 * k + n - k), (n, ts)
        assert len(grid.prk_timesteps) == 4 * k
        assert ((ts >= 0) & (ts < T)).all() and (np.diff(ts) <= 0).all()
        np.testing.assert_array_equal(grid.timesteps, ts[:n])
        assert grid.timesteps.dtype == np.int32 and grid.sigmas.shape == (n + 1,)
        if skip and n > 1:
            assert ts[1] == ts[2] and len(set(ts.tolist())) == n
        for start in range(n):
            plan = pndm_plan(grid, T, start)
            assert len(plan.timestep) == len(ts) - start
            np.testing.assert_array_equal(plan.timestep, ts[start:])
            assert plan.ends_step.sum() == n - start and plan.ends_step[-1]
            rk_total, totals = 0.0, []
            for w, keep, add in zip(plan.weights, plan.rk_keep, plan.rk_weight):
                totals.append(w[0] + w[1] * rk_total + w[2:].sum())
                rk_total = (rk_total if keep else 0.0) + add
            np.testing.assert_allclose(totals, 1.0, rtol=1e-6)


@pytest.mark.parametrize("options", [dict(skip_prk_steps=True), dict()])
def test_one_step_is_ddims_step(options):
    """With one level, PNDM's single update is DDIM's deterministic step (the same transfer,
    written without DDIM's cancellation)."""
    kw = dict(spacing="leading", steps_offset=1, set_alpha_to_one=False, prediction_type="v")
    got = pndm_sample(model, SCHED, x_T(), num_steps=1, **options, **kw)
    want = get_sampler("ddim", **kw)(model, SCHED, x_T(), num_steps=1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_constant_noise_follows_ddim_transfers():
    """A model whose output is a constant field e: every combination is e itself, so PLMS and
    F-PNDM reach DDIM's result on the same levels (DDIM's own grid, leading spacing)."""
    e = jax.random.normal(jax.random.key(5), SHAPE)
    const = lambda x, t: jnp.broadcast_to(e, x.shape)  # noqa: E731
    want = get_sampler("ddim", set_alpha_to_one=False)(const, SCHED, x_T(), num_steps=6)
    for skip in (True, False):
        got = pndm_sample(const, SCHED, x_T(), num_steps=6, skip_prk_steps=skip)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_bf16_model_keeps_a_float32_carry():
    """A bf16 x_T and bf16 model outputs: the carry (trajectory, history) is float32, and the
    bf16 outputs are only upcast (the result equals that of their float32 upcasts)."""
    bf16 = lambda x, t: model(x, t).astype(jnp.bfloat16)  # noqa: E731
    upcast = lambda x, t: bf16(x, t).astype(jnp.float32)  # noqa: E731
    s = get_sampler("plms")
    out, xs, x0s = s(bf16, SCHED, x_T().astype(jnp.bfloat16), num_steps=6,
                     return_trajectory=True)
    assert out.dtype == xs.dtype == x0s.dtype == jnp.float32
    want = s(upcast, SCHED, x_T().astype(jnp.bfloat16).astype(jnp.float32), num_steps=6)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
    state, x_next, _ = pndm_step(SCHED, pndm_init(jnp.zeros(SHAPE)), jnp.ones(SHAPE, jnp.bfloat16),
                                 jnp.zeros(SHAPE),
                                 pndm_plan(pndm_timesteps(SCHED, 3), 100).row(0))
    assert x_next.dtype == state.outputs.dtype == state.saved.dtype == jnp.float32


@pytest.mark.parametrize("skip,n,strength", [(True, 6, 1.0), (False, 5, 1.0), (True, 6, 0.5),
                                             (False, 6, 0.5)])
def test_step_driven_by_hand_equals_the_scan(skip, n, strength):
    """pndm_step over the plan's rows, one jitted step at a time, gives the scan's result and
    trajectory (the samples after the evaluations that end a step)."""
    grid = pndm_timesteps(SCHED, n, skip_prk_steps=skip)
    start = n - int(n * strength)
    plan = pndm_plan(grid, 100, start)
    step = jax.jit(lambda state, out, x, row: pndm_step(SCHED, state, out, x, row,
                                                        prediction_type="v"))
    x, state, xs, x0s = x_T(), pndm_init(x_T()), [x_T()], []
    for i in range(len(plan.timestep)):
        row = plan.row(i)
        state, x, x0 = step(state, model(x, jnp.full((SHAPE[0],), row.timestep)), x, row)
        if row.ends_step:
            xs.append(x)
            x0s.append(x0)
    out, want_xs, want_x0s = pndm_sample(model, SCHED, x_T(), num_steps=n, skip_prk_steps=skip,
                                         prediction_type="v", strength=strength,
                                         return_trajectory=True)
    assert len(xs) == n - start + 1
    np.testing.assert_allclose(np.asarray(out), np.asarray(x), atol=1e-6)
    np.testing.assert_allclose(np.asarray(want_xs), np.stack(xs), atol=1e-6)
    np.testing.assert_allclose(np.asarray(want_x0s), np.stack(x0s), atol=1e-5)
    # The history matters: the same levels with every update along its own evaluation (DDIM's
    # transfer on PNDM's levels) differ.
    ddim_like = get_sampler("ddim", set_alpha_to_one=False, spacing="leading")(
        model, SCHED, x_T(), num_steps=n, strength=strength)
    assert np.abs(np.asarray(ddim_like) - np.asarray(out)).max() > 1e-3


@pytest.mark.slow
def test_registry_cli_and_config_names(tmp_path):
    assert {"pndm", "plms"} <= set(sampler_names())
    assert sampler_spec("plms") is sampler_spec("pndm")
    assert sampler_spec("pndm").diffusers.class_name == "PNDMScheduler"
    assert "skip_prk_steps" not in sampler_options("plms")
    plms, pndm = get_sampler("plms"), get_sampler("pndm")
    assert plms.options == {"skip_prk_steps": True} and not plms.stochastic
    assert pndm.effective_options["skip_prk_steps"] is False  # the class's default
    assert plms.model_evaluations(SCHED, 6) == 7
    assert pndm.model_evaluations(SCHED, 6) == 15
    assert pndm.model_evaluations(SCHED, 2) == 5  # one Runge-Kutta step, then one update
    with pytest.raises(ConfigError, match="config.json not found"):  # a valid --sampler value
        sample_cli.main(["--workdir", str(tmp_path), "--sampler", "plms"])
    # Config keys PNDMScheduler does not take (DDIM's, carried by SD 1.x folders; the zero-SNR
    # rescaling; Euler's sigma flags) are ignored, as diffusers ignores them.
    sd15 = dict(_class_name="PNDMScheduler", skip_prk_steps=True, steps_offset=1,
                clip_sample=False)
    s = sampler_from_diffusers_config({**sd15, "thresholding": True, "clip_sample": True})
    assert s.options == sampler_from_diffusers_config(sd15).options
    foreign = {**sd15, "rescale_betas_zero_snr": True, "use_karras_sigmas": True}
    assert sampler_from_diffusers_config(foreign).options == s.options
    np.testing.assert_array_equal(  # not rescaled to zero terminal SNR
        np.asarray(schedule_from_diffusers_config(foreign).alphas_cumprod),
        np.asarray(schedule_from_diffusers_config(sd15).alphas_cumprod))
    with pytest.raises(ValueError, match="no_such_key"):  # a key no class takes
        sampler_from_diffusers_config({**sd15, "no_such_key": 1})
    config = scheduler_to_diffusers(get_sampler("plms", steps_offset=1), "scaled_linear", 1000,
                                    beta_start=0.00085, beta_end=0.012)
    assert config["skip_prk_steps"] is True and config["steps_offset"] == 1
