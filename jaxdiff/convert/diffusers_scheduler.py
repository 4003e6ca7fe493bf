"""diffusers scheduler configs (``scheduler_config.json``) -> a jaxdiff schedule and sampler.

The mapping is the samplers' own: each registered :class:`~jaxdiff.samplers.SamplerSpec` with a
diffusers twin (:class:`~jaxdiff.samplers.DiffusersTwin`) declares its class name, constructor
defaults and config -> option functions; a config picks the spec whose twin's class name is its
``_class_name`` (:func:`~jaxdiff.samplers.diffusers_twins`). Every option of the class is either
mapped to a jaxdiff option, known to have no effect, or rejected with a ``ValueError`` naming it
when it holds a value jaxdiff does not implement; none is silently dropped. Missing keys take
diffusers' defaults.

Keys that are not arguments of the class are what diffusers' ``from_config`` ignores: a config
converted from another class (``EulerDiscreteScheduler.from_config(pndm.config)`` keeps PNDM's
``skip_prk_steps``; SD 1.x folders carry DDIM's ``clip_sample`` in a PNDM config), or a schedule
key the class does not take (``rescale_betas_zero_snr`` for Heun, KDPM2, LMS, PNDM, DEIS,
DPM-Solver singlestep: :attr:`~jaxdiff.samplers.DiffusersTwin.schedule_keys`). jaxdiff ignores
them too, so that it samples as diffusers does (logged at INFO level). A key that no registered
class takes is an error: jaxdiff cannot tell whether a newer diffusers reads it.

    >>> config = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
    ...           "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
    ...           "set_alpha_to_one": False, "steps_offset": 1}
    >>> schedule = schedule_from_diffusers_config(config)
    >>> sampler = sampler_from_diffusers_config(config)
    >>> sampler.name, sampler.options["steps_offset"], sampler.options["clip_x0"]
    ('ddim', 1, None)
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np

from jaxdiff.samplers.diffusers_names import (
    BETA_SCHEDULE_FROM_DIFFUSERS,
    META_KEYS,
    SCHEDULE_DEFAULTS,
)
from jaxdiff.samplers.registry import Sampler, diffusers_twins, get_sampler
from jaxdiff.samplers.spec import SamplerSpec
from jaxdiff.schedules import (
    BETA_SCHEDULES,
    Schedule,
    rescale_zero_terminal_snr,
    schedule_from_alphas_cumprod,
    schedule_from_betas,
)

__all__ = [
    "scheduler_classes",
    "scheduler_spec",
    "ignored_config_keys",
    "schedule_from_diffusers_config",
    "sampler_options_from_diffusers_config",
    "sampler_from_diffusers_config",
]

log = logging.getLogger(__name__)

# diffusers' zero-terminal-SNR floor: the last alphas_cumprod of its sigma-space schedulers.
ZERO_SNR_FLOOR = 2.0**-24


def scheduler_classes() -> tuple[str, ...]:
    """The diffusers scheduler classes jaxdiff reads (those of the registered samplers' twins),
    sorted."""
    return tuple(sorted(diffusers_twins()))


def scheduler_spec(config: Mapping[str, Any]) -> SamplerSpec:
    """The registered sampler spec whose diffusers twin is ``config["_class_name"]``.

    Raises:
      ValueError: naming ``config['_class_name']`` when no registered sampler is its twin (the
        message lists those that are), or for a config that is not a dict.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a dict (a scheduler_config.json), got {type(config)}")
    name = config.get("_class_name")
    spec = diffusers_twins().get(name)
    if spec is None:
        raise ValueError(
            f"config['_class_name'] must be one of {list(scheduler_classes())}, got {name!r}"
        )
    return spec


def _own_keys(spec: SamplerSpec) -> frozenset:
    """The keys of ``spec``'s class: its constructor arguments (schedule keys included)."""
    return frozenset(spec.diffusers.defaults) | spec.diffusers.schedule_keys


def ignored_config_keys(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The keys of ``config`` that its class does not take and diffusers ignores (keys of
    another registered scheduler class, or schedule keys the class has no argument for), sorted.

    Raises:
      ValueError: as :func:`scheduler_spec`, and naming a key that no registered class takes.
    """
    spec = scheduler_spec(config)
    own = _own_keys(spec) | META_KEYS
    vocabulary = set(SCHEDULE_DEFAULTS)
    for twin in diffusers_twins().values():
        vocabulary |= set(twin.diffusers.defaults)
    for key in config:
        if key not in own and key not in vocabulary:
            raise ValueError(f"config[{key!r}] is not an option of {spec.diffusers.class_name} "
                             "(nor of any scheduler class jaxdiff knows); it would be dropped")
    return tuple(sorted(k for k in config if k not in own))


def _filled(spec: SamplerSpec, config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with every key filled in (the class's defaults, the schedule's keys), without
    the keys the class does not take (:func:`ignored_config_keys`)."""
    twin = spec.diffusers
    own = _own_keys(spec)
    return {**SCHEDULE_DEFAULTS, **twin.schedule_defaults, **twin.defaults,
            **{k: v for k, v in config.items() if k in own}}


def _check_beta_schedule(spec: SamplerSpec, c: Mapping[str, Any]) -> None:
    twin = spec.diffusers
    if c["trained_betas"] is None and c["beta_schedule"] not in twin.beta_schedules:
        raise ValueError(f"config['beta_schedule'] = {c['beta_schedule']!r} is not implemented "
                         f"by {twin.class_name} (diffusers raises; it takes "
                         f"{list(twin.beta_schedules)})")


def schedule_from_diffusers_config(config: Mapping[str, Any]) -> Schedule:
    """The training schedule of a diffusers scheduler config.

    Reads ``num_train_timesteps``, ``beta_schedule`` (``linear``, ``scaled_linear``,
    ``squaredcos_cap_v2``, ``sigmoid``), ``beta_start``, ``beta_end``, ``trained_betas`` and
    ``rescale_betas_zero_snr`` (missing keys: the class's defaults in diffusers). With
    ``rescale_betas_zero_snr`` the classes that floor the last ``alphas_cumprod`` at ``2**-24``
    (the twin's ``zero_snr_floor``: Euler, Euler ancestral, DPM-Solver, UniPC) get that
    ``alphas_cumprod`` as diffusers sets it, with the rescaled betas
    (:func:`~jaxdiff.schedules.schedule_from_alphas_cumprod`).

    Raises:
      ValueError: naming the key, for an unsupported class or beta schedule or invalid values.
    """
    spec = scheduler_spec(config)
    c = _filled(spec, config)
    _check_beta_schedule(spec, c)
    if c["trained_betas"] is not None:
        betas = np.asarray(c["trained_betas"], np.float64)
        if betas.ndim != 1 or betas.size < 1:
            raise ValueError(f"config['trained_betas'] must be a non-empty list, got {betas.shape}")
    else:
        name = BETA_SCHEDULE_FROM_DIFFUSERS.get(c["beta_schedule"])
        if name is None:
            raise ValueError(f"config['beta_schedule'] must be one of "
                             f"{sorted(BETA_SCHEDULE_FROM_DIFFUSERS)}, got {c['beta_schedule']!r}")
        kw = {} if name == "cosine" else dict(beta_start=c["beta_start"], beta_end=c["beta_end"])
        betas = BETA_SCHEDULES[name](c["num_train_timesteps"], **kw)  # float64
    if not c["rescale_betas_zero_snr"]:
        return schedule_from_betas(betas)
    betas = rescale_zero_terminal_snr(betas)
    if not spec.diffusers.zero_snr_floor:
        return schedule_from_betas(betas)
    acp = np.cumprod(1.0 - betas)
    acp[-1] = ZERO_SNR_FLOOR  # as diffusers sets it (an infinite last sigma otherwise)
    return schedule_from_alphas_cumprod(acp, betas=betas)


def sampler_options_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The options of the sampler that ``config`` (a ``scheduler_config.json`` as a dict, with
    ``_class_name``) maps onto: its twin's config -> option functions applied to the config with
    every key filled in (the class's defaults, the schedule's keys). The training schedule is not
    an option: :func:`schedule_from_diffusers_config`.

    Raises:
      ValueError: naming the key, for an unknown class, a key no registered class takes
        (:func:`ignored_config_keys`), a value jaxdiff does not implement (the twin's
        ``must_be``, e.g. ``thresholding=True``), or conflicting flags.
    """
    spec = scheduler_spec(config)
    twin = spec.diffusers
    ignored = ignored_config_keys(config)
    if ignored:
        log.info("%s takes no %s: ignored, as diffusers ignores them", twin.class_name,
                 ", ".join(ignored))
    c = _filled(spec, config)
    _check_beta_schedule(spec, c)
    for key, allowed in twin.must_be.items():
        if c[key] not in allowed:
            raise ValueError(f"config[{key!r}] = {c[key]!r} is not supported by jaxdiff's "
                             f"{spec.name!r} sampler (supported: {allowed})")
    return {opt: fn(c) for opt, fn in twin.options.items()}


def sampler_from_diffusers_config(config: Mapping[str, Any]) -> Sampler:
    """The jaxdiff sampler (registry name + options) equivalent to a diffusers scheduler config.

    Args:
      config: a ``scheduler_config.json`` as a dict, with ``_class_name`` one of
        :func:`scheduler_classes`.

    Returns:
      A :class:`~jaxdiff.samplers.Sampler`; sample with ``sampler(model_fn, schedule, x_T, key,
      num_steps=N)`` where ``schedule = schedule_from_diffusers_config(config)``.

    Raises:
      ValueError: as :func:`sampler_options_from_diffusers_config`, and for option values the
        sampler rejects.
    """
    spec = scheduler_spec(config)
    return get_sampler(spec.name, **sampler_options_from_diffusers_config(config))
