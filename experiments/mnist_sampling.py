"""Sampling a class-conditional MNIST model: the ``config.sampling`` fields (and the command
lines' flags over a run's own), the sampler they name, classifier-free guidance, and the sharded,
jitted sample function.

Guidance is diffusers' ``guidance_scale`` formula everywhere, ``uncond + w * (cond - uncond)``:
``w = 1`` is the conditional model, ``w = 0`` the unconditional one (the null label
``model.num_classes``), ``w > 1`` classifier-free guidance. :func:`make_sample_fn` compiles two
programs at most: one for ``w == 1`` (the conditional branch only, batch ``N``) and one for every
other ``w``, which it takes as a traced argument (batch ``2N``): sampling at a new ``w`` compiles
nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.cli import ConfigError, config_check
from jaxdiff.compile_options import cpu_compiler_options
from jaxdiff.models import UNet
from jaxdiff.samplers import classifier_free_guidance, get_sampler, sampler_names, sampler_options
from jaxdiff.schedules import Schedule
from jaxdiff.sharding import batch_sharding, replicated_sharding, shard_batch
from jaxdiff.validation import check_choice, check_float, check_int, concrete

__all__ = ["IMAGE_SIZE", "DDIM_CLIP_FORMS", "sampling_config", "sampling_from_flags",
           "parse_guidance_interval", "guidance_interval", "make_sampler", "SampleFn",
           "make_sample_fn", "sample_images"]

IMAGE_SIZE = (28, 28)
# DDIM with clip_x0: re-derive eps from the clipped x0 ("consistent", use_clipped_model_output),
# or keep the model's eps as diffusers' DDIMScheduler does by default ("diffusers").
DDIM_CLIP_FORMS = ("consistent", "diffusers")
# Sampler options that have a config.sampling field of their own (or come from the run).
_OWN_FIELDS = ("prediction_type", "clip_x0", "eta", "use_clipped_model_output")


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
    name = config_check("", check_choice, "sampling.sampler", s.sampler, sampler_names())
    steps = config_check("", check_int, "sampling.num_steps", s.num_steps, 1)
    config_check("", check_float, "sampling.guidance_scale", s.guidance_scale, minimum=0.0)
    guidance_interval(s, schedule.num_timesteps)
    clip = config_check("", check_float, "sampling.clip_x0", s.clip_x0, minimum=0.0) or None
    accepted = sampler_options(name)
    options: Dict[str, Any] = {"prediction_type": prediction_type}
    if "clip_x0" in accepted:
        options["clip_x0"] = clip
    eta, form = s.get("eta"), s.get("ddim_clip")
    if eta is not None:
        eta = config_check("", check_float, "sampling.eta", eta, minimum=0.0)  # the value first
        if "eta" not in accepted:
            raise ConfigError(f"sampling.eta applies to samplers with an eta option; sampler "
                              f"{name!r} has none, so leave it unset (got {eta})")
        options["eta"] = eta
    if form is not None:
        config_check("", check_choice, "sampling.ddim_clip", form, DDIM_CLIP_FORMS)
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
    sampler = config_check(f"sampling (sampler {name!r}): ", get_sampler, name, **options)
    config_check(f"sampling.num_steps (sampler {name!r}, diffusion.num_timesteps "
          f"{schedule.num_timesteps}): ", sampler.check, schedule, steps)
    return sampler


class SampleFn:
    """``sample(variables, labels, key, guidance_scale=None) -> images`` (:func:`make_sample_fn`):
    two jitted programs, each compiled on its first use: the conditional model alone for a
    guidance scale ``w == 1``, and the guided model with ``w`` a traced argument for every other
    ``w``. A new ``w`` (other than switching to or from exactly 1) compiles nothing.

    Call arguments:
      variables: the model's variables (``{"params": ...}``), replicated.
      labels: ``[N] int32``, sharded over the mesh's ``data`` axis (``N`` a multiple of the
        device count: :func:`sample_images` pads and shards).
      key: draws ``x_T`` and the sampler's noise.
      guidance_scale: ``w``, a finite number (None: the ``sampling.guidance_scale`` the function
        was made with); ``uncond + w * (cond - uncond)``.

    Returns ``[N, 28, 28, C]`` float32, replicated (every process can read all of it).

    Raises:
      ValueError: a non-finite ``guidance_scale``.
    """

    def __init__(self, build: Callable[[bool], Callable], guidance_scale: float):
        self._build = build
        self.guidance_scale = float(guidance_scale)
        self._programs: Dict[bool, Callable] = {}

    def program(self, guided: bool) -> Callable:
        """The jitted program: ``(variables, labels, key, w)`` when ``guided``, else
        ``(variables, labels, key)`` (the conditional model, ``w == 1``)."""
        if guided not in self._programs:
            self._programs[guided] = self._build(guided)
        return self._programs[guided]

    def __call__(self, variables, labels, key, guidance_scale=None):
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        value = concrete(w)
        if value is not None:
            if np.ndim(value) != 0 or not np.isfinite(float(value)):
                raise ValueError(f"guidance_scale must be a finite number, got {w!r}")
            if float(value) == 1.0:
                return self.program(False)(variables, labels, key)
            w = np.float32(value)
        return self.program(True)(variables, labels, key, w)

    def _cache_size(self) -> int:
        """The programs compiled so far (as a jitted function's ``_cache_size``)."""
        return sum(p._cache_size() for p in self._programs.values())


def make_sample_fn(model: UNet, schedule: Schedule, mesh, sampling: ml_collections.ConfigDict,
                   prediction_type: str, sampler=None) -> SampleFn:
    """``sample(variables, labels [N] int32, key, guidance_scale=None) -> images [N, 28, 28, C]``
    (a :class:`SampleFn`): ``sampling``'s sampler (:func:`make_sampler`) with classifier-free
    guidance at ``guidance_scale`` (default ``sampling.guidance_scale``; only at the timesteps in
    ``sampling.guidance_interval`` when it is set, the conditional model elsewhere; the null label
    is ``model.config.num_classes``).

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
    steps = int(sampling.num_steps)
    interval = guidance_interval(sampling, schedule.num_timesteps)
    null_label = model.config.num_classes
    shape = IMAGE_SIZE + (model.config.in_channels,)
    repl, data = replicated_sharding(mesh), batch_sharding(mesh)

    def sample(variables, labels, key, w):
        def model_fn(x, t, c):
            return model.apply(variables, x, t, labels=c, train=False)

        guided = classifier_free_guidance(model_fn, labels, jnp.full_like(labels, null_label),
                                          w, guidance_interval=interval)
        k_init, k_sample = jax.random.split(key)
        x_T = jax.random.normal(k_init, (labels.shape[0],) + shape, jnp.float32)
        x_T = jax.lax.with_sharding_constraint(x_T, data)
        return sampler(guided, schedule, x_T, k_sample, num_steps=steps)

    def conditional(variables, labels, key):   # w == 1: the conditional branch only
        return sample(variables, labels, key, 1.0)

    def build(guided: bool) -> Callable:
        if guided:
            return jax.jit(sample, in_shardings=(repl, data, repl, repl), out_shardings=repl,
                           compiler_options=cpu_compiler_options())
        return jax.jit(conditional, in_shardings=(repl, data, repl), out_shardings=repl,
                       compiler_options=cpu_compiler_options())

    return SampleFn(build, sampling.guidance_scale)


def sample_images(sample_fn: Callable, variables, labels: Sequence[int], key: jax.Array,
                  mesh, guidance_scale: Optional[float] = None) -> np.ndarray:
    """Runs ``sample_fn`` (:func:`make_sample_fn`'s) on ``labels`` padded to a multiple of the
    device count, at ``guidance_scale`` (None: the function's own); returns numpy
    ``[N, H, W, C]``.

    Every process passes the same ``labels`` and gets all the images; each process puts its own
    contiguous share of the labels on its devices (:func:`jaxdiff.sharding.shard_batch`).
    """
    labels = np.asarray(labels, np.int32)
    n, d = len(labels), mesh.devices.size
    padded = np.concatenate([labels, np.zeros((-n) % d, np.int32)])
    share = len(padded) // jax.process_count()
    local = padded[jax.process_index() * share:(jax.process_index() + 1) * share]
    kwargs = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    out = sample_fn(variables, shard_batch({"label": local}, mesh)["label"], key, **kwargs)
    return np.asarray(jax.device_get(out))[:n]
