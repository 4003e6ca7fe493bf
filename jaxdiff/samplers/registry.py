"""Samplers by name: one registry, built from the samplers' declared specs
(:class:`~jaxdiff.samplers.spec.SamplerSpec`), that every entry point reads (the experiments'
``--sampler``, the pipelines, the benchmarks, image-to-image, the diffusers scheduler import and
export).

A new sampler is one file plus one line:

1. write ``jaxdiff/samplers/NAME.py`` with its grid (``NAME_timesteps``), step and sample
   functions (the contract of :mod:`jaxdiff.samplers`: the sample function takes ``noise=None``,
   ``return_trajectory=False`` and ``strength=1.0``; a ``"tail"`` sampler computes ``start =
   strength_start_step(num_steps, strength)`` and passes it to the driver's ``run_scan``, which
   also shape-checks ``noise`` for a deterministic one), and at its bottom its spec(s) and
   ``SPECS = (NAME_SPEC, ...)`` (:mod:`jaxdiff.samplers.spec`: a small grid adapter, the options
   with their defaults, the noise space, presets, the diffusers twin written with
   :mod:`jaxdiff.samplers.diffusers_names`; :mod:`jaxdiff.samplers.ddim` is a short example,
   :mod:`jaxdiff.samplers.dpm_solver` one with presets);
2. add ``"NAME"`` to :data:`SAMPLER_MODULES` below.

Its name and presets are then in :func:`sampler_names` (so in every ``--sampler`` flag), it runs
image-to-image through ``strength`` (:mod:`jaxdiff.samplers.img2img`), and with a diffusers twin a
``scheduler_config.json`` of that class loads as it and it exports to one
(:mod:`jaxdiff.convert`). Re-exporting its public functions from ``jaxdiff/samplers/__init__.py``
is optional. Samplers defined elsewhere register with :func:`register_sampler` (and
:func:`unregister_sampler`, e.g. in a test).

EDM (:func:`~jaxdiff.samplers.edm.edm_sample`) is a separate family and not registered: it has no
``Schedule`` and takes the raw EDM network, so a registry entry would feed the discrete-time
models every registry user passes float ``c_noise`` and return garbage.

    >>> from jaxdiff.samplers import get_sampler, sampler_names
    >>> sampler_names()  # samplers, then presets  # doctest: +ELLIPSIS
    ('ddim', 'ddpm', 'dpm_solver', ..., 'dpmpp_2m', 'dpmpp_2m_karras', ...)
    >>> s = get_sampler("ddim", eta=0.0, clip_x0=1.0)
    >>> s.name, s.stochastic, s.spec.noise_space
    ('ddim', False, 'alphas_cumprod')
    >>> get_sampler("ddpm", eta=0.5)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: sampler 'ddpm' does not take option 'eta'; it takes: clip_x0, final_noise, ...

A :class:`Sampler` binds options to a spec's ``*_sample`` function; calling it is calling that
function::

    x0 = s(model_fn, schedule, x_T, key, num_steps=50)              # text-to-image
    x0 = s(model_fn, schedule, x_s, key, num_steps=50, strength=0.6)  # image-to-image

Options are validated when the sampler is made (before anything is traced), and
:meth:`Sampler.check` builds the host-side grid for a given schedule size and step count, so that a
training run can reject ``num_steps > num_timesteps`` before it starts.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Mapping

import jax

from jaxdiff.samplers.spec import SamplerSpec
from jaxdiff.schedules import Schedule, make_schedule
from jaxdiff.types import ModelFn
from jaxdiff.validation import check_int

__all__ = [
    "SAMPLER_MODULES",
    "Sampler",
    "register_sampler",
    "unregister_sampler",
    "sampler_spec",
    "sampler_specs",
    "diffusers_twins",
    "get_sampler",
    "sampler_names",
    "sampler_options",
]

# The sampler files (modules of jaxdiff.samplers) whose SPECS are registered, in this order.
SAMPLER_MODULES = (
    "ddim",
    "ddpm",
    "dpm_solver",
    "dpm_solver_singlestep",
    "lcm",
    "tcd",
    "euler",
    "heun",
    "kdpm2",
    "unipc",
    "lms",
    "deis",
    "pndm",
)

_SPECS: dict[str, SamplerSpec] = {}  # name -> spec, in registration order
_PRESETS: dict[str, tuple[SamplerSpec, Mapping[str, Any]]] = {}  # preset -> (spec, fixed options)


def register_sampler(spec: SamplerSpec) -> SamplerSpec:
    """Add ``spec`` (its name and presets) to the registry; returns it.

    Raises:
      ValueError: for something that is not a :class:`SamplerSpec`, a name or preset name
        already registered (as a sampler or a preset), or a diffusers twin whose class another
        registered sampler already claims.
    """
    if not isinstance(spec, SamplerSpec):
        raise ValueError(f"register_sampler takes a SamplerSpec, got {type(spec).__name__}")
    for name in (spec.name, *spec.presets):
        if name in _SPECS or name in _PRESETS:
            owner = _SPECS[name] if name in _SPECS else _PRESETS[name][0]
            what = "a sampler" if name in _SPECS else f"a preset of {owner.name!r}"
            raise ValueError(f"cannot register sampler {spec.name!r}: the name {name!r} is "
                             f"already registered ({what}); unregister_sampler({owner.name!r}) "
                             "first or choose another name")
    if spec.diffusers is not None:
        other = diffusers_twins().get(spec.diffusers.class_name)
        if other is not None:
            raise ValueError(f"cannot register sampler {spec.name!r}: sampler {other.name!r} is "
                             f"already the twin of {spec.diffusers.class_name}")
    _SPECS[spec.name] = spec
    for preset, fixed in spec.presets.items():
        _PRESETS[preset] = (spec, fixed)
    return spec


def unregister_sampler(name: str) -> SamplerSpec:
    """Remove the sampler ``name`` and its presets from the registry; returns its spec.

    Raises:
      ValueError: unless ``name`` is a registered sampler (not a preset).
    """
    if name not in _SPECS:
        raise ValueError(f"sampler {name!r} is not registered (registered: {tuple(_SPECS)})")
    spec = _SPECS.pop(name)
    for preset in spec.presets:
        _PRESETS.pop(preset, None)
    return spec


def sampler_names() -> tuple[str, ...]:
    """The registered sampler names then the preset names, in registration order (read at call
    time: a command line's ``--sampler`` choices include samplers registered since import)."""
    return tuple(_SPECS) + tuple(_PRESETS)


def sampler_specs() -> tuple[SamplerSpec, ...]:
    """The registered specs, in registration order."""
    return tuple(_SPECS.values())


def diffusers_twins() -> dict[str, SamplerSpec]:
    """diffusers scheduler class name -> the registered spec that is its twin (computed from the
    specs)."""
    return {s.diffusers.class_name: s for s in _SPECS.values() if s.diffusers is not None}


def _resolve(name: str) -> tuple[SamplerSpec, Mapping[str, Any]]:
    """``(spec, fixed options)`` for a sampler or preset name."""
    if isinstance(name, str) and name in _PRESETS:
        return _PRESETS[name]
    if isinstance(name, str) and name in _SPECS:
        return _SPECS[name], {}
    raise ValueError(f"sampler must be one of {sampler_names()}, got {name!r}")


def sampler_spec(name: str) -> SamplerSpec:
    """The spec of a registered sampler or preset name (``ValueError`` for an unknown one)."""
    return _resolve(name)[0]


def sampler_options(name: str) -> tuple[str, ...]:
    """The option names ``get_sampler(name, ...)`` accepts (sorted); a preset's fixed options are
    not among them."""
    spec, fixed = _resolve(name)
    return tuple(sorted(o for o in spec.options if o not in fixed))


# The arguments of every *_sample besides the options, and those given at call time.
_CALL_ARGS = ("noise", "return_trajectory", "strength", "after_step")


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A sampler's spec with options bound.

    Attributes:
      name: the registry name (a sampler or a preset).
      spec: the :class:`~jaxdiff.samplers.spec.SamplerSpec`.
      options: the bound options (only those given, a preset's fixed ones included; the rest
        take the spec's defaults: :attr:`effective_options`).
      stochastic: whether sampling draws noise (then ``key`` or ``noise`` is required).
    """

    name: str
    spec: SamplerSpec
    options: Mapping[str, Any]
    stochastic: bool

    @property
    def fn(self):
        """The ``*_sample`` function (``spec.sample``)."""
        return self.spec.sample

    @property
    def effective_options(self) -> dict[str, Any]:
        """Every option: the spec's defaults updated with the bound ones."""
        return self.spec.resolve(self.options)

    def __call__(
        self,
        model_fn: ModelFn,
        schedule: Schedule,
        x_T: jax.Array,
        key: jax.Array | None = None,
        *,
        num_steps: int,
        **kwargs: Any,
    ):
        """``spec.sample(model_fn, schedule, x_T, key, num_steps=..., **options, **kwargs)``;
        ``kwargs`` are the call arguments every sampler takes: ``noise`` (``[M, B, ...]``, ``M``
        the steps that run; shape-checked and unused by a deterministic sampler),
        ``return_trajectory`` and ``strength`` (image-to-image in ``(0, 1]``; 1:
        text-to-image; :mod:`jaxdiff.samplers.img2img`); and ``after_step`` where the spec
        declares it (:attr:`~jaxdiff.samplers.spec.SamplerSpec.after_step`)."""
        if kwargs.get("after_step") is not None and not self.spec.after_step:
            raise ValueError(f"sampler {self.name!r} does not take after_step (its spec does not "
                             "declare after_step)")
        kwargs = {k: v for k, v in kwargs.items() if k != "after_step" or v is not None}
        extra = set(kwargs) - set(_CALL_ARGS)
        if "start_step" in extra:
            raise ValueError("start_step is not a call argument: image-to-image is strength= "
                             "(see jaxdiff.samplers.noise_to_img2img)")
        if extra:
            raise ValueError(
                f"options are bound by get_sampler; got {sorted(extra)} at call time for "
                f"sampler {self.name!r}"
            )
        return self.spec.sample(model_fn, schedule, x_T, key, num_steps=num_steps,
                                **self.options, **kwargs)

    def check(self, schedule: Schedule | int, num_steps: int) -> None:
        """Validate sampling ``num_steps`` steps on ``schedule`` (or a linear schedule of that many
        training steps) without computing anything: the grid is built on the host and the sampler
        traced abstractly with a stand-in model. ``ValueError`` where sampling would fail (e.g.
        ``num_steps > num_timesteps``, repeated DPM-Solver timesteps, an invalid option)."""
        if not isinstance(schedule, Schedule):
            schedule = make_schedule("linear", check_int("num_timesteps", schedule, 1))
        T = schedule.num_timesteps
        n = check_int("num_steps", num_steps, 1)
        if n > T:
            raise ValueError(f"num_steps must be <= num_timesteps ({T}), got {n}")
        x = jax.ShapeDtypeStruct((1, 1), jax.numpy.float32)
        out_channels = self._out_channels()
        # Trace abstractly: validates the grid and every option, computes nothing.
        jax.eval_shape(
            lambda x: self(lambda x, t: jax.numpy.zeros((1, out_channels), x.dtype), schedule,
                           x, jax.random.key(0), num_steps=n),
            x,
        )

    def _out_channels(self) -> int:
        return 2 if str(self.options.get("variance_type", "")).startswith("learned") else 1

    def model_evaluations(self, schedule: Schedule | int, num_steps: int) -> int:
        """How many times sampling ``num_steps`` steps calls the model (the NFE): ``num_steps``
        for one-evaluation-per-step samplers, ``2 num_steps - 1`` for Heun and KDPM2. Counted by
        running the sampler once on a ``[1, 1]`` stand-in outside ``jit`` (``lax.scan`` then
        runs step by step), so it is exact for any options. ``ValueError`` as :meth:`check`."""
        self.check(schedule, num_steps)
        if not isinstance(schedule, Schedule):
            schedule = make_schedule("linear", schedule)
        calls = [0]
        out_channels = self._out_channels()

        def model(x, t):
            calls[0] += 1
            return jax.numpy.full((x.shape[0], out_channels), 0.1, x.dtype)

        with jax.disable_jit():
            self(model, schedule, jax.numpy.full((1, 1), 0.5), jax.random.key(0),
                 num_steps=num_steps)
        return calls[0]


def get_sampler(name: str, **options: Any) -> Sampler:
    """The sampler ``name`` with ``options`` bound, validated now.

    Args:
      name: one of :func:`sampler_names` (a sampler, or a preset that fixes some options).
      **options: options of that sampler (:attr:`SamplerSpec.options`, see
        :func:`sampler_options`), e.g. ``eta`` for DDIM, ``solver_order`` for DPM-Solver.

    Returns:
      A :class:`Sampler`; call it as ``sampler(model_fn, schedule, x_T, key, num_steps=N)``.

    Raises:
      ValueError: for an unknown name, an option the sampler does not take, or an invalid value
        (checked by building a small grid with these options).
    """
    spec, fixed = _resolve(name)
    accepted = sampler_options(name)
    for opt in options:
        if opt in fixed:
            raise ValueError(
                f"sampler {name!r} fixes option {opt!r} = {fixed[opt]!r}; use {spec.name!r} to "
                "set it"
            )
        if opt not in accepted:
            raise ValueError(
                f"sampler {name!r} does not take option {opt!r}; it takes: {', '.join(accepted)}"
            )
    options = {**fixed, **options}
    Sampler(name, spec, options, False).check(1000, 1)  # validates the option values
    return Sampler(name, spec, options, bool(spec.stochastic(spec.resolve(options))))


for _module in SAMPLER_MODULES:
    for _spec in importlib.import_module(f"jaxdiff.samplers.{_module}").SPECS:
        register_sampler(_spec)
