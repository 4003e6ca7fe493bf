"""What the MNIST command lines share: config validation, the model, schedule and train state
built from a config, the loss, the sampler and the sharded sample function, and loading a run.

A run's config (``experiments/configs/mnist.py``) has one source for each fact: the number of
classes is ``config.model.num_classes`` (labels ``0 .. num_classes - 1``; ``num_classes`` itself is
the null label of classifier-free guidance), and one root key ``jax.random.key(config.seed)`` is
split once into the init, train and sample keys (:func:`run_keys`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.cli import ConfigError
from jaxdiff.compile_options import cpu_compiler_options
from jaxdiff.data import HOW_TO_GET_MNIST
from jaxdiff.diffusion import canonical_prediction_type
from jaxdiff.losses import LOSS_TYPES, WEIGHTINGS, diffusion_loss
from jaxdiff.models import UNet, UNetConfig, init_unet, unet_param_shapes
from jaxdiff.samplers import classifier_free_guidance, get_sampler, sampler_names, sampler_options
from jaxdiff.schedules import BETA_SCHEDULES, Schedule, make_schedule
from jaxdiff.training import Checkpointer, OptimizerConfig, create_train_state, make_optimizer
from jaxdiff.sharding import (batch_sharding, check_batch_divisible, make_mesh, replicate,
                              replicated_sharding, shard_batch)
from jaxdiff.validation import check_bool, check_choice, check_float, check_int, read_json

__all__ = ["IMAGE_SIZE", "DATA_SOURCES", "DDIM_CLIP_FORMS", "Run", "validate_config",
           "validate_seed_and_data", "validate_training", "check_paths", "optimizer",
           "compat_config", "resume_hyperparams", "build_model", "build_schedule", "run_keys",
           "init_state", "make_loss_fn", "sampling_config", "parse_sampler_options",
           "make_sampler", "make_sample_fn",
           "sample_images", "load_run"]

IMAGE_SIZE = (28, 28)
DATA_SOURCES = ("auto", "local", "tfds")
# DDIM with clip_x0: re-derive eps from the clipped x0 ("consistent", use_clipped_model_output),
# or keep the model's eps as diffusers' DDIMScheduler does by default ("diffusers").
DDIM_CLIP_FORMS = ("consistent", "diffusers")


def _wrap(prefix: str, fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, a ValueError re-raised as ConfigError prefixed with ``prefix``."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise ConfigError(f"{prefix}{e}") from None


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every value of a training config (no files are touched, nothing is compiled).

    Covers ``seed``, ``data.*`` (the source; not whether the data exists), ``model.*`` (through
    ``UNetConfig``), ``diffusion.*``, ``training.*`` (including that the batch divides over the
    devices) and ``sampling.*`` (the sampler is built and its timestep grid checked against
    ``diffusion.num_timesteps``, so a bad sampling setting fails before training, not at the first
    sample grid).

    Raises:
      ConfigError: naming the first invalid field and what was expected.
    """
    c, t, s, d = config, config.training, config.sampling, config.diffusion
    validate_seed_and_data(config)
    model = build_model(config)   # UNetConfig checks model.*
    if model.config.num_classes is None:
        raise ConfigError("model.num_classes must be an int >= 1 (a class-conditional model), "
                          "got None")
    _wrap("", check_choice, "diffusion.schedule", d.schedule, sorted(BETA_SCHEDULES))
    _wrap("", check_int, "diffusion.num_timesteps", d.num_timesteps, 1)
    _wrap("diffusion.", canonical_prediction_type, d.prediction_type)
    _wrap("", check_choice, "diffusion.loss_type", d.loss_type, LOSS_TYPES)
    _wrap("", check_choice, "diffusion.weighting", d.weighting, WEIGHTINGS)
    validate_training(config)
    _wrap("", check_float, "training.cond_drop_prob", t.cond_drop_prob, minimum=0.0, maximum=1.0,
          exclusive_maximum=True)
    _wrap("", check_int, "sampling.every", s.every, 1)
    _wrap("", check_int, "sampling.per_class", s.per_class, 1)
    make_sampler(s, d.prediction_type, build_schedule(config))


