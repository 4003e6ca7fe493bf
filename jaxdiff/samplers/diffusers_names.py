"""diffusers' scheduler-config names, in one place: the pieces the samplers' diffusers twins
(:class:`~jaxdiff.samplers.spec.DiffusersTwin`) are written with, and the generic inverse that the
scheduler export uses. Pure data and functions of plain dicts: nothing here imports torch or
diffusers.

    >>> prediction_option({"prediction_type": "v_prediction"})
    'v'
    >>> sigma_schedule_option({"use_karras_sigmas": True}, "EulerDiscreteScheduler")
    'karras'
    >>> config_entries("clip_x0", 1.5)
    {'clip_sample': True, 'clip_sample_range': 1.5}

A config function (``config -> option value``) reads a config whose every key is filled in:
the class's constructor defaults (:attr:`DiffusersTwin.defaults`) and the training schedule's
keys (:data:`SCHEDULE_DEFAULTS`, with :attr:`DiffusersTwin.schedule_defaults`) under the given
config.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

__all__ = [
    "PREDICTION_FROM_DIFFUSERS",
    "PREDICTION_TO_DIFFUSERS",
    "BETA_SCHEDULE_FROM_DIFFUSERS",
    "BETA_SCHEDULE_TO_DIFFUSERS",
    "SCHEDULE_DEFAULTS",
    "SCHEDULE_KEYS_NO_RESCALE",
    "BETA_SCHEDULES_COMMON",
    "META_KEYS",
    "THRESHOLD_KEYS",
    "SIGMA_FLAGS",
    "K_DIFFUSION_DEFAULTS",
    "K_DIFFUSION_OPTIONS",
    "config_key",
    "prediction_option",
    "clip_option",
    "sigma_schedule_option",
    "config_entries",
]

ConfigFn = Callable[[Mapping[str, Any]], Any]

# diffusers' prediction_type names <-> jaxdiff's (jaxdiff accepts both spellings).
PREDICTION_FROM_DIFFUSERS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
PREDICTION_TO_DIFFUSERS = {v: k for k, v in PREDICTION_FROM_DIFFUSERS.items()}
# diffusers' beta_schedule names <-> jaxdiff's make_schedule names.
BETA_SCHEDULE_FROM_DIFFUSERS = {"linear": "linear", "scaled_linear": "scaled_linear",
                                "squaredcos_cap_v2": "cosine", "sigmoid": "sigmoid"}
BETA_SCHEDULE_TO_DIFFUSERS = {v: k for k, v in BETA_SCHEDULE_FROM_DIFFUSERS.items()}
# The keys every scheduler config has for its training schedule (read by the schedule, not the
# sampler), with diffusers' common defaults (a twin's ``schedule_defaults`` overrides them).
SCHEDULE_DEFAULTS: Mapping[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, rescale_betas_zero_snr=False,
)
# The training-schedule keys of a class without zero-terminal-SNR rescaling (Heun, KDPM2, LMS,
# PNDM, DEIS, DPM-Solver singlestep in diffusers 0.42): diffusers ignores the key there.
SCHEDULE_KEYS_NO_RESCALE = frozenset(SCHEDULE_DEFAULTS) - {"rescale_betas_zero_snr"}
# The beta_schedule values every class implements (DDPM also takes "sigmoid"; the others raise
# NotImplementedError for it).
BETA_SCHEDULES_COMMON = ("linear", "scaled_linear", "squaredcos_cap_v2")
# Informational keys of a saved config.
META_KEYS = frozenset({"_class_name", "_diffusers_version", "_use_default_values"})
# Dynamic thresholding's parameters: no effect while ``thresholding`` is off.
THRESHOLD_KEYS = frozenset({"dynamic_thresholding_ratio", "sample_max_value"})
# sigma_schedule value -> the diffusers flag that selects it.
SIGMA_FLAGS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas",
               "beta": "use_beta_sigmas", "lu": "use_lu_lambdas"}


def config_key(name: str) -> ConfigFn:
    """The config function reading key ``name`` unchanged."""
    return lambda config: config[name]


def prediction_option(config: Mapping[str, Any]) -> str:
    """``prediction_type`` in jaxdiff's spelling (``"epsilon"`` -> ``"eps"``, ...); an unknown
    name passes through (the sampler then rejects it, naming it)."""
    value = config["prediction_type"]
    return PREDICTION_FROM_DIFFUSERS.get(value, value)


def clip_option(config: Mapping[str, Any]) -> float | None:
    """``clip_x0`` from ``clip_sample`` / ``clip_sample_range``."""
    return float(config["clip_sample_range"]) if config["clip_sample"] else None


def sigma_schedule_option(config: Mapping[str, Any], class_name: str, *,
                          lu: bool = False) -> str:
    """``sigma_schedule`` from ``use_{karras,exponential,beta}_sigmas`` (and, with ``lu``,
    ``use_lu_lambdas``, which Karras overrides and which overrides the other two, as
    ``DPMSolverMultistepScheduler.set_timesteps`` orders them).

    Raises:
      ValueError: naming the flags when more than one of the three ``use_*_sigmas`` is set.
    """
    flags = [f for f in ("karras", "exponential", "beta") if config.get(SIGMA_FLAGS[f])]
    if len(flags) > 1:
        raise ValueError(f"config sets {', '.join(SIGMA_FLAGS[f] for f in flags)}; "
                         f"{class_name} takes at most one")
    if lu and config.get(SIGMA_FLAGS["lu"]) and flags != ["karras"]:
        return "lu"
    return flags[0] if flags else "discrete"


# The k-diffusion family's (Euler, Heun, KDPM2, ...) shared constructor defaults and options.
K_DIFFUSION_DEFAULTS: Mapping[str, Any] = dict(
    prediction_type="epsilon", use_karras_sigmas=False, use_exponential_sigmas=False,
    use_beta_sigmas=False, timestep_spacing="linspace", steps_offset=0,
)
K_DIFFUSION_OPTIONS: Mapping[str, ConfigFn] = dict(
    prediction_type=prediction_option, spacing=config_key("timestep_spacing"),
    steps_offset=config_key("steps_offset"),
)


def config_entries(option: str, value: Any) -> dict[str, Any]:
    """The config entries that express one sampler option, the inverse of the functions above:
    ``prediction_type`` (diffusers' name), ``spacing`` (``timestep_spacing``), ``clip_x0``
    (``clip_sample`` and ``clip_sample_range``), ``sigma_schedule`` (every ``use_*`` flag),
    ``disable_corrector`` (a list); any other option is the config key of the same name. The
    export keeps the entries that are keys of the class's config and checks the round trip."""
    if option == "prediction_type":
        return {"prediction_type": PREDICTION_TO_DIFFUSERS.get(value, value)}
    if option == "spacing":
        return {"timestep_spacing": value}
    if option == "clip_x0":
        return ({"clip_sample": False} if value is None
                else {"clip_sample": True, "clip_sample_range": float(value)})
    if option == "sigma_schedule":
        return {flag: value == name for name, flag in SIGMA_FLAGS.items()}
    if option == "disable_corrector":
        return {"disable_corrector": list(value or ())}
    return {option: value}
