"""A fine-tuning run as a :class:`jaxdiff.training.TrainTask`: :func:`build_finetune_task` turns a
loaded Stable Diffusion, a :class:`~jaxdiff.finetune.FinetuneConfig` and in-memory training
examples into what :func:`jaxdiff.training.fit` trains (the command line
``experiments.finetune_sd`` adds its periodic grids and export; a benchmark can build the same
task and time its step).

    sd = load_stable_diffusion("path/to/sd")
    task = build_finetune_task(sd, FinetuneConfig(mode="lora", rank=8), examples,
                               batch_size=4, seed=0)
    fit(TrainerSettings(workdir="runs/ft", num_steps=500, batch_size=4), task)

``examples`` is ``{"pixel_values": [N, R, R, 3] float32 in [-1, 1], "input_ids": [N, L]
int32}`` (e.g. :func:`jaxdiff.data.image_transforms.load_images` of an image folder and its
captions through :func:`jaxdiff.data.image_source.tokenize_captions`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np
from flax.traverse_util import flatten_dict

from jaxdiff.data.iterator import BatchIterator
from jaxdiff.finetune.cache import cache_examples
from jaxdiff.finetune.dreambooth import (WORD_PRIOR_TARGETS, PairedIterator, WordPrior,
                                         with_prior_flag, with_word_prior)
from jaxdiff.finetune.loss import make_finetune_loss
from jaxdiff.finetune.modes import (FinetuneConfig, finetuned_pipeline, frozen_params,
                                    init_trainable, lora_patterns)
from jaxdiff.finetune.text_prior import TextPrior
from jaxdiff.pipelines.loading import StableDiffusion
from jaxdiff.pipelines.stable_diffusion import generate
from jaxdiff.training.trainer import TrainTask
from jaxdiff.validation import check_int

__all__ = ["model_identity", "finetune_compat", "build_finetune_task", "sample_finetuned",
           "step_batch_size"]

_COMPUTE_FIELDS = ("dtype", "param_dtype", "remat", "attention_implementation")


def _config_dict(config: Any) -> Dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if f.name not in _COMPUTE_FIELDS}


def model_identity(sd: StableDiffusion, values_per_leaf: int = 16) -> str:
    """A fingerprint of a loaded model: SHA-256 over its configs (compute settings excluded),
    its scheduler config, every parameter's path and shape, and the first ``values_per_leaf``
    values of every parameter (so two checkpoints of one architecture differ). Cheap: no
    parameter is read whole."""
    h = hashlib.sha256()
    configs = {"unet": _config_dict(sd.unet_config), "vae": _config_dict(sd.vae_config),
               "text": _config_dict(sd.text_config), "scheduler": dict(sd.scheduler_config)}
    h.update(json.dumps(configs, sort_keys=True, default=str).encode())
    for name in sorted(sd.params):
        for path, leaf in sorted(flatten_dict(dict(sd.params[name])).items()):
            h.update(("/".join((name,) + path) + str(tuple(np.shape(leaf)))).encode())
            h.update(np.asarray(jax.device_get(leaf.reshape(-1)[:values_per_leaf]),
                                np.float32).tobytes())
    return h.hexdigest()


def finetune_compat(sd: StableDiffusion, cfg: FinetuneConfig, *, batch_size: int, seed: int,
                    dreambooth: bool, example_shape: Sequence[int],
                    text_prior: Optional[TextPrior] = None,
                    word_prior: Optional[Union[WordPrior, Tuple[str, np.ndarray]]] = None
                    ) -> Dict[str, Any]:
    """What a checkpoint of the run must match to be resumed (JSON-able): the model's
    :func:`model_identity`, the mode, the LoRA's rank / alpha / targets, whether the text encoder
    trains, caching, DreamBooth, the batch, the seed, the examples' shape, the text prior (its
    prompts' tokens, weight and batch) and the word prior (its word, mask, offset, word-alone
    fraction and target: :class:`~jaxdiff.finetune.WordPrior`); each prior's key is absent
    without it."""
    def digest(a):
        return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()

    extra = {}
    if text_prior is not None:
        extra["text_prior"] = {
            "tokens": digest(np.asarray(text_prior.input_ids, np.int32)),
            "offset": int(text_prior.offset), "weight": float(text_prior.weight),
            "batch": int(text_prior.batch)}
    if word_prior is not None:
        wp = WordPrior(*word_prior)
        extra["word_prior"] = {"word": str(wp.word).strip(),
                               "mask": None if wp.mask is None
                               else digest(np.asarray(wp.mask, np.float32))}
        if wp.offset is not None:
            extra["word_prior"]["offset"] = digest(np.asarray(wp.offset, np.float32))
        if wp.word_alone:
            extra["word_prior"]["word_alone"] = float(wp.word_alone)
        if wp.target != "data":
            extra["word_prior"]["target"] = str(wp.target)
    return {**extra,
        "model": model_identity(sd), "mode": cfg.mode,
        "train_text_encoder": cfg.train_text_encoder,
        "lora": None if cfg.mode != "lora" else {
            "rank": cfg.rank, "alpha": cfg.alpha, "targets": lora_patterns(cfg)},
        "cache": cfg.cache, "dreambooth": dreambooth, "batch_size": int(batch_size),
        "seed": int(seed), "example_shape": [int(s) for s in example_shape],
    }


def step_batch_size(batch_size: int, dreambooth: bool) -> int:
    """The examples in one optimizer step: ``batch_size`` instances, plus as many class
    examples with DreamBooth (``TrainerSettings.batch_size`` must be this)."""
    return 2 * batch_size if dreambooth else batch_size


def build_finetune_task(
    sd: StableDiffusion,
    cfg: FinetuneConfig,
    examples: Mapping[str, np.ndarray],
    *,
    batch_size: int,
    seed: int,
    class_examples: Optional[Mapping[str, np.ndarray]] = None,
    periodic: Sequence[Any] = (),
    finish: Any = None,
    config_json: Optional[str] = None,
    hyperparams: Optional[Mapping[str, Any]] = None,
    text_prior: Optional[TextPrior] = None,
    word_prior: Optional[Union[WordPrior, Tuple[str, np.ndarray]]] = None,
) -> TrainTask:
    """The :class:`~jaxdiff.training.TrainTask` of a fine-tuning run.

    Args:
      sd: the base model, float32 (``load_stable_diffusion(path)``).
      cfg: the mode and options.
      examples: the instance examples, ``{"pixel_values": [N, R, R, 3] float32 in [-1, 1],
        "input_ids": [N, L] int32}`` (host numpy), ``R`` a multiple of the VAE's factor.
      batch_size: instance examples per optimizer step (global); at most ``N``.
      seed: the data order's seed; the train state's key is ``fold_in(key(seed), 1)`` and the
        LoRA's initialisation ``fold_in(key(seed), 0)``.
      class_examples: DreamBooth's class examples (the same keys), or None; each step then
        holds ``batch_size`` of each (:func:`step_batch_size`) and the loss has the prior term.
        Either set may hold ``loss_mask [N, h, w, 1]`` and ``latent_offset [N, h, w, C]``
        (:func:`~jaxdiff.finetune.with_word_prior`); the other then gets ones / zeros.
      periodic, finish, config_json, hyperparams: passed to the task as they are.
      text_prior: a :class:`~jaxdiff.finetune.TextPrior` added to the loss (needs
        ``cfg.train_text_encoder``), or None.
      word_prior: a :class:`~jaxdiff.finetune.WordPrior` (or ``(word, mask [h, w])``): the
        class examples get their :func:`~jaxdiff.finetune.with_word_prior` copies (needs
        ``class_examples``; the word-alone draw from ``seed``), or None. Its ``target``
        ``"base"`` distills every class example from the frozen base model
        (:func:`~jaxdiff.finetune.make_finetune_loss`; needs LoRA mode without ``cfg.cache``).

    Returns:
      The task: ``init_params`` the trainable tree, ``frozen`` the frozen one, ``loss_fn`` of
      :func:`~jaxdiff.finetune.make_finetune_loss`, ``data`` a resumable source over the
      (cached, with ``cfg.cache``) examples, ``compat`` :func:`finetune_compat`.

    Raises:
      ValueError: naming the argument: examples without ``pixel_values`` / ``input_ids`` or of
        different lengths, images whose size the VAE cannot take, token ids beyond the text
        encoder's vocabulary, a ``batch_size`` larger than the examples (or class examples),
        a word prior's unknown ``target``, or ``"base"`` outside LoRA mode or with ``cfg.cache``.
    """
    batch_size = check_int("batch_size", batch_size, 1)
    seed = check_int("seed", seed, 0)
    if word_prior is not None:
        if class_examples is None:
            raise ValueError("word_prior needs class_examples (DreamBooth's class images)")
        wp = WordPrior(*word_prior)
        if wp.target not in WORD_PRIOR_TARGETS:
            raise ValueError(f"word_prior.target must be one of {WORD_PRIOR_TARGETS}, got "
                             f"{wp.target!r}")
        if wp.target == "base" and (cfg.mode != "lora" or cfg.cache):
            raise ValueError("word_prior.target 'base' distills the class examples from the "
                             "frozen base model: it needs mode 'lora' and cache=False, got mode "
                             f"{cfg.mode!r}, cache={cfg.cache}")
        class_examples = with_word_prior(sd, dict(class_examples), wp.word, wp.mask,
                                         offset=wp.offset, word_alone=wp.word_alone, seed=seed,
                                         base_ids=wp.target == "base")
    sets = {"examples": examples}
    if class_examples is not None:
        sets["class_examples"] = class_examples
    for name, ex in sets.items():
        _check_examples(sd, name, ex, batch_size)
    if class_examples is not None and (np.shape(class_examples["pixel_values"])[1:]
                                       != np.shape(examples["pixel_values"])[1:]):
        raise ValueError(f"class_examples' images {np.shape(class_examples['pixel_values'])} "
                         f"differ in size from the examples' "
                         f"{np.shape(examples['pixel_values'])}")
    masked = any("loss_mask" in ex for ex in sets.values())
    moved_any = any("latent_offset" in ex for ex in sets.values())
    taught = any("base_input_ids" in ex for ex in sets.values())
    prepared = {}
    for name, ex in sets.items():
        pixels = np.asarray(ex["pixel_values"], np.float32)
        mask = ex.get("loss_mask")
        if masked and mask is None:     # the other set's examples: every position counts
            f = sd.vae_scale_factor
            mask = np.ones((len(pixels), pixels.shape[1] // f, pixels.shape[2] // f, 1),
                           np.float32)
        moved = ex.get("latent_offset")
        if moved_any and moved is None:  # the other set's examples: not moved
            f, c = sd.vae_scale_factor, sd.vae_config.latent_channels
            moved = np.zeros((len(pixels), pixels.shape[1] // f, pixels.shape[2] // f, c),
                             np.float32)
        base_ids = ex.get("base_input_ids")
        if taught and base_ids is None:  # the instances: never distilled (prior 0)
            base_ids = ex["input_ids"]
        ex = {"pixel_values": pixels, "input_ids": np.asarray(ex["input_ids"], np.int32),
              **({} if base_ids is None else {"base_input_ids": np.asarray(base_ids, np.int32)}),
              **({} if mask is None else {"loss_mask": np.asarray(mask, np.float32)}),
              **({} if moved is None else {"latent_offset": np.asarray(moved, np.float32)})}
        if class_examples is not None:
            ex = with_prior_flag(ex, prior=name == "class_examples")
        prepared[name] = cache_examples(sd, cfg, ex) if cfg.cache else ex
    data = BatchIterator.source(prepared["examples"], batch_size, seed)
    if class_examples is not None:
        data = PairedIterator.source(
            data, BatchIterator.source(prepared["class_examples"], batch_size, seed + 1))
    root = jax.random.key(seed)
    init_key = jax.random.fold_in(root, 0)
    return TrainTask(
        init_params=lambda abstract: init_trainable(sd, cfg, init_key, abstract),
        key=jax.random.fold_in(root, 1), loss_fn=make_finetune_loss(sd, cfg, text_prior),
        data=data,
        compat=finetune_compat(sd, cfg, batch_size=batch_size, seed=seed,
                               dreambooth=class_examples is not None,
                               example_shape=np.shape(examples["pixel_values"])[1:],
                               text_prior=text_prior, word_prior=word_prior),
        hyperparams=dict(hyperparams or {}), periodic=tuple(periodic), config_json=config_json,
        finish=finish, frozen=frozen_params(sd, cfg))


def _check_examples(sd: StableDiffusion, name: str, ex: Mapping[str, Any],
                    batch_size: int) -> None:
    missing = {"pixel_values", "input_ids"} - set(ex)
    if missing:
        raise ValueError(f"{name} needs {sorted(missing)}, got {sorted(ex)}")
    images, ids = np.shape(ex["pixel_values"]), np.shape(ex["input_ids"])
    f = sd.vae_scale_factor
    if len(images) != 4 or images[-1] != 3 or images[1] % f or images[2] % f:
        raise ValueError(f"{name}['pixel_values'] must be [N, R, R, 3] with R a multiple of "
                         f"{f} (the VAE's factor), got {images}")
    if len(ids) != 2 or ids[0] != images[0]:
        raise ValueError(f"{name}['input_ids'] must be [N, L] with N = {images[0]} (one caption "
                         f"per image), got {ids}")
    if ids[0] and int(np.max(ex["input_ids"])) >= sd.text_config.vocab_size:
        raise ValueError(f"{name}['input_ids'] holds ids beyond the text encoder's vocab_size "
                         f"{sd.text_config.vocab_size}")
    if batch_size > images[0]:
        raise ValueError(f"batch_size {batch_size} is larger than the {images[0]} {name} "
                         "(each step takes batch_size distinct examples)")


def sample_finetuned(sd: StableDiffusion, cfg: FinetuneConfig, params: Dict[str, Any],
                     prompts: Sequence[str], *, seed: int, num_steps: int = 25,
                     guidance_scale: float = 7.5) -> np.ndarray:
    """Images ``[n, H, W, 3]`` uint8 of ``prompts`` from the fine-tuned model (``params`` the
    trainable tree, e.g. the EMA's, fused into ``sd`` on the host), with ``key(seed)``: the same
    seed gives the same starting latents at every step, so grids compare."""
    tuned = finetuned_pipeline(sd, cfg, jax.device_get(params))
    return generate(tuned, list(prompts), num_steps=num_steps, guidance_scale=guidance_scale,
                    seed=seed).images
