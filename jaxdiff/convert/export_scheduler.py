"""A jaxdiff sampler and training schedule -> a diffusers ``scheduler_config.json`` dict: the
reverse of :func:`~jaxdiff.convert.sampler_from_diffusers_config`.

    >>> from jaxdiff.samplers import get_sampler
    >>> config = scheduler_to_diffusers(get_sampler("ddim", prediction_type="v"), "cosine", 1000)
    >>> config["_class_name"], config["beta_schedule"], config["prediction_type"]
    ('DDIMScheduler', 'squaredcos_cap_v2', 'v_prediction')

The scheduler class is the sampler's declared diffusers twin (``sampler.spec.diffusers``:
``ddim`` -> ``DDIMScheduler``, ``euler_ancestral`` -> ``EulerAncestralDiscreteScheduler``,
``dpm_solver`` and the ``dpmpp_*`` presets -> ``DPMSolverMultistepScheduler``, ...); a sampler
without one is refused, naming it. Each option becomes the config entries
:func:`~jaxdiff.samplers.diffusers_names.config_entries` gives, where they are keys of the class's
config. The result is read back with
:func:`~jaxdiff.convert.sampler_from_diffusers_config` and
:func:`~jaxdiff.convert.schedule_from_diffusers_config` and must give the same sampler (function
and every option, defaults included) and the same schedule: an option or schedule the diffusers
class cannot express (DDIM's ``eta``, which diffusers takes at call time; Euler's ``s_churn``; a
cosine schedule with another ``s``) is a ``ValueError`` naming it.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np

from jaxdiff.convert.diffusers_scheduler import (
    sampler_from_diffusers_config,
    schedule_from_diffusers_config,
)
from jaxdiff.convert.export_diffusers import DIFFUSERS_VERSION
from jaxdiff.samplers.diffusers_names import (
    BETA_SCHEDULE_TO_DIFFUSERS,
    PREDICTION_TO_DIFFUSERS,
    config_entries,
)
from jaxdiff.samplers.registry import Sampler, diffusers_twins, get_sampler
from jaxdiff.schedules import BETA_SCHEDULES, Schedule, make_schedule, schedule_from_betas

__all__ = ["scheduler_to_diffusers"]

_HINTS = {
    "eta": "diffusers takes DDIM's and TCD's eta at call time: pipe(..., eta=...)",
    "order": "diffusers takes LMS's order at call time: scheduler.step(..., order=...), which "
             "its pipelines leave at 4",
    "round_timesteps": "diffusers' DPMSolverMultistepScheduler rounds its timesteps unless "
                       "beta_schedule is squaredcos_cap_v2: set round_timesteps to match",
}


def _effective(sampler: Sampler) -> dict[str, Any]:
    """Every option of the sampler, given or default; prediction types in diffusers' names."""
    out = sampler.effective_options
    if "prediction_type" in out:
        p = out["prediction_type"]
        out["prediction_type"] = PREDICTION_TO_DIFFUSERS.get(p, p)
    return out


