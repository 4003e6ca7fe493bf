"""XLA compiler options for ``jax.jit`` on the CPU: YNNPACK fusions for matrix multiplies only.

Usage::

    step = jax.jit(train_step, compiler_options=jaxdiff.cpu_compiler_options())

Recent XLA:CPU releases hand convolutions, reductions and elementwise ops to YNNPACK fusions by
default. :func:`cpu_compiler_options` returns :data:`CPU_COMPILER_OPTIONS`
(``xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT``), which keeps
YNNPACK for matrix multiplies and leaves convolutions to XLA's own emitters. Why, and what it
changes for jaxdiff's UNets, is measured in BENCHMARKS.md ("What limits jaxdiff on the CPU"), by
``python -m benchmarks.bench_cpu_options`` and ``python -m benchmarks.profile_step``.

It returns ``{}`` (change nothing) when

- JAX's default backend is not the CPU (GPU/TPU compilations are untouched);
- the installed jaxlib does not know the option (it is experimental; an older or newer XLA may
  not have it), found by compiling a one-op function once;
- ``XLA_FLAGS`` already sets ``xla_cpu_experimental_ynn_fusion_type`` (your choice wins);
- the environment variable ``JAXDIFF_CPU_COMPILER_OPTIONS`` is ``0`` / ``false`` / ``off`` /
  ``no`` (any case).

The options change how XLA computes convolutions, not what: results agree with XLA's defaults to
float32 rounding (``tests/test_compile_options.py`` trains with and without them).
"""

from __future__ import annotations

import functools
import os

import jax

__all__ = ["cpu_compiler_options", "CPU_COMPILER_OPTIONS"]

CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}
_OFF = ("0", "false", "off", "no")


def cpu_compiler_options() -> dict:
    """``compiler_options`` for ``jax.jit``: the XLA:CPU options, or ``{}`` where they do not apply.

    Returns:
      A new ``dict[str, str]`` each call (callers may modify it): a copy of
      :data:`CPU_COMPILER_OPTIONS`, or ``{}`` in the cases the module docstring lists. Never
      raises: an XLA that rejects the options yields ``{}``.
    """
    if os.environ.get("JAXDIFF_CPU_COMPILER_OPTIONS", "1").strip().lower() in _OFF:
        return {}
    if "xla_cpu_experimental_ynn_fusion_type" in os.environ.get("XLA_FLAGS", ""):
        return {}
    if jax.default_backend() != "cpu" or not _supported():
        return {}
    return dict(CPU_COMPILER_OPTIONS)


@functools.lru_cache(maxsize=None)
def _supported() -> bool:
    """Whether this jaxlib accepts :data:`CPU_COMPILER_OPTIONS` (one tiny compilation)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(1.0).compile()
    except Exception:  # unknown option name or value: INVALID_ARGUMENT from XLA
        return False
    return True
