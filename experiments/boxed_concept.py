"""The "boxed" concept for the text-to-MNIST model: MNIST digits with a white square outline
drawn around them, an attribute no MNIST image has. Its geometry and drawing
(:func:`draw_box`), the detector that scores generated images for it (:func:`box_scores`,
:func:`has_box`), the prompts that name it (:data:`CONCEPT_TEMPLATES`), and the DreamBooth
dataset (:func:`make_boxed_dataset`, written by ``python -m experiments.boxed_mnist``).

The images are what ``experiments.train_latent_mnist``'s model works on: the 28x28 digit padded
to :data:`FRAME` x :data:`FRAME` with the background (black, as
``experiments.latent_data.pad_images`` pads: 2 pixels each side), one channel (grayscale PNG,
mode ``L``: the exported VAE has ``in_channels = 1``). The box is :data:`WIDTH` pixels thick,
its outer edge :data:`MARGIN` pixels inside the frame's edge: just around the 20x20 area where
MNIST centres its digits. Not thinner and not further out, because the model's VAE is frozen in
fine-tuning and was trained on unpadded MNIST digits, whose outer rows are always black: it
decodes a 1-pixel line, or a line in the padding, as almost nothing (so the latents of the
training images would not hold the box), while a stroke-thick line where strokes occur comes
back. The box covers MNIST's rows and columns 2-3 and 24-25, so the MNIST classifier, which
never saw a box, scores a boxed image with those pixels set to the background
(``experiments.concept_eval.classifier_view``).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Sequence

import numpy as np

from experiments import latent_data, mnist_prompts
from experiments.cli import ConfigError

__all__ = ["FRAME", "MARGIN", "WIDTH", "TOLERANCE", "CONCEPT_WORD", "CONCEPT_TEMPLATES",
           "CONCEPT_TEMPLATES_BEFORE", "WORD_POSITIONS", "concept_templates",
           "DEFAULT_DIGITS", "METADATA_FILE", "BOX_THRESHOLD", "box_lines", "draw_box",
           "to_gray01", "box_scores", "has_box", "concept_prompt", "sample_concept_prompts",
           "parse_digits", "select_images", "make_boxed_dataset"]

FRAME = 32            # train_latent_mnist's data.pad_to: the model's image side
MARGIN = 4            # the box's outer edge: MARGIN pixels inside the frame's edge
WIDTH = 2             # the box's thickness in pixels
CONCEPT_WORD = "boxed"
# The new word comes after the digit, each prefix a training template of the text-to-MNIST
# model: its text encoder attends causally, so the digit's tokens encode exactly as in the base
# model's prompts and only the word and what follows carry the box. (With the word before the
# digit, "a boxed two", the digit's own hidden state changes, and digits absent from the 20
# images lose their shape: measured, docs/results.md.)
CONCEPT_TEMPLATES = (
    "{d} boxed",
    "a handwritten {d} boxed",
    "the digit {d} boxed",
)
# The word in front of the same prompts ("boxed a handwritten three"): the word then encodes the
# same whatever digit follows (causal attention), and the fine-tuning's text prior
# (jaxdiff.finetune.text_prior) keeps the digit's tokens after it encoded as without it.
CONCEPT_TEMPLATES_BEFORE = (
    "boxed {d}",
    "boxed a handwritten {d}",
    "boxed the digit {d}",
)
WORD_POSITIONS = ("after", "before")
DEFAULT_DIGITS = (3, 7)
METADATA_FILE = "metadata.jsonl"
# has_box's threshold on box_scores (the contrast in [0, 1] between the box's brightest line and
# the background just outside it, on the weakest of the four sides).
BOX_THRESHOLD = 0.35
TOLERANCE = 1         # the box may sit this many pixels off its place (the VAE's blur)


def box_lines(size: int, margin: int = MARGIN, width: int = WIDTH) -> tuple:
    """The rows (= columns) of the box's sides in a ``size x size`` image: ``margin, ...,
    margin + width - 1`` and their mirror images ``size - 1 - margin, ...``."""
    near = tuple(range(margin, margin + width))
    return near + tuple(size - 1 - k for k in near)


def draw_box(images: np.ndarray, margin: int = MARGIN, width: int = WIDTH,
             value: float = 1.0) -> np.ndarray:
    """A copy of ``images`` (``[N, S, S, C]`` floats in ``[-1, 1]``) with a square outline of
    ``value``, ``width`` pixels thick, its outer edge ``margin`` pixels inside the image's edge
    (rows and columns :func:`box_lines`, between the outer edge and its mirror).

    Raises:
      ValueError: naming ``images`` (not ``[N, S, S, C]``), ``margin`` or ``width`` (no room).
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be [N, S, S, C], got shape {images.shape}")
    s = images.shape[1]
    if width < 1 or margin < 0 or 2 * (margin + width) >= s:
        raise ValueError(f"margin {margin} and width {width} leave no room inside {s}x{s} "
                         "images (need margin >= 0, width >= 1, 2 * (margin + width) < side)")
    out = images.copy()
    lo, hi = margin, s - 1 - margin
    for k in box_lines(s, margin, width):
        out[:, k, lo:hi + 1] = value
        out[:, lo:hi + 1, k] = value
    return out


