"""A folder of (control image, target image, caption) triples for training a ControlNet, in the
layout diffusers' ``train_controlnet`` reads through Hugging Face's ``imagefolder``:
``metadata.jsonl`` at the folder's root, one JSON object a line with

- ``file_name``: the target image's path relative to the folder;
- ``text`` (the caption column, :func:`read_controlnet_folder`'s ``caption_column``);
- ``conditioning_image`` (``conditioning_column``): the control image's path relative to the
  folder (e.g. ``conditioning/0001.png``).

The lines define the examples, in the file's order; other images in the folder (the control
images themselves) are not examples. Every image is decoded once while the folder is read, and
each control image must have its target's size (the ControlNet sees them pixel for pixel): a
missing or undecodable control image and a size mismatch are errors that name the line and the
files. The pixels: :func:`jaxdiff.data.load_images` for the targets (``[-1, 1]``),
:func:`load_conditioning_images` for the control images (``[0, 1]``, diffusers' convention).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Tuple

import numpy as np

from jaxdiff.data.image_folder import METADATA_FILE, ImageFolder, check_image, metadata_rows
from jaxdiff.data.image_transforms import load_images
from jaxdiff.validation import InvalidFileError, check_int

__all__ = ["CONDITIONING_COLUMN", "ControlNetFolder", "read_controlnet_folder",
           "load_conditioning_images"]

CONDITIONING_COLUMN = "conditioning_image"
"""diffusers' ``train_controlnet`` default ``--conditioning_image_column``."""


@dataclasses.dataclass(frozen=True)
class ControlNetFolder:
    """The examples of a ControlNet folder.

    Attributes:
      images: the targets and their captions (an :class:`~jaxdiff.data.ImageFolder`).
      conditioning: ``N`` absolute paths, ``conditioning[i]`` the control image of
        ``images.files[i]``.
    """

    images: ImageFolder
    conditioning: Tuple[str, ...]

    def __post_init__(self):
        if len(self.conditioning) != len(self.images.files):
            raise ValueError(f"ControlNetFolder: {len(self.images.files)} images but "
                             f"{len(self.conditioning)} control images")

    def __len__(self) -> int:
        return len(self.conditioning)


def _path(root: pathlib.Path, meta: pathlib.Path, n: int, column: str, name) -> pathlib.Path:
    if not isinstance(name, str) or not name:
        raise InvalidFileError(f"{meta}: line {n} has no {column!r} string")
    rel = pathlib.PurePosixPath(name.replace("\\", "/"))
    path = root / rel
    if rel.is_absolute() or ".." in rel.parts or not path.is_file():
        what = "control image" if column != "file_name" else "image"
        raise InvalidFileError(f"{meta}: line {n}: the {what} {column}={name!r} is not a file "
                               f"in {root}")
    return path


def _size(path: pathlib.Path) -> Tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def read_controlnet_folder(path: str | os.PathLike, *,
                           conditioning_column: str = CONDITIONING_COLUMN,
                           caption_column: str = "text") -> ControlNetFolder:
    """Reads a ControlNet folder's ``metadata.jsonl`` (module docstring) and checks every pair.

    Args:
      path: the folder.
      conditioning_column: the control image's key (diffusers' ``--conditioning_image_column``).
      caption_column: the caption's key (diffusers' ``--caption_column``).

    Returns:
      A :class:`ControlNetFolder`, in the order of ``metadata.jsonl``.

    Raises:
      ValueError: one line naming the folder, file, line or argument: ``path`` not a folder or
        without ``metadata.jsonl``; no examples. :class:`~jaxdiff.validation.InvalidFileError`
        (a ``ValueError``): a line that is not a JSON object, lacks ``file_name``, the caption
        or the control image, names a file that does not exist (the image or its control
        image) or an image named twice; an image that does not decode; a control image of
        another size than its image.
    """
    for name, v in (("conditioning_column", conditioning_column),
                    ("caption_column", caption_column)):
        if not isinstance(v, str) or not v:
            raise ValueError(f"{name} must be a non-empty string, got {v!r}")
    root = pathlib.Path(path).expanduser().absolute()
    if not root.is_dir():
        raise ValueError(f"ControlNet folder {root}: not a directory")
    meta = root / METADATA_FILE
    if not meta.is_file():
        raise ValueError(f"ControlNet folder {root}: no {METADATA_FILE} (one line per example: "
                         f"file_name, {caption_column}, {conditioning_column})")
    files, captions, conds, seen = [], [], [], set()
    for n, row in metadata_rows(meta):
        image = _path(root, meta, n, "file_name", row.get("file_name"))
        if not isinstance(row.get(caption_column), str):
            raise InvalidFileError(f"{meta}: line {n} has no caption string {caption_column!r}"
                                   f" (its keys: {sorted(row)})")
        if conditioning_column not in row:
            raise InvalidFileError(f"{meta}: line {n} has no control image column "
                                   f"{conditioning_column!r} (its keys: {sorted(row)})")
        cond = _path(root, meta, n, conditioning_column, row[conditioning_column])
        if image in seen:
            raise InvalidFileError(f"{meta}: line {n} names {row['file_name']!r} a second "
                                   "time")
        seen.add(image)
        for p in (image, cond):
            check_image(str(p))
        if _size(image) != _size(cond):
            raise InvalidFileError(
                f"{meta}: line {n}: the control image {cond.relative_to(root)} is "
                f"{'x'.join(map(str, _size(cond)))} but its image {image.relative_to(root)} "
                f"is {'x'.join(map(str, _size(image)))} (they must be the same size)")
        files.append(str(image))
        captions.append(row[caption_column])
        conds.append(str(cond))
    if not files:
        raise ValueError(f"ControlNet folder {root}: {METADATA_FILE} lists no examples")
    return ControlNetFolder(ImageFolder(str(root), tuple(files), tuple(captions)), tuple(conds))


def load_conditioning_images(folder: ControlNetFolder, resolution: int,
                             channels: int = 3) -> np.ndarray:
    """The control images of ``folder``, transformed as the targets (resized so the short side
    is ``resolution``, centre-cropped: :func:`jaxdiff.data.load_images`): ``[N, R, R,
    channels]`` float32 in ``[0, 1]`` (``channels`` 3: RGB; 1: the channels' mean).

    Raises:
      ValueError: naming ``resolution`` or ``channels`` (not 1 or 3).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    resolution = check_int("resolution", resolution, minimum=1)
    as_folder = dataclasses.replace(folder.images, files=folder.conditioning)
    out = (load_images(as_folder, resolution, True) + 1.0) / 2.0
    if channels == 1:
        out = out.mean(axis=-1, keepdims=True)
    return np.clip(out, 0.0, 1.0).astype(np.float32)
