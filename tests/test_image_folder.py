"""Image folders with captions (``jaxdiff.data.image_folder`` / ``image_transforms`` /
``image_source``): both caption conventions, the one-line errors, bad images, the pixels
(torchvision's Resize / CenterCrop / flip / Normalize conventions, written out by hand), and the
batches: deterministic, resumable, partitioned across hosts, tokenized once."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from jaxdiff.data import (ImageFolder, image_folder_source, load_images, read_image_folder,
                          resized_size, transform_image)
from jaxdiff.text import CLIPTokenizer
from jaxdiff.validation import InvalidFileError


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8), mode).save(path)
    return path


def _rand(seed, h=12, w=10):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _txt_folder(tmp_path, n=5, size=(12, 10)):
    for i in range(n):
        _png(tmp_path / f"img{i}.png", _rand(i, *size))
        (tmp_path / f"img{i}.txt").write_text(f"caption {i}\nsecond line ignored\n")
    return tmp_path


def _ids(captions):
    """A stand-in tokenizer: [N, 3] ids, row i = (len, first char code, i)."""
    return np.array([[len(c), ord(c[0]) if c else 0, i] for i, c in enumerate(captions)])


# -- reading the folder -------------------------------------------------------------------------

def test_txt_captions_sorted_subfolders_and_case(tmp_path):
    _png(tmp_path / "b.PNG", _rand(0))
    (tmp_path / "b.txt").write_text("  a cat  \n")
    _png(tmp_path / "a.jpg", _rand(1))
    (tmp_path / "a.txt").write_text("a dog")
    _png(tmp_path / "sub" / "c.webp", _rand(2))
    (tmp_path / "sub" / "c.txt").write_text("")
    _png(tmp_path / ".hidden.png", _rand(3))        # hidden: ignored
    (tmp_path / "notes.md").write_text("not an image")
    f = read_image_folder(tmp_path)
    assert [p.split("/")[-1] for p in f.files] == ["a.jpg", "b.PNG", "c.webp"]
    assert f.captions == ("a dog", "a cat", "")
    assert len(f) == 3 and f.skipped == ()


def test_metadata_jsonl_auto_and_caption_column(tmp_path):
    _txt_folder(tmp_path, 3)                         # .txt files too: metadata wins in "auto"
    _png(tmp_path / "train" / "x.png", _rand(9))
    rows = [{"file_name": f"img{i}.png", "text": f"meta {i}", "prompt": f"p{i}"}
            for i in range(3)] + [{"file_name": "train/x.png", "text": "meta x", "prompt": "px"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n\n")
    f = read_image_folder(tmp_path)
    assert f.captions == ("meta 0", "meta 1", "meta 2", "meta x")
    assert read_image_folder(tmp_path, caption_column="prompt").captions == ("p0", "p1", "p2",
                                                                            "px")
    f_txt = read_image_folder(tmp_path / "train", caption_source="metadata",
                              caption="one prompt")  # a fixed caption reads no caption file
    assert f_txt.captions == ("one prompt",)
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "train" / "x.txt").write_text("txt x")
    assert read_image_folder(tmp_path).captions == ("caption 0", "caption 1", "caption 2",
                                                    "txt x")


def _meta(tmp_path, lines):
    _txt_folder(tmp_path, 2)
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("setup,match", [
    (lambda p: None, r"no images"),
    (lambda p: (p / "x.txt").write_text("only text"), r"no images"),
    (lambda p: (_txt_folder(p, 3), (p / "img1.txt").unlink()), r"img1\.png has no caption "
     r"\(no \.txt file beside it\)"),
    (lambda p: _meta(p, ['{"file_name": "img0.png", "text": "a"}']),
     r"img1\.png has no caption \(no line in metadata\.jsonl\)"),
    (lambda p: _meta(p, ['{"file_name": "img0.png", "text": "a"}',
                         '{"file_name": "gone.png", "text": "b"}']),
     r"metadata\.jsonl: line 2 names 'gone\.png', which is not a file"),
    (lambda p: _meta(p, ['{"file_name": "img0.png", "text": "a"}', '{"file_name": "img1.png", ']),
     r"metadata\.jsonl: line 2 is not valid JSON"),
    (lambda p: _meta(p, ['{"file_name": "img0.png", "caption": "a"}']),
     r"line 1 \(img0\.png\) has no caption column 'text'"),
    (lambda p: _meta(p, ['{"text": "a"}']), r"line 1 has no 'file_name'"),
    (lambda p: _meta(p, ['{"file_name": "img0.png", "text": "a"}',
                         '{"file_name": "img1.png", "text": "b"}',
                         '{"file_name": "img0.txt", "text": "c"}']),
     r"names 'img0\.txt', which is not an image"),
])
def test_folder_errors_are_one_line_and_name_the_cause(tmp_path, setup, match):
    setup(tmp_path)
    with pytest.raises(ValueError, match=match) as e:
        read_image_folder(tmp_path)
    assert "\n" not in str(e.value)


def test_argument_errors(tmp_path):
    _txt_folder(tmp_path, 1)
    with pytest.raises(ValueError, match="caption_source must be one of"):
        read_image_folder(tmp_path, caption_source="csv")
    with pytest.raises(ValueError, match="on_bad_image must be one of"):
        read_image_folder(tmp_path, on_bad_image="skip")
    with pytest.raises(ValueError, match="not a directory"):
        read_image_folder(tmp_path / "img0.png")
    with pytest.raises(ValueError, match="caption_source='metadata' but there is no metadata"):
        read_image_folder(tmp_path, caption_source="metadata")


def test_bad_image_warn_skips_it_error_raises(tmp_path, caplog):
    _txt_folder(tmp_path, 3)
    (tmp_path / "img1.png").write_bytes(b"not a png at all")
    good = (tmp_path / "img2.png").read_bytes()
    (tmp_path / "img2.png").write_bytes(good[:len(good) // 2])      # truncated
    with caplog.at_level(logging.WARNING, logger="jaxdiff.data.image_folder"):
        f = read_image_folder(tmp_path)
    assert [p.split("/")[-1] for p in f.files] == ["img0.png"] and f.captions == ("caption 0",)
    assert [p.split("/")[-1] for p in f.skipped] == ["img1.png", "img2.png"]
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2 and "img1.png" in msgs[0] and "img2.png" in msgs[1]
    with pytest.raises(InvalidFileError, match=r"img1\.png: not a readable image"):
        read_image_folder(tmp_path, on_bad_image="error")
    (tmp_path / "img0.png").write_bytes(b"")
    with pytest.raises(ValueError, match="none of its 3 images could be decoded"):
        read_image_folder(tmp_path)


# -- pixels -------------------------------------------------------------------------------------

def test_resized_size_is_torchvision_resize():
    # torchvision: short side -> R, long side -> int(R * long / short)
    assert resized_size(100, 50, 32) == (64, 32)
    assert resized_size(33, 50, 32) == (32, 48)      # int(32 * 50 / 33) = int(48.48)
    assert resized_size(40, 40, 16) == (16, 16)


def test_center_crop_flip_and_range_on_a_known_image():
    x = (np.arange(4 * 8 * 3).reshape(4, 8, 3) * 2).astype(np.uint8)   # h 4, w 8: no resize
    want = (x[:, 2:6].astype(np.float32) / 255 - 0.5) / 0.5           # round((8 - 4) / 2) = 2
    img = Image.fromarray(x)
    np.testing.assert_array_equal(transform_image(img, 4), want)
    np.testing.assert_array_equal(transform_image(img, 4, flip=True), want[:, ::-1])
    # random crop offsets floor(u * (w - R + 1)): u = 0.999 -> 4 (the last), 0.2 -> 1
    np.testing.assert_array_equal(transform_image(img, 4, crop=(0.5, 0.999))[0, 0],
                                  (x[0, 4].astype(np.float32) / 255 - 0.5) / 0.5)
    np.testing.assert_array_equal(transform_image(img, 4, crop=(0.0, 0.2))[0, 0],
                                  (x[0, 1].astype(np.float32) / 255 - 0.5) / 0.5)
    # black and white are exactly -1 and 1 after a resize
    bw = np.zeros((10, 20, 3), np.uint8)
    bw[:, 10:] = 255
    out = transform_image(Image.fromarray(bw), 5)
    assert out.shape == (5, 5, 3) and out.dtype == np.float32
    assert out.min() == -1.0 and out.max() == 1.0


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_other_modes_become_rgb(mode):
    rgb = Image.fromarray(_rand(0, 6, 6))
    img = rgb.convert(mode)
    out = transform_image(img, 6)
    assert out.shape == (6, 6, 3)
    np.testing.assert_array_equal(out, transform_image(img.convert("RGB"), 6))
    if mode == "L":
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0],
                                                                            out[..., 2])


def test_exif_orientation_is_applied(tmp_path):
    x = _rand(0, 4, 8)
    exif = Image.Exif()
    exif[0x0112] = 6                                   # "rotate 90 degrees clockwise to view"
    Image.fromarray(x).save(tmp_path / "r.png", exif=exif)
    (tmp_path / "r.txt").write_text("r")
    out = load_images(read_image_folder(tmp_path), 4)[0]
    upright = np.rot90(x, k=-1)                        # 8 high, 4 wide: center rows 2..5
    np.testing.assert_array_equal(out, (upright[2:6].astype(np.float32) / 255 - 0.5) / 0.5)


def test_load_images_matches_center_crop_batches(tmp_path):
    f = read_image_folder(_txt_folder(tmp_path, 3, (12, 10)))
    imgs = load_images(f, 8)
    assert imgs.shape == (3, 8, 8, 3) and imgs.dtype == np.float32
    src = image_folder_source(f, resolution=8, tokenize=_ids, global_batch_size=3, seed=0,
                              process_index=0, process_count=1)
    b = next(src(None))
    np.testing.assert_array_equal(b["pixel_values"], imgs[b["index"]])
    rand = load_images(f, 8, center_crop=False, seed=1)
    np.testing.assert_array_equal(rand, load_images(f, 8, center_crop=False, seed=1))


# -- batches ------------------------------------------------------------------------------------

def _src(folder, **kw):
    kw = {"resolution": 8, "tokenize": _ids, "global_batch_size": 4, "seed": 3,
          "center_crop": False, "random_flip": True, "process_index": 0, "process_count": 1,
          **kw}
    return image_folder_source(folder, **kw)


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batches_keys_dtypes_and_epoch_order(tmp_path):
    f = read_image_folder(_txt_folder(tmp_path, 9, (12, 10)))
    it = _src(f)(None)
    batches = [next(it) for _ in range(2)]              # 9 // 4 = 2 batches an epoch
    b = batches[0]
    assert b["pixel_values"].shape == (4, 8, 8, 3) and b["pixel_values"].dtype == np.float32
    assert b["input_ids"].dtype == np.int32 and b["index"].dtype == np.int32
    assert -1 <= b["pixel_values"].min() and b["pixel_values"].max() <= 1
    np.testing.assert_array_equal(b["input_ids"][:, 2], b["index"])   # the caption's own ids
    seen = np.concatenate([x["index"] for x in batches])
    assert len(set(seen.tolist())) == 8                   # an epoch: no record twice
    assert it.state == {"epoch": 1, "index": 0}
    np.testing.assert_array_equal(
        seen, np.random.default_rng([3, 0]).permutation(9)[:8])  # BatchIterator's order


def test_resume_gives_the_same_pixels(tmp_path):
    f = read_image_folder(_txt_folder(tmp_path, 6, (12, 10)))
    src = _src(f)
    it = src(None)
    for _ in range(3):                                   # into the second epoch
        next(it)
    state = dict(it.state)
    want = [next(it) for _ in range(3)]
    got_it = _src(f)(json.loads(json.dumps(state)))
    got = [next(got_it) for _ in range(3)]
    assert all(_same(a, b) for a, b in zip(want, got))
    serial = _src(f, num_threads=1)(state)            # decode threads change nothing
    assert _same(want[0], next(serial))
    # the augmentation is on: same records in another epoch get other crops / flips
    assert not all(_same(a, b) for a, b in zip(want, [next(src(None)) for _ in range(3)]))
    other = next(_src(f, seed=4)(None))
    assert not _same(want[0], other)
    with pytest.raises(ValueError, match="state must be"):
        src({"epoch": 0})
    with pytest.raises(ValueError, match="index must be <= 0"):
        src({"epoch": 0, "index": 5})


def test_hosts_partition_the_global_batch(tmp_path):
    f = read_image_folder(_txt_folder(tmp_path, 10, (12, 10)))
    whole = _src(f, global_batch_size=6)(None)
    parts = [_src(f, global_batch_size=6, process_index=p, process_count=3)(None)
             for p in range(3)]
    for _ in range(3):
        w = next(whole)
        shares = [next(p) for p in parts]
        assert all(s["pixel_values"].shape[0] == 2 for s in shares)
        assert _same(w, {k: np.concatenate([s[k] for s in shares]) for k in w})
    with pytest.raises(ValueError, match="not divisible by the process count 4"):
        _src(f, global_batch_size=6, process_index=0, process_count=4)


def test_one_image_folder_with_batch_4(tmp_path, caplog):
    _png(tmp_path / "only.png", _rand(0, 12, 16))
    f = read_image_folder(tmp_path, caption="a photo of sks dog")
    with caplog.at_level(logging.WARNING, logger="jaxdiff.data.image_source"):
        src = _src(f)
    assert sum("fewer than the global batch 4" in r.getMessage() for r in caplog.records) == 1
    it = src(None)
    b = next(it)
    assert b["pixel_values"].shape == (4, 8, 8, 3) and list(b["index"]) == [0, 0, 0, 0]
    assert it.state == {"epoch": 1, "index": 0}          # one batch an epoch
    # each copy has its own random crop / flip
    assert len({x.tobytes() for x in b["pixel_values"]}) > 1
    three = ImageFolder(f.root, f.files * 3, f.captions * 3)   # N = 3 < G = 4: two permutations
    idx = next(_src(three)(None))["index"]
    assert max(np.bincount(idx)) <= 2


def test_long_captions_warn_once_by_file(tmp_path, caplog):
    vocab = {**{c: i for i, c in enumerate("abc")}, "a</w>": 3, "b</w>": 4, "c</w>": 5,
             "<|startoftext|>": 6, "<|endoftext|>": 7}
    tok = CLIPTokenizer(vocab, [], max_length=4)        # 2 caption tokens fit
    _txt_folder(tmp_path, 3)
    (tmp_path / "img1.txt").write_text("a b c")
    f = read_image_folder(tmp_path, caption_source="txt")
    f = ImageFolder(f.root, f.files, ("a", "a b c", "b"))
    with caplog.at_level(logging.WARNING, logger="jaxdiff.data.image_source"):
        src = _src(f, tokenize=tok, global_batch_size=2)
        it = src(None)
        batches = [next(it) for _ in range(4)]
    warned = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warned) == 1 and "img1.png" in warned[0] and "'c'" in warned[0]
    b = batches[0]
    np.testing.assert_array_equal(b["input_ids"], tok([f.captions[i] for i in b["index"]])
                                  .input_ids)
    with pytest.raises(ValueError, match=r"tokenize must return \[N, L\] integer ids"):
        _src(f, tokenize=lambda c: np.zeros((len(c),), np.int32))
