"""FSDP-style parameter sharding (``make_mesh(fsdp=k)``, ``fsdp_sharding``, ``place``,
``make_train_step(state_sharding=...)``): on 8 simulated CPU devices the sharded train step
computes what the replicated one computes, and the state really is split over the ``fsdp`` axis.

The 8 devices live in a subprocess (``--xla_force_host_platform_device_count=8``): the device count
is fixed when JAX initialises, and this pytest process has one device.
"""

import os
import subprocess
import sys
import textwrap

import jax
import pytest

from jaxdiff.sharding import make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from tests.test_training import tiny_setup, tiny_data
    from jaxdiff.training import make_train_step
    from jaxdiff.sharding import FSDP_AXIS, fsdp_sharding, make_mesh, place, shard_batch
    assert jax.device_count() == 8, jax.devices()

    # The rule: the largest dimension divisible by the axis size (last on a tie), else replicated.
    mesh = make_mesh(fsdp=4)
    assert mesh.axis_names == ("data", FSDP_AXIS) and mesh.devices.shape == (2, 4)
    shapes = {"conv": (3, 3, 8, 16), "tie": (8, 8), "first": (12, 8), "odd": (3, 5),
              "small": (4,), "scalar": ()}
    specs = {k: s.spec for k, s in fsdp_sharding(
        {k: jax.ShapeDtypeStruct(v, np.float32) for k, v in shapes.items()}, mesh,
        min_size=4).items()}
    assert specs == {"conv": P(None, None, None, FSDP_AXIS), "tie": P(None, FSDP_AXIS),
                     "first": P(FSDP_AXIS, None), "odd": P(), "small": P(FSDP_AXIS),
                     "scalar": P()}, specs
    assert fsdp_sharding(jax.ShapeDtypeStruct((64,), np.float32), mesh,
                         min_size=65).spec == P()

    data = tiny_data(16)
    out = {}
    for fsdp in (1, 4, 8):
        state, tx, lr_fn, loss_fn = tiny_setup(lr=3e-3)
        mesh = make_mesh(fsdp=fsdp)
        shardings = fsdp_sharding(state, mesh, min_size=0)
        state = place(state, shardings)
        step_fn = make_train_step(loss_fn, tx, mesh, ema_decay=0.9, state_sharding=shardings)
        batch = shard_batch(data, mesh)
        assert len(batch["image"].sharding.device_set) == 8
        assert batch["image"].addressable_shards[0].data.shape[0] == 2   # 16 rows / 8 devices
        losses = []
        for _ in range(3):
            state, m = step_fn(state, batch)
            losses.append(float(m["loss"]))
        assert step_fn._cache_size() == 1
        leaves = jax.tree.leaves(state)
        split = [x for x in leaves if FSDP_AXIS in jax.tree.leaves(tuple(x.sharding.spec))]
        if fsdp > 1:
            # params, EMA and both Adam moments: 6 of TinyNet's 7 leaves each (a [1] bias stays)
            assert len(split) == 4 * 6, [x.sharding.spec for x in leaves]
            for x in split:
                dim = list(x.sharding.spec).index(FSDP_AXIS)
                assert x.addressable_shards[0].data.shape[dim] == x.shape[dim] // fsdp
            kernel = state.params["params"]["Conv_0"]["kernel"]      # [3, 3, 1, 8]
            assert kernel.sharding.spec == P(None, None, None, FSDP_AXIS)
            assert kernel.addressable_shards[0].data.shape == (3, 3, 1, 8 // fsdp)
        else:
            assert split == []
        out[fsdp] = jax.device_get(state), losses
    ref_state, ref_losses = out[1]
    for fsdp in (4, 8):
        st, losses = out[fsdp]
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(ref_state), jax.tree.leaves(st)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        print("fsdp", fsdp, "max |param diff|", max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(st.params))))
    print("OK")
""")


@pytest.mark.slow
def test_fsdp_step_equals_replicated_step_on_eight_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr[-3000:]


_TRAIN = textwrap.dedent("""
    import json, os, sys
    import jax, numpy as np
    import jaxdiff.training.placement as placement
    import jaxdiff.training.trainer as trainer
    from experiments import mnist_lib
    from experiments.configs import mnist_smoke
    from jaxdiff.sharding import FSDP_AXIS
    from tests.test_data import write_fake_mnist
    root = sys.argv[1]
    write_fake_mnist(os.path.join(root, "mnist"), n_train=32, n_test=8)
    c = mnist_smoke.get_config()
    c.data.data_dir = os.path.join(root, "mnist")
    c.training.num_steps, c.training.fsdp = 2, 4
    c.training.log_every = c.training.checkpoint_every = 1
    # The smoke UNet's leaves are all below FSDP_MIN_SIZE: split every divisible one.
    split_all = placement.fsdp_sharding
    placement.fsdp_sharding = lambda tree, mesh: split_all(tree, mesh, min_size=0)
    made = []
    real = trainer.make_train_step
    trainer.make_train_step = lambda *a, **k: made.append(k["state_sharding"]) or real(*a, **k)
    summary = mnist_lib.train(c, os.path.join(root, "run"))
    assert summary["end_step"] == 2 and summary["checkpoint_step"] == 2, summary
    assert summary["grid"] is not None       # sampled from the gathered EMA params
    (sharding,) = made
    specs = [s.spec for s in jax.tree.leaves(sharding.params)]
    assert any(FSDP_AXIS in tuple(p) for p in specs), specs
    rows = [json.loads(l) for l in open(os.path.join(root, "run", "metrics.jsonl"))]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows), rows
    c.training.fsdp = 3
    try:
        mnist_lib.train(c, os.path.join(root, "run3"))
    except ValueError as e:
        assert "training.fsdp must be a positive divisor of the number of devices 8" in str(e)
    else:
        raise AssertionError("no ConfigError for training.fsdp=3 on 8 devices")
    assert not os.path.exists(os.path.join(root, "run3"))
    print("OK")
""")


@pytest.mark.slow
def test_train_mnist_with_fsdp(tmp_path):
    """``training.fsdp=4`` on 8 simulated devices: the smoke run trains with a split state (the
    step equals the replicated one: the test above), checkpoints, and writes its grid (the EMA
    params gathered); ``training.fsdp=3`` is a ConfigError before anything is written."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-c", _TRAIN, str(tmp_path)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]


def test_make_mesh_rejects_fsdp_that_does_not_divide_the_devices():
    n = jax.device_count()
    for bad in (0, -1, n + 1, 1.5, True):
        with pytest.raises(ValueError, match="fsdp must be a positive divisor"):
            make_mesh(fsdp=bad)
    assert make_mesh(fsdp=1).axis_names == ("data",)
