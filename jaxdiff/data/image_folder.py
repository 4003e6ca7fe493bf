"""A folder of images with captions, read in the conventions fine-tuning users already have.

:func:`read_image_folder` lists the images of a folder (``.png .jpg .jpeg .webp .bmp``, any
case, subfolders included, hidden files and folders skipped) in sorted order of their relative
paths, and reads one caption per image from either

- ``metadata.jsonl`` at the folder's root, one JSON object a line with ``file_name`` (the image's
  path relative to the folder) and a caption column (``text`` by default), as Hugging Face's
  ``imagefolder`` and diffusers' ``train_text_to_image`` read it; or
- a ``.txt`` file beside each image with the same stem (``cat.png`` + ``cat.txt``), as kohya's
  scripts read it: its first line, stripped; or
- one ``caption`` for every image (DreamBooth's instance prompt).

Every image is opened and decoded once while the folder is read (JPEGs at a reduced DCT scale),
so that a truncated or foreign file is found before training starts, not in the middle of a run:
``on_bad_image="warn"`` skips it with a ``logging`` warning that names it, ``"error"`` raises.

The pixels (resize, crop, flip, ``[-1, 1]``) are :mod:`jaxdiff.data.image_transforms`; the
resumable batches for the training loop are :mod:`jaxdiff.data.image_source` (square crops) and
:mod:`jaxdiff.data.image_buckets` (aspect-ratio buckets).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Optional, Sequence, Tuple

from jaxdiff.validation import InvalidFileError, check_choice

__all__ = ["IMAGE_EXTENSIONS", "CAPTION_SOURCES", "ImageFolder", "read_image_folder",
           "check_image", "metadata_rows"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
"""The file name endings read as images (compared lower-cased)."""

CAPTION_SOURCES = ("auto", "metadata", "txt")
"""``read_image_folder``'s ``caption_source`` values; ``"auto"``: ``metadata.jsonl`` if the
folder has one, else ``.txt`` files."""

METADATA_FILE = "metadata.jsonl"


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """The records of an image folder: one image file and its caption each.

    Attributes:
      root: the folder (absolute path).
      files: ``N`` absolute image paths, sorted by their path relative to ``root``.
      captions: ``N`` captions, ``captions[i]`` for ``files[i]``.
      skipped: images left out because they could not be decoded (``on_bad_image="warn"``).
    """

    root: str
    files: Tuple[str, ...]
    captions: Tuple[str, ...]
    skipped: Tuple[str, ...] = ()

    def __post_init__(self):
        if len(self.files) != len(self.captions):
            raise ValueError(f"ImageFolder: {len(self.files)} files but {len(self.captions)} "
                             "captions")
        if not self.files:
            raise ValueError(f"ImageFolder {self.root}: no images")

    def __len__(self) -> int:
        return len(self.files)


def check_image(path: str) -> None:
    """Opens and decodes ``path`` with Pillow (a JPEG at a reduced scale, which still reads every
    byte of it).

    Raises:
      InvalidFileError: naming ``path``, for a file Pillow cannot decode (not an image, truncated,
        corrupt, or a decompression bomb).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))
            im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBomb...
        raise InvalidFileError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def _list_images(root: pathlib.Path) -> list[pathlib.Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(pathlib.Path(dirpath, name))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def metadata_rows(meta: pathlib.Path):
    """``(line number, row dict)`` for each non-blank line of a ``metadata.jsonl`` file.

    Raises:
      InvalidFileError: naming the file and line, for a line that is not a JSON object.
    """
    with open(meta, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidFileError(f"{meta}: line {n} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise InvalidFileError(f"{meta}: line {n} is not a JSON object")
            yield n, row


def _metadata_captions(root: pathlib.Path, column: str) -> dict[str, str]:
    """``{relative posix path: caption}`` from ``root/metadata.jsonl``."""
    meta = root / METADATA_FILE
    captions: dict[str, str] = {}
    for n, row in metadata_rows(meta):
        name, text = row.get("file_name"), row.get(column)
        if not isinstance(name, str) or not name:
            raise InvalidFileError(f"{meta}: line {n} has no 'file_name' string")
        if column not in row:
            raise InvalidFileError(
                f"{meta}: line {n} ({name}) has no caption column {column!r} (its keys: "
                f"{sorted(row)}; choose the column with caption_column=)")
        if not isinstance(text, str):
            raise InvalidFileError(f"{meta}: line {n} ({name}): the caption {column!r} must "
                                   f"be a string, got {type(text).__name__}")
        rel = pathlib.PurePosixPath(name.replace("\\", "/"))
        path = root / rel
        if rel.is_absolute() or ".." in rel.parts or not path.is_file():
            raise InvalidFileError(f"{meta}: line {n} names {name!r}, which is not a file "
                                   f"in {root}")
        key = path.relative_to(root).as_posix()
        if key in captions:
            raise InvalidFileError(f"{meta}: line {n} names {name!r} a second time")
        captions[key] = text
    return captions


def _txt_caption(image: pathlib.Path, extension: str) -> Optional[str]:
    txt = image.with_suffix(extension)
    if not txt.is_file():
        return None
    lines = txt.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    return lines[0].strip() if lines else ""


def read_image_folder(path: str | os.PathLike, *, caption_source: str = "auto",
                      caption_column: str = "text", caption_extension: str = ".txt",
                      caption: Optional[str] = None, on_bad_image: str = "warn") -> ImageFolder:
    """Lists a folder's images and their captions, and checks that every image decodes.

    Args:
      path: the folder.
      caption_source: ``"metadata"`` (``metadata.jsonl``), ``"txt"`` (a caption file beside each
        image) or ``"auto"`` (``metadata.jsonl`` if the folder has one, else ``"txt"``).
      caption_column: the caption's key in ``metadata.jsonl`` (diffusers' ``--caption_column``).
      caption_extension: the caption files' ending for ``"txt"`` (kohya's
        ``--caption_extension``), e.g. ``".caption"``.
      caption: one caption for every image (DreamBooth's instance prompt); caption files are
        then not read.
      on_bad_image: ``"warn"``: an image that does not decode is left out (listed in
        ``skipped``) with a ``logging`` warning naming it; ``"error"``: it raises.

    Returns:
      An :class:`ImageFolder`. Images of ``metadata.jsonl`` that it does not name, and names that
      are not files, are errors (not silently dropped).

    Raises:
      ValueError: one line naming the folder, file or argument: ``path`` is not a folder; it has
        no images (or none that decode); an image without a caption (the first such file and the
        count); a bad ``caption_source`` / ``on_bad_image``. :class:`InvalidFileError` (a
        ``ValueError``): a ``metadata.jsonl`` line that is not JSON, lacks ``file_name`` or the
        caption column, or names a file that does not exist (its line number); an undecodable
        image with ``on_bad_image="error"``.
    """
    check_choice("caption_source", caption_source, CAPTION_SOURCES)
    check_choice("on_bad_image", on_bad_image, ("warn", "error"))
    if caption is not None and not isinstance(caption, str):
        raise ValueError(f"caption must be a str or None, got {type(caption).__name__}")
    root = pathlib.Path(path).expanduser().absolute()
    if not root.is_dir():
        raise ValueError(f"image folder {root}: not a directory")
    images = _list_images(root)
    if not images:
        raise ValueError(f"image folder {root}: no images (looked for "
                         f"{'/'.join(IMAGE_EXTENSIONS)} files, subfolders included)")
    rel = [p.relative_to(root).as_posix() for p in images]
    if caption is not None:
        captions: Sequence[Optional[str]] = [caption] * len(images)
    else:
        source = caption_source
        if source == "auto":
            source = "metadata" if (root / METADATA_FILE).is_file() else "txt"
        if source == "metadata":
            if not (root / METADATA_FILE).is_file():
                raise ValueError(f"image folder {root}: caption_source='metadata' but there is "
                                 f"no {METADATA_FILE}")
            table = _metadata_captions(root, caption_column)
            others = sorted(set(table) - set(rel))
            if others:
                raise ValueError(f"{root / METADATA_FILE}: names {others[0]!r}, which is not an "
                                 f"image ({'/'.join(IMAGE_EXTENSIONS)})")
            captions = [table.get(r) for r in rel]
            where = f"no line in {METADATA_FILE}"
        else:
            captions = [_txt_caption(p, caption_extension) for p in images]
            where = f"no {caption_extension} file beside it"
        missing = [r for r, c in zip(rel, captions) if c is None]
        if missing:
            raise ValueError(f"image folder {root}: {missing[0]} has no caption ({where})"
                             + (f"; {len(missing) - 1} more images lack one"
                                if len(missing) > 1 else ""))
    files, kept, skipped = [], [], []
    for p, c in zip(images, captions):
        try:
            check_image(str(p))
        except InvalidFileError as e:
            if on_bad_image == "error":
                raise
            log.warning("skipping %s (on_bad_image='warn')", e)
            skipped.append(str(p))
            continue
        files.append(str(p))
        kept.append(c)
    if not files:
        raise ValueError(f"image folder {root}: none of its {len(images)} images could be "
                         "decoded")
    return ImageFolder(str(root), tuple(files), tuple(kept), tuple(skipped))
