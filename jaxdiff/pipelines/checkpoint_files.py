"""The files of a diffusers / transformers model folder: JSON configs, and weights as a plain,
variant (``<stem>.<variant>.<ext>``) or sharded (``<stem>.<ext>.index[.<variant>].json`` plus
the shards it names) safetensors or ``.bin`` state dict.

A sharded index is data from the folder, so its shard names are checked before anything is
opened: each must name a file inside the folder
(:func:`~jaxdiff.convert.torch_io.load_sharded_state_dict`). A folder that loads
with another option (a variant) raises :class:`LoadOptionError`, whose remedy a caller spells
its own way (a keyword, a command-line flag).
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable

from jaxdiff.convert.torch_io import load_sharded_state_dict, load_torch_state_dict
from jaxdiff.validation import InvalidFileError, read_json

__all__ = ["LoadOptionError", "VARIANT_RE", "folder_variants", "keyword_remedy", "read_config",
           "read_weights"]


def read_config(path: str, part: str) -> dict:
    """The JSON object in ``path`` (:func:`jaxdiff.validation.read_json`); ``ValueError``
    naming ``part`` and the file when it is missing, unreadable, not JSON
    (:class:`~jaxdiff.validation.InvalidFileError`) or not an object."""
    if not os.path.isfile(path):
        raise ValueError(f"{part}: {path!r} not found")
    try:
        value = read_json(path)
    except OSError as e:
        raise ValueError(f"{part}: cannot read {path!r} ({e.strerror or e})") from None
    if not isinstance(value, dict):
        raise InvalidFileError(f"{part}: {path!r} must hold a JSON object, got "
                               f"{type(value).__name__}")
    return value


VARIANT_RE = re.compile(r"^[A-Za-z0-9_]+$")


class LoadOptionError(ValueError):
    """A folder that loads with another option of :func:`load_stable_diffusion` (a folder whose
    scheduler has no jaxdiff sampler needs ``sampler``, weights saved as a variant need
    ``variant``). ``str(e)`` spells the remedy as the keyword (``pass sampler='dpmpp_2m'``);
    :meth:`message` lets a caller spell it its own way (a command line: ``pass --sampler
    dpmpp_2m``).

    Attributes:
      problem: what is wrong, naming the file or folder.
      option: the keyword that fixes it (``"sampler"``, ``"variant"``).
      value: the value to pass (``None``: leave the option out).
      note: what follows the remedy.
    """

    def __init__(self, problem: str, option: str, value: Any, note: str = ""):
        self.problem, self.option, self.value, self.note = problem, option, value, note
        super().__init__(self.message())

    def message(self, remedy: Callable[[str, Any], str] | None = None) -> str:
        """The message, with the remedy spelt by ``remedy(option, value)`` (default
        :func:`keyword_remedy`)."""
        return f"{self.problem}; {(remedy or keyword_remedy)(self.option, self.value)}{self.note}"


def keyword_remedy(option: str, value: Any) -> str:
    """``pass sampler='ddim'``: a :class:`LoadOptionError`'s remedy for Python callers."""
    return f"pass {option}={value!r}"


def folder_variants(folder: str, stems: tuple[str, ...]) -> list[str | None]:
    """The weight variants present in ``folder`` (``None``: the plain files), as diffusers and
    transformers name them: ``<stem>[.<variant>][-0000i-of-0000n].<ext>`` and the sharded
    index ``<stem>.<ext>.index[.<variant>].json``."""
    found: list[str | None] = []
    alts = "|".join(re.escape(s) for s in stems)
    weights = re.compile(rf"^(?:{alts})(?:\.([^.\-]+))?(?:-\d+-of-\d+)?\.(?:safetensors|bin)$")
    index = re.compile(rf"^(?:{alts})\.(?:safetensors|bin)\.index(?:\.([^.]+))?\.json$")
    for name in sorted(os.listdir(folder)):
        m = weights.match(name) or index.match(name)
        if m and m.group(1) not in found:
            found.append(m.group(1))
    return found


def _read_sharded(index_path: str) -> dict:
    """:func:`~jaxdiff.convert.torch_io.load_sharded_state_dict` (which refuses shard names that
    leave the folder), with a missing shard a ``ValueError`` naming the index."""
    try:
        return load_sharded_state_dict(index_path)
    except FileNotFoundError as e:
        raise ValueError(f"{index_path}: a shard it names is missing ({e})") from None


def read_weights(folder: str, stems: tuple[str, ...], variant: str | None) -> dict:
    """The state dict of ``folder``: ``<stem>[.<variant>].safetensors`` (or its sharded index,
    ``<stem>.safetensors.index[.<variant>].json``), else ``.bin``, for the first stem found."""
    suffix = f".{variant}" if variant else ""
    tried = []
    for ext in ("safetensors", "bin"):
        for stem in stems:
            name = f"{stem}{suffix}.{ext}"
            # diffusers / transformers name a variant's index <stem>.<ext>.index.<variant>.json;
            # <stem>.<variant>.<ext>.index.json is also read
            for index_name in (f"{stem}.{ext}.index{suffix}.json", name + ".index.json"):
                index = os.path.join(folder, index_name)
                if os.path.isfile(index):
                    return _read_sharded(index)
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return load_torch_state_dict(path)
            tried.append(name)
    problem = f"variant={variant!r}: no weights file in {folder!r} (looked for {tried})"
    others = [v for v in folder_variants(folder, stems) if v != variant]
    if others:
        listed = ", ".join("the plain files" if v is None else repr(v) for v in others)
        raise LoadOptionError(f"{problem}; the folder holds {listed}", "variant", others[0])
    raise ValueError(problem)