def validate_seed_and_data(config: ml_collections.ConfigDict) -> None:
    """Checks ``seed`` (an int >= 0) and ``data.source`` / ``data.prefetch`` (not whether the data
    exists); ConfigError naming the field."""
    check_int("seed", config.seed, 0)
    _wrap("", check_choice, "data.source", config.data.source, DATA_SOURCES)
    _wrap("", check_int, "data.prefetch", config.data.prefetch, 1)


def validate_training(config: ml_collections.ConfigDict) -> None:
    """Checks the ``training.*`` fields that :func:`optimizer` and
    :func:`experiments.train_lib.run_training` read (sizes and intervals >= 1, the learning-rate
    schedule, ``ema_decay`` in ``[0, 1)``, ``tensorboard`` a bool) and that ``batch_size`` divides
    over the devices; ConfigError naming the field."""
    t = config.training
    for name in ("batch_size", "num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        _wrap("", check_int, f"training.{name}", t[name], 1)
    _wrap("", check_int, "training.warmup_steps", t.warmup_steps, 0)
    _wrap("", check_float, "training.learning_rate", t.learning_rate, minimum=0.0,
          exclusive_minimum=True)
    _wrap("", check_choice, "training.lr_schedule", t.lr_schedule, ("cosine", "constant"))
    for name in ("end_lr_factor", "weight_decay", "grad_clip_norm"):
        _wrap("", check_float, f"training.{name}", t[name], minimum=0.0)
    _wrap("", check_float, "training.ema_decay", t.ema_decay, minimum=0.0, maximum=1.0,
          exclusive_maximum=True)
    _wrap("", check_bool, "training.tensorboard", t.get("tensorboard", False))
    _wrap("", check_batch_divisible, t.batch_size, make_mesh())


def check_paths(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Checks, without creating anything, that ``config.data.data_dir`` (if set) exists and that
    ``workdir`` exists as a writable directory or can be created.

    Raises:
      ConfigError: naming the path and what is wrong.
    """
    data_dir = config.data.data_dir
    if data_dir and not os.path.isdir(data_dir):
        raise ConfigError(f"data.data_dir {data_dir!r} does not exist. {HOW_TO_GET_MNIST}")
    path = os.path.abspath(workdir)
    while not os.path.exists(path):  # the nearest existing ancestor decides
        path = os.path.dirname(path)
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"workdir {workdir!r} is not writable: {path!r} is not a writable "
                          "directory")


def compat_config(config: ml_collections.ConfigDict) -> Dict[str, Any]:
    """The part of the config a checkpoint must match to be resumed (with the seed: it orders the
    data). ``num_classes`` repeats ``model.num_classes`` so that runs written before it had one
    home still compare equal."""
    return json.loads(json.dumps({
        "model": config.model.to_dict(), "diffusion": config.diffusion.to_dict(),
        "num_classes": config.model.num_classes, "batch_size": config.training.batch_size,
        "seed": config.seed}))


def resume_hyperparams(config: ml_collections.ConfigDict) -> Dict[str, Any]:
    """Training settings that may change on resume (e.g. extending a run); changes are logged."""
    t = config.training
    keys = ("num_steps", "learning_rate", "warmup_steps", "lr_schedule", "end_lr_factor",
            "weight_decay", "grad_clip_norm", "ema_decay", "cond_drop_prob")
    return json.loads(json.dumps({k: t[k] for k in keys}))


def build_model(config: ml_collections.ConfigDict) -> UNet:
    """``UNet(UNetConfig(**config.model))``: lists (from JSON) become tuples, the string ``"None"``
    resets an optional field, dtype names become dtypes.

    Raises:
      ConfigError: ``UNetConfig`` rejects a field (the message names ``model.<field>``).
    """
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in config.model.to_dict().items()}
    optional = {f.name for f in dataclasses.fields(UNetConfig) if "None" in str(f.type)}
    for k in optional & fields.keys():  # "--config.model.mid_attention=None" arrives as a string
        if fields[k] in ("None", "none"):
            fields[k] = None
    for k in ("dtype", "param_dtype"):
        if isinstance(fields.get(k), str):
            fields[k] = _wrap(f"model.{k}: ", jnp.dtype, fields[k])
    try:
        return UNet(UNetConfig(**fields))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None


def build_schedule(config: ml_collections.ConfigDict) -> Schedule:
    """``make_schedule(diffusion.schedule, diffusion.num_timesteps)``."""
    return make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)


def run_keys(seed: int) -> Dict[str, jax.Array]:
    """The run's keys: ``jax.random.key(seed)`` split once into ``{"init", "train", "sample"}``
    (typed keys). ``init`` draws the parameters, ``train`` is the train state's key (each step
    folds in the step number), ``sample`` draws the grids' noise (the same every time, so that
    grids are comparable)."""
    init, train, sample = jax.random.split(jax.random.key(check_int("seed", seed, 0)), 3)
    return {"init": init, "train": train, "sample": sample}


def optimizer(config: ml_collections.ConfigDict):
    """``(tx, lr_fn)``: :func:`jaxdiff.training.make_optimizer` with ``config.training``'s
    learning rate, warm-up, schedule over ``num_steps``, weight decay and clipping."""
    t = config.training
    return make_optimizer(OptimizerConfig(
        learning_rate=t.learning_rate, warmup_steps=t.warmup_steps, total_steps=t.num_steps,
        schedule=t.lr_schedule, end_lr_factor=t.end_lr_factor, weight_decay=t.weight_decay,
        grad_clip_norm=t.grad_clip_norm))


def init_state(config: ml_collections.ConfigDict, model: UNet, mesh, *, abstract: bool = False):
    """The replicated ``TrainState`` (identical on every host: seeded), with ``(tx, lr_fn)``.

    The parameters come from ``jaxdiff.models.init_unet(model.config, run_keys(seed)["init"])``
    (host-side, nothing to compile); ``state.params`` is ``{"params": ...}``, the variables that
    ``model.apply`` takes. ``abstract=True`` computes nothing: ``state`` is then a pytree of
    ``jax.ShapeDtypeStruct`` with replicated shardings, a restore target for a checkpoint.

    Returns:
      ``(state, tx, lr_fn)``.
    """
    tx, lr_fn = optimizer(config)
    keys = run_keys(config.seed)
    if abstract:
        shapes = jax.eval_shape(lambda p: create_train_state({"params": p}, tx, keys["train"]),
                                unet_param_shapes(model.config))
        repl = replicated_sharding(mesh)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
                            shapes), tx, lr_fn
    variables = {"params": init_unet(model.config, keys["init"])}
    return replicate(create_train_state(variables, tx, keys["train"]), mesh), tx, lr_fn


def make_loss_fn(config: ml_collections.ConfigDict, model: UNet, schedule: Schedule) -> Callable:
    """``(variables, batch, key) -> (loss, aux)``: the diffusion loss of ``config.diffusion`` with
    label dropout (``training.cond_drop_prob``) to the null label ``model.num_classes``.
    ``batch``: ``{"image": [B, 28, 28, C], "label": [B] int32}``."""
    d, t = config.diffusion, config.training
    null = jnp.int32(model.config.num_classes)

    def loss_fn(variables, batch, key):
        k_loss, k_drop = jax.random.split(key)

        def apply_fn(v, x, ts, c):
            return model.apply(v, x, ts, labels=c, train=True, rngs={"dropout": k_drop})

        return diffusion_loss(apply_fn, variables, schedule, batch["image"], k_loss,
                              batch["label"], prediction_type=d.prediction_type,
                              weighting=d.weighting, loss_type=d.loss_type,
                              cond_drop_prob=t.cond_drop_prob, null_cond=null)

    return loss_fn


def sampling_config(sampler: str = "ddim", num_steps: int = 25, guidance_scale: float = 2.0, *,
                    clip_x0: float = 1.0, eta: Optional[float] = None,
                    ddim_clip: Optional[str] = None,
                    options: Optional[Dict[str, Any]] = None,
                    guidance_interval: Optional[Sequence[float]] = None
                    ) -> ml_collections.ConfigDict:
    """A ``config.sampling``-shaped ConfigDict (the fields :func:`make_sampler` reads) for the
    command lines that sample a run with settings of their own; ``options``: further keyword
    options of the sampler (e.g. ``{"spacing": "leading"}``); ``guidance_interval``: ``(t_lo,
    t_hi)`` or None (guidance at every step)."""
    interval = None if guidance_interval is None else tuple(guidance_interval)
    return ml_collections.ConfigDict(dict(sampler=sampler, num_steps=num_steps,
                                          guidance_scale=guidance_scale, clip_x0=clip_x0,
                                          eta=eta, ddim_clip=ddim_clip,
                                          options=dict(options or {}),
                                          guidance_interval=interval))


def sampling_from_flags(run_sampling: ml_collections.ConfigDict, sampler: Optional[str] = None,
                        num_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                        *, eta: Optional[float] = None, ddim_clip: Optional[str] = None,
                        options: Optional[Dict[str, Any]] = None,
                        guidance_interval: Any = None) -> ml_collections.ConfigDict:
    """A command line's sampling settings over the run's own ``config.sampling``: each flag left
    unset (None) takes the run's value, so ``sample --workdir RUN`` samples as the run's grids
    did. A ``sampler`` other than the run's starts from that sampler's defaults: the run's
    ``eta`` / ``ddim_clip`` / ``options`` belong to the run's sampler and are not carried over
    (``num_steps``, ``guidance_scale``, ``guidance_interval`` and ``clip_x0`` are).
    ``guidance_interval="all"`` guides at every step whatever the run's setting."""
    r = run_sampling
    same = sampler is None or sampler == r.sampler

    def inherit(flag, field):
        return flag if flag is not None else (r.get(field) if same else None)

    return sampling_config(
        r.sampler if sampler is None else sampler,
        r.num_steps if num_steps is None else num_steps,
        r.guidance_scale if guidance_scale is None else guidance_scale,
        clip_x0=r.clip_x0, eta=inherit(eta, "eta"), ddim_clip=inherit(ddim_clip, "ddim_clip"),
        options={**(dict(r.get("options") or {}) if same else {}), **dict(options or {})},
        guidance_interval=(r.get("guidance_interval") if guidance_interval is None
                           else None if guidance_interval == "all" else guidance_interval))


