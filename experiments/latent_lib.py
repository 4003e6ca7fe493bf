"""Text-to-MNIST latent diffusion (``experiments/configs/latent_mnist.py``): the Stable Diffusion
recipe on MNIST, trained from nothing.

Stage 1 is the KL autoencoder of ``experiments.vae_lib`` (trained into ``WORKDIR/vae`` unless
``config.vae_workdir`` names a finished run). Stage 2, :func:`train`:

- the training images, padded to ``data.pad_to`` (32: latents 8x8x4, an image side that
  diffusers' pipeline accepts), are encoded once by the frozen autoencoder: the posterior's mean
  and standard deviation are kept (``WORKDIR/latents.npz``) and every step draws a new
  ``z ~ q(z | x)`` from the step's key (the latent-diffusion recipe; a cheap augmentation);
- the latents are scaled by ``scaling_factor = 1 / std(z)``, with ``Var(z) = Var(mean) +
  E[std^2]`` computed exactly over the whole training set (``WORKDIR/latent_stats.json``); it is
  the autoencoder config's ``scaling_factor``, so :func:`jaxdiff.models.vae_encode_latents` /
  ``vae_decode_latents`` and the pipeline apply it;
- a CLIP BPE tokenizer is learnt on the training prompts (``WORKDIR/tokenizer``, a folder that
  transformers' ``CLIPTokenizer`` loads);
- a small CLIP text encoder and a UNet with cross-attention over its last hidden states are
  trained jointly from scratch. Why jointly: no pretrained text encoder can be downloaded here, the
  prompts are a closed, tiny language, and the one thing the encoder must carry, which digit a
  prompt names, is exactly what the denoising loss rewards; the latent diffusion paper (Rombach
  et al. 2022) trains its text transformer jointly with the UNet in the same way. Contrastive
  pre-training would need an image tower and a second training run for no benefit here;
- every step draws one training-template prompt per example from the step's key
  (``experiments.mnist_prompts.prompt_indices`` inside the jitted loss: a resumed run draws the
  same prompts), and replaces ``training.cond_drop_prob`` of them by ``""``.

Sampling goes through ``jaxdiff.pipelines.generate`` on an in-memory
:class:`~jaxdiff.pipelines.StableDiffusion` (:func:`make_pipeline`): the same program that runs an
exported diffusers folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Dict, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import lib, mnist_prompts, vae_lib
from experiments.cli import ConfigError
from jaxdiff.compile_options import cpu_compiler_options
from jaxdiff.convert.diffusers_scheduler import (schedule_from_diffusers_config,
                                                 sampler_from_diffusers_config)
from jaxdiff.data import BatchIterator, Prefetcher, load_mnist
from jaxdiff.losses import diffusion_loss
from jaxdiff.models import CLIPTextModel, UNet, UNetConfig, init_unet, unet_param_shapes
from jaxdiff.models.autoencoder import AutoencoderKL
from jaxdiff.models.clip_text import clip_text_param_shapes, init_clip_text
from jaxdiff.models.clip_text_config import CLIPTextConfig
from jaxdiff.pipelines import StableDiffusion, choose_sampler, generate
from jaxdiff.samplers import sampler_names
from jaxdiff.text import CLIPTokenizer
from jaxdiff.text.bpe import save_clip_tokenizer, train_clip_bpe
from jaxdiff.training import (Checkpointer, OptimizerConfig, StopOnSignal, create_train_state,
                              make_optimizer, make_train_step, train_loop)
from jaxdiff.sharding import make_mesh, replicate, replicated_sharding
from jaxdiff.validation import check_choice, check_float, check_int

__all__ = ["validate_config", "scheduler_config", "vae_stage", "load_vae", "pad_images",
           "encode_dataset", "latent_statistics", "build_tokenizer", "text_config",
           "prompt_ids_table", "make_loss_fn", "init_state", "make_pipeline", "sample",
           "save_prompt_grid", "train", "export", "load_latent_run", "LatentRun"]

LATENTS_FILE, STATS_FILE, TOKENIZER_DIR = "latents.npz", "latent_stats.json", "tokenizer"
DIFFUSERS_DIR = "diffusers"


def _wrap(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_unet(config: ml_collections.ConfigDict) -> UNet:
    """``UNet(UNetConfig(**config.model))`` (lists -> tuples, ``"None"`` -> None).

    Raises:
      ConfigError: a rejected field, named ``model: ...``.
    """
    return lib.build_model(config)


def validate_config(config: ml_collections.ConfigDict) -> UNet:
    """Checks every field of the latent stage (and ``config.vae`` through
    :func:`experiments.vae_lib.validate_config` when the VAE is trained here); nothing is read,
    written or compiled. Returns the UNet.

    Raises:
      ConfigError: naming the first invalid field.
    """
    c, t, s, x = config, config.training, config.sampling, config.text
    _wrap(check_int, "seed", c.seed, 0)
    _wrap(check_choice, "data.source", c.data.source, lib.DATA_SOURCES)
    _wrap(check_int, "data.prefetch", c.data.prefetch, 1)
    pad = _wrap(check_int, "data.pad_to", c.data.pad_to, 28)
    if pad % 8:
        raise ConfigError(f"data.pad_to must be a multiple of 8 (diffusers' pipelines need "
                          f"image sides that are), got {pad}")
    if c.vae_workdir:
        latent_channels = _vae_run_config(c.vae_workdir).model.latent_channels
    else:
        latent_channels = vae_lib.validate_config(_vae_config(config)).config.latent_channels
    unet = build_unet(config)
    u = unet.config
    if u.in_channels != latent_channels or u.out_channels != latent_channels:
        raise ConfigError(f"model.in_channels and model.out_channels ({u.in_channels}, "
                          f"{u.out_channels}) must equal the autoencoder's latent_channels "
                          f"({latent_channels})")
    if u.num_classes is not None:
        raise ConfigError("model.num_classes must be None: the text encoder conditions the UNet")
    if u.context_dim != x.hidden_size:
        raise ConfigError(f"model.context_dim ({u.context_dim}) must equal text.hidden_size "
                          f"({x.hidden_size}): the UNet attends to the text encoder's states")
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        _wrap(check_int, f"text.{name}", x[name], 1)
    _wrap(check_int, "text.max_length", x.max_length, 8)
    _wrap(check_choice, "text.hidden_act", x.hidden_act, ("quick_gelu", "gelu"))
    if x.hidden_size % x.num_attention_heads:
        raise ConfigError(f"text.num_attention_heads ({x.num_attention_heads}) must divide "
                          f"text.hidden_size ({x.hidden_size})")
    try:
        scheduler_config(config)
        schedule_from_diffusers_config(scheduler_config(config))
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"diffusion: {e}") from None
    for name in ("batch_size", "num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        _wrap(check_int, f"training.{name}", t[name], 1)
    _wrap(check_int, "training.warmup_steps", t.warmup_steps, 0)
    _wrap(check_float, "training.learning_rate", t.learning_rate, minimum=0.0,
          exclusive_minimum=True)
    _wrap(check_choice, "training.lr_schedule", t.lr_schedule, ("cosine", "constant"))
    for name in ("end_lr_factor", "weight_decay", "grad_clip_norm"):
        _wrap(check_float, f"training.{name}", t[name], minimum=0.0)
    for name in ("ema_decay", "cond_drop_prob"):
        _wrap(check_float, f"training.{name}", t[name], minimum=0.0, maximum=1.0,
              exclusive_maximum=True)
    from jaxdiff.sharding import check_batch_divisible
    _wrap(check_batch_divisible, t.batch_size, make_mesh())
    from experiments.train_lib import make_train_mesh
    make_train_mesh(config)  # training.fsdp divides the device count
    _wrap(check_int, "sampling.every", s.every, 0)
    _wrap(check_int, "sampling.per_prompt", s.per_prompt, 1)
    _wrap(check_choice, "sampling.split", s.split, mnist_prompts.SPLITS)
    _wrap(check_choice, "sampling.sampler", s.sampler, sampler_names())
    _wrap(check_int, "sampling.num_steps", s.num_steps, 1)
    _wrap(check_float, "sampling.guidance_scale", s.guidance_scale, minimum=0.0)
    sampler = _sampler(config)
    _wrap(sampler.check, schedule_from_diffusers_config(scheduler_config(config)),
          int(s.num_steps))
    return unet


def scheduler_config(config: ml_collections.ConfigDict) -> Dict[str, Any]:
    """The run's diffusers ``DDIMScheduler`` config: ``config.diffusion`` (the training schedule
    and ``prediction_type``) with Stable Diffusion's DDIM settings (no sample clipping: latents
    are not bounded; ``set_alpha_to_one=False``, ``steps_offset=1``, ``"leading"`` spacing)."""
    return {"_class_name": "DDIMScheduler", **config.diffusion.to_dict(), "clip_sample": False,
            "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}


def _sampler(config: ml_collections.ConfigDict):
    """``sampling.sampler``: ``"ddim"`` is the scheduler config's DDIM (what an exported folder
    samples with); another name is that registered sampler with its default options."""
    sched = scheduler_config(config)
    if config.sampling.sampler == "ddim":
        return sampler_from_diffusers_config(sched)
    return _wrap(choose_sampler, config.sampling.sampler, None, sched)


def _vae_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
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
        _vae_run_config(config.vae_workdir)
        return os.path.abspath(config.vae_workdir)
    path = os.path.join(workdir, "vae")
    vae_cfg = _vae_config(config)
    done = _latest(path)
    if done is not None and done >= vae_cfg.training.num_steps:
        print(f"vae: finished run in {path} (step {done})", flush=True)
        return path
    print(f"vae: training the autoencoder in {path}", flush=True)
    vae_lib.train(vae_cfg, path)
    return path


def _vae_run_config(vae_workdir: str) -> ml_collections.ConfigDict:
    """The ``config.json`` of a finished autoencoder run at ``vae_workdir``.

    Raises:
      ConfigError: naming ``vae_workdir`` when it holds no config or no checkpoint.
    """
    path = os.path.abspath(vae_workdir)
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg) or _latest(path) is None:
        raise ConfigError(f"vae_workdir {vae_workdir!r} holds no trained autoencoder "
                          "(config.json and checkpoints/); train one with python -m "
                          "experiments.train_vae_mnist, or leave vae_workdir empty")
    with open(cfg) as f:
        return ml_collections.ConfigDict(json.load(f))


def _latest(run_dir: str) -> Optional[int]:
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


def crop_images(images: np.ndarray, size: int = 28) -> np.ndarray:
    """The centred ``size x size`` crop of ``[N, H, W, C]`` images (undoes :func:`pad_images`)."""
    lo = (images.shape[1] - size) // 2
    return images[:, lo:lo + size, lo:lo + size]


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
    """``(table [10, T, 2, A, L] int32, empty [L] int32)``: the token ids of
    :func:`experiments.mnist_prompts.prompt_table` and of the empty prompt."""
    table = mnist_prompts.prompt_table(split)
    flat = [p for d in table for t in d for f in t for p in f]
    ids = tokenizer(flat).input_ids
    shape = (10, len(table[0]), len(table[0][0]), len(table[0][0][0]), ids.shape[-1])
    return ids.reshape(shape).astype(np.int32), tokenizer([""]).input_ids[0].astype(np.int32)


def make_loss_fn(config: ml_collections.ConfigDict, unet: UNet, text_cfg: CLIPTextConfig,
                 vae_cfg, schedule, table: np.ndarray, empty: np.ndarray):
    """``(params, batch, key) -> (loss, aux)`` with ``params = {"unet", "text_encoder"}`` (the
    modules' ``"params"``) and ``batch = {"mean", "std": [B, h, w, C], "label": [B] int32}``.

    The step's key draws ``z = mean + std * eps``, each example's training prompt
    (:func:`experiments.mnist_prompts.prompt_indices` into ``table``), the prompt dropout to
    ``empty`` (probability ``training.cond_drop_prob``), then ``t`` and the noise of
    :func:`jaxdiff.losses.diffusion_loss` on ``scale_latents(vae_cfg, z)``."""
    from jaxdiff.models.autoencoder_latents import scale_latents

    text_model = CLIPTextModel(text_cfg)
    table, empty = jnp.asarray(table), jnp.asarray(empty)
    p_drop = float(config.training.cond_drop_prob)
    pred = config.diffusion.prediction_type

    def loss_fn(params, batch, key):
        k_z, k_prompt, k_drop, k_loss = jax.random.split(key, 4)
        z = batch["mean"] + batch["std"] * jax.random.normal(k_z, batch["mean"].shape)
        x0 = scale_latents(vae_cfg, z)
        n = x0.shape[0]
        ti, fi, ai = mnist_prompts.prompt_indices(k_prompt, n, "train")
        ids = table[batch["label"], ti, fi, ai]
        drop = jax.random.bernoulli(k_drop, p_drop, (n,))
        ids = jnp.where(drop[:, None], empty[None], ids)

        def apply_fn(p, x, t, c):
            ctx = text_model.apply({"params": p["text_encoder"]}, c).last_hidden_state
            return unet.apply({"params": p["unet"]}, x, t, context=ctx)

        return diffusion_loss(apply_fn, params, schedule, x0, k_loss, ids,
                              prediction_type=pred)

    return loss_fn


def _optimizer(config):
    t = config.training
    return make_optimizer(OptimizerConfig(
        learning_rate=t.learning_rate, warmup_steps=t.warmup_steps, total_steps=t.num_steps,
        schedule=t.lr_schedule, end_lr_factor=t.end_lr_factor, weight_decay=t.weight_decay,
        grad_clip_norm=t.grad_clip_norm))


def init_state(config, unet_cfg: UNetConfig, text_cfg: CLIPTextConfig, mesh, *,
               abstract: bool = False):
    """``(state, tx, lr_fn)``: the replicated TrainState with ``params = {"unet": ...,
    "text_encoder": ...}`` (both from ``lib.run_keys(seed)["init"]``, split in two);
    ``abstract=True``: shapes only (a restore target)."""
    tx, lr_fn = _optimizer(config)
    keys = lib.run_keys(config.seed)
    k_unet, k_text = jax.random.split(keys["init"])
    if abstract:
        shapes = {"unet": unet_param_shapes(unet_cfg), "text_encoder":
                  clip_text_param_shapes(text_cfg)}
        shapes = jax.eval_shape(lambda p: create_train_state(p, tx, keys["train"]), shapes)
        repl = replicated_sharding(mesh)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
                            shapes), tx, lr_fn
    params = {"unet": init_unet(unet_cfg, k_unet), "text_encoder": init_clip_text(text_cfg,
                                                                                  k_text)}
    return replicate(create_train_state(params, tx, keys["train"]), mesh), tx, lr_fn


def make_pipeline(config, unet_cfg: UNetConfig, text_cfg: CLIPTextConfig, vae_cfg,
                  tokenizer: CLIPTokenizer, params: dict, vae_params) -> StableDiffusion:
    """An in-memory :class:`~jaxdiff.pipelines.StableDiffusion` of the run: ``params`` (``{"unet",
    "text_encoder"}``) with the frozen VAE's, the run's scheduler config, its sampler
    (``sampling.sampler``) and latent size ``data.pad_to / f``."""
    sched = scheduler_config(config)
    f = 2 ** (len(vae_cfg.block_channels) - 1)
    return StableDiffusion(
        params={"unet": params["unet"], "text_encoder": params["text_encoder"],
                "vae": vae_params},
        unet_config=unet_cfg, vae_config=vae_cfg, text_config=text_cfg, tokenizer=tokenizer,
        schedule=schedule_from_diffusers_config(sched), sampler=_sampler(config),
        scheduler_config=sched, sample_size=int(config.data.pad_to) // f)


def sample(sd: StableDiffusion, prompts: Sequence[str], key: jax.Array, *, num_steps: int,
           guidance_scale: float, batch_size: int = 250) -> np.ndarray:
    """Images for ``prompts`` through :func:`jaxdiff.pipelines.generate`, in chunks of
    ``batch_size`` (the last padded; chunk ``i`` uses ``fold_in(key, i)``): ``[N, H, W, 1]``
    float32 in ``[-1, 1]`` at the pipeline's size (``data.pad_to``)."""
    out = []
    prompts = list(prompts)
    for i, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start:start + batch_size]
        n = len(chunk)
        chunk = chunk + [chunk[0]] * (batch_size - n) if len(prompts) > batch_size else chunk
        res = generate(sd, chunk, num_steps=num_steps, guidance_scale=guidance_scale,
                       key=jax.random.fold_in(key, i))
        out.append(res.float_images[:n] * 2.0 - 1.0)
    return np.concatenate(out)


