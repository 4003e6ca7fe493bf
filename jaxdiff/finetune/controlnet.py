"""Training a ControlNet on a frozen Stable Diffusion (diffusers' ``train_controlnet``): the
``"controlnet"`` mode of :mod:`jaxdiff.finetune`, on the one training loop.

    sd = load_stable_diffusion("path/to/sd")
    cfg = FinetuneConfig(mode="controlnet")
    controlnet = new_controlnet(sd, jax.random.key(0))       # or load_controlnet(folder)
    task = build_controlnet_task(sd, cfg, controlnet, examples, batch_size=8, seed=0)
    fit(TrainerSettings(workdir="runs/cn", num_steps=1000, batch_size=8), task)

The trainable tree is ``{"controlnet": params}``; the UNet, the text encoder and the VAE are the
frozen tree (:func:`~jaxdiff.finetune.frozen_params`), handed to the step as an argument, so
gradients, optimizer state and the EMA exist for the ControlNet's params alone. Each step
encodes the images as fine-tuning does (:func:`~jaxdiff.finetune.encode_batch`: the VAE
posterior sampled, the text embedded, or both cached), draws ``t`` and the noise
(:func:`~jaxdiff.finetune.denoising_terms`), runs the ControlNet on the noisy latents, the
timesteps, the text and the control image, and the frozen UNet with its residuals added; the
loss is the mean squared error against the scheduler's target (``epsilon`` or ``v``), as
diffusers' ``train_controlnet``.

``examples`` is ``{"pixel_values": [N, R, R, 3] float32 in [-1, 1], "input_ids": [N, L] int32,
"conditioning_pixel_values": [N, R, R, C] float32 in [0, 1]}`` (diffusers' control images are
not normalised to ``[-1, 1]``), ``C`` the ControlNet's ``conditioning_channels``
(:func:`jaxdiff.data.read_controlnet_folder` and :func:`jaxdiff.data.load_conditioning_images`
read an image folder of such pairs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from jaxdiff.convert.export_controlnet import controlnet_config_to_diffusers, save_controlnet
from jaxdiff.data.iterator import BatchIterator
from jaxdiff.finetune.cache import cache_examples
from jaxdiff.finetune.loss import encode_batch, flip_images
from jaxdiff.finetune.modes import FinetuneConfig, compute_configs, frozen_params, model_params
from jaxdiff.finetune.objective import denoising_terms
from jaxdiff.finetune.task import finetune_compat
from jaxdiff.models.controlnet import ControlNet, controlnet_param_shapes
from jaxdiff.models.controlnet_config import DEFAULT_CONDITIONING_CHANNELS, ControlNetConfig
from jaxdiff.models.controlnet_unet import check_controlnet_matches_unet, controlnet_from_unet
from jaxdiff.models.unet import UNet
from jaxdiff.pipelines.loading import StableDiffusion
from jaxdiff.pipelines.stable_diffusion import generate
from jaxdiff.training.trainer import TrainTask
from jaxdiff.validation import check_int

__all__ = ["CONTROLNET_DIR", "conditioning_widths", "new_controlnet", "check_controlnet_for",
           "params_fingerprint", "controlnet_compat", "make_controlnet_loss",
           "build_controlnet_task", "sample_controlnet", "export_trained_controlnet"]

CONTROLNET_DIR = "controlnet"
"""The exported ControlNet's folder in a run's workdir."""

ControlNetPair = Tuple[ControlNetConfig, Any]


def conditioning_widths(vae_scale_factor: int) -> Tuple[int, ...]:
    """The conditioning network's widths for a VAE of factor ``f`` (a power of two): diffusers'
    default ``(16, 32, 96, 256)`` for ``f = 8`` (SD), its first ``log2(f) + 1`` entries for a
    smaller ``f`` (``(16, 32, 96)`` for 4), doubling the last beyond, so that the control image
    has the generated image's size.

    Raises:
      ValueError: ``vae_scale_factor`` not a power of two >= 1.
    """
    f = check_int("vae_scale_factor", vae_scale_factor, 1)
    if f & (f - 1):
        raise ValueError(f"vae_scale_factor must be a power of two, got {f}")
    n = f.bit_length()   # log2(f) + 1 widths: log2(f) stride-2 convolutions
    widths = list(DEFAULT_CONDITIONING_CHANNELS[:n])
    while len(widths) < n:
        widths.append(2 * widths[-1])
    return tuple(widths)


def new_controlnet(sd: StableDiffusion, key: jax.Array, *,
                   conditioning_channels: int = 3) -> ControlNetPair:
    """A new ControlNet for ``sd``'s UNet, as diffusers' ``ControlNetModel.from_unet``
    (:func:`~jaxdiff.models.controlnet_from_unet`: the encoder copied, the zero convolutions
    zero, so it changes nothing until trained), with :func:`conditioning_widths` of ``sd``'s VAE
    factor. ``key`` draws the conditioning network (on the host). Returns ``(config, params)``.
    """
    return controlnet_from_unet(sd.unet_config, sd.params["unet"], key,
                                conditioning_channels=conditioning_channels,
                                conditioning_embedding_channels=conditioning_widths(
                                    sd.vae_scale_factor))


def check_controlnet_for(sd: StableDiffusion, config: ControlNetConfig) -> None:
    """Raise a one-line ``ValueError`` unless a ControlNet of ``config`` fits ``sd``: its UNet
    (:func:`~jaxdiff.models.check_controlnet_matches_unet`) and its VAE factor (the control
    image has the generated image's size: ``config.downscale == sd.vae_scale_factor``)."""
    check_controlnet_matches_unet(config, sd.unet_config)
    if config.downscale != sd.vae_scale_factor:
        raise ValueError(f"the ControlNet takes control images {config.downscale}x its latent "
                         f"grid (conditioning_embedding_channels "
                         f"{config.conditioning_embedding_channels}) but the model's VAE factor "
                         f"is {sd.vae_scale_factor}")


def params_fingerprint(tree: Any, values_per_leaf: int = 16) -> str:
    """SHA-256 over a params tree's paths, shapes and the first ``values_per_leaf`` values of
    each leaf (two initialisations of one architecture differ; nothing is read whole)."""
    h = hashlib.sha256()
    for path, leaf in sorted(flatten_dict(dict(tree)).items()):
        h.update(("/".join(path) + str(tuple(np.shape(leaf)))).encode())
        h.update(np.asarray(jax.device_get(jnp.ravel(leaf)[:values_per_leaf]),
                            np.float32).tobytes())
    return h.hexdigest()


def controlnet_compat(sd: StableDiffusion, cfg: FinetuneConfig, controlnet: ControlNetPair, *,
                      batch_size: int, seed: int, example_shape: Sequence[int]) -> Dict[str, Any]:
    """What a checkpoint of a ControlNet run must match to be resumed: fine-tuning's
    (:func:`~jaxdiff.finetune.finetune_compat`: the model, the mode, caching, batch, seed,
    image shape), the ControlNet's diffusers config and the fingerprint of its initial params
    (a new one, or which ControlNet it started from)."""
    config, params = controlnet
    out = finetune_compat(sd, cfg, batch_size=batch_size, seed=seed, dreambooth=False,
                          example_shape=example_shape)
    out["controlnet"] = {k: v for k, v in controlnet_config_to_diffusers(config).items()
                         if not k.startswith("_")}
    out["controlnet_start"] = params_fingerprint(params)
    return out


def _compute_config(config: ControlNetConfig, cfg: FinetuneConfig) -> ControlNetConfig:
    unet = dataclasses.replace(config.unet, dtype=jnp.dtype(cfg.compute_dtype),
                               param_dtype=jnp.float32, remat=cfg.remat)
    return dataclasses.replace(config, unet=unet)


def make_controlnet_loss(sd: StableDiffusion, cfg: FinetuneConfig, config: ControlNetConfig):
    """``loss_fn(params, batch, key, frozen) -> (loss, aux)`` for :func:`jaxdiff.training.fit`
    (module docstring): ``params = {"controlnet": ...}``, ``frozen`` from
    :func:`~jaxdiff.finetune.frozen_params`; the batch as fine-tuning's plus
    ``conditioning_pixel_values [B, R, R, C]``. With ``cfg.random_flip`` an image and its control
    image flip together. The key splits as fine-tuning's. ``aux``: ``t``, ``weight``.

    Raises:
      ValueError: ``cfg.mode`` is not ``"controlnet"``; at trace time, a batch without
        ``conditioning_pixel_values`` (and as :func:`~jaxdiff.finetune.encode_batch`).
    """
    if cfg.mode != "controlnet":
        raise ValueError(f"make_controlnet_loss needs FinetuneConfig(mode='controlnet'), got "
                         f"mode={cfg.mode!r}")
    unet_cfg = compute_configs(sd, cfg)[0]
    unet, net = UNet(unet_cfg), ControlNet(_compute_config(config, cfg))
    schedule, objective = sd.schedule, cfg.objective

    def loss_fn(params: Any, batch: Dict[str, jax.Array], key: jax.Array, frozen: Any):
        if "conditioning_pixel_values" not in batch:
            raise ValueError(f"the batch needs 'conditioning_pixel_values' (the control images), "
                             f"got keys {sorted(batch)}")
        models = model_params(params, frozen, cfg)
        k_z, k_flip, k_loss = jax.random.split(key, 3)
        cond = jnp.asarray(batch["conditioning_pixel_values"], jnp.float32)
        if "pixel_values" in batch and cfg.random_flip:
            images = batch["pixel_values"]
            both = flip_images(k_flip, jnp.concatenate([images, cond], axis=-1))
            batch = dict(batch, pixel_values=both[..., :images.shape[-1]])
            cond = both[..., images.shape[-1]:]
        latents, context = encode_batch(sd, cfg, models, batch, k_z)
        cond = cond.astype(unet_cfg.dtype)

        def apply_fn(x_t, t):
            down, mid = net.apply({"params": models["controlnet"]}, x_t, t, cond,
                                  context=context)
            return unet.apply({"params": models["unet"]}, x_t, t, context=context,
                              down_residuals=down, mid_residual=mid)

        losses, aux = denoising_terms(apply_fn, schedule, latents, k_loss, objective)
        return jnp.mean(losses), aux

    return loss_fn


def _check_examples(sd: StableDiffusion, config: ControlNetConfig,
                    examples: Mapping[str, Any], batch_size: int) -> None:
    missing = {"pixel_values", "input_ids", "conditioning_pixel_values"} - set(examples)
    if missing:
        raise ValueError(f"examples need {sorted(missing)}, got {sorted(examples)}")
    images, ids = np.shape(examples["pixel_values"]), np.shape(examples["input_ids"])
    cond = np.shape(examples["conditioning_pixel_values"])
    f = sd.vae_scale_factor
    if len(images) != 4 or images[1] % f or images[2] % f:
        raise ValueError(f"examples['pixel_values'] must be [N, R, R, 3] with R a multiple of "
                         f"{f} (the VAE's factor), got {images}")
    if len(ids) != 2 or ids[0] != images[0]:
        raise ValueError(f"examples['input_ids'] must be [N, L] with N = {images[0]}, got {ids}")
    want = (images[0], images[1], images[2], config.conditioning_channels)
    if tuple(cond) != want:
        raise ValueError(f"examples['conditioning_pixel_values'] must be {list(want)} (one "
                         f"control image per image, of its size, with the ControlNet's "
                         f"conditioning_channels), got {list(cond)}")
    if ids[0] and int(np.max(examples["input_ids"])) >= sd.text_config.vocab_size:
        raise ValueError(f"examples['input_ids'] holds ids beyond the text encoder's vocab_size "
                         f"{sd.text_config.vocab_size}")
    if batch_size > images[0]:
        raise ValueError(f"batch_size {batch_size} is larger than the {images[0]} examples "
                         "(each step takes batch_size distinct examples)")


def build_controlnet_task(
    sd: StableDiffusion,
    cfg: FinetuneConfig,
    controlnet: ControlNetPair,
    examples: Mapping[str, np.ndarray],
    *,
    batch_size: int,
    seed: int,
    periodic: Sequence[Any] = (),
    finish: Any = None,
    config_json: Optional[str] = None,
    hyperparams: Optional[Mapping[str, Any]] = None,
) -> TrainTask:
    """The :class:`~jaxdiff.training.TrainTask` of a ControlNet run.

    Args:
      sd: the frozen model, float32 (``load_stable_diffusion(path)``).
      cfg: ``FinetuneConfig(mode="controlnet", ...)``: compute dtype, remat, cache, flip,
        objective (the scheduler's ``prediction_type``).
      controlnet: ``(config, params)`` to start from (:func:`new_controlnet`, or
        :func:`~jaxdiff.pipelines.load_controlnet` of a folder), float32 params.
      examples: module docstring (host numpy).
      batch_size: examples per optimizer step (global); at most ``N``.
      seed: the data order's seed; the train state's key is ``fold_in(key(seed), 1)``.
      periodic, finish, config_json, hyperparams: passed to the task as they are.

    Returns:
      The task: ``init_params`` ``{"controlnet": params}``, ``frozen`` the whole model (the VAE
      and text encoder left out with ``cfg.cache``: the examples are then encoded once, the
      control images kept), ``loss_fn`` of :func:`make_controlnet_loss`, ``compat``
      :func:`controlnet_compat`.

    Raises:
      ValueError: one line naming the argument: ``cfg.mode`` not ``"controlnet"``; a ControlNet
        that does not fit ``sd`` (:func:`check_controlnet_for`); examples missing a key, of
        another size or channel count than the ControlNet takes; a ``batch_size`` larger than
        the examples.
    """
    batch_size = check_int("batch_size", batch_size, 1)
    seed = check_int("seed", seed, 0)
    if not isinstance(cfg, FinetuneConfig) or cfg.mode != "controlnet":
        raise ValueError("cfg must be FinetuneConfig(mode='controlnet', ...)")
    if not (isinstance(controlnet, (tuple, list)) and len(controlnet) == 2
            and isinstance(controlnet[0], ControlNetConfig)):
        raise ValueError("controlnet must be (ControlNetConfig, params): new_controlnet or "
                         "load_controlnet")
    config, start = controlnet
    check_controlnet_for(sd, config)
    _check_examples(sd, config, examples, batch_size)
    ex = {"pixel_values": np.asarray(examples["pixel_values"], np.float32),
          "input_ids": np.asarray(examples["input_ids"], np.int32),
          "conditioning_pixel_values": np.asarray(examples["conditioning_pixel_values"],
                                                  np.float32)}
    if cfg.cache:
        ex = cache_examples(sd, cfg, ex)
    start = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), dict(start))
    shapes = {"controlnet": controlnet_param_shapes(
        dataclasses.replace(config, unet=dataclasses.replace(config.unet,
                                                              param_dtype=jnp.float32)))}
    root = jax.random.key(seed)
    return TrainTask(
        init_params=lambda abstract: shapes if abstract else {"controlnet": start},
        key=jax.random.fold_in(root, 1), loss_fn=make_controlnet_loss(sd, cfg, config),
        data=BatchIterator.source(ex, batch_size, seed),
        compat=controlnet_compat(sd, cfg, (config, start), batch_size=batch_size, seed=seed,
                                 example_shape=np.shape(examples["pixel_values"])[1:]),
        hyperparams=dict(hyperparams or {}), periodic=tuple(periodic), config_json=config_json,
        finish=finish, frozen=frozen_params(sd, cfg))


