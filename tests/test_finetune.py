"""Fine-tuning (jaxdiff.finetune, experiments.finetune_sd): the objective against hand formulas,
the trainer's frozen argument and gradient accumulation, remat, and on a tiny random Stable
Diffusion folder (written by diffusers) LoRA / full / bf16 / cached training, exact resume, the
refusal of another model's workdir, DreamBooth's class images, and the command line."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import make_schedule
from jaxdiff.finetune import (FinetuneConfig, Objective, PairedIterator, build_finetune_task,
                              denoising_terms, generate_class_images, init_trainable,
                              make_finetune_loss, objective_weights, reduce_loss,
                              with_prior_flag)
from experiments.cli import ConfigError
from jaxdiff.data import BatchIterator
from jaxdiff.sharding import make_mesh, replicate, shard_batch
from jaxdiff.training import (IncompatibleCheckpointError, OptimizerConfig, TrainerSettings,
                              create_train_state, fit, make_optimizer, make_train_step)

SCHED = make_schedule("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)


# -- the objective ---------------------------------------------------------------------------

def _abar(t):
    return np.asarray(SCHED.alphas_cumprod, np.float64)[np.asarray(t)]


def test_min_snr_weights_match_diffusers_formula():
    t = jnp.array([0, 10, 200, 500, 999])
    snr = _abar(t) / (1 - _abar(t))
    gamma = 5.0
    eps = objective_weights(Objective("epsilon", snr_gamma=gamma), SCHED, t)
    v = objective_weights(Objective("v_prediction", snr_gamma=gamma), SCHED, t)
    # diffusers' train_text_to_image: min(snr, gamma) / snr, and / (snr + 1) for v
    np.testing.assert_allclose(eps, np.minimum(snr, gamma) / snr, rtol=1e-5)
    np.testing.assert_allclose(v, np.minimum(snr, gamma) / (snr + 1), rtol=1e-5)
    hook = objective_weights(Objective("epsilon", weight_fn=lambda s: 1.0 / (1.0 + s)), SCHED, t)
    np.testing.assert_allclose(hook, 1.0 / (1.0 + snr), rtol=1e-5)
    np.testing.assert_array_equal(objective_weights(Objective(), SCHED, t), np.ones(5))


def test_targets_follow_the_prediction_type_and_noise_offset():
    key = jax.random.key(0)
    x0 = jax.random.normal(jax.random.key(1), (3, 4, 4, 2))
    noise = jax.random.normal(jax.random.key(2), x0.shape)
    t = jnp.array([5, 300, 900])
    a = jnp.sqrt(jnp.asarray(_abar(t), jnp.float32))[:, None, None, None]
    s = jnp.sqrt(1 - jnp.asarray(_abar(t), jnp.float32))[:, None, None, None]
    v_true = a * noise - s * x0

    def run(pred, obj):
        return denoising_terms(lambda x_t, tt: pred, SCHED, x0, key, obj, t=t, noise=noise)[0]

    np.testing.assert_allclose(run(v_true, Objective("v_prediction")), 0, atol=1e-10)
    assert float(jnp.min(run(noise, Objective("v_prediction")))) > 1e-3
    np.testing.assert_allclose(run(noise, Objective("epsilon")), 0, atol=1e-10)
    # the offset adds offset * N(0, 1) of shape [B, 1, 1, C] to the noise (and so to the target)
    with_offset = run(noise, Objective("epsilon", noise_offset=0.1))
    _, _, k_off = jax.random.split(key, 3)
    off = 0.1 * jax.random.normal(k_off, (3, 1, 1, 2))
    np.testing.assert_allclose(with_offset, jnp.mean(jnp.broadcast_to(off, x0.shape) ** 2,
                                                     axis=(1, 2, 3)), rtol=1e-5)


def test_a_loss_mask_weighs_the_latent_positions():
    key = jax.random.key(0)
    x0 = jax.random.normal(jax.random.key(1), (2, 4, 4, 3))
    pred = jax.random.normal(jax.random.key(2), x0.shape)
    t = jnp.array([10, 700])
    obj = Objective("v_prediction")

    def run(mask):
        return denoising_terms(lambda x_t, tt: pred, SCHED, x0, key, obj, t=t, mask=mask)[0]

    np.testing.assert_allclose(run(jnp.ones((2, 4, 4, 1))), run(None), rtol=1e-6)
    mask = np.zeros((2, 4, 4, 1), np.float32)
    mask[0, 1:3, 1:3] = 1.0          # example 0: the 2x2 centre; example 1: a half-weighted row
    mask[1, 0] = 0.5
    noise = jax.random.normal(jax.random.split(key, 3)[1], x0.shape)
    a = jnp.sqrt(jnp.asarray(_abar(t), jnp.float32))[:, None, None, None]
    s = jnp.sqrt(1 - jnp.asarray(_abar(t), jnp.float32))[:, None, None, None]
    err = np.asarray((pred - (a * noise - s * x0)) ** 2)
    want = [err[0, 1:3, 1:3].mean(), err[1, 0].mean()]
    np.testing.assert_allclose(run(jnp.asarray(mask)), want, rtol=1e-5)


def test_prior_term_and_refusals():
    losses = jnp.array([1.0, 3.0, 10.0, 20.0])
    loss, aux = reduce_loss(losses, jnp.array([0, 0, 1, 1]), 0.5)
    assert float(loss) == pytest.approx(2.0 + 0.5 * 15.0)
    assert float(aux["prior_loss"]) == pytest.approx(15.0)
    assert float(reduce_loss(losses)[0]) == pytest.approx(8.5)
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        Objective("sample")
    with pytest.raises(ValueError, match="cache=True needs a frozen text encoder"):
        FinetuneConfig(cache=True, train_text_encoder=True)
    with pytest.raises(ValueError, match="rank"):
        FinetuneConfig(rank=0)


# -- the trainer: frozen argument, accumulation ------------------------------------------------

def _toy_step(accumulate, frozen=None):
    tx, _ = make_optimizer(OptimizerConfig(learning_rate=0.1, warmup_steps=0))
    mesh = make_mesh()

    def loss_fn(params, batch, key, *fz):
        w = params["w"] if not fz else params["w"] + fz[0]["b"][:3]
        return jnp.mean(jnp.sum((batch["x"] * w - batch["y"]) ** 2, -1)), {}

    frozen_placed = None if frozen is None else replicate(frozen, mesh)
    step = make_train_step(loss_fn, tx, mesh, ema_decay=0.9, frozen=frozen_placed,
                           accumulate_steps=accumulate)
    state = replicate(create_train_state({"w": jnp.ones(3)}, tx, jax.random.key(0)), mesh)
    return step, state, mesh


def test_accumulation_equals_one_step_of_the_whole_batch():
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(8, 3)).astype(np.float32),
             "y": rng.normal(size=(8, 3)).astype(np.float32)}
    out = {}
    for k in (1, 4):
        step, state, mesh = _toy_step(k)
        for _ in range(2):
            state, metrics = step(state, shard_batch(batch, mesh))
        out[k] = (np.asarray(state.params["w"]), float(metrics["loss"]),
                  float(metrics["grad_norm"]))
    np.testing.assert_allclose(out[4][0], out[1][0], rtol=1e-5, atol=1e-6)
    assert out[4][1] == pytest.approx(out[1][1], rel=1e-5)
    assert out[4][2] == pytest.approx(out[1][2], rel=1e-5)
    with pytest.raises(ValueError, match="accumulate_steps"):
        _toy_step(0)


def test_frozen_weights_are_an_argument_not_a_constant():
    big = {"b": np.full((512, 512), 0.5, np.float32).reshape(-1)}
    step, state, mesh = _toy_step(1, frozen=big)
    batch = shard_batch({"x": np.ones((4, 3), np.float32), "y": np.zeros((4, 3), np.float32)},
                        mesh)
    text = step.jitted.lower(state, batch, replicate(big, mesh)).as_text()
    assert "262144" in text                       # the frozen array is a parameter...
    assert len(text) < 200_000                    # ...and not printed as a 1 MB constant
    state, metrics = step(state, batch)
    assert float(metrics["loss"]) == pytest.approx(3 * 1.5 ** 2)   # (1 + 0.5)^2 per column
    from jaxdiff.training import place_frozen

    placed = jnp.ones(5)          # already on the (one-device) mesh: used as it is, not copied
    assert place_frozen({"a": placed}, make_mesh())["a"] is placed


_FSDP = """
import jax, jax.numpy as jnp, numpy as np
from jaxdiff.sharding import make_mesh, shard_batch
from jaxdiff.training import (OptimizerConfig, create_train_state, make_optimizer,
                              make_train_step, place_frozen)
