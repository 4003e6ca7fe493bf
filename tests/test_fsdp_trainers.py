"""FSDP in the trainers (issue 17), on 8 simulated CPU devices in a subprocess (the device count
is fixed when JAX initialises; this pytest process has one device):

- a resumed ``fsdp`` run of the training loop reads its checkpoint straight into the split
  shardings (``jaxdiff.training.restore_or_init`` -> ``Checkpointer.restore_latest`` of a sharded
  abstract target), and 2 + 2 resumed steps equal 4 in one go, bitwise;
- ``train_vae_mnist`` and ``train_latent_mnist`` with ``training.fsdp=4``: the step equals the
  replicated one (``training.fsdp=1``); the latent trainer with a stand-in loss (compiling its
  real one twice on 8 devices takes minutes on 2 cores), the autoencoder with its real one.

The tiny models' leaves are all below ``FSDP_MIN_SIZE``: the scripts split every divisible leaf
(``min_size=0``), as ``tests/test_fsdp.py`` does.
"""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from jaxdiff.training import abstract_target
from jaxdiff.sharding import make_mesh, replicated_sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Shared by the scripts: every divisible leaf split; the train steps' state shardings recorded.
_PRELUDE = """
import json, os, sys
import jax, numpy as np
import jaxdiff.training.placement as placement
import jaxdiff.training.trainer as trainer
from jaxdiff.training import Checkpointer, abstract_target
from jaxdiff.sharding import FSDP_AXIS, make_mesh
from jaxdiff.sharding import replicated_sharding
assert jax.device_count() == 8, jax.devices()
root = sys.argv[1]
split_all = placement.fsdp_sharding
placement.fsdp_sharding = lambda tree, mesh: split_all(tree, mesh, min_size=0)

def record_state_shardings(module):
    # Every make_train_step(state_sharding=...) that ``module`` (the training loop's) makes.
    made, real = [], module.make_train_step
    module.make_train_step = lambda *a, **k: made.append(k["state_sharding"]) or real(*a, **k)
    return made

def n_split(shardings):
    return sum(FSDP_AXIS in tuple(s.spec) for s in jax.tree.leaves(shardings))

def compare_one_step(a, b, *, lr):
    # States of two runs after one Adam step from the same start. Adam's moments (0.1 g and
    # 0.001 g^2: the clipped gradient g) agree to rtol 1e-4, atol 1e-5 of their largest value;
    # params and EMA to rtol 1e-5, atol 1e-6 wherever |g| >= 1e-3 of its leaf's largest |g| and
    # >= 1e-6 of the largest of all. Below that Adam's first update lr * g / (|g| + eps) may be
    # lr * sign(rounding noise) (e.g. the attention key biases: softmax ignores them, their exact
    # gradient is 0): there only |a - b| <= 2.5 lr. At least 80% of the elements are compared
    # tightly.
    def moments(state, name):
        flat, _ = jax.tree_util.tree_flatten_with_path(state.opt_state)
        return [x for path, x in flat if f".{name}[" in jax.tree_util.keystr(path)]

    mu_a, mu_b = moments(a, "mu"), moments(b, "mu")
    assert len(mu_a) == len(jax.tree.leaves(a.params)), len(mu_a)
    for name in ("mu", "nu"):
        xs, ys = moments(a, name), moments(b, name)
        scale = max(float(np.max(np.abs(x))) for x in xs)
        for x, y in zip(xs, ys):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * scale, err_msg=name)
    flat, _ = jax.tree_util.tree_flatten_with_path((a.params, a.ema_params))
    other = jax.tree.leaves((b.params, b.ema_params))
    diff, tight, total = 0.0, 0, 0
    top = max(float(np.max(np.abs(g))) for g in mu_a)
    for (path, x), y, g in zip(flat, other, mu_a + mu_a):
        ok = np.abs(g) >= max(1e-3 * float(np.max(np.abs(g))), 1e-6 * top)
        np.testing.assert_allclose(x[ok], y[ok], rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
        assert float(np.max(np.abs(x - y), initial=0.0)) <= 2.5 * lr, jax.tree_util.keystr(path)
        diff = max(diff, float(np.max(np.abs(x[ok] - y[ok]), initial=0.0)))
        tight, total = tight + int(ok.sum()), total + ok.size
    assert tight >= 0.8 * total, (tight, total)
    return diff, tight / total


def load(ckpt_dir, target):
    # The latest checkpoint, replicated over a 1-D mesh (a reader: any writer's sharding).
    repl = replicated_sharding(make_mesh())
    ck = Checkpointer(ckpt_dir, None, read_only=True)
    try:
        state, _, step = ck.restore_latest(abstract_target(
            target, jax.tree.map(lambda _: repl, target)))
    finally:
        ck.close()
    return step, jax.tree.map(np.asarray, state)
"""

