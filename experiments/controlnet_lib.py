"""Training a ControlNet on a frozen diffusers Stable Diffusion folder
(``experiments/configs/train_controlnet.py``) on the one training loop: the config mapped onto
:mod:`jaxdiff.finetune` (mode ``"controlnet"``) and :class:`jaxdiff.training.TrainerSettings`,
the pairs read with :func:`jaxdiff.data.read_controlnet_folder`, the sample grids of fixed
validation pairs, and the export of the ControlNet as a diffusers ``ControlNetModel`` folder.

Order of work, so that a refused run writes nothing: the config is checked, the model and the
starting ControlNet loaded and matched, the pairs read and checked, and a workdir's checkpoint
compared with this run (another model, mode, ControlNet or batch is refused); then
``WORKDIR/controlnet_config.json`` (the ControlNet's diffusers config, for
:func:`export_from_workdir`) is written and :func:`jaxdiff.training.fit` runs.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Tuple

import jax
import ml_collections
import numpy as np

from experiments import train_lib
from experiments.cli import ConfigError, config_check
from experiments.finetune_lib import refuse_other_runs
from experiments.images import save_grid
from jaxdiff.finetune import (CONTROLNET_DIR, FinetuneConfig, Objective, build_controlnet_task,
                              check_controlnet_for, controlnet_compat, export_trained_controlnet,
                              new_controlnet, sample_controlnet)
from jaxdiff.models.controlnet import controlnet_param_shapes
from jaxdiff.training import Periodic, TrainerSettings, make_optimizer
from jaxdiff.validation import check_bool, check_float, check_int

__all__ = ["CONTROLNET_CONFIG_FILE", "validate_config", "finetune_config", "load_start",
           "read_examples", "train", "export_from_workdir"]

CONTROLNET_CONFIG_FILE = "controlnet_config.json"


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every field that needs no model or data (ConfigError naming the field)."""
    c = config
    train_lib.validate_training(config)
    config_check("", check_int, "seed", c.seed, 0)
    config_check("", check_int, "training.accumulate_steps", c.training.accumulate_steps, 1)
    config_check("", check_bool, "training.use_ema", c.training.use_ema)
    if c.controlnet.conditioning_channels not in (1, 3):
        raise ConfigError(f"controlnet.conditioning_channels must be 1 or 3, got "
                          f"{c.controlnet.conditioning_channels!r}")
    config_check("", check_int, "data.resolution", c.data.resolution, 0)
    for name in ("caption_column", "conditioning_column"):
        if not isinstance(c.data[name], str) or not c.data[name]:
            raise ConfigError(f"data.{name} must be a non-empty string, got {c.data[name]!r}")
    config_check("", check_int, "data.prefetch", c.data.prefetch, 1)
    v = c.validation
    for name, low in (("num_pairs", 0), ("per_pair", 1), ("every", 0), ("num_steps", 1)):
        config_check("", check_int, f"validation.{name}", v[name], low)
    config_check("", check_float, "validation.guidance_scale", v.guidance_scale)
    config_check("", check_bool, "export", c.export)
    finetune_config(config, "epsilon")


def finetune_config(config: ml_collections.ConfigDict, prediction_type: str) -> FinetuneConfig:
    """The library's ``FinetuneConfig(mode="controlnet", ...)`` of ``config`` (ConfigError
    naming the field)."""
    c = config
    objective = config_check("objective.", Objective, prediction_type=prediction_type,
                             snr_gamma=c.objective.snr_gamma,
                             noise_offset=c.objective.noise_offset)
    try:
        return FinetuneConfig(mode="controlnet", compute_dtype=c.memory.compute_dtype,
                              remat=c.memory.remat, cache=c.memory.cache,
                              random_flip=c.data.random_flip, objective=objective)
    except ValueError as e:
        msg = str(e)
        field = re.match(r"\w*", msg).group(0)
        raise ConfigError(_SECTIONS.get(field, "") + msg) from None


_SECTIONS = {"compute_dtype": "memory.", "cache": "memory.", "remat": "memory.",
             "random_flip": "data."}


def load_start(config: ml_collections.ConfigDict, sd, controlnet: str):
    """The ControlNet to start from: the folder ``controlnet`` (:func:`jaxdiff.pipelines.
    load_controlnet`), or a new one copied from ``sd``'s UNet
    (:func:`jaxdiff.finetune.new_controlnet`, its conditioning network drawn from
    ``fold_in(key(seed), 0)``). ConfigError if it does not load or does not fit ``sd``."""
    if controlnet:
        from jaxdiff.pipelines import load_controlnet

        try:
            pair = load_controlnet(controlnet)
        except ValueError as e:
            raise ConfigError(f"--controlnet: {e}") from None
    else:
        pair = new_controlnet(sd, jax.random.fold_in(jax.random.key(config.seed), 0),
                              conditioning_channels=config.controlnet.conditioning_channels)
    try:
        check_controlnet_for(sd, pair[0])
    except ValueError as e:
        raise ConfigError(f"--controlnet {controlnet}: {e}" if controlnet else str(e)) from None
    return pair


