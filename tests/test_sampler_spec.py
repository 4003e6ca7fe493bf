"""One declared spec per sampler (jaxdiff.samplers.spec): a toy sampler added through ONE spec
reaches the registry, the command lines' ``--sampler`` choices, image-to-image and the diffusers
scheduler import / export; every registered spec declares exactly its sample function's options
(the one place the signatures are inspected) and takes ``noise`` and ``strength``; registration
refuses duplicates; the zero-terminal-SNR scheduler configs load."""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import sample as sample_cli
from experiments.cli import ConfigError
from jaxdiff.convert import (
    sampler_from_diffusers_config,
    schedule_from_diffusers_config,
    scheduler_classes,
    scheduler_to_diffusers,
)
from jaxdiff.pipelines.loading import choose_sampler
from jaxdiff.samplers import (
    DiffusersTwin,
    SamplerSpec,
    check_strength,
    ddim_timesteps,
    get_sampler,
    img2img_start_step,
    noise_to_img2img,
    register_sampler,
    sampler_names,
    sampler_options,
    sampler_spec,
    sampler_specs,
    strength_start_step,
    unregister_sampler,
)
from jaxdiff.samplers.diffusers_names import config_key
from jaxdiff.samplers.driver import checked_model, prepare_x_T, run_scan
from jaxdiff.schedules import make_schedule

SCHED = make_schedule("linear", 100)


def model(x, t):
    return 0.3 * jnp.tanh(x) + 0.01 * t.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


# -- the toy: DDIM with eta = 0 written from scratch, declared by one spec -----------------------

def toy_sample(model_fn, schedule, x_T, key=None, *, num_steps, spacing="leading", noise=None,
               return_trajectory=False, strength=1.0):
    """Deterministic: x0 from the eps prediction, then to the previous timestep along eps."""
    grid = ddim_timesteps(schedule, num_steps, spacing)
    start = strength_start_step(num_steps, strength)
    x_T = prepare_x_T(x_T)
    model_ = checked_model(model_fn, x_T.shape)
    ts, prev = jnp.asarray(grid.timesteps), jnp.asarray(grid.prev_timesteps)
    acp = schedule.alphas_cumprod

    def body(state, x, i, z):
        a = acp[ts[i]]
        a_prev = jnp.where(prev[i] >= 0, acp[jnp.maximum(prev[i], 0)], 1.0)
        eps = model_(x, ts[i])
        x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
        return state, jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev) * eps, x0

    return run_scan(body, None, x_T, key, num_steps, stochastic=False, noise=noise,
                    return_trajectory=return_trajectory, start_step=start)


TOY = SamplerSpec(
    name="toy",
    sample=toy_sample,
    grid=lambda schedule, num_steps, *, strength=1.0, spacing="leading", **_: ddim_timesteps(
        schedule, num_steps, spacing),
    options=dict(spacing="leading"),
    noise_space="alphas_cumprod",
    stochastic=lambda o: False,
    presets=dict(toy_trailing=dict(spacing="trailing")),
)


@pytest.fixture
def toy():
    register_sampler(TOY)
    yield TOY
    if "toy" in sampler_names():
        unregister_sampler("toy")


def test_a_toy_sampler_is_one_spec(toy):
    assert {"toy", "toy_trailing"} <= set(sampler_names())
    assert sampler_options("toy") == ("spacing",) and sampler_options("toy_trailing") == ()
    s = get_sampler("toy")
    assert s.spec is TOY and sampler_spec("toy_trailing") is TOY and not s.stochastic
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
    # It samples, through the registry: the toy is DDIM with eta = 0, written differently.
    for name, spacing in (("toy", "leading"), ("toy_trailing", "trailing")):
        got = get_sampler(name)(model, SCHED, x, num_steps=5)
        want = get_sampler("ddim", spacing=spacing)(model, SCHED, x, num_steps=5)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # Image-to-image through strength: the same start sample as DDIM's (same grid and noise
    # space), the same tail.
    x0, z = x, jax.random.normal(jax.random.key(1), x.shape)
    ddim = get_sampler("ddim")
    start = noise_to_img2img(s, SCHED, 5, x0, z, 0.6)
    np.testing.assert_array_equal(np.asarray(start),
                                  np.asarray(noise_to_img2img(ddim, SCHED, 5, x0, z, 0.6)))
    assert img2img_start_step(s, SCHED, 5, 0.6) == 2
    got = s(model, SCHED, start, num_steps=5, strength=0.6)
    want = ddim(model, SCHED, start, num_steps=5, strength=0.6)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="strength=0.1 keeps no step"):
        check_strength(s, SCHED, 5, 0.1)
    # A Stable Diffusion folder's prediction type goes to the samplers that declare the option.
    assert choose_sampler("toy", None, {"prediction_type": "v_prediction"}).options == {}
    # The diffusers export refuses it, naming it and those that have a twin.
    with pytest.raises(ValueError, match=r"sampler 'toy' has no diffusers scheduler class "
                                         r"\(those with one: .*'ddim'"):
        scheduler_to_diffusers(s, "linear", 100)