_RESUME = _PRELUDE + textwrap.dedent("""
    from jaxdiff.data import BatchIterator
    from jaxdiff.training import (IncompatibleCheckpointError, OptimizerConfig, Periodic,
                                  TrainerSettings, TrainTask, fit)
    from tests.test_training import tiny_data, tiny_setup

    mesh = make_mesh(fsdp=4)
    repl = replicated_sharding(mesh)
    restores = []
    real_restore = Checkpointer.restore_latest

    def spy(self, target):
        out = real_restore(self, target)
        restores.append((target, out))
        return out

    Checkpointer.restore_latest = spy

    def init_params(abstract):   # tiny_setup's params (and key, optimizer below)
        params = tiny_setup(lr=3e-3)[0].params
        return jax.eval_shape(lambda: params) if abstract else params

    _, _, _, loss_fn = tiny_setup(lr=3e-3)
    data = tiny_data(48)

    def run(workdir, steps, compat=None):
        settings = TrainerSettings(
            workdir=os.path.join(root, workdir), num_steps=steps, batch_size=16,
            optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=2, total_steps=100),
            ema_decay=0.9, log_every=1, checkpoint_every=2, keep_checkpoints=3, prefetch=1,
            fsdp=4, progress=False)
        task = TrainTask(init_params=init_params, key=jax.random.PRNGKey(1), loss_fn=loss_fn,
                         data=BatchIterator.source(data, 16, 0),
                         compat=compat or {"model": "tiny"}, hyperparams={"num_steps": steps},
                         periodic=[Periodic("grid", 1000, lambda n, st: None)])
        return fit(settings, task, mesh=mesh)

    assert run("straight", 4)["end_step"] == 4
    assert run("resumed", 2)["end_step"] == 2
    summary = run("resumed", 4)
    assert summary["start_step"] == 2 and summary["end_step"] == 4, summary
    target, (state, data_state, step) = restores[-1]
    assert step == 2 and data_state["index"] > 0, (step, data_state)
    # Restored straight into the split shardings: each leaf has its target's sharding.
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(target)):
        assert a.sharding == b.sharding, (a.sharding, b.sharding)
    assert n_split(jax.tree.map(lambda x: x.sharding, target)) >= 6
    expected = placement.fsdp_sharding(jax.eval_shape(lambda: tiny_setup()[0]), mesh)
    assert [s.spec for s in jax.tree.leaves(expected)] == [
        x.sharding.spec for x in jax.tree.leaves(state)]
    # Exact resume: 2 + 2 steps == 4 in one go (params, Adam moments, EMA, key, step).
    shapes = jax.eval_shape(lambda: tiny_setup()[0])
    s4, a = load(os.path.join(root, "straight", "checkpoints"), shapes)
    r4, b = load(os.path.join(root, "resumed", "checkpoints"), shapes)
    assert s4 == r4 == 4
    for x, y in zip(jax.tree.leaves((a.params, a.opt_state, a.ema_params, a.step)),
                    jax.tree.leaves((b.params, b.opt_state, b.ema_params, b.step))):
        np.testing.assert_array_equal(x, y)
    # The fsdp=4 checkpoint read into another split (fsdp=2): same values, the new shardings.
    target2 = abstract_target(shapes, split_all(shapes, make_mesh(fsdp=2), min_size=0))
    ck = Checkpointer(os.path.join(root, "resumed", "checkpoints"), None, read_only=True)
    state2 = ck.restore_latest(target2)[0]
    ck.close()
    for x, t, y in zip(jax.tree.leaves(state2), jax.tree.leaves(target2), jax.tree.leaves(b)):
        assert x.sharding == t.sharding
        np.testing.assert_array_equal(np.asarray(x), y)
    # The compatibility check still applies to a sharded target, before anything is read.
    try:
        run("resumed", 6, compat={"model": "other"})
    except IncompatibleCheckpointError as e:
        assert "different config" in str(e) and "model" in str(e), e
    else:
        raise AssertionError("resumed a checkpoint of another config")
    print("OK")
""")


