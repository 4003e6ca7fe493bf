"""The score-SDE MNIST hookup (experiments/configs/mnist_ve_sde.py + experiments.score_mnist) at
smoke size: a tiny UNet, the DSM loss and its gradient, PC and ODE sampling; config errors. The
command lines: train_score_mnist (a few steps on fake IDX files, exact resume, refused resume,
one-line errors) and eval_score_mnist (counted NFE, class entropy, ODE bits/dim, the table), and
the ODE bits/dim of a Gaussian against its closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import score_mnist
from experiments.cli import ConfigError
from experiments.configs import mnist, mnist_ve_sde

TINY = dict(block_channels=(8, 16), layers_per_block=(1, 1), attention=(None, None),
            up_attention=(None, None), mid_attention=None, num_heads=(1, 1),
            transformer_depth=(1, 1), norm_groups=4, context_dim=None)


def tiny_config():
    c = mnist_ve_sde.get_config()
    c.model = mnist.unet_fields(None, **TINY)
    c.sde.num_scales = 3
    c.sampling.num_steps = 3
    c.sampling.ode_steps = 2
    return c


@pytest.mark.slow
def test_loss_and_sampler_run_on_the_score_unet():
    c = tiny_config()
    sde, model = score_mnist.build_sde(c), score_mnist.build_score_model(c)
    assert sde.N == 3 and sde.sigma_max == 50.0 and model.time_scale == 999.0
    x0 = jnp.zeros((2, 28, 28, 1))
    shapes = jax.eval_shape(model.init, jax.random.key(0), x0, jnp.ones((2,)))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype),
                          shapes)
    loss_fn = score_mnist.make_loss_fn(c, model, sde)
    sample = score_mnist.make_sample_fn(c, model, sde)   # PC (the config's default)
    # one compilation for both (the UNet's is the cost here)
    loss, aux, images = jax.jit(lambda p: (*loss_fn(p, x0, jax.random.key(1)),
                                           sample(p, jax.random.key(2), 2)))(params)
    assert np.isfinite(float(loss)) and aux["per_example"].shape == (2,)
    assert images.shape == (2, 28, 28, 1) and float(jnp.abs(images).max()) <= 1.0
    assert float(jnp.std(images)) > 0


def test_config_errors():
    c = tiny_config()
    c.sde.type = "edm"
    with pytest.raises(ConfigError, match="sde.type"):
        score_mnist.build_sde(c)
    c = tiny_config()
    c.sde.sigma_max = 0.001
    with pytest.raises(ConfigError, match="sigma_min"):
        score_mnist.build_sde(c)
    c = tiny_config()
    c.model.num_classes = 10
    with pytest.raises(ConfigError, match="num_classes"):
        score_mnist.build_score_model(c)
    c = tiny_config()
    c.sampling.method = "ddim"
    with pytest.raises(ConfigError, match="sampling.method"):
        score_mnist.make_sample_fn(c, None, score_mnist.build_sde(c))


# --- the command lines: train_score_mnist (train, exact resume, errors) and eval_score_mnist ---

import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from tests.test_data import write_fake_mnist  # noqa: E402

TINY_ARGS = ['--config.model.block_channels=(8,16)', '--config.model.num_heads=1',
             '--config.model.attention=(None,None)', '--config.model.up_attention=(None,None)',
             '--config.model.mid_attention=None', '--config.model.norm_groups=4',
             '--config.training.batch_size=8', '--config.training.warmup_steps=1',
             '--config.training.log_every=1', '--config.training.checkpoint_every=2',
             '--config.training.lr_schedule=constant',   # num_steps not in the program: cached
             '--config.sampling.grid=2', '--config.sampling.grid_columns=2',
             '--config.sampling.method=ode', '--config.sampling.ode_solver=euler',
             '--config.sampling.ode_steps=1']


pytestmark = pytest.mark.usefixtures("compilation_cache")   # tests/conftest.py


@pytest.fixture(scope="module")
def score_runs(tmp_path_factory, compilation_cache):
    """An uninterrupted 4-step run and a run of 2 steps resumed to 4, on fake IDX files."""
    from experiments import train_score_mnist

    root = tmp_path_factory.mktemp("score")
    data = str(root / "mnist")
    write_fake_mnist(data, n_train=32, n_test=8)

    def train(workdir, steps):
        return train_score_mnist.main([f"--workdir={workdir}", f"--config.data.data_dir={data}",
                                       f"--config.training.num_steps={steps}"] + TINY_ARGS)

    full = train(root / "full", 4)
    first = train(root / "resumed", 2)
    resumed = train(root / "resumed", 4)
    return SimpleNamespace(root=root, data=data, full=full, first=first, resumed=resumed)


def _params(workdir):
    return score_mnist.load_run(str(workdir))


@pytest.mark.slow
def test_train_cli_writes_run_and_resumes_exactly(score_runs):
    r = score_runs
    assert (r.full["end_step"], r.full["checkpoint_step"]) == (4, 4)
    assert (r.first["end_step"], r.resumed["start_step"], r.resumed["end_step"]) == (2, 2, 4)
    rows = [json.loads(l) for l in open(r.root / "full" / "metrics.jsonl")]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(row["loss"]) and row["loss"] > 0 for row in rows)
    assert os.path.isfile(r.root / "full" / "samples" / "step_000004.png")
    config = json.load(open(r.root / "full" / "config.json"))
    assert config["sde"]["type"] == "ve" and config["training"]["num_steps"] == 4
    # the resumed run's steps 3-4 see the same batches and keys: the same losses, the same params
    resumed = [json.loads(l) for l in open(r.root / "resumed" / "metrics.jsonl")]
    assert [row["step"] for row in resumed] == [1, 2, 3, 4]
    for a, b in zip(rows, resumed):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
    full, res = _params(r.root / "full"), _params(r.root / "resumed")
    assert full.step == res.step == 4
    for a, b in zip(jax.tree.leaves(full.ema_params), jax.tree.leaves(res.ema_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_resume_with_another_sde_is_refused(score_runs):
    from experiments import train_score_mnist

    r = score_runs
    with pytest.raises(ValueError, match="different config.*sigma_max"):
        train_score_mnist.main([f"--workdir={r.root / 'full'}",
                                f"--config.data.data_dir={r.data}",
                                "--config.training.num_steps=6",
                                "--config.sde.sigma_max=20"] + TINY_ARGS)


@pytest.mark.parametrize("override,message", [
    ("--config.training.batch_size=0", "training.batch_size must be >= 1, got 0"),
    ("--config.sde.type=edm", "sde.type must be one of"),
    ("--config.training.weighting=snr", "training.weighting"),
    ("--config.sampling.corrector=hmc", "sampling.corrector"),
    ("--config.training.importance_sampling=True", "importance_sampling needs"),
])
def test_train_cli_bad_config_is_one_line_exit_2(tmp_path, capsys, override, message):
    from experiments import train_score_mnist

    with pytest.raises(SystemExit) as e:
        train_score_mnist.cli_main([f"--workdir={tmp_path / 'w'}", override])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and message in err
    assert err.count("\n") == 1 and not os.path.exists(tmp_path / "w")


@pytest.mark.slow
def test_eval_cli_numbers_and_counted_nfe(score_runs, tmp_path):
    """eval_score_mnist on the 4-step run: PC and fixed-step ODE rows with their counted NFE
    (PC: steps x (1 predictor + 1 corrector); RK4: 4 per step), the class entropy of the
    reported histogram, the ODE bits/dim (its NFE counted through the jvp), and the markdown
    table holding those numbers. (The adaptive solver's compile is left to the real run.)"""
    from experiments import eval_score_mnist

    r = score_runs
    from jaxdiff.metrics import init_classifier, save_classifier

    workdir = r.root / "full"
    png = tmp_path / "s.png"
    save_classifier(str(tmp_path / "clf.msgpack"), init_classifier(jax.random.key(0)))
    res = eval_score_mnist.main([
        f"--workdir={workdir}", f"--data_dir={r.data}",
        f"--classifier_path={tmp_path / 'clf.msgpack'}", "--num_samples=6", "--batch_size=4",
        "--pc_steps=3", "--ode_steps=2", "--adaptive_solver=none",
        "--bpd_examples=3", "--bpd_batch_size=2", "--bpd_solver=rk4", "--bpd_steps=2",
        f"--out_png={png}", "--png_per_sampler=3"])
    rows = res["samplers"]
    pc, rk4 = (rows[k] for k in rows)
    assert (pc["nfe_per_batch"], rk4["nfe_per_batch"]) == ([6, 6], [8, 8])
    for row in rows.values():
        hist = np.asarray(row["class_histogram"])
        assert row["n"] == 6 and np.isclose(hist.sum(), 1.0, atol=1e-3)
        want = -sum(p * math.log2(p) for p in hist if p > 0)
        assert np.isclose(row["class_entropy_bits"], want, atol=1e-3)
        assert 0 <= row["precision"] <= 1 and np.isfinite(row["fid"])
    ode = res["bpd"]["ode"]
    assert ode["n"] == 3 and ode["nfe"] == 8 and np.isfinite(ode["bpd"]) and ode["bpd"] > 0
    md = open(workdir / "eval_score_mnist.md").read()
    assert f"{ode['bpd']:.4f}" in md and f"{pc['fid']:.2f}" in md
    from PIL import Image
    width, height = Image.open(png).size
    assert height < width    # one row per sampler (2 rows), 3 samples each
    assert json.load(open(workdir / "eval_score_mnist.json"))["step"] == 4


@pytest.mark.slow
def test_eval_cli_errors_before_work(score_runs, tmp_path, capsys):
    from experiments import eval_score_mnist

    for argv, message in (([f"--workdir={tmp_path}"], "config.json not found"),
                          ([f"--workdir={score_runs.root / 'full'}", "--pc_steps=-1"],
                           "--pc_steps must be >= 0"),
                          ([f"--workdir={score_runs.root / 'full'}",
                            f"--discrete_workdir={tmp_path}"], "not a train_mnist run")):
        with pytest.raises(SystemExit) as e:
            eval_score_mnist.cli_main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1


@pytest.mark.slow
def test_ode_bits_per_dim_of_a_gaussian_is_exact():
    """Data N(0, s^2 I) under VE: the exact score -x / (s^2 + sigma(t)^2) makes the flow linear,
    x(T) = x sqrt((s^2 + sigma_max^2) / (s^2 + sigma(eps)^2)), and its Jacobian a multiple of I,
    so Hutchinson's Rademacher estimate is exact and log p of the dequantised images is known in
    closed form (against the N(0, sigma_max^2) prior). bits/dim = -log p / (D ln 2) + 7. The
    adaptive solve at rtol 1e-6 leaves < 1e-4 bits/dim; a wrong offset (8) or D, or a missing
    dequantisation, misses by far more. Three images in batches of 2 (the second padded)."""
    from experiments import score_eval
    from jaxdiff.sde import VESDE, uniform_dequantize

    sde, s2, eps = VESDE(sigma_min=0.01, sigma_max=50.0, N=10), 0.3, 1e-5
    model = SimpleNamespace(apply=lambda v, x, t: -x / (s2 + sde.sigma(t)[:, None, None, None]
                                                         ** 2))
    run = SimpleNamespace(sde=sde, model=model, ema_params={})
    levels = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 1)).astype(np.uint8)
    key = jax.random.key(5)
    out = score_eval.ode_bits_per_dim(run, levels, key, batch_size=2, solver="tsit5",
                                      rtol=1e-6, atol=1e-6, eps=eps)
    xs = []
    for i, chunk in enumerate((levels[:2], levels[2:])):
        k_deq = jax.random.split(jax.random.fold_in(key, i))[0]
        xs.append(np.asarray(uniform_dequantize(k_deq, chunk.astype(np.int32)))[:len(chunk)])
    x = np.concatenate(xs).reshape(3, -1).astype(np.float64)
    d = x.shape[1]
    var_eps, var_T = s2 + float(sde.sigma(eps)) ** 2, s2 + 50.0**2
    z = x * math.sqrt(var_T / var_eps)
    logp = (-0.5 * (z**2).sum(1) / 50.0**2 - d * math.log(50.0) - 0.5 * d * math.log(2 * math.pi)
            + 0.5 * d * math.log(var_T / var_eps))
    want = (-logp / (d * math.log(2)) + 7.0).mean()
    assert out["n"] == 3 and abs(out["bpd"] - want) < 1e-4, (out["bpd"], want)
