"""Orbax checkpoints: exact resume (params bitwise, data position), incompatible configs and
optimizer states, non-finite loss keeps the last good checkpoint, metrics read at sync points only,
stop signals (real ones, several processes agreeing), atomic writes, keep-last-k."""

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

import jaxdiff.training.loop as loop_mod
from jaxdiff.data import BatchIterator, Prefetcher
from jaxdiff.training import (CheckpointError, Checkpointer, IncompatibleCheckpointError,
                              NonFiniteLossError, StopOnSignal, make_train_step, train_loop)
from jaxdiff.sharding import make_mesh, replicate, replicated_sharding
from tests.test_training import tiny_data, tiny_setup

CONFIG = {"model": {"features": 8}, "batch_size": 8}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(workdir, num_steps, *, stop_at=None, signal_at=None, data=None, config=CONFIG,
        save_every=3, lr=1e-3, keep=2, sync_every=100, on_metrics=None, on_step=None,
        hyperparams=None, grad_clip_norm=1.0):
    """Trains (resuming from workdir if it has a checkpoint); returns (state, checkpointer).

    ``stop_at``: request a stop (as a signal handler would) after that step; ``signal_at``: send
    a real SIGTERM to this process after that step (train_loop then installs its own handlers).
    """
    data = tiny_data(40) if data is None else data
    state, tx, _, loss_fn = tiny_setup(lr=lr, grad_clip_norm=grad_clip_norm)
    mesh = make_mesh()
    step_fn = make_train_step(loss_fn, tx, mesh, ema_decay=0.9)
    state = replicate(state, mesh)
    ckpt = Checkpointer(str(workdir), config, max_to_keep=keep, save_interval_steps=save_every,
                        hyperparams=hyperparams)
    data_state = {"epoch": 0, "index": 0}
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state, data_state, _ = restored
    it = BatchIterator.from_state(data, 8, seed=3, state=data_state, process_index=0,
                                  process_count=1)
    stop = None if signal_at is not None else StopOnSignal()

    def _on_step(step, st):
        if stop_at is not None and step == stop_at:
            stop.request()
        if signal_at is not None and step == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if on_step is not None:
            on_step(step, st)

    with Prefetcher(it, 2) as batches:
        if stop is not None:
            stop.__enter__()
        try:
            state = train_loop(state, step_fn, batches, mesh, num_steps, checkpointer=ckpt,
                               on_step=_on_step, on_metrics=on_metrics, stop=stop,
                               sync_every=sync_every)
        finally:
            if stop is not None:
                stop.__exit__(None, None, None)
            ckpt.close()
    return state, ckpt


@pytest.mark.slow
def test_exact_resume_is_bitwise(tmp_path):
    # 40 examples / batch 8 = 5 batches per epoch: the 14 steps cross two epoch boundaries.
    full, _ = run(tmp_path / "a", 14)
    part, ck = run(tmp_path / "b", 14, stop_at=7)  # stop signal at step 7: save and return
    assert int(part.step) == 7 and ck.latest_step() == 7
    resumed, _ = run(tmp_path / "b", 14)
    assert int(resumed.step) == 14
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_keeps_last_k_and_writes_atomically(tmp_path):
    _, ck = run(tmp_path, 10, save_every=3, keep=2)
    assert ck.all_steps() == [9, 10]
    names = os.listdir(tmp_path)
    assert not [n for n in names if "tmp" in n], names
    # A half-written step (Orbax's temporary name) is never taken for a checkpoint.
    (tmp_path / "12.orbax-checkpoint-tmp-1234").mkdir()
    assert Checkpointer(str(tmp_path), CONFIG).latest_step() == 10


@pytest.mark.slow
def test_incompatible_config_is_a_clear_value_error(tmp_path):
    run(tmp_path, 3)
    with pytest.raises(ValueError, match="different config.*batch_size"):
        run(tmp_path, 6, config={"model": {"features": 8}, "batch_size": 16})


@pytest.mark.slow
def test_incompatible_shapes_is_a_clear_value_error(tmp_path):
    run(tmp_path, 3)
    state, tx, _, _ = tiny_setup(hw=8)
    ck = Checkpointer(str(tmp_path), CONFIG)
    bigger = state.replace(params=jax.tree.map(lambda x: np.zeros(x.shape + (2,), x.dtype),
                                               state.params))
    with pytest.raises(IncompatibleCheckpointError, match="parameter shapes"):
        ck.restore_latest(bigger)


