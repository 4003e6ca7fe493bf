"""diffusers scheduler configs (``scheduler_config.json``) -> a jaxdiff schedule and sampler.

Every option of each supported scheduler class (diffusers 0.42) is either mapped to a jaxdiff
option, known to have no effect, or rejected with a ``ValueError`` naming it when it holds a value
jaxdiff does not implement; none is silently dropped. Missing keys take diffusers' defaults.

    >>> config = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
    ...           "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
    ...           "set_alpha_to_one": False, "steps_offset": 1}
    >>> schedule = schedule_from_diffusers_config(config)
    >>> sampler = sampler_from_diffusers_config(config)
    >>> sampler.name, sampler.options["steps_offset"], sampler.options["clip_x0"]
    ('ddim', 1, None)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import numpy as np

from jaxdiff.samplers.dpm_solver import dpm_solver_options_from_diffusers
from jaxdiff.samplers.registry import Sampler, get_sampler
from jaxdiff.schedules import (
    BETA_SCHEDULES,
    Schedule,
    rescale_zero_terminal_snr,
    schedule_from_betas,
)

__all__ = [
    "SCHEDULER_CLASSES",
    "SchedulerSpec",
    "schedule_from_diffusers_config",
    "sampler_from_diffusers_config",
]

_BETA_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear",
               "squaredcos_cap_v2": "cosine", "sigmoid": "sigmoid"}
# The keys every scheduler config has for its training schedule (read by the schedule, not the
# sampler), with diffusers' defaults.
_SCHEDULE_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, rescale_betas_zero_snr=False,
)
# Informational keys of a saved config.
_META = {"_class_name", "_diffusers_version", "_use_default_values"}


def _same(value: Any) -> Any:
    return value


def _clip(config: Mapping[str, Any]) -> float | None:
    return float(config["clip_sample_range"]) if config["clip_sample"] else None


@dataclasses.dataclass(frozen=True)
class SchedulerSpec:
    """How one diffusers scheduler class maps onto a jaxdiff sampler.

    Attributes:
      sampler: the jaxdiff registry name.
      defaults: the class's constructor defaults (besides the schedule's keys).
      options: jaxdiff option -> a function of the (defaults-filled) config giving its value.
      must_be: config key -> the values jaxdiff supports (anything else is rejected).
      no_effect: keys that cannot change the result given ``must_be`` (e.g. thresholding's
        parameters while thresholding is off).
      schedule_defaults: the class's defaults for the training schedule's keys where they differ
        from the common ones (LCM, Heun and KDPM2 default to Stable Diffusion's betas).
      convert: where the sampler module has its own mapping (``config -> options``, raising a
        ``ValueError`` naming unsupported keys), that function; ``options`` and ``must_be`` are
        then unused.
      zero_snr_floor: the class replaces a zero-terminal-SNR schedule's last ``alphas_cumprod``
        (0, an infinite sigma) by ``2**-24`` (diffusers' sigma-space schedulers do).
    """

    sampler: str
    defaults: Mapping[str, Any]
    options: Mapping[str, Callable[[Mapping[str, Any]], Any]]
    must_be: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
    no_effect: frozenset = frozenset()
    schedule_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    convert: Callable[[Mapping[str, Any]], dict] | None = None
    zero_snr_floor: bool = False


def _key(name: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda c: c[name]


_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_THRESHOLD_KEYS = frozenset({"dynamic_thresholding_ratio", "sample_max_value"})

# The options the k-diffusion family (Euler, Heun, KDPM2) shares, and their defaults.
_K_COMMON: dict[str, Callable[[Mapping[str, Any]], Any]] = dict(
    prediction_type=lambda c: _PREDICTION.get(c["prediction_type"], c["prediction_type"]),
    spacing=_key("timestep_spacing"), steps_offset=_key("steps_offset"),
)
_K_DEFAULTS: dict[str, Any] = dict(
    prediction_type="epsilon", use_karras_sigmas=False, use_exponential_sigmas=False,
    use_beta_sigmas=False, timestep_spacing="linspace", steps_offset=0,
)

SCHEDULER_CLASSES: dict[str, SchedulerSpec] = {
    "DDIMScheduler": SchedulerSpec(
        sampler="ddim",
        defaults=dict(clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                      prediction_type="epsilon", thresholding=False,
                      dynamic_thresholding_ratio=0.995, clip_sample_range=1.0,
                      sample_max_value=1.0, timestep_spacing="leading"),
        options=dict(clip_x0=_clip, set_alpha_to_one=_key("set_alpha_to_one"),
                     steps_offset=_key("steps_offset"), spacing=_key("timestep_spacing"),
                     prediction_type=lambda c: _PREDICTION.get(c["prediction_type"],
                                                               c["prediction_type"])),
        must_be=dict(thresholding=(False,)),
        no_effect=_THRESHOLD_KEYS,
    ),
    "DDPMScheduler": SchedulerSpec(
        sampler="ddpm",
        defaults=dict(variance_type="fixed_small", clip_sample=True, prediction_type="epsilon",
                      thresholding=False, dynamic_thresholding_ratio=0.995,
                      clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading",
                      steps_offset=0),
        options=dict(clip_x0=_clip, variance_type=_key("variance_type"),
                     steps_offset=_key("steps_offset"), spacing=_key("timestep_spacing"),
                     prediction_type=lambda c: _PREDICTION.get(c["prediction_type"],
                                                               c["prediction_type"])),
        must_be=dict(thresholding=(False,)),
        no_effect=_THRESHOLD_KEYS,
    ),
    "LCMScheduler": SchedulerSpec(
        sampler="lcm",
        defaults=dict(original_inference_steps=50, clip_sample=False, clip_sample_range=1.0,
                      set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
                      thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                      timestep_spacing="leading", timestep_scaling=10.0),
        options=dict(original_inference_steps=_key("original_inference_steps"),
                     timestep_scaling=lambda c: float(c["timestep_scaling"]), clip_x0=_clip,
                     prediction_type=lambda c: _PREDICTION.get(c["prediction_type"],
                                                               c["prediction_type"])),
        must_be=dict(thresholding=(False,)),
        # LCMScheduler reads none of these (its grid comes from original_inference_steps).
        no_effect=_THRESHOLD_KEYS | {"set_alpha_to_one", "steps_offset", "timestep_spacing"},
        schedule_defaults=dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    ),
    "DPMSolverMultistepScheduler": SchedulerSpec(
        sampler="dpm_solver",
        defaults=dict(solver_order=2, prediction_type="epsilon", thresholding=False,
                      dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                      algorithm_type="dpmsolver++", solver_type="midpoint",
                      lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
                      use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False,
                      use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
                      lambda_min_clipped=-math.inf, variance_type=None,
                      timestep_spacing="linspace", steps_offset=0, use_dynamic_shifting=False,
                      time_shift_type="exponential"),
        options={},
        convert=dpm_solver_options_from_diffusers,
        zero_snr_floor=True,
        no_effect=_THRESHOLD_KEYS | {"flow_shift", "time_shift_type"},
    ),
    "UniPCMultistepScheduler": SchedulerSpec(
        sampler="unipc",
        defaults=dict(solver_order=2, prediction_type="epsilon", thresholding=False,
                      dynamic_thresholding_ratio=0.995, sample_max_value=1.0, predict_x0=True,
                      solver_type="bh2", lower_order_final=True, disable_corrector=[],
                      solver_p=None, use_karras_sigmas=False, use_exponential_sigmas=False,
                      use_beta_sigmas=False, use_flow_sigmas=False, flow_shift=1.0,
                      timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero",
                      use_dynamic_shifting=False, time_shift_type="exponential", sigma_min=None,
                      sigma_max=None, shift_terminal=None),
        options=dict(
            solver_order=_key("solver_order"),
            # diffusers rewrites the DPM-Solver names to bh2 (with a warning)
            solver_type=lambda c: "bh2" if c["solver_type"] in ("midpoint", "heun", "logrho")
            else c["solver_type"],
            predict_x0=_key("predict_x0"),
            prediction_type=lambda c: _PREDICTION.get(c["prediction_type"],
                                                      c["prediction_type"]),
            spacing=_key("timestep_spacing"), steps_offset=_key("steps_offset"),
            sigma_schedule=lambda c: _sigma_flags(c, "UniPCMultistepScheduler"),
            lower_order_final=_key("lower_order_final"),
            final_sigmas_type=_key("final_sigmas_type"),
            disable_corrector=lambda c: tuple(c["disable_corrector"] or ())),
        must_be=dict(thresholding=(False,), use_flow_sigmas=(False,), solver_p=(None,),
                     use_dynamic_shifting=(False,), shift_terminal=(None,), sigma_min=(None,),
                     sigma_max=(None,)),
        no_effect=_THRESHOLD_KEYS | {"flow_shift", "time_shift_type"},
        zero_snr_floor=True,
    ),
    "EulerDiscreteScheduler": SchedulerSpec(
        sampler="euler",
        defaults=dict(prediction_type="epsilon", interpolation_type="linear",
                      use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                      sigma_min=None, sigma_max=None, timestep_spacing="linspace",
                      timestep_type="discrete", steps_offset=0, final_sigmas_type="zero"),
        options=dict(_K_COMMON, sigma_schedule=lambda c: _sigma_flags(c, "EulerDiscreteScheduler"),
                     final_sigmas_type=_key("final_sigmas_type"), sigma_min=_key("sigma_min"),
                     sigma_max=_key("sigma_max")),
        must_be=dict(interpolation_type=("linear",), timestep_type=("discrete",)),
        zero_snr_floor=True,
    ),
    "EulerAncestralDiscreteScheduler": SchedulerSpec(
        sampler="euler_ancestral",
        defaults=dict(prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0),
        options=dict(_K_COMMON),
        zero_snr_floor=True,
    ),
    "HeunDiscreteScheduler": SchedulerSpec(
        sampler="heun",
        defaults=dict(_K_DEFAULTS, clip_sample=False, clip_sample_range=1.0),
        options=dict(_K_COMMON, sigma_schedule=lambda c: _sigma_flags(c, "HeunDiscreteScheduler"),
                     clip_x0=_clip),
        schedule_defaults=dict(beta_start=0.00085, beta_end=0.012),
    ),
    "KDPM2DiscreteScheduler": SchedulerSpec(
        sampler="kdpm2",
        defaults=dict(_K_DEFAULTS),
        options=dict(_K_COMMON, sigma_schedule=lambda c: _sigma_flags(c, "KDPM2DiscreteScheduler")),
        schedule_defaults=dict(beta_start=0.00085, beta_end=0.012),
    ),
    "KDPM2AncestralDiscreteScheduler": SchedulerSpec(
        sampler="kdpm2_ancestral",
        defaults=dict(_K_DEFAULTS),
        options=dict(_K_COMMON, sigma_schedule=lambda c: _sigma_flags(
            c, "KDPM2AncestralDiscreteScheduler")),
        schedule_defaults=dict(beta_start=0.00085, beta_end=0.012),
    ),
}


def _sigma_flags(config: Mapping[str, Any], cls: str) -> str:
    """``sigma_schedule`` from diffusers' ``use_{karras,exponential,beta}_sigmas`` flags."""
    flags = [f for f in ("karras", "exponential", "beta") if config.get(f"use_{f}_sigmas")]
    if len(flags) > 1:
        raise ValueError(f"config sets {', '.join(f'use_{f}_sigmas' for f in flags)}; {cls} "
                         f"takes at most one")
    return flags[0] if flags else "discrete"


def _class_name(config: Mapping[str, Any]) -> str:
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a dict (a scheduler_config.json), got {type(config)}")
    name = config.get("_class_name")
    if name not in SCHEDULER_CLASSES:
        raise ValueError(
            f"config['_class_name'] must be one of {sorted(SCHEDULER_CLASSES)}, got {name!r}"
        )
    return name


def schedule_from_diffusers_config(config: Mapping[str, Any]) -> Schedule:
    """The training schedule of a diffusers scheduler config.

    Reads ``num_train_timesteps``, ``beta_schedule`` (``linear``, ``scaled_linear``,
    ``squaredcos_cap_v2``, ``sigmoid``), ``beta_start``, ``beta_end``, ``trained_betas`` and
    ``rescale_betas_zero_snr`` (missing keys: the class's defaults in diffusers).

    Raises:
      ValueError: naming the key, for an unsupported class or beta schedule or invalid values.
    """
    spec = SCHEDULER_CLASSES[_class_name(config)]
    c = {**_SCHEDULE_DEFAULTS, **spec.schedule_defaults,
         **{k: v for k, v in config.items() if k in _SCHEDULE_DEFAULTS}}
    if c["trained_betas"] is not None:
        betas = np.asarray(c["trained_betas"], np.float64)
        if betas.ndim != 1 or betas.size < 1:
            raise ValueError(f"config['trained_betas'] must be a non-empty list, got {betas.shape}")
    else:
        name = _BETA_NAMES.get(c["beta_schedule"])
        if name is None:
            raise ValueError(f"config['beta_schedule'] must be one of {sorted(_BETA_NAMES)}, got "
                             f"{c['beta_schedule']!r}")
        kw = {} if name == "cosine" else dict(beta_start=c["beta_start"], beta_end=c["beta_end"])
        betas = BETA_SCHEDULES[name](c["num_train_timesteps"], **kw)  # float64
    if c["rescale_betas_zero_snr"]:
        betas = rescale_zero_terminal_snr(betas)
        if spec.zero_snr_floor:  # abar_{T-1} = 2**-24 instead of 0, as diffusers sets it
            acp_prev = np.prod(1.0 - betas[:-1])
            betas = np.concatenate([betas[:-1], [1.0 - 2.0**-24 / acp_prev]])
    return schedule_from_betas(betas)


def sampler_from_diffusers_config(config: Mapping[str, Any]) -> Sampler:
    """The jaxdiff sampler (registry name + options) equivalent to a diffusers scheduler config.

    Args:
      config: a ``scheduler_config.json`` as a dict, with ``_class_name`` one of
        :data:`SCHEDULER_CLASSES`.

    Returns:
      A :class:`~jaxdiff.samplers.Sampler`; sample with ``sampler(model_fn, schedule, x_T, key,
      num_steps=N)`` where ``schedule = schedule_from_diffusers_config(config)``.

    Raises:
      ValueError: naming the key, for an unknown class, an unknown key, or a value jaxdiff does
        not implement (e.g. ``thresholding=True``).
    """
    spec = SCHEDULER_CLASSES[_class_name(config)]
    known = set(spec.defaults) | set(_SCHEDULE_DEFAULTS) | _META
    for key in config:
        if key not in known:
            raise ValueError(f"config[{key!r}] is not an option of {config['_class_name']} that "
                             f"jaxdiff knows; it would be dropped")
    if spec.convert is not None:
        options = spec.convert({k: v for k, v in config.items() if k not in _META})
        return get_sampler(spec.sampler, **options)
    c = {**spec.defaults, **{k: v for k, v in config.items() if k in spec.defaults}}
    for key, allowed in spec.must_be.items():
        if c[key] not in allowed:
            raise ValueError(f"config[{key!r}] = {c[key]!r} is not supported by jaxdiff's "
                             f"{spec.sampler!r} sampler (supported: {allowed})")
    return get_sampler(spec.sampler, **{opt: fn(c) for opt, fn in spec.options.items()})