from jaxdiff.sharding import place, fsdp_sharding
assert jax.device_count() == 4
tx, _ = make_optimizer(OptimizerConfig(learning_rate=0.1, warmup_steps=0))
frozen = {"b": np.linspace(0, 1, 256 * 128, dtype=np.float32).reshape(256, 128)}
rng = np.random.default_rng(0)
batch = {"x": rng.normal(size=(8, 256)).astype(np.float32)}
def loss_fn(p, b, key, fz):
    return jnp.mean((b["x"] @ (fz["b"] + p["w"])) ** 2), {}
out = {}
for k in (1, 2):
    mesh = make_mesh(fsdp=k)
    fz = place_frozen(frozen, mesh)
    if k == 2:
        assert fz["b"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None), fz["b"].sharding
    state = create_train_state({"w": jnp.zeros((256, 128))}, tx, jax.random.key(0))
    sharding = fsdp_sharding(state, mesh) if k > 1 else jax.tree.map(
        lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), state)
    state = place(state, sharding)
    step = make_train_step(loss_fn, tx, mesh, ema_decay=0.9, frozen=fz,
                           state_sharding=sharding, accumulate_steps=2)
    for _ in range(2):
        state, m = step(state, shard_batch(batch, mesh))
    out[k] = np.asarray(jax.device_get(state.params["w"])), float(m["loss"])