def save_prompt_grid(images: np.ndarray, prompts: Sequence[str], path: str, scale: int = 2) -> str:
    """A PNG of ``images`` (``[R * C, H, W, 1]`` in ``[-1, 1]``, row-major: row ``r`` holds
    ``C`` samples of ``prompts[r]``) with each row's prompt written on its left. Returns path."""
    from PIL import Image, ImageDraw

    r = len(prompts)
    if r == 0 or len(images) % r:
        raise ValueError(f"images ({len(images)}) must be a multiple of the prompts ({r})")
    c = len(images) // r
    h, w = images.shape[1:3]
    px = np.round((np.clip(images[..., 0], -1, 1) + 1) * 127.5).astype(np.uint8)
    label_w = 6 * max(len(p) for p in prompts) + 16
    canvas = Image.new("L", (label_w + c * w * scale, r * h * scale), 0)
    draw = ImageDraw.Draw(canvas)
    for i, prompt in enumerate(prompts):
        draw.text((4, i * h * scale + h * scale // 2 - 6), f'"{prompt}"', fill=255)
        for j in range(c):
            tile = Image.fromarray(px[i * c + j]).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (label_w + j * w * scale, i * h * scale))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    canvas.save(tmp)
    os.replace(tmp, path)
    with open(os.path.splitext(path)[0] + ".txt", "w") as f:
        f.write("\n".join(prompts) + "\n")
    return path


def _compat(config, vae_dir: str, vae_step: int, stats: dict) -> Dict[str, Any]:
    return json.loads(json.dumps({
        "model": config.model.to_dict(), "text": config.text.to_dict(),
        "diffusion": config.diffusion.to_dict(), "batch_size": config.training.batch_size,
        "seed": config.seed, "pad_to": config.data.pad_to, "vae_step": vae_step,
        "scaling_factor": round(stats["scaling_factor"], 6)}))


def _load_train(config):
    try:
        return load_mnist("train", config.data.data_dir or None, source=config.data.source)
    except (FileNotFoundError, ImportError) as e:
        raise ConfigError(f"data: {e}") from None


def _latents(config, workdir, vae, vae_params, vae_dir, vae_step):
    """The cached posterior of the training set (recomputed when the VAE or padding changed)."""
    path = os.path.join(workdir, LATENTS_FILE)
    ident = f"{os.path.abspath(vae_dir)}@{vae_step}/pad{config.data.pad_to}"
    if os.path.isfile(path):
        with np.load(path) as f:
            if str(f["ident"]) == ident:
                return f["mean"], f["std"], f["label"]
    images, labels = _load_train(config)
    t0 = time.perf_counter()
    mean, std = encode_dataset(vae, vae_params, pad_images(images, config.data.pad_to))
    print(f"encoded {len(images)} training images to latents {mean.shape[1:]} in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, mean=mean, std=std, label=labels.astype(np.int32), ident=np.asarray(ident))
    os.replace(tmp, path)
    return mean, std, labels.astype(np.int32)


class LatentRun(NamedTuple):
    """A loaded latent run (:func:`load_latent_run`)."""
    config: ml_collections.ConfigDict
    sd: StableDiffusion        # the pipeline, with the EMA params
    stats: Dict[str, Any]      # latent_stats.json, with the checkpoint's "step"


def _setup(config, workdir, vae_dir):
    """The pieces both :func:`train` and :func:`load_latent_run` need."""
    vae, vae_params, vae_step = load_vae(vae_dir)
    tokenizer = build_tokenizer(os.path.join(workdir, TOKENIZER_DIR), config.text.max_length)
    tcfg = text_config(config, tokenizer)
    return vae, vae_params, vae_step, tokenizer, tcfg


def train(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """Both stages: the autoencoder (:func:`vae_stage`), then the latent model, trained or
    resumed in ``workdir``. Returns ``{"start_step", "end_step", "wall_s", "stopped_by_signal",
    "checkpoint_step", "grid", "scaling_factor", "vae_dir"}``.

    Writes ``config.json``, ``tokenizer/``, ``latents.npz``, ``latent_stats.json``,
    ``checkpoints/``, ``metrics.jsonl`` and ``samples/step_XXXXXX.png`` (with ``.txt``: the
    rows' prompts) into ``workdir``; once ``training.num_steps`` is reached, ``diffusers/``:
    the EMA model as a diffusers Stable Diffusion folder (:func:`export`).

    ``training.fsdp > 1`` splits the train state over an ``fsdp`` mesh axis
    (``experiments.train_lib.make_train_mesh`` / ``restore_or_init``); the grids and the export
    gather the EMA params.

    Raises:
      ConfigError: an invalid config field or path (nothing written).
      jaxdiff.training.IncompatibleCheckpointError: ``workdir`` holds a run of another config.
    """
    from experiments.train_lib import (MetricsLogger, gather_replicated, make_train_mesh,
                                       restore_or_init)

    workdir = os.path.abspath(workdir)
    unet = validate_config(config)
    lib.check_paths(config, workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"workdir {workdir!r} is not writable: {e}") from None
    vae_dir = vae_stage(config, workdir)
    vae, vae_params, vae_step, tokenizer, tcfg = _setup(config, workdir, vae_dir)
    mean, std, labels = _latents(config, workdir, vae, vae_params, vae_dir, vae_step)
    stats = dict(latent_statistics(mean, std), vae_dir=vae_dir, vae_step=vae_step,
                 pad_to=int(config.data.pad_to), latent_shape=list(mean.shape[1:]))
    with open(os.path.join(workdir, STATS_FILE), "w") as f:
        json.dump(stats, f, indent=2)
    vae_cfg = dataclasses.replace(vae.config, scaling_factor=stats["scaling_factor"])
    t, s = config.training, config.sampling
    is_main = jax.process_index() == 0
    mesh = make_train_mesh(config)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                        _compat(config, vae_dir, vae_step, stats), max_to_keep=t.keep_checkpoints,
                        save_interval_steps=t.checkpoint_every,
                        hyperparams=lib.resume_hyperparams(config))
    state, tx, lr_fn, data_state, state_sharding = restore_or_init(
        ckpt, mesh, lambda abstract: init_state(config, unet.config, tcfg, mesh,
                                                abstract=abstract))
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))
    start = int(jax.device_get(state.step))
    schedule = schedule_from_diffusers_config(scheduler_config(config))
    table, empty = prompt_ids_table(tokenizer)
    step_fn = make_train_step(make_loss_fn(config, unet, tcfg, vae_cfg, schedule, table, empty),
                              tx, mesh, ema_decay=t.ema_decay, lr_schedule=lr_fn,
                              state_sharding=state_sharding)
    sd = make_pipeline(config, unet.config, tcfg, vae_cfg, tokenizer, state.ema_params,
                       vae_params)
    sample_key = lib.run_keys(config.seed)["sample"]
    grid_prompts = mnist_prompts.sample_prompts(np.arange(10), sample_key, s.split)
    last_grid: list = [None]

    def write_grid(step, st):
        ema = gather_replicated(st.ema_params, mesh)  # whole, when split over fsdp
        run = sd.replace(params=dict(sd.params, unet=ema["unet"],
                                     text_encoder=ema["text_encoder"]))
        prompts = [p for p in grid_prompts for _ in range(s.per_prompt)]
        imgs = sample(run, prompts, sample_key, num_steps=s.num_steps,
                      guidance_scale=s.guidance_scale, batch_size=len(prompts))
        if is_main:
            path = os.path.join(workdir, "samples", f"step_{step:06d}.png")
            save_prompt_grid(imgs, grid_prompts, path)
            save_prompt_grid(imgs, grid_prompts, os.path.join(workdir, "samples", "latest.png"))
            last_grid[0] = path

    def on_step(step, st):
        if s.every and step % s.every == 0:
            write_grid(step, st)

    logger = MetricsLogger(workdir, t.log_every, t.batch_size, start, t.num_steps, is_main)
    it = BatchIterator.from_state({"mean": mean, "std": std, "label": labels}, t.batch_size,
                                  config.seed, data_state)
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
    if stop.requested is None and s.every and end % s.every:
        write_grid(end, state)
    exported = None
    if stop.requested is None and end >= t.num_steps and config.export_diffusers:
        ema = jax.device_get(gather_replicated(state.ema_params, mesh))  # every process gathers
        if is_main:
            exported = export(sd.replace(params=dict(
                sd.params, unet=ema["unet"], text_encoder=ema["text_encoder"])),
                os.path.join(workdir, DIFFUSERS_DIR))
    summary = {"start_step": start, "end_step": end, "wall_s": time.perf_counter() - t0,
               "stopped_by_signal": stop.requested is not None, "grid": last_grid[0],
               "checkpoint_step": ckpt.latest_step(), "scaling_factor": stats["scaling_factor"],
               "vae_dir": vae_dir, "diffusers": exported}
    if is_main:
        print(json.dumps(summary), flush=True)
    return summary