@pytest.mark.slow
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


@pytest.mark.slow
def test_huge_learning_rate_is_caught(tmp_path):
    with pytest.raises(NonFiniteLossError):
        run(tmp_path, 40, lr=1e30, save_every=100)
    assert Checkpointer(str(tmp_path), CONFIG).latest_step() is None


def test_sigterm_and_sigint_only_set_the_flag_second_sigint_interrupts():
    old_term, old_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopOnSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGINT)  # a first Ctrl-C is a request too
        assert stop.requested == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):  # the second one interrupts at once
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):
                time.sleep(0.01)
    # the handlers that were installed before are back
    assert signal.getsignal(signal.SIGTERM) == old_term
    assert signal.getsignal(signal.SIGINT) == old_int


@pytest.mark.slow
def test_real_sigterm_stops_at_that_step_saves_and_restores_handlers(tmp_path):
    caught = []
    sentinel = lambda signum, frame: caught.append(signum)  # noqa: E731
    previous = signal.signal(signal.SIGTERM, sentinel)
    try:
        state, ck = run(tmp_path, 20, signal_at=5, save_every=100)
        assert int(state.step) == 5 and ck.latest_step() == 5
        assert caught == []  # train_loop's handler got it, not the one installed before
        assert signal.getsignal(signal.SIGTERM) is sentinel  # and it was restored afterwards
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
def test_metrics_are_read_at_sync_points_only(tmp_path):
    seen, at_step = [], {}
    run(tmp_path, 10, save_every=6, sync_every=4,
        on_metrics=lambda n, m: seen.append(n), on_step=lambda n, _: at_step.update({n: len(seen)}))
    assert seen == list(range(1, 11))  # every step, in order
    # read at multiples of 4, before the save at 6, and at the end
    assert at_step == {1: 0, 2: 0, 3: 0, 4: 4, 5: 4, 6: 6, 7: 6, 8: 8, 9: 8, 10: 8}


