"""The command lines as a new user meets them with bad input: every user error is ONE line
``error: ...`` on stderr naming the file or flag, and exit status 2, never a traceback. Tiny
inputs written in ``tmp_path``; no training (a workdir is a hand-written ``config.json``, with an
empty or corrupt checkpoint directory where a probe needs one), so each probe takes seconds."""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import pytest

from experiments import cli, eval_mnist, eval_sweep, evaluation, sample, train_mnist
from experiments.cli import ConfigError
from experiments.configs import mnist_smoke
from jaxdiff.data import write_idx
from tests.test_data import write_fake_mnist

MODULES = {"train_mnist": train_mnist, "sample": sample, "eval_mnist": eval_mnist,
           "eval_sweep": eval_sweep}


def _show_like_python(message, category, filename, lineno, file=None, line=None):
    """Python's default ``warnings.showwarning`` (pytest records warnings instead)."""
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_cli(name: str, argv: list, capsys) -> tuple[int, list[str]]:
    """``python -m experiments.<name> argv`` in this process: (exit status, stderr lines), with
    warnings shown as a terminal shows them (deprecations, which Python hides outside
    ``__main__``, hidden)."""
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.showwarning = _show_like_python
        try:
            MODULES[name].cli_main([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code
    return code, [x for x in capsys.readouterr().err.splitlines() if x.strip()]


def assert_one_error(name, argv, capsys, *needles) -> str:
    """Exit 2 and exactly one ``error:`` line holding every needle; no traceback."""
    code, err = run_cli(name, argv, capsys)
    errors = [x for x in err if x.startswith("error: ")]
    assert code == 2 and len(errors) == 1, (code, err)
    assert not any("Traceback" in x for x in err), err
    for needle in needles:
        assert str(needle) in errors[0], (needle, errors[0])
    return errors[0]


def write_run(workdir, *, data_dir="", source="auto", checkpoint=True) -> str:
    """A train_mnist workdir without training: the smoke config as config.json and, with
    ``checkpoint``, an empty (incomplete) step directory."""
    os.makedirs(workdir, exist_ok=True)
    config = mnist_smoke.get_config()
    config.data.data_dir, config.data.source = str(data_dir), source
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))
    if checkpoint:
        os.makedirs(os.path.join(workdir, "checkpoints", "3"), exist_ok=True)
    return str(workdir)


# --- config flags -----------------------------------------------------------------------------


def test_unknown_config_field_is_readable_and_names_the_override(tmp_path, capsys):
    line = assert_one_error("train_mnist", [f"--workdir={tmp_path / 'w'}",
                                            "--config.sampling.num_stepz=3"], capsys)
    assert line == ("error: unknown config field 'num_stepz' (did you mean 'num_steps'?) in "
                    "--config.sampling.num_stepz"), line
    line = assert_one_error("train_mnist", [f"--workdir={tmp_path / 'w'}",
                                            "--config.samplin.num_steps=3"], capsys)
    assert "unknown config field 'samplin' (did you mean 'sampling'?)" in line, line
    line = assert_one_error("train_mnist", [f"--workdir={tmp_path / 'w'}",
                                            "--config.training.no_such_field=1"], capsys)
    assert line == ("error: unknown config field 'no_such_field' in "
                    "--config.training.no_such_field"), line
    assert not os.path.exists(tmp_path / "w")


def test_config_file_that_is_missing_or_not_python(tmp_path, capsys):
    missing = tmp_path / "nope.py"
    for extra in ([], ["--config.training.num_steps=3"]):   # an override meets it earlier
        assert_one_error("train_mnist", [f"--workdir={tmp_path / 'w'}", f"--config={missing}",
                                         *extra], capsys,
                         "--config: the config file could not be loaded", "No such file",
                         str(missing))
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n")
    assert_one_error("train_mnist", [f"--workdir={tmp_path / 'w'}", f"--config={bad}"], capsys,
                     f"--config: {bad} line 1")
    assert not os.path.exists(tmp_path / "w")