def sample_controlnet(sd: StableDiffusion, controlnet: Optional[ControlNetPair],
                      prompts: Sequence[str], control_images: Any, *, seed: int,
                      num_steps: int = 25, guidance_scale: float = 7.5,
                      **generate_kwargs: Any) -> np.ndarray:
    """Images ``[n, H, W, C]`` uint8 of ``prompts`` steered by ``controlnet`` (``(config,
    params)``; None: the model alone, the control images ignored) with ``control_images``
    (``[n, H, W, C]`` float in ``[0, 1]`` or uint8), drawn from ``key(seed)``: the same seed
    gives the same starting latents, so grids at different steps (and with / without the
    ControlNet) compare. ``generate_kwargs`` go to :func:`~jaxdiff.pipelines.generate`."""
    kw = dict(num_steps=num_steps, guidance_scale=guidance_scale, seed=seed, **generate_kwargs)
    if controlnet is not None:
        config, params = controlnet
        kw.update(controlnet=(config, jax.device_get(params)), control_image=control_images)
    return generate(sd, list(prompts), **kw).images


def export_trained_controlnet(folder: str, config: ControlNetConfig, params: Any) -> Dict[str, Any]:
    """Writes the trained ControlNet as a diffusers ``ControlNetModel`` folder
    (:func:`~jaxdiff.convert.save_controlnet`; ``ControlNetModel.from_pretrained`` and
    :func:`~jaxdiff.pipelines.load_controlnet` read it). Call it on every process; process 0
    writes. Returns ``{"controlnet_dir": folder or None, "export_bytes": size or None}``."""
    params = jax.device_get(params)
    if jax.process_index() != 0:
        return {"controlnet_dir": None, "export_bytes": None}
    path = save_controlnet(params, config, folder)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return {"controlnet_dir": path, "export_bytes": size}
