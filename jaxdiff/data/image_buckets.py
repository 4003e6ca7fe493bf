"""Aspect-ratio buckets (kohya's ``enable_bucket``): images keep roughly their shape instead of
being cropped to a square. Each batch is drawn from one bucket, so ``pixel_values`` is ``[b, H_k,
W_k, 3]`` with the bucket's size (a jitted train step compiles once per bucket size it meets).

Buckets (:func:`bucket_sizes`): every ``(H, W)`` with both sides multiples of ``step``, area at
most ``resolution ** 2`` (the largest such height for each width) and aspect ratio at most
``max_aspect``. An image goes to the bucket nearest to its aspect ratio (in log ratio, EXIF
orientation applied); it is resized to cover the bucket (Pillow bilinear) and center- or randomly
cropped to it, then flipped and scaled to ``[-1, 1]`` as :mod:`jaxdiff.data.image_transforms`.

Order: epoch ``e`` takes the permutation ``np.random.default_rng([seed, e]).permutation(N)``,
splits it by bucket (keeping its order), cuts each bucket's list into global batches of ``G``,
the last one filled up by repeating that bucket's records from its start (so every image is seen
each epoch and a bucket smaller than ``G`` still makes a batch), and shuffles the list of batches
with ``default_rng([seed, e, 2])``. Crops and flips of global batch ``i`` come from
``default_rng([seed, e, i, 1])`` as in :mod:`jaxdiff.data.image_source`, so a batch is a pure
function of ``(seed, e, i)``: resumable exactly, and sharded per host the same way.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from jaxdiff.data.image_folder import ImageFolder
from jaxdiff.data.image_source import ImageFolderIterator, check_state, tokenize_captions
from jaxdiff.data.image_transforms import load_image, map_threads
from jaxdiff.data.iterator import DataSource
from jaxdiff.validation import check_float, check_int

__all__ = ["bucket_sizes", "image_size", "assign_buckets", "BucketIterator",
           "bucketed_image_folder_source"]


def bucket_sizes(resolution: int, *, step: int = 64,
                 max_aspect: float = 2.0) -> List[Tuple[int, int]]:
    """``[(H, W), ...]``, sorted by ``W / H``: sides multiples of ``step``, ``H * W <=
    resolution ** 2``, the largest ``H`` for each ``W``, ``max(H / W, W / H) <= max_aspect``.

    Raises:
      ValueError: naming the argument, or when no bucket fits (``resolution < step``).
    """
    resolution = check_int("resolution", resolution, minimum=1)
    step = check_int("step", step, minimum=1)
    max_aspect = check_float("max_aspect", max_aspect, minimum=1.0)
    out = set()
    for w in range(step, resolution * resolution // step + 1, step):
        h = (resolution * resolution // w) // step * step
        if h >= step and max(h / w, w / h) <= max_aspect:
            out.add((h, w))
    if not out:
        raise ValueError(f"no bucket of sides multiple of step={step} fits resolution="
                         f"{resolution}")
    return sorted(out, key=lambda hw: hw[1] / hw[0])


def image_size(path: str) -> Tuple[int, int]:
    """``(height, width)`` of the image at ``path`` as displayed (EXIF orientation 5-8 swap the
    stored sides); reads the header only."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def assign_buckets(sizes: Sequence[Tuple[int, int]],
                   buckets: Sequence[Tuple[int, int]]) -> np.ndarray:
    """``[N]`` int: for each ``(height, width)``, the bucket nearest in ``log(W / H)``."""
    logs = np.log([w / h for h, w in buckets])
    return np.array([int(np.argmin(np.abs(logs - math.log(w / h)))) for h, w in sizes], int)


