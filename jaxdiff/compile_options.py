"""XLA compiler options that make jaxdiff's networks fast on the CPU, for ``jax.jit``.

    step = jax.jit(train_step, compiler_options=jaxdiff.cpu_compiler_options())

Recent XLA:CPU releases (jaxlib 0.10 here) hand convolutions, reductions and elementwise ops to
YNNPACK fusions by default. For the small-channel UNets of diffusion models that path runs almost
single-threaded: ``python -m benchmarks.profile_step`` measured an average parallelism of 1.16 on
2 cores, and ``python -m benchmarks.bench_cpu_options`` a 1.8-2.1x slower forward and 1.8x slower
backward pass than XLA's own convolution emitters (``benchmarks/results/cpu/``). :func:`cpu_compiler_options` keeps YNNPACK for matrix
multiplies only (``xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT``).

It returns ``{}`` (change nothing) when

- JAX's default backend is not the CPU (GPU/TPU compilations are untouched);
- the installed jaxlib does not know the option (it is experimental; an older or newer XLA may
  not have it), found by compiling a one-op function once;
- ``XLA_FLAGS`` already sets ``xla_cpu_experimental_ynn_fusion_type`` (your choice wins);
- the environment variable ``JAXDIFF_CPU_COMPILER_OPTIONS`` is ``0`` / ``false`` / ``off``.

The options change how XLA computes convolutions, not what: results agree with the default to
float32 rounding (``bench_cpu_options`` reports the difference; ``tests/test_compile_options.py``
trains with and without them).
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
    """``compiler_options`` for ``jax.jit`` on the CPU (see the module docstring); a new dict."""
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
