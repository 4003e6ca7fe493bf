"""Metric writers: TensorBoard event files written with tensorboardX alone (no PyTorch or
TensorFlow imported), read back record by record; a clear ImportError without tensorboardX; JSON
lines; argument errors that name the argument."""

import glob
import json
import math
import os
import struct
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.training import JsonlWriter, MetricWriter, MultiWriter, TensorBoardWriter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_scalars(logdir):
    """``[(step, tag, value)]`` from the event files under ``logdir``, parsed from the TFRecord
    framing (u64 length, u32 crc, data, u32 crc) and tensorboardX's Event proto."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"),
                              recursive=True)):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            record = data[pos + 12:pos + 12 + length]
            assert len(record) == length, f"truncated record in {path}"
            pos += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            for v in event.summary.value:
                out.append((event.step, v.tag, v.simple_value))
    return out


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    pytest.importorskip("tensorboardX")
    logdir = tmp_path / "tb"
    with TensorBoardWriter(logdir) as w:
        assert isinstance(w, MetricWriter)
        w.write_scalars(1, {"loss": 0.5, "lr": np.float32(1e-3)})
        w.write_scalars(2, {"loss": jnp.asarray(0.25)})
    assert glob.glob(str(logdir / "events.out.tfevents.*"))
    got = read_scalars(str(logdir))
    assert [(s, t) for s, t, _ in got] == [(1, "loss"), (1, "lr"), (2, "loss")]
    np.testing.assert_allclose([v for *_, v in got], [0.5, 1e-3, 0.25], rtol=1e-6)
    with pytest.raises(ValueError, match="is closed"):
        w.write_scalars(3, {"loss": 1.0})


@pytest.mark.slow
def test_tensorboard_writer_works_without_torch_or_tensorflow(tmp_path):
    pytest.importorskip("tensorboardX")
    # None in sys.modules makes "import torch" fail, as if PyTorch/TensorFlow were not installed.
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "tensorflow", "tensorboard"):
            sys.modules[name] = None
        from jaxdiff.training import TensorBoardWriter
        from tests.test_writers import read_scalars
        w = TensorBoardWriter({str(tmp_path)!r})
        w.write_scalars(7, {{"loss": 1.5}})
        w.close()
        print("SCALARS", read_scalars({str(tmp_path)!r}))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SCALARS [(7, 'loss', 1.5)]" in out.stdout


def test_missing_tensorboardx_is_a_clear_import_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(ImportError, match=r"pip install tensorboardX.*jaxdiff\[tensorboard\]"):
        TensorBoardWriter(tmp_path / "tb")
    assert not (tmp_path / "tb").exists()


def test_jsonl_writer_appends_one_line_per_step(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    with JsonlWriter(path) as w:
        w.write_scalars(1, {"loss": 0.5})
        w.write_scalars(2, {"loss": np.float64("nan"), "lr": jnp.float32(0.125)})
    with JsonlWriter(path) as w:  # a resumed run appends
        w.write_scalars(3, {"loss": 0.25})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"step": 1, "loss": 0.5} and lines[2] == {"step": 3, "loss": 0.25}
    assert lines[1]["step"] == 2 and math.isnan(lines[1]["loss"]) and lines[1]["lr"] == 0.125


def test_host_numbers_keep_float64(tmp_path):
    """A wall-clock time (1.8e9 s) survives to the 0.1 s (float32 would round it to 128 s)."""
    path = tmp_path / "m.jsonl"
    with JsonlWriter(path) as w:
        w.write_scalars(1, {"time": 1796045099.6, "n": np.float64(1796045099.6), "k": 7})
    line = json.loads(path.read_text())
    assert line == {"step": 1, "time": 1796045099.6, "n": 1796045099.6, "k": 7.0}


@pytest.mark.parametrize("step, scalars, match", [
    (-1, {"loss": 1.0}, "step must be >= 0"),
    (1.0, {"loss": 1.0}, "step must be an int"),
    (1, {"loss": "0.5"}, r"scalars\['loss'\] must be an array"),
    (1, {"loss": np.ones(3)}, r"scalars\['loss'\] must be a single number"),
    (1, {3: 1.0}, "keys must be non-empty strings"),
    (1, [("loss", 1.0)], "scalars must be a mapping"),
    (1, {"step": 1.0}, "must not have a key 'step'"),
])
def test_bad_arguments_name_the_argument(tmp_path, step, scalars, match):
    with JsonlWriter(tmp_path / "m.jsonl") as w:
        with pytest.raises(ValueError, match=match):
            w.write_scalars(step, scalars)
    assert (tmp_path / "m.jsonl").read_text() == ""  # nothing half-written


def test_multi_writer_writes_to_each_and_closes_all(tmp_path):
    a, b = JsonlWriter(tmp_path / "a.jsonl"), JsonlWriter(tmp_path / "b.jsonl")
    with MultiWriter([a, b]) as w:
        w.write_scalars(4, {"loss": 2.0})
    for p in ("a.jsonl", "b.jsonl"):
        assert json.loads((tmp_path / p).read_text()) == {"step": 4, "loss": 2.0}
    with pytest.raises(ValueError, match="is closed"):
        b.write_scalars(5, {"loss": 1.0})
    with pytest.raises(ValueError, match=r"writers\[1\] must be a MetricWriter"):
        MultiWriter([a, "metrics.jsonl"])
