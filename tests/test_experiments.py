"""Smoke-size end to end: train_mnist's main (tiny UNet, small IDX files written in tmp_path) ->
checkpoint, metrics.jsonl, PNG grid; resume; then sample, eval_mnist and eval_sweep from the
workdir, with every sampler of the registry; config errors before anything is written."""

import ast
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.test_data import write_fake_mnist

import jaxdiff.models  # noqa: F401  (the package itself: if it breaks, this file fails)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMOKE = os.path.join(REPO, "experiments", "configs", "mnist_smoke.py")
CLI_MODULES = ("train_mnist", "sample", "eval_mnist", "eval_sweep")


def _overrides(workdir, data_dir, num_steps):
    """CLI args for the smoke config (2-level UNet, batch 8) on the IDX files in ``data_dir``."""
    return [f"--workdir={workdir}", f"--config={SMOKE}", f"--config.data.data_dir={data_dir}",
            f"--config.training.num_steps={num_steps}"]


pytestmark = pytest.mark.usefixtures("compilation_cache")   # tests/conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory, compilation_cache):
    from experiments import train_mnist

    root = tmp_path_factory.mktemp("exp")
    data_dir, workdir = str(root / "mnist"), str(root / "run")
    write_fake_mnist(data_dir, n_train=32, n_test=8)
    summary = train_mnist.main(_overrides(workdir, data_dir, 3))
    return train_mnist, workdir, data_dir, summary


@pytest.mark.slow
def test_train_writes_checkpoint_metrics_and_grid(trained):
    _, workdir, _, summary = trained
    assert summary["end_step"] == 3 and summary["checkpoint_step"] == 3
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "3"
    rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["steps_per_sec"] > 0 for r in rows)
    from PIL import Image
    img = Image.open(os.path.join(workdir, "samples", "step_000003.png"))
    assert img.size[1] > img.size[0]  # 10 rows (digits) x 1 column
    assert json.load(open(os.path.join(workdir, "config.json")))["training"]["num_steps"] == 3


@pytest.mark.slow
def test_resume_continues_from_checkpoint(trained, caplog):
    import logging

    train_mnist, workdir, data_dir, _ = trained
    with caplog.at_level(logging.WARNING, logger="jaxdiff.training.checkpoint"):
        summary = train_mnist.main(_overrides(workdir, data_dir, 5))
    assert summary["start_step"] == 3 and summary["end_step"] == 5
    assert "num_steps: 3 -> 5" in caplog.text  # extending a run is allowed, and logged


@pytest.mark.slow
@pytest.mark.parametrize("override,message", [
    ("--config.seed=1", "different config.*seed"),  # another data order
    ("--config.training.grad_clip_norm=0", "optimizer-state structure"),
])
def test_resume_with_other_seed_or_optimizer_is_a_clear_error(trained, override, message):
    train_mnist, workdir, data_dir, _ = trained
    with pytest.raises(ValueError, match=message):
        train_mnist.main(_overrides(workdir, data_dir, 9) + [override])


@pytest.mark.slow
def test_resume_with_other_model_is_a_clear_error(trained):
    train_mnist, workdir, data_dir, _ = trained
    argv = _overrides(workdir, data_dir, 9) + ["--config.diffusion.num_timesteps=500"]
    with pytest.raises(ValueError, match="different config.*num_timesteps"):
        train_mnist.main(argv)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddpm", "dpm_solver", "euler"])
def test_sample_writes_png_and_npz(trained, tmp_path, sampler):
    """Every registry sampler is reachable from the command line (DPM-Solver was not)."""
    from experiments import sample

    _, workdir, _, _ = trained
    out = str(tmp_path / "s.png")
    images = sample.main([f"--workdir={workdir}", "--num_samples=3", "--steps=2", "--labels=0,7",
                          f"--sampler={sampler}", f"--out={out}"])
    arrays = np.load(str(tmp_path / "s.npz"))
    assert arrays["images"].shape == (3, 28, 28, 1) and list(arrays["labels"]) == [0, 7, 0]
    assert np.isfinite(images).all() and os.path.getsize(out) > 0


