"""A griffe extension for the docs site: the Sphinx roles in jaxdiff's docstrings become links.

jaxdiff's docstrings are Google style ("Args:", "Returns:", "Raises:") and name other objects
with Sphinx roles: :func:`ddim_sample`, :class:`~jaxdiff.models.UNet`, :mod:`jaxdiff.sde`.
mkdocstrings renders Markdown, where a role would read ":func:" followed by code. This
extension (``mkdocs.yml``: ``extensions: [docs/hooks/sphinx_roles.py]``) rewrites each role
before rendering:

- a target that names a jaxdiff object, written absolutely (``jaxdiff.sde.pc_sample``) or
  relative to the docstring's scope (the object itself, its class, its module and the packages
  above it, as Python would look the name up from there), becomes an *optional* cross-reference
  to the object's canonical path: a link where the site documents that object, code where it
  does not;
- a target that looks like jaxdiff's (a bare name, or one starting with ``jaxdiff.``) but names
  nothing is a broken reference: it is logged as a warning, so ``mkdocs build --strict`` fails
  and the docstring gets fixed;
- anything else (``jax.lax.scan``, ``optax.adamw``, ``numpy.ndarray``, ...) becomes code.

``~target`` shows only the last component, as in Sphinx. :func:`convert_roles` is the pure
function behind it (``tests/test_docs.py`` tests it).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

import griffe

__all__ = ["ROLE", "SphinxRoles", "convert_roles"]

_logger = griffe.get_logger("jaxdiff.docs.sphinx_roles")

# :func:`x`, :class:`~a.b.C`, :meth:`C.m`, :py:func:`x`; the target has no backquote.
ROLE = re.compile(r":(?:py:)?(?P<role>func|class|meth|mod|data|attr|obj|exc|const|"
                  r"attribute|function|module):`(?P<target>[^`]+)`")


def convert_roles(text: str, resolve: Callable[[str], Optional[str]],
                  is_external: Callable[[str], bool],
                  on_broken: Callable[[str], None]) -> str:
    """Rewrites every Sphinx role in ``text``.

    Args:
      text: a docstring.
      resolve: a target (without ``~`` and trailing ``()``) -> the canonical path of the jaxdiff
        object it names, or ``None``.
      is_external: whether an unresolved target names something outside jaxdiff.
      on_broken: called with each unresolved target that is not external.

    Returns:
      ``text`` with each role replaced by ``<autoref identifier="PATH" optional><code>SHOWN
      </code></autoref>`` (resolved) or ``` `SHOWN` ``` (external or broken).
    """

    def replace(m: re.Match) -> str:
        raw = re.sub(r"\s+", "", m["target"])  # a role may wrap across lines
        short = raw.startswith("~")
        target = raw.lstrip("~").removesuffix("()")
        shown = target.rsplit(".", 1)[-1] if short else target
        path = resolve(target)
        if path is not None:
            return f'<autoref identifier="{path}" optional><code>{shown}</code></autoref>'
        if not is_external(target):
            on_broken(target)
        return f"`{shown}`"

    return ROLE.sub(replace, text)


def _lookup(collection: Any, path: str) -> Optional[str]:
    """The canonical path of ``path`` in the loaded modules, or ``None`` (unknown, or an alias
    to an object outside the loaded packages)."""
    try:
        return collection[path].canonical_path
    except Exception:  # KeyError, AliasResolutionError, CyclicAliasError, ...
        return None


def _scopes(obj: Any) -> list[str]:
    """The dotted paths a name in ``obj``'s docstring is looked up in: ``obj`` (for members of a
    class or module), then each parent up to the top package."""
    scopes = []
    while obj is not None:
        scopes.append(obj.path)
        obj = obj.parent
    return scopes


class SphinxRoles(griffe.Extension):
    """Runs :func:`convert_roles` on every docstring once the package is loaded."""

    def __init__(self, package: str = "jaxdiff") -> None:
        super().__init__()
        self.package = package

    def _resolve(self, obj: Any, target: str) -> Optional[str]:
        collection = obj.modules_collection
        for scope in _scopes(obj):
            path = _lookup(collection, f"{scope}.{target}")
            if path is not None:
                return path
        return _lookup(collection, target)

    def _is_external(self, obj: Any, target: str) -> bool:
        if target == self.package or target.startswith(self.package + "."):
            return False
        if "." not in target:
            return False  # a bare name is looked up in jaxdiff's scopes: unresolved is broken
        first = target.split(".", 1)[0]
        collection = obj.modules_collection
        for scope in _scopes(obj):
            try:
                member = collection[f"{scope}.{first}"]
            except Exception:
                continue
            # ``import jax`` in the module: an alias whose target lies outside the package.
            return not str(getattr(member, "target_path", member.path)).startswith(self.package)
        return True  # optax.adamw, np.ndarray, torch.nn.Module, ...

    def _convert(self, obj: Any) -> None:
        if obj.docstring is None:
            return
        where = f"{obj.path} ({obj.relative_filepath}:{obj.docstring.lineno})"
        obj.docstring.value = convert_roles(
            obj.docstring.value,
            resolve=lambda t: self._resolve(obj, t),
            is_external=lambda t: self._is_external(obj, t),
            on_broken=lambda t: _logger.warning("%s: broken reference %r: it names no %s "
                                                "object", where, t, self.package))

    def on_package(self, *, pkg: Any, **kwargs: Any) -> None:
        """Converts the docstrings of ``pkg`` and of everything in it (aliases excluded: they
        show their target's docstring, converted where the target is defined)."""
        if pkg.name != self.package:
            return
        stack = [pkg]
        while stack:
            obj = stack.pop()
            self._convert(obj)
            stack.extend(m for m in obj.members.values() if not m.is_alias)
