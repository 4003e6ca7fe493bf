"""Fine-tuning a diffusers Stable Diffusion folder (``experiments/configs/finetune_sd.py``) on the
one training loop: the config mapped onto :mod:`jaxdiff.finetune` and
:class:`jaxdiff.training.TrainerSettings`, the image folder read with :mod:`jaxdiff.data`, the
sample grids of the validation prompts, and the export at the end.

Order of work, so that a refused run writes nothing: the config is checked, the model loaded, the
images read and checked, and a workdir's checkpoint compared with this run (another model, mode,
rank or targets is refused) before anything is written; then DreamBooth's class images are
generated (``WORKDIR/class_images`` unless ``dreambooth.class_data_dir`` names a folder), the
examples cached (``memory.cache``), and :func:`jaxdiff.training.fit` runs.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, Optional

import jax
import ml_collections
import numpy as np

from experiments import train_lib
from experiments.cli import ConfigError, config_check
from experiments.images import save_grid
from jaxdiff.finetune import (WORD_PRIOR_TARGETS, FinetuneConfig, Objective, WordPrior,
                              build_finetune_task, export_finetuned, finetune_compat,
                              generate_class_images, init_trainable, sample_finetuned,
                              step_batch_size)
from jaxdiff.training import (Checkpointer, Periodic, TrainerSettings, abstract_train_state,
                              make_optimizer)
from jaxdiff.validation import check_bool, check_choice, check_float, check_int

__all__ = ["finetune_config", "validate_config", "train", "refuse_other_runs", "CLASS_DIR"]

CLASS_DIR = "class_images"


def finetune_config(config: ml_collections.ConfigDict, prediction_type: str) -> FinetuneConfig:
    """The library's :class:`~jaxdiff.finetune.FinetuneConfig` of ``config`` (ConfigError naming
    the field)."""
    c = config
    objective = config_check(
        "", Objective, prediction_type=prediction_type, snr_gamma=c.objective.snr_gamma,
        noise_offset=c.objective.noise_offset,
        prior_loss_weight=c.dreambooth.prior_loss_weight if c.dreambooth.enabled else 1.0)
    try:
        return FinetuneConfig(
            mode=c.mode, train_text_encoder=c.train_text_encoder, rank=c.lora.rank,
            alpha=c.lora.alpha, lora_feed_forward=c.lora.feed_forward,
            lora_unet_targets=c.lora.unet_targets or None,
            compute_dtype=c.memory.compute_dtype, remat=c.memory.remat, cache=c.memory.cache,
            random_flip=c.data.random_flip, objective=objective)
    except ValueError as e:
        msg = str(e)
        field = re.match(r"\w*", msg).group(0)
        raise ConfigError(_SECTIONS.get(field, "") + msg) from None


_SECTIONS = {"rank": "lora.", "alpha": "lora.", "compute_dtype": "memory.", "cache": "memory.",
             "remat": "memory.", "random_flip": "data."}


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every field that needs no model or data (ConfigError naming the field)."""
    c = config
    train_lib.validate_training(config)
    config_check("", check_int, "seed", c.seed, 0)
    config_check("", check_int, "training.accumulate_steps", c.training.accumulate_steps, 1)
    config_check("", check_bool, "training.use_ema", c.training.use_ema)
    config_check("", check_int, "data.resolution", c.data.resolution, 0)
    config_check("", check_bool, "data.center_crop", c.data.center_crop)
    config_check("", check_choice, "data.caption_source", c.data.caption_source,
                 ("auto", "metadata", "txt"))
    config_check("", check_choice, "data.on_bad_image", c.data.on_bad_image, ("warn", "error"))
    config_check("", check_int, "data.prefetch", c.data.prefetch, 1)
    d = c.dreambooth
    config_check("", check_bool, "dreambooth.enabled", d.enabled)
    if d.enabled:
        if not isinstance(d.instance_prompt, str):
            raise ConfigError(f"dreambooth.instance_prompt must be a string (\"\": the images' "
                              f"own captions), got {d.instance_prompt!r}")
        if not isinstance(d.class_prompt, str) or not all(
                isinstance(p, str) and p.strip() for p in d.class_prompts):
            raise ConfigError("dreambooth.class_prompt must be a string and "
                              "dreambooth.class_prompts non-empty strings")
        if bool(d.class_prompt.strip()) == bool(d.class_prompts):
            raise ConfigError("DreamBooth with prior preservation needs exactly one of "
                              "dreambooth.class_prompt (one prompt) and dreambooth.class_prompts "
                              "(several, in turn)")
        config_check("", check_int, "dreambooth.num_class_images", d.num_class_images, 1)
        config_check("", check_float, "dreambooth.prior_loss_weight", d.prior_loss_weight,
                     minimum=0.0)
        config_check("", check_int, "dreambooth.sample_batch_size", d.sample_batch_size, 1)
        config_check("", check_int, "dreambooth.num_inference_steps", d.num_inference_steps, 1)
        if not isinstance(d.word_prior, str) or not isinstance(d.word_prior_mask, str):
            raise ConfigError("dreambooth.word_prior and dreambooth.word_prior_mask must be "
                              "strings")
        if not isinstance(d.word_prior_offset, str):
            raise ConfigError(f"dreambooth.word_prior_offset must be a string (\"\": off, "
                              f"\"learn\" or a .npy file), got {d.word_prior_offset!r}")
        if bool(d.word_prior.strip()) != bool(d.word_prior_mask or d.word_prior_offset):
            raise ConfigError("dreambooth.word_prior (the word) goes with "
                              "dreambooth.word_prior_mask (an image file), "
                              "dreambooth.word_prior_offset, or both")
        if d.word_prior_mask and not os.path.isfile(d.word_prior_mask):
            raise ConfigError(f"dreambooth.word_prior_mask {d.word_prior_mask!r} is not a file")
        if d.word_prior_offset not in ("", "learn") and not os.path.isfile(d.word_prior_offset):
            raise ConfigError(f"dreambooth.word_prior_offset {d.word_prior_offset!r} is neither "
                              "'learn' nor a file")
        config_check("", check_int, "dreambooth.word_prior_offset_steps",
                     d.word_prior_offset_steps, 1)
        config_check("", check_float, "dreambooth.word_prior_offset_lr", d.word_prior_offset_lr,
                     minimum=0.0, exclusive_minimum=True)
        config_check("", check_float, "dreambooth.word_alone", d.word_alone, minimum=0.0,
                     maximum=1.0)
        if d.word_alone >= 1.0:
            raise ConfigError(f"dreambooth.word_alone must lie in [0, 1), got {d.word_alone}")
        if d.word_alone and not d.word_prior_offset:
            raise ConfigError("dreambooth.word_alone needs dreambooth.word_prior_offset (the "
                              "word alone on unmoved class images would teach it as the class)")
        if d.word_prior_target not in WORD_PRIOR_TARGETS:
            raise ConfigError(f"dreambooth.word_prior_target must be one of "
                              f"{WORD_PRIOR_TARGETS}, got {d.word_prior_target!r}")
        if d.word_prior_target == "base" and (c.mode != "lora" or c.memory.cache):
            raise ConfigError("dreambooth.word_prior_target 'base' distills the class examples "
                              "from the frozen base model: it needs mode 'lora' (a LoRA "
                              "preset) and memory.cache=False")
    if not d.enabled and (d.word_prior or d.word_prior_mask or d.word_prior_offset):
        raise ConfigError("dreambooth.word_prior trains on DreamBooth's class images: it needs "
                          "dreambooth.enabled (a dreambooth_* preset)")
    tp = c.text_prior
    if not isinstance(tp.word, str):
        raise ConfigError(f"text_prior.word must be a string (\"\": off), got {tp.word!r}")
    if tp.word.strip():
        if not c.train_text_encoder:
            raise ConfigError("text_prior.word trains the text encoder: it needs "
                              "train_text_encoder=True")
        if not all(isinstance(p, str) and p.strip() for p in tp.prompts):
            raise ConfigError(f"text_prior.prompts must be non-empty strings, got {tp.prompts!r}")
        if not tp.prompts and not d.enabled:
            raise ConfigError("text_prior.prompts is empty and there are no DreamBooth class "
                              "prompts to use instead")
        config_check("", check_float, "text_prior.weight", tp.weight, minimum=0.0,
                     exclusive_minimum=True)
        config_check("", check_int, "text_prior.batch", tp.batch, 1)
    v = c.validation
    if not all(isinstance(p, str) for p in v.prompts):
        raise ConfigError(f"validation.prompts must be strings, got {v.prompts!r}")
    for name, low in (("per_prompt", 1), ("every", 0), ("num_steps", 1)):
        config_check("", check_int, f"validation.{name}", v[name], low)
    config_check("", check_float, "validation.guidance_scale", v.guidance_scale)
    config_check("", check_bool, "export", c.export)
    if c.mode == "controlnet":
        raise ConfigError("mode 'controlnet' is trained by python -m experiments.train_controlnet "
                          "(it needs control images); finetune_sd takes 'full' or 'lora'")
    config_check("", check_bool, "lora.feed_forward", c.lora.feed_forward)
    finetune_config(config, "epsilon")