@pytest.mark.slow
@pytest.mark.parametrize("argv,message", [
    (["--sampler=ddpm", "--eta=0.5"], "sampling.eta applies to samplers with an eta option"),
    (["--sampler=dpm_solver", "--ddim_clip=diffusers"], "sampling.ddim_clip applies to DDIM"),
    (["--sampler=ddim", "--eta=-1"], "sampling.eta must be >= 0"),
    (["--steps=1001"], "num_steps must be <= num_timesteps"),
    (["--labels=10"], r"--labels must be in 0..9"),
])
def test_sample_rejects_options_the_sampler_does_not_take(trained, tmp_path, argv, message):
    """Old code: ``--eta``/``--ddim_clip`` did not exist, and a label >= num_classes was
    accepted only as a SystemExit; now each is a ConfigError naming the setting."""
    from experiments import sample
    from experiments.cli import ConfigError

    with pytest.raises(ConfigError, match=message):
        sample.main([f"--workdir={trained[1]}", f"--out={tmp_path / 's.png'}", "--steps=2"]
                    + argv)
    assert not os.path.exists(tmp_path / "s.png")


@pytest.mark.slow
@pytest.mark.parametrize("override,message", [
    ("--config.training.learning_rate=-1", "training.learning_rate must be > 0"),
    ("--config.training.batch_size=0", "training.batch_size must be >= 1"),
    ("--config.training.end_lr_factor=-0.5", "training.end_lr_factor must be >= 0"),
    ("--config.training.grad_clip_norm=-1", "training.grad_clip_norm must be >= 0"),
    ("--config.diffusion.prediction_type=noise", "diffusion.prediction_type must be one of"),
    ("--config.diffusion.loss_type=l3", "diffusion.loss_type must be one of"),
    ("--config.diffusion.weighting=snr", "diffusion.weighting must be one of"),
    ("--config.diffusion.schedule=quadratic", "diffusion.schedule must be one of"),
    # sampling.*: checked before training, not at the first sample grid
    ("--config.sampling.eta=-0.5", "sampling.eta must be >= 0"),
    ("--config.sampling.guidance_scale=-1", "sampling.guidance_scale must be >= 0"),
    ("--config.sampling.clip_x0=-1", "sampling.clip_x0 must be >= 0"),
    ("--config.sampling.num_steps=1001", "num_steps must be <= num_timesteps"),
    ("--config.sampling.sampler=eulr", "sampling.sampler must be one of"),
    ("--config.sampling.ddim_clip=torch", "sampling.ddim_clip must be one of"),
    # one class count: labels 0-9 do not fit 5 classes (old: digit 5 became the null label)
    ("--config.model.num_classes=5", "model.num_classes is 5, but the data's labels"),
])
def test_invalid_values_fail_before_anything_is_written(trained, tmp_path, override, message):
    from experiments.cli import ConfigError

    train_mnist = trained[0]
    with pytest.raises(ConfigError, match=message):
        train_mnist.main(_overrides(str(tmp_path / "w"), trained[2], 2) + [override])
    assert not os.path.exists(tmp_path / "w")   # the workdir is not even created


@pytest.mark.slow
def test_eta_with_a_sampler_without_eta_is_an_error(trained, tmp_path):
    from experiments.cli import ConfigError

    train_mnist = trained[0]
    argv = _overrides(str(tmp_path / "w"), trained[2], 2) + ["--config.sampling.sampler=ddpm",
                                                             "--config.sampling.eta=0.5"]
    with pytest.raises(ConfigError, match="sampler 'ddpm' has none"):
        train_mnist.main(argv)
    assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow
@pytest.mark.parametrize("extra,message", [
    (["--config.training.batch_size=0"], "error: training.batch_size must be >= 1, got 0"),
    (["--config.num_classes=5"], "error: unknown config field 'num_classes'"),
    (["--config.data.data_dir={missing}"], "error: data.data_dir '{missing}' does not exist"),
    (["--config.training.batch_size=abc"], "error: flag --config.training.batch_size=abc"),
])
def test_cli_config_error_is_one_line_and_writes_nothing(trained, tmp_path, capsys, extra,
                                                          message):
    """The command line prints one ``error:`` line (no traceback), exits 2, and creates no
    workdir (old: a traceback, and the workdir was created before the data dir was checked)."""
    train_mnist = trained[0]
    missing = str(tmp_path / "no_data")
    workdir = str(tmp_path / "w")
    argv = _overrides(workdir, trained[2], 2) + [a.format(missing=missing) for a in extra]
    with pytest.raises(SystemExit) as e:
        train_mnist.cli_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message.format(missing=missing)) and "\n" not in err, err
    assert not os.path.exists(workdir)


