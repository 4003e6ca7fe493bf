"""Shared test settings: float32 everywhere, CPU only, deterministic hypothesis profile, and the
build machines' MNIST copy (``../shared/data/mnist`` next to the checkout) as
``$JAXDIFF_MNIST_DIR`` when that directory exists and the variable is unset: the library itself
does not search there."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The command lines (experiments.cli.run) switch JAX's persistent compilation cache on in
# ~/.cache/jaxdiff/xla; tests that call them in-process must not write there (tests that want a
# cache set a tmp directory themselves).
os.environ.setdefault("JAXDIFF_COMPILATION_CACHE", "off")

_SHARED_MNIST = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                              "..", "shared", "data", "mnist"))
if os.path.isdir(_SHARED_MNIST) and not os.environ.get("JAXDIFF_MNIST_DIR"):
    os.environ["JAXDIFF_MNIST_DIR"] = _SHARED_MNIST

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
