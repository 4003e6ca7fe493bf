"""Measured attributes of handwritten-digit images (stroke thickness, size, slant), and their
per-class tertile bins: what makes a caption's adjective ("a thick seven") true of its image.

Every function is vectorised numpy over a batch; nothing is learnt. Images are ``[N, H, W]`` or
``[N, H, W, 1]``: float in ``[-1, 1]`` (the library's convention: ``-1`` background, ``1`` ink)
or ``uint8`` in ``[0, 255]``. The ink ``I`` is the image mapped to ``[0, 1]``.

- **thickness** (pixels): ``2 * sum(I) / sum(|grad I|)``, the ink's area over half its outline
  length. For a stroke of width ``w`` and length ``L``, the area is ``w L`` and the outline
  ``2 (L + w)``, so the ratio is ``w L / (L + w)``, about ``w`` for a long stroke: ink per
  skeleton length, without computing a skeleton. The outline length is the summed gradient
  magnitude (central differences): an edge from 0 to 1 adds 1 per unit of its length whatever its
  direction or blur, so diagonal strokes are not penalised the way a pixel-edge count would
  penalise them, and no threshold is involved.
- **size** (pixels^2): the area ``height * width`` of the bounding box of the pixels with
  ``I > 0.5``. MNIST scales every digit so that its longer side is 20 pixels, so for most digits
  the height is nearly constant and ``size`` mostly follows the width.
- **slant** (degrees): the shear of the ink's second moments, ``atan(-mu_xy / mu_yy)`` with
  ``mu`` the ink-weighted central moments (``y`` down the rows, ``x`` along the columns): the
  angle from vertical of the line that ``x`` regresses on ``y``, positive when the top leans
  right (``/``), negative when it leans left (``\\``), 0 for an upright digit. This is the shear
  that classic MNIST deskewing undoes.

An empty image (no ink) gets thickness 0, size 0 and slant 0.

:func:`fit_thresholds` takes per-class tertiles of these values over a training set and
:func:`bin_values` puts each image in bin 0 (the lowest third of its class), 1 (the middle) or 2
(the highest third), so that a word such as "thick" means thick *for that digit*. The value binned
for slant (:func:`binning_values`) is either the signed slant (``slant="signed"``: the least and the
most right-leaning thirds) or its magnitude (``slant="magnitude"``: ``|slant|``, where the highest
third holds digits leaning either way).

    >>> import numpy as np
    >>> x = -np.ones((2, 28, 28), np.float32)
    >>> x[0, 4:24, 12:14] = 1.0                    # a bar 2 pixels wide
    >>> x[1, 4:24, 11:15] = 1.0                    # a bar 4 pixels wide
    >>> a = measure_attributes(x)
    >>> bool(a["thickness"][1] > a["thickness"][0]), a["size"].tolist(), a["slant"].tolist()
    (True, [40.0, 80.0], [0.0, 0.0])
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

__all__ = ["ATTRIBUTES", "INK_THRESHOLD", "SLANT_BINNINGS", "ink", "measure_attributes",
           "binning_values",
           "fit_thresholds", "bin_values"]

ATTRIBUTES = ("thickness", "size", "slant")
INK_THRESHOLD = 0.5   # ink level (in [0, 1]) above which a pixel counts for the bounding box
SLANT_BINNINGS = ("signed", "magnitude")   # binning_values' ``slant``


def ink(images: Any) -> np.ndarray:
    """The ink ``I`` in ``[0, 1]``, ``[N, H, W]`` float64, of ``images`` (``[N, H, W]`` or
    ``[N, H, W, 1]``; uint8 in ``[0, 255]`` or float in ``[-1, 1]``).

    Raises:
      ValueError: naming ``images`` when its shape is not one of those.
    """
    x = np.asarray(images)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3 or min(x.shape[1:]) < 3:
        raise ValueError(f"images must be [N, H, W] or [N, H, W, 1] with H, W >= 3, got shape "
                         f"{np.asarray(images).shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float64) / 255.0
    return np.clip((x.astype(np.float64) + 1.0) / 2.0, 0.0, 1.0)


def measure_attributes(images: Any, chunk: int = 2048) -> Dict[str, np.ndarray]:
    """``{"thickness", "size", "slant"}``, each ``[N]`` float64, as defined in the module's
    docstring (also ``"height"`` and ``"width"`` of the bounding box, and ``"ink"``: the summed
    ink). ``images``: see :func:`ink`; measured ``chunk`` images at a time (the same values for
    any ``chunk``; it bounds the memory).

    Raises:
      ValueError: naming ``images`` (a bad shape).
    """
    x = np.asarray(images)
    ink(x[:1])   # the shape check, before any work
    parts = [_measure(ink(x[s:s + chunk])) for s in range(0, len(x), max(int(chunk), 1))]
    if not parts:
        return {k: np.zeros(0) for k in ATTRIBUTES + ("height", "width", "ink")}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _measure(i: np.ndarray) -> Dict[str, np.ndarray]:
    n, h, w = i.shape
    total = i.sum((1, 2))
    gy = np.diff(i, axis=1, append=0.0)   # forward differences, 0 beyond the border
    gx = np.diff(i, axis=2, append=0.0)
    outline = np.sqrt(gx ** 2 + gy ** 2).sum((1, 2))
    has_ink = total > 1e-6
    thickness = np.where(has_ink, 2.0 * total / np.maximum(outline, 1e-12), 0.0)

    on = i > INK_THRESHOLD
    rows, cols = on.any(2), on.any(1)
    height = np.where(rows.any(1), h - np.argmax(rows[:, ::-1], 1) - np.argmax(rows, 1), 0)
    width = np.where(cols.any(1), w - np.argmax(cols[:, ::-1], 1) - np.argmax(cols, 1), 0)

    ys, xs = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
    safe = np.maximum(total, 1e-12)
    my = (i.sum(2) * ys).sum(1) / safe
    mx = (i.sum(1) * xs).sum(1) / safe
    dy = ys[None, :, None] - my[:, None, None]
    dx = xs[None, None, :] - mx[:, None, None]
    mu_yy = (i * dy ** 2).sum((1, 2))
    mu_xy = (i * dx * dy).sum((1, 2))
    shear = np.where(mu_yy > 1e-12, -mu_xy / np.maximum(mu_yy, 1e-12), 0.0)
    slant = np.where(has_ink, np.degrees(np.arctan(shear)), 0.0) + 0.0   # no -0.0
    return {"thickness": thickness, "size": (height * width).astype(np.float64),
            "slant": slant, "height": height.astype(np.float64),
            "width": width.astype(np.float64), "ink": total}


def binning_values(attributes: Dict[str, np.ndarray], slant: str = "magnitude") -> np.ndarray:
    """``[N, 3]`` float64: the values that :func:`fit_thresholds` / :func:`bin_values` bin, in
    :data:`ATTRIBUTES` order: thickness, size, and the slant: ``"signed"`` (degrees, positive
    leaning right) or ``"magnitude"`` (``|slant|``).

    Raises:
      ValueError: naming ``slant`` when it is not one of :data:`SLANT_BINNINGS`.
    """
    if slant not in SLANT_BINNINGS:
        raise ValueError(f"slant must be one of {SLANT_BINNINGS}, got {slant!r}")
    s = np.asarray(attributes["slant"], np.float64)
    return np.stack([attributes["thickness"], attributes["size"],
                     s if slant == "signed" else np.abs(s)], 1)


def _check(values, labels, num_classes):
    values = np.asarray(values, np.float64)
    labels = np.asarray(labels).reshape(-1)
    if values.ndim != 2 or len(values) != len(labels):
        raise ValueError(f"values must be [N, A] with one label per row, got values "
                         f"{values.shape} and labels {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, "
                         f"{labels.max()}]")
    return values, labels.astype(np.int64)


def fit_thresholds(values: Any, labels: Any, num_classes: int = 10) -> np.ndarray:
    """Per-class tertiles: ``[num_classes, A, 2]`` float64, ``[c, a] = (q(1/3), q(2/3))`` of
    ``values[labels == c, a]`` (``values``: ``[N, A]``, e.g. :func:`binning_values`).

    Raises:
      ValueError: naming ``values`` / ``labels`` (shapes, range), or a class without examples.
    """
    values, labels = _check(values, labels, num_classes)
    out = np.zeros((num_classes, values.shape[1], 2))
    for c in range(num_classes):
        v = values[labels == c]
        if not len(v):
            raise ValueError(f"labels has no example of class {c}: thresholds need every class")
        out[c] = np.quantile(v, [1.0 / 3.0, 2.0 / 3.0], axis=0).T
    return out


def bin_values(values: Any, labels: Any, thresholds: Any) -> np.ndarray:
    """``[N, A]`` int8: 0 where ``value < lo``, 2 where ``value > hi``, else 1, with ``(lo, hi) =
    thresholds[label, a]`` (:func:`fit_thresholds`).

    Raises:
      ValueError: naming ``values`` / ``labels`` / ``thresholds`` (shapes, range).
    """
    thresholds = np.asarray(thresholds, np.float64)
    if thresholds.ndim != 3 or thresholds.shape[2] != 2:
        raise ValueError(f"thresholds must be [classes, A, 2], got {thresholds.shape}")
    values, labels = _check(values, labels, thresholds.shape[0])
    if values.shape[1] != thresholds.shape[1]:
        raise ValueError(f"values has {values.shape[1]} attributes, thresholds "
                         f"{thresholds.shape[1]}")
    lo, hi = thresholds[labels, :, 0], thresholds[labels, :, 1]
    return np.where(values < lo, 0, np.where(values > hi, 2, 1)).astype(np.int8)
