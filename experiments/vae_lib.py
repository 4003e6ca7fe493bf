"""Training an MNIST KL autoencoder from a config (``experiments/configs/vae_mnist.py``):
:func:`train` validates everything, then loads the data, builds or resumes the state and runs the
loop with the machinery of ``experiments.train_mnist`` (``jaxdiff.training``: mesh, optax, EMA,
Orbax checkpoints, :func:`~jaxdiff.training.train_loop`, exact resume), writing ``config.json``,
``checkpoints/``, ``metrics.jsonl``, ``eval.jsonl`` and ``recon/step_XXXXXX.png`` into the
workdir. :func:`evaluate` measures reconstructions on the test split.
``experiments.train_vae_mnist`` is the command line.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, Optional

import jax
import ml_collections
import numpy as np

from experiments import lib, train_lib
from experiments.cli import ConfigError
from experiments.images import save_grid
from jaxdiff.compile_options import cpu_compiler_options
from jaxdiff.data import BatchIterator, Prefetcher, load_mnist
from jaxdiff.metrics import classifier_accuracy, load_classifier
from jaxdiff.models import AutoencoderKL, AutoencoderKLConfig, init_autoencoder
from jaxdiff.models.autoencoder import autoencoder_param_shapes
from jaxdiff.training import (Checkpointer, OptimizerConfig, StopOnSignal, create_train_state,
                              make_optimizer, make_train_step, train_loop)
from jaxdiff.sharding import check_batch_divisible, make_mesh, replicate, replicated_sharding
from jaxdiff.training.writers import JsonlWriter
from jaxdiff.losses import RECON_TYPES, reconstruction_metrics, vae_loss
from jaxdiff.validation import check_choice, check_float, check_int

__all__ = ["validate_config", "build_model", "init_state", "make_loss_fn", "make_eval_fn",
           "evaluate", "train"]

IMAGE_SHAPE = (28, 28)


def _wrap(fn: Callable, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_model(config: ml_collections.ConfigDict) -> AutoencoderKL:
    """``AutoencoderKL(AutoencoderKLConfig(**config.model))`` (lists become tuples).

    Raises:
      ConfigError: the config rejects a field (named ``model.<field>``).
    """
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config.model.to_dict().items()}
    try:
        return AutoencoderKL(AutoencoderKLConfig(**fields))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None


def validate_config(config: ml_collections.ConfigDict) -> AutoencoderKL:
    """Checks every field (nothing is read, written or compiled) and returns the model.

    Raises:
      ConfigError: naming the first invalid field.
    """
    c, t, e = config, config.training, config.eval
    _wrap(check_int, "seed", c.seed, 0)
    _wrap(check_choice, "data.source", c.data.source, lib.DATA_SOURCES)
    _wrap(check_int, "data.prefetch", c.data.prefetch, 1)
    model = build_model(config)
    if model.config.in_channels != 1 or model.config.out_channels != 1:
        raise ConfigError("model.in_channels and model.out_channels must be 1 (MNIST is grey)")
    if 28 % model.config.downscale:
        raise ConfigError(f"model.block_channels: {len(model.config.block_channels)} levels "
                          f"downscale by {model.config.downscale}, which does not divide 28")
    _wrap(check_float, "loss.beta", c.loss.beta, minimum=0.0)
    _wrap(check_choice, "loss.recon_type", c.loss.recon_type, RECON_TYPES)
    for name in ("batch_size", "num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        _wrap(check_int, f"training.{name}", t[name], 1)
    _wrap(check_int, "training.warmup_steps", t.warmup_steps, 0)
    _wrap(check_float, "training.learning_rate", t.learning_rate, minimum=0.0,
          exclusive_minimum=True)
    _wrap(check_choice, "training.lr_schedule", t.lr_schedule, ("cosine", "constant"))
    for name in ("end_lr_factor", "weight_decay", "grad_clip_norm"):
        _wrap(check_float, f"training.{name}", t[name], minimum=0.0)
    _wrap(check_float, "training.ema_decay", t.ema_decay, minimum=0.0, maximum=1.0,
          exclusive_maximum=True)
    _wrap(check_batch_divisible, t.batch_size, make_mesh())
    train_lib.make_train_mesh(config)  # training.fsdp divides the device count
    for name in ("every", "batch_size", "grid"):
        _wrap(check_int, f"eval.{name}", e[name], 1)
    _wrap(check_int, "eval.num_examples", e.num_examples, 0)
    return model


def _compat(config: ml_collections.ConfigDict) -> Dict[str, Any]:
    return json.loads(json.dumps({"model": config.model.to_dict(), "loss": config.loss.to_dict(),
                                  "batch_size": config.training.batch_size,
                                  "seed": config.seed}))


def _hyperparams(config: ml_collections.ConfigDict) -> Dict[str, Any]:
    t = config.training
    keys = ("num_steps", "learning_rate", "warmup_steps", "lr_schedule", "end_lr_factor",
            "weight_decay", "grad_clip_norm", "ema_decay")
    return json.loads(json.dumps({k: t[k] for k in keys}))


def init_state(config: ml_collections.ConfigDict, model: AutoencoderKL, mesh, *,
               abstract: bool = False):
    """``(state, tx, lr_fn)``: the replicated TrainState (``params = {"params": ...}``), seeded
    by ``lib.run_keys(config.seed)``; ``abstract=True``: shapes only (a restore target)."""
    t = config.training
    tx, lr_fn = make_optimizer(OptimizerConfig(
        learning_rate=t.learning_rate, warmup_steps=t.warmup_steps, total_steps=t.num_steps,
        schedule=t.lr_schedule, end_lr_factor=t.end_lr_factor, weight_decay=t.weight_decay,
        grad_clip_norm=t.grad_clip_norm))
    keys = lib.run_keys(config.seed)
    if abstract:
        shapes = jax.eval_shape(lambda p: create_train_state({"params": p}, tx, keys["train"]),
                                autoencoder_param_shapes(model.config))
        repl = replicated_sharding(mesh)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
                            shapes), tx, lr_fn
    variables = {"params": init_autoencoder(model.config, keys["init"])}
    return replicate(create_train_state(variables, tx, keys["train"]), mesh), tx, lr_fn


def make_loss_fn(config: ml_collections.ConfigDict, model: AutoencoderKL) -> Callable:
    """``(variables, {"image": [B, 28, 28, 1]}, key) -> (loss, aux)``: :func:`vae_loss` with
    ``z`` sampled from the posterior by ``key``."""
    beta, recon_type = float(config.loss.beta), config.loss.recon_type

    def loss_fn(variables, batch, key):
        return vae_loss(model.apply, variables, batch["image"], key, beta=beta,
                        recon_type=recon_type)

    return loss_fn


def make_eval_fn(model: AutoencoderKL) -> Callable:
    """Jitted ``(variables, images [N, 28, 28, 1]) -> (recon, {"mse", "psnr"} [N], z)``: the
    posterior's mode decoded; MSE in ``[-1, 1]`` units, PSNR with data range 2."""

    def fn(variables, images):
        recon, posterior = model.apply(variables, images)
        return recon, reconstruction_metrics(images, recon), posterior.mean

    return jax.jit(fn, compiler_options=cpu_compiler_options())


