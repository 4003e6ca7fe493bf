"""Orbax checkpoints: exact resume (params bitwise, data position), incompatible configs,
non-finite loss keeps the last good checkpoint, stop signals, atomic writes, keep-last-k."""

import os

import jax
import numpy as np
import pytest

from jaxdiff.data import BatchIterator, Prefetcher
from jaxdiff.training import (Checkpointer, IncompatibleCheckpointError, NonFiniteLossError,
                              StopOnSignal, make_mesh, make_train_step, replicate, train_loop)
from tests.test_training import tiny_data, tiny_setup

CONFIG = {"model": {"features": 8}, "batch_size": 8}


def run(workdir, num_steps, *, stop_at=None, data=None, config=CONFIG, save_every=3, lr=1e-3,
        keep=2):
    """Trains (resuming from workdir if it has a checkpoint); returns (state, checkpointer)."""
    data = tiny_data(40) if data is None else data
    state, tx, _, loss_fn = tiny_setup(lr=lr)
    mesh = make_mesh()
    step_fn = make_train_step(loss_fn, tx, mesh, ema_decay=0.9)
    state = replicate(state, mesh)
    ckpt = Checkpointer(str(workdir), config, max_to_keep=keep, save_interval_steps=save_every)
    data_state = {"epoch": 0, "index": 0}
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state, data_state, _ = restored
    it = BatchIterator.from_state(data, 8, seed=3, state=data_state, process_index=0,
                                  process_count=1)
    stop = StopOnSignal()

    def on_step(step, _state):
        if stop_at is not None and step == stop_at:
            stop.request()

    with Prefetcher(it, 2) as batches, stop:
        state = train_loop(state, step_fn, batches, mesh, num_steps, checkpointer=ckpt,
                           on_step=on_step, stop=stop)
    ckpt.close()
    return state, ckpt


def test_exact_resume_is_bitwise(tmp_path):
    # 40 examples / batch 8 = 5 batches per epoch: the 14 steps cross two epoch boundaries.
    full, _ = run(tmp_path / "a", 14)
    part, ck = run(tmp_path / "b", 14, stop_at=7)  # stop signal at step 7: save and return
    assert int(part.step) == 7 and ck.latest_step() == 7
    resumed, _ = run(tmp_path / "b", 14)
    assert int(resumed.step) == 14
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_keeps_last_k_and_writes_atomically(tmp_path):
    _, ck = run(tmp_path, 10, save_every=3, keep=2)
    assert ck.all_steps() == [9, 10]
    names = os.listdir(tmp_path)
    assert not [n for n in names if "tmp" in n], names
    # A half-written step (Orbax's temporary name) is never taken for a checkpoint.
    (tmp_path / "12.orbax-checkpoint-tmp-1234").mkdir()
    assert Checkpointer(str(tmp_path), CONFIG).latest_step() == 10


def test_incompatible_config_is_a_clear_value_error(tmp_path):
    run(tmp_path, 3)
    with pytest.raises(ValueError, match="different config.*batch_size"):
        run(tmp_path, 6, config={"model": {"features": 8}, "batch_size": 16})


def test_incompatible_shapes_is_a_clear_value_error(tmp_path):
    run(tmp_path, 3)
    state, tx, _, _ = tiny_setup(hw=8)
    ck = Checkpointer(str(tmp_path), CONFIG)
    bigger = state.replace(params=jax.tree.map(lambda x: np.zeros(x.shape + (2,), x.dtype),
                                               state.params))
    with pytest.raises(IncompatibleCheckpointError, match="parameter shapes"):
        ck.restore_latest(bigger)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    good, ck = run(tmp_path, 3, save_every=3)
    assert ck.latest_step() == 3
    bad = tiny_data(40)
    bad["image"][:] = np.nan  # every later batch is NaN
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 4"):
        run(tmp_path, 9, data=bad, save_every=1)
    ck = Checkpointer(str(tmp_path), CONFIG)
    assert ck.latest_step() == 3
    restored, data_state, _ = ck.restore_latest(replicate(tiny_setup()[0], make_mesh()))
    for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert data_state == {"epoch": 0, "index": 3}


def test_huge_learning_rate_is_caught(tmp_path):
    with pytest.raises(NonFiniteLossError):
        run(tmp_path, 40, lr=1e30, save_every=100)
    assert Checkpointer(str(tmp_path), CONFIG).latest_step() is None


def test_sigterm_and_sigint_only_set_the_flag():
    import signal

    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # a first Ctrl-C is a request too
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL or callable(
        signal.getsignal(signal.SIGTERM))
