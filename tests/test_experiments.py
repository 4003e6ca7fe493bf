"""Smoke-size end to end: train_mnist through its absl main (tiny UNet, small IDX files written in
tmp_path) -> checkpoint, metrics.jsonl, PNG grid; resume; then experiments.sample from the
workdir."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from tests.test_data import write_fake_mnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("jaxdiff.models", reason="models not available")

SMOKE = os.path.join(REPO, "experiments", "configs", "mnist_smoke.py")


def _overrides(workdir, data_dir, num_steps):
    """CLI args for the smoke config (2-level UNet, batch 8) on the IDX files in ``data_dir``."""
    return [f"--workdir={workdir}", f"--config={SMOKE}", f"--config.data.data_dir={data_dir}",
            f"--config.training.num_steps={num_steps}"]


def _run_main(module, argv):
    """Parses ``argv`` into the absl flags and calls ``module.main`` (as app.run would).

    ml_collections finds ``--config.*`` overrides in ``sys.argv``, so it is set too.
    """
    full = [module.__name__] + argv
    old = sys.argv
    sys.argv = full
    try:
        flags.FLAGS.unparse_flags()
        for name in [n for n in flags.FLAGS if n.startswith("config.")]:
            delattr(flags.FLAGS, name)  # the override flags are re-registered per parse
        return module.main(flags.FLAGS(full))
    finally:
        sys.argv = old


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent XLA cache for this module: the resumed run and sample.py reuse compilations."""
    import jax

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield jax.config.jax_compilation_cache_dir
    for k, v in old.items():
        jax.config.update(k, v)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, compilation_cache):
    from experiments import train_mnist

    root = tmp_path_factory.mktemp("exp")
    data_dir, workdir = str(root / "mnist"), str(root / "run")
    write_fake_mnist(data_dir, n_train=32, n_test=8)
    summary = _run_main(train_mnist, _overrides(workdir, data_dir, 3))
    return train_mnist, workdir, data_dir, summary


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


def test_resume_continues_from_checkpoint(trained, caplog):
    import logging

    train_mnist, workdir, data_dir, _ = trained
    with caplog.at_level(logging.WARNING, logger="jaxdiff.training.checkpoint"):
        summary = _run_main(train_mnist, _overrides(workdir, data_dir, 5))
    assert summary["start_step"] == 3 and summary["end_step"] == 5
    assert "num_steps: 3 -> 5" in caplog.text  # extending a run is allowed, and logged


@pytest.mark.parametrize("override,message", [
    ("--config.seed=1", "different config.*seed"),  # another data order
    ("--config.training.grad_clip_norm=0", "optimizer-state structure"),
])
def test_resume_with_other_seed_or_optimizer_is_a_clear_error(trained, override, message):
    train_mnist, workdir, data_dir, _ = trained
    with pytest.raises(ValueError, match=message):
        _run_main(train_mnist, _overrides(workdir, data_dir, 9) + [override])


def test_resume_with_other_model_is_a_clear_error(trained):
    train_mnist, workdir, data_dir, _ = trained
    argv = _overrides(workdir, data_dir, 9) + ["--config.diffusion.num_timesteps=500"]
    with pytest.raises(ValueError, match="different config.*num_timesteps"):
        _run_main(train_mnist, argv)


def test_sample_writes_png_and_npz(trained, tmp_path):
    from experiments import sample

    _, workdir, _, _ = trained
    out = str(tmp_path / "s.png")
    sample.main([f"--workdir={workdir}", "--num_samples=3", "--steps=2", "--labels=0,7",
                       "--sampler=ddpm", f"--out={out}"])
    arrays = np.load(str(tmp_path / "s.npz"))
    assert arrays["images"].shape == (3, 28, 28, 1) and list(arrays["labels"]) == [0, 7, 0]
    assert os.path.getsize(out) > 0