def evaluate(eval_fn: Callable, variables, images: np.ndarray, batch_size: int,
             classifier: Optional[tuple] = None) -> Dict[str, Any]:
    """Test-set reconstruction metrics: ``{"mse", "psnr"}`` (means over the images),
    ``latent_std`` (of the posterior means) and ``scaling_factor`` (``1 / latent_std``, the
    latent-diffusion convention), ``num_examples``; plus ``recon``: the first batch's
    reconstructions. The last batch is padded to ``batch_size`` (one compiled shape).

    ``classifier``: ``(params, labels [N])`` of a ``jaxdiff.metrics`` MNIST classifier; then also
    ``classifier_accuracy_real`` and ``classifier_accuracy_recon``, its accuracy on the images and
    on their reconstructions (what a reconstruction keeps of the digit)."""
    mse, psnr, zs, first, recons = [], [], [], None, []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        n = len(chunk)
        pad = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
        recon, m, z = jax.device_get(eval_fn(variables, pad))
        mse.append(m["mse"][:n])
        psnr.append(m["psnr"][:n])
        zs.append(z[:n])
        first = recon[:n] if first is None else first
        if classifier is not None:
            recons.append(recon[:n])
    latent_std = float(np.concatenate(zs).std())
    out = {"mse": float(np.concatenate(mse).mean()), "psnr": float(np.concatenate(psnr).mean()),
           "latent_std": latent_std, "scaling_factor": 1.0 / latent_std,
           "num_examples": int(len(images)), "recon": first}
    if classifier is not None:
        params, labels = classifier
        labels = np.asarray(labels)[:len(images)]
        out["classifier_accuracy_real"] = classifier_accuracy(params, images, labels)
        out["classifier_accuracy_recon"] = classifier_accuracy(
            params, np.clip(np.concatenate(recons), -1.0, 1.0), labels)
    return out


def _load(config: ml_collections.ConfigDict, split: str) -> np.ndarray:
    try:
        images, _ = load_mnist(split, config.data.data_dir or None, source=config.data.source)
    except (FileNotFoundError, ImportError) as e:
        raise ConfigError(f"data: {e}") from None
    return images


