"""Aspect-ratio buckets (``jaxdiff.data.image_buckets``): the bucket sizes, the assignment by
aspect ratio, and bucketed batches that are one bucket each, cover every image in an epoch,
resume exactly and split across hosts."""

import json

import numpy as np
import pytest
from PIL import Image

from jaxdiff.data import (assign_buckets, bucket_sizes, bucketed_image_folder_source,
                          image_size, read_image_folder)


def test_bucket_sizes_by_hand():
    # R = 128, step 32: W = 96 -> H = 16384 // 96 // 32 * 32 = 160 (ratio 1.67); W = 192 -> 64
    # (ratio 3, out); W = 64 -> 256 (ratio 4, out)
    assert bucket_sizes(128, step=32) == [(160, 96), (128, 128), (96, 160)]
    # R = 512, step 64: W = 384 -> 682 -> 640; W = 448 -> 585 -> 576; W = 320 -> 768 (2.4, out)
    b = bucket_sizes(512, step=64)
    assert b == [(640, 384), (576, 448), (512, 512), (448, 576), (384, 640)]
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 512 ** 2 for h, w in b)
    assert all(max(h / w, w / h) <= 2 for h, w in b)
    with pytest.raises(ValueError, match="no bucket"):
        bucket_sizes(16, step=32)
    np.testing.assert_array_equal(assign_buckets([(40, 80), (80, 40), (50, 50)],
                                                 [(80, 48), (64, 64), (48, 80)]), [2, 0, 1])


def test_image_size_reads_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (30, 10)).save(tmp_path / "r.png", exif=exif)
    Image.new("RGB", (30, 10)).save(tmp_path / "s.png")
    assert image_size(str(tmp_path / "r.png")) == (30, 10)
    assert image_size(str(tmp_path / "s.png")) == (10, 30)


def _folder(tmp_path):
    rng = np.random.default_rng(0)
    for name, (h, w) in {"w0": (40, 80), "w1": (44, 90), "t0": (80, 40), "s0": (50, 50),
                         "s1": (60, 60)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            tmp_path / f"{name}.png")
    return read_image_folder(tmp_path, caption="x")


def _src(folder, **kw):
    kw = {"resolution": 64, "step": 16, "tokenize": lambda c: np.zeros((len(c), 2), np.int32),
          "global_batch_size": 2, "seed": 1, "center_crop": False, "random_flip": True,
          "process_index": 0, "process_count": 1, **kw}
    return bucketed_image_folder_source(folder, **kw)


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batches_are_one_bucket_and_cover_the_epoch(tmp_path):
    f = _folder(tmp_path)                  # files sorted: s0, s1, t0, w0, w1
    want_shape = {0: (64, 64), 1: (64, 64), 2: (80, 48), 3: (48, 80), 4: (48, 80)}
    it = _src(f)(None)
    assert it.batches_per_epoch == 3       # one batch per bucket (the tall one repeats t0)
    seen = set()
    for _ in range(3):
        b = next(it)
        shapes = {want_shape[int(i)] for i in b["index"]}
        assert len(shapes) == 1 and b["pixel_values"].shape[1:3] == shapes.pop()
        assert -1 <= b["pixel_values"].min() and b["pixel_values"].max() <= 1
        seen |= set(b["index"].tolist())
    assert seen == set(range(5)) and it.state == {"epoch": 1, "index": 0}


def test_bucketed_resume_and_hosts(tmp_path):
    f = _folder(tmp_path)
    src = _src(f)
    it = src(None)
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(it.state))
    want = [next(it) for _ in range(4)]
    got_it = src(state)
    assert all(_same(a, next(got_it)) for a in want)
    halves = [_src(f, process_index=p, process_count=2)(state) for p in range(2)]
    for w in want:
        parts = [next(h) for h in halves]
        assert _same(w, {k: np.concatenate([p[k] for p in parts]) for k in w})


def test_bucket_transform_covers_then_crops():
    from jaxdiff.data import transform_image

    x = np.random.default_rng(0).integers(0, 256, (40, 80, 3), dtype=np.uint8)
    img = Image.fromarray(x)
    # cover 48 x 80: scale max(80 / 80, 48 / 40) = 1.2 -> 96 x 48, center crop left 8
    ref = np.asarray(img.resize((96, 48), Image.BILINEAR))[:, 8:88]
    np.testing.assert_array_equal(transform_image(img, (48, 80)),
                                  (ref.astype(np.float32) / 255 - 0.5) / 0.5)
