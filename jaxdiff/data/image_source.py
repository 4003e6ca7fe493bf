"""Resumable, per-host batches of an image folder for the training loop: a
:data:`jaxdiff.data.DataSource` over an :class:`~jaxdiff.data.image_folder.ImageFolder`.

Batches are ``{"pixel_values": [b, R, R, 3] float32 in [-1, 1], "input_ids": [b, L] int32,
"index": [b] int32}`` (``index``: the record's position in ``folder.files``), ``b = G /
process_count`` for the global batch ``G``.

Order. Epoch ``e``'s order is ``k = ceil(G / N)`` permutations of the ``N`` records, drawn one
after the other from ``np.random.default_rng([seed, e])`` and concatenated (``k = 1`` when the
folder has at least ``G`` images: then it is :class:`~jaxdiff.data.BatchIterator`'s order), and
global batch ``i`` is its slice ``[i * G, (i + 1) * G)``; the remainder is dropped. A folder
smaller than the global batch (20 DreamBooth images and ``G = 32``, or one image) thus repeats
records within a batch, each at most ``k`` times, rather than failing; a warning says so once.
Each process takes its contiguous ``G / process_count`` share of the global batch, as
``BatchIterator`` does.

Augmentation. The random crop and flip of global batch ``i`` of epoch ``e`` are drawn from
``np.random.default_rng([seed, e, i, 1])`` for all ``G`` positions (two uniforms for the crop, one
for the flip; drawn whether or not they are used) and each process takes its share: every pixel
of a batch is a pure function of ``(seed, e, i)``, so a run resumed from ``state`` sees exactly
the batches that the uninterrupted run would have, on any number of hosts.

Images are decoded lazily, per batch (on a small thread pool: Pillow releases the GIL while it
decodes and resizes); captions are tokenized once, when the source is built.

Why not grain (issue 25 asks for it unless something else is shown better):
``benchmarks/bench_data.py --suite images`` runs this source and a ``grain`` pipeline with the same
decode and transform (a per-record ``MapDataset`` with grain's read threads, and with worker
processes) over PNG folders; its stored output (``benchmarks/results/cpu/bench_data.md``) is the
evidence. There grain was not faster: with its read threads it was slower, and with worker
processes it was no faster while each start of an iterator (every run and every resume) spawns
processes that import JAX, seconds before the first batch. This source also keeps the position
dict of :class:`~jaxdiff.data.BatchIterator`, makes a batch a pure function of ``(seed, e, i)``
on any number of hosts, and needs no extra dependency, so jaxdiff keeps it. The measurement was on
a shared 2-core machine, where a second decode thread did not help either: on a many-core host
whose decoding is the bottleneck, grain's processes may pay off (not measured).
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np

from jaxdiff.data.image_folder import ImageFolder
from jaxdiff.data.image_transforms import default_threads, load_image, map_threads
from jaxdiff.data.iterator import DataSource
from jaxdiff.text.truncation import warn_truncated
from jaxdiff.validation import check_bool, check_int

__all__ = ["ImageFolderIterator", "image_folder_source", "tokenize_captions", "check_state"]

log = logging.getLogger(__name__)

Batch = Dict[str, np.ndarray]


def tokenize_captions(tokenize: Callable, captions: Sequence[str],
                      files: Optional[Sequence[str]] = None) -> np.ndarray:
    """``tokenize(list(captions))`` as ``[N, L]`` int32, checked.

    ``tokenize`` returns an int array ``[N, L]`` or an object with ``input_ids`` (e.g. a
    :class:`jaxdiff.text.CLIPTokenizer`, called with its defaults: padded to ``max_length``,
    truncated). When ``tokenize`` is such a tokenizer (or its bound ``__call__``), each caption
    that truncation cuts is named in one ``logging`` warning (by its file, once: the captions are
    tokenized once) that quotes what was dropped, as diffusers warns about long prompts
    (:func:`jaxdiff.text.warn_truncated`; captions that lose the same text share one warning).

    Raises:
      ValueError: naming ``tokenize``, for a result that is not ``[N, L]`` integers.
    """
    out = tokenize(list(captions))
    ids = np.asarray(getattr(out, "input_ids", out))
    if ids.ndim != 2 or ids.shape[0] != len(captions) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"tokenize must return [N, L] integer ids for N = {len(captions)} "
                         f"captions, got {ids.dtype} {ids.shape}")
    tok = tokenize if hasattr(tokenize, "truncated_text") else getattr(tokenize, "__self__", None)
    if tok is not None and hasattr(tok, "truncated_text"):
        def label(rows):
            first = files[rows[0]] if files is not None else f"captions[{rows[0]}]"
            more = f" (and {len(rows) - 1} more with the same ending)" if len(rows) > 1 else ""
            return f"the caption of {first}{more}"
        warn_truncated(tok, captions, label=label, logger=log)
    return ids.astype(np.int32)


class ImageFolderIterator:
    """Endless host batches of an image folder; see the module docstring for the order.

    Args:
      folder: the records.
      input_ids: ``[N, L]`` int32, the tokenized captions (:func:`tokenize_captions`).
      resolution: the images' side ``R``.
      global_batch_size: ``G``, divisible by ``process_count``.
      seed: the order's and the augmentation's seed.
      center_crop: True: the center crop; False: a random crop.
      random_flip: mirror each image left-right with probability 1/2.
      process_index, process_count: this host's slot and the number of hosts (default: jax's).
      epoch, index: the position of the first batch (``state``).
      num_threads: decode threads (default: the CPU count, at most 8; 1: none).
    """

    def __init__(self, folder: ImageFolder, input_ids: np.ndarray, *, resolution: int,
                 global_batch_size: int, seed: int, center_crop: bool = True,
                 random_flip: bool = False, process_index: Optional[int] = None,
                 process_count: Optional[int] = None, epoch: int = 0, index: int = 0,
                 num_threads: Optional[int] = None):
        if process_index is None or process_count is None:
            import jax
            process_index, process_count = jax.process_index(), jax.process_count()
        self.folder = folder
        self.num_examples = n = len(folder)
        self.input_ids = np.asarray(input_ids, np.int32)
        if self.input_ids.ndim != 2 or len(self.input_ids) != n:
            raise ValueError(f"input_ids must be [{n}, L], got {self.input_ids.shape}")
        self.resolution = check_int("resolution", resolution, minimum=1)
        g = self.global_batch_size = check_int("global_batch_size", global_batch_size, minimum=1)
        self.process_count = check_int("process_count", process_count, minimum=1)
        self.process_index = check_int("process_index", process_index, 0, process_count - 1)
        if g % process_count:
            raise ValueError(f"global_batch_size {g} is not divisible by the process count "
                             f"{process_count}")
        self.local_batch_size = g // process_count
        self.seed = check_int("seed", seed)
        self.center_crop = check_bool("center_crop", center_crop)
        self.random_flip = check_bool("random_flip", random_flip)
        self.repeats = max(1, math.ceil(g / n))
        self.batches_per_epoch = (self.repeats * n) // g
        self.epoch = check_int("epoch", epoch, minimum=0)
        self.index = check_int("index", index, 0, self.batches_per_epoch - 1)
        self.num_threads = (default_threads() if num_threads is None
                            else check_int("num_threads", num_threads, minimum=1))
        self._pool = None
        self._order_epoch, self._order = None, None

    @property
    def state(self) -> Dict[str, int]:
        """Position of the next batch: ``{"epoch": int, "index": int}``."""
        return {"epoch": self.epoch, "index": self.index}

    def order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s record order (``repeats * N`` indices)."""
        if self._order_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = np.concatenate([rng.permutation(self.num_examples)
                                          for _ in range(self.repeats)])
            self._order_epoch = epoch
        return self._order

    def batch_at(self, epoch: int, index: int) -> Batch:
        """This process's share of global batch ``index`` of ``epoch`` (pure in its arguments)."""
        g, b = self.global_batch_size, self.local_batch_size
        rng = np.random.default_rng([self.seed, epoch, index, 1])
        crops, flips = rng.random((g, 2)), rng.random(g) < 0.5
        lo = self.process_index * b
        idx = self.order(epoch)[index * g + lo:index * g + lo + b]
        crops, flips = crops[lo:lo + b], flips[lo:lo + b]

        def one(j):
            return load_image(self.folder.files[idx[j]], self.resolution,
                              crop=None if self.center_crop else tuple(crops[j]),
                              flip=bool(self.random_flip and flips[j]))

        pixels = map_threads(one, range(b), self.num_threads, self._executor())
        return {"pixel_values": np.stack(pixels), "input_ids": self.input_ids[idx],
                "index": idx.astype(np.int32)}

    def _executor(self) -> Optional[concurrent.futures.Executor]:
        """The decode thread pool, started at the first batch (None with one thread)."""
        if self.num_threads > 1 and self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self.num_threads, thread_name_prefix="jaxdiff-decode")
        return self._pool

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        batch = self.batch_at(self.epoch, self.index)
        self.index += 1
        if self.index == self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return batch

    def close(self) -> None:
        """Stops the decode threads (a later ``next`` starts new ones)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def check_state(state: Any) -> Dict[str, int]:
    """``state`` if it is ``{"epoch": int, "index": int, ...}``, else a ``ValueError``."""
    if not (isinstance(state, dict) and all(
            isinstance(state.get(k), int) and not isinstance(state.get(k), bool)
            for k in ("epoch", "index"))):
        raise ValueError(f"state must be {{'epoch': int, 'index': int}} (an image folder "
                         f"iterator's state), got {state!r:.200}")
    return state


def image_folder_source(folder: ImageFolder, *, resolution: int, tokenize: Callable,
                        global_batch_size: int, seed: int, center_crop: bool = True,
                        random_flip: bool = False, process_index: Optional[int] = None,
                        process_count: Optional[int] = None,
                        num_threads: Optional[int] = None) -> DataSource:
    """``from_state(state) -> ImageFolderIterator``: the folder's batches for
    :func:`jaxdiff.training.fit` (``state`` None: the beginning; else an iterator's ``state``).

    Args:
      folder: from :func:`~jaxdiff.data.image_folder.read_image_folder`.
      resolution: the side ``R`` of ``pixel_values``.
      tokenize: ``list[str] -> [N, L]`` int ids, or a :class:`jaxdiff.text.CLIPTokenizer`
        (truncation warnings by file); see :func:`tokenize_captions`. Called once, here.
      global_batch_size: ``G``; may exceed the folder's size (records then repeat, with a
        warning).
      seed: the order's and the crops' / flips' seed.
      center_crop: center (True) or random (False) crops.
      random_flip: random horizontal flips.
      process_index, process_count: default ``jax.process_index()`` / ``jax.process_count()``.
      num_threads: decode threads per iterator (default: the CPU count, at most 8).

    Raises:
      ValueError: naming the argument (a bad ``resolution``, ``global_batch_size`` not divisible
        by the process count, a malformed ``state``, a ``tokenize`` result of the wrong shape).
    """
    input_ids = tokenize_captions(tokenize, folder.captions, folder.files)

    def from_state(state: Optional[Dict[str, int]]) -> ImageFolderIterator:
        pos = {} if state is None else {k: check_state(state)[k] for k in ("epoch", "index")}
        return ImageFolderIterator(folder, input_ids, resolution=resolution,
                                   global_batch_size=global_batch_size, seed=seed,
                                   center_crop=center_crop, random_flip=random_flip,
                                   process_index=process_index, process_count=process_count,
                                   num_threads=num_threads, **pos)

    first = from_state(None)  # checks the arguments now, not at the first batch
    if first.repeats > 1:
        log.warning("the image folder %s has %d image(s), fewer than the global batch %d: each "
                    "batch repeats records (at most %d times, with their own crops and flips)",
                    folder.root, len(folder), first.global_batch_size, first.repeats)
    first.close()
    return from_state
