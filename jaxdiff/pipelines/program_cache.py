"""A bounded cache of jitted programs, keyed by hashable descriptions of their static settings.

A pipeline builds one ``jax.jit`` program per static setting (image size, steps, sampler, ...)
and feeds it everything else (parameters, prompts, seeds, guidance scale) as arguments. The
program is a function of the setting alone, so the setting, written as a frozen, hashable key,
is what finds it again. :class:`ProgramCache` holds the programs (least recently used evicted
past ``max_programs``) and records which argument signatures each has been called with, so that
a pipeline can say "compiling..." exactly when ``jit`` is about to compile. :func:`freeze` turns
options (dicts, lists, arrays) into a hashable key field, and :func:`fingerprint` a pytree of
arrays (e.g. a :class:`~jaxdiff.schedules.Schedule` that a program closes over) into a digest.

    >>> cache = ProgramCache(max_programs=2)
    >>> build = lambda: (lambda x: x + 1)
    >>> f = cache.get(("add", 1), build)
    >>> cache.get(("add", 1), build) is f, cache.stats()
    (True, {'programs': 1, 'hits': 1, 'misses': 1, 'evictions': 0})
"""

from __future__ import annotations

import collections
import hashlib
import threading
import weakref
from typing import Any, Callable, Hashable, Mapping

import jax
import numpy as np

__all__ = ["ProgramCache", "fingerprint", "freeze"]


def freeze(value: Any) -> Hashable:
    """A hashable stand-in for ``value`` that is equal exactly when the values are: mappings
    become sorted ``(key, value)`` tuples, lists / tuples tuples, arrays (numpy or JAX)
    ``(shape, dtype, bytes)``; every scalar is tagged with its type (``1``, ``1.0`` and ``True``
    stay distinct). An object that is none of these and not hashable is frozen by ``repr``."""
    if isinstance(value, Mapping):
        return ("mapping", tuple(sorted((str(k), freeze(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(freeze(v) for v in value))
    if isinstance(value, (np.ndarray, jax.Array, np.generic)):
        arr = np.asarray(value)
        return ("array", arr.shape, arr.dtype.str, arr.tobytes())
    if isinstance(value, float) and value != value:
        return ("float", "nan")  # nan != nan: a key holding it would never be found again
    try:
        hash(value)
    except TypeError:
        return ("repr", type(value).__name__, repr(value))
    return (type(value).__name__, value)


_FINGERPRINTS: dict[int, tuple[Any, Hashable]] = {}
_FINGERPRINTS_LOCK = threading.Lock()


def fingerprint(tree: Any) -> Hashable:
    """A hashable digest of a pytree of arrays: its structure (static fields included) and each
    leaf's shape, dtype and SHA-256 of its bytes. Equal for equal contents, whatever the object.

    Remembered per object while the object lives (a weak reference tells a live object from a
    new one at a reused ``id``), so a second call on the same tree reads no array back."""
    oid = id(tree)
    with _FINGERPRINTS_LOCK:
        entry = _FINGERPRINTS.get(oid)
    if entry is not None and entry[0]() is tree:
        return entry[1]
    leaves, treedef = jax.tree.flatten(tree)
    digest = hashlib.sha256()
    shapes = []
    for leaf in leaves:
        arr = np.asarray(leaf)
        shapes.append((arr.shape, arr.dtype.str))
        digest.update(np.ascontiguousarray(arr).tobytes())
    value = (treedef, tuple(shapes), digest.hexdigest())
    try:
        ref = weakref.ref(tree, lambda _, oid=oid: _forget(oid))
    except TypeError:  # not weakly referenceable (a tuple, a dict): not remembered
        return value
    with _FINGERPRINTS_LOCK:
        _FINGERPRINTS[oid] = (ref, value)
    return value


def _forget(oid: int) -> None:
    with _FINGERPRINTS_LOCK:
        entry = _FINGERPRINTS.get(oid)
        if entry is not None and entry[0]() is None:
            del _FINGERPRINTS[oid]


class ProgramCache:
    """Jitted programs by key, least recently used first out; thread-safe.

    Args:
      max_programs: how many programs to keep (each holds its compiled executables); the least
        recently used one is dropped beyond that (jax frees its executables with it).

    A key is any hashable value; pipelines use a frozen dataclass of their static settings (e.g.
    :class:`jaxdiff.pipelines.sd_program.ProgramKey`).
    """

    def __init__(self, max_programs: int = 32):
        if isinstance(max_programs, bool) or not isinstance(max_programs, int) or max_programs < 1:
            raise ValueError(f"max_programs must be an int >= 1, got {max_programs!r}")
        self.max_programs = max_programs
        self._programs: collections.OrderedDict[Hashable, Callable] = collections.OrderedDict()
        self._signatures: dict[Hashable, set] = {}
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def get(self, key: Hashable, build: Callable[[], Callable]) -> Callable:
        """The program for ``key``; ``build()`` makes it on a miss (and the cache keeps it)."""
        with self._lock:
            program = self._programs.get(key)
            if program is not None:
                self._programs.move_to_end(key)
                self.hits += 1
                return program
        program = build()  # outside the lock: tracing nothing yet, but user code may run
        with self._lock:
            if key in self._programs:  # another thread built it meanwhile: keep the first
                self.hits += 1
                self._programs.move_to_end(key)
                return self._programs[key]
            self.misses += 1
            self._programs[key] = program
            self._signatures[key] = set()
            while len(self._programs) > self.max_programs:
                old, _ = self._programs.popitem(last=False)
                del self._signatures[old]
                self.evictions += 1
        return program

    def first_call(self, key: Hashable, signature: Hashable) -> bool:
        """Whether the program for ``key`` has not been called with arguments of ``signature``
        (their shapes, dtypes, ``None`` pattern) yet, i.e. whether ``jit`` compiles on this
        call; records the signature. ``True`` also for a key that is not cached."""
        with self._lock:
            seen = self._signatures.get(key)
            if seen is None:
                return True
            if signature in seen:
                return False
            seen.add(signature)
            return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._programs)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._programs

    def keys(self) -> list:
        """The cached keys, least recently used first."""
        with self._lock:
            return list(self._programs)

    def stats(self) -> dict[str, int]:
        """``{"programs", "hits", "misses", "evictions"}``: programs held now, and lookups that
        found one / built one, and programs dropped, since creation or :meth:`clear`."""
        with self._lock:
            return dict(programs=len(self._programs), hits=self.hits, misses=self.misses,
                        evictions=self.evictions)

    def clear(self) -> None:
        """Drop every program (and its executables) and reset the statistics."""
        with self._lock:
            self._programs.clear()
            self._signatures.clear()
            self.hits = self.misses = self.evictions = 0