@pytest.mark.slow
def test_unwritable_workdir_and_missing_data(trained, tmp_path):
    from experiments.cli import ConfigError
    from jaxdiff.data import HOW_TO_GET_MNIST

    train_mnist, _, data_dir, _ = trained
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")  # unwritable even for root
    with pytest.raises(ConfigError, match="not writable"):
        train_mnist.main(_overrides(str(blocker / "w"), data_dir, 2))
    with pytest.raises(ConfigError, match="does not exist") as e:
        train_mnist.main(_overrides(str(tmp_path / "w"), str(tmp_path / "none"), 2))
    assert HOW_TO_GET_MNIST in str(e.value)  # says how to get MNIST
    assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow
def test_sample_output_is_replicated(trained):
    """Every process can read the images (a mesh over several hosts): output sharding P()."""
    import jax
    from jax.sharding import PartitionSpec as P

    from experiments import mnist_lib, mnist_sampling
    from jaxdiff.sharding import shard_batch

    run = mnist_lib.load_run(trained[1])
    fn = mnist_sampling.make_sample_fn(run.model, run.schedule, run.mesh,
                                       mnist_sampling.sampling_config("ddpm", 2),
                                       run.config.diffusion.prediction_type)
    out = fn(run.ema_params, shard_batch({"label": np.array([0, 7, 0], np.int32)},
                                         run.mesh)["label"], jax.random.key(0))
    assert out.shape == (3, 28, 28, 1) and out.sharding.spec == P()
    assert out.is_fully_addressable and out.is_fully_replicated


@pytest.mark.slow
def test_ddim_clip_forms(trained):
    """``ddim_clip``: "consistent" (the default) re-derives eps from the clipped x0, "diffusers"
    keeps the model's eps. They differ only where clipping bites, and coincide without
    clipping."""
    import jax

    from experiments import mnist_lib, mnist_sampling
    from experiments.cli import ConfigError

    run = mnist_lib.load_run(trained[1])
    labels = np.array([0, 7], np.int32)

    def sample(clip_x0, ddim_clip):
        sampling = mnist_sampling.sampling_config("ddim", 3, 2.0, clip_x0=clip_x0,
                                                  ddim_clip=ddim_clip)
        fn = mnist_sampling.make_sample_fn(run.model, run.schedule, run.mesh, sampling,
                                           run.config.diffusion.prediction_type)
        return np.asarray(fn(run.ema_params, labels, jax.random.key(0)))

    a, b = sample(1.0, None), sample(1.0, "diffusers")
    assert np.abs(a - b).max() > 1e-3   # clipping bites on the 3-step model near t = T
    np.testing.assert_array_equal(a, sample(1.0, "consistent"))
    np.testing.assert_allclose(sample(0.0, "consistent"), sample(0.0, "diffusers"), atol=0)
    with pytest.raises(ConfigError, match="sampling.ddim_clip"):
        sample(1.0, "torch")


@pytest.mark.slow
def test_one_root_key_and_init_unet(trained):
    """The params come from ``init_unet`` with the init key of the one root key
    ``jax.random.key(seed)`` (typed keys); the train state's key is the train key."""
    import jax

    from experiments import mnist_lib, train_lib
    from experiments.configs import mnist_smoke
    from jaxdiff.models import init_unet
    from jaxdiff.sharding import make_mesh

    config = mnist_smoke.get_config()
    keys = train_lib.run_keys(config.seed)
    assert sorted(keys) == ["init", "sample", "train"]
    assert all(jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key) for k in keys.values())
    data = [tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in keys.values()]
    assert len(set(data)) == 3
    model = mnist_lib.build_model(config)
    state, _, _ = mnist_lib.init_state(config, model, make_mesh())
    expected = init_unet(model.config, keys["init"])
    jax.tree.map(np.testing.assert_array_equal, state.params["params"], expected)
    np.testing.assert_array_equal(state.key, jax.random.key_data(keys["train"]))
    target, _, _ = mnist_lib.init_state(config, model, make_mesh(), abstract=True)
    assert jax.tree.structure(target) == jax.tree.structure(state)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(target))