def _word_prior_mask(sd, mask_path: str, size) -> np.ndarray:
    """``dreambooth.word_prior_mask`` read as grayscale in [0, 1], checked against the images'
    ``size`` (H, W) and averaged to the latent grid."""
    from PIL import Image

    from jaxdiff.finetune import resize_mask

    try:
        with Image.open(mask_path) as im:
            mask = np.asarray(im.convert("L"), np.float32) / 255.0
    except OSError as e:
        raise ConfigError(f"dreambooth.word_prior_mask {mask_path!r}: not an image ({e})") from None
    if mask.shape != tuple(size):
        raise ConfigError(f"dreambooth.word_prior_mask {mask_path!r} is {mask.shape[1]}x"
                          f"{mask.shape[0]}; the training images are {size[1]}x{size[0]}")
    f = sd.vae_scale_factor
    return config_check("dreambooth.word_prior_mask: ", resize_mask, mask,
                        (size[0] // f, size[1] // f))


OFFSET_FILE = "word_prior_offset.npy"


def _word_prior_offset(config, sd, examples, captions, workdir: str) -> Optional[np.ndarray]:
    """``dreambooth.word_prior_offset``: None (off), a file's array, or with "learn" the offset
    of ``WORKDIR/word_prior_offset.npy`` (a resume's), else fitted to the instance images
    (:func:`jaxdiff.finetune.learn_word_offset`) and written there whole before training."""
    d = config.dreambooth
    if not d.word_prior_offset:
        return None
    path = d.word_prior_offset
    if d.word_prior_offset == "learn":
        path = os.path.join(workdir, OFFSET_FILE)
        if not os.path.isfile(path):
            if os.path.isdir(os.path.join(workdir, "checkpoints")):
                raise ConfigError(f"--workdir {workdir!r} holds checkpoints but no {OFFSET_FILE}"
                                  ": not a run of dreambooth.word_prior_offset='learn'")
            return _learn_offset(config, sd, examples, captions, path)
    try:
        offset = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"dreambooth.word_prior_offset {path!r}: not a .npy array ({e})"
                          ) from None
    return np.asarray(offset, np.float32)


def _learn_offset(config, sd, examples, captions, path: str) -> np.ndarray:
    import time

    from jaxdiff.finetune import learn_word_offset

    d = config.dreambooth
    start = time.perf_counter()
    print(f"learning the latent offset of {d.word_prior.strip()!r} from "
          f"{len(captions)} images ({d.word_prior_offset_steps} steps)...", flush=True)
    out = config_check("dreambooth.word_prior_offset: ", learn_word_offset, sd,
                       examples["pixel_values"], captions, d.word_prior,
                       jax.random.fold_in(jax.random.key(config.seed), 2),
                       objective=finetune_config(config, sd.prediction_type).objective,
                       num_steps=d.word_prior_offset_steps,
                       learning_rate=d.word_prior_offset_lr,
                       batch_size=config.training.batch_size)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npy"
    np.save(tmp, out["offset"])
    os.replace(tmp, path)
    print(f"learnt it in {time.perf_counter() - start:.1f} s (norm {out['norm']:.3f}, last "
          f"loss {float(np.mean(out['losses'][-100:])):.4f}): {path}", flush=True)
    return out["offset"]


def _load_model(model: str):
    from jaxdiff.pipelines import load_stable_diffusion

    try:
        return load_stable_diffusion(model)
    except ValueError as e:
        raise ConfigError(f"--model: {e}") from None


def _read_examples(config, sd, folder_path: str, caption: Optional[str], what: str,
                   caption_source: Optional[str] = None):
    """``(examples, captions)`` of an image folder: ``pixel_values`` and ``input_ids``; every
    image captioned ``caption`` when it is given (a non-empty string), else its own caption."""
    from jaxdiff.data import load_images, read_image_folder, tokenize_captions

    c = config.data
    resolution = c.resolution or sd.sample_size * sd.vae_scale_factor
    try:
        folder = read_image_folder(folder_path, caption_source=caption_source or c.caption_source,
                                   caption=caption or None,
                                   on_bad_image=c.on_bad_image)
        ids = tokenize_captions(sd.tokenizer, folder.captions, folder.files)
        images = load_images(folder, resolution, c.center_crop, seed=config.seed)
    except ValueError as e:
        raise ConfigError(f"{what}: {e}") from None
    if resolution % sd.vae_scale_factor:
        raise ConfigError(f"data.resolution {resolution} must be a multiple of the VAE's factor "
                          f"{sd.vae_scale_factor}")
    return {"pixel_values": images, "input_ids": ids}, list(folder.captions)


def refuse_other_runs(workdir: str, compat: Dict[str, Any], param_shapes: Any, tx) -> None:
    """IncompatibleCheckpointError now, before anything is written, if ``workdir`` holds a
    checkpoint of another run (``fit`` checks again, but DreamBooth writes its class images
    before ``fit`` runs)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return
    ckpt = Checkpointer(directory, dict(compat), read_only=True)
    try:
        step = ckpt.latest_step()
        if step is not None:
            mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
            ckpt.check_compatible(step, abstract_train_state(param_shapes, tx,
                                                             jax.random.key(0), mesh))
    finally:
        ckpt.close()


def train(config: ml_collections.ConfigDict, model: str, data: str,
          workdir: str) -> Dict[str, Any]:
    """Fine-tunes (or resumes) the Stable Diffusion folder ``model`` on the image folder ``data``
    in ``workdir`` (module docstring). Returns :func:`jaxdiff.training.fit`'s summary with
    ``lora_file`` / ``diffusers`` / ``export_bytes`` (None until the run finishes) and, with
    DreamBooth, ``class_images`` (generated, kept).

    Raises:
      ConfigError: an invalid field, model folder, image folder or path (nothing written).
      jaxdiff.training.IncompatibleCheckpointError: ``workdir`` holds a run of another model or
        setting (nothing written).
    """
    validate_config(config)
    c, t, v, d = config, config.training, config.validation, config.dreambooth
    if not os.path.isdir(data):
        raise ConfigError(f"--data: {data!r} is not a folder")
    train_lib.check_paths(ml_collections.ConfigDict({"data": {"data_dir": ""}}), workdir)
    train_lib.check_tensorboard_available(config)
    mesh = train_lib.make_train_mesh(config)
    sd = _load_model(model)
    cfg = finetune_config(config, sd.prediction_type)
    examples, captions = _read_examples(config, sd, data,
                                        d.instance_prompt if d.enabled else None, "--data")
    workdir = os.path.abspath(workdir)
    class_dir = os.path.abspath(d.class_data_dir or os.path.join(workdir, CLASS_DIR))
    prompts = list(v.prompts) or list(dict.fromkeys(captions))[:4]
    grid_prompts = [p for p in prompts for _ in range(v.per_prompt)]
    batch = step_batch_size(t.batch_size, d.enabled)
    if batch % t.accumulate_steps:
        raise ConfigError(f"training.accumulate_steps {t.accumulate_steps} must divide the "
                          f"step's batch {batch}")
    settings = config_check(
        "training.", TrainerSettings, workdir=workdir, num_steps=t.num_steps, batch_size=batch,
        optimizer=train_lib.optimizer_config(config), ema_decay=t.ema_decay,
        log_every=t.log_every, checkpoint_every=t.checkpoint_every,
        keep_checkpoints=t.keep_checkpoints, fsdp=t.fsdp, prefetch=c.data.prefetch,
        tensorboard=t.tensorboard, accumulate_steps=t.accumulate_steps)

    def trained(state):
        return state.ema_params if t.use_ema else state.params

    def write_grid(step, state):
        images = sample_finetuned(sd, cfg, trained(state), grid_prompts, seed=c.seed,
                                  num_steps=v.num_steps, guidance_scale=v.guidance_scale)
        if jax.process_index() != 0:
            return None
        path = os.path.join(workdir, "samples", f"step_{step:06d}.png")
        save_grid(images.astype(np.float32) / 127.5 - 1.0, path, ncols=v.per_prompt)
        with open(os.path.join(workdir, "samples", f"step_{step:06d}.txt"), "w") as f:
            f.write("\n".join(prompts) + "\n")
        return path

    extra: Dict[str, Any] = {}

    def finish(state, summary):
        done = not summary["stopped_by_signal"] and summary["end_step"] >= t.num_steps
        out = dict(extra, lora_file=None, diffusers=None, export_bytes=None)
        if done and c.export:
            out.update(export_finetuned(workdir, sd, cfg, trained(state)))
        return out

    text_prior = None
    if c.text_prior.word.strip():
        from jaxdiff.finetune import make_text_prior

        tp_prompts = (list(c.text_prior.prompts) or list(d.class_prompts)
                      or [d.class_prompt])
        text_prior = config_check("text_prior.", make_text_prior, sd, c.text_prior.word,
                                  tp_prompts, weight=c.text_prior.weight,
                                  batch=c.text_prior.batch)
    n = len(examples["pixel_values"])
    if t.batch_size > n:
        raise ConfigError(f"training.batch_size {t.batch_size} is larger than the {n} image(s) "
                          f"in --data {data!r} (each step takes batch_size distinct images)")
    if d.enabled and d.num_class_images < t.batch_size:
        raise ConfigError(f"dreambooth.num_class_images {d.num_class_images} must be at least "
                          f"training.batch_size {t.batch_size}")
    shapes = config_check("lora.", init_trainable, sd, cfg, jax.random.key(0), True)
    word_prior = None
    if d.enabled and d.word_prior.strip():
        mask = None if not d.word_prior_mask else _word_prior_mask(
            sd, d.word_prior_mask, np.shape(examples["pixel_values"])[1:3])
        offset = _word_prior_offset(config, sd, examples, captions, workdir)
        word_prior = WordPrior(d.word_prior, mask, offset, float(d.word_alone),
                               d.word_prior_target)
    compat = finetune_compat(sd, cfg, batch_size=t.batch_size, seed=c.seed,
                             dreambooth=d.enabled,
                             example_shape=np.shape(examples["pixel_values"])[1:],
                             text_prior=text_prior, word_prior=word_prior)
    refuse_other_runs(workdir, compat, shapes, make_optimizer(settings.optimizer)[0])
    class_examples = None
    if d.enabled:
        class_prompts = list(d.class_prompts) or d.class_prompt
        made = generate_class_images(sd, class_prompts, class_dir, d.num_class_images,
                                     seed=c.seed, batch_size=d.sample_batch_size,
                                     num_steps=d.num_inference_steps,
                                     guidance_scale=d.guidance_scale)
        extra["class_images"] = {"generated": made["generated"], "kept": made["kept"]}
        # several class prompts: each image's own caption (its .txt); one: that prompt
        class_examples, _ = _read_examples(config, sd, class_dir, d.class_prompt or None,
                                           "dreambooth.class_data_dir",
                                           caption_source="txt" if d.class_prompts else None)
    task = config_check(
        "", build_finetune_task, sd, cfg, examples, class_examples=class_examples,
        batch_size=t.batch_size, seed=c.seed,
        periodic=[Periodic("grid", v.every if prompts else 0, write_grid)], finish=finish,
        config_json=config.to_json(indent=2), hyperparams=train_lib.resume_hyperparams(config),
        text_prior=text_prior, word_prior=word_prior)
    from jaxdiff.training import fit

    return fit(settings, task, mesh=mesh)
