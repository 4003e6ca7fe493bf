"""Argument checks shared by every jaxdiff module: one home, imported by name.

Each ``check_*`` either returns the normalised value or raises ``ValueError`` with a message that
names the argument and says what was expected. Checks that look at values work on concrete inputs
(Python numbers, numpy arrays, JAX arrays outside ``jit``) at trace time; a traced value cannot be
inspected, so value checks skip it and the caller decides what a traced out-of-range value does
(jaxdiff reads NaN rather than clamping; see :func:`jaxdiff.diffusion.extract`).

A file that cannot be used (corrupt, truncated, of another format) raises
:class:`InvalidFileError`, a ``ValueError`` whose message starts with the file's path; the command
lines print it as one ``error:`` line. :func:`read_json` reads a JSON file that way.
:func:`check_writable` refuses, before any work, an output path that could not be written.

This module depends on nothing else in jaxdiff, so that any module may import it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "InvalidFileError",
    "read_json",
    "check_writable",
    "concrete",
    "check_int",
    "check_bool",
    "check_float",
    "check_nonnegative_float",
    "check_choice",
    "check_array",
    "check_batched",
    "check_floating",
    "check_same_shape",
    "check_timesteps",
    "check_timestep",
    "check_clip",
]


class InvalidFileError(ValueError):
    """A file given to jaxdiff cannot be used: it is not of the expected format, is truncated or
    inconsistent with its header (or with the file it pairs with), or needs a package that is not
    installed to be read. The message names the file, says what is wrong and, where one is known,
    what to do (download it again, install a package).

    A ``ValueError``, so ``except ValueError`` still catches it; the command lines
    (``experiments.cli.run``) print it as one ``error: ...`` line and exit with status 2.
    """


def read_json(path: str | os.PathLike) -> Any:
    """The parsed contents of the JSON file at ``path``.

    Raises:
      FileNotFoundError: no file at ``path``.
      InvalidFileError: the file is not valid UTF-8 JSON (naming the file, line and column).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InvalidFileError(f"{path}: not a JSON file (not UTF-8 text: {e.reason} at byte "
                               f"{e.start})") from None
    except json.JSONDecodeError as e:
        what = "empty" if not raw.strip() else f"line {e.lineno} column {e.colno}: {e.msg}"
        raise InvalidFileError(f"{path}: not valid JSON ({what}); truncated or edited by "
                               "hand?") from None


def check_writable(name: str, path: str | os.PathLike, *, directory: bool = False) -> str:
    """Checks, before any work, that ``path`` can be written: a file (or with ``directory`` a
    directory that may not exist yet), with no existing entry of the other kind there, whose
    nearest existing parent is a directory in which a file can be created (probed with a
    temporary file, which is removed: permissions and read-only file systems). Creates nothing.
    Returns the absolute path.

    Raises:
      ValueError: naming ``name`` and the path.
    """
    path = os.path.abspath(os.fspath(path))
    if directory and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{name}: {path} exists and is not a directory")
    if not directory and os.path.isdir(path):
        raise ValueError(f"{name}: {path} is a directory, expected a file path")
    parent = path if directory else os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{name}: cannot write {path}: {parent} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ValueError(f"{name}: cannot write {path}: {parent} is not writable "
                         f"({e.strerror})") from None
    return path


def concrete(x) -> np.ndarray | None:
    """The value of ``x`` as numpy when it is known at trace time, else ``None`` (a tracer)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``int(value)`` for a Python or numpy integer (not a bool, float or string) in
    ``[minimum, maximum]`` (either bound may be ``None``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be an int{bound}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a Python or numpy bool; a string such as ``"False"`` (truthy) or an int
    raises."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool (True or False), got {value!r}")
    return bool(value)


def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
) -> float:
    """``float(value)`` for a finite real number (Python, numpy or a concrete 0-d array; not a
    bool or string) within the given bounds."""
    c = None if isinstance(value, (str, bytes, bool, np.bool_)) else concrete(value)
    if c is None or c.shape != () or not np.issubdtype(c.dtype, np.number) or np.iscomplexobj(c):
        raise ValueError(f"{name} must be a concrete real number, got {value!r}")
    v = float(c)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if minimum is not None and (v <= minimum if exclusive_minimum else v < minimum):
        raise ValueError(f"{name} must be {'>' if exclusive_minimum else '>='} {minimum}, got {v}")
    if maximum is not None and (v >= maximum if exclusive_maximum else v > maximum):
        raise ValueError(f"{name} must be {'<' if exclusive_maximum else '<='} {maximum}, got {v}")
    return v


def check_nonnegative_float(name: str, value: Any) -> float:
    """``float(value)`` for a concrete number ``>= 0``."""
    return check_float(name, value, minimum=0.0)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``."""
    try:
        ok = value in tuple(choices)
    except TypeError:  # unhashable / uncomparable
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_array(name: str, x: Any) -> jax.Array:
    """``x`` as a JAX array (lists and numpy arrays are converted); ``ValueError`` naming ``name``
    for what cannot be one (strings, ragged lists, objects)."""
    if isinstance(x, jax.Array):
        return x
    if isinstance(x, (str, bytes)):
        raise ValueError(f"{name} must be an array, got a string {x!r}")
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name} must be an array (or nested list of numbers): {e}") from None
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    return jnp.asarray(arr)


