"""Samplers by name: one registry that every entry point (the experiments' ``--sampler``, the
benchmarks) reads, so that a new sampler is one file plus one line here.

    >>> from jaxdiff.samplers import get_sampler, sampler_names
    >>> sampler_names()  # samplers, then presets  # doctest: +ELLIPSIS
    ('ddim', 'ddpm', 'dpm_solver', ..., 'dpmpp_2m', 'dpmpp_2m_karras', ...)
    >>> s = get_sampler("ddim", eta=0.0, clip_x0=1.0)
    >>> s.name, s.stochastic
    ('ddim', False)
    >>> get_sampler("ddpm", eta=0.5)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: sampler 'ddpm' does not take option 'eta'; it takes: clip_x0, final_noise, ...

A :class:`Sampler` binds options to a ``*_sample`` function; calling it is calling that function::

    x0 = s(model_fn, schedule, x_T, key, num_steps=50)

Options are validated when the sampler is made (before anything is traced), and
:meth:`Sampler.check` builds the host-side grid for a given schedule size and step count, so that a
training run can reject ``num_steps > num_timesteps`` before it starts.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping

import jax

from jaxdiff.samplers.ddim import ddim_sample
from jaxdiff.samplers.ddpm import ddpm_sample
from jaxdiff.samplers.dpm_solver import dpm_solver_sample
from jaxdiff.samplers.euler import euler_ancestral_sample, euler_sample
from jaxdiff.samplers.heun import heun_sample
from jaxdiff.samplers.kdpm2 import kdpm2_ancestral_sample, kdpm2_sample
from jaxdiff.samplers.lcm import lcm_sample
from jaxdiff.samplers.unipc import unipc_sample
from jaxdiff.schedules import Schedule, make_schedule
from jaxdiff.types import ModelFn
from jaxdiff.validation import check_int

__all__ = ["Sampler", "SAMPLERS", "PRESETS", "get_sampler", "sampler_names", "sampler_options"]

# name -> (sample function, whether it draws noise given its options)
SAMPLERS: Mapping[str, tuple[Callable, Callable[[Mapping[str, Any]], bool]]] = {
    "ddim": (ddim_sample, lambda o: float(o.get("eta", 0.0)) > 0),
    "ddpm": (ddpm_sample, lambda o: True),
    "dpm_solver": (dpm_solver_sample,
                   lambda o: str(o.get("algorithm_type", "")).startswith("sde")),
    "lcm": (lcm_sample, lambda o: True),  # re-noises between steps (unless num_steps = 1)
    "euler": (euler_sample, lambda o: float(o.get("s_churn", 0.0)) > 0),
    "euler_ancestral": (euler_ancestral_sample, lambda o: True),
    "heun": (heun_sample, lambda o: False),
    "kdpm2": (kdpm2_sample, lambda o: False),
    "kdpm2_ancestral": (kdpm2_ancestral_sample, lambda o: True),
    "unipc": (unipc_sample, lambda o: False),
}

# Named presets: name -> (registered sampler, options it fixes). ``get_sampler(preset, **more)`` is
# ``get_sampler(base, **fixed, **more)``; ``more`` may not override a fixed option.
PRESETS: Mapping[str, tuple[str, Mapping[str, Any]]] = {
    # DPM-Solver++ under the names of k-diffusion / A1111 ("DPM++ 2M Karras", ...).
    "dpmpp_2m": ("dpm_solver", dict(algorithm_type="dpmsolver++", solver_order=2)),
    "dpmpp_2m_karras": ("dpm_solver", dict(algorithm_type="dpmsolver++", solver_order=2,
                                           sigma_schedule="karras")),
    "dpmpp_3m_karras": ("dpm_solver", dict(algorithm_type="dpmsolver++", solver_order=3,
                                           sigma_schedule="karras")),
    "dpmpp_2m_sde_karras": ("dpm_solver", dict(algorithm_type="sde-dpmsolver++", solver_order=2,
                                               sigma_schedule="karras")),
    # UniPC's two B(h) variants (diffusers' UniPCMultistepScheduler solver_type).
    "unipc_bh1": ("unipc", dict(solver_type="bh1")),
    "unipc_bh2": ("unipc", dict(solver_type="bh2")),
}

# Arguments of every *_sample that are not sampler options.
_CALL_ARGS = ("model_fn", "schedule", "x_T", "key", "num_steps", "noise", "return_trajectory",
              "start_step", "strength")


def sampler_names() -> tuple[str, ...]:
    """The registered sampler names then the preset names, in registration order."""
    return tuple(SAMPLERS) + tuple(PRESETS)


def _resolve(name: str) -> tuple[str, Mapping[str, Any]]:
    """``(registered name, fixed options)`` for a sampler or preset name."""
    if isinstance(name, str) and name in PRESETS:
        return PRESETS[name]
    if isinstance(name, str) and name in SAMPLERS:
        return name, {}
    raise ValueError(f"sampler must be one of {sampler_names()}, got {name!r}")


def _lookup(name: str) -> tuple[Callable, Callable]:
    return SAMPLERS[_resolve(name)[0]]


def sampler_options(name: str) -> tuple[str, ...]:
    """The option names ``get_sampler(name, ...)`` accepts (sorted); a preset's fixed options are
    not among them."""
    base, fixed = _resolve(name)
    params = inspect.signature(SAMPLERS[base][0]).parameters
    return tuple(sorted(p for p in params if p not in _CALL_ARGS and p not in fixed))


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A sample function with its options bound.

    Attributes:
      name: the registry name.
      fn: the ``*_sample`` function.
      options: the bound options (only those given; the rest take the function's defaults).
      stochastic: whether sampling draws noise (then ``key`` or ``noise`` is required).
    """

    name: str
    fn: Callable
    options: Mapping[str, Any]
    stochastic: bool

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
        """``fn(model_fn, schedule, x_T, key, num_steps=..., **options, **kwargs)``;
        ``kwargs`` are the call arguments (``noise``, ``return_trajectory``, and ``start_step``
        for the samplers that can run the tail of their grid: :attr:`supports_start_step`, or
        ``strength`` for those whose image-to-image grid depends on it (LCM):
        :attr:`supports_strength`; :func:`jaxdiff.samplers.img2img_kwargs` picks)."""
        extra = set(kwargs) - {"noise", "return_trajectory", "start_step", "strength"}
        if extra:
            raise ValueError(
                f"options are bound by get_sampler; got {sorted(extra)} at call time for "
                f"sampler {self.name!r}"
            )
        if kwargs.get("start_step", 0) != 0 and not self.supports_start_step:
            hint = "; it takes strength (see img2img_kwargs)" if self.supports_strength else ""
            raise ValueError(
                f"start_step (image-to-image) is not implemented for sampler {self.name!r}{hint}"
            )
        if "start_step" in kwargs and not self.supports_start_step:
            kwargs = {k: v for k, v in kwargs.items() if k != "start_step"}
        if kwargs.get("strength", 1.0) != 1.0 and not self.supports_strength:
            raise ValueError(
                f"strength is not a call argument of sampler {self.name!r}; it runs "
                "image-to-image with start_step (see img2img_kwargs)"
            )
        if "strength" in kwargs and not self.supports_strength:
            kwargs = {k: v for k, v in kwargs.items() if k != "strength"}
        if "noise" in kwargs and "noise" not in inspect.signature(self.fn).parameters:
            # a deterministic sampler: noise=None is accepted (callers that serve every sampler
            # pass it), an array is an error rather than silently ignored
            if kwargs["noise"] is not None:
                raise ValueError(f"noise: sampler {self.name!r} is deterministic and takes no "
                                 "noise; pass noise=None")
            kwargs = {k: v for k, v in kwargs.items() if k != "noise"}
        return self.fn(model_fn, schedule, x_T, key, num_steps=num_steps, **self.options,
                       **kwargs)

    @property
    def supports_start_step(self) -> bool:
        """Whether ``fn`` takes ``start_step`` (runs the tail of its grid: image-to-image)."""
        return "start_step" in inspect.signature(self.fn).parameters

    @property
    def supports_strength(self) -> bool:
        """Whether ``fn`` takes ``strength`` (image-to-image on a strength-dependent grid: LCM)."""
        return "strength" in inspect.signature(self.fn).parameters

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
      **options: keyword options of that sampler's ``*_sample`` function (see
        :func:`sampler_options`), e.g. ``eta`` for DDIM, ``solver_order`` for DPM-Solver.

    Returns:
      A :class:`Sampler`; call it as ``sampler(model_fn, schedule, x_T, key, num_steps=N)``.

    Raises:
      ValueError: for an unknown name, an option the sampler does not take, or an invalid value
        (checked by building a small grid with these options).
    """
    base, fixed = _resolve(name)
    fn, stochastic = SAMPLERS[base]
    accepted = sampler_options(name)
    for opt in options:
        if opt in fixed:
            raise ValueError(
                f"sampler {name!r} fixes option {opt!r} = {fixed[opt]!r}; use {base!r} to set it"
            )
        if opt not in accepted:
            raise ValueError(
                f"sampler {name!r} does not take option {opt!r}; it takes: {', '.join(accepted)}"
            )
    options = {**fixed, **options}
    Sampler(name, fn, options, False).check(1000, 1)  # validates the option values
    return Sampler(name, fn, options, bool(stochastic(options)))
