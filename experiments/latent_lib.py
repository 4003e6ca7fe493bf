"""Text-to-MNIST latent diffusion (``experiments/configs/latent_mnist.py``): the Stable Diffusion
recipe on MNIST, trained from nothing.

Stage 1 is the KL autoencoder of ``experiments.vae_lib`` (trained into ``WORKDIR/vae`` unless
``config.vae_workdir`` names a finished run: :mod:`experiments.latent_data`). Stage 2,
:func:`train`, on the one training loop (:func:`jaxdiff.training.fit`):

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
- each training image's stroke thickness, size and slant are measured once
  (:mod:`jaxdiff.metrics.digit_attributes`) and binned by per-class tertiles (kept in
  ``latents.npz``; the thresholds in ``latent_stats.json``);
- every step draws one training-template prompt per example from the step's key, with
  adjectives that are true of that image (``experiments.mnist_prompts.prompt_indices`` with the
  image's bins, inside the jitted loss: a resumed run draws the same prompts), and replaces
  ``training.cond_drop_prob`` of them by ``""``.

Sampling goes through ``jaxdiff.pipelines.generate`` on an in-memory
:class:`~jaxdiff.pipelines.StableDiffusion` (:mod:`experiments.latent_pipeline`): the same program
that runs an exported diffusers folder.
"""

from __future__ import annotations

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import latent_data, latent_pipeline, mnist_lib, mnist_prompts, train_lib, vae_lib
from experiments.cli import ConfigError, config_check
from experiments.latent_data import STATS_FILE, TOKENIZER_DIR
from experiments.latent_pipeline import DIFFUSERS_DIR
from jaxdiff.convert.diffusers_scheduler import schedule_from_diffusers_config
from jaxdiff.data import BatchIterator
from jaxdiff.losses import diffusion_loss
from jaxdiff.models import CLIPTextModel, UNet, UNetConfig, init_unet, unet_param_shapes
from jaxdiff.models.clip_text import clip_text_param_shapes, init_clip_text
from jaxdiff.models.clip_text_config import CLIPTextConfig
from jaxdiff.pipelines import StableDiffusion
from jaxdiff.samplers import sampler_names
from jaxdiff.sharding import make_mesh
from jaxdiff.text import CLIPTokenizer
from jaxdiff.training import Checkpointer, Periodic
from jaxdiff.validation import check_choice, check_float, check_int

__all__ = ["build_unet", "validate_config", "make_loss_fn", "init_params", "init_state", "train",
           "caption_ids", "check_caption_scheme", "load_latent_run", "LatentRun"]


def build_unet(config: ml_collections.ConfigDict) -> UNet:
    """``UNet(UNetConfig(**config.model))`` (lists -> tuples, ``"None"`` -> None).

    Raises:
      ConfigError: a rejected field, named ``model: ...``.
    """
    return mnist_lib.build_model(config)


def validate_config(config: ml_collections.ConfigDict) -> UNet:
    """Checks every field of the latent stage (and ``config.vae`` through
    :func:`experiments.vae_lib.validate_config` when the VAE is trained here); nothing is read,
    written or compiled. Returns the UNet.

    Raises:
      ConfigError: naming the first invalid field.
    """
    c, t, s, x = config, config.training, config.sampling, config.text
    train_lib.validate_seed_and_data(config)
    pad = config_check("", check_int, "data.pad_to", c.data.pad_to, 28)
    if pad % 8:
        raise ConfigError(f"data.pad_to must be a multiple of 8 (diffusers' pipelines need "
                          f"image sides that are), got {pad}")
    if c.vae_workdir:
        latent_channels = latent_data.vae_run_config(c.vae_workdir).model.latent_channels
    else:
        latent_channels = vae_lib.validate_config(
            latent_data.vae_config(config)).config.latent_channels
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
        config_check("", check_int, f"text.{name}", x[name], 1)
    config_check("", check_int, "text.max_length", x.max_length, 8)
    scale = c.get("latent_scaling", 0.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (
            np.isfinite(scale) and scale >= 0):
        raise ConfigError(f"latent_scaling must be 0 (1 / std, measured) or a positive finite "
                          f"number, got {scale!r}")
    longest = max(mnist_prompts.longest_prompts(), key=lambda p: len(p.split()))
    if len(longest.split()) + 2 > x.max_length:
        raise ConfigError(f"text.max_length ({x.max_length}) must hold the longest prompt with "
                          f"its start and end tokens ({len(longest.split()) + 2}: {longest!r})")
    config_check("", check_choice, "text.hidden_act", x.hidden_act, ("quick_gelu", "gelu"))
    if x.hidden_size % x.num_attention_heads:
        raise ConfigError(f"text.num_attention_heads ({x.num_attention_heads}) must divide "
                          f"text.hidden_size ({x.hidden_size})")
    try:
        schedule_from_diffusers_config(latent_pipeline.scheduler_config(config))
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"diffusion: {e}") from None
    train_lib.validate_training(config)
    config_check("", check_float, "training.cond_drop_prob", t.cond_drop_prob, minimum=0.0,
                 maximum=1.0, exclusive_maximum=True)
    config_check("", check_int, "sampling.every", s.every, 0)
    config_check("", check_int, "sampling.per_prompt", s.per_prompt, 1)
    config_check("", check_choice, "sampling.split", s.split, mnist_prompts.SPLITS)
    config_check("", check_choice, "sampling.sampler", s.sampler, sampler_names())
    config_check("", check_int, "sampling.num_steps", s.num_steps, 1)
    config_check("", check_float, "sampling.guidance_scale", s.guidance_scale, minimum=0.0)
    sampler = latent_pipeline.make_sampler(config)
    config_check("", sampler.check,
                 schedule_from_diffusers_config(latent_pipeline.scheduler_config(config)),
                 int(s.num_steps))
    return unet


