"""Shared pieces of the GPU suite (``benchmarks/gpu_suite.py``): what is installed, the peak FLOP/s
of the detected device, and the rows each part records.

The suite's driver never imports JAX or torch (a JAX import there would take GPU memory from the
parts): :func:`package_versions` reads installed metadata only. Each part runs in its own process
(``python -m benchmarks.gpu_suite_<part> --rows FILE --workdir DIR [--smoke]``), prints a
markdown table for the stored output and appends one JSON object per measured row to ``FILE``
(:class:`Recorder`), flushed at once: a part stopped at its time cap keeps the rows it finished.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import statistics
import time

__all__ = ["PACKAGES", "PEAK_BF16_FLOPS", "package_versions", "missing_modules", "peak_flops",
           "Recorder", "part_parser", "median_time", "fmt"]

# (import name, distribution name) of everything a part may import.
PACKAGES = (("jax", "jax"), ("jaxlib", "jaxlib"), ("flax", "flax"), ("optax", "optax"),
            ("orbax.checkpoint", "orbax-checkpoint"), ("chex", "chex"),
            ("ml_collections", "ml_collections"), ("numpy", "numpy"), ("torch", "torch"),
            ("diffusers", "diffusers"), ("transformers", "transformers"), ("peft", "peft"),
            ("safetensors", "safetensors"), ("tokenizers", "tokenizers"))

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s per device, from the vendors' datasheets;
# matched in order against the lower-cased ``device_kind`` (the first key contained in it wins).
PEAK_BF16_FLOPS = (
    ("h100 pcie", 756e12), ("h100 nvl", 835e12), ("h100", 989.4e12), ("h200", 989.4e12),
    ("gh200", 989.4e12), ("b200", 2250e12), ("a100", 312e12), ("a10g", 70e12),
    ("l40s", 362e12), ("l4", 121e12), ("v100", 125e12),  # V100: fp16 (no bf16 units)
    ("tpu v4", 275e12), ("tpu v5 lite", 197e12), ("tpu v5e", 197e12), ("tpu v5p", 459e12),
    ("tpu v5", 459e12), ("tpu v6", 918e12),
)


def package_versions() -> dict:
    """``{import name: version or None}`` for :data:`PACKAGES`, without importing them (None: the
    module cannot be found)."""
    out = {}
    for module, dist in PACKAGES:
        if importlib.util.find_spec(module.split(".")[0]) is None or (
                "." in module and importlib.util.find_spec(module) is None):
            out[module] = None
            continue
        try:
            out[module] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[module] = "unknown version"
    return out


def missing_modules(needs, versions: dict) -> list:
    """The names in ``needs`` that ``versions`` (:func:`package_versions`) marks as absent."""
    return [m for m in needs if versions.get(m) is None]


def peak_flops(device_kind: str):
    """``(FLOP/s, table key)`` of :data:`PEAK_BF16_FLOPS` for a JAX ``device_kind``, or
    ``(None, None)`` when the table has no entry (a CPU, an unknown accelerator)."""
    kind = device_kind.lower()
    for key, value in PEAK_BF16_FLOPS:
        if key in kind:
            return value, key
    return None, None


class Recorder:
    """Appends rows (JSON objects) to a JSON-lines file, one ``write`` + flush per row."""

    def __init__(self, path: str, part: str):
        self.path, self.part = path, part

    def row(self, **fields) -> dict:
        fields = {"part": self.part, **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(fields, default=_plain) + "\n")
        return fields


def _plain(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


def part_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every part takes: ``--rows`` (the JSON-lines file), ``--workdir`` (shared
    between the parts: the SD folder, the compilation caches) and ``--smoke`` (tiny sizes)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--rows", required=True, help="JSON-lines file the rows are appended to")
    p.add_argument("--workdir", required=True, help="folder shared by the suite's parts")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for the CPU")
    return p


def median_time(fn, repeats: int, sync=None) -> tuple:
    """``(seconds of the first call, median seconds of the next repeats, the last output)``;
    ``sync(out)`` waits for the device (default: ``benchmarks.common.sync``)."""
    if sync is None:
        from benchmarks.common import sync
    t0 = time.perf_counter()
    out = sync(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = sync(fn())
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), out


def fmt(v, spec: str = ".3g") -> str:
    """A table cell: ``-`` for None / NaN, else ``format(v, spec)``."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