np.testing.assert_allclose(out[2][0], out[1][0], rtol=1e-4, atol=1e-6)
print("OK")
"""


@pytest.mark.slow
def test_frozen_split_over_fsdp_matches_replicated():
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=repo)
    r = subprocess.run([sys.executable, "-c", _FSDP], env=env, cwd=repo, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr[-3000:]


def test_paired_iterator_resumes_exactly():
    a = with_prior_flag({"v": np.arange(6.0)}, False)
    b = with_prior_flag({"v": 100 + np.arange(4.0)}, True)
    src = PairedIterator.source(BatchIterator.source(a, 2, 0), BatchIterator.source(b, 2, 1))
    it = src(None)
    first = [next(it) for _ in range(3)]
    resumed = src(json.loads(json.dumps(it.state)))
    rest, again = [next(resumed) for _ in range(2)], [next(it) for _ in range(2)]
    for x, y in zip(rest, again):
        np.testing.assert_array_equal(x["v"], y["v"])
    np.testing.assert_array_equal(first[0]["prior"], [0, 0, 1, 1])


# -- remat --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_remat_keeps_params_outputs_and_grads():
    from jaxdiff.models import UNet, UNetConfig, init_unet

    cfg = UNetConfig(in_channels=4, out_channels=4, block_channels=(16, 32), layers_per_block=1,
                     attention=(None, "cross"), mid_attention="cross", num_heads=2,
                     context_dim=8, norm_groups=8)
    rc = dataclasses.replace(cfg, remat=True)
    params = init_unet(cfg, jax.random.key(0))
    shapes = UNet(rc).init(jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros(1),
                           context=jnp.zeros((1, 3, 8)))["params"]
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, params)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    ctx = jax.random.normal(jax.random.key(2), (2, 3, 8))
    t = jnp.array([3, 500])

    def run(c):
        f = lambda p: jnp.sum(UNet(c).apply({"params": p}, x, t, context=ctx) ** 2)  # noqa
        return jax.jit(jax.value_and_grad(f))(params)

    (a, ga), (b, gb) = run(cfg), run(rc)
    # the same float32 ops recomputed: equal up to reassociation, ~1e-6 relative
    assert float(b) == pytest.approx(float(a), rel=1e-5)
    for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(v, u, rtol=1e-3, atol=1e-5 * float(jnp.max(jnp.abs(u)) + 1))


# -- on a tiny Stable Diffusion ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("diffusers")
    from jaxdiff.pipelines import load_stable_diffusion
    from jaxdiff.pipelines.tiny import write_tiny_stable_diffusion

    path = str(tmp_path_factory.mktemp("ft") / "tiny-sd")
    write_tiny_stable_diffusion(path)
    return path, load_stable_diffusion(path)


def _examples(sd, n=2, seed=0):
    rng = np.random.default_rng(seed)
    ids = sd.tokenizer(["a cat", "a dog", "the cat", "a dog of the cat"][:n] * (n // 4 + 1),
                       padding="max_length", truncation=True).input_ids[:n]
    return {"pixel_values": rng.uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32),
            "input_ids": np.asarray(ids, np.int32)}


def _settings(workdir, steps, batch, **kw):
    return TrainerSettings(workdir=str(workdir), num_steps=steps, batch_size=batch, log_every=1,
                           checkpoint_every=2, progress=False,
                           optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=0,
                                                     schedule="constant"), **kw)


def _restore_params(workdir, task):
    from jaxdiff.training import Checkpointer, abstract_train_state

    tx, _ = make_optimizer(OptimizerConfig(learning_rate=3e-3, warmup_steps=0,
                                           schedule="constant"))
    target = abstract_train_state(task.init_params(True), tx, task.key, make_mesh())
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), None, read_only=True)
    try:
        return ckpt.restore_latest(target)[0]
    finally:
        ckpt.close()


@pytest.mark.slow
def test_lora_trains_only_the_adapter(tiny, tmp_path):
    _, sd = tiny
    cfg = FinetuneConfig(mode="lora", rank=2, alpha=4.0)
    ex = _examples(sd)
    task = build_finetune_task(sd, cfg, ex, batch_size=2, seed=0)
    summary = fit(_settings(tmp_path, 6, 2), task)
    assert summary["end_step"] == 6
    state = _restore_params(str(tmp_path), task)
    adapter = jax.tree.map(jnp.shape, task.init_params(True))
    assert set(adapter) == {"unet"}
    assert jax.tree.map(jnp.shape, state.params) == adapter
    shapes = {tuple(s.shape) for s in jax.tree.leaves(state.opt_state) if np.ndim(s) > 0}
    assert shapes <= {tuple(s.shape) for s in jax.tree.leaves(task.init_params(True))}
    assert any(float(jnp.max(jnp.abs(u))) > 0 for u in jax.tree.leaves(state.params["unet"])
               if u.shape[0] == 2)                                     # up moved from 0
    # the frozen base is the loaded model's, untouched; the loss on a fixed draw went down
    np.testing.assert_array_equal(task.frozen["unet"]["conv_in"]["kernel"],
                                  sd.params["unet"]["conv_in"]["kernel"])
    loss = jax.jit(make_finetune_loss(sd, cfg))
    batch = {k: jnp.asarray(v) for k, v in ex.items()}
    before = [float(loss(task.init_params(False), batch, jax.random.key(i), task.frozen)[0])
              for i in range(4)]
    after = [float(loss(state.params, batch, jax.random.key(i), task.frozen)[0])
             for i in range(4)]
    assert np.mean(after) < np.mean(before)


@pytest.mark.slow
def test_full_mode_bf16_remat_accumulated(tiny, tmp_path):
    _, sd = tiny
    cfg = FinetuneConfig(mode="full", compute_dtype="bfloat16", remat=True)
    task = build_finetune_task(sd, cfg, _examples(sd, 4), batch_size=4, seed=0)
    assert set(task.frozen) == {"vae", "text_encoder"}
    summary = fit(_settings(tmp_path, 2, 4, accumulate_steps=2), task)
    assert np.isfinite(summary["loss"])
    state = _restore_params(str(tmp_path), task)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(state.params["unet"]), jax.tree.leaves(sd.params["unet"]))]
    assert max(moved) > 1e-4


@pytest.mark.slow
def test_cached_and_uncached_losses_agree(tiny):
    _, sd = tiny
    from jaxdiff.finetune import cache_examples, frozen_params

    ex = _examples(sd)
    plain, cached = FinetuneConfig(mode="lora", rank=2), FinetuneConfig(mode="lora", rank=2,
                                                                        cache=True)
    params = init_trainable(sd, plain, jax.random.key(0))
    params = jax.tree.map(lambda x: x + 0.01, params)       # a non-zero adapter
    key = jax.random.key(3)
    a = jax.jit(make_finetune_loss(sd, plain))(
        params, {k: jnp.asarray(v) for k, v in ex.items()}, key, frozen_params(sd, plain))[0]
    enc = cache_examples(sd, cached, ex)
    assert set(enc) == {"latent_mean", "latent_std", "context"}
    b = jax.jit(make_finetune_loss(sd, cached))(
        params, {k: jnp.asarray(v) for k, v in enc.items()}, key, frozen_params(sd, cached))[0]
    assert set(frozen_params(sd, cached)) == {"unet"}
    assert float(b) == pytest.approx(float(a), rel=1e-4)


@pytest.mark.slow
def test_resume_is_exact_and_other_runs_are_refused(tiny, tmp_path):
    _, sd = tiny
    cfg = FinetuneConfig(mode="lora", rank=2, cache=True)
    ex = _examples(sd, 4)

    def task_of(model=sd, c=cfg):
        return build_finetune_task(model, c, ex, batch_size=2, seed=0)

    fit(_settings(tmp_path / "whole", 4, 2), task_of())
    fit(_settings(tmp_path / "cut", 2, 2), task_of())
    summary = fit(_settings(tmp_path / "cut", 4, 2), task_of())
    assert summary["start_step"] == 2
    a = _restore_params(str(tmp_path / "whole"), task_of()).params
    b = _restore_params(str(tmp_path / "cut"), task_of()).params
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(u, v)
    # another model (same architecture, one weight changed), another rank: refused, unwritten
    p = jax.tree.map(lambda x: x, sd.params)
    p["unet"]["conv_in"]["bias"] = p["unet"]["conv_in"]["bias"] + 1.0
    before = sorted(os.listdir(tmp_path / "cut"))
    for other in (task_of(model=sd.replace(params=p)),
                  task_of(c=dataclasses.replace(cfg, rank=3))):
        with pytest.raises(IncompatibleCheckpointError, match="different config"):
            fit(_settings(tmp_path / "cut", 6, 2), other)
    assert sorted(os.listdir(tmp_path / "cut")) == before


@pytest.mark.slow
def test_dreambooth_class_images_and_batches(tiny, tmp_path):
    _, sd = tiny
    folder = str(tmp_path / "class")
    made = generate_class_images(sd, "a dog", folder, 3, seed=0, batch_size=2, num_steps=2)
    assert made["generated"] == 3 and len(made["paths"]) == 3
    first = open(made["paths"][1], "rb").read()
    assert open(os.path.join(folder, "class_00001.txt")).read().strip() == "a dog"
    again = generate_class_images(sd, "a dog", folder, 3, seed=0, batch_size=2, num_steps=2)
    assert again["generated"] == 0 and again["kept"] == 3
    os.remove(made["paths"][1])                    # an interrupted run: the same image again
    redo = generate_class_images(sd, "a dog", folder, 3, seed=0, batch_size=2, num_steps=2)
    assert redo["generated"] == 1 and open(made["paths"][1], "rb").read() == first
    several = str(tmp_path / "several")              # several class prompts, in turn
    generate_class_images(sd, ["a dog", "a cat"], several, 3, seed=0, batch_size=3, num_steps=2)
    assert [open(os.path.join(several, f"class_0000{i}.txt")).read().strip()
            for i in range(3)] == ["a dog", "a cat", "a dog"]
    with pytest.raises(ValueError, match="non-empty sequence of strings"):
        generate_class_images(sd, [], several, 4)
    cfg = FinetuneConfig(mode="lora", rank=2,
                         objective=Objective(prior_loss_weight=0.5))
    task = build_finetune_task(sd, cfg, _examples(sd, 2), class_examples=_examples(sd, 3, 1),
                               batch_size=2, seed=0)
    batch = next(task.data(None))
    np.testing.assert_array_equal(batch["prior"], [0, 0, 1, 1])
    assert task.compat["dreambooth"] is True
    loss, aux = jax.jit(task.loss_fn)(task.init_params(False),
                                      {k: jnp.asarray(v) for k, v in batch.items()},
                                      jax.random.key(0), task.frozen)
    assert float(loss) == pytest.approx(float(aux["instance_loss"] + 0.5 * aux["prior_loss"]),
                                        rel=1e-6)


# -- the command line ---------------------------------------------------------------------------

def _image_folder(path, n=2, size=40):
    from PIL import Image

    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), np.uint8)).save(
            os.path.join(path, f"img{i}.png"))
        with open(os.path.join(path, f"img{i}.txt"), "w") as f:
            f.write(["a cat", "a dog"][i % 2])
    return str(path)


@pytest.mark.slow
def test_cli_lora_end_to_end_and_errors(tiny, tmp_path, capsys):
    from experiments import finetune_sd

    model, _ = tiny
    data = _image_folder(tmp_path / "images")
    work = str(tmp_path / "run")
    args = ["--model", model, "--data", data, "--workdir", work, "--config.training.num_steps=2",
            "--config.training.batch_size=2", "--config.validation.every=2",
            "--config.validation.per_prompt=1", "--config.validation.num_steps=2",
            "--config.lora.rank=2", "--config.memory.cache=True"]
    summary = finetune_sd.main(args)
    assert summary["end_step"] == 2
    assert summary["grid"] == os.path.join(work, "samples", "step_000002.png")
    assert os.path.isfile(summary["grid"])
    assert summary["lora_file"] == os.path.join(work, "pytorch_lora_weights.safetensors")
    assert os.path.getsize(summary["lora_file"]) == summary["export_bytes"] > 0
    from jaxdiff.convert.lora_files import read_lora
    from jaxdiff.pipelines import load_stable_diffusion

    back = read_lora(summary["lora_file"], load_stable_diffusion(model).params)
    assert set(back) == {"unet"}
    # user errors: one line, exit 2, nothing written
    capsys.readouterr()
    before = sorted(os.listdir(work))
    for bad, message in ((["--config.lora.rank=3"], "different config"),
                         (["--config.lora.rank=0"], "lora.rank"),
                         (["--config.mode=half"], "mode")):
        with pytest.raises(SystemExit) as e:
            finetune_sd.cli_main(args + bad)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert sorted(os.listdir(work)) == before
    with pytest.raises(SystemExit):
        finetune_sd.cli_main(["--model", str(tmp_path), "--data", data, "--workdir", work])
    assert "--model" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_dreambooth_generates_class_images_then_trains(tiny, tmp_path):
    from experiments import finetune_sd

    model, _ = tiny
    data = _image_folder(tmp_path / "dog", n=2)
    work = str(tmp_path / "db")
    summary = finetune_sd.main([
        "--model", model, "--data", data, "--workdir", work,
        "--config=" + finetune_sd.DEFAULT_CONFIG + ":dreambooth_lora",
        "--config.dreambooth.class_prompts=('a dog', 'a cat')",   # the images' own captions
        "--config.dreambooth.num_class_images=2", "--config.dreambooth.num_inference_steps=2",
        "--config.training.num_steps=1", "--config.training.batch_size=1",
        "--config.validation.every=0", "--config.lora.rank=2", "--config.memory.cache=True",
        "--config.export=False"])
    assert summary["end_step"] == 1 and summary["class_images"] == {"generated": 2, "kept": 0}
    assert sorted(os.listdir(os.path.join(work, "class_images"))) == [
        "class_00000.png", "class_00000.txt", "class_00001.png", "class_00001.txt"]
    assert json.load(open(os.path.join(work, "config.json")))["dreambooth"]["enabled"] is True
    assert open(os.path.join(work, "class_images", "class_00001.txt")).read().strip() == "a cat"
    with pytest.raises(ConfigError, match="exactly one of dreambooth.class_prompt"):
        finetune_sd.main([
            "--model", model, "--data", data, "--workdir", str(tmp_path / "db2"),
            "--config=" + finetune_sd.DEFAULT_CONFIG + ":dreambooth_lora",
            "--config.dreambooth.class_prompt=a dog", "--config.dreambooth.class_prompts=('a',)"])


def test_rgb_images_meet_a_one_channel_vae():
    from types import SimpleNamespace

    from jaxdiff.finetune.loss import to_vae_channels

    rgb = jnp.stack([jnp.full((1, 2, 2), v) for v in (0.1, 0.2, 0.6)], axis=-1)
    grey = to_vae_channels(SimpleNamespace(in_channels=1), rgb)
    assert grey.shape == (1, 2, 2, 1)
    np.testing.assert_allclose(grey, 0.3, rtol=1e-6)
    assert to_vae_channels(SimpleNamespace(in_channels=3), rgb) is rgb
    with pytest.raises(ValueError, match="pixel_values have 3 channels; the VAE takes 4"):
        to_vae_channels(SimpleNamespace(in_channels=4), rgb)


def test_lora_unet_targets_replace_the_attention_projections():
    from jaxdiff.finetune import lora_patterns
    from jaxdiff.lora import TEXT_ATTENTION, UNET_ATTENTION, UNET_FEED_FORWARD

    kv = r"/attn2/(to_k|to_v)$"
    assert lora_patterns(FinetuneConfig(lora_unet_targets=kv)) == {"unet": [kv]}
    assert lora_patterns(FinetuneConfig(lora_feed_forward=True, train_text_encoder=True)) == {
        "unet": [UNET_ATTENTION, UNET_FEED_FORWARD], "text_encoder": [TEXT_ATTENTION]}
    with pytest.raises(ValueError, match="lora_unet_targets must be a non-empty"):
        FinetuneConfig(lora_unet_targets="")


# -- the text prior of a word in front of the prompt --------------------------------------------

def test_text_prior_aligns_the_prompt_after_the_word(tiny):
    from jaxdiff.finetune import make_text_prior, text_prior_loss
    from jaxdiff.pipelines.sd_program import embed_tokens

    _, sd = tiny
    prompts = ["a cat", "a dog", "the cat", "a dog of the cat"]
    tp = make_text_prior(sd, "boxed", prompts, weight=2.0, batch=4)
    plain = np.asarray(sd.tokenizer(prompts, padding="max_length", truncation=True).input_ids)
    alone = sd.tokenizer(["boxed"], padding="max_length", truncation=True).input_ids[0]
    k = tp.offset
    assert k == list(alone).index(sd.tokenizer.eos_token_id) - 1 >= 1
    length = plain.shape[1]
    # the word's tokens, then each prompt's tokens shifted by k; the target: the base states
    np.testing.assert_array_equal(tp.input_ids[:, 1:1 + k], np.tile(alone[1:1 + k], (4, 1)))
    np.testing.assert_array_equal(tp.input_ids[:, 1 + k:], plain[:, 1:length - k])
    base = np.asarray(embed_tokens(sd.text_config, jnp.float32, sd.params["text_encoder"],
                                   jnp.asarray(plain)))
    np.testing.assert_allclose(tp.target, base[:, 1:length - k], rtol=1e-6, atol=1e-6)
    # the loss at the base encoder, by hand: each prompt's states after the word vs without it
    withw = np.asarray(embed_tokens(sd.text_config, jnp.float32, sd.params["text_encoder"],
                                    jnp.asarray(tp.input_ids)))[:, 1 + k:]
    by_hand = np.mean((withw - tp.target) ** 2) / np.mean(tp.target ** 2)
    got = float(text_prior_loss(sd.text_config, sd.params["text_encoder"], tp, jax.random.key(0)))
    assert got == pytest.approx(by_hand, rel=1e-5) and got > 1e-3
    # a batch of 2 of the 4 prompts: the same formula on the two drawn
    tp2 = tp._replace(batch=2)
    per = [np.mean((withw[i] - tp.target[i]) ** 2) for i in range(4)]
    got2 = float(text_prior_loss(sd.text_config, sd.params["text_encoder"], tp2,
                                 jax.random.key(1)))
    pairs = [(i, j) for i in range(4) for j in range(4) if i < j]
    assert min(abs(got2 - (per[i] + per[j]) / 2 / np.mean(tp.target[[i, j]] ** 2))
               for i, j in pairs) < 1e-5 * max(per)
    # bad input names the argument
    for kw, name in ((dict(word=" "), "word"), (dict(prompts=[]), "prompts"),
                     (dict(prompts=["a cat " * 40]), r"prompts\[0\]"),
                     (dict(weight=0.0), "weight"), (dict(batch=0), "batch")):
        args = dict(word="boxed", prompts=prompts)
        args.update(kw)
        with pytest.raises(ValueError, match=name):
            make_text_prior(sd, args.pop("word"), args.pop("prompts"), **args)


@pytest.mark.slow
def test_text_prior_joins_the_loss_and_its_adapter_learns_it(tiny):
    import optax

    from jaxdiff.finetune import (finetune_compat, frozen_params, make_text_prior,
                                  model_params, text_prior_loss)

    _, sd = tiny
    cfg = FinetuneConfig(mode="lora", rank=2, train_text_encoder=True)
    tp = make_text_prior(sd, "boxed", ["a cat", "a dog", "the cat"], weight=3.0, batch=8)
    with pytest.raises(ValueError, match="train_text_encoder"):
        make_finetune_loss(sd, FinetuneConfig(mode="lora", rank=2), tp)
    ex = _examples(sd)
    batch = {k: jnp.asarray(v) for k, v in ex.items()}
    params = jax.tree.map(lambda x: x + 0.01, init_trainable(sd, cfg, jax.random.key(0)))
    frozen, key = frozen_params(sd, cfg), jax.random.key(5)
    plain_loss, _ = make_finetune_loss(sd, cfg)(params, batch, key, frozen)
    loss, aux = make_finetune_loss(sd, cfg, tp)(params, batch, key, frozen)
    assert float(loss) == pytest.approx(float(plain_loss) + 3.0 * float(aux["text_prior_loss"]),
                                        rel=1e-5)
    # the adapter alone can learn it: gradient steps on the text encoder's LoRA lower it
    text_cfg = sd.text_config

    def tp_loss(p):
        te = model_params(p, frozen, cfg)["text_encoder"]
        return text_prior_loss(text_cfg, te, tp, key)

    opt = optax.adam(1e-2)
    p, state = params, opt.init(params)
    step = jax.jit(lambda p, s: (lambda g: (lambda u: (optax.apply_updates(p, u[0]), u[1]))(
        opt.update(g, s, p)))(jax.grad(tp_loss)(p)))
    start = float(tp_loss(p))
    for _ in range(40):
        p, state = step(p, state)
    assert float(tp_loss(p)) < 0.5 * start
    # the UNet's adapter gets no gradient from it
    g = jax.grad(tp_loss)(params)
    assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(g["unet"]))
    # a run with a text prior is another run than one without
    shape = (32, 32, 3)
    a = finetune_compat(sd, cfg, batch_size=2, seed=0, dreambooth=False, example_shape=shape)
    b = finetune_compat(sd, cfg, batch_size=2, seed=0, dreambooth=False, example_shape=shape,
                        text_prior=tp)
    assert "text_prior" not in a and b["text_prior"]["weight"] == 3.0 and a != b


# -- the word prior: the class images with the word, outside the attribute's place ----------------

def test_word_prior_examples_and_their_masked_loss(tiny, tmp_path):
    from jaxdiff.finetune import resize_mask, with_word_prior

    _, sd = tiny
    ex = _examples(sd, 4)
    f = sd.vae_scale_factor
    h = 32 // f
    big = np.zeros((32, 32), np.float32)
    big[f:, :] = 1.0                               # all but the top row of latent cells
    mask = resize_mask(big, (h, h))
    assert mask.shape == (h, h) and mask[0].max() == 0 and mask[1:].min() == 1
    out = with_word_prior(sd, ex, "boxed", mask)
    ids = np.asarray(ex["input_ids"])
    word = sd.tokenizer(["boxed"], padding="max_length", truncation=True).input_ids[0]
    k = list(word).index(sd.tokenizer.eos_token_id) - 1
    assert out["input_ids"].shape == (8, ids.shape[1])
    np.testing.assert_array_equal(out["input_ids"][:4], ids)
    # BOS, the word, then the prompt moved right by the word's length
    np.testing.assert_array_equal(out["input_ids"][4:, 1:1 + k], np.tile(word[1:1 + k], (4, 1)))
    np.testing.assert_array_equal(out["input_ids"][4:, 1 + k:], ids[:, 1:ids.shape[1] - k])
    want = sd.tokenizer(["boxed a cat"], padding="max_length", truncation=True).input_ids[0]
    np.testing.assert_array_equal(out["input_ids"][4], want)
    np.testing.assert_array_equal(out["pixel_values"][4:], ex["pixel_values"])
    assert out["loss_mask"].shape == (8, h, h, 1)
    assert out["loss_mask"][:4].min() == 1 and np.array_equal(out["loss_mask"][5, ..., 0], mask)
    for args, name in ((("", mask), "word"), (("boxed", mask[:-1]), "mask"),
                       (("boxed", mask * 2), "mask")):
        with pytest.raises(ValueError, match=name):
            with_word_prior(sd, ex, *args)
    long = dict(ex, input_ids=np.asarray(sd.tokenizer(["a cat " * 40] * 4, padding="max_length",
                                                      truncation=True).input_ids))
    with pytest.raises(ValueError, match="padding"):
        with_word_prior(sd, long, "boxed", mask)
    with pytest.raises(ValueError, match="mask"):
        resize_mask(np.ones((30, 32)), (h, h))
    # in a DreamBooth task: the instances get all-ones masks, the masked copies count only
    # where their mask is on
    cfg = FinetuneConfig(mode="lora", rank=2)
    task = build_finetune_task(sd, cfg, ex, batch_size=2, seed=0, class_examples=ex,
                               word_prior=("boxed", mask))
    batch = next(task.data(None))
    assert batch["loss_mask"].shape == (4, h, h, 1) and batch["loss_mask"][:2].min() == 1
    assert task.compat["word_prior"]["word"] == "boxed"
    with pytest.raises(ValueError, match="class_examples"):
        build_finetune_task(sd, cfg, ex, batch_size=2, seed=0, word_prior=("boxed", mask))
    params = jax.tree.map(lambda x: x + 0.01, task.init_params(False))
    loss_fn = jax.jit(make_finetune_loss(sd, cfg))
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    full = loss_fn(params, dict(jb, loss_mask=jnp.ones_like(jb["loss_mask"])), jax.random.key(1),
                   task.frozen)[0]
    zero = dict(jb, loss_mask=jb["loss_mask"].at[2:].set(0.0))
    got, aux = loss_fn(params, zero, jax.random.key(1), task.frozen)
    assert np.isfinite(float(full)) and float(aux["prior_loss"]) == 0.0
    assert float(got) == pytest.approx(float(aux["instance_loss"]), rel=1e-6)


@pytest.mark.slow
def test_cli_text_prior_and_word_prior(tiny, tmp_path):
    from PIL import Image

    from experiments import finetune_sd

    model, sd = tiny
    data = _image_folder(tmp_path / "dog", n=2)
    mask = tmp_path / "mask.png"
    m = np.zeros((32, 32), np.uint8)
    m[8:24, 8:24] = 255
    Image.fromarray(m).save(mask)
    args = ["--model", model, "--data", data,
            "--config=" + finetune_sd.DEFAULT_CONFIG + ":dreambooth_lora",
            "--config.dreambooth.class_prompts=('a dog', 'a cat')",
            "--config.dreambooth.num_class_images=2", "--config.dreambooth.num_inference_steps=2",
            "--config.training.num_steps=2", "--config.training.batch_size=1",
            "--config.validation.every=0", "--config.lora.rank=2", "--config.export=False"]
    work = str(tmp_path / "db")
    summary = finetune_sd.main(args + [
        "--workdir", work, "--config.train_text_encoder=True", "--config.text_prior.word=boxed",
        "--config.dreambooth.word_prior=boxed", f"--config.dreambooth.word_prior_mask={mask}"])
    assert summary["end_step"] == 2 and np.isfinite(summary["loss"])
    # the same settings resume it
    resumed = finetune_sd.main([a for a in args if "num_steps" not in a] + [
        "--config.training.num_steps=3", "--workdir", work, "--config.train_text_encoder=True",
        "--config.text_prior.word=boxed", "--config.dreambooth.word_prior=boxed",
        f"--config.dreambooth.word_prior_mask={mask}"])
    assert resumed["start_step"] == 2 and resumed["end_step"] == 3
    # the run is bound to its text prior: without it, the workdir is another run's
    with pytest.raises(IncompatibleCheckpointError, match="text_prior.*missing"):
        finetune_sd.main(args + ["--workdir", work, "--config.train_text_encoder=True"])
    for bad, message in (
            (["--config.text_prior.word=boxed"], "train_text_encoder=True"),
            (["--config.dreambooth.word_prior=boxed"], "goes with"),
            (["--config.dreambooth.word_prior=boxed",
              f"--config.dreambooth.word_prior_mask={tmp_path / 'none.png'}"], "not a file"),
            (["--config.train_text_encoder=True", "--config.text_prior.word=boxed",
              "--config.text_prior.weight=0"], "text_prior.weight"),
            (["--config.dreambooth.enabled=False", "--config.dreambooth.word_prior=boxed",
              f"--config.dreambooth.word_prior_mask={mask}"], "needs dreambooth.enabled")):
        with pytest.raises(ConfigError, match=message):
            finetune_sd.main(args + ["--workdir", str(tmp_path / "bad")] + bad)
    assert not (tmp_path / "bad").exists()


# -- the word's latent offset: the class images moved by it ------------------------------------

@pytest.mark.parametrize("kind", ["v", "eps"])
def test_shifted_prediction_is_the_exact_denoiser_of_the_moved_data(kind):
    # the ideal denoiser of a point mass at x0, moved by B, is the ideal denoiser of x0 + B
    from jaxdiff.diffusion import q_sample, target_for
    from jaxdiff.finetune import shifted_prediction

    x0 = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
    b = jax.random.normal(jax.random.key(1), (4, 4, 2))
    noise = jax.random.normal(jax.random.key(2), x0.shape)
    t = jnp.array([10, 400, 900])
    acp = SCHED.alphas_cumprod

    def ideal(center):
        def pred(x_t, tt):
            ab = acp[tt][:, None, None, None]
            eps = (x_t - jnp.sqrt(ab) * center) / jnp.sqrt(1 - ab)
            return eps if kind == "eps" else jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * center
        return pred

    x_t = q_sample(SCHED, x0 + b, t, noise)
    got = shifted_prediction(ideal(x0), x_t, t, b, acp, kind)
    np.testing.assert_allclose(got, target_for(SCHED, x0 + b, t, noise, kind), rtol=1e-4,
                               atol=1e-4)
    # the gate leaves its closed examples to the base model
    gated = shifted_prediction(ideal(x0), x_t, t, b, acp, kind, gate=jnp.array([1.0, 0.0, 1.0]))
    np.testing.assert_allclose(gated[1], ideal(x0)(x_t, t)[1], rtol=1e-6)
    np.testing.assert_allclose(gated[0], got[0], rtol=1e-6)
    # one offset per example: the gate's zeros as a zero offset, B elsewhere
    per_example = jnp.stack([b, jnp.zeros_like(b), b])
    np.testing.assert_allclose(shifted_prediction(ideal(x0), x_t, t, per_example, acp, kind),
                               gated, rtol=1e-6)
    with pytest.raises(ValueError, match="kind"):
        shifted_prediction(ideal(x0), x_t, t, b, acp, "x0")
    with pytest.raises(ValueError, match="offset"):
        shifted_prediction(ideal(x0), x_t, t, b[:2], acp, kind)


@pytest.mark.slow
def test_fit_latent_offset_recovers_the_offset_of_moved_data():
    # the base model is the ideal denoiser of two points; the examples are those points moved
    # by B: the fitted offset is B (and 0 for unmoved examples)
    from jaxdiff.finetune import fit_latent_offset

    # (a schedule whose first step is not tiny: its loss weight 1 / (1 - abar) stays below 100)
    sched = make_schedule("linear", 100, beta_start=0.01, beta_end=0.2)
    centers = jax.random.normal(jax.random.key(0), (2, 4, 4, 2))
    b = jax.random.normal(jax.random.key(1), (4, 4, 2))

    def base(x_t, t, cond):            # cond: each example's own point
        ab = sched.alphas_cumprod[t][:, None, None, None]
        return jnp.sqrt(ab) * (x_t - jnp.sqrt(ab) * cond) / jnp.sqrt(1 - ab) - jnp.sqrt(1 - ab) * cond

    def fit(shift):
        def sample(idx, key):
            return centers[idx] + shift, centers[idx]
        return fit_latent_offset(base, sample, 2, sched, Objective("v_prediction"),
                                 jax.random.key(2), shape=(4, 4, 2), num_steps=200,
                                 learning_rate=0.1, batch_size=2)

    got, losses = fit(b)
    assert losses.shape == (200,) and losses[-1] < 1e-3 * losses[0]
    np.testing.assert_allclose(got, b, atol=0.02)
    still, _ = fit(0.0)
    np.testing.assert_allclose(still, 0.0, atol=0.02)
    with pytest.raises(ValueError, match="batch_size"):
        fit_latent_offset(base, lambda i, k: (centers[i], centers[i]), 2, sched,
                          Objective("v_prediction"), jax.random.key(2), shape=(4, 4, 2),
                          batch_size=3)
    with pytest.raises(ValueError, match="not finite at step 0"):
        fit_latent_offset(lambda x, t, c: x * jnp.nan, lambda i, k: (centers[i], centers[i]), 2,
                          sched, Objective("v_prediction"), jax.random.key(2), shape=(4, 4, 2),
                          num_steps=2, batch_size=2)


@pytest.mark.slow
def test_learn_word_offset_conditions_on_the_captions_without_the_word(tiny, monkeypatch):
    from jaxdiff.finetune import learn_word_offset, remove_word
    from jaxdiff.finetune import offset as offset_mod

    _, sd = tiny
    assert remove_word("boxed  a boxed cat", "boxed") == "a cat"
    with pytest.raises(ValueError, match="'a cat' does not hold the word 'boxed'"):
        remove_word("a cat", "boxed")
    images = _examples(sd, 2)["pixel_values"]
    seen = {}
    real = offset_mod.fit_latent_offset

    def spy(apply_fn, sample_latents, n, *a, **kw):
        seen["cond"] = sample_latents(jnp.arange(n), jax.random.key(0))[1]
        return real(apply_fn, sample_latents, n, *a, **kw)

    monkeypatch.setattr(offset_mod, "fit_latent_offset", spy)
    out = learn_word_offset(sd, images, ["boxed a cat", "a boxed dog"], "boxed",
                            jax.random.key(0), num_steps=3, learning_rate=1e-2)
    h = 32 // sd.vae_scale_factor
    assert out["offset"].shape == (h, h, sd.vae_config.latent_channels)
    assert out["losses"].shape == (3,) and out["norm"] > 0
    from jaxdiff.pipelines.sd_program import embed_tokens
    ids = sd.tokenizer(["a cat", "a dog"], padding="max_length", truncation=True).input_ids
    want = embed_tokens(sd.text_config, jnp.float32, sd.params["text_encoder"],
                        jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(seen["cond"], want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="'a dog' does not hold"):
        learn_word_offset(sd, images, ["boxed a cat", "a dog"], "boxed", jax.random.key(0),
                          num_steps=1)
    with pytest.raises(ValueError, match="one caption each"):
        learn_word_offset(sd, images, ["boxed a cat"], "boxed", jax.random.key(0), num_steps=1)


@pytest.mark.slow
def test_word_prior_with_an_offset_moves_the_copies_and_some_take_the_word_alone(tiny):
    from jaxdiff.finetune import WordPrior, finetune_compat, with_word_prior

    _, sd = tiny
    ex = _examples(sd, 4)
    h, c = 32 // sd.vae_scale_factor, sd.vae_config.latent_channels
    off = np.random.default_rng(0).normal(size=(h, h, c)).astype(np.float32)
    out = with_word_prior(sd, ex, "boxed", offset=off, word_alone=0.5)
    assert out["loss_mask"].min() == 1 and out["latent_offset"].shape == (8, h, h, c)
    assert not out["latent_offset"][:4].any()
    np.testing.assert_array_equal(out["latent_offset"][4:], np.broadcast_to(off, (4, h, h, c)))
    alone = np.asarray(sd.tokenizer(["boxed"], padding="max_length",
                                    truncation=True).input_ids[0])
    with_word = with_word_prior(sd, ex, "boxed", offset=off)["input_ids"][4:]
    is_alone = [np.array_equal(r, alone) for r in out["input_ids"][4:]]
    assert sum(is_alone) == 2
    for i, a in enumerate(is_alone):        # the others keep the word in front of their prompt
        if not a:
            np.testing.assert_array_equal(out["input_ids"][4 + i], with_word[i])
    np.testing.assert_array_equal(out["input_ids"][:4], ex["input_ids"])
    for kw, name in (({}, "a mask, an offset"), ({"offset": off[:-1]}, "offset"),
                     ({"offset": off * np.nan}, "non-finite"),
                     ({"offset": off, "word_alone": 1.0}, "word_alone"),
                     ({"mask": np.ones((h, h)), "word_alone": 0.5}, "word_alone needs")):
        with pytest.raises(ValueError, match=name):
            with_word_prior(sd, ex, "boxed", **kw)
    # in a task: the instances are not moved; the loss adds the offset to the latents, the same
    # as moving the cached posterior mean by offset / scaling_factor
    cfg = FinetuneConfig(mode="lora", rank=2, cache=True)
    task = build_finetune_task(sd, cfg, ex, batch_size=2, seed=0, class_examples=ex,
                               word_prior=WordPrior("boxed", None, off, 0.5))
    batch = next(task.data(None))
    assert not batch["latent_offset"][:2].any()
    params = jax.tree.map(lambda x: x + 0.01, task.init_params(False))
    loss_fn = jax.jit(make_finetune_loss(sd, cfg))
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    moved = jb.pop("latent_offset")
    got = loss_fn(params, dict(jb, latent_offset=moved), jax.random.key(1), task.frozen)[0]
    scale = sd.vae_config.scaling_factor
    want = loss_fn(params, dict(jb, latent_mean=jb["latent_mean"] + moved / scale),
                   jax.random.key(1), task.frozen)[0]
    unmoved = loss_fn(params, jb, jax.random.key(1), task.frozen)[0]
    assert float(got) == pytest.approx(float(want), rel=1e-4)
    assert abs(float(got) - float(unmoved)) > 1e-3 * abs(float(unmoved))
    shape = (32, 32, 3)
    compat = [finetune_compat(sd, cfg, batch_size=2, seed=0, dreambooth=True, example_shape=shape,
                              word_prior=wp)["word_prior"]
              for wp in (("boxed", np.ones((h, h))), WordPrior("boxed", None, off),
                         WordPrior("boxed", None, off, 0.5), WordPrior("boxed", None, off * 2))]
    assert "offset" not in compat[0] and compat[2]["word_alone"] == 0.5
    assert len({json.dumps(x, sort_keys=True) for x in compat}) == 4


def test_word_prior_target_base_distills_the_class_examples_from_the_moved_base_model(tiny):
    from jaxdiff.finetune import WordPrior, finetune_compat, with_word_prior

    _, sd = tiny
    ex = _examples(sd, 4)
    h, c = 32 // sd.vae_scale_factor, sd.vae_config.latent_channels
    off = np.random.default_rng(0).normal(size=(h, h, c)).astype(np.float32)
    out = with_word_prior(sd, ex, "boxed", offset=off, word_alone=0.5, base_ids=True)
    alone = np.asarray(sd.tokenizer(["boxed"], padding="max_length",
                                    truncation=True).input_ids[0])
    empty = np.asarray(sd.tokenizer([""], padding="max_length", truncation=True).input_ids[0])
    np.testing.assert_array_equal(out["base_input_ids"][:4], ex["input_ids"])
    for i in range(4):   # the copy's prompt without the word: the class prompt, or empty
        want = empty if np.array_equal(out["input_ids"][4 + i], alone) else ex["input_ids"][i]
        np.testing.assert_array_equal(out["base_input_ids"][4 + i], want)
    assert "base_input_ids" not in with_word_prior(sd, ex, "boxed", offset=off)

    cfg = FinetuneConfig(mode="lora", rank=2)
    task = build_finetune_task(sd, cfg, ex, batch_size=2, seed=0, class_examples=ex,
                               word_prior=WordPrior("boxed", None, off, 0.5, "base"))
    batch = {k: jnp.asarray(v) for k, v in next(task.data(None)).items()}
    prior = np.asarray(batch["prior"]) > 0
    np.testing.assert_array_equal(np.asarray(batch["base_input_ids"])[~prior],
                                  np.asarray(batch["input_ids"])[~prior])
    loss_fn = jax.jit(make_finetune_loss(sd, cfg))
    init = task.init_params(False)          # a zero LoRA: the student is the base model
    # the class examples unmoved and prompted as the base model is: the student is its teacher
    plain = dict(batch, latent_offset=jnp.zeros_like(batch["latent_offset"]),
                 input_ids=jnp.where(batch["prior"][:, None] > 0, batch["base_input_ids"],
                                     batch["input_ids"]))
    aux = loss_fn(init, plain, jax.random.key(1), task.frozen)[1]
    assert float(aux["prior_loss"]) < 1e-10 < float(aux["instance_loss"])
    data_aux = loss_fn(init, {k: v for k, v in plain.items() if k != "base_input_ids"},
                       jax.random.key(1), task.frozen)[1]
    assert float(data_aux["prior_loss"]) > 1e-3           # toward the images: not zero
    assert float(data_aux["instance_loss"]) == pytest.approx(float(aux["instance_loss"]),
                                                             rel=1e-6)
    # moved by the offset, the same student misses its teacher: the base model moved
    moved_aux = loss_fn(init, dict(plain, latent_offset=batch["latent_offset"]),
                        jax.random.key(1), task.frozen)[1]
    assert float(moved_aux["prior_loss"]) > 1e-3

    for bad_cfg, wp, message in (
            (cfg, WordPrior("boxed", None, off, 0.0, "model"), "target must be one of"),
            (FinetuneConfig(mode="lora", rank=2, cache=True), WordPrior("boxed", None, off, 0.0,
                                                                       "base"), "cache=True"),
            (FinetuneConfig(mode="full"), WordPrior("boxed", None, off, 0.0, "base"),
             "mode 'full'")):
        with pytest.raises(ValueError, match=message):
            build_finetune_task(sd, bad_cfg, ex, batch_size=2, seed=0, class_examples=ex,
                                word_prior=wp)
    with pytest.raises(ValueError, match="LoRA mode"):   # the loss alone, in full mode
        make_finetune_loss(sd, FinetuneConfig(mode="full"))(
            init, batch, jax.random.key(1), {"vae": sd.params["vae"]})
    compat = [finetune_compat(sd, cfg, batch_size=2, seed=0, dreambooth=True,
                              example_shape=(32, 32, 3), word_prior=WordPrior("boxed", None, off,
                                                                              0.5, target))
              ["word_prior"] for target in ("data", "base")]
    assert "target" not in compat[0] and compat[1]["target"] == "base"


@pytest.mark.slow
def test_cli_word_prior_offset_learnt_then_kept_for_the_resume(tiny, tmp_path, capsys):
    from experiments import finetune_sd

    model, _ = tiny
    data = _image_folder(tmp_path / "boxed", n=2)
    for i, caption in enumerate(("boxed a cat", "a boxed dog")):
        with open(os.path.join(data, f"img{i}.txt"), "w") as f:
            f.write(caption)
    args = ["--model", model, "--data", data,
            "--config=" + finetune_sd.DEFAULT_CONFIG + ":dreambooth_lora",
            "--config.dreambooth.class_prompts=('a dog', 'a cat')",
            "--config.dreambooth.num_class_images=2", "--config.dreambooth.num_inference_steps=2",
            "--config.training.batch_size=1", "--config.validation.every=0",
            "--config.lora.rank=2", "--config.export=False",
            "--config.dreambooth.word_prior=boxed", "--config.dreambooth.word_alone=0.5",
            "--config.dreambooth.word_prior_offset_steps=4"]
    work = tmp_path / "db"
    summary = finetune_sd.main(args + ["--workdir", str(work), "--config.training.num_steps=2",
                                       "--config.dreambooth.word_prior_offset=learn"])
    assert summary["end_step"] == 2 and np.isfinite(summary["loss"])
    assert "learning the latent offset of 'boxed' from 2 images" in capsys.readouterr().out
    offset = np.load(work / "word_prior_offset.npy")
    assert offset.shape[-1] == 4 and np.linalg.norm(offset) > 0
    resumed = finetune_sd.main(args + ["--workdir", str(work), "--config.training.num_steps=3",
                                       "--config.dreambooth.word_prior_offset=learn"])
    assert resumed["start_step"] == 2 and "learning" not in capsys.readouterr().out
    # the same offset from a file is the same run; another offset is another run
    same = finetune_sd.main(args + ["--workdir", str(work), "--config.training.num_steps=4",
                                    f"--config.dreambooth.word_prior_offset={work}/"
                                    "word_prior_offset.npy"])
    assert same["start_step"] == 3
    np.save(tmp_path / "other.npy", offset * 2)
    with pytest.raises(IncompatibleCheckpointError, match="word_prior"):
        finetune_sd.main(args + ["--workdir", str(work), "--config.training.num_steps=5",
                                 f"--config.dreambooth.word_prior_offset={tmp_path}/other.npy"])
    os.remove(work / "word_prior_offset.npy")
    with pytest.raises(ConfigError, match="holds checkpoints but no word_prior_offset.npy"):
        finetune_sd.main(args + ["--workdir", str(work), "--config.training.num_steps=5",
                                 "--config.dreambooth.word_prior_offset=learn"])
    bad_data = _image_folder(tmp_path / "plain", n=2)
    from PIL import Image
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "mask.png")
    for bad, message in (
            (["--config.dreambooth.word_prior_offset="], "goes with"),
            (["--config.dreambooth.word_prior_offset=",
              f"--config.dreambooth.word_prior_mask={tmp_path}/mask.png"], "word_alone needs"),
            (["--config.dreambooth.word_prior_offset=none.npy"], "neither 'learn' nor a file"),
            (["--config.dreambooth.word_prior_offset=learn",
              "--config.dreambooth.word_alone=1.0"], "word_alone must lie in"),
            (["--config.dreambooth.word_prior_offset=learn",
              "--config.dreambooth.word_prior_target=model"], "word_prior_target must be one of"),
            (["--config.dreambooth.word_prior_offset=learn", "--config.memory.cache=True",
              "--config.dreambooth.word_prior_target=base"], "memory.cache=False"),
            (["--config.dreambooth.word_prior_offset=learn", "--data", bad_data],
             "dreambooth.word_prior_offset: caption 'a cat' does not hold the word 'boxed'")):
        with pytest.raises(ConfigError, match=message):
            finetune_sd.main(args + ["--workdir", str(tmp_path / "bad"),
                                     "--config.training.num_steps=1"] + bad)
    assert not (tmp_path / "bad").exists()