def caption_ids(k_prompt: jax.Array, k_drop: jax.Array, table, empty, labels, bins,
                p_drop: float) -> jax.Array:
    """``[B, L]`` int32: one training caption per image, its adjectives true of the image
    (:func:`experiments.mnist_prompts.prompt_indices` from ``k_prompt`` with ``bins [B, 3]``,
    looked up in ``table [10, T, 2, len(COMBOS), L]`` at ``labels [B]``), each replaced by
    ``empty [L]`` with probability ``p_drop`` (from ``k_drop``). Jittable."""
    n = labels.shape[0]
    ti, fi, ci = mnist_prompts.prompt_indices(k_prompt, n, "train", bins)
    ids = jnp.asarray(table)[labels, ti, fi, ci]
    drop = jax.random.bernoulli(k_drop, p_drop, (n,))
    return jnp.where(drop[:, None], jnp.asarray(empty)[None], ids)


def make_loss_fn(config: ml_collections.ConfigDict, unet: UNet, text_cfg: CLIPTextConfig,
                 vae_cfg, schedule, table: np.ndarray, empty: np.ndarray):
    """``(params, batch, key) -> (loss, aux)`` with ``params = {"unet", "text_encoder"}`` (the
    modules' ``"params"``) and ``batch = {"mean", "std": [B, h, w, C], "label": [B] int32,
    "bins": [B, 3] int}`` (the image's attribute bins,
    :func:`experiments.latent_data.encoded_latents`).

    The step's key draws ``z = mean + std * eps``, each example's training prompt with
    adjectives true of its image (:func:`experiments.mnist_prompts.prompt_indices` with
    ``batch["bins"]``, into ``table [10, T, 2, len(COMBOS), L]``), the prompt dropout to
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
        ids = caption_ids(k_prompt, k_drop, table, empty, batch["label"], batch["bins"], p_drop)

        def apply_fn(p, x, t, c):
            ctx = text_model.apply({"params": p["text_encoder"]}, c).last_hidden_state
            return unet.apply({"params": p["unet"]}, x, t, context=ctx)

        return diffusion_loss(apply_fn, params, schedule, x0, k_loss, ids,
                              prediction_type=pred)

    return loss_fn


def with_latent_scaling(stats: Dict[str, Any], latent_scaling: float) -> Dict[str, Any]:
    """``stats`` (:func:`experiments.latent_data.latent_statistics`) with the run's scaling
    factor: unchanged for ``latent_scaling == 0`` (1 / std, measured); else ``scaling_factor =
    latent_scaling`` and the measured one kept as ``measured_scaling_factor``."""
    if not latent_scaling:
        return dict(stats)
    return dict(stats, measured_scaling_factor=stats["scaling_factor"],
                scaling_factor=float(latent_scaling))


def init_params(config: ml_collections.ConfigDict, unet_cfg: UNetConfig,
                text_cfg: CLIPTextConfig, abstract: bool = False):
    """``{"unet": ..., "text_encoder": ...}`` (the modules' ``"params"``), both drawn from
    ``run_keys(seed)["init"]`` split in two, or with ``abstract=True`` their shapes."""
    if abstract:
        return {"unet": unet_param_shapes(unet_cfg),
                "text_encoder": clip_text_param_shapes(text_cfg)}
    k_unet, k_text = jax.random.split(train_lib.run_keys(config.seed)["init"])
    return {"unet": init_unet(unet_cfg, k_unet), "text_encoder": init_clip_text(text_cfg, k_text)}


def init_state(config, unet_cfg: UNetConfig, text_cfg: CLIPTextConfig, mesh, *,
               abstract: bool = False):
    """``(state, tx, lr_fn)``: the replicated TrainState of :func:`init_params`
    (:func:`experiments.train_lib.initial_state`); ``abstract=True``: shapes only (a restore
    target)."""
    return train_lib.initial_state(config, init_params(config, unet_cfg, text_cfg, abstract),
                                   mesh, abstract=abstract)


def _compat(config, vae_dir: str, vae_step: int, stats: dict) -> Dict[str, Any]:
    return json.loads(json.dumps({
        "model": train_lib.model_compat(config.model), "text": config.text.to_dict(),
        "diffusion": config.diffusion.to_dict(), "batch_size": config.training.batch_size,
        "seed": config.seed, "pad_to": config.data.pad_to, "vae_step": vae_step,
        "scaling_factor": round(stats["scaling_factor"], 6),
        "captions": mnist_prompts.CAPTION_SCHEME}))


class LatentRun(NamedTuple):
    """A loaded latent run (:func:`load_latent_run`)."""
    config: ml_collections.ConfigDict
    sd: StableDiffusion        # the pipeline, with the EMA params
    stats: Dict[str, Any]      # latent_stats.json, with the checkpoint's "step"


def _setup(config, workdir, vae_dir, build: bool = True):
    """The pieces both :func:`train` and :func:`load_latent_run` need (``build=False``: the
    workdir's tokenizer as it is, so that a run of an older grammar still loads)."""
    vae, vae_params, vae_step = latent_data.load_vae(vae_dir)
    folder = os.path.join(workdir, TOKENIZER_DIR)
    if build or not os.path.isfile(os.path.join(folder, "vocab.json")):
        tokenizer = latent_data.build_tokenizer(folder, config.text.max_length)
    else:
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    tcfg = latent_data.text_config(config, tokenizer)
    return vae, vae_params, vae_step, tokenizer, tcfg


def check_caption_scheme(workdir: str) -> None:
    """Refuses a workdir that holds a run trained with another captioning scheme (before the
    adjectives were measured, ``latent_stats.json`` had no ``caption_scheme``): resuming it with
    these captions would not be the same run, and its tokenizer would be rebuilt.

    Raises:
      ConfigError: naming the workdir and how to reuse its autoencoder.
    """
    path = os.path.join(workdir, STATS_FILE)
    if latent_data.latest_step(workdir) is None or not os.path.isfile(path):
        return
    with open(path) as f:
        scheme = json.load(f).get("caption_scheme", "adjectives drawn independently of the image")
    if scheme != mnist_prompts.CAPTION_SCHEME:
        raise ConfigError(
            f"workdir {workdir!r} holds a run trained with other captions ({scheme}); train in a "
            f"new workdir (--config.vae_workdir={os.path.join(workdir, 'vae')} reuses its "
            "autoencoder)")


def train(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """Both stages: the autoencoder (:func:`experiments.latent_data.vae_stage`), then the latent
    model, trained or resumed in ``workdir`` on :func:`jaxdiff.training.fit`. Returns its summary
    (``start_step``, ``end_step``, ``wall_s``, ``stopped_by_signal``, ``checkpoint_step``,
    ``loss``, ``grid``) with ``scaling_factor``, ``vae_dir`` and ``diffusers`` (the exported
    folder, or None).

    Writes ``config.json``, ``tokenizer/``, ``latents.npz``, ``latent_stats.json``,
    ``checkpoints/``, ``metrics.jsonl`` and ``samples/step_XXXXXX.png`` (with ``.txt``: the
    rows' prompts) into ``workdir``; once ``training.num_steps`` is reached, ``diffusers/``:
    the EMA model as a diffusers Stable Diffusion folder
    (:func:`experiments.latent_pipeline.export`).

    ``training.fsdp > 1`` splits the train state over an ``fsdp`` mesh axis; the grids and the
    export get the EMA params whole.

    Raises:
      ConfigError: an invalid config field or path (nothing written).
      jaxdiff.training.IncompatibleCheckpointError: ``workdir`` holds a run of another config.
    """
    unet = validate_config(config)
    train_lib.check_paths(config, workdir)
    train_lib.check_tensorboard_available(config)
    mesh = train_lib.make_train_mesh(config)
    workdir = train_lib.make_workdir(workdir)
    check_caption_scheme(workdir)
    vae_dir = latent_data.vae_stage(config, workdir)
    vae, vae_params, vae_step, tokenizer, tcfg = _setup(config, workdir, vae_dir)
    data = latent_data.encoded_latents(config, workdir, vae, vae_params, vae_dir, vae_step)
    mean, std = data["mean"], data["std"]
    stats = dict(latent_data.latent_statistics(mean, std), vae_dir=vae_dir, vae_step=vae_step,
                 pad_to=int(config.data.pad_to), latent_shape=list(mean.shape[1:]),
                 caption_scheme=mnist_prompts.CAPTION_SCHEME,
                 attribute_thresholds=latent_data.thresholds_json(data["thresholds"]))
    stats = with_latent_scaling(stats, config.get("latent_scaling", 0.0))
    with open(os.path.join(workdir, STATS_FILE), "w") as f:
        json.dump(stats, f, indent=2)
    vae_cfg = dataclasses.replace(vae.config, scaling_factor=stats["scaling_factor"])
    t, s = config.training, config.sampling
    schedule = schedule_from_diffusers_config(latent_pipeline.scheduler_config(config))
    table, empty = latent_data.prompt_ids_table(tokenizer)
    sd = latent_pipeline.make_pipeline(config, unet.config, tcfg, vae_cfg, tokenizer,
                                       {"unet": None, "text_encoder": None}, vae_params)
    sample_key = train_lib.run_keys(config.seed)["sample"]
    grid_prompts = mnist_prompts.sample_prompts(np.arange(10), sample_key, s.split)
    prompts = [p for p in grid_prompts for _ in range(s.per_prompt)]

    def with_ema(state):
        return sd.replace(params=dict(sd.params, unet=state.ema_params["unet"],
                                      text_encoder=state.ema_params["text_encoder"]))

    def write_grid(step, state):
        images = latent_pipeline.sample(with_ema(state), prompts, sample_key,
                                        num_steps=s.num_steps, guidance_scale=s.guidance_scale,
                                        batch_size=len(prompts))
        if jax.process_index() != 0:
            return None
        path = os.path.join(workdir, "samples", f"step_{step:06d}.png")
        latent_pipeline.save_prompt_grid(images, grid_prompts, path)
        latent_pipeline.save_prompt_grid(images, grid_prompts,
                                         os.path.join(workdir, "samples", "latest.png"))
        return path

    def finish(state, summary):
        exported = None
        if (not summary["stopped_by_signal"] and summary["end_step"] >= t.num_steps
                and config.export_diffusers):
            ema = jax.device_get(state.ema_params)   # every process takes part in the gather
            if jax.process_index() == 0:
                exported = latent_pipeline.export(
                    sd.replace(params=dict(sd.params, unet=ema["unet"],
                                           text_encoder=ema["text_encoder"])),
                    os.path.join(workdir, DIFFUSERS_DIR))
        return {"scaling_factor": stats["scaling_factor"], "vae_dir": vae_dir,
                "diffusers": exported}

    return train_lib.run_task(
        config, workdir, mesh,
        init_params=lambda abstract: init_params(config, unet.config, tcfg, abstract),
        loss_fn=make_loss_fn(config, unet, tcfg, vae_cfg, schedule, table, empty),
        compat=_compat(config, vae_dir, vae_step, stats),
        hyperparams=mnist_lib.resume_hyperparams(config),
        data=BatchIterator.source({k: data[k] for k in ("mean", "std", "label", "bins")},
                                  t.batch_size, config.seed),
        periodic=[Periodic("grid", s.every, write_grid)], finish=finish)


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
    vae, vae_params, _, tokenizer, tcfg = _setup(config, workdir, stats["vae_dir"], build=False)
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
    sd = latent_pipeline.make_pipeline(config, unet.config, tcfg, vae_cfg, tokenizer,
                                       restored[0].ema_params, vae_params)
    return LatentRun(config, sd, dict(stats, step=int(restored[2])))

