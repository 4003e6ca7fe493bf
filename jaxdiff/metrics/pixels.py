"""Pixel statistics of image samples: what a viewer of a sample grid sees as a clean background or
a gray haze, as numbers to compare with the data's.

    >>> import numpy as np
    >>> x = np.full((2, 4, 4, 1), -1.0)          # black ([-1, 1] scale)
    >>> x[0, 0, :2] = 0.0                         # two mid-gray pixels
    >>> s = pixel_statistics(x)
    >>> s["clean_background"], s["haze"]
    (0.9375, 0.0)
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["pixel_statistics", "pixel_histogram_distance"]


def _unit(images: Any) -> np.ndarray:
    x = np.asarray(images, np.float64)
    if x.ndim < 2:
        raise ValueError(f"images must be a batch [N, ...], got shape {x.shape}")
    return np.clip((x + 1.0) / 2.0, 0.0, 1.0)


def pixel_statistics(
    images: Any, *, clean_below: float = 0.02, haze_below: float = 0.2
) -> dict[str, float]:
    """Fractions of pixels by intensity, on the ``[0, 1]`` scale (``images``: ``[N, ...]`` in
    ``[-1, 1]``, clipped).

    Returns:
      ``{"clean_background": fraction < clean_below, "haze": fraction in [clean_below,
      haze_below), "mean": mean intensity}``.

    Raises:
      ValueError: a scalar ``images`` or thresholds outside ``0 < clean_below < haze_below < 1``.
    """
    if not 0.0 < clean_below < haze_below < 1.0:
        raise ValueError(f"need 0 < clean_below < haze_below < 1, got clean_below={clean_below}, "
                         f"haze_below={haze_below}")
    p = _unit(images)
    return {"clean_background": float(np.mean(p < clean_below)),
            "haze": float(np.mean((p >= clean_below) & (p < haze_below))),
            "mean": float(p.mean())}


def pixel_histogram_distance(images: Any, reference: Any, *, bins: int = 32) -> float:
    """Total-variation distance (in ``[0, 1]``) between the intensity histograms of ``images`` and
    ``reference`` (both ``[N, ...]`` in ``[-1, 1]``) over ``bins`` equal bins of ``[0, 1]``."""
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    edges = np.linspace(0.0, 1.0, bins + 1)
    h1, _ = np.histogram(_unit(images), edges)
    h2, _ = np.histogram(_unit(reference), edges)
    return float(0.5 * np.abs(h1 / h1.sum() - h2 / h2.sum()).sum())
