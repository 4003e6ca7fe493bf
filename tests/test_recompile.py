"""Nothing compiles twice: after the first step (and the first log / checkpoint / sample-grid
cycle) a training run traces and compiles nothing more, and the evaluation's chunked sampling
compiles only for its first chunk.

Compilations are counted with JAX's monitoring events (``/jax/core/compile/jaxpr_trace_duration``
and ``backend_compile_duration``, one per trace / XLA compilation, with the function's name), and
the train step's and sample function's executable caches are checked to hold one entry each (a
persistent-cache hit, if one is configured, would only remove events).
"""

import os

import jax
import numpy as np
import pytest
from jax._src import dispatch

from tests.test_data import write_fake_mnist

pytestmark = pytest.mark.slow  # every test here takes > 1.5 s on 2 cores

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "experiments", "configs", "mnist_smoke.py")
EVENTS = (dispatch.JAXPR_TRACE_EVENT, dispatch.BACKEND_COMPILE_EVENT)


class CompileCounter:
    """Records ``(event, fun_name)`` for every trace and XLA compilation while entered."""

    def __init__(self):
        self.events = []

    def _listen(self, event, duration, **kw):
        if event in EVENTS:
            self.events.append((event.rsplit("/", 1)[-1], kw.get("fun_name")))

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Trains the smoke config for 6 steps with a log, checkpoint and sample grid every 2 steps,
    recording the compilations before each call of the train step."""
    import jaxdiff.training.trainer as trainer
    from experiments import mnist_lib, mnist_sampling
    from experiments.configs import mnist_smoke

    root = tmp_path_factory.mktemp("recompile")
    write_fake_mnist(str(root / "mnist"), n_train=32, n_test=8)
    config = mnist_smoke.get_config()
    config.data.data_dir = str(root / "mnist")
    config.training.num_steps = 6
    config.training.log_every = 2
    config.training.checkpoint_every = 2
    config.sampling.every = 2
    made = {"step": [], "sample": []}
    before_call = []   # len(counter.events) when the train step is called (0-based call i)
    real_step, real_sample = trainer.make_train_step, mnist_sampling.make_sample_fn

    def make_train_step(*args, **kwargs):
        fn = real_step(*args, **kwargs)
        made["step"].append(fn)

        def step(state, batch):
            before_call.append(len(counter.events))
            return fn(state, batch)

        return step

    def make_sample_fn(*args, **kwargs):
        made["sample"].append(real_sample(*args, **kwargs))
        return made["sample"][-1]

    mp = pytest.MonkeyPatch()
    mp.setattr(trainer, "make_train_step", make_train_step)
    mp.setattr(mnist_sampling, "make_sample_fn", make_sample_fn)
    try:
        with CompileCounter() as counter:
            summary = mnist_lib.train(config, str(root / "run"))
    finally:
        mp.undo()
    return dict(summary=summary, made=made, before_call=before_call, events=counter.events,
                workdir=str(root / "run"), data_dir=str(root / "mnist"))


def test_train_loop_compiles_nothing_after_the_first_cycle(smoke_run):
    r = smoke_run
    assert r["summary"]["end_step"] == 6 and r["summary"]["checkpoint_step"] == 6
    grids = sorted(os.listdir(os.path.join(r["workdir"], "samples")))
    assert grids == ["latest.png", "step_000002.png", "step_000004.png", "step_000006.png"]
    assert len(r["before_call"]) == 6
    # The first call traces and compiles the step; the cycle after step 2 (metrics read back,
    # checkpoint, sample grid) compiles its own functions once.
    first = r["events"][r["before_call"][0]:r["before_call"][1]]
    assert ("jaxpr_trace_duration", "step") in first, first
    later = r["events"][r["before_call"][2]:]   # steps 3-6 with two more cycles, and the end
    assert later == [], later
    (step_fn,), (sample_fn,) = r["made"]["step"], r["made"]["sample"]
    assert step_fn._cache_size() == 1 and sample_fn._cache_size() == 1


def test_evaluation_sampling_compiles_once_for_all_chunks(smoke_run):
    from experiments import evaluation, mnist_lib, mnist_sampling

    run = mnist_lib.load_run(smoke_run["workdir"])
    diff = evaluation.load_diffusion(run, mnist_sampling.sampling_config("ddim", num_steps=2))
    labels = np.arange(20, dtype=np.int32) % 10     # 3 chunks of 8, the last padded
    calls = []

    def sample_fn(lab, key):
        calls.append(len(counter.events))
        return diff["sample_fn"](lab, key)

    with CompileCounter() as counter:
        images = evaluation.generate(sample_fn, labels, jax.random.key(0), batch_size=8)
    assert images.shape == (20, 28, 28, 1) and np.isfinite(images).all()
    assert len(calls) == 3
    assert counter.events[calls[0]:calls[1]] != []          # the first chunk compiles
    assert counter.events[calls[1]:] == [], counter.events[calls[1]:]


def test_a_new_guidance_scale_compiles_nothing():
    """The MNIST sample function takes the guidance scale ``w`` as a traced argument: after the
    guided program's first compile, any other ``w`` compiles nothing; ``w == 1`` (the conditional
    model alone, half the batch) is the one other program. Same formula as the guided program:
    ``w = 0`` is the unconditional model (the null label at ``w = 1``)."""
    from experiments import mnist_lib, mnist_sampling
    from experiments.configs import mnist_smoke
    from jaxdiff.models import init_unet
    from jaxdiff.sharding import make_mesh

    config = mnist_smoke.get_config()
    model, schedule = mnist_lib.build_model(config), mnist_lib.build_schedule(config)
    mesh = make_mesh()
    variables = {"params": init_unet(model.config, jax.random.key(0))}
    fn = mnist_sampling.make_sample_fn(
        model, schedule, mesh, mnist_sampling.sampling_config("ddim", 3, 2.0, clip_x0=0.0),
        config.diffusion.prediction_type)
    key, labels = jax.random.key(1), np.arange(4, dtype=np.int32)

    def sample(w, lab=labels):
        return np.asarray(mnist_sampling.sample_images(fn, variables, lab, key, mesh, w))

    with CompileCounter() as counter:
        first = sample(None)                        # the run's w = 2: compiles the guided program
    assert counter.events != []
    with CompileCounter() as counter:
        out = {w: sample(w) for w in (3.5, 0.0, 1.25, 2.0)}
    assert counter.events == [], counter.events    # a new w compiles nothing
    np.testing.assert_array_equal(out[2.0], first)
    assert np.abs(out[3.5] - out[1.25]).max() > 1e-3   # w does reach the program
    with CompileCounter() as counter:
        cond = sample(1.0)                          # w == 1: the conditional program, once
    assert counter.events != []
    with CompileCounter() as counter:
        again = sample(1)
        uncond = sample(1.0, np.full(4, model.config.num_classes, np.int32))
    assert counter.events == [], counter.events
    np.testing.assert_array_equal(cond, again)
    assert fn._cache_size() == 2
    # w = 0 through the guided program (batch 2N) is the unconditional model (batch N): equal up
    # to the float32 rounding of a 3-step trajectory of values of magnitude |x| <= ~10.
    scale = float(np.abs(uncond).max())
    np.testing.assert_allclose(out[0.0], uncond, rtol=0, atol=1e-5 * max(scale, 1.0))
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        sample(float("nan"))
