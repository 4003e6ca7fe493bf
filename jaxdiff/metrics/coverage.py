"""Precision and recall of a sample set in a feature space (Kynkaanniemi et al. 2019): fidelity
and coverage as two numbers, where FD gives one.

Each real feature vector gets a ball reaching its ``k``-th nearest real neighbour; precision is the
fraction of samples inside some real ball (samples look real), recall the fraction of real points
inside some sample ball, the sample balls built the same way from the samples (the samples cover
the data). Guidance typically raises precision and lowers recall.

    >>> import numpy as np
    >>> real = np.random.default_rng(0).standard_normal((200, 8))
    >>> p, r = precision_recall(real, real[:20].repeat(10, axis=0), k=3)  # 20 distinct samples
    >>> p == 1.0 and r < 0.5
    True
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["precision_recall"]


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def _radii(x: np.ndarray, k: int) -> np.ndarray:
    """Squared distance from each row to its k-th nearest other row."""
    d = _sq_dists(x, x)
    return np.partition(d, k, axis=1)[:, k]  # column 0 of the sorted row is the point itself


def _coverage(points: np.ndarray, centers: np.ndarray, radii: np.ndarray) -> float:
    return float(np.mean((_sq_dists(points, centers) <= radii[None, :]).any(axis=1)))


def precision_recall(real: Any, fake: Any, *, k: int = 3) -> tuple[float, float]:
    """``(precision, recall)`` of ``fake: [M, D]`` against ``real: [N, D]`` features (float64
    numpy, exact pairwise distances: meant for N, M up to a few thousand).

    Raises:
      ValueError: not 2-D, different feature sizes, or ``k`` not in ``[1, min(N, M) - 1]``.
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake must be [N, D] and [M, D], got {real.shape} and "
                         f"{fake.shape}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < min(len(real), len(fake)):
        raise ValueError(f"k must be an int in [1, {min(len(real), len(fake)) - 1}], got {k!r}")
    precision = _coverage(fake, real, _radii(real, k))
    recall = _coverage(real, fake, _radii(fake, k))
    return precision, recall