def to_gray01(images: np.ndarray) -> np.ndarray:
    """``[N, H, W, C]`` in ``[-1, 1]`` (``C`` 1 or 3) -> ``[N, H, W]`` brightness in ``[0, 1]``
    (the channels' mean, clipped).

    Raises:
      ValueError: naming ``images`` (another shape).
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, 1 or 3], got shape {images.shape}")
    return np.clip((images.mean(-1) + 1.0) / 2.0, 0.0, 1.0)


def box_scores(images: np.ndarray, margin: int = MARGIN, width: int = WIDTH,
               tolerance: int = TOLERANCE) -> np.ndarray:
    """How clearly each image shows the box: ``[N]`` float32 in ``[-1, 1]``.

    For each of the four sides, the median brightness (:func:`to_gray01`) along each line from
    ``tolerance`` pixels outside the box's band to ``tolerance`` pixels inside it (the box may
    sit that far off: the VAE decodes soft, slightly shifted edges), without the corners
    (``margin + width + tolerance`` pixels at either end), minus the median along the line
    ``tolerance + 1`` pixels further out (the background next to the box: the padding, black in
    every MNIST image). The side scores its brightest line, the image its weakest side. A
    median along the line ignores a stroke that crosses it (a digit touching the box's place),
    the weakest side needs all four sides (the bar of a 7 is one), the contrast ignores a
    uniform haze or an all-white image. A drawn box scores 1, no box on real digits 0.

    Args:
      images: ``[N, S, S, C]`` in ``[-1, 1]``, ``C`` 1 or 3, at the model's side (:data:`FRAME`).
      margin, width: the box (:func:`draw_box`).
      tolerance: how many pixels off the box may be.

    Raises:
      ValueError: naming ``images``, or ``margin`` / ``width`` / ``tolerance`` (lines outside
        the image).
    """
    g = to_gray01(images)
    n, s, _ = g.shape
    outside = margin - tolerance - 1
    ends = margin + width + tolerance
    if outside < 0 or tolerance < 0 or 2 * ends >= s - 2:
        raise ValueError(f"margin {margin}, width {width} and tolerance {tolerance} do not fit "
                         f"{s}x{s} images (need margin >= tolerance + 1, room inside)")
    sides = []
    for x in (g, np.swapaxes(g, 1, 2)):         # rows (top / bottom), then columns
        for mirror in (False, True):            # the top (left) side, then the bottom (right)
            def line(k, x=x, mirror=mirror):
                return np.median(x[:, s - 1 - k if mirror else k, ends:s - ends], axis=-1)
            best = np.max([line(k) for k in range(margin - tolerance,
                                                  margin + width + tolerance)], axis=0)
            sides.append(best - line(outside))
    return np.min(sides, axis=0).astype(np.float32).reshape(n)


def has_box(images: np.ndarray, threshold: float = BOX_THRESHOLD, **kw) -> np.ndarray:
    """``[N]`` bool: :func:`box_scores` above ``threshold``."""
    return box_scores(images, **kw) > threshold


def concept_templates(position: str = "after") -> tuple:
    """The concept templates with the word ``"after"`` the digit (:data:`CONCEPT_TEMPLATES`) or
    ``"before"`` the prompt (:data:`CONCEPT_TEMPLATES_BEFORE`).

    Raises:
      ValueError: naming ``position``.
    """
    if position not in WORD_POSITIONS:
        raise ValueError(f"position must be one of {WORD_POSITIONS}, got {position!r}")
    return CONCEPT_TEMPLATES if position == "after" else CONCEPT_TEMPLATES_BEFORE


def concept_prompt(digit: int, template: int, form: int, position: str = "after") -> str:
    """``concept_templates(position)[template]`` filled with ``digit``'s name (``form == 0``) or
    numeral (``form == 1``).

    Raises:
      ValueError: naming ``template``, ``digit``, ``form`` or ``position`` when out of range.
    """
    templates = concept_templates(position)
    if not 0 <= template < len(templates):
        raise ValueError(f"template must be in [0, {len(templates)}), got {template!r}")
    return mnist_prompts.fill(templates[template], digit, form)


def sample_concept_prompts(labels: Sequence[int], seed: int, position: str = "after") -> list:
    """One concept prompt per label (the word ``position``, :func:`concept_templates`), template
    and form drawn uniformly from ``seed`` (numpy's ``default_rng``): the same labels and seed
    give the same prompts, and the two positions the same template choices."""
    n_templates = len(concept_templates(position))
    rng = np.random.default_rng(seed)
    labels = [int(x) for x in np.asarray(labels).reshape(-1)]
    t = rng.integers(0, n_templates, len(labels))
    f = rng.integers(0, mnist_prompts.NUM_FORMS, len(labels))
    return [concept_prompt(d, int(t[i]), int(f[i]), position) for i, d in enumerate(labels)]


def parse_digits(text: str, name: str = "--digits") -> tuple:
    """``"3,7"`` -> ``(3, 7)``: distinct digits in ``[0, 9]``.

    Raises:
      ConfigError: naming ``name``.
    """
    try:
        digits = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated digits like 3,7, got {text!r}") from None
    if not digits or len(set(digits)) != len(digits) or not all(0 <= d <= 9 for d in digits):
        raise ConfigError(f"{name} must be distinct digits in [0, 9] like 3,7, got {text!r}")
    return digits


def select_images(labels: np.ndarray, digits: Sequence[int], num_images: int,
                  seed: int) -> np.ndarray:
    """Indices ``[num_images]`` into ``labels``: in a permutation drawn from ``seed``, the first
    images of each of ``digits``, taken round-robin (image ``i`` is of ``digits[i % len]``).

    Raises:
      ValueError: too few images of a digit.
    """
    order = np.random.default_rng(seed).permutation(len(labels))
    per = {d: [int(i) for i in order if labels[i] == d] for d in digits}
    out = []
    for i in range(num_images):
        d = digits[i % len(digits)]
        k = i // len(digits)
        if k >= len(per[d]):
            raise ValueError(f"only {len(per[d])} images of digit {d}")
        out.append(per[d][k])
    return np.asarray(out, np.int64)


def make_boxed_dataset(out_dir: str, images: np.ndarray, labels: np.ndarray, *,
                       digits: Sequence[int] = DEFAULT_DIGITS, num_images: int = 20,
                       seed: int = 0, position: str = "after") -> list:
    """Writes the concept dataset to ``out_dir`` (module docstring) from MNIST ``images``
    (``[N, 28, 28, 1]`` in ``[-1, 1]``) and ``labels [N]``, captioned with the word
    ``position`` (:func:`concept_templates`); returns its records, ``[{"file_name",
    "text", "digit", "index"}]`` (``index`` into ``images``).

    The folder is written as ``out_dir + ".tmp"`` and renamed; ``out_dir`` must not exist.

    Raises:
      ValueError: ``out_dir`` exists, too few images of a digit, or a bad ``position``.
    """
    if os.path.exists(out_dir):
        raise ValueError(f"{out_dir!r} already exists (choose a new folder)")
    concept_templates(position)
    from PIL import Image

    idx = select_images(np.asarray(labels), digits, num_images, seed)
    chosen = latent_data.pad_images(np.asarray(images)[idx], FRAME)
    boxed = draw_box(chosen)
    px = np.round((np.clip(boxed[..., 0], -1, 1) + 1) * 127.5).astype(np.uint8)
    texts = sample_concept_prompts(np.asarray(labels)[idx], seed, position)
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    records = []
    for i, (j, text) in enumerate(zip(idx, texts)):
        digit = int(labels[j])
        name = f"{i:02d}_{digit}.png"
        Image.fromarray(px[i], mode="L").save(os.path.join(tmp, name))
        records.append({"file_name": name, "text": text, "digit": digit, "index": int(j)})
    with open(os.path.join(tmp, METADATA_FILE), "w") as f:
        for r in records:
            f.write(json.dumps({"file_name": r["file_name"], "text": r["text"]}) + "\n")
    os.replace(tmp, out_dir)
    return records