def parse_guidance_interval(text: Optional[str], name: str = "--guidance_interval"):
    """``"200,800"`` -> ``(200.0, 800.0)``; ``None`` or ``""`` -> ``None`` (the run's setting);
    ``"all"`` -> ``"all"`` (guidance at every step). ``ConfigError`` naming ``name`` otherwise."""
    if text is None or not str(text).strip():
        return None
    if str(text).strip() == "all":
        return "all"
    try:
        lo, hi = (float(v) for v in str(text).split(","))
    except ValueError:
        raise ConfigError(f"{name} must be 't_lo,t_hi' (timesteps) or 'all', got {text!r}") \
            from None
    return lo, hi


# Sampler options that have a config.sampling field of their own (or come from the run).
_OWN_FIELDS = ("prediction_type", "clip_x0", "eta", "use_clipped_model_output")


def parse_sampler_options(items: Sequence[str]) -> Dict[str, Any]:
    """``["spacing=leading", "solver_order=3"]`` -> ``{"spacing": "leading", "solver_order": 3}``:
    ints, floats, ``True`` / ``False`` / ``None`` and ``inf`` / ``-inf`` are parsed, anything else
    stays a string. ``ConfigError`` for an item without ``=``."""
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"sampler option must be key=value, got {item!r}")
        text = text.strip()
        value: Any = {"True": True, "False": False, "None": None}.get(text, text)
        if isinstance(value, str):
            for parse in (int, float):
                try:
                    value = parse(text)
                    break
                except ValueError:
                    pass
        out[key.strip()] = value
    return out


