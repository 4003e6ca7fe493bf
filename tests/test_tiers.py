"""The test tiers: ``slow`` and ``parity`` are registered markers, unknown markers are errors
(``--strict-markers``), and every test under tests/parity/ carries ``parity`` (set by
tests/conftest.py), none elsewhere."""

import ast
import pathlib
import subprocess
import sys
import textwrap
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUILTIN_MARKS = {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings"}


def _ini() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]


def _marks_used() -> dict[str, set[str]]:
    """``pytest.mark.<name>`` names used in tests/, by file."""
    used: dict[str, set[str]] = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "mark" and isinstance(node.value.value, ast.Name)
                    and node.value.value.id == "pytest"):
                used.setdefault(node.attr, set()).add(str(path.relative_to(ROOT)))
    return used


def test_markers_are_registered_and_strict():
    ini = _ini()
    assert "--strict-markers" in ini["addopts"].split()
    registered = {line.split(":")[0].strip() for line in ini["markers"]}
    assert {"slow", "parity"} <= registered
    used = _marks_used()
    unknown = {name: files for name, files in used.items()
               if name not in registered | BUILTIN_MARKS}
    assert not unknown, f"unregistered markers: {unknown}"
    assert "slow" in used  # the inner loop deselects something


def test_the_hook_marks_tests_under_tests_parity_and_nothing_else():
    from tests import conftest

    class Item:
        def __init__(self, path):
            self.path, self.marks = path, []

        def add_marker(self, mark):
            self.marks.append(mark)

    parity = Item(ROOT / "tests" / "parity" / "test_any_parity.py")
    other = Item(ROOT / "tests" / "test_parity_named_but_elsewhere.py")
    conftest.pytest_collection_modifyitems(None, [parity, other])
    assert [m.name for m in parity.marks] == ["parity"]
    assert other.marks == []


def _collect(*args) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-n", "0", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 5), proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_every_collected_parity_test_has_the_marker():
    """End to end: collecting a parity module with ``-m "not parity"`` deselects every test, so
    ``-m parity`` selects them all (a marker expression and its negation split the same
    collection). One module: the hook marks by directory (the test above), and collecting all of
    tests/parity imports every reference model, which costs more than it checks."""
    out = _collect("-m", "not parity", "tests/parity/test_schedule_parity.py")
    assert "no tests collected" in out and "deselected" in out, out[-2000:]
    out = _collect("-m", "parity", "tests/test_tiers.py")
    assert "no tests collected" in out, out[-2000:]


def test_a_module_runs_on_one_worker(tmp_path):
    """pyproject's ``--dist loadfile``: under ``-n 2`` a module-scoped fixture is built once,
    however its module's tests are spread (pytest-xdist's ``loadgroup`` would not do: its groups
    rewrite ``item._nodeid``, which pytest 9.2 no longer reads)."""
    log = tmp_path / "built.txt"
    (tmp_path / "test_one_module.py").write_text(textwrap.dedent(f"""
        import os, time, pytest

        @pytest.fixture(scope="module")
        def built():
            with open({str(log)!r}, "a") as f:
                f.write(f"{{os.getpid()}}\\n")

        @pytest.mark.parametrize("i", range(8))
        def test_uses_it(built, i):
            time.sleep(0.05)
    """))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n",
                           "2", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
                           str(tmp_path / "test_one_module.py")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(log.read_text().split()) == 1, log.read_text()