def test_a_toy_sampler_is_a_command_line_choice(toy, tmp_path):
    """``--sampler`` choices are read when the flags are parsed: the toy passes the flag (the run
    then fails for the empty workdir), an unknown name does not."""
    with pytest.raises(ConfigError, match="config.json not found"):
        sample_cli.main(["--workdir", str(tmp_path), "--sampler", "toy_trailing"])
    with pytest.raises(ConfigError, match=r"--sampler=toyx.*\|toy\|.*\|toy_trailing>"):
        sample_cli.main(["--workdir", str(tmp_path), "--sampler", "toyx"])
    unregister_sampler("toy")
    assert "toy" not in sampler_names() and "toy_trailing" not in sampler_names()
    with pytest.raises(ConfigError, match="--sampler=toy"):
        sample_cli.main(["--workdir", str(tmp_path), "--sampler", "toy"])


def test_a_toy_twin_round_trips_through_a_scheduler_config():
    """A twin makes the import pick the spec by class name, and the export write its config."""
    twin = DiffusersTwin("ToyScheduler", defaults=dict(timestep_spacing="leading"),
                         options=dict(spacing=config_key("timestep_spacing")))
    spec = dataclasses.replace(TOY, name="toy_twin", presets={}, diffusers=twin)
    register_sampler(spec)
    try:
        assert "ToyScheduler" in scheduler_classes()
        config = scheduler_to_diffusers(get_sampler("toy_twin", spacing="trailing"), "linear",
                                        100)
        assert config["_class_name"] == "ToyScheduler"
        assert config["timestep_spacing"] == "trailing" and config["num_train_timesteps"] == 100
        back = sampler_from_diffusers_config(config)
        assert back.spec is spec and back.options == {"spacing": "trailing"}
        np.testing.assert_array_equal(np.asarray(schedule_from_diffusers_config(config).betas),
                                      np.asarray(SCHED.betas))
        with pytest.raises(ValueError, match="config\\['eta'\\] is not an option of ToyScheduler"):
            sampler_from_diffusers_config({**config, "eta": 0.0})
    finally:
        unregister_sampler("toy_twin")
    assert "ToyScheduler" not in scheduler_classes()
    with pytest.raises(ValueError, match=r"_class_name'\] must be one of .*got 'ToyScheduler'"):
        sampler_from_diffusers_config(config)


