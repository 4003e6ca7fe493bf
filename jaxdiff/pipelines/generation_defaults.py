"""The generation settings a diffusers folder was measured with, in one file that diffusers
ignores: ``jaxdiff_generation.json`` at the folder's root, beside ``model_index.json``.

Every folder jaxdiff exports can carry it (:func:`~jaxdiff.pipelines.save_stable_diffusion`'s
``generation_defaults``; :func:`~jaxdiff.pipelines.export_stable_diffusion` writes
``sd.generation_defaults``, so a loaded folder exported again, or fine-tuned, keeps it).
:func:`~jaxdiff.pipelines.load_stable_diffusion` reads it into ``sd.generation_defaults``, and
``python -m experiments.text_to_image`` uses it for every flag not given. ``StableDiffusionPipeline.
from_pretrained`` reads only ``model_index.json`` and the part folders, so the file changes
nothing there. Every key is optional::

    {
      "sampler": "ddim",                  # a jaxdiff sampler name (jaxdiff.samplers.sampler_names)
      "sampler_options": {"eta": 0.0},    # its options (get_sampler(sampler, **sampler_options))
      "num_steps": 25,                    # sampling steps
      "guidance_scale": 3.0,              # classifier-free guidance w
      "height": 32, "width": 32,          # the image size generated (multiples of 8)
      "crop": [2, 2, 28, 28]              # [top, left, height, width] of the useful image
    }

``crop`` (which needs ``height`` and ``width``) says which part of a ``height x width`` image
is the picture: the text-to-MNIST model generates 32x32 images (MNIST padded to a side that
diffusers' pipeline accepts) whose 28x28 centre is the digit. :func:`crop_images` applies it;
:func:`~jaxdiff.pipelines.generate` itself always returns what the model makes, as diffusers
does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Optional

import numpy as np

from jaxdiff.samplers.registry import Sampler, get_sampler, sampler_names, sampler_options

__all__ = ["GENERATION_DEFAULTS_FILE", "GenerationDefaults", "read_generation_defaults",
           "write_generation_defaults", "crop_images"]

GENERATION_DEFAULTS_FILE = "jaxdiff_generation.json"
_KEYS = ("sampler", "sampler_options", "num_steps", "guidance_scale", "height", "width", "crop")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _frozen(v: Any) -> Any:
    """JSON lists as tuples (sampler options must be hashable: they key compiled programs)."""
    return tuple(_frozen(x) for x in v) if isinstance(v, (list, tuple)) else v


def _thawed(v: Any) -> Any:
    return [_thawed(x) for x in v] if isinstance(v, (list, tuple)) else v


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """The settings of ``jaxdiff_generation.json`` (module docstring); ``None``: not recorded.

    Attributes:
      sampler: a registered sampler name (:func:`~jaxdiff.samplers.sampler_names`).
      sampler_options: its options (``{}`` without ``sampler``).
      num_steps: sampling steps, ``>= 1``.
      guidance_scale: the guidance ``w``, a finite number.
      height, width: the image size generated, multiples of 8 (both or neither).
      crop: ``(top, left, height, width)`` inside ``height x width`` (needs both).

    Raises:
      ValueError: naming the key, for a value of the wrong type or out of range
        (:meth:`from_json` names the file too).
    """

    sampler: Optional[str] = None
    sampler_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    num_steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    height: Optional[int] = None
    width: Optional[int] = None
    crop: Optional[tuple] = None

    def __post_init__(self):
        def bad(key, expected, value):
            raise ValueError(f"{key}: expected {expected}, got {value!r}")

        if self.sampler is not None:
            if not isinstance(self.sampler, str) or self.sampler not in sampler_names():
                bad("sampler", f"one of {list(sampler_names())}", self.sampler)
        opts = self.sampler_options
        if not isinstance(opts, Mapping) or not all(isinstance(k, str) for k in opts):
            bad("sampler_options", "an object of option names", opts)
        if opts and self.sampler is None:
            raise ValueError("sampler_options: given without sampler")
        opts = {k: _frozen(v) for k, v in opts.items()}
        if self.sampler is not None:
            try:
                get_sampler(self.sampler, **opts)
            except ValueError as e:
                raise ValueError(f"sampler_options: {e}") from None
        object.__setattr__(self, "sampler_options", opts)
        if self.num_steps is not None and not (_is_int(self.num_steps) and self.num_steps >= 1):
            bad("num_steps", "an integer >= 1", self.num_steps)
        w = self.guidance_scale
        if w is not None:
            if (isinstance(w, (bool, np.bool_)) or not isinstance(w, (int, float, np.number))
                    or not math.isfinite(w)):
                bad("guidance_scale", "a finite number", w)
            object.__setattr__(self, "guidance_scale", float(w))
        for key in ("height", "width"):
            v = getattr(self, key)
            if v is not None and not (_is_int(v) and v >= 8 and v % 8 == 0):
                bad(key, "a multiple of 8, >= 8", v)
        if (self.height is None) != (self.width is None):
            raise ValueError("height, width: give both or neither")
        if self.crop is not None:
            c = self.crop
            if (not isinstance(c, (list, tuple)) or len(c) != 4 or not all(map(_is_int, c))
                    or min(c[:2]) < 0 or min(c[2:]) < 1):
                bad("crop", "[top, left, height, width]: 4 integers, top/left >= 0, sizes >= 1", c)
            if self.height is None:
                raise ValueError("crop: needs height and width (the size it is a crop of)")
            if c[0] + c[2] > self.height or c[1] + c[3] > self.width:
                bad("crop", f"a box inside height x width = {self.height}x{self.width}", c)
            object.__setattr__(self, "crop", tuple(int(x) for x in c))

    @classmethod
    def from_sampler(cls, sampler: Sampler, **settings: Any) -> "GenerationDefaults":
        """Defaults that record ``sampler`` (its name and the options
        ``get_sampler(name, **options)`` takes back; a preset's fixed ones are implied by its
        name) with ``settings`` (the other fields)."""
        accepted = sampler_options(sampler.name)
        opts = {k: v for k, v in sampler.options.items() if k in accepted}
        return cls(sampler=sampler.name, sampler_options=opts, **settings)

    @classmethod
    def from_json(cls, data: Any, where: str = GENERATION_DEFAULTS_FILE) -> "GenerationDefaults":
        """Parse the file's object. Raises ``ValueError`` naming ``where`` and the key: a
        non-object, an unknown key, or a bad value."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(_KEYS)})")
        try:
            return cls(**{k: v for k, v in data.items() if v is not None})
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def to_json(self) -> dict:
        """The file's object: the recorded keys only (lists for tuples)."""
        out = {}
        for key in _KEYS:
            v = getattr(self, key)
            if v is not None and not (key == "sampler_options" and not v):
                out[key] = {k: _thawed(x) for k, x in v.items()} if key == "sampler_options" \
                    else _thawed(v)
        return out

    def describe(self) -> str:
        """One line for a log: ``"sampler ddim, 25 steps, guidance 3, 32x32, crop 28x28 at
        (2, 2)"`` (the recorded fields only)."""
        parts = []
        if self.sampler is not None:
            parts.append(f"sampler {self.sampler}")
        if self.num_steps is not None:
            parts.append(f"{self.num_steps} steps")
        if self.guidance_scale is not None:
            parts.append(f"guidance {self.guidance_scale:g}")
        if self.height is not None:
            parts.append(f"{self.height}x{self.width}")
        if self.crop is not None:
            parts.append(f"crop {self.crop[2]}x{self.crop[3]} at ({self.crop[0]}, {self.crop[1]})")
        return ", ".join(parts) or "nothing recorded"