def guidance_interval(sampling: ml_collections.ConfigDict,
                      num_timesteps: int) -> Optional[tuple]:
    """``sampling.guidance_interval`` (a pair, or the text ``"t_lo,t_hi"`` a command line gives) as
    ``(t_lo, t_hi)`` floats, or None (unset: guidance at every step). ``ConfigError`` naming the
    field unless ``0 <= t_lo <= t_hi <= num_timesteps -
    1`` (an interval outside the timesteps would silently turn guidance off)."""
    value = sampling.get("guidance_interval")
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in (value.split(",") if isinstance(value, str) else value))
    except (TypeError, ValueError):
        raise ConfigError(f"sampling.guidance_interval must be None or (t_lo, t_hi), got "
                          f"{value!r}") from None
    if not 0 <= lo <= hi <= num_timesteps - 1:
        raise ConfigError(f"sampling.guidance_interval must satisfy 0 <= t_lo <= t_hi <= "
                          f"{num_timesteps - 1} (diffusion.num_timesteps - 1), got {value!r}")
    return lo, hi


def make_sampler(sampling: ml_collections.ConfigDict, prediction_type: str, schedule: Schedule):
    """The ``jaxdiff.samplers`` sampler that ``sampling`` names, checked against ``schedule``.

    Reads ``sampling.sampler`` (one of ``jaxdiff.samplers.sampler_names()``), ``num_steps``
    (checked with ``sampler.check(schedule, num_steps)``: the grid is built, nothing computed),
    ``guidance_scale`` (>= 0; checked here, applied by :func:`make_sample_fn`), ``clip_x0`` (0 =
    no clipping; applied by the samplers that clip their x0 prediction (DDIM, DDPM, DPM-Solver,
    UniPC, Heun, LCM): the sigma-space Euler, Euler ancestral and KDPM2 samplers have no such
    option, as in diffusers), and the options that only some samplers take, which must be None
    (unset) for the others: ``eta`` (>= 0) and ``ddim_clip`` (``"consistent"``, the default
    where the sampler takes ``use_clipped_model_output``, or ``"diffusers"``).
    ``guidance_interval`` (None, or ``(t_lo, t_hi)`` with ``0 <= t_lo <= t_hi <=
    num_timesteps - 1``; checked here, applied by :func:`make_sample_fn`).

    Raises:
      ConfigError: naming the ``sampling.<field>``.
    """
    s = sampling
    name = _wrap("", check_choice, "sampling.sampler", s.sampler, sampler_names())
    steps = _wrap("", check_int, "sampling.num_steps", s.num_steps, 1)
    _wrap("", check_float, "sampling.guidance_scale", s.guidance_scale, minimum=0.0)
    guidance_interval(s, schedule.num_timesteps)
    clip = _wrap("", check_float, "sampling.clip_x0", s.clip_x0, minimum=0.0) or None
    accepted = sampler_options(name)
    options: Dict[str, Any] = {"prediction_type": prediction_type}
    if "clip_x0" in accepted:
        options["clip_x0"] = clip
    eta, form = s.get("eta"), s.get("ddim_clip")
    if eta is not None:
        eta = _wrap("", check_float, "sampling.eta", eta, minimum=0.0)  # the value first
        if "eta" not in accepted:
            raise ConfigError(f"sampling.eta applies to samplers with an eta option; sampler "
                              f"{name!r} has none, so leave it unset (got {eta})")
        options["eta"] = eta
    if form is not None:
        _wrap("", check_choice, "sampling.ddim_clip", form, DDIM_CLIP_FORMS)
        if "use_clipped_model_output" not in accepted:
            raise ConfigError(f"sampling.ddim_clip applies to DDIM; sampler {name!r} does not "
                              f"take it, so leave it unset (got {form!r})")
    if "use_clipped_model_output" in accepted:
        options["use_clipped_model_output"] = clip is not None and form != "diffusers"
    extra = dict(s.get("options") or {})
    for key in extra:
        if key in _OWN_FIELDS:
            raise ConfigError(f"sampling.options.{key}: set it through its own field (or the "
                              f"run's diffusion.prediction_type), not sampling.options")
    options.update(extra)
    sampler = _wrap(f"sampling (sampler {name!r}): ", get_sampler, name, **options)
    _wrap(f"sampling.num_steps (sampler {name!r}, diffusion.num_timesteps "
          f"{schedule.num_timesteps}): ", sampler.check, schedule, steps)
    return sampler


