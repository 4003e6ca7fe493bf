"""The ControlNet demo's transform and agreement (experiments.controlnet_mnist_lib): a digit agrees
fully with its own control, the control image is the mask drawn in the model's frame, and the
pairs folder reads back with jaxdiff.data.read_controlnet_folder."""

from __future__ import annotations

import numpy as np
import pytest

from experiments import controlnet_mnist_lib as cm
from jaxdiff.data import load_conditioning_images, read_controlnet_folder


def _digits(n=6, seed=0):
    """Blocky fake digits ``[n, 28, 28, 1]`` in ``[-1, 1]``: random 7x7 masks upsampled."""
    masks = np.random.default_rng(seed).random((n, 7, 7)) < 0.3
    up = np.kron(masks, np.ones((4, 4)))[..., None]
    return masks, (up * 2.0 - 1.0).astype(np.float32)


def test_silhouette_control_and_agreement():
    masks, digits = _digits()
    np.testing.assert_array_equal(cm.silhouette(digits), masks)
    controls = cm.control_images(masks)
    assert controls.shape == (6, 32, 32, 1) and controls.dtype == np.uint8
    framed = controls.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(cm.silhouette(framed), masks)   # 32x32: the centred crop
    same = cm.agreement(masks, framed)
    np.testing.assert_allclose(same["iou"], 1.0)
    np.testing.assert_allclose(same["corr"], 1.0, rtol=1e-5)
    blank = cm.agreement(masks, -np.ones((6, 32, 32, 1), np.float32))
    np.testing.assert_allclose(blank["iou"], np.where(masks.any((1, 2)), 0.0, 1.0))
    np.testing.assert_allclose(blank["corr"], 0.0)
    inverse = cm.agreement(masks, -framed)     # the complement inside the 28x28 crop
    assert np.all(inverse["iou"] == 0) and np.all(inverse["corr"] < -0.99)
    with pytest.raises(ValueError, match="differ in count"):
        cm.agreement(masks[:2], framed)
    assert cm.mnist_captions([7, 1], seed=0) == cm.mnist_captions([7, 1], seed=0)
    assert all(("seven" in c or "7" in c) for c in cm.mnist_captions([7] * 8, seed=1))


def test_pairs_folder_reads_back(tmp_path):
    _, digits = _digits(4)
    labels = np.array([0, 1, 2, 3])
    records = cm.write_pairs(str(tmp_path / "pairs"), digits, labels, num_images=3, seed=0)
    folder = read_controlnet_folder(tmp_path / "pairs")
    assert len(folder) == 3 and [r["text"] for r in records] == list(folder.images.captions)
    cond = load_conditioning_images(folder, 32, channels=1)
    masks = cm.silhouette(cond * 2.0 - 1.0)
    for r, m in zip(records, masks):
        np.testing.assert_array_equal(m, cm.silhouette(digits[[r["label"]]])[0])
