"""The MNIST configs of issue 18 (the default's sampling, the long config) and the recipe table
script over stored eval_sweep outputs (synthetic files here: nothing is trained)."""

import json
import os

import pytest

import jaxdiff.models  # noqa: F401  (the package itself: if it breaks, this file fails)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_long_config_loads_validates_and_only_trains_longer():
    from experiments import mnist_lib
    from experiments.configs import mnist, mnist_long

    default, long = mnist.get_config(), mnist_long.get_config()
    mnist_lib.validate_config(long)   # raises ConfigError on any invalid field
    assert long.training.num_steps >= 4 * default.training.num_steps
    assert long.training.batch_size == default.training.batch_size
    # same model, diffusion recipe and sampler as the default: the length and the guidance differ
    assert long.model.to_dict() == default.model.to_dict()
    assert long.diffusion.to_dict() == default.diffusion.to_dict()
    own = ("every", "guidance_scale")
    sampling = {k: v for k, v in long.sampling.to_dict().items() if k not in own}
    assert sampling == {k: v for k, v in default.sampling.to_dict().items() if k not in own}
    assert 1.0 < long.sampling.guidance_scale < default.sampling.guidance_scale
    assert long.training.ema_decay > default.training.ema_decay


def test_long_config_loads_from_the_command_line(tmp_path):
    """``--config=experiments/configs/mnist_long.py`` parses (with an override) through the same
    flags as ``train_mnist``; the missing data stops it before anything is written."""
    from experiments import train_mnist
    from experiments.cli import ConfigError

    path = os.path.join(REPO, "experiments", "configs", "mnist_long.py")
    with pytest.raises(ConfigError, match="data.data_dir"):
        train_mnist.main([f"--workdir={tmp_path / 'w'}", f"--config={path}",
                          "--config.training.num_steps=5",
                          f"--config.data.data_dir={tmp_path / 'missing'}"])
    assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow
def test_default_sampling_is_at_most_50_model_evaluations():
    from experiments import mnist_lib, mnist_sampling
    from experiments.configs import mnist

    c = mnist.get_config()
    schedule = mnist_lib.build_schedule(c)
    sampler = mnist_sampling.make_sampler(c.sampling, c.diffusion.prediction_type, schedule)
    assert sampler.model_evaluations(schedule, c.sampling.num_steps) <= 50


def _fake_run(root, name, rows, fd_floor=20.0):
    """A workdir with config.json, metrics.jsonl and ``name``.json as the real tools write them."""
    from experiments.configs import mnist

    os.makedirs(root)
    with open(os.path.join(root, "config.json"), "w") as f:
        f.write(mnist.get_config().to_json())
    with open(os.path.join(root, "metrics.jsonl"), "w") as f:
        # 50 steps at 1 step/s, then 50 at 2 steps/s: 75 s = 1.25 min
        f.write(json.dumps({"step": 50, "loss": 1.0, "steps_per_sec": 1.0}) + "\n")
        f.write(json.dumps({"step": 100, "loss": 0.5, "steps_per_sec": 2.0}) + "\n")
    real = {"fid": fd_floor, "conditional_accuracy": 0.99, "precision": 0.9, "recall": 0.9,
            "clean_background": 0.8, "haze": 0.03}
    res = {"step": 100, "floors": {"1000": fd_floor}, "real": {"1000": real}, "settings": rows}
    with open(os.path.join(root, f"{name}.json"), "w") as f:
        json.dump(res, f)


def _row(label, haze, clean, acc):
    return {"sampler": label.split("/")[0], "label": label, "steps": 20, "nfe": 20,
            "guidance_scale": 2.0, "n": 1000, "fd": 30.0, "conditional_accuracy": acc,
            "precision": 0.9, "recall": 0.8, "clean_background": clean, "haze": haze}


def test_recipe_table_rows_minutes_and_targets(tmp_path):
    from benchmarks import recipe_table

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _fake_run(a, "recipe", [_row("ddim", 0.30, 0.50, 0.97), _row("euler_ancestral", 0.05,
                                                                 0.75, 0.98)])
    _fake_run(b, "recipe", [_row("ddim", 0.04, 0.80, 0.979)])
    assert recipe_table.train_minutes(a) == pytest.approx(1.25)
    text = recipe_table.main(["--name", "recipe", "--run", f"base={a}", "--run", f"new={b}",
                              "--out", str(tmp_path / "t.md")])["table"]
    assert open(tmp_path / "t.md").read() == text
    rows = [line for line in text.splitlines() if line.startswith("| base") or
            line.startswith("| new")]
    assert len(rows) == 3
    # the targets column: met at the boundary (0.05, 0.75, 0.98), not at accuracy 0.979
    assert [r.rstrip(" |").endswith("yes") for r in rows] == [False, True, False]
    assert "| base | 1.2 | ddim | 20 | 2 | 1000 | 30.00 (20.00) | 0.970 |" in rows[0]
    assert text.count("(training images)") == 1
    with pytest.raises(ValueError, match="LABEL=WORKDIR"):
        recipe_table.parse_run("no-equals-sign")


def test_recipe_table_per_run_sweep_name(tmp_path):
    """``LABEL=WORKDIR#NAME`` reads that run's ``NAME.json``; the others use ``--name``."""
    from benchmarks import recipe_table

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _fake_run(a, "recipe", [_row("ddim", 0.30, 0.50, 0.97)])
    _fake_run(b, "own", [_row("ddpm", 0.04, 0.80, 0.99)])
    text = recipe_table.main(["--name", "recipe", "--run", f"base={a}",
                              "--run", f"new={b}#own"])["table"]
    assert "| base | 1.2 | ddim |" in text and "| new | 1.2 | ddpm |" in text
    assert recipe_table.parse_run("x = /r/w#n") == ("x", "/r/w", "n")
    assert recipe_table.parse_run("x=/r/w") == ("x", "/r/w", None)
    for bad in ("x=/r/w#", "x=/r/w#a/b", "=/r/w#n"):
        with pytest.raises(ValueError, match="--run"):
            recipe_table.parse_run(bad)
    with pytest.raises(FileNotFoundError):   # b has no recipe.json: the name is not ignored
        recipe_table.main(["--name", "recipe", "--run", f"new={b}"])
