"""The import layering of the package: which parts of jaxdiff may use which.

Inference (``jaxdiff.pipelines``) does not depend on training; the samplers, models and losses
know nothing of file formats, pipelines or training; no library module imports the command lines,
benchmarks or tests. Checked two ways: statically (every import statement of a package's files,
function-level ones included) and on a fresh interpreter (what importing a package loads,
transitively).
"""

import ast
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# package -> the packages its files may not import
FORBIDDEN = {
    "jaxdiff.pipelines": ("jaxdiff.training", "jaxdiff.data", "jaxdiff.metrics"),
    "jaxdiff.samplers": ("jaxdiff.training", "jaxdiff.pipelines", "jaxdiff.convert",
                         "jaxdiff.models", "jaxdiff.data", "jaxdiff.metrics"),
    "jaxdiff.models": ("jaxdiff.training", "jaxdiff.pipelines", "jaxdiff.samplers",
                       "jaxdiff.convert", "jaxdiff.data", "jaxdiff.metrics"),
    "jaxdiff.losses": ("jaxdiff.training", "jaxdiff.pipelines", "jaxdiff.samplers",
                       "jaxdiff.models", "jaxdiff.convert"),
    "jaxdiff.sharding": ("jaxdiff.training", "jaxdiff.pipelines", "jaxdiff.models",
                         "jaxdiff.samplers"),
    "jaxdiff.training": ("jaxdiff.pipelines", "jaxdiff.samplers", "jaxdiff.models",
                         "jaxdiff.convert"),
    "jaxdiff": ("experiments", "benchmarks", "tests"),
}


def _imports(path: pathlib.Path, package: str) -> list[str]:
    """The absolute module names ``path`` imports (relative imports resolved)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.append(".".join(base + ([node.module] if node.module else [])))
            else:
                names.append(node.module)
    return names


def _files(package: str) -> list[pathlib.Path]:
    path = ROOT.joinpath(*package.split("."))
    return sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_does_not_import_the_layers_above(package):
    bad = []
    for path in _files(package):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for name in _imports(path, module):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package]):
                bad.append(f"{path.relative_to(ROOT)}: {name}")
    assert not bad, bad


def _loaded_after_import(name: str) -> list[str]:
    code = (f"import sys, json; import {name}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('jaxdiff', 'experiments', 'benchmarks', 'tests'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("package, forbidden", [
    ("jaxdiff", ("jaxdiff.training", "jaxdiff.pipelines", "jaxdiff.data", "jaxdiff.metrics",
                 "experiments")),
    ("jaxdiff.pipelines", ("jaxdiff.training", "jaxdiff.data", "jaxdiff.metrics",
                           "experiments")),
])
def test_importing_loads_no_layer_above(package, forbidden):
    """Transitively: ``import jaxdiff.pipelines`` (inference) loads nothing of training."""
    loaded = _loaded_after_import(package)
    assert package in loaded
    bad = [m for m in loaded for f in forbidden if m == f or m.startswith(f + ".")]
    assert not bad, f"importing {package} loads {bad}"


def _command_lines() -> list[str]:
    """The command-line modules: ``experiments/*.py`` with a module-level ``main``."""
    out = []
    for path in sorted(ROOT.joinpath("experiments").glob("*.py")):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            out.append(f"experiments.{path.stem}")
    return out


def _imported_modules(path: pathlib.Path, package: str) -> set[str]:
    """Every module ``path`` imports, with ``from a import b`` also counted as ``a.b``."""
    names = set(_imports(path, package))
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_command_lines_do_not_import_each_other():
    """A command line is a thin ``main`` over library functions (ARCHITECTURE.md): none imports
    another (statically, function-level imports included); what two of them share lives in a
    module without a ``main``."""
    clis = _command_lines()
    assert len(clis) >= 10 and "experiments.train_mnist" in clis, clis
    bad = []
    for name in clis:
        path = ROOT.joinpath(*name.split(".")).with_suffix(".py")
        others = set(clis) - {name}
        hits = {m for m in _imported_modules(path, name) for o in others
                if m == o or m.startswith(o + ".")}
        bad += [f"{name} imports {h}" for h in sorted(hits)]
    assert not bad, bad
