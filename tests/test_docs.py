"""The docs site stays true (``mkdocs.yml``, ``docs/``):

- each guide page's Python snippets run, in order, in one namespace per page, from an empty
  working directory, and print nothing that reads ``False`` (the checkify snippet prints the
  out-of-bounds error it promises);
- every ``::: identifier`` of the API pages names an object that imports, and every public module
  of ``jaxdiff`` has a ``:::`` section somewhere (a new module fails here until it is added);
- every relative link and image of the pages points at a file of the repository, and every number
  in the results page's tables is one of the stored outputs its section links;
- the two build hooks (``docs/hooks/``): Sphinx roles in docstrings become cross-references,
  code, or (naming nothing) a warning, and none in ``jaxdiff`` names nothing; links that leave
  ``docs/`` are found outside code blocks.

CI also builds the site with ``mkdocs build --strict`` (``.ci/run``), which checks the rendered
cross-references; these tests catch most breakage without the build.
"""

import decimal
import importlib
import importlib.util
import logging
import pathlib
import pkgutil
import re

import pytest

import jaxdiff

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
GUIDE = ("getting-started.md", "diffusion.md", "samplers.md", "sde.md", "models.md",
         "pipelines.md", "training.md", "conversion.md")
DIRECTIVE = re.compile(r"^::: *([\w.]+)", flags=re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s#]+)[^)]*\)")


def python_blocks(path: pathlib.Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def directives() -> dict[str, str]:
    """``{identifier: page}`` of every ``:::`` section."""
    found = {}
    for page in PAGES:
        for ident in DIRECTIVE.findall(page.read_text()):
            assert ident not in found, f"{ident} is documented twice ({found[ident]}, {page.name})"
            found[ident] = str(page.relative_to(DOCS))
    return found


def load_hook(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_hooks_{name}",
                                                  DOCS / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_guide_page_has_snippets_and_is_in_the_nav():
    nav = (REPO / "mkdocs.yml").read_text()
    for name in GUIDE:
        assert python_blocks(DOCS / name), f"docs/{name} has no Python snippet"
        assert f": {name}" in nav, f"docs/{name} is not in mkdocs.yml's nav"


@pytest.mark.slow
@pytest.mark.parametrize("name", GUIDE)
def test_page_snippets_run(name, tmp_path, monkeypatch, capsys):
    if name in ("pipelines.md", "conversion.md", "getting-started.md"):
        pytest.importorskip("diffusers", reason="the snippet runs diffusers (the test extra)")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    outputs = []
    for i, block in enumerate(python_blocks(DOCS / name)):
        try:
            exec(compile(block, f"docs/{name}[python block {i}]", "exec"), namespace)
        except Exception as e:  # pragma: no cover - the message is the point
            raise AssertionError(f"docs/{name} python block {i} failed: {e!r}\n{block}") from e
        outputs.append(capsys.readouterr().out)
    assert outputs and all(out.strip() for out in outputs), (name, outputs)
    assert "False" not in "".join(outputs).split(), outputs
    if name == "diffusion.md":
        # checkify must report t + 1 = 1000 out of bounds; `err.get()` prints None otherwise.
        (i,) = [i for i, b in enumerate(python_blocks(DOCS / name)) if "jaxdiff.checked" in b]
        assert "None" not in outputs[i].split(), outputs[i]
        assert re.search(r"out-of-bounds indexing .*index 1000 ", outputs[i]), outputs[i]


def test_api_directives_resolve():
    found = directives()
    assert len(found) > 50, found
    for ident in found:
        parts = ident.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable module prefix
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
                break
            except ModuleNotFoundError:
                continue
        else:
            raise AssertionError(f"{ident} ({found[ident]}): no module of it imports")
        for attr in parts[cut:]:
            assert hasattr(obj, attr), f"{ident} ({found[ident]}): no {attr!r} in {obj!r}"
            obj = getattr(obj, attr)


def test_every_public_module_is_documented():
    found = directives()
    modules = ["jaxdiff"] + [m.name for m in pkgutil.walk_packages(jaxdiff.__path__, "jaxdiff.")
                             if not any(p.startswith("_") for p in m.name.split("."))]
    missing = [m for m in modules if m not in found]
    assert not missing, f"public modules without a ::: section in docs/: {missing}"


def test_links_point_at_files():
    missing = []
    for page in PAGES:
        prose = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        for target in LINK.findall(prose):
            if re.match(r"^[a-z][a-z0-9+.-]*:|^/", target):
                continue
            if not (page.parent / target).exists():
                missing.append(f"{page.relative_to(REPO)}: {target}")
    assert not missing, missing


def _numbers(text: str) -> list[str]:
    return re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e-?\d+)?(?!\w)", text)


def _rounds_to(shown: str, stored: list[str]) -> bool:
    """Whether some stored number, rounded to the precision ``shown`` is written with, is it
    (``0.017`` from ``0.0170``, ``1.875`` from ``1.8746``, ``4.9e8`` from ``491749115.60``)."""
    want = decimal.Decimal(shown)
    quantum = decimal.Decimal(1).scaleb(want.as_tuple().exponent)
    for y in stored:
        try:
            if decimal.Decimal(y).quantize(quantum, rounding=decimal.ROUND_HALF_EVEN) == want:
                return True
        except decimal.InvalidOperation:  # too large for the quantum's precision
            continue
    return False


def test_results_tables_come_from_their_stored_outputs():
    """Each section of the results page with a table links stored outputs in benchmarks/results/,
    and every number in its tables' cells (the row labels aside) is one of theirs, rounded."""
    text = (DOCS / "results.md").read_text()
    wrong = []
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        rows = [line for line in section.splitlines()
                if line.startswith("|") and not set(line) <= set("|-: ")]
        if not rows:
            continue
        links = re.findall(r"\]\(\.\./(benchmarks/results/[^)#]+)\)", section)
        assert links, f"section {section.splitlines()[0]!r} has a table but no stored output"
        stored = [n for link in links for n in _numbers(
            (REPO / link).read_text().replace("+-", " ").replace("±", " "))]
        for row in rows:
            for cell in row.strip("|").split("|")[1:]:
                wrong += [(section.splitlines()[0], row[:50], x)
                          for x in _numbers(cell.replace("±", " ")) if not _rounds_to(x, stored)]
    assert not wrong, wrong


def test_sphinx_roles_become_references_code_or_warnings():
    pytest.importorskip("griffe", reason="the docs extra")
    roles = load_hook("sphinx_roles")
    known = {"ddim_sample": "jaxdiff.samplers.ddim.ddim_sample",
             "jaxdiff.models.UNet": "jaxdiff.models.unet.UNet",
             "jaxdiff.samplers.sigmas": "jaxdiff.samplers.sigmas"}
    broken = []
    out = roles.convert_roles(
        "Uses :func:`ddim_sample` and :class:`~jaxdiff.models.UNet` (:mod:`jaxdiff.samplers.\n"
        "    sigmas`), like :func:`jax.lax.scan`; :func:`no_such_thing` is gone.",
        resolve=known.get, is_external=lambda t: t.startswith("jax."), on_broken=broken.append)
    assert ('<autoref identifier="jaxdiff.samplers.ddim.ddim_sample" optional>'
            '<code>ddim_sample</code></autoref>') in out
    assert ('<autoref identifier="jaxdiff.models.unet.UNet" optional><code>UNet</code>'
            '</autoref>') in out
    assert '<autoref identifier="jaxdiff.samplers.sigmas" optional>' in out
    assert "`jax.lax.scan`" in out and "`no_such_thing`" in out
    assert broken == ["no_such_thing"]
    assert ":func:" not in out and ":mod:" not in out


def test_no_docstring_role_in_jaxdiff_names_nothing(caplog):
    """The extension over the real package, as the build runs it: every :func:`x` resolves."""
    griffe = pytest.importorskip("griffe", reason="the docs extra")
    roles = load_hook("sphinx_roles")
    with caplog.at_level(logging.WARNING):
        pkg = griffe.load("jaxdiff", search_paths=[str(REPO)],
                          extensions=griffe.load_extensions(roles.SphinxRoles))
    broken = [r.getMessage() for r in caplog.records if "broken reference" in r.getMessage()]
    assert not broken, broken
    doc = pkg["samplers.euler.euler_sample"].docstring.value
    assert ('<autoref identifier="jaxdiff.samplers.euler.euler_timesteps" optional>' in doc
            and ":func:" not in doc), doc


def test_repo_links_are_found_outside_code_blocks():
    pytest.importorskip("mkdocs", reason="the docs extra")
    hook = load_hook("repo_files")
    text = ("See [x](../benchmarks/results/cpu/x.md#top), ![p](assets/p.png), [y](samplers.md)"
            " and [web](https://example.com).\n\n```bash\n[z](../not/this.md)\n```\n")
    assert list(hook.outside_links(text, "results.md")) == [
        ("../benchmarks/results/cpu/x.md", "benchmarks/results/cpu/x.md")]
    assert list(hook.outside_links("[b](../../BENCHMARKS.md)", "api/core.md")) == [
        ("../../BENCHMARKS.md", "BENCHMARKS.md")]