def _schedule_entries(schedule, num_timesteps: int, rescale: bool, kwargs: dict):
    """``(config entries, the jaxdiff Schedule they must reproduce, exact?)``."""
    if isinstance(schedule, str):
        if schedule not in BETA_SCHEDULE_TO_DIFFUSERS:
            raise ValueError(f"schedule must be one of {sorted(BETA_SCHEDULE_TO_DIFFUSERS)} (or "
                             f"betas), got {schedule!r}")
        fn = BETA_SCHEDULES[schedule]  # (the beta functions' keywords, not a sampler's)
        defaults = {k: p.default for k, p in inspect.signature(fn).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        unknown = sorted(set(kwargs) - set(defaults))
        if unknown:
            raise ValueError(f"schedule {schedule!r} takes {sorted(defaults)}, got {unknown}")
        c = {**defaults, **kwargs}
        entries: dict[str, Any] = dict(num_train_timesteps=num_timesteps,
                                       beta_schedule=BETA_SCHEDULE_TO_DIFFUSERS[schedule],
                                       trained_betas=None, rescale_betas_zero_snr=rescale)
        if schedule == "cosine":  # diffusers' squaredcos_cap_v2 fixes s and max_beta
            for key in ("s", "max_beta"):
                if c[key] != defaults[key]:
                    raise ValueError(f"{key}={c[key]!r}: diffusers' squaredcos_cap_v2 fixes "
                                     f"{key}={defaults[key]} (pass the betas instead)")
            entries.update(beta_start=0.0001, beta_end=0.02)  # unused there
        else:
            entries.update(beta_start=float(c["beta_start"]), beta_end=float(c["beta_end"]))
        target = make_schedule(schedule, num_timesteps,
                               rescale_to_zero_terminal_snr=rescale, **kwargs)
        return entries, target, True
    if kwargs:
        raise ValueError(f"schedule keyword arguments {sorted(kwargs)} need a schedule name")
    betas = np.asarray(schedule.betas if isinstance(schedule, Schedule) else schedule,
                       np.float64)
    if betas.ndim != 1 or betas.size < 1:
        raise ValueError(f"schedule: betas must be a non-empty 1-D array, got {betas.shape}")
    if rescale:
        raise ValueError("rescale_to_zero_terminal_snr=True with betas: pass the rescaled betas")
    entries = dict(num_train_timesteps=int(betas.size), beta_schedule="linear",
                   beta_start=0.0001, beta_end=0.02, trained_betas=betas.tolist(),
                   rescale_betas_zero_snr=False)
    target = schedule if isinstance(schedule, Schedule) else schedule_from_betas(betas)
    return entries, target, False


def scheduler_to_diffusers(
    sampler: Sampler | str,
    schedule: str | np.ndarray | Schedule = "linear",
    num_timesteps: int = 1000,
    *,
    rescale_to_zero_terminal_snr: bool = False,
    **schedule_kwargs: Any,
) -> dict:
    """The diffusers ``scheduler_config.json`` of a jaxdiff sampler and training schedule.

    Args:
      sampler: a :class:`~jaxdiff.samplers.Sampler` (:func:`~jaxdiff.samplers.get_sampler`) or
        a registered name (its default options).
      schedule: the training schedule as :func:`~jaxdiff.make_schedule` builds it: a name
        (``"linear"``, ``"scaled_linear"``, ``"cosine"`` -> diffusers' ``squaredcos_cap_v2``,
        ``"sigmoid"``) with ``num_timesteps``, ``rescale_to_zero_terminal_snr`` and
        ``schedule_kwargs`` (``beta_start`` / ``beta_end``); or explicit betas ``[T]`` (an array
        or a :class:`~jaxdiff.Schedule`), written as ``trained_betas`` (diffusers reads them in
        float32: its ``alphas_cumprod`` then agree to ~1e-6 relative, not bit for bit).
      num_timesteps: ``T`` of a named schedule.
      rescale_to_zero_terminal_snr: a named schedule's zero-terminal-SNR rescaling
        (``rescale_betas_zero_snr``).
      schedule_kwargs: the beta function's keywords (``beta_start``, ``beta_end``; for
        ``"cosine"`` only the defaults ``s=0.008``, ``max_beta=0.999`` are expressible).

    Returns:
      The config dict (``_class_name`` and every option of that class that the sampler sets).

    Raises:
      ValueError: naming the option: a sampler without a diffusers scheduler class; an option
        the class's config cannot express (it would load back differently); a schedule that
        does not load back as the same :class:`~jaxdiff.Schedule`.
    """
    if isinstance(sampler, str):
        sampler = get_sampler(sampler)
    if not isinstance(sampler, Sampler):
        raise ValueError(f"sampler must be a Sampler or a registered name, got {sampler!r}")
    twin = sampler.spec.diffusers
    if twin is None:
        have = sorted(s.name for s in diffusers_twins().values())
        raise ValueError(f"sampler {sampler.name!r} has no diffusers scheduler class (those with "
                         f"one: {have})")
    cls = twin.class_name
    entries, target, exact = _schedule_entries(schedule, num_timesteps,
                                               rescale_to_zero_terminal_snr, schedule_kwargs)
    if rescale_to_zero_terminal_snr and "rescale_betas_zero_snr" not in twin.schedule_keys:
        raise ValueError(f"rescale_to_zero_terminal_snr=True: {cls} has no "
                         "rescale_betas_zero_snr (diffusers ignores it there); pass the rescaled "
                         "betas instead")
    if entries["trained_betas"] is None and entries["beta_schedule"] not in twin.beta_schedules:
        raise ValueError(f"schedule {schedule!r}: {cls} does not implement beta_schedule="
                         f"{entries['beta_schedule']!r} (it takes {list(twin.beta_schedules)}); "
                         "pass the betas instead")
    entries = {k: v for k, v in entries.items() if k in twin.schedule_keys}
    config: dict[str, Any] = {"_class_name": cls, "_diffusers_version": DIFFUSERS_VERSION,
                              **twin.defaults, **entries}
    for option, value in sampler.effective_options.items():
        for key, v in config_entries(option, value).items():
            if key in twin.defaults:
                config[key] = v
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}

    # The round trip: the same sampler (spec) and options, the same schedule.
    loaded = sampler_from_diffusers_config(config)
    if loaded.spec is not sampler.spec:
        raise ValueError(f"sampler {sampler.name!r}: {cls} loads back as sampler "
                         f"{loaded.name!r} (another sampler registered as its twin)")
    given, back = _effective(sampler), _effective(loaded)
    bad = [f"{k}={given[k]!r} (loads as {back.get(k)!r})" for k in given
           if not _same_value(given[k], back.get(k))]
    if bad:
        hints = [_HINTS[k] for k in given if k in _HINTS and not _same_value(given[k], back.get(k))]
        raise ValueError(f"sampler {sampler.name!r}: {cls}'s config cannot express " +
                         "; ".join(bad) + "".join(f" ({h})" for h in hints))
    b = np.asarray(schedule_from_diffusers_config(config).alphas_cumprod)
    a = np.asarray(target.alphas_cumprod)
    same = a.shape == b.shape and (
        np.array_equal(a, b) if exact else np.allclose(a, b, rtol=1e-6, atol=0))
    if not same:
        what = ("rescale_to_zero_terminal_snr=True" if rescale_to_zero_terminal_snr
                else f"schedule {schedule if isinstance(schedule, str) else 'betas'!r}")
        raise ValueError(f"{what}: {cls} loads a different training schedule "
                         "(diffusers' schedulers of this class change it)")
    return config


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isinf(a) and math.isinf(b):
        return a == b
    return a == b and isinstance(a, bool) == isinstance(b, bool)