def read_examples(config: ml_collections.ConfigDict, sd, data: str,
                  channels: int) -> Tuple[Dict[str, np.ndarray], list]:
    """``(examples, captions)`` of the pairs folder ``data``: ``pixel_values``, ``input_ids``
    and ``conditioning_pixel_values`` (``channels`` channels). ConfigError naming ``--data``."""
    from jaxdiff.data import (load_conditioning_images, load_images, read_controlnet_folder,
                              tokenize_captions)

    c = config.data
    resolution = c.resolution or sd.sample_size * sd.vae_scale_factor
    if resolution % sd.vae_scale_factor:
        raise ConfigError(f"data.resolution {resolution} must be a multiple of the VAE's factor "
                          f"{sd.vae_scale_factor}")
    try:
        folder = read_controlnet_folder(data, conditioning_column=c.conditioning_column,
                                        caption_column=c.caption_column)
        ids = tokenize_captions(sd.tokenizer, folder.images.captions, folder.images.files)
        images = load_images(folder.images, resolution, True)
        cond = load_conditioning_images(folder, resolution, channels)
    except ValueError as e:
        raise ConfigError(f"--data: {e}") from None
    return ({"pixel_values": images, "input_ids": ids, "conditioning_pixel_values": cond},
            list(folder.images.captions))


def _rgb(images: np.ndarray) -> np.ndarray:
    """``[N, H, W, C]`` in ``[-1, 1]`` -> 3 channels (grey repeated)."""
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def train(config: ml_collections.ConfigDict, model: str, data: str, workdir: str,
          controlnet: str = "") -> Dict[str, Any]:
    """Trains (or resumes) a ControlNet for the Stable Diffusion folder ``model`` on the pairs
    folder ``data`` in ``workdir``, starting from the ControlNet folder ``controlnet`` (``""``:
    a new one). Returns :func:`jaxdiff.training.fit`'s summary with ``controlnet_dir`` /
    ``export_bytes`` (None until the run finishes, or without ``export``).

    Raises:
      ConfigError: an invalid field, model / ControlNet / pairs folder or path (nothing
        written).
      jaxdiff.training.IncompatibleCheckpointError: ``workdir`` holds a run of another model,
        mode, ControlNet or setting (nothing written).
    """
    validate_config(config)
    c, t, v = config, config.training, config.validation
    if not os.path.isdir(data):
        raise ConfigError(f"--data: {data!r} is not a folder")
    train_lib.check_paths(ml_collections.ConfigDict({"data": {"data_dir": ""}}), workdir)
    train_lib.check_tensorboard_available(config)
    mesh = train_lib.make_train_mesh(config)
    from jaxdiff.pipelines import load_stable_diffusion

    try:
        sd = load_stable_diffusion(model)
    except ValueError as e:
        raise ConfigError(f"--model: {e}") from None
    cfg = finetune_config(config, sd.prediction_type)
    start = load_start(config, sd, controlnet)
    cn_config = start[0]
    examples, captions = read_examples(config, sd, data, cn_config.conditioning_channels)
    n = len(captions)
    if t.batch_size > n:
        raise ConfigError(f"training.batch_size {t.batch_size} is larger than the {n} pair(s) "
                          f"in --data {data!r} (each step takes batch_size distinct pairs)")
    if t.batch_size % t.accumulate_steps:
        raise ConfigError(f"training.accumulate_steps {t.accumulate_steps} must divide "
                          f"training.batch_size {t.batch_size}")
    workdir = os.path.abspath(workdir)
    settings = config_check(
        "training.", TrainerSettings, workdir=workdir, num_steps=t.num_steps,
        batch_size=t.batch_size, optimizer=train_lib.optimizer_config(config),
        ema_decay=t.ema_decay, log_every=t.log_every, checkpoint_every=t.checkpoint_every,
        keep_checkpoints=t.keep_checkpoints, fsdp=t.fsdp, prefetch=c.data.prefetch,
        tensorboard=t.tensorboard, accumulate_steps=t.accumulate_steps)
    k = min(v.num_pairs, n)
    prompts = [captions[i] for i in range(k) for _ in range(v.per_pair)]
    controls = np.repeat(examples["conditioning_pixel_values"][:k], v.per_pair, axis=0)
    base: list = []

    def trained(state):
        return (state.ema_params if t.use_ema else state.params)["controlnet"]

    def write_grid(step, state):
        kw = dict(seed=c.seed, num_steps=v.num_steps, guidance_scale=v.guidance_scale)
        if not base:   # the frozen model alone, once: the same noise as every grid's samples
            base.append(sample_controlnet(sd, None, prompts, None, **kw))
        steered = sample_controlnet(sd, (cn_config, trained(state)), prompts, controls, **kw)
        if jax.process_index() != 0:
            return None
        to_pm1 = lambda u8: _rgb(u8.astype(np.float32) / 127.5 - 1.0)  # noqa: E731
        ctrl = _rgb(controls[::v.per_pair] * 2.0 - 1.0)
        shape = (k, v.per_pair) + base[0].shape[1:3] + (3,)
        rows = np.concatenate([ctrl[:, None], to_pm1(base[0]).reshape(shape),
                               to_pm1(steered).reshape(shape)], axis=1)
        path = os.path.join(workdir, "samples", f"step_{step:06d}.png")
        save_grid(rows.reshape((-1,) + rows.shape[2:]), path, ncols=rows.shape[1])
        with open(os.path.join(workdir, "samples", f"step_{step:06d}.txt"), "w") as f:
            f.write(f"rows: {k} validation pairs; columns: control | {v.per_pair} without the "
                    f"ControlNet | {v.per_pair} with it (the same noise)\n"
                    + "\n".join(captions[:k]) + "\n")
        return path

    def finish(state, summary):
        done = not summary["stopped_by_signal"] and summary["end_step"] >= t.num_steps
        if done and c.export:
            return export_trained_controlnet(os.path.join(workdir, CONTROLNET_DIR), cn_config,
                                             trained(state))
        return {"controlnet_dir": None, "export_bytes": None}

    compat = controlnet_compat(sd, cfg, start, batch_size=t.batch_size, seed=c.seed,
                               example_shape=np.shape(examples["pixel_values"])[1:])
    refuse_other_runs(workdir, compat, {"controlnet": controlnet_param_shapes(cn_config)},
                      make_optimizer(settings.optimizer)[0])
    task = config_check(
        "", build_controlnet_task, sd, cfg, start, examples, batch_size=t.batch_size,
        seed=c.seed, periodic=[Periodic("grid", v.every if k else 0, write_grid)],
        finish=finish, config_json=config.to_json(indent=2),
        hyperparams=train_lib.resume_hyperparams(config))
    from jaxdiff.convert.export_controlnet import controlnet_config_to_diffusers
    from jaxdiff.training import fit

    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, CONTROLNET_CONFIG_FILE), "w") as f:
            json.dump(controlnet_config_to_diffusers(cn_config), f, indent=2, sort_keys=True)
    return fit(settings, task, mesh=mesh)


