"""mkdocs hook: docs pages may link files of the repository outside ``docs/``.

The results page links each figure's stored script output (``../benchmarks/results/cpu/...``),
and the nav holds ``BENCHMARKS.md``. mkdocs neither finds nor checks files outside ``docs_dir``.
This hook (``mkdocs.yml``: ``hooks: [docs/hooks/repo_files.py]``)

- ``on_files``: collects each relative link of a docs page that leaves ``docs/`` (and the links
  of the repository's Markdown files reached that way, and the nav's ``repo/...`` entries), and
  adds each linked repository file to the site as ``repo/<path in the repository>``;
  ``BENCHMARKS.md`` becomes ``repo/BENCHMARKS.md``, so its own ``benchmarks/results/...`` links
  resolve beside it. A link to a file that does not exist is a warning, which fails
  ``mkdocs build --strict``;
- ``on_page_markdown``: rewrites those links to the files' places under ``repo/``, where mkdocs
  checks them like any other link.

The sources keep the repository-relative form (``../benchmarks/results/cpu/x.md`` from
``docs/results.md``), which works on GitHub as well.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from typing import Any, Iterator

from mkdocs.structure.files import File, Files

__all__ = ["PREFIX", "LINK", "outside_links", "on_files", "on_page_markdown"]

PREFIX = "repo/"
# [text](target) and ![alt](target), with an optional "#fragment" and an optional "title".
LINK = re.compile(r"(?P<head>!?\[[^\]]*\]\()(?P<target>[^)\s#]+)(?P<tail>(?:#[^)\s]*)?"
                  r"(?:\s+\"[^\"]*\")?\))")
FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", flags=re.M | re.S)

_log = logging.getLogger("mkdocs.hooks.repo_files")
_root = ""  # the repository root (the directory of mkdocs.yml), set by on_files


def _is_relative(target: str) -> bool:
    return not re.match(r"^([a-z][a-z0-9+.-]*:|/|#)", target, flags=re.I)


def _outside_fences(text: str) -> Iterator[tuple[bool, str]]:
    """``(is_prose, segment)`` pieces of ``text``; fenced code blocks are not prose."""
    pos = 0
    for m in FENCE.finditer(text):
        yield True, text[pos:m.start()]
        yield False, m.group(0)
        pos = m.end()
    yield True, text[pos:]


def outside_links(text: str, src_uri: str) -> Iterator[tuple[str, str]]:
    """``(target, repo_path)`` for each relative link in the prose of ``text`` (a docs page at
    ``src_uri``) that leaves ``docs/``; ``repo_path`` is relative to the repository root."""
    base = posixpath.dirname(src_uri)
    for prose, segment in _outside_fences(text):
        if not prose:
            continue
        for m in LINK.finditer(segment):
            target = m["target"]
            if not _is_relative(target):
                continue
            path = posixpath.normpath(posixpath.join(base, target))
            if path.startswith("../"):
                yield target, path[len("../"):]


def _repo_links(repo_path: str, text: str) -> Iterator[str]:
    """Repository-relative paths linked from a repository Markdown file (relative links)."""
    base = posixpath.dirname(repo_path)
    for prose, segment in _outside_fences(text):
        if not prose:
            continue
        for m in LINK.finditer(segment):
            if _is_relative(m["target"]):
                path = posixpath.normpath(posixpath.join(base, m["target"]))
                if not path.startswith("../"):
                    yield path


def _nav_repo_entries(nav: Any) -> Iterator[str]:
    if isinstance(nav, str):
        if nav.startswith(PREFIX):
            yield nav[len(PREFIX):]
    elif isinstance(nav, dict):
        for v in nav.values():
            yield from _nav_repo_entries(v)
    elif isinstance(nav, list):
        for v in nav:
            yield from _nav_repo_entries(v)


def on_files(files: Files, config: Any) -> Files:
    global _root
    _root = os.path.dirname(os.path.abspath(config.config_file_path))
    wanted: list[tuple[str, str]] = [(p, "the nav") for p in _nav_repo_entries(config.nav)]
    for f in files.documentation_pages():
        with open(f.abs_src_path, encoding="utf-8") as fh:
            text = fh.read()
        wanted += [(p, f.src_uri) for _, p in outside_links(text, f.src_uri)]
    seen: set[str] = set()
    while wanted:
        path, linked_from = wanted.pop()
        if path in seen:
            continue
        seen.add(path)
        abs_path = os.path.join(_root, path)
        if os.path.isdir(abs_path):
            continue  # a folder link: GitHub lists it; the site has no page for it
        if not os.path.isfile(abs_path):
            _log.warning("%s links %r, which is not a file of the repository", linked_from, path)
            continue
        files.append(File.generated(config, PREFIX + path, abs_src_path=abs_path))
        if path.endswith(".md"):
            with open(abs_path, encoding="utf-8") as fh:
                wanted += [(p, path) for p in _repo_links(path, fh.read())]
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    src_uri = page.file.src_uri
    if src_uri.startswith(PREFIX):
        return markdown  # a repository file: its links are relative to its place under repo/
    base = posixpath.dirname(src_uri)

    def rewrite(m: re.Match) -> str:
        target = m["target"]
        if not _is_relative(target):
            return m.group(0)
        path = posixpath.normpath(posixpath.join(base, target))
        if not path.startswith("../") or files.get_file_from_path(
                PREFIX + path[len("../"):]) is None:
            return m.group(0)
        new = posixpath.relpath(PREFIX + path[len("../"):], base or ".")
        return m["head"] + new + m["tail"]

    return "".join(LINK.sub(rewrite, seg) if prose else seg
                   for prose, seg in _outside_fences(markdown))
