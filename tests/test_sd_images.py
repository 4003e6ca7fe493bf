"""Image inputs and outputs of the pipelines (``jaxdiff.pipelines.images``): the accepted dtypes
and ranges, resizing exactly as diffusers' ``VaeImageProcessor`` (arrays: PyTorch's nearest
rule; files: Pillow's Lanczos), and output paths refused before any work."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from jaxdiff.pipelines.images import (
    check_output_path,
    load_image,
    prepare_image,
    resize_nearest,
    save_images,
)


def _rand(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_accepted_inputs_and_ranges():
    u8 = _rand((2, 16, 24, 3))
    np.testing.assert_array_equal(prepare_image(u8, channels=3, multiple=8), u8 / np.float32(255))
    f = u8.astype(np.float64) / 255
    out = prepare_image(f[0], channels=3, multiple=8)                 # [H, W, C]: a batch of 1
    assert out.shape == (1, 16, 24, 3) and out.dtype == np.float32
    with pytest.raises(ValueError, match=r"\[0, 255\] \(it looks like 0-255: divide by 255\)"):
        prepare_image(u8.astype(np.float32), channels=3, multiple=8)
    with pytest.raises(ValueError, match=r"\[-1, 1\] \(it looks like \[-1, 1\]: use \(image \+ 1"):
        prepare_image(f * 2 - 1, channels=3, multiple=8)
    for dtype in (np.int64, np.int32, np.uint16, np.bool_):
        with pytest.raises(ValueError, match=f"image must be uint8 .* got dtype {np.dtype(dtype)}"):
            prepare_image(u8.astype(dtype), channels=3, multiple=8)
    bad = f.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        prepare_image(bad, channels=3, multiple=8)
    with pytest.raises(ValueError, match=r"image must be \[B, H, W, 3\]"):
        prepare_image(u8[..., :1], channels=3, multiple=8)
    with pytest.raises(ValueError, match="image of 5x24 .* smaller than 8 pixels"):
        prepare_image(u8[:, :5], channels=3, multiple=8)


@pytest.mark.slow  # imports torch / diffusers (> 1.5 s on 2 cores)
@pytest.mark.parametrize("size,target", [((37, 100), (32, 96)), ((16, 16), (32, 32)),
                                         ((33, 47), (24, 40)), ((100, 37), (96, 32))])
def test_resize_nearest_matches_torch(size, target):
    torch = pytest.importorskip("torch")
    x = _rand((1, *size, 3)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2),
                                          size=target).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(resize_nearest(x, *target), ref)


@pytest.mark.slow  # imports torch / diffusers (> 1.5 s on 2 cores)
def test_sizes_round_down_as_diffusers():
    """diffusers' VaeImageProcessor (vae_scale_factor 8, the SD value): a 37x100 image becomes
    32x96; an array by nearest neighbour, a file by Lanczos; both bit for bit."""
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    proc = diffusers.image_processor.VaeImageProcessor(vae_scale_factor=8)
    x = _rand((37, 100, 3), seed=1)
    ours = prepare_image(x, channels=3, multiple=8)
    ref = proc.preprocess(x[None].astype(np.float32) / 255).permute(0, 2, 3, 1).numpy()
    assert ours.shape == ref.shape == (1, 32, 96, 3)
    np.testing.assert_allclose(ours * 2 - 1, ref, atol=1e-6)


@pytest.mark.slow  # imports torch / diffusers (> 1.5 s on 2 cores)
def test_load_image_resizes_as_diffusers(tmp_path):
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    path = str(tmp_path / "in.png")
    Image.fromarray(_rand((37, 100, 3), seed=2)).save(path)
    ours = load_image(path)
    ref = diffusers.image_processor.VaeImageProcessor(vae_scale_factor=8).preprocess(
        Image.open(path)).permute(0, 2, 3, 1).numpy()[0]
    assert ours.shape == (32, 96, 3) and ours.dtype == np.uint8
    np.testing.assert_allclose(ours / np.float32(255) * 2 - 1, ref, atol=1e-6)
    assert load_image(path, height=64, width=48).shape == (64, 48, 3)     # an explicit size
    grey = load_image(path, mode="L")
    assert grey.shape == (32, 96, 1)


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="--init_image .*nope.png.*cannot read the image"):
        load_image(str(tmp_path / "nope.png"), name="--init_image")
    text = tmp_path / "text.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="text.png.*cannot read the image"):
        load_image(str(text))
    with pytest.raises(ValueError, match="cannot read the image"):
        load_image(str(tmp_path))                                      # a folder
    small = str(tmp_path / "small.png")
    Image.fromarray(_rand((5, 40, 3))).save(small)
    with pytest.raises(ValueError, match=r"small.png' of 5x40 .* smaller than 8 pixels"):
        load_image(small)


def test_output_paths_are_checked_before_the_work(tmp_path):
    ok = str(tmp_path / "new" / "deeper" / "out.png")                 # folders made on save
    assert check_output_path(ok) == ok and not os.path.exists(tmp_path / "new")
    with pytest.raises(ValueError, match="--out 'x' has no extension; use one of .png"):
        check_output_path("x", "--out")
    with pytest.raises(ValueError, match=r"extension '.txt'"):
        check_output_path(str(tmp_path / "a.txt"))
    folder = tmp_path / "d.png"
    folder.mkdir()
    with pytest.raises(ValueError, match="is a directory, expected a file path"):
        check_output_path(str(folder))
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        check_output_path(str(a_file / "sub" / "out.png"))
    # a read-only place: /proc takes no new files, even from root
    with pytest.raises(ValueError, match="cannot write /proc/out.png: /proc is not writable"):
        check_output_path("/proc/out.png")
    if os.geteuid() != 0:   # root may write in a read-only folder
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        with pytest.raises(ValueError, match="is not writable"):
            check_output_path(str(ro / "out.png"))


def test_save_images(tmp_path):
    imgs = _rand((2, 8, 8, 3))
    paths = save_images(imgs, str(tmp_path / "o" / "img.jpg"))
    assert [os.path.basename(p) for p in paths] == ["img_0.jpg", "img_1.jpg"]
    assert Image.open(paths[1]).format == "JPEG"
    (one,) = save_images(imgs[:1], str(tmp_path / "one.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(one)), imgs[0])
    with pytest.raises(ValueError, match="has no extension"):
        save_images(imgs, str(tmp_path / "noext"))
    with pytest.raises(ValueError, match="images must be uint8"):
        save_images(imgs.astype(np.float32), str(tmp_path / "x.png"))