def make_sample_fn(model: UNet, schedule: Schedule, mesh, sampling: ml_collections.ConfigDict,
                   prediction_type: str, sampler=None) -> Callable:
    """Jitted ``(variables, labels [N] int32, key) -> images [N, 28, 28, C]``: ``sampling``'s
    sampler (:func:`make_sampler`) with classifier-free guidance
    (``sampling.guidance_scale``, only at the timesteps in ``sampling.guidance_interval`` when
    it is set; the null label is ``model.config.num_classes``).

    ``key`` draws ``x_T`` and the sampler's noise. The work is sharded over the mesh's ``data``
    axis; the (small) output is replicated, so every process can read all of it, also when the
    mesh spans several hosts. ``N`` must be a multiple of the mesh size (:func:`sample_images`
    pads). ``sampler``: ``make_sampler(sampling, prediction_type, schedule)`` where the caller
    has built it already (built here when None).

    Raises:
      ConfigError: an invalid ``sampling`` field.
    """
    if sampler is None:
        sampler = make_sampler(sampling, prediction_type, schedule)
    steps, scale = int(sampling.num_steps), float(sampling.guidance_scale)
    interval = guidance_interval(sampling, schedule.num_timesteps)
    null_label = model.config.num_classes
    shape = IMAGE_SIZE + (model.config.in_channels,)

    def fn(variables, labels, key):
        def model_fn(x, t, c):
            return model.apply(variables, x, t, labels=c, train=False)

        guided = classifier_free_guidance(model_fn, labels, jnp.full_like(labels, null_label),
                                          scale, guidance_interval=interval)
        k_init, k_sample = jax.random.split(key)
        x_T = jax.random.normal(k_init, (labels.shape[0],) + shape, jnp.float32)
        x_T = jax.lax.with_sharding_constraint(x_T, batch_sharding(mesh))
        return sampler(guided, schedule, x_T, k_sample, num_steps=steps)

    repl, data = replicated_sharding(mesh), batch_sharding(mesh)
    return jax.jit(fn, in_shardings=(repl, data, repl), out_shardings=repl,
                   compiler_options=cpu_compiler_options())