@pytest.mark.parametrize("override,message", [
    ("--config.training.learning_rate=-1", "learning_rate must be positive"),
    ("--config.training.batch_size=0", "batch_size must be positive"),
    ("--config.training.end_lr_factor=-0.5", "end_lr_factor must be >= 0"),
    ("--config.training.grad_clip_norm=-1", "grad_clip_norm must be >= 0"),
    ("--config.diffusion.prediction_type=noise", "diffusion.prediction_type must be one of"),
    ("--config.diffusion.loss_type=l3", "diffusion.loss_type must be one of"),
    ("--config.diffusion.weighting=snr", "diffusion.weighting must be one of"),
    ("--config.diffusion.schedule=quadratic", "diffusion.schedule must be one of"),
])
def test_invalid_values_fail_before_training(trained, tmp_path, override, message):
    train_mnist, _, data_dir, _ = trained
    with pytest.raises(ValueError, match=message):
        _run_main(train_mnist, _overrides(str(tmp_path / "w"), data_dir, 2) + [override])
    assert not os.path.exists(tmp_path / "w" / "checkpoints")
    assert not os.path.exists(tmp_path / "w" / "config.json")


def test_unwritable_workdir_and_missing_data(trained, tmp_path):
    train_mnist, _, data_dir, _ = trained
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")  # unwritable even for root
    with pytest.raises(ValueError, match="not writable"):
        _run_main(train_mnist, _overrides(str(blocker / "w"), data_dir, 2))
    from jaxdiff.data import HOW_TO_GET_MNIST

    with pytest.raises(ValueError, match="does not exist") as e:
        _run_main(train_mnist, _overrides(str(tmp_path / "w"), str(tmp_path / "none"), 2))
    assert HOW_TO_GET_MNIST in str(e.value)  # says how to get MNIST


def test_sample_output_is_replicated(trained):
    """Every process can read the images (a mesh over several hosts): output sharding P()."""
    from jax.sharding import PartitionSpec as P

    from experiments import sample

    _, workdir, _, _ = trained
    config, model, schedule, ema, mesh = sample.load_run(workdir)
    fn = sample.make_sample_fn(model, schedule, mesh, sampler="ddpm", num_steps=2,
                               guidance_scale=2.0, null_label=config.num_classes,
                               prediction_type=config.diffusion.prediction_type,
                               clip_x0=config.sampling.clip_x0 or None)
    import jax

    from jaxdiff.training import shard_batch

    out = fn(ema, shard_batch({"label": np.array([0, 7, 0], np.int32)}, mesh)["label"],
             jax.random.PRNGKey(0))
    assert out.shape == (3, 28, 28, 1) and out.sharding.spec == P()
    assert out.is_fully_addressable and out.is_fully_replicated


def test_ddim_clip_forms(trained):
    """``ddim_clip``: "consistent" re-derives eps from the clipped x0, "diffusers" keeps the
    model's eps. They differ only where clipping bites, and coincide without clipping."""
    import jax

    from experiments import sample

    config, model, schedule, ema, mesh = sample.load_run(trained[1])
    labels = np.array([0, 7], np.int32)
    key = jax.random.PRNGKey(0)

    def run(clip_x0, ddim_clip):
        fn = sample.make_sample_fn(model, schedule, mesh, sampler="ddim", num_steps=3,
                                   guidance_scale=2.0, null_label=config.num_classes,
                                   prediction_type=config.diffusion.prediction_type,
                                   clip_x0=clip_x0, ddim_clip=ddim_clip)
        return np.asarray(fn(ema, labels, key))

    a, b = run(1.0, "consistent"), run(1.0, "diffusers")
    assert np.abs(a - b).max() > 1e-3   # clipping bites on the 3-step model near t = T
    np.testing.assert_allclose(run(None, "consistent"), run(None, "diffusers"), atol=0)
    with pytest.raises(ValueError, match="ddim_clip"):
        run(1.0, "torch")


def test_cli_smoke_run_exits_zero(trained, compilation_cache, tmp_path):
    """``python -m experiments.train_mnist`` as a process: absl's app.run must exit with 0."""
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


def test_cli_unknown_config_field_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "experiments.train_mnist",
                        f"--workdir={tmp_path}", "--config.training.no_such_field=1"],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode != 0
    assert "no_such_field" in r.stderr and "Traceback" not in r.stderr[-2000:], r.stderr[-2000:]


