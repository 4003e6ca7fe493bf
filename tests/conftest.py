"""Shared test settings: float32 everywhere, CPU only, deterministic hypothesis profile, and the
build machines' MNIST copy (``../shared/data/mnist`` next to the checkout) as
``$JAXDIFF_MNIST_DIR`` when that directory exists and the variable is unset: the library itself
does not search there.

Test tiers (markers registered in pyproject.toml, ``--strict-markers``): ``slow`` is set by hand on
every test that takes more than ~1.5 s on 2 cores (``pytest -m "not slow"`` is the inner loop);
``parity`` is set here on every test under tests/parity/. ``--parity-ratios=FILE`` prints and writes
each parity test's largest ratio error / tolerance (tests/parity/tolerances.py)."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The command lines (experiments.cli.run) switch JAX's persistent compilation cache on in
# ~/.cache/jaxdiff/xla; tests that call them in-process must not write there (tests that want a
# cache set a tmp directory themselves).
os.environ.setdefault("JAXDIFF_COMPILATION_CACHE", "off")
# XLA:CPU's LLVM optimisation passes off: the suite's tiny models spend most of their time
# compiling, and unoptimised code compiles about 1.5x faster (the suite's wall time drops by about a
# third on 2 cores) while computing the same float32 operations. Subprocesses inherit it.
# ``JAXDIFF_TEST_XLA_OPT=1`` keeps XLA's default (to run the suite as users compile).
if os.environ.get("JAXDIFF_TEST_XLA_OPT", "0") != "1" and \
        "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_backend_optimization_level=0").strip()

_SHARED_MNIST = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                              "..", "shared", "data", "mnist"))
if os.path.isdir(_SHARED_MNIST) and not os.environ.get("JAXDIFF_MNIST_DIR"):
    os.environ["JAXDIFF_MNIST_DIR"] = _SHARED_MNIST

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


import pytest  # noqa: E402

_PARITY_DIR = pathlib.Path(__file__).resolve().parent / "parity"


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A persistent XLA cache for one test module (a fresh directory, every compilation written):
    a module whose tests compile the same programs again (a resumed run, the reference run, a
    second command line on the same model) reads them back instead. Yields the directory; JAX's
    settings are restored after the module. Use it with
    ``pytestmark = pytest.mark.usefixtures("compilation_cache")``."""
    import jax

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield jax.config.jax_compilation_cache_dir
    for k, v in old.items():
        jax.config.update(k, v)


def pytest_addoption(parser):
    parser.addoption(
        "--parity-ratios", metavar="FILE", default=None,
        help="write each parity test's largest error / tolerance ratio to FILE (tab-separated, "
             "largest first) and print the largest ones",
    )


def pytest_collection_modifyitems(config, items):
    """Every test under tests/parity/ gets the ``parity`` marker."""
    for item in items:
        if _PARITY_DIR in pathlib.Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.parity)


_RATIOS: dict[str, tuple[float, str]] = {}  # nodeid -> (largest ratio, its comparison)


def pytest_runtest_logreport(report):
    for name, value in report.user_properties:
        if name == "parity_ratio":
            what, ratio = value
            if ratio >= _RATIOS.get(report.nodeid, (-1.0, ""))[0]:
                _RATIOS[report.nodeid] = (ratio, what)


def pytest_terminal_summary(terminalreporter, config):
    path = config.getoption("--parity-ratios")
    if not path or hasattr(config, "workerinput"):
        return
    rows = sorted(((r, node, what) for node, (r, what) in _RATIOS.items()), reverse=True)
    with open(path, "w") as f:
        f.write("ratio\ttest\tcomparison\n")
        f.writelines(f"{r:.4g}\t{node}\t{what}\n" for r, node, what in rows)
    tr = terminalreporter
    tr.section("parity: largest error / tolerance per test")
    for r, node, what in rows[:15]:
        tr.write_line(f"{r:8.3f}  {node}  [{what}]")
    over = sum(r > 1 / 3 for r, _, _ in rows)
    tr.write_line(f"{len(rows)} parity tests recorded, {over} above 1/3; all in {path}")