class BucketIterator(ImageFolderIterator):
    """:class:`~jaxdiff.data.ImageFolderIterator` whose batches each come from one bucket
    (module docstring). Extra args: ``buckets`` (``[(H, W)]``) and ``assignment`` (``[N]``, each
    record's bucket)."""

    def __init__(self, folder: ImageFolder, input_ids: np.ndarray, *,
                 buckets: Sequence[Tuple[int, int]], assignment: np.ndarray,
                 epoch: int = 0, index: int = 0, **kw):
        self.buckets = [tuple(b) for b in buckets]
        self.assignment = np.asarray(assignment)
        counts = np.bincount(self.assignment, minlength=len(self.buckets))
        g = check_int("global_batch_size", kw.get("global_batch_size"), minimum=1)
        self._per_epoch = int(sum(math.ceil(c / g) for c in counts))
        super().__init__(folder, input_ids, epoch=epoch, index=min(index, 0), **kw)
        self.batches_per_epoch = self._per_epoch
        self.index = check_int("index", index, 0, self.batches_per_epoch - 1)

    def epoch_batches(self, epoch: int) -> List[Tuple[int, np.ndarray]]:
        """Epoch ``epoch``'s global batches: ``(bucket, [G] record indices)``."""
        if self._order_epoch != epoch:
            g = self.global_batch_size
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            batches = []
            for k in range(len(self.buckets)):
                recs = perm[self.assignment[perm] == k]
                if len(recs):
                    recs = np.resize(recs, math.ceil(len(recs) / g) * g)  # repeats from start
                    batches += [(k, recs[j:j + g]) for j in range(0, len(recs), g)]
            order = np.random.default_rng([self.seed, epoch, 2]).permutation(len(batches))
            self._order = [batches[j] for j in order]
            self._order_epoch = epoch
        return self._order

    def batch_at(self, epoch: int, index: int) -> Dict[str, np.ndarray]:
        g, b = self.global_batch_size, self.local_batch_size
        k, recs = self.epoch_batches(epoch)[index]
        height, width = self.buckets[k]
        rng = np.random.default_rng([self.seed, epoch, index, 1])
        crops, flips = rng.random((g, 2)), rng.random(g) < 0.5
        lo = self.process_index * b
        idx, crops, flips = recs[lo:lo + b], crops[lo:lo + b], flips[lo:lo + b]

        def one(j):
            return load_image(self.folder.files[idx[j]], (height, width),
                              crop=None if self.center_crop else tuple(crops[j]),
                              flip=bool(self.random_flip and flips[j]))

        pixels = map_threads(one, range(b), self.num_threads, self._executor())
        return {"pixel_values": np.stack(pixels), "input_ids": self.input_ids[idx],
                "index": idx.astype(np.int32)}


def bucketed_image_folder_source(folder: ImageFolder, *, resolution: int, tokenize: Callable,
                                 global_batch_size: int, seed: int, step: int = 64,
                                 max_aspect: float = 2.0, center_crop: bool = True,
                                 random_flip: bool = False, process_index: Optional[int] = None,
                                 process_count: Optional[int] = None,
                                 num_threads: Optional[int] = None) -> DataSource:
    """:func:`~jaxdiff.data.image_folder_source` with aspect-ratio buckets: ``from_state(state)
    -> BucketIterator``; batches ``{"pixel_values": [b, H_k, W_k, 3], "input_ids", "index"}``
    with ``(H_k, W_k)`` one of :func:`bucket_sizes` ``(resolution, step=step,
    max_aspect=max_aspect)`` (``step``: 8 times the VAE's downsampling keeps latents whole).

    Raises:
      ValueError: as :func:`~jaxdiff.data.image_folder_source`, and for bad bucket arguments.
    """
    buckets = bucket_sizes(resolution, step=step, max_aspect=max_aspect)
    assignment = assign_buckets([image_size(f) for f in folder.files], buckets)
    input_ids = tokenize_captions(tokenize, folder.captions, folder.files)

    def from_state(state):
        pos = {} if state is None else {k: check_state(state)[k] for k in ("epoch", "index")}
        return BucketIterator(folder, input_ids, buckets=buckets, assignment=assignment,
                              resolution=resolution, global_batch_size=global_batch_size,
                              seed=seed, center_crop=center_crop, random_flip=random_flip,
                              process_index=process_index, process_count=process_count,
                              num_threads=num_threads, **pos)

    from_state(None).close()  # checks the arguments now
    return from_state
