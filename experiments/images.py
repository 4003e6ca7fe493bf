"""PNG grids of image batches (Pillow)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

__all__ = ["to_uint8", "make_grid", "save_grid"]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """``[N, H, W, C]`` floats in ``[-1, 1]`` -> uint8 in ``[0, 255]`` (clipped)."""
    x = (np.clip(np.asarray(images, np.float32), -1.0, 1.0) + 1.0) * 127.5
    return np.round(x).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int, pad: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tiles ``[N, H, W, C]`` uint8 images row-major into ``[rows*(H+pad)+pad, ..., C]``."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), pad_value, np.uint8)
    for i in range(n):
        r, k = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def save_grid(images: np.ndarray, path: str, ncols: int, scale: int = 2) -> str:
    """Saves ``[N, H, W, C]`` images in ``[-1, 1]`` as a PNG grid (upscaled ``scale``x); returns
    path."""
    grid = make_grid(to_uint8(images), ncols)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)
    return path
