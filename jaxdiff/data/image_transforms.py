"""The pixels of a training image, as diffusers' ``train_text_to_image`` / DreamBooth scripts make
them with torchvision: EXIF orientation applied (``ImageOps.exif_transpose``, as diffusers'
DreamBooth does), converted to RGB (grayscale, RGBA, palette and CMYK images included; alpha is
dropped, not composited, as ``Image.convert("RGB")`` does), the shorter side resized to
``resolution`` (Pillow bilinear, as ``transforms.Resize(resolution)`` on a PIL image: the longer
side becomes ``int(resolution * long / short)``), a center or random ``resolution`` square crop
(``CenterCrop``'s ``round((h - R) / 2)`` offsets), an optional horizontal flip, and
``(x / 255 - 0.5) / 0.5`` in float32 (``ToTensor`` + ``Normalize([0.5], [0.5])``), NHWC.

A random crop is given as two uniform numbers ``(u_top, u_left)`` in ``[0, 1)``, mapped to the
offsets ``floor(u * (h - R + 1))``: the caller draws them from a seed before it knows the image's
size, so that the crop is a pure function of that seed (:mod:`jaxdiff.data.image_source`).
"""

from __future__ import annotations

import concurrent.futures
import math
import os
from typing import Optional, Sequence, Tuple

import numpy as np

from jaxdiff.validation import InvalidFileError, check_bool, check_int

__all__ = ["resized_size", "transform_image", "load_image", "load_images", "map_threads",
           "default_threads"]


def resized_size(width: int, height: int, resolution: int) -> Tuple[int, int]:
    """``(width, height)`` after torchvision's ``Resize(resolution)``: the shorter side becomes
    ``resolution``, the longer ``int(resolution * long / short)``."""
    if width <= height:
        return resolution, int(resolution * height / width)
    return int(resolution * width / height), resolution


def transform_image(image, resolution: int | Tuple[int, int], *,
                    crop: Optional[Tuple[float, float]] = None, flip: bool = False) -> np.ndarray:
    """A PIL image -> ``[R, R, 3]`` (or ``[H, W, 3]``) float32 in ``[-1, 1]``.

    Args:
      image: a ``PIL.Image.Image`` of any mode (converted to RGB).
      resolution: the output side ``R``; or ``(H, W)``, an aspect-ratio bucket: the image is
        resized (bilinear) to the smallest size that covers ``H x W``, then cropped to it.
      crop: None for the center crop, else ``(u_top, u_left)`` in ``[0, 1)``: the crop's offsets
        ``floor(u * (side - R + 1))`` (a random crop when ``u`` is uniform).
      flip: mirror left-right (after the crop).
    """
    from PIL import Image

    if image.mode != "RGB":
        image = image.convert("RGB")
    if isinstance(resolution, tuple):   # an aspect-ratio bucket: resize to cover it
        rh, rw = resolution
        scale = max(rw / image.width, rh / image.height)
        size = (max(rw, round(image.width * scale)), max(rh, round(image.height * scale)))
    else:
        rh = rw = resolution
        size = resized_size(image.width, image.height, resolution)
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    w, h = size
    if crop is None:
        top, left = int(round((h - rh) / 2.0)), int(round((w - rw) / 2.0))
    else:
        top = min(int(math.floor(crop[0] * (h - rh + 1))), h - rh)
        left = min(int(math.floor(crop[1] * (w - rw + 1))), w - rw)
    x = np.asarray(image, dtype=np.uint8)[top:top + rh, left:left + rw]
    if flip:
        x = x[:, ::-1]
    return ((x.astype(np.float32) / np.float32(255.0) - np.float32(0.5))
            / np.float32(0.5))


def load_image(path: str, resolution: int | Tuple[int, int], *,
               crop: Optional[Tuple[float, float]] = None, flip: bool = False) -> np.ndarray:
    """Reads ``path`` (EXIF orientation applied) and returns :func:`transform_image` of it:
    ``[R, R, 3]`` float32 in ``[-1, 1]``.

    Raises:
      InvalidFileError: naming ``path``, for a file Pillow cannot decode.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
        raise InvalidFileError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    return transform_image(im, resolution, crop=crop, flip=flip)


def map_threads(fn, items: Sequence, num_threads: int,
                pool: Optional[concurrent.futures.Executor] = None) -> list:
    """``[fn(x) for x in items]``, on ``pool`` (or a temporary one of ``num_threads`` threads) when
    ``num_threads > 1``; results in order, the first exception re-raised."""
    if num_threads <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    if pool is not None:
        return list(pool.map(fn, items))
    with concurrent.futures.ThreadPoolExecutor(min(num_threads, len(items))) as ex:
        return list(ex.map(fn, items))


def default_threads() -> int:
    """Decode threads when none are asked for: the CPU count, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def load_images(folder, resolution: int, center_crop: bool = True, *, seed: int = 0,
                num_threads: Optional[int] = None) -> np.ndarray:
    """Every image of ``folder`` (an :class:`jaxdiff.data.ImageFolder`), transformed once:
    ``[N, R, R, 3]`` float32 in ``[-1, 1]``, in ``folder.files`` order. For callers that encode
    the images once (cached VAE latents).

    Args:
      folder: an :class:`~jaxdiff.data.image_folder.ImageFolder`.
      resolution: the side ``R``.
      center_crop: True: the center crop; False: one random crop per image, drawn from ``seed``
        (the same on every call).
      seed: the random crops' seed.
      num_threads: decode threads (default: the CPU count, at most 8).

    Raises:
      ValueError: naming ``resolution``; :class:`InvalidFileError` for an image that no longer
        decodes.
    """
    resolution = check_int("resolution", resolution, minimum=1)
    center_crop = check_bool("center_crop", center_crop)
    n = len(folder.files)
    crops = (None,) * n if center_crop else [
        tuple(u) for u in np.random.default_rng([int(seed), n]).random((n, 2))]
    threads = default_threads() if num_threads is None else check_int("num_threads",
                                                                      num_threads, minimum=1)
    out = map_threads(lambda i: load_image(folder.files[i], resolution, crop=crops[i]),
                      range(n), threads)
    return np.stack(out)
