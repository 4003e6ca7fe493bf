"""Train state, optimizer, EMA, the jitted data-parallel step (1 vs 8 virtual CPU devices)."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.losses import diffusion_loss
from jaxdiff.schedules import make_schedule
from jaxdiff.training import (OptimizerConfig, create_train_state, ema_decay_at, make_lr_schedule,
                              make_optimizer, make_train_step)
from jaxdiff.sharding import make_mesh, replicate, shard_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyNet(nn.Module):
    """Stand-in denoiser: x [B,H,W,C], t [B], labels [B] -> [B,H,W,C]."""
    features: int = 8

    @nn.compact
    def __call__(self, x, t, labels):
        temb = nn.Dense(self.features)(jnp.sin(t[:, None].astype(jnp.float32) / 100.0))
        lemb = nn.Embed(11, self.features)(labels)
        h = nn.Conv(self.features, (3, 3))(x) + (temb + lemb)[:, None, None, :]
        return nn.Conv(x.shape[-1], (3, 3))(nn.silu(h))


def tiny_setup(lr=1e-3, hw=8, total_steps=100, warmup=2, grad_clip_norm=1.0):
    """(state, tx, lr_fn, loss_fn) for TinyNet on [B, hw, hw, 1] images."""
    model = TinyNet()
    sched = make_schedule("linear", 100)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, hw, hw, 1)),
                        jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32))
    tx, lr_fn = make_optimizer(OptimizerConfig(learning_rate=lr, warmup_steps=warmup,
                                               total_steps=total_steps,
                                               grad_clip_norm=grad_clip_norm))

    def loss_fn(p, batch, key):
        apply = lambda p_, x, t, c: model.apply(p_, x, t, c)
        return diffusion_loss(apply, p, sched, batch["image"], key, batch["label"],
                              cond_drop_prob=0.1, null_cond=jnp.int32(10))

    state = create_train_state(params, tx, jax.random.PRNGKey(1))
    return state, tx, lr_fn, loss_fn


def tiny_data(n=64, hw=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.uniform(-1, 1, (n, hw, hw, 1)).astype(np.float32),
            "label": rng.integers(0, 10, n).astype(np.int32)}


def test_ema_decay_warmup():
    assert float(ema_decay_at(0, 0.999)) == pytest.approx(0.1)
    assert float(ema_decay_at(10, 0.999)) == pytest.approx(11 / 20)
    assert float(ema_decay_at(10**6, 0.999)) == pytest.approx(0.999)


def test_lr_schedule_warmup_then_cosine():
    fn = make_lr_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=10, total_steps=110))
    assert float(fn(0)) == 0.0 and float(fn(5)) == pytest.approx(0.5)
    assert float(fn(10)) == pytest.approx(1.0)
    assert float(fn(110)) == pytest.approx(0.0, abs=1e-6)
    const = make_lr_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=0,
                                             schedule="constant"))
    assert float(const(1000)) == 1.0


@pytest.mark.parametrize("kw,message", [
    (dict(learning_rate=-1.0), "learning_rate"), (dict(total_steps=0), "total_steps"),
    (dict(schedule="linear"), "schedule"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(end_lr_factor=-0.1), "end_lr_factor"), (dict(grad_clip_norm=-1.0), "grad_clip_norm")])
def test_optimizer_config_rejects_invalid(kw, message):
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(**kw)


def test_grad_clip_norm_zero_disables_clipping():
    off, _ = make_optimizer(OptimizerConfig(grad_clip_norm=0.0))
    on, _ = make_optimizer(OptimizerConfig(grad_clip_norm=1.0))
    params = {"w": jnp.ones(3)}
    assert len(off.init(params)) == 1 and len(on.init(params)) == 2  # chain of (clip,) adamw


def test_make_mesh_is_a_1d_data_mesh_over_all_devices():
    from jax.sharding import AxisType

    mesh = make_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.size == jax.device_count()
    assert mesh.axis_types == (AxisType.Auto,)


@pytest.mark.slow
def test_train_step_learns_compiles_once_and_updates_ema():
    state, tx, lr_fn, loss_fn = tiny_setup(lr=3e-3)
    mesh = make_mesh()
    step_fn = make_train_step(loss_fn, tx, mesh, ema_decay=0.9, lr_schedule=lr_fn)
    state = replicate(state, mesh)
    data = tiny_data(32)
    batch = shard_batch(data, mesh)
    p0 = jax.device_get(state.params)
    losses = []
    for _ in range(30):
        state, m = step_fn(state, batch)
        losses.append(float(m["loss"]))
        assert bool(m["finite"])
    assert step_fn._cache_size() == 1  # no recompiles
    assert int(state.step) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    # EMA lies between the initial and the current params, and differs from both.
    leaf = lambda t: np.asarray(jax.tree.leaves(t)[0])
    e, p, i = leaf(state.ema_params), leaf(state.params), leaf(p0)
    assert not np.allclose(e, p) and not np.allclose(e, i)


@pytest.mark.slow
def test_nonfinite_batch_leaves_state_unchanged():
    state, tx, lr_fn, loss_fn = tiny_setup()
    mesh = make_mesh()
    step_fn = make_train_step(loss_fn, tx, mesh, ema_decay=0.9, donate=False)
    state = replicate(state, mesh)
    bad = tiny_data(8)
    bad["image"][0, 0, 0, 0] = np.nan
    new, m = step_fn(state, shard_batch(bad, mesh))
    assert not bool(m["finite"])
    assert int(new.step) == 0
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


_MULTI = textwrap.dedent("""
    import jax, numpy as np
    from tests.test_training import tiny_setup, tiny_data
    from jaxdiff.training import make_train_step
    from jaxdiff.sharding import make_mesh, replicate, shard_batch
    from jaxdiff.sharding import check_batch_divisible
    assert jax.device_count() == 8, jax.devices()
    data = tiny_data(16)
    out = {}
    for n in (1, 8):
        state, tx, lr_fn, loss_fn = tiny_setup()
        mesh = make_mesh(jax.devices()[:n])
        step_fn = make_train_step(loss_fn, tx, mesh, ema_decay=0.9)
        state = replicate(state, mesh)
        batch = shard_batch(data, mesh)
        if n == 8:
            assert len(batch["image"].sharding.device_set) == 8
        for _ in range(3):
            state, m = step_fn(state, batch)
        out[n] = jax.device_get(state.params), float(m["loss"])
    for a, b in zip(jax.tree.leaves(out[1][0]), jax.tree.leaves(out[8][0])):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(out[1][1], out[8][1], rtol=1e-5)
    try:
        check_batch_divisible(12, make_mesh())
    except ValueError as e:
        assert "multiple of the number of devices 8" in str(e)
    else:
        raise AssertionError("no ValueError for batch 12 on 8 devices")
    try:
        shard_batch(tiny_data(12), make_mesh())
    except ValueError as e:
        assert "not divisible" in str(e)
    else:
        raise AssertionError("no ValueError")
    print("OK")
""")


@pytest.mark.slow
def test_eight_virtual_devices_match_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-c", _MULTI], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr[-3000:]