def _run(script, tmp_path, timeout=300, extra=()):
    # XLA's backend optimisation off: compiling is most of these tests' time (the programs
    # compared are compiled alike).
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS=(
        "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"))
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path), *extra], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-3000:] + r.stderr[-4000:]
    return r.stdout


@pytest.mark.slow
def test_fsdp_resume_restores_split_leaves_and_is_exact(tmp_path):
    """The training loop (``fit``) on a ``("data", "fsdp")`` mesh of 2 x 4 (TinyNet): the resumed
    run's restored leaves already carry the split shardings (no replicated restore), 2 + 2 steps
    equal 4 in one go bitwise, the checkpoint reads into another split (fsdp=2) and replicated,
    and a checkpoint of another config is still refused."""
    _run(_RESUME, tmp_path)


def test_abstract_target_requires_a_sharding_per_leaf():
    repl = replicated_sharding(make_mesh())
    tree = {"w": jax.ShapeDtypeStruct((4, 2), np.float32, sharding=repl),
            "b": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match=r"leaf \['b'\] \(ndarray\) has no sharding"):
        abstract_target(tree)
    out = abstract_target(tree, {"w": repl, "b": repl})
    assert out["b"].sharding == repl and out["w"].shape == (4, 2)
    with pytest.raises(ValueError, match="structure of target_state"):
        abstract_target(tree, {"w": repl})


# One step from the same start with no warm-up (a zero first learning rate would leave the
# parameters unchanged and the comparison empty); a 2-level autoencoder without attention.
_VAE_TINY = ["--config.model.block_channels=(8,8)", "--config.model.mid_attention=False",
             "--config.model.norm_groups=4", "--config.model.latent_channels=2",
             "--config.training.batch_size=8", "--config.training.log_every=1",
             "--config.training.warmup_steps=0", "--config.training.lr_schedule=constant",
             "--config.training.learning_rate=1e-3", "--config.eval.every=1000",
             "--config.eval.batch_size=8", "--config.eval.grid=4", "--config.eval.num_examples=8"]

_VAE = _PRELUDE + textwrap.dedent("""
    import ml_collections
    from experiments import train_vae_mnist, vae_lib
    from tests.test_data import write_fake_mnist

    TINY = json.loads(sys.argv[2])
    write_fake_mnist(os.path.join(root, "mnist"), n_train=32, n_test=8)
    made = record_state_shardings(trainer)
    out = {}
    for fsdp in (1, 4):
        workdir = os.path.join(root, f"vae{fsdp}")
        summary = train_vae_mnist.main([
            f"--workdir={workdir}", f"--config.data.data_dir={os.path.join(root, 'mnist')}",
            "--config.training.num_steps=1", f"--config.training.fsdp={fsdp}", *TINY])
        assert summary["end_step"] == summary["checkpoint_step"] == 1, summary
        cfg = ml_collections.ConfigDict(json.load(open(os.path.join(workdir, "config.json"))))
        assert cfg.training.fsdp == fsdp
        target, _, _ = vae_lib.init_state(cfg, vae_lib.build_model(cfg), make_mesh(),
                                          abstract=True)
        (row,) = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
        out[fsdp] = (load(os.path.join(workdir, "checkpoints"), target)[1], row,
                     summary["eval"])
    assert made[0] is None and n_split(made[1]) >= 10, made
    (a, row_a, eval_a), (b, row_b, eval_b) = out[1], out[4]
    moved = max(float(np.max(np.abs(x - y))) for x, y in
                zip(jax.tree.leaves(a.params), jax.tree.leaves(a.ema_params)))
    assert moved > 5e-5, moved      # the step changed the parameters (the EMA lags them)
    for k in ("loss", "grad_norm"):
        np.testing.assert_allclose(row_a[k], row_b[k], rtol=1e-5, err_msg=k)
    diff, frac = compare_one_step(a, b, lr=1e-3)
    np.testing.assert_allclose(eval_a["mse"], eval_b["mse"], rtol=1e-4)
    print("max |state diff|", diff, "on", frac, "of the elements")
    print("OK")
""")




