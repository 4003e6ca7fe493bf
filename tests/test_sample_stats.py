"""Pixel statistics and precision / recall (jaxdiff.metrics.pixels, .coverage)."""

import numpy as np
import pytest

from jaxdiff.metrics import pixel_histogram_distance, pixel_statistics, precision_recall


def test_pixel_statistics_count_by_intensity():
    # [0, 1] intensities 0.0 (clean), 0.1 (haze), 0.5 and 1.0, one quarter each.
    p = np.array([0.0, 0.1, 0.5, 1.0] * 25).reshape(4, 5, 5, 1)
    s = pixel_statistics(p * 2.0 - 1.0)
    assert s == pytest.approx({"clean_background": 0.25, "haze": 0.25, "mean": 0.4})
    assert pixel_statistics(np.full((2, 3), 5.0))["mean"] == 1.0          # clipped to [-1, 1]
    with pytest.raises(ValueError, match="clean_below"):
        pixel_statistics(p, clean_below=0.3, haze_below=0.2)
    with pytest.raises(ValueError, match="batch"):
        pixel_statistics(np.float32(0.0))


def test_pixel_histogram_distance():
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (50, 28, 28, 1))
    assert pixel_histogram_distance(a, a) == 0.0
    black, white = -np.ones((3, 4, 4, 1)), np.ones((3, 4, 4, 1))
    assert pixel_histogram_distance(black, white) == pytest.approx(1.0)
    half = np.concatenate([black, white])
    assert pixel_histogram_distance(half, black) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="bins"):
        pixel_histogram_distance(a, a, bins=1)


def test_precision_recall_separate_fidelity_from_coverage():
    rng = np.random.default_rng(1)
    real = rng.standard_normal((400, 6))
    same = rng.standard_normal((400, 6))          # another draw of the same distribution
    p, r = precision_recall(real, same, k=3)
    assert p > 0.85 and r > 0.85
    far = same + 10.0                              # off the data: neither real-looking nor covering
    assert precision_recall(real, far, k=3) == (0.0, 0.0)
    collapsed = real[rng.choice(400, 40)] + 1e-3 * rng.standard_normal((40, 6))  # a few modes
    p, r = precision_recall(real, np.repeat(collapsed, 10, axis=0), k=3)
    assert p > 0.95 and r < 0.5                    # high fidelity, poor coverage
    wide = 3.0 * same                              # covers everything, many samples off the data
    p, r = precision_recall(real, wide, k=3)
    assert p < 0.6 and r > 0.9
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(real, same, k=0)
    with pytest.raises(ValueError, match="real and fake"):
        precision_recall(real, same[:, :3])
