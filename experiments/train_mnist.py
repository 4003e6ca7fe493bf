"""Train a class-conditional diffusion UNet on MNIST (data parallel over all devices).

    python -m experiments.train_mnist --workdir runs/mnist
    python -m experiments.train_mnist --workdir runs/mnist --config.training.batch_size=128
    python -m experiments.train_mnist --workdir runs/accel \
        --config=experiments/configs/mnist_accel.py

The workdir gets ``config.json``, ``checkpoints/`` (Orbax; resumed automatically), ``metrics.jsonl``
and ``samples/step_XXXXXX.png`` (EMA params, DDIM + classifier-free guidance, one row per digit).
SIGTERM / Ctrl-C save a checkpoint and exit cleanly (a second Ctrl-C interrupts at once); rerunning
the same command resumes (with the same model, diffusion, batch size, seed and optimizer structure;
a changed ``num_steps`` or learning rate is allowed and logged). Multi-host: call with
``--distributed`` on every host (runs ``jax.distributed.initialize()``); a signal to any host stops
all of them together at the next ``log_every`` or checkpoint step. Metrics are read back from the
devices every ``log_every`` steps and before each checkpoint, not after every step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Dict

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.images import save_grid

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "mnist.py")

__all__ = ["validate_config", "compat_config", "resume_hyperparams", "build_model",
           "build_schedule", "init_state", "make_loss_fn", "train", "main"]


def validate_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """ValueError for invalid values and an unwritable workdir, before anything expensive (and
    before ``config.json`` or ``checkpoints/`` is written)."""
    from jaxdiff.data import HOW_TO_GET_MNIST
    from jaxdiff.diffusion import canonical_prediction_type
    from jaxdiff.losses import LOSS_TYPES, WEIGHTINGS
    from jaxdiff.schedules import BETA_SCHEDULES
    from jaxdiff.training import check_batch_divisible, make_mesh

    t, s, d = config.training, config.sampling, config.diffusion
    checks = [
        (t.batch_size > 0, f"training.batch_size must be positive, got {t.batch_size}"),
        (t.num_steps > 0, f"training.num_steps must be positive, got {t.num_steps}"),
        (t.learning_rate > 0, f"training.learning_rate must be positive, got {t.learning_rate}"),
        (t.warmup_steps >= 0, f"training.warmup_steps must be >= 0, got {t.warmup_steps}"),
        (t.end_lr_factor >= 0, f"training.end_lr_factor must be >= 0, got {t.end_lr_factor}"),
        (t.grad_clip_norm >= 0,
         f"training.grad_clip_norm must be >= 0 (0 = no clipping), got {t.grad_clip_norm}"),
        (0.0 <= t.ema_decay < 1.0, f"training.ema_decay must be in [0, 1), got {t.ema_decay}"),
        (0.0 <= t.cond_drop_prob < 1.0,
         f"training.cond_drop_prob must be in [0, 1), got {t.cond_drop_prob}"),
        (min(t.log_every, t.checkpoint_every, t.keep_checkpoints, s.every) > 0,
         "training.log_every, checkpoint_every, keep_checkpoints and sampling.every must be > 0"),
        (s.sampler in ("ddim", "ddpm"), f"sampling.sampler must be ddim|ddpm, got {s.sampler!r}"),
        (s.num_steps > 0 and s.per_class > 0, "sampling.num_steps and per_class must be positive"),
        (config.data.source in ("auto", "local", "tfds"),
         f"data.source must be auto|local|tfds, got {config.data.source!r}"),
        (d.schedule in BETA_SCHEDULES,
         f"diffusion.schedule must be one of {sorted(BETA_SCHEDULES)}, got {d.schedule!r}"),
        (d.num_timesteps >= 1, f"diffusion.num_timesteps must be >= 1, got {d.num_timesteps}"),
        (d.loss_type in LOSS_TYPES,
         f"diffusion.loss_type must be one of {LOSS_TYPES}, got {d.loss_type!r}"),
        (d.weighting in WEIGHTINGS,
         f"diffusion.weighting must be one of {WEIGHTINGS}, got {d.weighting!r}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    try:
        canonical_prediction_type(d.prediction_type)
    except ValueError as e:
        raise ValueError(f"diffusion.{e}") from e
    check_batch_divisible(t.batch_size, make_mesh())
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test_{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"workdir {workdir!r} is not writable: {e}") from e
    if config.data.data_dir and not os.path.isdir(config.data.data_dir):
        raise ValueError(f"data.data_dir {config.data.data_dir!r} does not exist. "
                         f"{HOW_TO_GET_MNIST}")


def compat_config(config: ml_collections.ConfigDict) -> Dict[str, Any]:
    """The part of the config a checkpoint must match to be resumed (with the seed: it orders the
    data)."""
    return json.loads(json.dumps({
        "model": config.model.to_dict(), "diffusion": config.diffusion.to_dict(),
        "num_classes": config.num_classes, "batch_size": config.training.batch_size,
        "seed": config.seed}))


def resume_hyperparams(config: ml_collections.ConfigDict) -> Dict[str, Any]:
    """Training settings that may change on resume (e.g. extending a run); changes are logged."""
    t = config.training
    keys = ("num_steps", "learning_rate", "warmup_steps", "lr_schedule", "end_lr_factor",
            "weight_decay", "grad_clip_norm", "ema_decay", "cond_drop_prob")
    return json.loads(json.dumps({k: t[k] for k in keys}))


def build_model(config):
    """``UNet(UNetConfig(**config.model))`` (lists from JSON turned back into tuples)."""
    from jaxdiff.models import UNet, UNetConfig

    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config.model.to_dict().items()}
    optional = {f.name for f in dataclasses.fields(UNetConfig) if "None" in str(f.type)}
    for k in optional & fields.keys():  # "--config.model.mid_attention=None" arrives as a string
        if fields[k] in ("None", "none"):
            fields[k] = None
    for k in ("dtype", "param_dtype"):
        if isinstance(fields.get(k), str):
            fields[k] = jnp.dtype(fields[k])
    return UNet(UNetConfig(**fields))


def build_schedule(config):
    from jaxdiff.schedules import make_schedule

    return make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)


def init_state(config, model, mesh, *, abstract: bool = False):
    """Replicated TrainState (same on every host: seeded); returns ``(state, tx, lr_fn)``.

    ``abstract=True`` computes nothing: ``state`` is then a pytree of ``jax.ShapeDtypeStruct`` with
    replicated shardings (``jax.eval_shape``), a restore target for a checkpoint.
    """
    from jaxdiff.training import (OptimizerConfig, create_train_state, make_optimizer, replicate,
                                  replicated_sharding)

    t = config.training
    tx, lr_fn = make_optimizer(OptimizerConfig(
        learning_rate=t.learning_rate, warmup_steps=t.warmup_steps, total_steps=t.num_steps,
        schedule=t.lr_schedule, end_lr_factor=t.end_lr_factor, weight_decay=t.weight_decay,
        grad_clip_norm=t.grad_clip_norm))
    k_train = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)

    # Init under jit with an RBG key: XLA's CPU compile of a threefry-keyed UNet init takes minutes
    # (~100 s for a tiny UNet on 2 cores); RngBitGenerator compiles ~4x faster. Deterministic.
    init_key = jax.random.key(config.seed, impl="unsafe_rbg")

    def init():
        return model.init({"params": init_key}, jnp.zeros((1, 28, 28, 1)),
                          jnp.zeros((1,), jnp.int32), labels=jnp.zeros((1,), jnp.int32))

    if abstract:
        shapes = jax.eval_shape(lambda: create_train_state(init(), tx, k_train))
        repl = replicated_sharding(mesh)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
                            shapes), tx, lr_fn
    variables = jax.jit(init)()
    return replicate(create_train_state(variables, tx, k_train), mesh), tx, lr_fn


def make_loss_fn(config, model, schedule):
    """``(variables, batch, key) -> (loss, aux)``: diffusion loss with label dropout."""
    from jaxdiff.losses import diffusion_loss

    d, t = config.diffusion, config.training

    def loss_fn(variables, batch, key):
        k_loss, k_drop = jax.random.split(key)

        def apply_fn(v, x, ts, c):
            return model.apply(v, x, ts, labels=c, train=True, rngs={"dropout": k_drop})

        return diffusion_loss(apply_fn, variables, schedule, batch["image"], k_loss,
                              batch["label"], prediction_type=d.prediction_type,
                              weighting=d.weighting, loss_type=d.loss_type,
                              cond_drop_prob=t.cond_drop_prob,
                              null_cond=jnp.int32(config.num_classes))

    return loss_fn


class _Logger:
    """Averages metrics over ``every`` steps; writes metrics.jsonl (+ TensorBoard) and tqdm."""

    def __init__(self, workdir, every, batch_size, start, total, enabled):
        self.every, self.batch_size, self.enabled = every, batch_size, enabled
        self.acc, self.t0, self.last_step = [], time.perf_counter(), start
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.bar, self.tb = None, None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
            try:
                import tensorboard  # noqa: F401
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(workdir, "tb"))
            except Exception:  # tensorboard optional
                self.tb = None

    def __call__(self, step, m):
        if not self.enabled:
            return
        self.acc.append(m)
        self.bar.update(1)
        if step % self.every:
            return
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.t0, 1e-9)
        row = {k: float(np.mean([a[k] for a in self.acc])) for k in self.acc[0]}
        row.update(step=step, steps_per_sec=rate, images_per_sec=rate * self.batch_size,
                   time=time.time())
        self.acc, self.t0, self.last_step = [], now, step
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                self.tb.add_scalar(k, v, step)
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row.get('lr', 0):.1e}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def train(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """Validates, loads data, builds or resumes the state, trains; returns a summary dict."""
    from experiments.sample import make_sample_fn, sample_images
    from jaxdiff.data import BatchIterator, Prefetcher, load_mnist
    from jaxdiff.training import (Checkpointer, StopOnSignal, make_mesh, make_train_step,
                                  train_loop)

    workdir = os.path.abspath(workdir)
    validate_config(config, workdir)
    images, labels = load_mnist("train", config.data.data_dir or None, source=config.data.source)
    t, s = config.training, config.sampling
    is_main = jax.process_index() == 0
    mesh = make_mesh()
    model, schedule = build_model(config), build_schedule(config)
    target, tx, lr_fn = init_state(config, model, mesh, abstract=True)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), compat_config(config),
                        max_to_keep=t.keep_checkpoints, save_interval_steps=t.checkpoint_every,
                        hyperparams=resume_hyperparams(config))
    data_state = {"epoch": 0, "index": 0}
    restored = ckpt.restore_latest(target)
    if restored is not None:
        state, data_state, step = restored
        if is_main:
            print(f"resumed from step {step} ({ckpt.directory})")
    else:
        state, tx, lr_fn = init_state(config, model, mesh)
    if is_main:  # after the compatibility check: a refused resume leaves the workdir as it was
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))
    start = int(jax.device_get(state.step))
    step_fn = make_train_step(make_loss_fn(config, model, schedule), tx, mesh,
                              ema_decay=t.ema_decay, lr_schedule=lr_fn)
    sample_fn = make_sample_fn(model, schedule, mesh, sampler=s.sampler, num_steps=s.num_steps,
                               guidance_scale=s.guidance_scale, null_label=config.num_classes,
                               prediction_type=config.diffusion.prediction_type, eta=s.eta,
                               clip_x0=s.clip_x0 or None)
    grid_labels = np.repeat(np.arange(config.num_classes), s.per_class)
    sample_key = jax.random.PRNGKey(config.seed + 1)  # same noise every time: grids comparable
    last_grid = [None]

    def write_grid(step, st):
        imgs = sample_images(sample_fn, st.ema_params, grid_labels, sample_key, mesh)
        if is_main:
            path = os.path.join(workdir, "samples", f"step_{step:06d}.png")
            save_grid(imgs, path, ncols=s.per_class)
            save_grid(imgs, os.path.join(workdir, "samples", "latest.png"), ncols=s.per_class)
            last_grid[0] = path

    def on_step(step, st):
        if step % s.every == 0:
            write_grid(step, st)

    logger = _Logger(workdir, t.log_every, t.batch_size, start, t.num_steps, is_main)
    it = BatchIterator.from_state({"image": images, "label": labels}, t.batch_size, config.seed,
                                  data_state)
    t0 = time.perf_counter()
    with StopOnSignal() as stop, Prefetcher(it, config.data.prefetch) as batches:
        try:
            state = train_loop(state, step_fn, batches, mesh, t.num_steps, checkpointer=ckpt,
                               on_metrics=logger, on_step=on_step, stop=stop,
                               sync_every=t.log_every)
        finally:
            logger.close()
            ckpt.close()
    end = int(jax.device_get(state.step))
    if stop.requested is None and end % s.every:
        write_grid(end, state)
    summary = {"start_step": start, "end_step": end, "wall_s": time.perf_counter() - t0,
               "stopped_by_signal": stop.requested is not None, "grid": last_grid[0],
               "checkpoint_step": ckpt.latest_step()}
    if is_main:
        print(json.dumps(summary))
    return summary


FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Training config (get_config()).",
                                lock_config=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    if FLAGS.distributed:
        jax.distributed.initialize()
    return train(FLAGS.config, FLAGS.workdir)


def _cli(argv):
    """``app.run`` passes main's return value to ``sys.exit``: the summary dict would be printed
    to stderr and exit with status 1, so the command line gets a clean exit 0."""
    main(argv)


if __name__ == "__main__":
    app.run(_cli)