class _Batches:
    """A list of host batches with the ``state`` a train_loop needs."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    @property
    def state(self):
        return {"epoch": 0, "index": self.i}

    def __next__(self):
        self.i += 1
        return self.batches[self.i - 1]


@pytest.mark.slow
def test_nonfinite_step_between_sync_points_is_caught_before_the_next_save(tmp_path):
    state, tx, _, loss_fn = tiny_setup()
    mesh = make_mesh()
    step_fn = make_train_step(loss_fn, tx, mesh, ema_decay=0.9)
    batches = [tiny_data(8, seed=i) for i in range(8)]
    batches[2]["image"][0, 0, 0, 0] = np.nan  # step 3 only; the steps after it are fine
    ck = Checkpointer(str(tmp_path), CONFIG, save_interval_steps=4)
    seen = []
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3"):
        train_loop(replicate(state, mesh), step_fn, _Batches(batches), mesh, 8, checkpointer=ck,
                   on_metrics=lambda n, m: seen.append(n), sync_every=100)
    ck.close()
    assert seen == [1, 2] and ck.latest_step() is None  # nothing saved at step 4


@pytest.mark.slow
def test_processes_agree_on_stopping_at_sync_points(tmp_path, monkeypatch):
    assert loop_mod._any_process(True) and not loop_mod._any_process(False)  # 1 process: real
    calls = []
    monkeypatch.setattr(loop_mod, "_process_count", lambda: 2)

    def other_host_signalled_at_second_sync(flag):
        calls.append(flag)
        return flag or len(calls) == 2

    monkeypatch.setattr(loop_mod, "_any_process", other_host_signalled_at_second_sync)
    # This host is signalled after step 5; it keeps stepping until the save at 6 (a sync point).
    state, ck = run(tmp_path / "a", 20, stop_at=5, save_every=6, sync_every=4)
    assert calls == [False, True] and int(state.step) == 6 and ck.latest_step() == 6
    # Only the other host is signalled (seen at the second sync point, step 8): stop there too.
    calls.clear()
    state, ck = run(tmp_path / "b", 20, save_every=100, sync_every=4)
    assert calls == [False, False] and int(state.step) == 8 and ck.latest_step() == 8


@pytest.mark.slow
def test_optimizer_structure_change_is_a_clear_value_error(tmp_path):
    run(tmp_path, 3)  # clipping on
    with pytest.raises(ValueError, match="optimizer-state structure.*grad_clip_norm"):
        run(tmp_path, 6, grad_clip_norm=0.0)


@pytest.mark.slow
def test_changed_hyperparams_are_logged_and_new_config_keys_tolerated(tmp_path, caplog):
    run(tmp_path, 3, hyperparams={"num_steps": 3, "learning_rate": 1e-3})
    with caplog.at_level(logging.WARNING, logger="jaxdiff.training.checkpoint"):
        state, _ = run(tmp_path, 5, config=dict(CONFIG, seed=0),
                       hyperparams={"num_steps": 5, "learning_rate": 1e-3})
    assert int(state.step) == 5
    assert "num_steps: 3 -> 5" in caplog.text and "learning_rate" not in caplog.text
    assert "predates the compatibility check of seed" in caplog.text


@pytest.mark.slow
def test_restore_into_abstract_target_and_read_only(tmp_path):
    trained, _ = run(tmp_path, 3)
    mesh = make_mesh()
    repl = replicated_sharding(mesh)
    state = tiny_setup()[0]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
                            jax.eval_shape(lambda: state))
    ck = Checkpointer(str(tmp_path), None, read_only=True)
    restored, _, step = ck.restore_latest(abstract)
    ck.close()
    assert step == 3
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(RuntimeError, match="read-only"):
        ck.save(4, restored, {"epoch": 0, "index": 0}, force=True)
    missing = tmp_path / "nothing_here"
    assert Checkpointer(str(missing), None, read_only=True).latest_step() is None
    assert not missing.exists()  # a reader creates no directory



@pytest.fixture(scope="module")
def _saved_3_and_6(tmp_path_factory):
    """A workdir with complete checkpoints at steps 3 and 6 (trained once per module)."""
    workdir = tmp_path_factory.mktemp("saved") / "ck"
    state, _ = run(workdir, 6, save_every=3, keep=3)
    return workdir, state


@pytest.fixture
def saved(_saved_3_and_6, tmp_path):
    """A fresh copy of that workdir, for a test to damage: ``(workdir, state at step 6)``."""
    src, state = _saved_3_and_6
    shutil.copytree(src, tmp_path / "ck")
    return tmp_path / "ck", state


def _target():
    return replicate(tiny_setup()[0], make_mesh())


def _truncate_array_files(step_dir):
    for root, _, files in os.walk(step_dir / "state"):
        for f in files:
            if os.path.basename(root) == "d":  # the OCDBT data files that hold the arrays
                p = os.path.join(root, f)
                with open(p, "r+b") as fh:
                    fh.truncate(os.path.getsize(p) // 2)


def _assert_clear(excinfo, step_dir, what):
    msg = str(excinfo.value)
    assert str(step_dir) in msg and what in msg
    assert "Move or delete" in msg and "previous checkpoint (step 3)" in msg
    assert len(msg) < 1500, msg  # one short cause, not Orbax's whole story
    e = excinfo.value  # no chained Orbax traceback: raised alone or ``from None``
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)


@pytest.mark.slow
def test_truncated_array_file_is_one_checkpoint_error_naming_the_step_dir(saved):
    workdir, _ = saved
    _truncate_array_files(workdir / "6")
    with pytest.raises(CheckpointError) as excinfo:
        Checkpointer(str(workdir), CONFIG).restore_latest(_target())
    _assert_clear(excinfo, workdir / "6", "state")


@pytest.mark.slow
@pytest.mark.parametrize("action, item", [("delete", "meta"), ("truncate", "meta"),
                                          ("truncate", "data"), ("replace", "meta")])
def test_damaged_json_item_is_one_checkpoint_error_naming_the_step_dir(saved, action, item):
    workdir, _ = saved
    path = workdir / "6" / item / "metadata"
    if action == "delete":
        path.unlink()
    elif action == "truncate":
        path.write_text(path.read_text()[:9])
    else:  # valid JSON, but not the object that was written
        path.write_text("[1, 2]")
    with pytest.raises(CheckpointError) as excinfo:
        Checkpointer(str(workdir), CONFIG).restore_latest(_target())
    _assert_clear(excinfo, workdir / "6", item)


@pytest.mark.slow
def test_corrupt_latest_step_is_not_skipped_even_with_a_good_one_before_it(saved):
    # Falling back to step 3 would silently throw away training: the error asks the user instead,
    # and once they move the corrupt directory away, step 3 restores.
    workdir, _ = saved
    _truncate_array_files(workdir / "6")
    ck = Checkpointer(str(workdir), CONFIG, read_only=True)
    with pytest.raises(CheckpointError, match="probably corrupt or truncated"):
        ck.restore_latest(_target())
    assert (workdir / "6").is_dir()  # left in place
    shutil.move(workdir / "6", workdir.parent / "6.bad")
    _, data_state, step = Checkpointer(str(workdir), CONFIG, read_only=True).restore_latest(
        _target())
    assert step == 3 and data_state == {"epoch": 0, "index": 3}


@pytest.mark.slow
def test_incomplete_step_dirs_are_skipped_with_a_warning_and_resume_continues(saved):
    workdir, state6 = saved
    (workdir / "900").mkdir()  # an interrupted copy: an empty step directory
    shutil.copytree(workdir / "6", workdir / "12")
    shutil.rmtree(workdir / "12" / "meta")  # an interrupted save on a non-atomic filesystem
    with pytest.warns(UserWarning) as record:
        restored, data_state, step = Checkpointer(str(workdir), CONFIG).restore_latest(_target())
    text = "\n".join(str(w.message) for w in record)
    assert f"{workdir / '900'} is incomplete (no state, data, meta" in text
    assert f"{workdir / '12'} is incomplete (no meta" in text
    assert step == 6 and data_state == {"epoch": 1, "index": 1}  # 5 batches an epoch
    for a, b in zip(jax.tree.leaves(state6), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Moved aside, not deleted, so that they neither count as the latest step nor block saves.
    assert (workdir / "900.incomplete").is_dir() and (workdir / "12.incomplete").is_dir()
    state, ck = run(workdir, 12, save_every=3, keep=3)
    assert int(state.step) == 12 and ck.all_steps() == [6, 9, 12]


def test_read_only_reader_skips_incomplete_step_dirs_without_moving_them(saved):
    workdir, _ = saved
    (workdir / "900").mkdir()
    ck = Checkpointer(str(workdir), None, read_only=True)
    assert ck.latest_step() == 6
    with pytest.warns(UserWarning, match="900 is incomplete"):
        _, _, step = ck.restore_latest(_target())
    assert step == 6 and (workdir / "900").is_dir()


_WORKER = textwrap.dedent("""
    import os, signal, sys
    import jax
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:
        pass
    pid, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=pid)
    from jaxdiff.data import BatchIterator, Prefetcher
    from jaxdiff.training import Checkpointer, make_train_step, train_loop
    from jaxdiff.sharding import make_mesh, replicate
    from tests.test_training import tiny_data, tiny_setup
    assert jax.process_count() == 2 and jax.device_count() == 2, jax.devices()
    state, tx, _, loss_fn = tiny_setup()
    mesh = make_mesh()
    step_fn = make_train_step(loss_fn, tx, mesh, ema_decay=0.9)
    ckpt = Checkpointer(workdir, {"x": 1}, save_interval_steps=100)

    def on_step(step, _):
        if pid == 1 and step == 5:  # only process 1 is told to stop
            os.kill(os.getpid(), signal.SIGTERM)

    with Prefetcher(BatchIterator(tiny_data(40), 8, seed=3), 2) as batches:
        state = train_loop(replicate(state, mesh), step_fn, batches, mesh, 50, checkpointer=ckpt,
                           on_step=on_step, sync_every=4)
    ckpt.close()
    print(f"RESULT step={int(jax.device_get(state.step))} latest={ckpt.latest_step()}")
""")


@pytest.mark.slow
def test_two_processes_stop_together_when_only_one_is_signalled(tmp_path):
    """Two real JAX processes (1 CPU device each): process 1 gets SIGTERM after step 5; both stop
    at the next sync point (8) and join the same save, instead of deadlocking in it."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(i), port, str(tmp_path / "ck")],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
        pytest.fail("the two processes did not finish: deadlock in the stop/save")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # SIGKILL: SIGTERM would only request a stop
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
        assert "RESULT step=8 latest=8" in out, out[-3000:]
