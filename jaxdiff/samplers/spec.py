"""A sampler's facts, declared once: :class:`SamplerSpec` (and its :class:`DiffusersTwin`).

Each sampler file ends with the spec of each sampler it defines, e.g. (``jaxdiff/samplers/
ddim.py``)::

    DDIM = SamplerSpec(
        name="ddim", sample=ddim_sample, grid=_grid,
        options=dict(eta=0.0, spacing="leading", ...),   # every keyword option, with its default
        noise_space="alphas_cumprod", stochastic=lambda o: o["eta"] > 0,
        diffusers=DiffusersTwin("DDIMScheduler", defaults=..., options=...),
    )
    SPECS = (DDIM,)

and the registry (:mod:`jaxdiff.samplers.registry`), image-to-image
(:mod:`jaxdiff.samplers.img2img`), the scheduler-config import and the scheduler export
(:mod:`jaxdiff.convert`) read nothing else: no table elsewhere names the sampler, and nothing
inspects its signature (a test checks that :attr:`SamplerSpec.options` equals the sample
function's keyword options).

The sample function's contract (:mod:`jaxdiff.samplers`): ``sample(model_fn, schedule, x_T, key,
*, num_steps, **options, noise=None, return_trajectory=False, strength=1.0)``. ``noise`` is
accepted by every sampler (a deterministic one shape-checks and ignores it); ``strength`` in
``(0, 1]`` is image-to-image (1: text-to-image), run as :attr:`SamplerSpec.img2img` says. A
sampler whose spec sets :attr:`SamplerSpec.after_step` also takes ``after_step=None``, a function
``(x_next, i) -> x_next`` applied to each step's output in the scan (the driver's ``run_scan``).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Mapping

from jaxdiff.samplers.diffusers_names import BETA_SCHEDULES_COMMON, SCHEDULE_DEFAULTS

__all__ = ["NOISE_SPACES", "IMG2IMG_MODES", "DiffusersTwin", "SamplerSpec"]

# How image-to-image noises a clean sample x0 to grid step s (diffusers' ``add_noise``):
#   "alphas_cumprod": sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, t = timesteps[s];
#   "sigma_vp": the same written with the grid's sigma: (x0 + sigma noise) / sqrt(1 + sigma^2)
#     (the grid may hold interpolated sigmas: Karras, ...);
#   "sigma_ve": x0 + sigma noise (the sigma-space samplers' carry; at strength 1 such a sampler
#     takes standard normal x_T and scales it by init_noise_sigma(grid, options["spacing"])).
NOISE_SPACES = ("alphas_cumprod", "sigma_vp", "sigma_ve")
# "tail": strength keeps the last int(N * strength) of the N grid steps (diffusers'
#   get_timesteps), the sampler starts at the first kept step;
# "grid": the grid itself depends on strength and all N steps run (LCM's img2img pipeline).
IMG2IMG_MODES = ("tail", "grid")


def _frozen(mapping: Mapping | None, what: str) -> Mapping:
    if mapping is None:
        return types.MappingProxyType({})
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{what} must be a mapping, got {type(mapping).__name__}")
    return types.MappingProxyType(dict(mapping))


@dataclasses.dataclass(frozen=True, eq=False)
class DiffusersTwin:
    """A sampler's diffusers scheduler class, as config names only (no torch, no diffusers).

    Attributes:
      class_name: the scheduler class (``_class_name`` of a ``scheduler_config.json``).
      defaults: the class's constructor defaults besides the training schedule's keys: exactly
        its constructor arguments, no more. A config key that is not the class's (neither these
        nor its ``schedule_keys``) is ignored when another registered twin's class has it (a
        config converted from another class, e.g. ``from_config(pndm.config)``, as diffusers
        ignores it too), and rejected otherwise (jaxdiff cannot tell whether it matters).
      options: sampler option -> a function of the defaults-filled config giving its value
        (helpers: :mod:`jaxdiff.samplers.diffusers_names`); options not listed take the sample
        function's defaults.
      must_be: config key -> the values jaxdiff supports (anything else is rejected, naming it).
      no_effect: keys that cannot change the result given ``must_be`` (e.g. thresholding's
        parameters while thresholding is off): documentation, and checked to be keys.
      schedule_defaults: the class's defaults for the training schedule's keys where they
        differ from the common ones (LCM, Heun and KDPM2 default to Stable Diffusion's betas).
      zero_snr_floor: the class sets a zero-terminal-SNR schedule's last ``alphas_cumprod``
        (0, an infinite sigma) to ``2**-24`` (diffusers' sigma-space and multistep schedulers).
      schedule_keys: the training-schedule keys its constructor takes (default: all of
        :data:`~jaxdiff.samplers.diffusers_names.SCHEDULE_DEFAULTS`); diffusers ignores the
        others, so the schedule import does too (e.g. ``rescale_betas_zero_snr`` for Heun:
        :data:`~jaxdiff.samplers.diffusers_names.SCHEDULE_KEYS_NO_RESCALE`).
      beta_schedules: the ``beta_schedule`` values the class implements (the others raise in
        diffusers, and are rejected here).
    """

    class_name: str
    defaults: Mapping[str, Any]
    options: Mapping[str, Callable[[Mapping[str, Any]], Any]]
    must_be: Mapping[str, tuple] = None
    no_effect: frozenset = frozenset()
    schedule_defaults: Mapping[str, Any] = None
    zero_snr_floor: bool = False
    schedule_keys: frozenset = frozenset(SCHEDULE_DEFAULTS)
    beta_schedules: tuple = BETA_SCHEDULES_COMMON

    def __post_init__(self):
        if not isinstance(self.class_name, str) or not self.class_name:
            raise ValueError(f"class_name must be a non-empty str, got {self.class_name!r}")
        for field in ("defaults", "options", "must_be", "schedule_defaults"):
            object.__setattr__(self, field, _frozen(getattr(self, field),
                                                    f"{self.class_name}: {field}"))
        object.__setattr__(self, "no_effect", frozenset(self.no_effect))
        object.__setattr__(self, "schedule_keys", frozenset(self.schedule_keys))
        object.__setattr__(self, "beta_schedules", tuple(self.beta_schedules))
        unknown = sorted(self.schedule_keys - set(SCHEDULE_DEFAULTS))
        if unknown:
            raise ValueError(f"{self.class_name}: schedule_keys names keys that are not schedule "
                             f"keys: {unknown}")
        overlap = sorted(set(self.defaults) & set(SCHEDULE_DEFAULTS))
        if overlap:
            raise ValueError(f"{self.class_name}: defaults hold training-schedule keys "
                             f"{overlap}: declare them with schedule_keys / schedule_defaults")
        for field in ("must_be", "no_effect"):
            unknown = sorted(set(getattr(self, field)) - set(self.defaults))
            if unknown:
                raise ValueError(f"{self.class_name}: {field} names keys that are not in its "
                                 f"defaults: {unknown}")
        for opt, fn in self.options.items():
            if not callable(fn):
                raise ValueError(f"{self.class_name}: options[{opt!r}] must be a function of "
                                 f"the config, got {fn!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class SamplerSpec:
    """Everything jaxdiff knows about one sampler, declared by its file.

    Attributes:
      name: the registry name (``get_sampler(name)``, the command lines' ``--sampler``).
      sample: the ``*_sample`` function (contract: module docstring).
      grid: the host-side grid ``grid(schedule, num_steps, *, strength=1.0, **options) ->
        Grid`` (a :class:`~jaxdiff.samplers.timesteps.Grid`, or a NamedTuple starting with its
        three fields) that ``sample`` runs on. It accepts every option of the sampler and
        ignores those that do not shape the grid (and ``strength`` unless ``img2img`` is
        ``"grid"``): a small adapter over the file's ``*_timesteps`` function.
      options: every keyword option of ``sample`` with its default (the call arguments
        ``num_steps``, ``noise``, ``return_trajectory``, ``strength`` are not options).
      noise_space: how image-to-image noises the clean sample (:data:`NOISE_SPACES`).
      stochastic: ``stochastic(options) -> bool``: whether sampling draws noise, given every
        option (defaults filled in), e.g. DDIM's ``lambda o: o["eta"] > 0``.
      img2img: how ``strength < 1`` runs (:data:`IMG2IMG_MODES`): ``"tail"`` (the last
        ``int(N * strength)`` steps of the grid) or ``"grid"`` (a strength-dependent grid, all
        ``N`` steps: LCM).
      presets: preset name -> the options it fixes (``get_sampler(preset, **more)`` is
        ``get_sampler(name, **fixed, **more)``; ``more`` may not override a fixed option).
      diffusers: the diffusers scheduler class this sampler reproduces, or ``None``.
      after_step: the sample function takes the call argument ``after_step`` (module
        docstring): one model evaluation per scan step, each step's output the sample at the
        next entry of the grid's ``model_timesteps`` (if it has them) or ``timesteps``, so that
        4-channel inpainting can blend after each step as diffusers' inpainting pipelines do.

    Raises:
      ValueError: naming the field, for an invalid declaration (unknown noise space or mode,
        preset or twin options that are not options, ...).
    """

    name: str
    sample: Callable
    grid: Callable
    options: Mapping[str, Any]
    noise_space: str
    stochastic: Callable[[Mapping[str, Any]], bool]
    img2img: str = "tail"
    presets: Mapping[str, Mapping[str, Any]] = None
    diffusers: DiffusersTwin | None = None
    after_step: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"name must be an identifier (a flag value), got {self.name!r}")
        for field in ("sample", "grid", "stochastic"):
            if not callable(getattr(self, field)):
                raise ValueError(f"sampler {self.name!r}: {field} must be callable")
        object.__setattr__(self, "options", _frozen(self.options, f"{self.name}: options"))
        calls = {"num_steps", "noise", "return_trajectory", "strength", "key", "after_step"}
        if calls & set(self.options):
            raise ValueError(f"sampler {self.name!r}: {sorted(calls & set(self.options))} are "
                             "call arguments, not options")
        if self.noise_space not in NOISE_SPACES:
            raise ValueError(f"sampler {self.name!r}: noise_space must be one of {NOISE_SPACES},"
                             f" got {self.noise_space!r}")
        if self.img2img not in IMG2IMG_MODES:
            raise ValueError(f"sampler {self.name!r}: img2img must be one of {IMG2IMG_MODES}, "
                             f"got {self.img2img!r}")
        presets = _frozen(self.presets, f"{self.name}: presets")
        presets = {k: _frozen(v, f"{self.name}: presets[{k!r}]") for k, v in presets.items()}
        object.__setattr__(self, "presets", types.MappingProxyType(presets))
        for preset, fixed in self.presets.items():
            if not isinstance(preset, str) or not preset.isidentifier():
                raise ValueError(f"sampler {self.name!r}: preset names must be identifiers, got "
                                 f"{preset!r}")
            unknown = sorted(set(fixed) - set(self.options))
            if unknown:
                raise ValueError(f"sampler {self.name!r}: preset {preset!r} fixes {unknown}, "
                                 f"which are not options")
        if self.diffusers is not None:
            if not isinstance(self.diffusers, DiffusersTwin):
                raise ValueError(f"sampler {self.name!r}: diffusers must be a DiffusersTwin or "
                                 f"None, got {type(self.diffusers).__name__}")
            unknown = sorted(set(self.diffusers.options) - set(self.options))
            if unknown:
                raise ValueError(f"sampler {self.name!r}: its diffusers twin maps {unknown}, "
                                 "which are not options")

    def resolve(self, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every option: the declared defaults updated with ``options``."""
        return {**self.options, **(options or {})}