def check_batched(name: str, x: Any) -> jax.Array:
    """``x`` as an array (:func:`check_array`) with a leading batch axis (rank >= 1)."""
    x = check_array(name, x)
    if x.ndim < 1:
        raise ValueError(f"{name} must be a batch [B, ...], got a scalar")
    return x


def check_floating(name: str, x: Any, hint: str = "") -> jax.Array:
    """``x`` as an array (:func:`check_array`) of a floating-point dtype; an integer or bool
    array raises (works on tracers: the dtype is known at trace time). ``hint`` is appended to
    the message (e.g. how to convert)."""
    x = check_array(name, x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}"
                         + (f": {hint}" if hint else ""))
    return x


def check_same_shape(**arrays: Any) -> None:
    """Every keyword array has the first one's shape."""
    (name0, a0), *rest = arrays.items()
    for name, a in rest:
        if jnp.shape(a) != jnp.shape(a0):
            raise ValueError(
                f"{name} must have the same shape as {name0} {jnp.shape(a0)}, got {jnp.shape(a)}"
            )


def check_timesteps(name: str, t: Any, num_timesteps: int, batch: int | None) -> jax.Array:
    """Integer timesteps ``[B]`` (``B = batch`` unless ``None``) or a scalar, concrete values in
    ``[0, num_timesteps)``. Returns ``t`` as an array."""
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array of timesteps, got dtype {t.dtype}")
    if t.ndim > 1 or (t.ndim == 1 and batch is not None and t.shape[0] != batch):
        raise ValueError(f"{name} must have shape [B] = [{batch}] or be a scalar, got {t.shape}")
    value = concrete(t)
    T = num_timesteps
    if value is not None and value.size and (value.min() < 0 or value.max() >= T):
        raise ValueError(
            f"{name} must lie in [0, {T}) for a schedule of {T} steps, "
            f"got values in [{value.min()}, {value.max()}]"
        )
    return t


def check_timestep(name: str, t: Any, num_timesteps: int, *, allow_negative: bool = False) -> None:
    """A step function's timestep: a 0-d integer shared by the batch (a ``[B]`` array would
    broadcast against the channel axis). A concrete ``t`` must lie in ``[0, num_timesteps)``
    (with ``allow_negative``, any negative value is allowed: "before the first step"); a traced one
    passes the range check."""
    dtype = jnp.result_type(t)  # works on tracers: the dtype is known before the value
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer timestep, got dtype {dtype}")
    if jnp.ndim(t) != 0:
        raise ValueError(
            f"{name} must be a scalar (0-d) timestep shared by the batch, got shape {jnp.shape(t)}"
        )
    value = concrete(t)
    if value is None:
        return
    low_ok = True if allow_negative else value >= 0
    if not (low_ok and value < num_timesteps):
        bounds = f"< {num_timesteps}" if allow_negative else f"in [0, {num_timesteps})"
        raise ValueError(f"{name} must be {bounds}, got {value.tolist()}")


def check_clip(clip_x0: Any, name: str = "clip_x0") -> float | None:
    """``None`` (no clipping) or a concrete float ``> 0``."""
    if clip_x0 is None:
        return None
    try:
        return check_float(name, clip_x0, minimum=0.0, exclusive_minimum=True)
    except ValueError:
        raise ValueError(f"{name} must be None or a concrete float > 0, got {clip_x0!r}") from None
