"""The latent model's training data (``experiments/configs/latent_mnist.py``): stage 1, the MNIST
autoencoder (trained into ``WORKDIR/vae`` by :func:`experiments.vae_lib.train` unless
``config.vae_workdir`` names a finished run), the training set encoded once by it, and the
prompts' side: the CLIP BPE tokenizer learnt on the training prompts (``WORKDIR/tokenizer``, a
folder that transformers' ``CLIPTokenizer`` loads), the text encoder's config, and the token ids
of the prompt grammar (``experiments.mnist_prompts``) that the jitted loss draws from.

The training images, padded to ``data.pad_to`` (32: latents 8x8x4, an image side that diffusers'
pipeline accepts), are encoded by the frozen autoencoder: the posterior's mean and standard
deviation are kept (``WORKDIR/latents.npz``; every training step draws a new ``z ~ q(z | x)``), and
``scaling_factor = 1 / std(z)`` with ``Var(z) = Var(mean) + E[std^2]`` over the whole training set
(``WORKDIR/latent_stats.json``). Each training image's attributes (stroke thickness, size,
slant: :mod:`jaxdiff.metrics.digit_attributes`) are measured at the same time and binned by
per-class tertiles into the bins that decide which adjectives its captions may use
(:mod:`experiments.mnist_prompts`); the bins are kept beside the latents, the thresholds in
``latent_stats.json``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict, Optional

import jax
import ml_collections
import numpy as np

from experiments import mnist_prompts, train_lib, vae_lib
from experiments.cli import ConfigError
from jaxdiff.compile_options import cpu_compiler_options
from jaxdiff.metrics import bin_values, binning_values, fit_thresholds, measure_attributes
from jaxdiff.models.autoencoder import AutoencoderKL
from jaxdiff.models.clip_text_config import CLIPTextConfig
from jaxdiff.pipelines import crop_images as pipeline_crop
from jaxdiff.sharding import make_mesh
from jaxdiff.text import CLIPTokenizer
from jaxdiff.text.bpe import save_clip_tokenizer, train_clip_bpe
from jaxdiff.text.truncation import warn_truncated
from jaxdiff.training import Checkpointer

__all__ = ["LATENTS_FILE", "STATS_FILE", "vae_config", "vae_run_config", "vae_stage",
           "load_vae", "pad_images", "crop_images", "encode_dataset", "latent_statistics",
           "attribute_bins", "thresholds_json", "thresholds_from_json", "encoded_latents",
           "TOKENIZER_DIR", "build_tokenizer", "text_config",
           "prompt_ids_table"]

LATENTS_FILE, STATS_FILE, TOKENIZER_DIR = "latents.npz", "latent_stats.json", "tokenizer"


def vae_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The autoencoder's run config: ``config.vae`` with the latent run's ``data`` source."""
    vae = ml_collections.ConfigDict(config.vae.to_dict())
    vae.data = ml_collections.ConfigDict(
        {k: config.data[k] for k in ("source", "data_dir", "prefetch")})
    return vae


def vae_stage(config: ml_collections.ConfigDict, workdir: str) -> str:
    """The autoencoder's run directory, trained first if needed: ``config.vae_workdir`` when set
    (it must hold a checkpoint; it is never trained here), else ``WORKDIR/vae``, trained (or
    resumed) with ``config.vae`` until ``vae.training.num_steps``.

    Raises:
      ConfigError: ``vae_workdir`` has no checkpoint; and as :func:`experiments.vae_lib.train`.
    """
    if config.vae_workdir:
        vae_run_config(config.vae_workdir)
        return os.path.abspath(config.vae_workdir)
    path = os.path.join(workdir, "vae")
    vae_cfg = vae_config(config)
    done = latest_step(path)
    if done is not None and done >= vae_cfg.training.num_steps:
        print(f"vae: finished run in {path} (step {done})", flush=True)
        return path
    print(f"vae: training the autoencoder in {path}", flush=True)
    vae_lib.train(vae_cfg, path)
    return path


def vae_run_config(vae_workdir: str) -> ml_collections.ConfigDict:
    """The ``config.json`` of a finished autoencoder run at ``vae_workdir``.

    Raises:
      ConfigError: naming ``vae_workdir`` when it holds no config or no checkpoint.
    """
    path = os.path.abspath(vae_workdir)
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg) or latest_step(path) is None:
        raise ConfigError(f"vae_workdir {vae_workdir!r} holds no trained autoencoder "
                          "(config.json and checkpoints/); train one with python -m "
                          "experiments.train_vae_mnist, or leave vae_workdir empty")
    with open(cfg) as f:
        return ml_collections.ConfigDict(json.load(f))