def read_generation_defaults(folder: str | os.PathLike) -> Optional[GenerationDefaults]:
    """The :class:`GenerationDefaults` of ``folder/jaxdiff_generation.json``; ``None`` when the
    folder has no such file (a folder jaxdiff did not export, or exported without them).

    Raises:
      ValueError: one line naming the file (and the key): not JSON, not an object, an unknown
        key or a bad value.
    """
    path = os.path.join(os.fspath(folder), GENERATION_DEFAULTS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read it as JSON ({e})") from None
    return GenerationDefaults.from_json(data, path)


def write_generation_defaults(folder: str | os.PathLike, defaults: GenerationDefaults) -> str:
    """Write ``defaults`` as ``folder/jaxdiff_generation.json`` (the folder is created); returns
    the file's path.

    Raises:
      ValueError: ``defaults`` is not a :class:`GenerationDefaults`.
    """
    if not isinstance(defaults, GenerationDefaults):
        raise ValueError(f"defaults must be a GenerationDefaults, got {type(defaults).__name__}")
    os.makedirs(os.fspath(folder), exist_ok=True)
    path = os.path.join(os.fspath(folder), GENERATION_DEFAULTS_FILE)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(defaults.to_json(), f, indent=2, sort_keys=True)
        f.write("\n")
    return path


def crop_images(images: Any, crop: Optional[tuple]) -> Any:
    """``images[:, top:top + height, left:left + width]`` for ``crop = (top, left, height,
    width)`` (e.g. ``sd.generation_defaults.crop``); ``images`` unchanged for ``crop=None``.

    Args:
      images: ``[N, H, W, C]`` (numpy or JAX, any dtype: ``generate(...).images`` or
        ``.float_images``).
      crop: ``(top, left, height, width)`` or ``None``.

    Returns:
      ``[N, height, width, C]``, the same kind of array.

    Raises:
      ValueError: ``images`` not 4-D, or a ``crop`` that is not 4 integers inside ``H x W``.

    >>> import numpy as np
    >>> crop_images(np.zeros((2, 32, 32, 3), np.uint8), (2, 2, 28, 28)).shape
    (2, 28, 28, 3)
    """
    if crop is None:
        return images
    if np.ndim(images) != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {np.shape(images)}")
    h, w = np.shape(images)[1:3]
    if (not isinstance(crop, (list, tuple)) or len(crop) != 4 or not all(map(_is_int, crop))
            or min(crop[:2]) < 0 or min(crop[2:]) < 1
            or crop[0] + crop[2] > h or crop[1] + crop[3] > w):
        raise ValueError(f"crop must be (top, left, height, width) inside the images' {h}x{w}, "
                         f"got {crop!r}")
    top, left, ch, cw = (int(x) for x in crop)
    return images[:, top:top + ch, left:left + cw]