def test_eval_mnist_and_eval_sweep_on_the_smoke_run(trained, tmp_path):
    """eval_mnist (classifier trained and cached, floor, conditional + unconditional samples,
    bits/dim) and eval_sweep (one row per setting, floors per N, picture) on the 3-step run."""
    from experiments import eval_mnist, eval_sweep
    from PIL import Image

    _, workdir, _, _ = trained
    data_dir = str(tmp_path / "mnist")
    write_fake_mnist(data_dir, n_train=160, n_test=24)
    clf = str(tmp_path / "clf.msgpack")
    res = eval_mnist.main([f"--workdir={workdir}", f"--data_dir={data_dir}",
                           f"--classifier_path={clf}", "--classifier_epochs=1",
                           "--num_samples=12", "--steps=2", "--batch_size=8",
                           "--bpd_examples=14", "--bpd_batch_size=7"])
    assert os.path.isfile(clf) and res["classifier"]["trained_now"]
    assert res["conditional"]["n"] == 12 and 0 <= res["conditional"]["conditional_accuracy"] <= 1
    hist = res["unconditional"]["class_histogram"]
    assert len(hist) == 10 and abs(sum(hist) - 1) < 1e-3
    assert np.isfinite(res["fid_floor"]["fid"]) and res["fid_floor"]["fid"] >= 0
    assert np.isfinite(res["bpd"]["bpd"]) and res["bpd"]["bpd"] > 0
    assert res["bpd"]["n"] == 14     # its own draw, not capped at --num_samples
    assert "bits/dim" in open(os.path.join(workdir, "eval_mnist.md")).read()

    png = str(tmp_path / "sweep.png")
    out = eval_sweep.main([f"--workdir={workdir}", f"--data_dir={data_dir}",
                           f"--classifier_path={clf}", "--settings=ddim:2:0,ddim:2:1:20,ddpm:3:2",
                           "--num_samples=10", "--batch_size=10", f"--out_png={png}"])
    rows = out["settings"]
    assert [(r["sampler"], r["steps"], r["guidance_scale"], r["n"]) for r in rows] == [
        ("ddim", 2, 0.0, 10), ("ddim", 2, 1.0, 20), ("ddpm", 3, 2.0, 10)]
    # the module's run is at step 3, or 5 when the resume test ran first on this worker
    latest = max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert sorted(out["floors"]) == ["10", "20"] and out["step"] == latest and latest in (3, 5)
    assert all(np.isfinite(r["fd"]) and 0 <= r["conditional_accuracy"] <= 1 for r in rows)
    table = open(os.path.join(workdir, "sweep.md")).read()
    assert table.count("\n| DD") == 3
    w, h = Image.open(png).size
    assert w > h  # 3 rows of 20 (two samples per digit)

    out = eval_sweep.main([f"--workdir={workdir}", f"--data_dir={data_dir}",
                           f"--classifier_path={clf}", "--settings=ddim:2:1",
                           "--num_samples=10", "--batch_size=10", "--ddim_clip=diffusers",
                           "--name=sweep_clip"])
    assert out["args"]["ddim_clip"] == "diffusers"
    assert "diffusers' form" in open(os.path.join(workdir, "sweep_clip.md")).read()
    assert os.path.isfile(os.path.join(workdir, "sweep_clip.png"))
    with pytest.raises(SystemExit):   # --name must not be a path
        eval_sweep.main([f"--workdir={workdir}", "--name=../x"])
    with pytest.raises(SystemExit):   # argparse error: a setting that does not parse
        eval_sweep.main([f"--workdir={workdir}", "--settings=ddim:fifty:2"])
    with pytest.raises(SystemExit):   # N larger than the test set
        eval_sweep.main([f"--workdir={workdir}", f"--data_dir={data_dir}",
                         f"--classifier_path={clf}", "--settings=ddim:2:1:30"])


def test_optional_model_fields_parse_from_the_command_line():
    """Fields that default to None are typed placeholders (absl needs a type to parse
    ``--config.model.attention_implementation=cudnn``); the string "None" resets an optional
    field when the UNet is built."""
    from experiments.configs import mnist
    from experiments.train_mnist import build_model

    c = mnist.get_config()
    assert c.model.get_ref("attention_implementation").get_type() is str
    assert c.model.get_ref("time_embed_dim").get_type() is int
    c.model.attention_implementation = "xla"
    c.model.time_embed_dim = 96
    c.model.mid_attention = "None"
    cfg = build_model(c).config
    assert cfg.attention_implementation == "xla" and cfg.time_embed_dim == 96
    assert cfg.mid_attention is None
