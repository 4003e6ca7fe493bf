"""FSDP in the trainers (issue 17), on 8 simulated CPU devices in a subprocess (the device count
is fixed when JAX initialises; this pytest process has one device):

- a resumed ``training.fsdp`` run reads its checkpoint straight into the split shardings
  (``train_lib.restore_or_init`` -> ``Checkpointer.restore_latest`` of a sharded abstract target),
  and 2 + 2 resumed steps equal 4 in one go, bitwise;

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

from jaxdiff.training import abstract_target, make_mesh, replicated_sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Shared by the scripts: every divisible leaf split; the train steps' state shardings recorded.
_PRELUDE = """
import json, os, sys
import jax, numpy as np
from experiments import train_lib
from jaxdiff.training import FSDP_AXIS, Checkpointer, abstract_target, make_mesh
from jaxdiff.training import replicated_sharding
assert jax.device_count() == 8, jax.devices()
root = sys.argv[1]
split_all = train_lib.fsdp_sharding
train_lib.fsdp_sharding = lambda tree, mesh: split_all(tree, mesh, min_size=0)

def n_split(shardings):
    return sum(FSDP_AXIS in tuple(s.spec) for s in jax.tree.leaves(shardings))

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
    import ml_collections
    from jaxdiff.training import IncompatibleCheckpointError, replicate
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

    def init_state(abstract):
        state, tx, lr_fn, _ = tiny_setup(lr=3e-3)
        if abstract:  # replicated shapes, as the trainers' init_state(abstract=True) give
            shapes = jax.eval_shape(lambda: state)
            return abstract_target(shapes, jax.tree.map(lambda _: repl, shapes)), tx, lr_fn
        return replicate(state, mesh), tx, lr_fn

    _, _, _, loss_fn = tiny_setup(lr=3e-3)
    data = tiny_data(48)

    def run(workdir, steps, compat=None):
        c = ml_collections.ConfigDict(dict(
            seed=0, data=dict(prefetch=1), sampling=dict(every=1000),
            training=dict(batch_size=16, num_steps=steps, log_every=1, checkpoint_every=2,
                          keep_checkpoints=3, ema_decay=0.9, tensorboard=False, fsdp=4)))
        return train_lib.run_training(
            c, os.path.join(root, workdir), mesh, init_state=init_state, loss_fn=loss_fn,
            compat=compat or {"model": "tiny"}, hyperparams={"num_steps": steps}, data=data,
            grid_fn=lambda st: np.zeros((1, 8, 8, 1), np.float32), grid_columns=1)

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
    expected = train_lib.fsdp_sharding(jax.eval_shape(lambda: tiny_setup()[0]), mesh)
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
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path), *extra], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-3000:] + r.stderr[-4000:]
    return r.stdout


def test_fsdp_resume_restores_split_leaves_and_is_exact(tmp_path):
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
