"""Images in and out of the pipelines (host side, numpy + Pillow): the accepted image inputs and
their resizing, the output files, and the checks that refuse a bad input or output path before
any work starts.

Inputs. An image-to-image source is ``uint8`` (0-255) or floating (0-1), ``[H, W, C]`` or
``[B, H, W, C]``. Other integer dtypes, booleans and floats outside ``[0, 1]`` are refused (a float
image in 0-255 is the classic mistake: the message says to divide by 255), as is NaN.

Sizes. As diffusers' ``VaeImageProcessor`` (``do_resize=True``): an image whose sides are not
multiples of the size unit ``m`` is resized to ``(H - H % m, W - W % m)``, or to an explicit
``(height, width)``. Arrays are resized by nearest neighbour with PyTorch's index rule
(``src = min(floor(dst * float32(in / out)), in - 1)``, diffusers' numpy path); image FILES
(:func:`load_image`) by Pillow's Lanczos filter (diffusers' PIL path), both exactly as diffusers.
``m`` is the pipeline's (``max(8, vae_scale_factor)`` for Stable Diffusion: 8 for every SD
checkpoint, where diffusers rounds to the VAE factor, also 8).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from jaxdiff.validation import check_writable

__all__ = [
    "IMAGE_EXTENSIONS",
    "check_output_path",
    "load_image",
    "output_paths",
    "prepare_image",
    "resize_nearest",
    "round_down_size",
    "save_images",
    "to_uint8",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
"""The output file extensions :func:`save_images` writes (case-insensitive)."""


def to_uint8(images: np.ndarray) -> np.ndarray:
    """``[..., 3]`` float in ``[0, 1]`` -> uint8, rounded as diffusers' ``numpy_to_pil``."""
    return np.round(np.clip(np.asarray(images, np.float32), 0, 1) * 255).astype(np.uint8)


def output_paths(path: str, count: int) -> list[str]:
    """The files :func:`save_images` writes for ``count`` images: ``path`` for one,
    ``<stem>_<i><ext>`` for several."""
    if count == 1:
        return [path]
    stem, ext = os.path.splitext(path)
    return [f"{stem}_{i}{ext}" for i in range(count)]


def check_output_path(path: str, name: str = "path") -> str:
    """Refuse, before any work, an output image path that :func:`save_images` could not write:
    no (or an unsupported) extension, or a place that cannot be written
    (:func:`jaxdiff.validation.check_writable`: a folder at ``path``, a file where a folder
    should be, a folder without write permission or on a read-only file system). Creates
    nothing. Returns ``path``.

    Raises:
      ValueError: naming ``name`` and the path.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"{name} must be an image file path, got {path!r}")
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in IMAGE_EXTENSIONS:
        got = f"extension {ext!r}" if ext else "no extension"
        raise ValueError(f"{name} {path!r} has {got}; use one of {', '.join(IMAGE_EXTENSIONS)}")
    check_writable(name, path)
    return path


def save_images(images: np.ndarray, path: str) -> list[str]:
    """Save ``[B, H, W, C]`` uint8 images (``C`` = 3, or 1 for a grey VAE): ``path`` for one
    image, ``<stem>_<i><ext>`` for several; the format follows the extension
    (:data:`IMAGE_EXTENSIONS`). Returns the paths written.

    Raises:
      ValueError: for images that are not uint8 ``[B, H, W, 1 or 3]``, and as
        :func:`check_output_path`.
    """
    from PIL import Image

    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be uint8 [B, H, W, 1 or 3], got {images.dtype} "
                         f"{images.shape}")
    check_output_path(path)
    paths = output_paths(path, len(images))
    for img, p in zip(images, paths):
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(p)  # grey: mode L
    return paths


def round_down_size(height: int, width: int, multiple: int, name: str = "image") -> tuple[int, int]:
    """``(height - height % multiple, width - width % multiple)``: diffusers'
    ``VaeImageProcessor.get_default_height_width``. ``ValueError`` naming ``name`` and its size
    when a side is smaller than ``multiple``."""
    if height < multiple or width < multiple:
        raise ValueError(f"{name} of {height}x{width} (height x width) is smaller than "
                         f"{multiple} pixels on a side")
    return height - height % multiple, width - width % multiple


def resize_nearest(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[B, H, W, C]`` -> ``[B, height, width, C]`` by nearest neighbour, picking source rows /
    columns as ``torch.nn.functional.interpolate(mode="nearest")`` does (float32 scale
    ``in / out``, ``floor``, clamped; an exact 2x upscale repeats)."""

    def index(n_in: int, n_out: int) -> np.ndarray:
        if n_in == n_out:
            return np.arange(n_out)
        if n_out == 2 * n_in:
            return np.arange(n_out) >> 1
        scale = np.float32(n_in) / np.float32(n_out)
        src = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
        return np.minimum(src, n_in - 1)

    return images[:, index(images.shape[1], height)][:, :, index(images.shape[2], width)]


