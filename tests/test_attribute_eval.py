"""The attribute-separation table's arithmetic (experiments.attribute_eval): Cohen's d and AUC
on samples whose answer is known, the real images' bins, the prompts."""

import numpy as np

from experiments import attribute_eval as ae
from experiments import mnist_prompts as mp


def test_separation_is_cohens_d_and_the_auc():
    rng = np.random.default_rng(0)
    lo, hi = rng.normal(0, 1, 4000), rng.normal(2, 1, 4000)
    s = ae.separation(lo, hi)
    assert abs(s["separation"] - 2.0) < 0.1
    assert abs(s["auc"] - 0.921) < 0.01     # Phi(2 / sqrt(2))
    assert abs(s["low"]["mean"]) < 0.05 and abs(s["high"]["sd"] - 1) < 0.05
    r = ae.separation(hi, lo)
    assert abs(r["separation"] + s["separation"]) < 1e-12 and abs(r["auc"] + s["auc"] - 1) < 1e-12
    t = ae.separation([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert t["separation"] == 0.0 and t["auc"] == 0.5   # ties count half
    assert ae.separation([0.0, 1.0], [5.0, 6.0])["auc"] == 1.0


def test_real_separation_bins_by_the_given_thresholds():
    # bars of widths 1..6 (digit 0): thresholds between widths 2|3 and 4|5
    x = -np.ones((6, 28, 28), np.float32)
    for k in range(6):
        x[k, 4:24, 10:11 + k] = 1.0
    labels = np.zeros(6, np.int64)
    th = np.zeros((10, 3, 2))
    th[0, 0] = (2.2, 3.8)            # thickness of widths 1, 2 below; 5, 6 above (w L / (L + w))
    th[0, 1] = (-1.0, 1e9)           # size and slant: every image in the middle bin
    th[0, 2] = (-1.0, 1e9)
    r = ae.real_separation(x, labels, th)
    assert r["thickness"]["low"]["n"] == 2 and r["thickness"]["high"]["n"] == 2
    assert r["thickness"]["auc"] == 1.0 and r["thickness"]["separation"] > 3
    assert r["size"]["low"]["n"] == 0 and r["size"]["high"]["n"] == 0


def test_attribute_prompts_are_heldout_style_and_balanced():
    prompts, labels = ae.attribute_prompts(("thick", "slanted"), 20, 0)
    assert labels.tolist() == [i % 10 for i in range(20)]
    for p, d in zip(prompts, labels):
        assert p in (f"a thick slanted digit {mp.DIGIT_NAMES[d]}", f"a thick slanted digit {d}")
    single, _ = ae.attribute_prompts(("thin",), 10, 0)
    held = {p for d in range(10) for p in mp.all_prompts("heldout", d)}
    assert set(single) <= held
    train = {p for d in range(10) for p in mp.all_prompts("train", d)}
    assert not set(prompts) & (held | train)   # the composition is in no grammar's split


def test_real_separation_bins_the_signed_slant_or_its_magnitude():
    """Bars leaning left and right: with the signed slant the low third is the left-leaning ones
    and the high third the right-leaning ones; with |slant| both ways land in the high third."""
    x = -np.ones((4, 28, 28), np.float32)
    for i, shear in enumerate((-0.4, -0.2, 0.2, 0.4)):
        for r in range(4, 24):
            c = int(round(12.5 + shear * (13.5 - r)))
            x[i, r, c:c + 3] = 1.0
    labels = np.zeros(4, np.int64)
    th = np.zeros((10, 3, 2))
    th[0, :2] = (-1.0, 1e9)          # thickness and size: the middle bin
    th[0, 2] = (-5.0, 5.0)
    signed = ae.real_separation(x, labels, th, slant="signed")["slant"]
    assert signed["low"]["n"] == 2 and signed["high"]["n"] == 2 and signed["auc"] == 1.0
    assert signed["low"]["mean"] < -5 < 5 < signed["high"]["mean"]
    magnitude = ae.real_separation(x, labels, th, slant="magnitude")["slant"]
    assert magnitude["low"]["n"] == 0 and magnitude["high"]["n"] == 4
