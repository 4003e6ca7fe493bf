"""Digit attributes (jaxdiff.metrics.digit_attributes) on synthetic images whose answer is known:
a wider bar is thicker, a bigger box is larger, a sheared bar has the shear's slant and sign; the
per-class tertile bins."""

import numpy as np
import pytest

from jaxdiff.metrics.digit_attributes import (bin_values, binning_values, fit_thresholds, ink,
                                              measure_attributes)


def _canvas(n=1, size=28):
    return -np.ones((n, size, size), np.float32)


def _sheared_bar(shear, width=3, top=4, bottom=24, size=28):
    """A bar whose column moves right by ``shear`` pixels per row upwards (``/`` for > 0)."""
    x = _canvas(1, size)
    mid = (top + bottom - 1) / 2
    for r in range(top, bottom):
        c = int(round(size / 2 - width / 2 + shear * (mid - r)))
        x[0, r, c:c + width] = 1.0
    return x


def test_thickness_grows_with_the_stroke_width_and_is_about_the_width():
    x = _canvas(4)
    for k, w in enumerate((1, 2, 3, 5)):
        x[k, 4:24, 10:10 + w] = 1.0
    t = measure_attributes(x)["thickness"]
    assert np.all(np.diff(t) > 0), t
    # w L / (L + w) for a w x L bar (L = 20): the area over half the outline
    want = np.array([w * 20 / (20 + w) for w in (1, 2, 3, 5)])
    np.testing.assert_allclose(t, want, rtol=0.1)
    # uint8 in [0, 255] gives the same values as float in [-1, 1]
    u8 = ((x + 1) * 127.5).round().astype(np.uint8)
    np.testing.assert_allclose(measure_attributes(u8[..., None])["thickness"], t, rtol=1e-9)


def test_thickness_of_a_diagonal_stroke_is_close_to_an_upright_one():
    upright, diagonal = _sheared_bar(0.0, width=3), _sheared_bar(1.0, width=3)
    # a 45-degree stroke 3 columns wide is 3 / sqrt(2) ~ 2.1 pixels wide across its direction
    t0 = measure_attributes(upright)["thickness"][0]
    t1 = measure_attributes(diagonal)["thickness"][0]
    assert 0.55 * t0 < t1 < 0.95 * t0, (t0, t1)


def test_size_is_the_bounding_box_area_above_the_threshold():
    x = _canvas(3)
    x[0, 10:15, 10:14] = 1.0        # 5 x 4
    x[1, 4:24, 6:20] = 1.0          # 20 x 14
    x[1, 2, 2] = -0.2               # ink 0.4 < 0.5: outside the box
    a = measure_attributes(x)
    assert a["size"].tolist() == [20.0, 280.0, 0.0]
    assert a["height"].tolist() == [5.0, 20.0, 0.0] and a["width"].tolist() == [4.0, 14.0, 0.0]
    assert a["thickness"][2] == 0.0 and a["slant"][2] == 0.0   # an empty image


def test_slant_has_the_shear_angle_and_sign():
    s = [measure_attributes(_sheared_bar(k))["slant"][0] for k in (-0.4, -0.2, 0.0, 0.2, 0.4)]
    assert s[2] == 0.0 and s[0] < s[1] < 0 < s[3] < s[4], s   # "/" positive, "\" negative
    np.testing.assert_allclose(s[3:], np.degrees(np.arctan([0.2, 0.4])), atol=2.0)
    np.testing.assert_allclose(s[:2], -np.asarray(s[3:][::-1]), atol=1.0)


def test_chunking_and_shapes():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (7, 28, 28)).astype(np.float32)
    a, b = measure_attributes(x), measure_attributes(x[..., None], chunk=3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(ValueError, match="images must be"):
        measure_attributes(np.zeros((2, 28, 28, 3)))
    with pytest.raises(ValueError, match="images must be"):
        ink(np.zeros((28, 28)))


def test_tertile_bins_are_per_class():
    # class 0 values 0..29, class 1 values 100..129: each class's thirds, not the pooled ones
    v = np.concatenate([np.arange(30), 100 + np.arange(30)]).astype(float)
    values = np.stack([v, -v, v], 1)
    labels = np.repeat([0, 1], 30)
    th = fit_thresholds(values, labels, num_classes=2)
    assert th.shape == (2, 3, 2)
    b = bin_values(values, labels, th)
    for c in (0, 1):
        np.testing.assert_array_equal(np.bincount(b[labels == c, 0], minlength=3), [10, 10, 10])
        assert (b[labels == c][:10, 0] == 0).all() and (b[labels == c][-10:, 0] == 2).all()
        assert (b[labels == c][:10, 1] == 2).all()   # -v: the order reverses
    # binning_values: thickness, size, |slant|
    bv = binning_values({"thickness": np.ones(2), "size": np.ones(2) * 3,
                         "slant": np.array([-5.0, 4.0])})
    np.testing.assert_array_equal(bv, [[1, 3, 5], [1, 3, 4]])
    # ... or the signed slant: the least / most right-leaning thirds, not one word for both ways
    bv = binning_values({"thickness": np.ones(2), "size": np.ones(2) * 3,
                         "slant": np.array([-5.0, 4.0])}, slant="signed")
    np.testing.assert_array_equal(bv, [[1, 3, -5], [1, 3, 4]])
    with pytest.raises(ValueError, match="slant must be one of"):
        binning_values({"thickness": np.ones(2), "size": np.ones(2), "slant": np.ones(2)}, "abs")
    with pytest.raises(ValueError, match="class 1"):
        fit_thresholds(values[:30], labels[:30], num_classes=2)
    with pytest.raises(ValueError, match="labels must lie"):
        bin_values(values, labels + 1, th)
    with pytest.raises(ValueError, match="thresholds must be"):
        bin_values(values, labels, th[..., 0])