def test_registration_refuses_duplicates_and_bad_specs():
    ddim = sampler_spec("ddim")
    with pytest.raises(ValueError, match="the name 'ddim' is already registered"):
        register_sampler(ddim)
    clash = dataclasses.replace(ddim, name="ddim2", presets={"dpmpp_2m": {}}, diffusers=None)
    with pytest.raises(ValueError, match="'dpmpp_2m' is already registered \\(a preset of "
                                         "'dpm_solver'\\)"):
        register_sampler(clash)
    twin = dataclasses.replace(ddim, name="ddim2", presets={})
    with pytest.raises(ValueError, match="'ddim' is already the twin of DDIMScheduler"):
        register_sampler(twin)
    assert "ddim2" not in sampler_names()
    with pytest.raises(ValueError, match="takes a SamplerSpec"):
        register_sampler("ddim")
    with pytest.raises(ValueError, match="'nope' is not registered"):
        unregister_sampler("nope")
    with pytest.raises(ValueError, match="'dpmpp_2m' is not registered"):
        unregister_sampler("dpmpp_2m")  # a preset goes with its sampler
    kw = dict(name="bad", sample=toy_sample, grid=TOY.grid, options=dict(spacing="leading"),
              noise_space="alphas_cumprod", stochastic=lambda o: False)
    for change, match in [
        (dict(noise_space="vp"), "noise_space must be one of"),
        (dict(img2img="head"), "img2img must be one of"),
        (dict(name="two words"), "name must be an identifier"),
        (dict(options=dict(spacing="leading", noise=None)), "call arguments, not options"),
        (dict(presets=dict(p=dict(eta=1.0))), "preset 'p' fixes \\['eta'\\]"),
        (dict(diffusers=DiffusersTwin("X", defaults={}, options=dict(eta=config_key("eta")))),
         "twin maps \\['eta'\\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            SamplerSpec(**{**kw, **change})
    with pytest.raises(ValueError, match="must_be names keys that are not in its defaults"):
        DiffusersTwin("X", defaults={}, options={}, must_be=dict(thresholding=(False,)))


def test_declared_options_are_the_sample_functions_keywords():
    """The ONE place that inspects a signature: each spec's ``options`` (names and defaults) are
    its sample function's keyword options, besides the call arguments every sampler takes."""
    assert len(sampler_specs()) >= 10
    for spec in sampler_specs():
        params = inspect.signature(spec.sample).parameters
        assert list(params)[:4] == ["model_fn", "schedule", "x_T", "key"], spec.name
        assert params["key"].default is None, spec.name
        assert params["num_steps"].kind is inspect.Parameter.KEYWORD_ONLY, spec.name
        assert params["num_steps"].default is inspect.Parameter.empty, spec.name
        calls = dict(noise=None, return_trajectory=False, strength=1.0)
        assert ("after_step" in params) == spec.after_step, spec.name  # declared iff taken
        if spec.after_step:
            calls["after_step"] = None
        for arg, default in calls.items():
            assert params[arg].default == default, (spec.name, arg)
        keyword = {k: p.default for k, p in params.items()
                   if p.kind is inspect.Parameter.KEYWORD_ONLY and k != "num_steps"
                   and k not in calls}
        assert keyword == dict(spec.options), spec.name
        # The grid adapter accepts every option (and strength).
        grid = spec.grid(SCHED, 4, strength=1.0, **spec.options)
        assert len(grid.timesteps) == 4 and len(grid.sigmas) == 5, spec.name
        assert isinstance(spec.stochastic(spec.resolve()), bool), spec.name


@pytest.mark.parametrize("name", [s.name for s in sampler_specs()])
def test_every_registered_sampler_takes_noise_and_strength(name):
    s = get_sampler(name)
    key = jax.random.key(0)
    x0 = jax.random.normal(jax.random.key(1), (1, 2, 2, 1))
    z = jax.random.normal(jax.random.key(2), x0.shape)
    n, strength = 4, 0.5
    x = noise_to_img2img(s, SCHED, n, x0, z, strength)
    m = n - img2img_start_step(s, SCHED, n, strength)  # the steps that run
    assert m == (n if s.spec.img2img == "grid" else 2)
    noise = jax.random.normal(jax.random.key(3), (m, *x0.shape))
    out, xs, _ = s(model, SCHED, x, key, num_steps=n, noise=noise, strength=strength,
                   return_trajectory=True)
    assert xs.shape == (m + 1, *x0.shape) and np.isfinite(np.asarray(out)).all()
    with pytest.raises(ValueError, match="noise must have shape"):
        s(model, SCHED, x, key, num_steps=n, noise=noise[:1], strength=strength)


@pytest.mark.parametrize("cls", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                 "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                                 "DDIMScheduler"])
def test_zero_snr_linear_config_loads(cls):
    """Issue 24 section 8: ``rescale_betas_zero_snr`` with linear betas crashed ("betas must lie
    in (0, 1)"): abar_{T-2} = 4.2e-9 < 2**-24, so the floor's implied last beta was -13. The floor
    is now set on alphas_cumprod, as diffusers sets it (parity: tests/parity/
    test_zero_snr_parity.py)."""
    config = dict(_class_name=cls, beta_schedule="linear", rescale_betas_zero_snr=True,
                  timestep_spacing="trailing", prediction_type="v_prediction")
    schedule = schedule_from_diffusers_config(config)
    acp = np.asarray(schedule.alphas_cumprod)
    floored = cls != "DDIMScheduler"  # DDIM keeps abar_{T-1} = 0
    assert acp[-1] == (np.float32(2.0**-24) if floored else 0.0)
    assert acp[-2] < 2.0**-24 and np.asarray(schedule.betas)[-1] == 1.0
    sampler = sampler_from_diffusers_config(config)
    x = jax.random.normal(jax.random.key(0), (1, 2, 2, 1))
    out = sampler(model, schedule, x, jax.random.key(1), num_steps=4)
    assert np.isfinite(np.asarray(out)).all()
