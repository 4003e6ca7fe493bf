"""What is trained and what stays frozen: full fine-tuning and LoRA, as pytrees.

A fine-tuning run splits a :class:`~jaxdiff.pipelines.StableDiffusion`'s params
(``{"unet", "vae", "text_encoder"}``) into the *trainable* tree (the train state's params: what
optax and the EMA see, what is checkpointed) and the *frozen* tree (handed to the train step as
an argument: :class:`jaxdiff.training.TrainTask`'s ``frozen``):

- ``mode="full"``: trainable ``{"unet"}`` (plus ``"text_encoder"`` with
  ``train_text_encoder``), frozen the rest;
- ``mode="controlnet"``: trainable ``{"controlnet"}``, a ControlNet's params
  (:mod:`jaxdiff.finetune.controlnet` builds them and its task), frozen the whole Stable
  Diffusion (UNet, text encoder, VAE); the loss adds the ControlNet's residuals to the frozen
  UNet, so gradients and optimizer state exist only for the ControlNet;
- ``mode="lora"``: trainable the adapter ``{"unet": ..., "text_encoder": ...}`` of
  :func:`jaxdiff.lora.init_lora` (UNet attention, optionally its feed-forward layers, and with
  ``train_text_encoder`` the text encoder's attention), frozen every base model; inside the loss
  the adapter is merged into the base, ``merge_lora(base, lora, alpha / rank)``, so gradients
  and optimizer state exist only for the adapter.

The VAE (and the text encoder, when it is not trained) is left out of the frozen tree when the
latents (embeddings) are cached (:mod:`jaxdiff.finetune.cache`): the step never reads them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp

from jaxdiff.finetune.objective import Objective
from jaxdiff.lora import (TEXT_ATTENTION, UNET_ATTENTION, UNET_FEED_FORWARD, init_lora,
                          lora_scale, merge_lora)
from jaxdiff.pipelines.loading import StableDiffusion
from jaxdiff.validation import check_bool, check_choice, check_float, check_int

__all__ = ["MODES", "COMPUTE_DTYPES", "FinetuneConfig", "lora_patterns", "init_trainable",
           "frozen_params", "model_params", "finetuned_pipeline", "compute_configs"]

MODES = ("full", "lora", "controlnet")
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """How a Stable Diffusion is fine-tuned (the library side of ``experiments.finetune_sd``).

    Attributes:
      mode: ``"full"``, ``"lora"`` or ``"controlnet"`` (module docstring).
      train_text_encoder: also train the text encoder (full: all of it; LoRA: an adapter on its
        attention, :data:`jaxdiff.lora.TEXT_ATTENTION`; not with ``"controlnet"``).
      rank, alpha: the LoRA's rank ``r >= 1`` and ``alpha`` (None: ``alpha = rank``); the
        update is ``(alpha / r) * down @ up``.
      lora_feed_forward: also adapt the UNet's feed-forward layers
        (:data:`jaxdiff.lora.UNET_FEED_FORWARD`), besides its attention projections.
      lora_unet_targets: a regular expression over UNet layer paths that replaces the attention
        projections (:data:`jaxdiff.lora.UNET_ATTENTION`) as the UNet's targets, e.g.
        ``r"/attn2/(to_k|to_v)$"`` for the cross-attention keys and values only (Custom
        Diffusion's choice); None: the attention projections.
      compute_dtype: ``"float32"`` or ``"bfloat16"``: the models compute in it, the parameters
        (master weights), the optimizer and the loss stay float32.
      remat: gradient checkpointing of the UNet's blocks (``UNetConfig.remat``).
      cache: precompute the VAE posterior (mean, std) and the text embeddings once and train from
        them (needs a frozen text encoder and no random flip: the data must be deterministic).
      random_flip: flip each training image horizontally with probability 1/2 (in the step,
        from its key).
      objective: the loss's options (:class:`~jaxdiff.finetune.Objective`).

    Raises:
      ValueError: a field out of range or a combination that cannot work, naming the field.
    """

    mode: str = "lora"
    train_text_encoder: bool = False
    rank: int = 4
    alpha: Optional[float] = None
    lora_feed_forward: bool = False
    lora_unet_targets: Optional[str] = None
    compute_dtype: str = "float32"
    remat: bool = False
    cache: bool = False
    random_flip: bool = False
    objective: Objective = Objective()

    def __post_init__(self):
        check_choice("mode", self.mode, MODES)
        for name in ("train_text_encoder", "lora_feed_forward", "remat", "cache", "random_flip"):
            check_bool(name, getattr(self, name))
        check_int("rank", self.rank, 1)
        if self.lora_unet_targets is not None and (not isinstance(self.lora_unet_targets, str)
                                                   or not self.lora_unet_targets):
            raise ValueError(f"lora_unet_targets must be a non-empty regular expression or None, "
                             f"got {self.lora_unet_targets!r}")
        if self.alpha is not None:
            check_float("alpha", self.alpha, minimum=0.0, exclusive_minimum=True)
        check_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        if not isinstance(self.objective, Objective):
            raise ValueError(f"objective must be an Objective, got {type(self.objective)}")
        if self.mode == "controlnet" and self.train_text_encoder:
            raise ValueError("train_text_encoder=True does not go with mode='controlnet' (a "
                             "ControlNet trains against a frozen Stable Diffusion)")
        if self.cache and self.train_text_encoder:
            raise ValueError("cache=True needs a frozen text encoder (train_text_encoder=False): "
                             "the cached embeddings would go stale")
        if self.cache and self.random_flip:
            raise ValueError("cache=True needs deterministic images (random_flip=False)")

    @property
    def lora_scale(self) -> float:
        """``alpha / rank`` (1 when ``alpha`` is None)."""
        return lora_scale(self.rank, self.alpha)


def lora_patterns(cfg: FinetuneConfig) -> Dict[str, list]:
    """The LoRA targets per model: ``{"unet": [...], "text_encoder": [...]}`` (the latter only
    with ``train_text_encoder``)."""
    out = {"unet": [cfg.lora_unet_targets or UNET_ATTENTION]
            + ([UNET_FEED_FORWARD] if cfg.lora_feed_forward else [])}
    if cfg.train_text_encoder:
        out["text_encoder"] = [TEXT_ATTENTION]
    return out


def _shapes(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.asarray(x).dtype
                                                       if not hasattr(x, "dtype") else x.dtype),
                        tree)


def init_trainable(sd: StableDiffusion, cfg: FinetuneConfig, key: jax.Array,
                   abstract: bool = False) -> Dict[str, Any]:
    """The trainable tree at step 0 (module docstring), float32; ``abstract=True``: its
    ``jax.ShapeDtypeStruct`` pytree (nothing computed). ``key`` draws the LoRA's ``down``
    (UNet and text encoder from ``split(key)``); full mode copies the loaded params.

    Raises:
      ValueError: a rank larger than a target layer (naming it), from
        :func:`jaxdiff.lora.init_lora`; ``mode="controlnet"`` (its trainable tree is a
        ControlNet: :func:`jaxdiff.finetune.controlnet.build_controlnet_task`).
    """
    if cfg.mode == "controlnet":
        raise ValueError("init_trainable: mode='controlnet' trains a ControlNet; build its task "
                         "with jaxdiff.finetune.build_controlnet_task")
    if cfg.mode == "full":
        out = {"unet": sd.params["unet"]}
        if cfg.train_text_encoder:
            out["text_encoder"] = sd.params["text_encoder"]
        out = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), out)
        return _shapes(out) if abstract else out
    keys = dict(zip(("unet", "text_encoder"), jax.random.split(key)))

    def make(k):
        return {name: init_lora(sd.params[name], pats, rank=cfg.rank, key=k[name])
                for name, pats in lora_patterns(cfg).items()}

    if abstract:
        return jax.eval_shape(make, keys)
    return make(keys)


def frozen_params(sd: StableDiffusion, cfg: FinetuneConfig) -> Dict[str, Any]:
    """The frozen tree the step reads: the base UNet (LoRA, ControlNet), the text encoder (unless
    trained in full mode, or cached), the VAE (unless cached)."""
    out = {}
    if cfg.mode in ("lora", "controlnet"):
        out["unet"] = sd.params["unet"]
    if not cfg.cache and not (cfg.mode == "full" and cfg.train_text_encoder):
        out["text_encoder"] = sd.params["text_encoder"]
    if not cfg.cache:
        out["vae"] = sd.params["vae"]
    return out


def model_params(params: Dict[str, Any], frozen: Dict[str, Any],
                 cfg: FinetuneConfig) -> Dict[str, Any]:
    """The models' params the loss runs: ``{"unet", ["text_encoder"], ["vae"]}`` from the
    trainable and the frozen trees (LoRA: merged with ``alpha / rank``; ControlNet: the frozen
    models, and ``"controlnet"`` from ``params``; jittable and differentiable in ``params``)."""
    if cfg.mode == "controlnet":
        return dict(frozen, controlnet=params["controlnet"])
    out = {k: v for k, v in frozen.items() if k == "vae"}
    if cfg.mode == "full":
        out.update(params)
        if "text_encoder" not in params and "text_encoder" in frozen:
            out["text_encoder"] = frozen["text_encoder"]
        return out
    scale = cfg.lora_scale
    out["unet"] = merge_lora(frozen["unet"], params["unet"], scale)
    if "text_encoder" in frozen:
        te = frozen["text_encoder"]
        out["text_encoder"] = (merge_lora(te, params["text_encoder"], scale)
                               if "text_encoder" in params else te)
    return out


def compute_configs(sd: StableDiffusion, cfg: FinetuneConfig):
    """``(unet_config, vae_config, text_config)`` the loss runs: ``sd``'s with the compute dtype
    (parameters float32) and ``remat``."""
    dtype = jnp.dtype(cfg.compute_dtype)
    kw = dict(dtype=dtype, param_dtype=jnp.float32)
    return (dataclasses.replace(sd.unet_config, remat=cfg.remat, **kw),
            dataclasses.replace(sd.vae_config, **kw),
            dataclasses.replace(sd.text_config, **kw))


def finetuned_pipeline(sd: StableDiffusion, cfg: FinetuneConfig,
                       params: Dict[str, Any]) -> StableDiffusion:
    """``sd`` with the trained ``params`` in place (LoRA: fused into the base, on the host side
    of ``jit``), for sampling and export; the configs are ``sd``'s.

    Raises:
      ValueError: ``mode="controlnet"`` (a ControlNet steers ``sd``, it does not change it: pass
        it to :func:`jaxdiff.pipelines.generate`'s ``controlnet=``).
    """
    if cfg.mode == "controlnet":
        raise ValueError("finetuned_pipeline: a trained ControlNet is not fused into the model; "
                         "pass (config, params) to generate(controlnet=...)")
    new = dict(sd.params)
    if cfg.mode == "full":
        new.update(params)
    else:
        for name, lora in params.items():
            new[name] = merge_lora(sd.params[name], lora, cfg.lora_scale)
    return sd.replace(params=new)