class _Logger:
    """Means of the step metrics every ``every`` steps, with steps per second, to
    ``metrics.jsonl`` and one printed line."""

    def __init__(self, path: str, every: int, start: int):
        self.writer, self.every, self.acc = JsonlWriter(path), every, []
        self.t0, self.last = time.perf_counter(), start

    def __call__(self, step, m):
        self.acc.append(m)
        if step % self.every:
            return
        now = time.perf_counter()
        row = {k: float(np.mean([a[k] for a in self.acc])) for k in self.acc[0]}
        row["steps_per_sec"] = (step - self.last) / max(now - self.t0, 1e-9)
        self.acc, self.t0, self.last = [], now, step
        self.writer.write_scalars(step, row)
        self.writer.flush()
        print(f"step {step}: loss {row['loss']:.4f} ({row['steps_per_sec']:.1f} steps/s)")


def train(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """Trains (or resumes) the run in ``workdir``; returns ``{"start_step", "end_step",
    "wall_s", "stopped_by_signal", "checkpoint_step", "eval"}`` (``eval``: the last
    evaluation's row of ``eval.jsonl``).

    ``training.fsdp > 1`` splits the train state over an ``fsdp`` mesh axis
    (``experiments.train_lib.make_train_mesh`` / ``restore_or_init``: a resume reads each leaf
    straight into its shards); the evaluations gather the EMA params.

    Raises:
      ConfigError: an invalid config field, data directory or workdir (nothing written).
      jaxdiff.training.IncompatibleCheckpointError: ``workdir`` holds a run of another config.
    """
    workdir = os.path.abspath(workdir)
    model = validate_config(config)
    lib.check_paths(config, workdir)
    t, e = config.training, config.eval
    train_images, test_images = _load(config, "train"), _load(config, "test")
    if e.num_examples:
        test_images = test_images[:e.num_examples]
    classifier = None
    if e.get("classifier_path"):
        try:
            clf_params = load_classifier(e.classifier_path)
        except (OSError, ValueError) as err:
            raise ConfigError(f"eval.classifier_path: {err}") from None
        _, test_labels = load_mnist("test", config.data.data_dir or None,
                                    source=config.data.source)
        classifier = (clf_params, test_labels)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"workdir {workdir!r} is not writable: {err}") from None
    is_main = jax.process_index() == 0
    mesh = train_lib.make_train_mesh(config)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), _compat(config),
                        max_to_keep=t.keep_checkpoints, save_interval_steps=t.checkpoint_every,
                        hyperparams=_hyperparams(config))
    state, tx, lr_fn, data_state, state_sharding = train_lib.restore_or_init(
        ckpt, mesh, lambda abstract: init_state(config, model, mesh, abstract=abstract))
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))
    start = int(jax.device_get(state.step))
    step_fn = make_train_step(make_loss_fn(config, model), tx, mesh, ema_decay=t.ema_decay,
                              lr_schedule=lr_fn, state_sharding=state_sharding)
    eval_fn = make_eval_fn(model)
    last_eval: list[Optional[Dict[str, Any]]] = [None]
    eval_log = JsonlWriter(os.path.join(workdir, "eval.jsonl")) if is_main else None

    def run_eval(step, st):
        ema = train_lib.gather_replicated(st.ema_params, mesh)  # whole, when split over fsdp
        result = evaluate(eval_fn, ema, test_images, e.batch_size, classifier)
        recon = result.pop("recon")
        if is_main:
            eval_log.write_scalars(step, result)
            eval_log.flush()
            k = min(e.grid, len(recon))
            grid = np.concatenate([test_images[:k], recon[:k]])
            save_grid(grid, os.path.join(workdir, "recon", f"step_{step:06d}.png"), ncols=k)
            acc = ("" if classifier is None else
                   f", classifier accuracy {result['classifier_accuracy_recon']:.4f} on "
                   f"reconstructions ({result['classifier_accuracy_real']:.4f} on the images)")
            print(f"eval step {step}: mse {result['mse']:.5f} psnr {result['psnr']:.2f} dB{acc}")
        last_eval[0] = dict(result, step=step)

    def on_step(step, st):
        if step % e.every == 0:
            run_eval(step, st)

    logger = _Logger(os.path.join(workdir, "metrics.jsonl"), t.log_every, start)
    it = BatchIterator.from_state({"image": train_images}, t.batch_size, config.seed, data_state)
    t0 = time.perf_counter()
    with StopOnSignal() as stop, Prefetcher(it, config.data.prefetch) as batches:
        try:
            state = train_loop(state, step_fn, batches, mesh, t.num_steps, checkpointer=ckpt,
                               on_metrics=logger if is_main else None, on_step=on_step,
                               stop=stop, sync_every=t.log_every)
        finally:
            logger.writer.close()
            ckpt.close()
    end = int(jax.device_get(state.step))
    if stop.requested is None and (last_eval[0] is None or last_eval[0]["step"] != end):
        run_eval(end, state)
    if eval_log is not None:
        eval_log.close()
    summary = {"start_step": start, "end_step": end, "wall_s": time.perf_counter() - t0,
               "stopped_by_signal": stop.requested is not None,
               "checkpoint_step": ckpt.latest_step(), "eval": last_eval[0]}
    if is_main:
        print(json.dumps(summary))
    return summary
