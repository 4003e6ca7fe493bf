"""Training an MNIST KL autoencoder from a config (``experiments/configs/vae_mnist.py``):
:func:`train` validates everything, then loads the data and runs the one training loop
(:func:`jaxdiff.training.fit`: mesh, optax, EMA, Orbax checkpoints with exact resume, metrics)
with its own part, the autoencoder's parameters, loss and evaluation, writing ``config.json``,
``checkpoints/``, ``metrics.jsonl``, ``eval.jsonl`` and ``recon/step_XXXXXX.png`` into the
workdir. :func:`evaluate` measures reconstructions on the test split.
``experiments.train_vae_mnist`` is the command line.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Optional

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from experiments import train_lib
from experiments.cli import ConfigError, config_check
from experiments.images import save_grid
from jaxdiff.compile_options import cpu_compiler_options
from jaxdiff.data import BatchIterator
from jaxdiff.losses import RECON_TYPES, reconstruction_metrics, vae_loss
from jaxdiff.metrics import classifier_accuracy, load_classifier
from jaxdiff.models import AutoencoderKL, AutoencoderKLConfig, init_autoencoder
from jaxdiff.models.autoencoder import autoencoder_param_shapes
from jaxdiff.training import Periodic
from jaxdiff.validation import check_choice, check_float, check_int

__all__ = ["validate_config", "build_model", "init_params", "init_state", "make_loss_fn",
           "make_eval_fn", "evaluate", "train", "EVAL_FILE"]

IMAGE_SHAPE = (28, 28)
EVAL_FILE = "eval.jsonl"


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
    c, e = config, config.eval
    train_lib.validate_seed_and_data(config)
    model = build_model(config)
    if model.config.in_channels != 1 or model.config.out_channels != 1:
        raise ConfigError("model.in_channels and model.out_channels must be 1 (MNIST is grey)")
    if 28 % model.config.downscale:
        raise ConfigError(f"model.block_channels: {len(model.config.block_channels)} levels "
                          f"downscale by {model.config.downscale}, which does not divide 28")
    config_check("", check_float, "loss.beta", c.loss.beta, minimum=0.0)
    config_check("", check_choice, "loss.recon_type", c.loss.recon_type, RECON_TYPES)
    train_lib.validate_training(config)
    for name in ("every", "batch_size", "grid"):
        config_check("", check_int, f"eval.{name}", e[name], 1)
    config_check("", check_int, "eval.num_examples", e.num_examples, 0)
    return model


def _compat(config: ml_collections.ConfigDict) -> Dict[str, Any]:
    return json.loads(json.dumps({"model": config.model.to_dict(), "loss": config.loss.to_dict(),
                                  "batch_size": config.training.batch_size,
                                  "seed": config.seed}))


def init_params(config: ml_collections.ConfigDict, model: AutoencoderKL, abstract: bool = False):
    """``{"params": ...}`` drawn by :func:`jaxdiff.models.init_autoencoder` from
    ``run_keys(seed)["init"]``, or with ``abstract=True`` their shapes."""
    if abstract:
        return {"params": autoencoder_param_shapes(model.config)}
    return {"params": init_autoencoder(model.config, train_lib.run_keys(config.seed)["init"])}


def init_state(config: ml_collections.ConfigDict, model: AutoencoderKL, mesh, *,
               abstract: bool = False):
    """``(state, tx, lr_fn)``: the replicated TrainState of :func:`init_params`
    (:func:`experiments.train_lib.initial_state`); ``abstract=True``: shapes only (a restore
    target)."""
    return train_lib.initial_state(config, init_params(config, model, abstract), mesh,
                                   abstract=abstract)


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


def train(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """Trains (or resumes) the run in ``workdir`` on :func:`jaxdiff.training.fit`; returns its
    summary (``start_step``, ``end_step``, ``wall_s``, ``stopped_by_signal``,
    ``checkpoint_step``, ``loss``, ``eval``: the last evaluation's row of ``eval.jsonl``, with its
    ``step``).

    Every ``eval.every`` steps and at the end, the EMA params are evaluated (:func:`evaluate`):
    a row of ``eval.jsonl``, a grid ``recon/step_XXXXXX.png`` of originals over
    reconstructions, a printed line. ``training.fsdp > 1`` splits the train state over an
    ``fsdp`` mesh axis (a resume reads each leaf straight into its shards); the evaluations get
    the EMA params whole.

    Raises:
      ConfigError: an invalid config field, data directory or workdir (nothing written).
      jaxdiff.training.IncompatibleCheckpointError: ``workdir`` holds a run of another config.
    """
    model = validate_config(config)
    train_lib.check_paths(config, workdir)
    e = config.eval
    train_images, _ = train_lib.load_split(config, "train")
    test_images, test_labels = train_lib.load_split(config, "test")
    if e.num_examples:
        test_images = test_images[:e.num_examples]
    classifier = None
    if e.get("classifier_path"):
        clf_params = config_check("eval.classifier_path: ", _load_classifier, e.classifier_path)
        classifier = (clf_params, test_labels)
    mesh = train_lib.make_train_mesh(config)
    workdir = train_lib.make_workdir(workdir)
    eval_fn = make_eval_fn(model)

    def run_eval(step, state):
        result = evaluate(eval_fn, state.ema_params, test_images, e.batch_size, classifier)
        recon = result.pop("recon")
        if jax.process_index() == 0:
            k = min(e.grid, len(recon))
            grid = np.concatenate([test_images[:k], recon[:k]])
            save_grid(grid, os.path.join(workdir, "recon", f"step_{step:06d}.png"), ncols=k)
            acc = ("" if classifier is None else
                   f", classifier accuracy {result['classifier_accuracy_recon']:.4f} on "
                   f"reconstructions ({result['classifier_accuracy_real']:.4f} on the images)")
            tqdm.write(f"eval step {step}: mse {result['mse']:.5f} psnr {result['psnr']:.2f} "
                       f"dB{acc}")   # above the progress bar
        return result

    return train_lib.run_task(
        config, workdir, mesh, init_params=lambda abstract: init_params(config, model, abstract),
        loss_fn=make_loss_fn(config, model), compat=_compat(config),
        hyperparams=train_lib.resume_hyperparams(config),
        data=BatchIterator.source({"image": train_images}, config.training.batch_size,
                                  config.seed),
        periodic=[Periodic("eval", e.every, run_eval, jsonl=EVAL_FILE)])


def _load_classifier(path: str):
    try:
        return load_classifier(path)
    except OSError as err:
        raise ValueError(str(err)) from None