@pytest.mark.slow
def test_legacy_config_json_num_classes(trained, tmp_path):
    """A run written before ``model.num_classes`` was the only copy has a top-level
    ``num_classes``: equal to the model's it loads, different it is an error."""
    from experiments import mnist_lib
    from experiments.cli import ConfigError

    config = json.load(open(os.path.join(trained[1], "config.json")))
    assert "num_classes" not in config and config["model"]["num_classes"] == 10
    os.symlink(os.path.join(trained[1], "checkpoints"), tmp_path / "checkpoints")
    for legacy in (10, 5):
        with open(tmp_path / "config.json", "w") as f:
            json.dump({**config, "num_classes": legacy}, f)
        if legacy == 10:
            assert mnist_lib.load_run(str(tmp_path)).model.config.num_classes == 10
        else:
            with pytest.raises(ConfigError, match="num_classes 5 differs from model.num_classes"):
                mnist_lib.load_run(str(tmp_path))


def test_cli_modules_do_not_import_each_other():
    """The command lines share experiments.mnist_lib / evaluation; none imports another (old:
    sample imported train_mnist, eval_sweep imported eval_mnist and sample)."""
    for name in CLI_MODULES:
        tree = ast.parse(open(os.path.join(REPO, "experiments", f"{name}.py")).read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                imported.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
        others = {f"experiments.{m}" for m in CLI_MODULES if m != name}
        assert not imported & others, (name, imported & others)


@pytest.mark.slow
def test_tensorboard_option_writes_event_file(trained, tmp_path):
    """``training.tensorboard=True`` writes TensorBoard events to WORKDIR/tb (tensorboardX; old:
    an undocumented torch.utils.tensorboard attempt that silently did nothing without torch)."""
    pytest.importorskip("tensorboardX")
    train_mnist, _, data_dir, _ = trained
    workdir = tmp_path / "w"
    train_mnist.main(_overrides(str(workdir), data_dir, 1) + ["--config.training.tensorboard"])
    events = [f for f in os.listdir(workdir / "tb") if f.startswith("events.out.tfevents")]
    assert len(events) == 1
    assert b"loss" in (workdir / "tb" / events[0]).read_bytes()   # the scalar's tag


@pytest.mark.slow
def test_tensorboard_without_tensorboardx_fails_before_writing(trained, tmp_path, monkeypatch):
    from experiments.cli import ConfigError

    monkeypatch.setitem(sys.modules, "tensorboardX", None)   # import tensorboardX -> ImportError
    train_mnist, _, data_dir, _ = trained
    argv = _overrides(str(tmp_path / "w"), data_dir, 1) + ["--config.training.tensorboard=True"]
    with pytest.raises(ConfigError, match="training.tensorboard=True needs the tensorboardX"):
        train_mnist.main(argv)
    assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow
def test_cli_smoke_run_exits_zero(trained, compilation_cache, tmp_path):
    """``python -m experiments.train_mnist`` as a process: exit status 0, the summary on stdout."""
    _, _, data_dir, _ = trained
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=compilation_cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    r = subprocess.run([sys.executable, "-m", "experiments.train_mnist"]
                       + _overrides(str(tmp_path / "w"), data_dir, 1),
                       cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["end_step"] == 1
    assert os.path.isdir(tmp_path / "w" / "checkpoints" / "1")


@pytest.mark.slow
def test_cli_unknown_config_field_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "experiments.train_mnist",
                        f"--workdir={tmp_path}", "--config.training.no_such_field=1"],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode != 0
    assert "no_such_field" in r.stderr and "Traceback" not in r.stderr[-2000:], r.stderr[-2000:]


@pytest.mark.slow
def test_eval_mnist_and_eval_sweep_on_the_smoke_run(trained, tmp_path, monkeypatch):
    """eval_mnist (classifier trained and cached, floor, conditional + unconditional samples,
    bits/dim) and eval_sweep (one row per setting, floors per N, picture, each setting's sampler
    built once) on the 3-step run."""
    from experiments import eval_mnist, eval_sweep, mnist_sampling
    from PIL import Image

    _, workdir, _, _ = trained
    data_dir = str(tmp_path / "mnist")
    write_fake_mnist(data_dir, n_train=160, n_test=24)
    clf = str(tmp_path / "clf.msgpack")
    res = eval_mnist.main([f"--workdir={workdir}", f"--data_dir={data_dir}",
                           f"--classifier_path={clf}", "--classifier_epochs=1",
                           "--num_samples=12", "--sampler=dpm_solver", "--steps=2",
                           "--batch_size=8",
                           "--bpd_examples=14", "--bpd_batch_size=7"])
    assert os.path.isfile(clf) and res["classifier"]["trained_now"]
    assert res["conditional"]["n"] == 12 and 0 <= res["conditional"]["conditional_accuracy"] <= 1
    hist = res["unconditional"]["class_histogram"]
    assert len(hist) == 10 and abs(sum(hist) - 1) < 1e-3
    assert np.isfinite(res["fid_floor"]["fid"]) and res["fid_floor"]["fid"] >= 0
    assert np.isfinite(res["bpd"]["bpd"]) and res["bpd"]["bpd"] > 0
    assert res["bpd"]["n"] == 14     # its own draw, not capped at --num_samples
    assert res["args"]["sampler"] == "dpm_solver"
    md = open(os.path.join(workdir, "eval_mnist.md")).read()
    assert "bits/dim" in md and md.count("precision / recall") == 2 and "clean background" in md

    png = str(tmp_path / "sweep.png")
    built = []
    make_sampler = mnist_sampling.make_sampler
    monkeypatch.setattr(mnist_sampling, "make_sampler", lambda s, *a: built.append(s.sampler)
                        or make_sampler(s, *a))
    out = eval_sweep.main([f"--workdir={workdir}", f"--data_dir={data_dir}",
                           f"--classifier_path={clf}",
                           "--settings=ddim:2:0,dpm_solver:2:1:20,heun:2:2",
                           "--num_samples=10", "--batch_size=10", f"--out_png={png}"])
    assert built == ["ddim", "dpm_solver", "heun"]   # once each: checked, counted and run
    monkeypatch.undo()
    rows = out["settings"]
    assert [(r["sampler"], r["steps"], r["guidance_scale"], r["n"]) for r in rows] == [
        ("ddim", 2, 0.0, 10), ("dpm_solver", 2, 1.0, 20), ("heun", 2, 2.0, 10)]
    assert [r["nfe"] for r in rows] == [2, 2, 3]   # Heun: two model calls per step, one last
    for r in rows + list(out["real"].values()):   # sample statistics, and the real-data row
        assert all(0.0 <= r[k] <= 1.0 for k in ("precision", "recall", "clean_background", "haze"))
    assert sorted(out["real"]) == ["10", "20"]
    assert out["real"]["20"]["fid"] == pytest.approx(out["floors"]["20"])
    # the module's run is at step 3, or 5 when the resume test ran first on this worker
    latest = max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert sorted(out["floors"]) == ["10", "20"] and out["step"] == latest and latest in (3, 5)
    assert all(np.isfinite(r["fd"]) and 0 <= r["conditional_accuracy"] <= 1 for r in rows)
    table = open(os.path.join(workdir, "sweep.md")).read()
    assert table.count("\n| (training images) |") == 2
    assert table.count("\n| DDIM | 2 | 2 |") == 1 and table.count("\n| HEUN | 2 | 3 |") == 1
    w, h = Image.open(png).size
    assert w > h  # 3 rows of 20 (two samples per digit)

    out = eval_sweep.main([f"--workdir={workdir}", f"--data_dir={data_dir}",
                           f"--classifier_path={clf}", "--settings=ddim:2:1",
                           "--num_samples=10", "--batch_size=10", "--ddim_clip=diffusers",
                           "--name=sweep_clip"])
    assert out["args"]["ddim_clip"] == "diffusers"
    assert "diffusers' form" in open(os.path.join(workdir, "sweep_clip.md")).read()
    assert os.path.isfile(os.path.join(workdir, "sweep_clip.png"))
    from experiments.cli import ConfigError

    for argv, message in [
        (["--name=../x"], "--name must be a plain file name"),
        (["--settings=ddim:fifty:2"], "steps and N must be ints"),
        (["--settings=eulr:2:1"], "sampler one of"),
        (["--settings=ddpm:2:1", "--ddim_clip=diffusers"], "--ddim_clip applies to DDIM"),
        (["--settings=dpm_solver:2000:1"], "num_steps must be <= num_timesteps"),
        ([f"--data_dir={data_dir}", "--settings=ddim:2:1:30"], "N=30 exceeds the 24 test"),
    ]:
        with pytest.raises(ConfigError, match=message):
            eval_sweep.main([f"--workdir={workdir}", f"--classifier_path={clf}"] + argv)
    with pytest.raises(ConfigError, match="sampling.eta applies"):   # checked before any work
        eval_mnist.main([f"--workdir={workdir}", "--sampler=ddpm", "--eta=0.5",
                         "--data_dir=/nonexistent"])


def test_optional_model_fields_parse_from_the_command_line():
    """Fields that default to None are typed placeholders (absl needs a type to parse
    ``--config.model.attention_implementation=cudnn``); the string "None" resets an optional
    field when the UNet is built."""
    from experiments.configs import mnist
    from experiments.mnist_lib import build_model

    c = mnist.get_config()
    assert c.model.get_ref("attention_implementation").get_type() is str
    assert c.model.get_ref("time_embed_dim").get_type() is int
    c.model.attention_implementation = "xla"
    c.model.time_embed_dim = 96
    c.model.mid_attention = "None"
    cfg = build_model(c).config
    assert cfg.attention_implementation == "xla" and cfg.time_embed_dim == 96
    assert cfg.mid_attention is None


@pytest.mark.slow
def test_corrupt_checkpoint_is_one_line_naming_the_step(trained, tmp_path, capsys):
    """A corrupt checkpoint (truncated metadata) reads as one ``error:`` line that names the step
    directory, not an Orbax traceback."""
    import shutil

    from experiments import sample

    _, workdir, _, _ = trained
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    ckpt = os.path.join(copy, "checkpoints")
    step = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
    meta_dir = os.path.join(ckpt, str(step), "meta")
    for name in os.listdir(meta_dir):
        path = os.path.join(meta_dir, name)
        if os.path.isfile(path):
            with open(path, "w") as f:
                f.write("{not json")
    with pytest.raises(SystemExit) as e:
        sample.cli_main([f"--workdir={copy}", "--num_samples=1", "--steps=2",
                         f"--out={tmp_path / 's.png'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    line = [x for x in err if x.startswith("error:")]
    assert len(line) == 1 and os.path.join(ckpt, str(step)) in line[0], err


def test_sweep_markdown_pivots_samplers_by_nfe():
    """Several samplers at several NFE: the sampler x NFE table, Heun's odd NFE in the nearest
    column with its own count; a single sampler gets no pivot."""
    from experiments.eval_sweep import markdown

    def row(name, steps, nfe, fd):
        return dict(sampler=name, steps=steps, nfe=nfe, guidance_scale=2.0, n=300, fd=fd,
                    conditional_accuracy=0.5, time_s=1.0)

    rows = [row("ddim", 5, 5, 9.0), row("ddim", 10, 10, 7.0), row("heun", 3, 5, 8.0),
            row("heun", 5, 9, 6.0)]
    res = dict(classifier=dict(test_accuracy=0.99), floors={"300": 1.0}, workdir="w", step=1)
    table = markdown(dict(res, settings=rows))
    assert "| sampler | NFE 5 | NFE 10 |" in table
    assert "| heun | 8.00 / 0.500 | 6.00 / 0.500 (9) |" in table
    assert "NFE 5 |" not in markdown(dict(res, settings=rows[:2]))


def test_sampler_options_reach_the_sampler():
    """``name/key=value`` in eval_sweep settings and ``--option key=value`` in sample become
    options of the registry sampler; unknown options and options with a field of their own are
    one-line config errors."""
    from experiments import cli, mnist_sampling
    from experiments.cli import ConfigError
    from experiments.eval_sweep import parse_settings
    from jaxdiff.schedules import make_schedule

    (s,) = parse_settings("euler/spacing=leading/sigma_schedule=karras:10:2", 300)
    assert s["sampler"] == "euler" and s["label"] == "euler/spacing=leading/sigma_schedule=karras"
    assert s["options"] == {"spacing": "leading", "sigma_schedule": "karras"}
    assert cli.parse_sampler_options(["solver_order=3", "lambda_min_clipped=-5.1",
                                      "lower_order_final=False", "s_tmax=inf"]) == {
        "solver_order": 3, "lambda_min_clipped": -5.1, "lower_order_final": False,
        "s_tmax": float("inf")}
    sched = make_schedule("cosine", 100)
    sampler = mnist_sampling.make_sampler(
        mnist_sampling.sampling_config("euler", 10, 2.0, options=s["options"]), "eps", sched)
    assert sampler.options["spacing"] == "leading"
    assert sampler.options["sigma_schedule"] == "karras"
    for options, message in [({"spacing": "middle"}, "spacing"),
                             ({"solver_order": 3}, "does not take option 'solver_order'"),
                             ({"prediction_type": "v"}, "sampling.options.prediction_type")]:
        with pytest.raises(ConfigError, match=message):
            mnist_sampling.make_sampler(
                mnist_sampling.sampling_config("euler", 10, 2.0, options=options), "eps", sched)
    with pytest.raises(ConfigError, match="key=value"):
        cli.parse_sampler_options(["spacing"])


def test_command_line_sampling_defaults_come_from_the_run():
    """``sample`` / ``eval_mnist`` flags left unset take the run's ``config.sampling``; another
    sampler does not inherit the run sampler's own options."""
    import ml_collections

    from experiments import mnist_sampling

    run = ml_collections.ConfigDict(dict(sampler="ddim", num_steps=25, guidance_scale=2.0,
                                         clip_x0=1.0, eta=0.3, ddim_clip="diffusers",
                                         options={"spacing": "trailing"}))
    s = mnist_sampling.sampling_from_flags(run)
    assert (s.sampler, s.num_steps, s.guidance_scale, s.eta, s.ddim_clip) == (
        "ddim", 25, 2.0, 0.3, "diffusers")
    assert dict(s.options) == {"spacing": "trailing"}
    s = mnist_sampling.sampling_from_flags(run, "ddpm", None, 1.5, options={"spacing": "leading"})
    assert (s.sampler, s.num_steps, s.guidance_scale, s.eta, s.ddim_clip) == (
        "ddpm", 25, 1.5, None, None)
    assert dict(s.options) == {"spacing": "leading"} and s.clip_x0 == 1.0
    s = mnist_sampling.sampling_from_flags(run, "ddim", 50, None, eta=0.0)
    assert (s.num_steps, s.guidance_scale, s.eta) == (50, 2.0, 0.0)


@pytest.mark.slow
def test_eval_sweep_draws_average_independent_seeds(trained, tmp_path):
    """``--draws 2``: each setting is sampled and scored with seeds SEED and SEED+1 (new keys, new
    real subsets); the row is the draws' mean, its FD sd is theirs, the first draw reproduces a
    one-draw run at SEED, and the table shows mean +- sd."""
    from experiments import eval_sweep
    from experiments.cli import ConfigError

    _, workdir, _, _ = trained
    data_dir = str(tmp_path / "mnist")
    write_fake_mnist(data_dir, n_train=160, n_test=24)
    clf = str(tmp_path / "clf.msgpack")
    common = [f"--workdir={workdir}", f"--data_dir={data_dir}", f"--classifier_path={clf}",
              "--classifier_epochs=1", "--settings=ddim:2:1", "--num_samples=12",
              "--batch_size=12", "--seed=3"]
    one = eval_sweep.main(common + ["--name=one"])
    two = eval_sweep.main(common + ["--name=two", "--draws=2"])
    row, draws = two["settings"][0], two["settings"][0]["draws"]
    assert [d["seed"] for d in draws] == [3, 4]
    assert draws[0]["fd"] == pytest.approx(one["settings"][0]["fd"], rel=1e-5)
    assert draws[0]["floor"] == pytest.approx(one["floors"]["12"], rel=1e-5)
    assert draws[0]["fd"] != pytest.approx(draws[1]["fd"])   # another key and other subsets
    assert row["fd"] == pytest.approx((draws[0]["fd"] + draws[1]["fd"]) / 2)
    assert row["fd_sd"] == pytest.approx(abs(draws[0]["fd"] - draws[1]["fd"]) / np.sqrt(2))
    assert row["conditional_accuracy"] == pytest.approx(
        (draws[0]["conditional_accuracy"] + draws[1]["conditional_accuracy"]) / 2)
    assert two["floors"]["12"] == pytest.approx(np.mean(two["floor_draws"]["12"]))
    assert two["real"]["12"]["fid"] == pytest.approx(two["floors"]["12"])
    md = open(os.path.join(workdir, "two.md")).read()
    assert f"| {row['fd']:.2f} +- {row['fd_sd']:.2f} (" in md and "Means over 2 draws" in md
    assert "+-" not in open(os.path.join(workdir, "one.md")).read()
    with pytest.raises(ConfigError, match="--draws must be >= 1"):
        eval_sweep.main(common + ["--draws=0"])