def prepare_image(image: Any, *, channels: int, multiple: int, height: int | None = None,
                  width: int | None = None, name: str = "image") -> np.ndarray:
    """An image-to-image source as float32 ``[B, H', W', channels]`` in ``[0, 1]`` (module
    docstring): uint8 / 255, floats as they are; resized (nearest) to ``(height, width)`` when
    given (multiples of ``multiple``), else to its size rounded down to multiples of
    ``multiple``.

    Raises:
      ValueError: naming ``name``: not ``[H, W, channels]`` / ``[B, H, W, channels]``; a dtype
        other than uint8 or floating; a float image outside ``[0, 1]`` or not finite; a side
        smaller than ``multiple``.
    """
    arr = np.asarray(image)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != channels:
        raise ValueError(f"{name} must be [B, H, W, {channels}] or [H, W, {channels}] (NHWC), "
                         f"got shape {np.shape(image)}")
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    elif np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} holds NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if hi > 1.0 + 1e-6 or lo < -1e-6:
            hint = ""
            if hi > 1.0 + 1e-6 and lo >= 0 and hi <= 255.0:
                hint = " (it looks like 0-255: divide by 255)"
            elif lo < 0 and lo >= -1.0 - 1e-6 and hi <= 1.0 + 1e-6:
                hint = " (it looks like [-1, 1]: use (image + 1) / 2)"
            raise ValueError(f"{name}: a float image must lie in [0, 1], got values in "
                             f"[{lo:g}, {hi:g}]{hint}")
        arr = np.clip(arr, 0.0, 1.0)
    else:
        raise ValueError(f"{name} must be uint8 (0-255) or floating (0-1), got dtype {arr.dtype} "
                         "(convert it: image.astype(np.uint8) for 0-255 values, or "
                         "image / 255.0)")
    size = arr.shape[1:3]
    if (height is None) != (width is None):
        raise ValueError("give both height and width (to resize the image) or neither")
    if height is None:
        height, width = round_down_size(*size, multiple, f"{name}")
    if (height, width) != size:
        arr = resize_nearest(arr, height, width)
    return arr


def load_image(path: str, *, multiple: int = 8, height: int | None = None,
               width: int | None = None, mode: str = "RGB", name: str = "image") -> np.ndarray:
    """Read an image file as uint8 ``[H, W, C]`` (``mode`` "RGB": ``C = 3``, "L": 1), resized as
    diffusers resizes a PIL image: to ``(height, width)`` when given, else to its size rounded
    down to multiples of ``multiple``, with Pillow's Lanczos filter.

    Raises:
      ValueError: naming ``name`` and the file: missing, unreadable, not an image, over
        Pillow's decompression-bomb limit, or a side smaller than ``multiple``.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert(mode)
    except (OSError, Image.DecompressionBombError, ValueError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise ValueError(f"{name} {path!r}: cannot read the image ({reason})") from None
    if (height is None) != (width is None):
        raise ValueError("give both height and width (to resize the image) or neither")
    if height is None:
        height, width = round_down_size(img.height, img.width, multiple, f"{name} {path!r}")
    if (height, width) != (img.height, img.width):
        img = img.resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None)
    arr = np.asarray(img, np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr
