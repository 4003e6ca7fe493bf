"""Smoke-size end to end: train_vae_mnist's main (a tiny autoencoder, small fake IDX files in
tmp_path) -> checkpoint, metrics.jsonl, eval.jsonl (test-set MSE / PSNR), reconstruction grid;
an exact resume; config errors before anything is written."""

import json
import os

import numpy as np
import pytest

from tests.test_data import write_fake_mnist

TINY = ["--config.model.block_channels=(8,8,8)", "--config.model.norm_groups=4",
        "--config.model.latent_channels=2", "--config.training.batch_size=8",
        "--config.training.log_every=1", "--config.training.checkpoint_every=2",
        "--config.training.warmup_steps=1", "--config.training.lr_schedule=constant",
        "--config.eval.every=1000",
        "--config.eval.batch_size=8", "--config.eval.grid=4", "--config.eval.num_examples=0"]


pytestmark = pytest.mark.usefixtures("compilation_cache")   # tests/conftest.py


def _args(workdir, data_dir, num_steps):
    return [f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
            f"--config.training.num_steps={num_steps}", *TINY]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mnist"))
    write_fake_mnist(path, n_train=32, n_test=12)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    from experiments import train_vae_mnist

    workdir = str(tmp_path_factory.mktemp("vae") / "run")
    return workdir, train_vae_mnist.main(_args(workdir, data_dir, 3))


@pytest.mark.slow
def test_train_writes_checkpoint_metrics_eval_and_grid(trained):
    workdir, summary = trained
    assert summary["end_step"] == 3 and summary["checkpoint_step"] == 3
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    (ev,) = [json.loads(line) for line in open(os.path.join(workdir, "eval.jsonl"))]
    assert ev["step"] == 3 and ev["num_examples"] == 12
    assert 0 < ev["mse"] < 10 and np.isfinite(ev["psnr"])
    np.testing.assert_allclose(ev["scaling_factor"] * ev["latent_std"], 1.0, rtol=1e-6)
    assert summary["eval"]["mse"] == ev["mse"]
    from PIL import Image

    img = Image.open(os.path.join(workdir, "recon", "step_000003.png"))
    assert img.size[0] > img.size[1]  # 4 columns, 2 rows (originals over reconstructions)
    assert json.load(open(os.path.join(workdir, "config.json")))["model"]["latent_channels"] == 2


@pytest.mark.slow
def test_resume_is_exact(trained, data_dir, tmp_path):
    """3 steps + 2 resumed == 5 in one go (a constant learning rate: a cosine schedule would
    depend on num_steps)."""
    from experiments import train_vae_mnist

    workdir, _ = trained
    resumed = train_vae_mnist.main(_args(workdir, data_dir, 5))
    assert resumed["start_step"] == 3 and resumed["end_step"] == 5
    straight = train_vae_mnist.main(_args(str(tmp_path / "straight"), data_dir, 5))
    assert straight["start_step"] == 0
    for k in ("mse", "psnr", "latent_std"):
        assert resumed["eval"][k] == straight["eval"][k], k


@pytest.mark.parametrize("override, message", [
    ("--config.loss.recon_type=huber", "loss.recon_type"),
    ("--config.loss.beta=-1.0", "loss.beta"),
    ("--config.model.norm_groups=3", "model: block_channels"),
    ("--config.model.block_channels=(8,8,8,8)", "does not divide 28"),
])  # fmt: skip
def test_config_errors_are_one_line_and_write_nothing(tmp_path, data_dir, capsys, override,
                                                      message):
    from experiments import train_vae_mnist

    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train_vae_mnist.cli_main(_args(workdir, data_dir, 3) + [override])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not workdir.exists()


@pytest.mark.slow
def test_classifier_accuracy_on_reconstructions(trained, data_dir, tmp_path):
    """With eval.classifier_path, the evaluation reports the classifier's accuracy on the test
    images and on their reconstructions (here a random-init classifier: the numbers are checked
    against the classifier applied directly)."""
    import shutil

    import jax

    from experiments import train_vae_mnist
    from jaxdiff.data import load_mnist
    from jaxdiff.metrics import classifier_accuracy, init_classifier, save_classifier

    workdir, _ = trained
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    params = init_classifier(jax.random.key(3))
    path = str(tmp_path / "clf.msgpack")
    save_classifier(path, params)
    summary = train_vae_mnist.main(_args(copy, data_dir, 3)
                                   + [f"--config.eval.classifier_path={path}"])
    row = summary["eval"]
    images, labels = load_mnist("test", data_dir)
    assert row["classifier_accuracy_real"] == pytest.approx(
        classifier_accuracy(params, images, labels))
    assert 0.0 <= row["classifier_accuracy_recon"] <= 1.0
    last = [json.loads(line) for line in open(os.path.join(copy, "eval.jsonl"))][-1]
    assert last["classifier_accuracy_recon"] == pytest.approx(row["classifier_accuracy_recon"])
    with pytest.raises(Exception, match="eval.classifier_path"):
        train_vae_mnist.main(_args(copy, data_dir, 3)
                             + [f"--config.eval.classifier_path={tmp_path / 'missing'}"])
