"""JAX's persistent (on-disk) compilation cache, switched on in one call.

A process that compiles a function XLA has compiled before (same program, shapes, shardings,
compiler options, jax / jaxlib version and device kind) loads the executable from the cache
directory instead of compiling it again: the second ``python -m experiments.train_mnist`` starts
its first step in a fraction of the cold start time. The experiments' command lines call
:func:`enable` before anything is compiled; library code never does (nothing in ``jaxdiff``
changes JAX's global configuration on its own), so a program that uses the library directly calls
it itself::

    import jaxdiff.compile_cache
    jaxdiff.compile_cache.enable()          # before the first jit call

Where the cache lives, in this order of precedence:

1. ``jax.config.jax_compilation_cache_dir`` if it is already set (by ``JAX_COMPILATION_CACHE_DIR``
   or ``jax.config.update``): JAX's own setting wins and is left as it is;
2. ``$JAXDIFF_COMPILATION_CACHE``: a directory, or ``0`` / ``false`` / ``off`` / ``no`` (any case)
   to switch the cache off;
3. ``$XDG_CACHE_HOME/jaxdiff/xla``, where ``XDG_CACHE_HOME`` defaults to ``~/.cache``.

The cache is trusted code: do not point it at a directory that others can write (JAX's warning).
Entries are never evicted by jaxdiff; delete the directory to reclaim the space. On a GPU, JAX
also keeps XLA's per-fusion autotuning results there (``jax_persistent_cache_enable_xla_caches``).
On the CPU, XLA checks that a cached executable suits the host before loading it; on some CPUs
that check rejects every entry (jax-ml/jax#38445), and each process compiles as without a cache.

    >>> import os
    >>> saved = os.environ.get(ENV_VAR)
    >>> os.environ[ENV_VAR] = "off"
    >>> cache_dir() is None
    True
    >>> os.environ[ENV_VAR] = "/tmp/my_cache"
    >>> cache_dir()
    '/tmp/my_cache'
    >>> _ = os.environ.pop(ENV_VAR) if saved is None else os.environ.update({ENV_VAR: saved})
"""

from __future__ import annotations

import os
from typing import Optional

import jax

__all__ = ["ENV_VAR", "DEFAULT_MIN_COMPILE_TIME_SECS", "cache_dir", "enable"]

ENV_VAR = "JAXDIFF_COMPILATION_CACHE"
# Compilations faster than this are not written (JAX's default is 1 s). The experiments' many small
# jitted helpers (key splits, replication, metrics) each compile in well under JAX's threshold;
# reading them back is faster than compiling them, and together they are a visible part of a warm
# start (BENCHMARKS.md, "Compile time").
DEFAULT_MIN_COMPILE_TIME_SECS = 0.0
_OFF = ("0", "false", "off", "no", "none")


def cache_dir() -> Optional[str]:
    """The directory :func:`enable` would use when JAX has none set, from the environment.

    Returns:
      ``None`` when ``$JAXDIFF_COMPILATION_CACHE`` switches the cache off; else the absolute path
      it names, or ``$XDG_CACHE_HOME/jaxdiff/xla`` (``~/.cache/jaxdiff/xla``) when it is unset
      or empty. Nothing is created.
    """
    value = os.environ.get(ENV_VAR, "").strip()
    if value.lower() in _OFF:
        return None
    if value:
        return os.path.abspath(os.path.expanduser(value))
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join("~", ".cache")
    return os.path.abspath(os.path.join(os.path.expanduser(base), "jaxdiff", "xla"))


def enable(path: Optional[str] = None, *,
           min_compile_time_secs: float = DEFAULT_MIN_COMPILE_TIME_SECS) -> Optional[str]:
    """Switches JAX's persistent compilation cache on; returns the directory in use (or None).

    Call it before the first compilation that should be cached. A ``path`` other than the one
    JAX already uses takes effect at once (JAX's cache is reset to reopen there).

    Args:
      path: the cache directory (created on first write). None: JAX's own
        ``jax_compilation_cache_dir`` if already set (then nothing is changed and that directory
        is returned), else :func:`cache_dir` (which may say off).
      min_compile_time_secs: compilations that took less than this many seconds are not written
        (``jax_persistent_cache_min_compile_time_secs``); >= 0. Ignored when JAX's directory
        was already set.

    Returns:
      The cache directory compilations are now read from and written to, or ``None`` when
      ``path`` is None, JAX has no directory set and ``$JAXDIFF_COMPILATION_CACHE`` says off
      (then nothing is changed: no cache is written).

    Raises:
      ValueError: ``min_compile_time_secs`` is negative or not a number.
    """
    min_s = float(min_compile_time_secs)
    if not min_s >= 0:
        raise ValueError(f"min_compile_time_secs must be >= 0, got {min_compile_time_secs!r}")
    if path is None:
        current = jax.config.jax_compilation_cache_dir
        if current:
            return current
        path = cache_dir()
        if path is None:
            return None
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    jax.config.update("jax_enable_compilation_cache", True)
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        # JAX opens its cache once, at the first compilation with a directory set: a cache opened
        # on another directory earlier in this process would otherwise stay in use.
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_s)
    return path