def sample_images(sample_fn: Callable, variables, labels: Sequence[int], key: jax.Array,
                  mesh) -> np.ndarray:
    """Runs ``sample_fn`` on ``labels`` padded to a multiple of the device count; returns numpy
    ``[N, H, W, C]``.

    Every process passes the same ``labels`` and gets all the images; each process puts its own
    contiguous share of the labels on its devices (:func:`jaxdiff.sharding.shard_batch`).
    """
    labels = np.asarray(labels, np.int32)
    n, d = len(labels), mesh.devices.size
    padded = np.concatenate([labels, np.zeros((-n) % d, np.int32)])
    share = len(padded) // jax.process_count()
    local = padded[jax.process_index() * share:(jax.process_index() + 1) * share]
    out = sample_fn(variables, shard_batch({"label": local}, mesh)["label"], key)
    return np.asarray(jax.device_get(out))[:n]


class Run(NamedTuple):
    """A trained run loaded by :func:`load_run`."""
    config: ml_collections.ConfigDict
    model: UNet
    schedule: Schedule
    ema_params: Any      # the variables ({"params": ...}) that model.apply takes
    mesh: Any


def _read_run_config(path: str) -> ml_collections.ConfigDict:
    """``config.json``; a legacy top-level ``num_classes`` (runs written before the model held
    the only copy) must equal ``model.num_classes`` and is dropped."""
    raw = read_json(path)   # not JSON: an InvalidFileError naming the file
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object (a train_mnist config)")
    legacy = raw.pop("num_classes", None)
    model_classes = raw.get("model", {}).get("num_classes")
    if legacy is not None and legacy != model_classes:
        raise ConfigError(f"{path}: num_classes {legacy} differs from model.num_classes "
                          f"{model_classes}; the run's config is inconsistent")
    return ml_collections.ConfigDict(raw)


def load_run(workdir: str) -> Run:
    """The latest checkpoint's EMA params of a ``train_mnist`` workdir, with the run's config,
    model, schedule and a mesh over all devices.

    Raises:
      ConfigError: ``workdir`` has no ``config.json`` or no checkpoint.
    """
    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"--workdir: {cfg_path} not found: is {workdir!r} a train_mnist "
                          "workdir?")
    config = _read_run_config(cfg_path)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise ConfigError(f"--workdir: no checkpoint in {ckpt_dir}")
    mesh = make_mesh()
    model, schedule = build_model(config), build_schedule(config)
    target, _, _ = init_state(config, model, mesh, abstract=True)  # shapes only, no compute
    # The config comes from the same workdir: only shapes and optimizer structure are compared.
    ckpt = Checkpointer(ckpt_dir, None, read_only=True)
    try:
        restored = ckpt.restore_latest(target)
    finally:
        ckpt.close()
    if restored is None:
        raise ConfigError(f"--workdir: no checkpoint in {ckpt_dir}")
    return Run(config, model, schedule, restored[0].ema_params, mesh)
