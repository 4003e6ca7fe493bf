r"""The ControlNet demo on the text-to-MNIST model, its library: control images made from MNIST
digits (their coarse *silhouette*), the pairs folder ``experiments.train_controlnet`` trains on
(written by ``python -m experiments.controlnet_mnist``), and the agreement between a control and
the same transform of a generated digit (``experiments.eval_controlnet_mnist``).

**The transform** (:func:`silhouette`): the digit's centred 28x28 image, its brightness in
``[0, 1]`` averaged over 4x4 blocks (a 7x7 grid), each block on where the mean is at least
:data:`THRESHOLD` (a quarter of the block inked, about a stroke crossing it). The control image
(:func:`control_images`) is that 7x7 mask upsampled to 28x28 (each block a 4x4 square) and padded
to the model's 32x32 frame with the background, as the digits are (``experiments.latent_data.
pad_images``): white blocks where the digit is, a layout hint that leaves the strokes to the
model. The digit class is in the caption, not in the control.

**The agreement** (:func:`agreement`): the intersection over union of the control's mask and the
mask of the generated image (the same transform), per image; and the correlation of the two 7x7
block means (the soft version, insensitive to the threshold).

**The folder** (:func:`write_pairs`): ``NNNNN.png`` (the digit, 32x32 grayscale), ``control/
NNNNN.png`` (its control image) and ``metadata.jsonl`` with ``file_name``, ``text`` and
``conditioning_image`` (diffusers' ``train_controlnet`` columns); the captions are the latent
model's training templates without adjectives ("a handwritten seven", "the digit 7"), drawn from
``seed``, as are the images (a permutation of the training set). The same arguments write the
same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Sequence

import numpy as np

from experiments import latent_data, mnist_prompts

__all__ = ["THRESHOLD", "BLOCK", "FRAME", "silhouette", "block_means", "control_images",
           "agreement", "mnist_captions", "write_pairs"]

BLOCK = 4          # 28 = 7 * 4: the 7x7 grid's block side
THRESHOLD = 0.25   # a block is "on" at this mean brightness (in [0, 1])
FRAME = 32         # the model's image side (28 padded by 2)


def _gray28(images: np.ndarray) -> np.ndarray:
    """``[N, S, S, C]`` in ``[-1, 1]`` (``S`` 28, or 32: the centred crop) -> ``[N, 28, 28]`` in
    ``[0, 1]``."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[1] < 28:
        raise ValueError(f"images must be [N, S, S, C] with S >= 28, got {images.shape}")
    if images.shape[1] != 28:
        images = latent_data.crop_images(images)
    return np.clip((images.mean(-1) + 1.0) / 2.0, 0.0, 1.0)


def block_means(images: np.ndarray) -> np.ndarray:
    """``[N, 7, 7]`` float32: the mean brightness (``[0, 1]``) of each 4x4 block of the centred
    28x28 image (``images`` as :func:`silhouette`'s)."""
    g = _gray28(images)
    n = g.shape[0]
    return g.reshape(n, 7, BLOCK, 7, BLOCK).mean(axis=(2, 4))


def silhouette(images: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """``[N, 7, 7]`` bool: the blocks whose mean brightness is at least ``threshold``.

    Args:
      images: ``[N, S, S, C]`` in ``[-1, 1]``, ``S`` 28 or the model's 32 (its centred 28x28).
      threshold: in ``(0, 1)``.

    Raises:
      ValueError: naming ``images`` (another shape).
    """
    return block_means(images) >= threshold


def control_images(masks: np.ndarray) -> np.ndarray:
    """``[N, 7, 7]`` masks -> ``[N, 32, 32, 1]`` uint8 control images: each block a 4x4 square
    of 255 (on) or 0, padded by 2 pixels of 0 to the model's frame."""
    masks = np.asarray(masks, bool)
    up = np.kron(masks.astype(np.uint8), np.ones((BLOCK, BLOCK), np.uint8)) * 255
    pad = (FRAME - 28) // 2
    return np.pad(up, ((0, 0), (pad, pad), (pad, pad)))[..., None].astype(np.uint8)


def agreement(masks: np.ndarray, images: np.ndarray) -> dict:
    """How well generated ``images`` (``[N, 32, 32, C]`` in ``[-1, 1]``) follow their controls
    (``masks [N, 7, 7]`` bool, the controls' :func:`silhouette`): per image ``iou`` (the
    intersection over union of ``masks`` and the images' silhouettes; 1 when both are empty) and
    ``corr`` (the correlation of the masks with the images' :func:`block_means`; 0 for a
    constant image). Returns ``{"iou": [N], "corr": [N]}`` float32.

    Raises:
      ValueError: ``masks`` and ``images`` of different counts.
    """
    masks = np.asarray(masks, bool)
    if len(masks) != len(images):
        raise ValueError(f"masks ({len(masks)}) and images ({len(images)}) differ in count")
    out = silhouette(images)
    inter = (masks & out).sum(axis=(1, 2))
    union = (masks | out).sum(axis=(1, 2))
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    a = masks.reshape(len(masks), -1).astype(np.float32)
    b = block_means(images).reshape(len(masks), -1)
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    corr = np.where(den > 0, (a * b).sum(1) / np.maximum(den, 1e-12), 0.0)
    return {"iou": iou.astype(np.float32), "corr": corr.astype(np.float32)}


def mnist_captions(labels: Sequence[int], seed: int) -> list:
    """One caption per digit: a training template of the latent model without adjectives, the
    digit as its name or numeral, both drawn from ``seed`` ("a handwritten seven")."""
    rng = np.random.default_rng(seed)
    temps = mnist_prompts.TRAIN_TEMPLATES
    return [mnist_prompts.caption(temps[rng.integers(len(temps))], int(d),
                                  int(rng.integers(mnist_prompts.NUM_FORMS)))
            for d in labels]


def write_pairs(out: str, images: np.ndarray, labels: np.ndarray, *, num_images: int,
                seed: int) -> list:
    """Writes the pairs folder (module docstring) of ``num_images`` digits of ``images`` (``[N,
    28, 28, 1]`` in ``[-1, 1]``) chosen by a permutation drawn from ``seed``; written beside
    ``out`` and renamed into place. Returns the ``metadata.jsonl`` records."""
    from PIL import Image

    idx = np.random.default_rng(seed).permutation(len(images))[:num_images]
    digits = latent_data.pad_images(images[idx], FRAME)
    px = np.round((digits[..., 0] + 1.0) * 127.5).astype(np.uint8)
    controls = control_images(silhouette(images[idx]))
    captions = mnist_captions(labels[idx], seed)
    tmp = out.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "control"))
    records = []
    for i in range(num_images):
        name = f"{i:05d}.png"
        Image.fromarray(px[i], "L").save(os.path.join(tmp, name))
        Image.fromarray(controls[i, ..., 0], "L").save(os.path.join(tmp, "control", name))
        records.append({"file_name": name, "text": captions[i],
                        "conditioning_image": f"control/{name}", "label": int(labels[idx[i]])})
    with open(os.path.join(tmp, "metadata.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, out)
    return records