# --- workdirs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sample", "eval_sweep"])
def test_missing_empty_corrupt_workdirs(tmp_path, capsys, name):
    """A missing workdir, an empty one, a corrupt config.json and a checkpoint directory whose
    only step is incomplete: one line each, naming the workdir or the file."""
    out = [f"--out={tmp_path / 's.png'}"] if name == "sample" else []
    for workdir in (tmp_path / "missing", tmp_path / "empty"):
        os.makedirs(tmp_path / "empty", exist_ok=True)
        assert_one_error(name, [f"--workdir={workdir}", *out], capsys, "--workdir", workdir)
    corrupt = write_run(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "config.json").write_text('{"model": ')
    assert_one_error(name, [f"--workdir={corrupt}", *out], capsys,
                     f"{corrupt}/config.json: not valid JSON")
    incomplete = write_run(tmp_path / "incomplete")
    code, err = run_cli(name, [f"--workdir={incomplete}", *out], capsys)
    assert code == 2 and err[-1].startswith("error: --workdir: no checkpoint in"), err
    warnings = [x for x in err if x.startswith("warning: ")]
    assert len(warnings) == 1 and "checkpoints/3 is incomplete" in warnings[0], err
    assert not any(x.startswith(" ") or "Traceback" in x for x in err), err


def test_outputs_are_checked_before_any_work(tmp_path, capsys):
    """Outputs that cannot be written fail at once (they failed after the sampling)."""
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    run = write_run(tmp_path / "run")
    for out, needle in [(a_file / "s.png", "is a file, not a directory"),
                        (tmp_path, "is a directory, expected a file path"),
                        (tmp_path / "s.npz", "--out must name the PNG grid")]:
        assert_one_error("sample", [f"--workdir={run}", f"--out={out}"], capsys, "--out",
                         needle)
    assert_one_error("eval_sweep", [f"--workdir={run}", f"--out_png={a_file / 'x.png'}"],
                     capsys, "--out_png", "is a file, not a directory")
    assert_one_error("eval_mnist", [f"--workdir={a_file / 'w'}"], capsys, "--workdir",
                     "is a file, not a directory")
    assert_one_error("eval_mnist", [f"--workdir={tmp_path / 'w'}",
                                    f"--classifier_path={a_file / 'c.msgpack'}"], capsys,
                     "--classifier_path", "is a file, not a directory")
    assert not os.path.exists(tmp_path / "w")