def export_from_workdir(workdir: str, out: str = "") -> Dict[str, Any]:
    """Exports the latest checkpoint of the ControlNet run in ``workdir`` (finished or not) as a
    diffusers ``ControlNetModel`` folder ``out`` (``""``: ``WORKDIR/controlnet``): the EMA
    params if the run's config says ``training.use_ema``. Returns ``{"controlnet_dir",
    "export_bytes", "step"}``.

    Raises:
      ConfigError: ``workdir`` is not a ControlNet run (no ``config.json`` /
        ``controlnet_config.json``) or has no checkpoint.
      jaxdiff.training.CheckpointError: its latest checkpoint cannot be read.
    """
    from jaxdiff.convert.diffusers_controlnet import controlnet_config_from_diffusers
    from jaxdiff.training import Checkpointer, abstract_train_state

    paths = {name: os.path.join(workdir, name) for name in ("config.json",
                                                             CONTROLNET_CONFIG_FILE)}
    for name, path in paths.items():
        if not os.path.isfile(path):
            raise ConfigError(f"--workdir {workdir!r} has no {name}: not a train_controlnet run")
    with open(paths["config.json"]) as f:
        config = ml_collections.ConfigDict(json.load(f))
    with open(paths[CONTROLNET_CONFIG_FILE]) as f:
        cn_config = controlnet_config_from_diffusers(json.load(f))
    shapes = {"controlnet": controlnet_param_shapes(cn_config)}
    tx = make_optimizer(train_lib.optimizer_config(config))[0]
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), None, read_only=True)
    try:
        restored = ckpt.restore_latest(abstract_train_state(shapes, tx, jax.random.key(0), mesh))
    finally:
        ckpt.close()
    if restored is None:
        raise ConfigError(f"--workdir {workdir!r} has no checkpoint to export")
    state, _, step = restored
    params = (state.ema_params if config.training.use_ema else state.params)["controlnet"]
    out = export_trained_controlnet(out or os.path.join(workdir, CONTROLNET_DIR), cn_config,
                                    params)
    return dict(out, step=int(step))