def export(sd: StableDiffusion, path: str) -> str:
    """Writes the run (``sd``: :func:`make_pipeline` with the EMA params) as a diffusers Stable
    Diffusion folder (:func:`jaxdiff.pipelines.export_stable_diffusion`) that
    ``python -m experiments.text_to_image --model PATH`` and diffusers'
    ``StableDiffusionPipeline.from_pretrained`` load. Returns ``path``."""
    from jaxdiff.pipelines.export import export_stable_diffusion

    export_stable_diffusion(sd, path)
    print(f"wrote the diffusers folder {path}", flush=True)
    return path


def load_latent_run(workdir: str) -> LatentRun:
    """The latest checkpoint of a latent run as a :class:`LatentRun` (``sd``: the pipeline with
    the EMA params).

    Raises:
      ConfigError: ``workdir`` has no ``config.json`` / ``latent_stats.json`` / checkpoint.
    """
    workdir = os.path.abspath(workdir)
    for name in ("config.json", STATS_FILE):
        if not os.path.isfile(os.path.join(workdir, name)):
            raise ConfigError(f"--workdir: {os.path.join(workdir, name)} not found: is "
                              f"{workdir!r} a train_latent_mnist workdir?")
    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    with open(os.path.join(workdir, STATS_FILE)) as f:
        stats = json.load(f)
    unet = build_unet(config)
    vae, vae_params, _, tokenizer, tcfg = _setup(config, workdir, stats["vae_dir"])
    vae_cfg = dataclasses.replace(vae.config, scaling_factor=stats["scaling_factor"])
    mesh = make_mesh()
    target, _, _ = init_state(config, unet.config, tcfg, mesh, abstract=True)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), None, read_only=True)
    try:
        restored = ckpt.restore_latest(target)
    finally:
        ckpt.close()
    if restored is None:
        raise ConfigError(f"--workdir: no checkpoint in {os.path.join(workdir, 'checkpoints')}")
    sd = make_pipeline(config, unet.config, tcfg, vae_cfg, tokenizer, restored[0].ema_params,
                       vae_params)
    return LatentRun(config, sd, dict(stats, step=int(restored[2])))