def latest_step(run_dir: str) -> Optional[int]:
    """The latest complete checkpoint step of the run in ``run_dir``, or None."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return None
    ckpt = Checkpointer(ckpt_dir, None, read_only=True)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def load_vae(vae_dir: str):
    """``(AutoencoderKL, params, step)``: the EMA params of the latest checkpoint of a
    ``train_vae_mnist`` run (its ``config.json`` decides the model)."""
    with open(os.path.join(vae_dir, "config.json")) as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    model = vae_lib.build_model(cfg)
    mesh = make_mesh()
    target, _, _ = vae_lib.init_state(cfg, model, mesh, abstract=True)
    ckpt = Checkpointer(os.path.join(vae_dir, "checkpoints"), None, read_only=True)
    try:
        restored = ckpt.restore_latest(target)
    finally:
        ckpt.close()
    if restored is None:
        raise ConfigError(f"vae: no checkpoint in {vae_dir}")
    return model, jax.device_get(restored[0].ema_params["params"]), int(restored[2])



def pad_images(images: np.ndarray, size: int) -> np.ndarray:
    """``[N, 28, 28, C]`` in ``[-1, 1]`` -> ``[N, size, size, C]``, centred, padded with -1 (the
    background)."""
    h = images.shape[1]
    lo = (size - h) // 2
    hi = size - h - lo
    return np.pad(images, ((0, 0), (lo, hi), (lo, hi), (0, 0)), constant_values=-1.0)


def centre_crop(side: int, size: int = 28) -> tuple:
    """``(top, left, size, size)``: the centred ``size x size`` box of a ``side x side`` image
    (the box :func:`pad_images` padded around; a ``jaxdiff.pipelines.crop_images`` crop)."""
    lo = (side - size) // 2
    return (lo, lo, size, size)


def crop_images(images: np.ndarray, size: int = 28) -> np.ndarray:
    """The centred ``size x size`` crop of ``[N, H, W, C]`` images (undoes :func:`pad_images`)."""
    return pipeline_crop(images, centre_crop(images.shape[1], size))


def encode_dataset(vae: AutoencoderKL, params, images: np.ndarray, batch_size: int = 500):
    """The posterior of every image: ``(mean, std)``, numpy float32 ``[N, h, w, C]`` each (the
    unscaled latents of :meth:`AutoencoderKL.encode`). One compilation (the last chunk padded)."""
    fn = jax.jit(lambda p, x: (lambda q: (q.mean, q.std))(
        vae.apply({"params": p}, x, method="encode")), compiler_options=cpu_compiler_options())
    means, stds = [], []
    batch_size = min(batch_size, len(images))
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - n, 0)])
        m, s = jax.device_get(fn(params, chunk))
        means.append(np.asarray(m[:n], np.float32))
        stds.append(np.asarray(s[:n], np.float32))
    return np.concatenate(means), np.concatenate(stds)


def latent_statistics(mean: np.ndarray, std: np.ndarray) -> Dict[str, float]:
    """``{"latent_mean", "latent_std", "scaling_factor"}`` of ``z ~ q(z | x)`` over the dataset,
    exactly: ``Var(z) = Var(mean) + E[std^2]`` (all channels together, as Stable Diffusion's
    single ``scaling_factor``); ``scaling_factor = 1 / latent_std``."""
    mean64, std64 = mean.astype(np.float64), std.astype(np.float64)
    var = float(mean64.var() + (std64 ** 2).mean())
    return {"latent_mean": float(mean64.mean()), "latent_std": var ** 0.5,
            "posterior_mean_std": float(mean64.std()), "scaling_factor": var ** -0.5}



def attribute_bins(images: np.ndarray, labels: np.ndarray, thresholds=None,
                   slant: str = mnist_prompts.SLANT_BINNING):
    """``(values [N, 3] float64, bins [N, 3] int8, thresholds [10, 3, 2])``: each image's
    measured attributes (:func:`jaxdiff.metrics.binning_values`: thickness, size, the slant
    binned as ``slant``, by default the caption scheme's), binned by ``thresholds`` (default:
    the per-class tertiles of these images, :func:`jaxdiff.metrics.fit_thresholds`).
    ``images``: ``[N, 28, 28(, 1)]`` in ``[-1, 1]``."""
    values = binning_values(measure_attributes(images), slant)
    if thresholds is None:
        thresholds = fit_thresholds(values, labels)
    thresholds = np.asarray(thresholds, np.float64)
    return values, bin_values(values, labels, thresholds), thresholds


def thresholds_json(thresholds: np.ndarray) -> Dict[str, list]:
    """``{attribute: [[lo, hi] per digit]}`` (what ``latent_stats.json`` records)."""
    return {name: np.asarray(thresholds)[:, a].tolist()
            for a, name in enumerate(mnist_prompts.ATTRIBUTES)}


def thresholds_from_json(record: Dict[str, list]) -> np.ndarray:
    """The inverse of :func:`thresholds_json`: ``[10, 3, 2]`` float64."""
    return np.stack([np.asarray(record[name], np.float64)
                     for name in mnist_prompts.ATTRIBUTES], 1)


def encoded_latents(config, workdir: str, vae: AutoencoderKL, vae_params, vae_dir: str,
                    vae_step: int) -> Dict[str, np.ndarray]:
    """The training set, ready for the loss: ``{"mean", "std"}`` (``[N, h, w, C]`` float32: the
    posterior of every padded training image, :func:`encode_dataset`), ``"label"`` (``[N]``
    int32), ``"bins"`` (``[N, 3]`` int8: the image's attribute bins, :func:`attribute_bins`, 28x28
    images) and ``"thresholds"`` (``[10, 3, 2]``: the per-class tertiles that made them).

    Cached in ``WORKDIR/latents.npz``, recomputed when the autoencoder (``vae_dir`` at
    ``vae_step``) or the padding changed. A cache written before the attributes were measured,
    or with another slant binning (:data:`experiments.mnist_prompts.SLANT_BINNING`), keeps its
    latents and gains new bins (measured on the training images: about a second).
    """
    path = os.path.join(workdir, LATENTS_FILE)
    ident = f"{os.path.abspath(vae_dir)}@{vae_step}/pad{config.data.pad_to}"
    keys = ("mean", "std", "label", "bins", "thresholds")
    cached = None
    if os.path.isfile(path):
        with np.load(path) as f:
            if str(f["ident"]) == ident:
                cached = {k: f[k] for k in f.files if k != "ident"}
    binning = mnist_prompts.SLANT_BINNING
    if cached is not None and all(k in cached for k in keys) and \
            str(cached.get("slant_binning", "magnitude")) == binning:
        return {k: cached[k] for k in keys}
    images, labels = train_lib.load_split(config, "train")
    labels = labels.astype(np.int32)
    _, bins, thresholds = attribute_bins(images, labels)
    if cached is not None and len(cached["label"]) == len(labels):
        mean, std = cached["mean"], cached["std"]
        print(f"measured the attributes of {len(images)} training images (latents kept)",
              flush=True)
    else:
        t0 = time.perf_counter()
        mean, std = encode_dataset(vae, vae_params, pad_images(images, config.data.pad_to))
        print(f"encoded {len(images)} training images to latents {mean.shape[1:]} in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    out = {"mean": mean, "std": std, "label": labels, "bins": bins, "thresholds": thresholds}
    tmp = path + ".tmp.npz"
    np.savez(tmp, ident=np.asarray(ident), slant_binning=np.asarray(binning), **out)
    os.replace(tmp, path)
    return out


def build_tokenizer(folder: str, max_length: int) -> CLIPTokenizer:
    """Learns the CLIP BPE on every training prompt (:func:`jaxdiff.text.bpe.train_clip_bpe`:
    every training word becomes one token), writes it to ``folder`` and loads it back."""
    corpus = [p for d in range(10) for p in mnist_prompts.all_prompts("train", d)]
    vocab, merges = train_clip_bpe(corpus)
    save_clip_tokenizer(folder, vocab, merges, max_length=max_length)
    return CLIPTokenizer.from_pretrained(folder)


def text_config(config: ml_collections.ConfigDict, tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """The text encoder's config: ``config.text`` with the tokenizer's vocabulary size and EOS
    id (pooled at the first EOS), positions = ``text.max_length``."""
    x = config.text
    try:
        return CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=x.hidden_size,
                              intermediate_size=x.intermediate_size,
                              num_hidden_layers=x.num_hidden_layers,
                              num_attention_heads=x.num_attention_heads,
                              max_position_embeddings=x.max_length, hidden_act=x.hidden_act,
                              eos_token_id=tokenizer.eos_token_id)
    except ValueError as e:
        raise ConfigError(f"text: {e}") from None


def prompt_ids_table(tokenizer: CLIPTokenizer, split: str = "train"):
    """``(table [10, T, 2, len(COMBOS), L] int32, empty [L] int32)``: the token ids of
    :func:`experiments.mnist_prompts.prompt_table` and of the empty prompt; a ``logging``
    warning names each prompt that the tokenizer's ``max_length`` cuts
    (:func:`jaxdiff.text.warn_truncated`)."""
    table = mnist_prompts.prompt_table(split)
    flat = [p for d in table for t in d for f in t for p in f]
    ids = tokenizer(flat).input_ids
    warn_truncated(tokenizer, flat, name=f"{split} prompt")
    shape = (10, len(table[0]), len(table[0][0]), len(table[0][0][0]), ids.shape[-1])
    return ids.reshape(shape).astype(np.int32), tokenizer([""]).input_ids[0].astype(np.int32)
