"""The ControlNet arguments of :func:`~jaxdiff.pipelines.generate`, checked before anything is
compiled (:func:`~jaxdiff.pipelines.controlnet.prepare_controlnets`), and diffusers' step window
(:func:`~jaxdiff.pipelines.controlnet.controlnet_keep`). Configs only (no weights are read: the
checks never look at them). Parity with diffusers: tests/parity/test_controlnet_pipeline_parity.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxdiff.models import UNetConfig, controlnet_config_from_unet
from jaxdiff.pipelines.controlnet import controlnet_keep, prepare_controlnets

UNET = UNetConfig(in_channels=4, out_channels=4, block_channels=(32, 64), layers_per_block=1,
                  attention=("cross", None), mid_attention="cross", num_heads=2, norm_groups=8,
                  context_dim=24)
NET = (controlnet_config_from_unet(UNET, conditioning_embedding_channels=(8, 16)), {})
IMAGE = np.zeros((1, 40, 24, 3), np.uint8)


def _prepare(controlnet=NET, image=IMAGE, **kw):
    args = dict(scale=1.0, guess_mode=False, start=0.0, end=1.0, batch=2, num_steps=3,
                multiple=8, height=None, width=None)
    return prepare_controlnets(UNET, controlnet, image, **{**args, **kw})


def test_keep_is_diffusers_window():
    # i / N < start or (i + 1) / N > end drops step i
    np.testing.assert_array_equal(controlnet_keep(3, 0.3, 1.0), [0, 1, 1])
    np.testing.assert_array_equal(controlnet_keep(3, 0.0, 0.6), [1, 0, 0])
    np.testing.assert_array_equal(controlnet_keep(4, 0.25, 0.75), [0, 1, 1, 0])
    np.testing.assert_array_equal(controlnet_keep(5, 0.0, 1.0), np.ones(5))


def test_images_are_resized_and_repeated():
    got = _prepare(image=np.full((40, 24, 3), 255, np.uint8))
    assert (got.height, got.width) == (40, 24)  # the control image's size by default
    assert got.args["images"][0].shape == (2, 40, 24, 3)
    assert got.args["images"][0].dtype == np.float32 and got.args["images"][0].max() == 1.0
    two = _prepare([NET, NET], [IMAGE, np.zeros((2, 16, 16, 3), np.float32)], height=32,
                   width=32, scale=[0.5, 2.0], end=[1.0, 0.5])
    assert [a.shape for a in two.args["images"]] == [(2, 32, 32, 3)] * 2  # resized, not refused
    np.testing.assert_array_equal(two.args["scales"], [0.5, 2.0])
    np.testing.assert_array_equal(two.args["keep"], [[1, 1, 1], [1, 0, 0]])
    assert len(two.configs) == 2 and not two.guess_mode
    pooled = (dataclasses.replace(NET[0], global_pool_conditions=True), {})
    assert _prepare(pooled).guess_mode  # as diffusers: pooled conditions imply guess mode


@pytest.mark.parametrize("kw,match", [
    (dict(controlnet=[NET, NET], image=[IMAGE]), "control_image has 1 images for 2 ControlNets"),
    (dict(controlnet=[NET, NET], image=IMAGE), "control_image must be a list of 2 images"),
    (dict(controlnet=[NET, NET], image=[IMAGE, IMAGE], scale=[1.0]),
     "controlnet_conditioning_scale has 1 entries for 2 ControlNets"),
    (dict(image=np.zeros((32, 32, 4), np.uint8)), r"control_image must be \[B, H, W, 3\]"),
    (dict(image=np.zeros((32, 32, 3), np.int32)), "control_image must be uint8"),
    (dict(image=np.full((32, 32, 3), 2.0, np.float32)), "control_image: a float image"),
    (dict(image=np.zeros((3, 32, 32, 3), np.uint8)), "control_image has batch 3 for 2"),
    (dict(image=None), "controlnet needs control_image"),
    (dict(controlnet=(NET[0],)), r"controlnet\[0\] must be \(ControlNetConfig, params\)"),
    (dict(controlnet=[]), "controlnet must be"),
    (dict(controlnet=[NET, "x"], image=[IMAGE, IMAGE]), r"controlnet\[1\] must be"),
    (dict(start=0.5, end=0.5), "control_guidance_start"),
    (dict(end=1.5), "control_guidance_end"),
    (dict(guess_mode="yes"), "guess_mode must be a bool"),
])
def test_errors_name_the_argument(kw, match):
    args = {"controlnet": kw.pop("controlnet", NET), "image": kw.pop("image", IMAGE)}
    with pytest.raises(ValueError, match=match):
        _prepare(args["controlnet"], args["image"], **kw)


def test_a_controlnet_of_another_width_is_refused():
    other = (controlnet_config_from_unet(dataclasses.replace(UNET, context_dim=32),
                                         conditioning_embedding_channels=(8, 16)), {})
    with pytest.raises(ValueError, match=r"controlnet\[1\]: .*cross-attention width"):
        _prepare([NET, other], [IMAGE, IMAGE])
    with pytest.raises(ValueError, match="^controlnet: .*cross-attention width"):
        _prepare(other)
