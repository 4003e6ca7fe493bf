"""The ``>>>`` examples in jaxdiff's docstrings run as doctests and print what they show.

Every module under ``jaxdiff/`` is covered (``EXCLUDED`` lists exceptions: none). Examples that
cannot run cheaply are written as plain ``::`` blocks instead.
"""

import doctest
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXCLUDED: tuple[str, ...] = ()
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _module_names():
    names = []
    for path in sorted((ROOT / "jaxdiff").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        if not any(name == e or name.startswith(e + ".") for e in EXCLUDED):
            names.append(name)
    return names


MODULES = _module_names()


def _run(name):
    """(examples attempted, failure report) of one module's doctests."""
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report = []
    for test in finder.find(module, name):
        runner.run(test, out=report.append)
    results = runner.summarize(verbose=False)
    return results.attempted, results.failed, "".join(report)


# modules whose examples take more than ~1.5 s on 2 cores (they build and run models): slow tier
SLOW = ("jaxdiff.models.autoencoder", "jaxdiff.metrics.classifier", "jaxdiff.models.clip_text",
        "jaxdiff.models.unet", "jaxdiff.sde.models", "jaxdiff.losses")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow)
                                  if n.startswith(SLOW) else n for n in MODULES])
def test_module_doctests_pass(name):
    attempted, failed, report = _run(name)
    assert failed == 0, f"{failed} of {attempted} doctest examples failed in {name}:\n{report}"
    source = pathlib.Path(importlib.import_module(name).__file__).read_text()
    if ">>>" in source:  # an example the finder does not reach would pass silently
        assert attempted > 0, f"{name} has '>>>' examples but doctest found none"


def test_the_module_list_is_complete():
    assert "jaxdiff.losses" in MODULES and "jaxdiff.training.step" in MODULES
    assert "jaxdiff.samplers.registry" in MODULES and "jaxdiff.samplers.sigmas" in MODULES
    assert len(MODULES) >= 20, MODULES
