"""The one training loop, ``jaxdiff.training.fit``, on a tiny task (TinyNet of test_training): what
a first run says (the compile, the last step's loss), the SIGTERM line, the logs truncated to the
resumed step, the NaN message naming the last good checkpoint (or none), the data protocol and the
settings' checks; and the command lines' side (the resume hint, a diverged run as one line)."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from jaxdiff.data import BatchIterator, ResumableIterator
from jaxdiff.training import (NonFiniteLossError, OptimizerConfig, Periodic, TrainerSettings,
                              TrainTask, fit)
from tests.test_training import tiny_data, tiny_setup


def _settings(workdir, num_steps, **kw):
    kw = dict(dict(batch_size=8, log_every=1, checkpoint_every=2, keep_checkpoints=3,
                   optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=1,
                                             total_steps=100),
                   ema_decay=0.9, prefetch=1, progress=False), **kw)
    return TrainerSettings(workdir=str(workdir), num_steps=num_steps, **kw)


def _task(data=None, periodic=(), compat=None):
    _, _, _, loss_fn = tiny_setup()

    def init_params(abstract):
        params = tiny_setup()[0].params
        return jax.eval_shape(lambda: params) if abstract else params

    data = tiny_data(40) if data is None else data
    return TrainTask(init_params=init_params, key=jax.random.key(1), loss_fn=loss_fn,
                     data=BatchIterator.source(data, 8, seed=3),
                     compat=compat or {"model": "tiny"}, periodic=list(periodic),
                     config_json='{"tiny": true}')


def _rows(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.slow
def test_a_first_run_says_what_it_does_and_logs_its_last_step(tmp_path, capsys):
    """Old: only a 0/N bar during the compile, and no loss at all when num_steps < log_every."""
    summary = fit(_settings(tmp_path, 3, log_every=10), _task())
    out = capsys.readouterr().out.splitlines()
    assert "compiling the train step (first call)..." in out
    compiled = [line for line in out if line.startswith("compiled the train step in ")]
    assert len(compiled) == 1 and float(compiled[0].split()[5]) > 0
    (row,) = _rows(tmp_path / "metrics.jsonl")     # the last step, although 3 < log_every
    assert row["step"] == 3 and np.isfinite(row["loss"]) and row["steps_per_sec"] > 0
    assert summary["loss"] == row["loss"] and summary["end_step"] == 3
    assert any(line.startswith("trained steps 0..3") and f"loss {row['loss']:.4f}" in line
               for line in out), out
    assert json.loads(out[-1]) == json.loads(json.dumps(summary))   # the summary, last
    assert open(tmp_path / "config.json").read() == '{"tiny": true}'


@pytest.mark.slow
def test_sigterm_stops_with_a_line_saying_where_the_checkpoint_is(tmp_path, capsys):
    def kill_at_2(step, state):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)   # the loop's handler only sets a flag

    summary = fit(_settings(tmp_path, 20, checkpoint_every=100),
                  _task(periodic=[Periodic("killer", 1, kill_at_2)]))
    out = capsys.readouterr().out
    assert summary["stopped_by_signal"] and summary["end_step"] == 2
    assert summary["checkpoint_step"] == 2
    step_dir = os.path.join(str(tmp_path), "checkpoints", "2")
    assert (f"stopped by SIGTERM at step 2, checkpoint saved: {step_dir}. Run the same command "
            "again to resume.") in out
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [1, 2]


@pytest.mark.slow
def test_resume_truncates_metrics_and_eval_logs_to_the_checkpoint(tmp_path, capsys):
    """A run killed (kill -9) after writing rows past its last checkpoint: the rows after the
    resumed step go, so no step appears twice; a half-written last line goes too."""
    evals = []

    def evaluate(step, state):
        evals.append(step)
        return {"ema_norm": float(sum(np.abs(x).sum() for x in jax.tree.leaves(
            state.ema_params)))}

    periodic = [Periodic("eval", 1, evaluate, jsonl="eval.jsonl")]
    fit(_settings(tmp_path, 4), _task(periodic=periodic))
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    # Simulate the kill during the save of step 4: its checkpoint is gone, the rows are not.
    import shutil
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.1')   # cut mid-line
    capsys.readouterr()
    summary = fit(_settings(tmp_path, 5), _task(periodic=periodic))
    out = capsys.readouterr().out
    assert summary["start_step"] == 2 and summary["end_step"] == 5
    assert "metrics.jsonl: dropped 3 rows after step 2" in out
    assert "eval.jsonl: dropped 2 rows after step 2" in out
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    rows = _rows(tmp_path / "eval.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert summary["eval"] == dict(rows[-1])
    assert evals == [1, 2, 3, 4, 3, 4, 5]


@pytest.mark.slow
def test_nonfinite_loss_says_whether_a_checkpoint_exists(tmp_path):
    """Old: "The last good checkpoint is kept" also when none had been written."""
    huge = _settings(tmp_path / "a", 40, checkpoint_every=100,
                     optimizer=OptimizerConfig(learning_rate=1e30, warmup_steps=0))
    with pytest.raises(NonFiniteLossError, match="No checkpoint was written yet") as e:
        fit(huge, _task())
    assert "last good checkpoint" not in str(e.value)
    assert not os.listdir(tmp_path / "a" / "checkpoints")

    fit(_settings(tmp_path / "b", 2), _task())
    bad = tiny_data(40)
    bad["image"][:] = np.nan
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3") as e:
        fit(_settings(tmp_path / "b", 6), _task(data=bad))
    step_dir = os.path.join(str(tmp_path / "b"), "checkpoints", "2")
    assert f"The last good checkpoint is step 2 ({step_dir}; nothing after it was saved)" in str(
        e.value)
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["2"]


@pytest.mark.slow
def test_an_incompatible_resume_writes_nothing(tmp_path):
    fit(_settings(tmp_path, 2), _task())
    before = {p: os.path.getmtime(tmp_path / p) for p in ("config.json", "metrics.jsonl")}
    with pytest.raises(ValueError, match="different config"):
        fit(_settings(tmp_path, 4), _task(compat={"model": "other"}))
    assert before == {p: os.path.getmtime(tmp_path / p) for p in before}
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [1, 2]


def test_data_protocol_and_batch_iterator_source():
    data = tiny_data(40)
    source = BatchIterator.source(data, 8, seed=3, process_index=0, process_count=1)
    it = source(None)
    assert isinstance(it, ResumableIterator) and it.state == {"epoch": 0, "index": 0}
    for _ in range(7):
        next(it)
    state = it.state
    assert state == {"epoch": 1, "index": 2}
    want, got = next(it), next(source(state))
    for k in want:
        np.testing.assert_array_equal(want[k], got[k])
    for bad in ({"epoch": 0}, {"epoch": "0", "index": 1}, [0, 1], {"epoch": True, "index": 0}):
        with pytest.raises(ValueError, match="state must be"):
            source(bad)


@pytest.mark.parametrize("field, value, message", [
    ("num_steps", 0, "num_steps must be >= 1"),
    ("batch_size", 2.5, "batch_size must be an int"),
    ("ema_decay", 1.0, "ema_decay must be < 1"),
    ("fsdp", 0, "fsdp must be >= 1"),
    ("tensorboard", "yes", "tensorboard must be"),
    ("optimizer", {"learning_rate": 1e-3}, "optimizer must be an OptimizerConfig"),
])
def test_settings_name_the_bad_field(tmp_path, field, value, message):
    kw = dict(workdir=str(tmp_path), num_steps=3, batch_size=8)
    with pytest.raises(ValueError, match=message):
        TrainerSettings(**dict(kw, **{field: value}))


@pytest.mark.slow
def test_periodic_every_zero_never_runs(tmp_path):
    calls = []
    summary = fit(_settings(tmp_path, 2),
                  _task(periodic=[Periodic("grid", 0, lambda n, s: calls.append(n))]))
    assert calls == [] and summary["grid"] is None


def test_command_line_says_how_to_resume_and_a_diverged_run_is_one_line(capsys, monkeypatch):
    from experiments import cli

    argv = ["--workdir=/tmp/w x", "--config.training.num_steps=9"]
    out = cli.train_command(argv, prog="python -m experiments.train_mnist", doc="",
                            default_config="experiments/configs/mnist_smoke.py",
                            train=lambda config, workdir: {"stopped_by_signal": True})
    assert out == {"stopped_by_signal": True}
    assert ("to resume: python -m experiments.train_mnist '--workdir=/tmp/w x' "
            "--config.training.num_steps=9") in capsys.readouterr().out

    def diverge(argv):
        raise NonFiniteLossError("non-finite loss at step 3 (loss=nan)\nNo checkpoint ...")

    monkeypatch.setenv("JAXDIFF_COMPILATION_CACHE", "off")
    with pytest.raises(SystemExit) as e:
        cli.run(diverge, [])
    err = capsys.readouterr().err
    assert e.value.code == 1
    assert err == "error: non-finite loss at step 3 (loss=nan) No checkpoint ...\n"