# The latent model of tests/test_latent_mnist.py shrunk to one UNet level (8 channels,
# cross-attention, no middle block) and a 1-layer text encoder of width 8, on the autoencoder of
# the first run above; the EMA model exported (gathered from the split state).
_LATENT_TINY = ["--config.model.in_channels=2", "--config.model.out_channels=2",
                "--config.model.block_channels=(8,)", "--config.model.norm_groups=4",
                "--config.model.num_heads=1", "--config.model.context_dim=8",
                "--config.model.attention=(\"cross\",)", "--config.model.mid_block=False",
                "--config.text.hidden_size=8", "--config.text.intermediate_size=16",
                "--config.text.num_hidden_layers=1", "--config.text.num_attention_heads=2",
                "--config.training.batch_size=8", "--config.training.log_every=1",
                "--config.training.warmup_steps=0", "--config.training.lr_schedule=constant",
                "--config.training.learning_rate=1e-3", "--config.sampling.every=0"]

_LATENT = textwrap.dedent("""
    from experiments import latent_data, latent_lib, train_latent_mnist

    TINY = json.loads(sys.argv[3])
    # A stand-in loss over all the parameters and the batch: compiling the real one (UNet with
    # cross-attention + text encoder) twice on 8 devices takes minutes on 2 cores; the real
    # model's sharded step is what the autoencoder above checks. What is checked here is the
    # trainer: mesh, sharded restore target, split step, checkpoint, export of the gathered EMA.
    def stand_in_loss(*args, **kwargs):
        def loss_fn(params, batch, key):
            x = jnp.mean(batch["mean"] ** 2) + jnp.mean(batch["std"])
            leaves = jax.tree.leaves(params)
            return x * sum(jnp.mean((p - 0.1) ** 2) for p in leaves) / len(leaves), {}
        return loss_fn

    import jax.numpy as jnp
    latent_lib.make_loss_fn = stand_in_loss
    made = record_state_shardings(trainer)
    out = {}
    for fsdp in (1, 4):
        workdir = os.path.join(root, f"latent{fsdp}")
        summary = train_latent_mnist.main([
            f"--workdir={workdir}", f"--config.data.data_dir={os.path.join(root, 'mnist')}",
            f"--config.vae_workdir={os.path.join(root, 'vae1')}",
            "--config.training.num_steps=1", f"--config.training.fsdp={fsdp}",
            f"--config.export_diffusers={fsdp > 1}", *TINY])
        assert summary["end_step"] == summary["checkpoint_step"] == 1, summary
        if fsdp > 1:
            assert os.path.isfile(os.path.join(summary["diffusers"], "model_index.json"))
        cfg = ml_collections.ConfigDict(json.load(open(os.path.join(workdir, "config.json"))))
        assert cfg.training.fsdp == fsdp
        tokenizer = latent_data.build_tokenizer(os.path.join(workdir, latent_data.TOKENIZER_DIR),
                                                cfg.text.max_length)
        target, _, _ = latent_lib.init_state(cfg, latent_lib.build_unet(cfg).config,
                                             latent_data.text_config(cfg, tokenizer), make_mesh(),
                                             abstract=True)
        (row,) = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
        out[fsdp] = (load(os.path.join(workdir, "checkpoints"), target)[1], row)
    assert made[0] is None and n_split(made[1]) >= 10, made
    (a, row_a), (b, row_b) = out[1], out[4]
    for k in ("loss", "grad_norm"):
        np.testing.assert_allclose(row_a[k], row_b[k], rtol=1e-5, err_msg=k)
    diff, frac = compare_one_step(a, b, lr=1e-3)
    print("latent: max |state diff|", diff, "on", frac, "of the elements")
    print("OK")
""")


@pytest.mark.slow
def test_vae_and_latent_trainers_fsdp_step_equals_replicated(tmp_path):
    """``training.fsdp=4`` (state split over 4 devices) vs 1 (replicated), for
    ``train_vae_mnist`` and then ``train_latent_mnist`` (on the first autoencoder, with a
    stand-in loss): one step gives the same loss and gradient norm, Adam moments, parameters and
    EMA (see ``compare_one_step``: only the reduction order differs); the autoencoder's
    evaluation and the latent run's diffusers export (the EMA params gathered) work from the
    split state."""
    import json

    script = _VAE.replace('print("OK")', "") + _LATENT
    print(_run(script, tmp_path, extra=[json.dumps(_VAE_TINY), json.dumps(_LATENT_TINY)]))