def test_check_writable_read_only_directory(tmp_path):
    """A read-only directory is refused; the check creates nothing (root may write anywhere, so
    there the directory is writable and accepted, as the save would succeed)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.geteuid() == 0:
            cli.check_writable("--out", str(ro / "x.png"))
        else:
            with pytest.raises(ConfigError, match=r"--out: cannot write .* is not writable"):
                cli.check_writable("--out", str(ro / "x.png"))
        cli.check_writable("--workdir", str(tmp_path / "new" / "deeper"), directory=True)
        assert os.listdir(ro) == [] and not os.path.exists(tmp_path / "new")
    finally:
        ro.chmod(0o755)


# --- data -------------------------------------------------------------------------------------


def test_eval_reads_the_runs_data_dir(tmp_path, capsys, monkeypatch):
    """Without --data_dir, the evaluations read MNIST where the run trained (config.json's
    data.data_dir / data.source), not the default search and its tfds download; errors name the
    flags eval_mnist has (--data_dir), never --config.data.data_dir."""
    monkeypatch.delenv("JAXDIFF_MNIST_DIR", raising=False)
    data = tmp_path / "mnist"
    write_fake_mnist(str(data), n_train=20, n_test=10)
    run = write_run(tmp_path / "run", data_dir=data, source="local", checkpoint=False)
    assert evaluation.mnist_source(run) == (str(data), "local", evaluation.mnist_source(run)[2])
    assert evaluation.mnist_source(run, "/x")[:2] == ("/x", "auto")      # the flag wins
    assert evaluation.mnist_source(str(tmp_path))[:2] == (None, "auto")  # no run: the search
    calls = []
    monkeypatch.setattr(evaluation, "load_mnist", lambda *a, **k: calls.append((a, k)))
    evaluation.load_mnist_arrays("test", "", workdir=run)
    assert calls == [(("test", str(data)), {"source": "local", "data_dir_name": "--data_dir"})]
    monkeypatch.undo()

    gone = write_run(tmp_path / "gone", data_dir=tmp_path / "moved", checkpoint=False)
    line = assert_one_error("eval_mnist", [f"--workdir={gone}"], capsys,
                            "the run's data.data_dir", str(tmp_path / "moved"), "--data_dir")
    assert "--config" not in line
    line = assert_one_error("eval_mnist", [f"--workdir={tmp_path / 'w'}",
                                           f"--data_dir={tmp_path / 'nope'}"], capsys,
                            f"--data_dir '{tmp_path / 'nope'}'", "point --data_dir")
    assert "--config" not in line


def test_corrupt_mnist_and_classifier_through_eval_mnist(tmp_path, capsys):
    data = tmp_path / "mnist"
    write_fake_mnist(str(data), n_train=20, n_test=10)
    labels = data / "t10k-labels-idx1-ubyte.gz"
    write_idx(str(labels), np.zeros(3, np.uint8))
    argv = [f"--workdir={tmp_path / 'w'}", f"--data_dir={data}"]
    assert_one_error("eval_mnist", argv, capsys, "10 images but", str(labels), "3 labels")
    write_fake_mnist(str(data), n_train=20, n_test=10)
    clf = tmp_path / "clf.msgpack"
    clf.write_bytes(b"\x80garbage")            # msgpack's ExtraData
    assert_one_error("eval_mnist", argv + [f"--classifier_path={clf}"], capsys,
                     f"{clf}: not a classifier file", "delete it")


# --- --samples_npz ----------------------------------------------------------------------------


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_samples_npz_problems_name_the_file_key_and_expectation(tmp_path, capsys):
    good = dict(images=np.zeros((4, 28, 28, 1), np.float32), labels=np.arange(4))
    nan = good["images"].copy()
    nan[1, 3, 3, 0] = np.nan
    cases = {
        "missing": (str(tmp_path / "none.npz"), "no such file"),
        "no_key": (_npz(tmp_path / "a.npz", imgs=good["images"], labels=good["labels"]),
                   "no key 'images' (it holds ['imgs', 'labels'])"),
        "shape": (_npz(tmp_path / "b.npz", images=good["images"][..., 0], labels=good["labels"]),
                  "key 'images' has shape (4, 28, 28), expected [N, 28, 28, 1]"),
        "nan": (_npz(tmp_path / "c.npz", images=nan, labels=good["labels"]),
                "key 'images' holds 1 NaN or infinite values"),
        "uint8": (_npz(tmp_path / "d.npz", images=good["images"].astype(np.uint8),
                       labels=good["labels"]), "dtype uint8, expected floats in [-1, 1]"),
        "labels": (_npz(tmp_path / "e.npz", images=good["images"], labels=np.arange(3)),
                   "key 'labels' has shape (3,)"),
        "classes": (_npz(tmp_path / "f.npz", images=good["images"], labels=np.arange(4) * 4),
                    "expected classes in [0, 10)"),
        "not_npz": (str(tmp_path / "a_file.txt"), "not a readable .npz archive"),
    }
    (tmp_path / "a_file.txt").write_text("hello")
    for name, (path, needle) in cases.items():
        with pytest.raises(ConfigError, match=None) as e:
            evaluation.load_samples_npz(path)
        assert str(e.value).startswith(f"--samples_npz {path}: ") and needle in str(e.value), (
            name, str(e.value))
    images, lbls = evaluation.load_samples_npz(_npz(tmp_path / "ok.npz", **good))
    assert images.shape == (4, 28, 28, 1) and lbls.dtype == np.int32
    # through the command line, before anything else (here: before the missing data)
    assert_one_error("eval_mnist", [f"--workdir={tmp_path / 'w'}", "--data_dir=/nonexistent",
                                    f"--samples_npz={cases['nan'][0]}"], capsys,
                     cases["nan"][0], "'images'", "NaN")


# --- weights files through a command line -----------------------------------------------------


@pytest.mark.slow
def test_corrupt_weights_of_a_model_folder_are_one_line(tmp_path, capsys, monkeypatch):
    """text_to_image on a diffusers folder whose UNet weights are truncated, a bare tensor in a
    .bin, or a .bin without torch installed: one line naming the file (was safetensors'
    "incomplete metadata" with no file name, or torch's "Tensor.__contains__" traceback)."""
    import torch

    from experiments import text_to_image
    from jaxdiff.pipelines.tiny import write_tiny_stable_diffusion

    folder = tmp_path / "sd"
    write_tiny_stable_diffusion(str(folder))
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    monkeypatch.setitem(MODULES, "text_to_image", text_to_image)
    argv = [f"--model={folder}", "--prompt=a cat", "--steps=1", f"--out={tmp_path / 'x.png'}"]
    assert_one_error("text_to_image", argv, capsys, weights, "not a valid safetensors file",
                     "download it again")
    weights.unlink()
    bare = folder / "unet" / "diffusion_pytorch_model.bin"
    torch.save(torch.zeros(3), str(bare))
    assert_one_error("text_to_image", argv, capsys, bare, "not a state dict")
    monkeypatch.setitem(sys.modules, "torch", None)   # the base install has no torch
    assert_one_error("text_to_image", argv, capsys, bare, "pip install torch", ".safetensors")
