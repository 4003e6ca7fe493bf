"""Classifier-free guidance limited to an interval of timesteps (Kynkaanniemi et al. 2024):
values per example, the cost (the unconditional branch runs only at steps inside the interval),
the samplers end to end, validation, and the experiments' settings."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdiff.samplers import classifier_free_guidance, get_sampler, prompt_guidance
from jaxdiff.schedules import make_schedule


def _model(x, t, y):
    """A conditional stand-in whose branches differ: depends on x, t and the label."""
    scale = 1.0 + 0.05 * y.astype(x.dtype)
    return jnp.tanh(x) * scale[:, None] + 1e-3 * t.astype(x.dtype)[:, None] * scale[:, None]


LABELS = jnp.array([1, 4, 7], jnp.int32)
NULL = 10


@pytest.mark.slow
def test_values_per_example_inside_guided_outside_conditional():
    x = jnp.linspace(-1, 1, 12).reshape(3, 4)
    t = jnp.array([50, 300, 900])   # below, inside, above (200, 800)
    got = jax.jit(classifier_free_guidance(_model, LABELS, NULL, 3.0,
                                           guidance_interval=(200, 800)))(x, t)
    cond = np.asarray(_model(x, t, LABELS))
    uncond = np.asarray(_model(x, t, jnp.full_like(LABELS, NULL)))
    full = uncond + 3.0 * (cond - uncond)
    np.testing.assert_allclose(got[1], full[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got)[[0, 2]], cond[[0, 2]], rtol=1e-6)
    assert np.abs(full - cond).min() > 1e-3       # the two really differ
    # the ends are inside
    ends = classifier_free_guidance(_model, LABELS, NULL, 3.0, guidance_interval=(50, 900))(x, t)
    np.testing.assert_allclose(ends, full, rtol=1e-6, atol=1e-6)


def test_unconditional_branch_runs_only_at_steps_inside():
    """DDIM-10 on 100 timesteps (leading grid 90, 80, ..., 0), interval [30, 60]: the model runs
    on the doubled batch at t = 60, 50, 40, 30 and on the batch alone at the six others."""
    batches = []

    def model(x, t, y):
        jax.debug.callback(lambda n: batches.append(int(n)), x.shape[0])
        return _model(x, t, y)

    sampler = get_sampler("ddim", spacing="leading")
    fn = classifier_free_guidance(model, LABELS, NULL, 2.0, guidance_interval=(30, 60))
    x = jax.random.normal(jax.random.key(0), (3, 4))
    jax.block_until_ready(jax.jit(lambda x: sampler(fn, make_schedule("cosine", 100), x,
                                                    num_steps=10))(x))
    assert batches == [3, 3, 3, 6, 6, 6, 6, 3, 3, 3]


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "unipc"])
def test_sampling_reduces_to_full_guidance_or_to_the_conditional_model(sampler):
    """An interval around the whole grid is plain guidance; one that no step of the grid falls in
    is the conditional model (w = 1), for deterministic and ancestral samplers alike."""
    s = get_sampler(sampler, spacing="leading")
    sched = make_schedule("cosine", 100)
    x = jax.random.normal(jax.random.key(1), (3, 4))
    key = jax.random.key(2) if s.stochastic else None

    def run(w, interval):
        fn = classifier_free_guidance(_model, LABELS, NULL, w, guidance_interval=interval)
        return np.asarray(s(fn, sched, x, key, num_steps=10))

    full, cond = run(2.5, None), run(1.0, None)
    np.testing.assert_allclose(run(2.5, (0, 99)), full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run(2.5, (91, 99)), cond, rtol=1e-5, atol=1e-6)
    middle = run(2.5, (30, 60))
    assert np.abs(middle - full).max() > 1e-3 and np.abs(middle - cond).max() > 1e-3


@pytest.mark.parametrize("bad", [(5, 1), (1, 2, 3), "ab", 3, (True, 5), ("a", 4)])
def test_bad_interval_raises_naming_it(bad):
    with pytest.raises(ValueError, match="guidance_interval"):
        classifier_free_guidance(_model, LABELS, NULL, 2.0, guidance_interval=bad)


@pytest.mark.parametrize("w", [float("nan"), float("inf"), -float("inf"), np.float32("nan"),
                               jnp.array([2.0, jnp.nan, 1.0])])
def test_non_finite_concrete_guidance_scale_raises_naming_it(w):
    """A concrete NaN / inf scale made every output NaN; it now raises. A traced one cannot be
    checked (documented): the output is then NaN, as the formula says."""
    with pytest.raises(ValueError, match="guidance_scale must be finite"):
        classifier_free_guidance(_model, LABELS, NULL, w)
    x, t = jnp.ones((3, 4)), jnp.array([1, 2, 3])
    traced = jax.jit(lambda w: classifier_free_guidance(_model, LABELS, NULL, w)(x, t))
    assert np.isnan(np.asarray(traced(jnp.float32(np.nan)))).all()
    assert np.isfinite(np.asarray(traced(jnp.float32(2.0)))).all()


def test_experiment_settings():
    from experiments import mnist_sampling
    from experiments.cli import ConfigError
    from experiments.eval_sweep import markdown, parse_settings

    (a, b) = parse_settings("ddpm:50:3@200-800,ddim:50:2", 100)
    assert a["guidance_interval"] == (200.0, 800.0) and a["guidance_scale"] == 3.0
    assert b["guidance_interval"] is None
    for bad in ("ddpm:50:3@200", "ddpm:50:3@a-b", "ddpm:50:3@1-2-3"):
        with pytest.raises(ConfigError, match="--settings"):
            parse_settings(bad, 100)
    assert mnist_sampling.parse_guidance_interval("200,800") == (200.0, 800.0)
    assert mnist_sampling.parse_guidance_interval("all") == "all"
    assert mnist_sampling.parse_guidance_interval("") is None
    with pytest.raises(ConfigError, match="--guidance_interval"):
        mnist_sampling.parse_guidance_interval("200")

    run = mnist_sampling.sampling_config("ddpm", 50, 1.5, guidance_interval=(100, 700))
    from_flags = mnist_sampling.sampling_from_flags
    assert tuple(from_flags(run).guidance_interval) == (100, 700)
    assert from_flags(run, "ddim").guidance_interval == (100, 700)  # carried over
    assert from_flags(run, guidance_interval="all").guidance_interval is None
    assert from_flags(run, guidance_interval=(1, 2)).guidance_interval == (1, 2)
    assert mnist_sampling.guidance_interval(run, 1000) == (100.0, 700.0)
    assert mnist_sampling.guidance_interval(
        ml_collections.ConfigDict(dict(guidance_interval="5,9")), 10) == (5.0, 9.0)
    for bad in ((700, 100), (0, 1000), (-1, 5), "x", "1,2,3"):
        s = ml_collections.ConfigDict(dict(guidance_interval=bad))
        with pytest.raises(ConfigError, match="sampling.guidance_interval"):
            mnist_sampling.guidance_interval(s, 1000)
    sched = make_schedule("cosine", 1000)
    with pytest.raises(ConfigError, match="sampling.guidance_interval"):
        mnist_sampling.make_sampler(
            mnist_sampling.sampling_config("ddpm", 50, 1.5, guidance_interval=(0, 1000)), "eps",
            sched)
    rows = [{**a, "nfe": 50, "fd": 1.0, "conditional_accuracy": 0.9, "time_s": 3.0}]
    table = markdown({"settings": rows, "floors": {"100": 0.5}, "real": {}, "step": 1,
                      "classifier": {"test_accuracy": 0.99}, "workdir": "w"})
    assert "3 @ [200, 800]" in table


def test_default_config_field_parses_from_the_command_line():
    from ml_collections import config_flags
    from absl import flags

    argv = ["prog", "--config.sampling.guidance_interval=(200, 800)"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", "experiments/configs/mnist.py", flag_values=fv,
                                    sys_argv=argv)
    fv(argv)
    from experiments import mnist_sampling
    assert mnist_sampling.guidance_interval(fv.config.sampling, 1000) == (200.0, 800.0)
    fv2 = flags.FlagValues()
    config_flags.DEFINE_config_file("config", "experiments/configs/mnist.py", flag_values=fv2)
    fv2(["prog"])
    assert fv2.config.sampling.guidance_interval is None


def test_prompt_guidance_is_the_formula_and_cfg_along_the_prompt_itself():
    # a model whose output depends on x, t and the condition, per example
    def model_fn(x, t, c):
        return x * c[:, None] + t[:, None].astype(jnp.float32) * 0.01 + c[:, None] ** 2

    x = jax.random.normal(jax.random.key(0), (3, 4))
    t = jnp.array([5, 50, 500])
    cond, guide = jnp.array([1.0, 2.0, 3.0]), jnp.array([0.5, -1.0, 4.0])
    null = jnp.asarray(0.25)
    w = 2.5
    got = prompt_guidance(model_fn, cond, guide, null, w)(x, t)
    n = jnp.full((3,), 0.25)
    want = model_fn(x, t, cond) + (w - 1) * (model_fn(x, t, guide) - model_fn(x, t, n))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    cfg = classifier_free_guidance(model_fn, cond, null, w)(x, t)
    np.testing.assert_allclose(prompt_guidance(model_fn, cond, cond, null, w)(x, t), cfg,
                               rtol=1e-6)
    with pytest.raises(ValueError, match="guide_cond"):
        prompt_guidance(model_fn, cond, guide[:2], null, w)
    with pytest.raises(ValueError, match="finite"):
        prompt_guidance(model_fn, cond, guide, null, float("nan"))
