"""The training data pipeline: jaxdiff's hand-written ``BatchIterator`` + ``Prefetcher`` against a
``grain`` pipeline over the same in-memory MNIST arrays, for the decision of issue 24 (does grain
make the hand-written iterator unnecessary?).

For each batch size: batches per second as the training loop consumes them (host numpy batches,
nothing on the device), and whether a pipeline rebuilt from a saved position yields exactly the
batches that the uninterrupted one yields after that position (``resume exact``: the next
``--check`` batches compared bitwise, the position saved in the middle of the second epoch).

The grain pipelines (``pip install grain``):

- ``grain (records)``: what grain's documentation writes: a per-record ``MapDataset`` source
  (``{"image": [28, 28, 1], "label": []}``), ``shuffle(seed)`` (a new order every epoch),
  ``repeat()``, ``batch(G, drop_remainder=True)``, ``to_iter_dataset`` with grain's read threads
  and prefetch; its position is ``iterator.get_state()``;
- ``grain (index batches)``: a ``MapDataset`` of batch *indices* whose map gathers a whole batch
  from the arrays with one fancy index, the epoch's permutation cached (jaxdiff's iterator
  written with grain's pieces).

An image folder (``--suite images``, issue 25): ``--n_images`` PNGs written into a temporary
folder at each of ``--resolutions`` (each ``5R/4 x 3R/2``, smooth random colour fields, so the
resize and crop run), read by :func:`jaxdiff.data.read_image_folder`; images per second with a
random crop and flip, decoded per batch:

- ``image_folder_source``: jaxdiff's source (decode threads 1 or 2) behind the training loop's
  ``Prefetcher``;
- ``grain (threads)``: ``MapDataset.source(records).shuffle(seed).repeat().random_map(decode,
  crop, flip).batch(G)`` with grain's read threads, the same decode and transform functions
  (:func:`jaxdiff.data.load_image`);
- ``grain (processes)``: the same with ``mp_prefetch`` over ``--workers`` worker processes.

    python -m benchmarks.bench_data
    python -m benchmarks.bench_data --batch_sizes 32,128 --seconds 3
    python -m benchmarks.bench_data --suite images --resolutions 64,512 --seconds 4
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import subprocess
import tempfile
import time

import numpy as np

from jaxdiff.data import (BatchIterator, Prefetcher, image_folder_source, load_image,
                          load_mnist, read_image_folder)


def _git() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _rate(it, seconds: float, warmup: int = 5) -> float:
    """Batches per second that ``next(it)`` delivers over about ``seconds``."""
    for _ in range(warmup):
        next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(it)
        n += 1
    return n / (time.perf_counter() - start)


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


# -- jaxdiff's iterator -------------------------------------------------------------------------

def jaxdiff_pipeline(arrays, batch_size, seed, prefetch):
    def open_at(state):
        it = BatchIterator.from_state(arrays, batch_size, seed, state, process_index=0,
                                      process_count=1)
        return Prefetcher(it, prefetch)

    return open_at, {"epoch": 0, "index": 0}


def jaxdiff_resume_exact(arrays, batch_size, seed, prefetch, skip, check) -> bool:
    open_at, start = jaxdiff_pipeline(arrays, batch_size, seed, prefetch)
    with open_at(start) as it:
        for _ in range(skip):
            next(it)
        state = it.state
        want = [next(it) for _ in range(check)]
    with open_at(state) as it:
        got = [next(it) for _ in range(check)]
    return _same(want, got)


# -- grain --------------------------------------------------------------------------------------

class _Records:
    """grain's random-access source protocol over in-memory arrays: one example per index."""

    def __init__(self, arrays):
        self.arrays = arrays
        self.n = len(next(iter(arrays.values())))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.arrays.items()}


def grain_records(arrays, batch_size, seed, threads, prefetch):
    import grain

    ds = (grain.MapDataset.source(_Records(arrays)).shuffle(seed=seed).repeat()
          .batch(batch_size, drop_remainder=True))
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                prefetch_buffer_size=prefetch))


def grain_index_batches(arrays, batch_size, seed, threads, prefetch):
    import grain

    n = len(next(iter(arrays.values())))
    per_epoch = n // batch_size

    @functools.lru_cache(maxsize=2)
    def permutation(epoch):
        return np.random.default_rng([seed, epoch]).permutation(n)

    def gather(i):
        epoch, index = divmod(int(i), per_epoch)
        perm = permutation(epoch)
        idx = np.sort(perm[index * batch_size:(index + 1) * batch_size])
        return {k: v[idx] for k, v in arrays.items()}

    ds = grain.MapDataset.range(per_epoch).repeat().map(gather)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                prefetch_buffer_size=prefetch))


def grain_resume_exact(make, skip, check) -> bool:
    it = iter(make())
    for _ in range(skip):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(check)]
    it2 = iter(make())
    it2.set_state(state)
    got = [next(it2) for _ in range(check)]
    return _same(want, got)


# -- image folders ------------------------------------------------------------------------------

def write_image_folder(root: str, n: int, resolution: int, seed: int = 0) -> None:
    """``n`` PNGs of ``5R/4 x 3R/2`` (smooth colour fields plus a little noise), captioned by
    ``.txt`` files."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = resolution * 5 // 4, resolution * 3 // 2
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        x = np.asarray(small.resize((w, h), Image.BILINEAR), np.int16)
        x = np.clip(x + rng.integers(-8, 9, x.shape), 0, 255).astype(np.uint8)
        Image.fromarray(x).save(os.path.join(root, f"{i:04d}.png"), compress_level=1)
        with open(os.path.join(root, f"{i:04d}.txt"), "w") as f:
            f.write(f"image number {i}")


def _tokenize(captions):
    return np.array([[len(c), i] for i, c in enumerate(captions)], np.int32)


class _ImageRecords:
    """grain's random-access source: record ``i`` is (file, token ids, index)."""

    def __init__(self, files, ids):
        self.files, self.ids = list(files), ids

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return {"file": self.files[i], "input_ids": self.ids[i], "index": np.int32(i)}


class _Decode:
    """``random_map``'s transform: decode, resize, random crop and flip (picklable)."""

    def __init__(self, resolution):
        self.resolution = resolution

    def __call__(self, rec, rng):
        u = rng.random(3)
        pixels = load_image(rec["file"], self.resolution, crop=(u[0], u[1]), flip=bool(u[2] < .5))
        return {"pixel_values": pixels, "input_ids": rec["input_ids"], "index": rec["index"]}


def grain_images(folder, ids, resolution, batch_size, seed, threads, prefetch, workers):
    import grain

    ds = (grain.MapDataset.source(_ImageRecords(folder.files, ids)).shuffle(seed=seed).repeat()
          .random_map(_Decode(resolution), seed=seed).batch(batch_size, drop_remainder=True))
    # grain's buffer counts records, not batches
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                              prefetch_buffer_size=prefetch * batch_size))
    if workers:
        from absl import flags   # grain's worker processes read absl flags: parse none

        if not flags.FLAGS.is_parsed():
            flags.FLAGS(["bench_data"])
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return it


def image_rows(args) -> list:
    rows = []
    g = args.image_batch
    for res in (int(r) for r in args.resolutions.split(",")):
        with tempfile.TemporaryDirectory() as root:
            t0 = time.perf_counter()
            write_image_folder(root, args.n_images, res)
            t1 = time.perf_counter()
            folder = read_image_folder(root)
            t_read = time.perf_counter() - t1
            print(f"{args.n_images} PNGs {res * 3 // 2}x{res * 5 // 4}: written in "
                  f"{t1 - t0:.1f} s, read_image_folder (decode check) {t_read:.2f} s", flush=True)
            ids = _tokenize(folder.captions)
            skip = 3
            for threads in (int(t) for t in args.decode_threads.split(",")):
                src = image_folder_source(folder, resolution=res, tokenize=_tokenize,
                                          global_batch_size=g, seed=args.seed, center_crop=False,
                                          random_flip=True, process_index=0, process_count=1,
                                          num_threads=threads)
                t = time.perf_counter()
                with Prefetcher(src(None), args.prefetch) as it:
                    next(it)
                    first = time.perf_counter() - t
                    rate = _rate(it, args.seconds, warmup=2)
                it = src(None)
                for _ in range(skip):
                    next(it)
                state = it.state
                want = [next(it) for _ in range(args.check_images)]
                it2 = src(state)
                exact = _same(want, [next(it2) for _ in range(args.check_images)])
                rows.append(f"| image_folder_source, {threads} decode thread(s) + Prefetcher | "
                            f"{res} | {g} | {first:.2f} | {rate * g:.0f} | "
                            f"{'yes' if exact else 'NO'} |")
                print(rows[-1], flush=True)
            for name, workers in (("grain (threads)", 0),
                                  (f"grain (processes: {args.workers})", args.workers)):
                def make():
                    return grain_images(folder, ids, res, g, args.seed, args.threads,
                                        args.prefetch, workers)

                t = time.perf_counter()
                it = iter(make())
                next(it)
                first = time.perf_counter() - t
                rate = _rate(it, args.seconds, warmup=2)
                del it
                exact = grain_resume_exact(make, skip, args.check_images)
                rows.append(f"| {name}, {args.threads} read threads | {res} | {g} | "
                            f"{first:.2f} | {rate * g:.0f} | {'yes' if exact else 'NO'} |")
                print(rows[-1], flush=True)
    return rows


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch_sizes", default="32,128")
    p.add_argument("--seconds", type=float, default=3.0, help="timing window per row")
    p.add_argument("--prefetch", type=int, default=2, help="batches buffered ahead")
    p.add_argument("--threads", type=int, default=2, help="grain read threads")
    p.add_argument("--check", type=int, default=8, help="batches compared after a resume")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--suite", default="mnist", choices=("mnist", "images"))
    p.add_argument("--resolutions", default="64,512", help="images: the crop sides R")
    p.add_argument("--n_images", type=int, default=64, help="images: the folder's size")
    p.add_argument("--image_batch", type=int, default=16, help="images: the batch")
    p.add_argument("--workers", type=int, default=2, help="images: grain worker processes")
    p.add_argument("--decode_threads", default="1,2", help="images: jaxdiff's decode threads")
    p.add_argument("--check_images", type=int, default=2,
                   help="images: batches compared after a resume")
    args = p.parse_args(argv)
    from benchmarks.common import cpu_name, machine
    import grain

    if args.suite == "images":
        lines = [f"$ python -m benchmarks.bench_data --suite images --resolutions "
                 f"{args.resolutions} --n_images {args.n_images} --image_batch "
                 f"{args.image_batch} --seconds {args.seconds:g} --decode_threads "
                 f"{args.decode_threads} --threads {args.threads} --workers {args.workers}",
                 f"({datetime.date.today().isoformat()}, git {_git()})", "",
                 f"machine: {machine()}; CPU {cpu_name()}; grain "
                 f"{getattr(grain, '__version__', '?')}",
                 f"{args.n_images} PNGs of 5R/4 x 3R/2 per resolution R, resized, randomly "
                 f"cropped to R x R and flipped; prefetch {args.prefetch} batches (grain: "
                 f"{args.prefetch * args.image_batch} records); resume: "
                 f"{args.check_images} batches compared after a position saved after 3 batches",
                 "",
                 "| pipeline | R | batch | first batch (s) | images/s | resume exact |",
                 "|---|---:|---:|---:|---:|---|"]
        t0 = time.perf_counter()
        lines += image_rows(args)
        lines += ["", f"(whole run: {time.perf_counter() - t0:.0f} s)"]
        text = "\n".join(lines) + "\n"
        print()
        print(text)
        return text

    images, labels = load_mnist("train")
    arrays = {"image": images, "label": labels.astype(np.int32)}
    lines = [f"$ python -m benchmarks.bench_data --batch_sizes {args.batch_sizes} "
             f"--seconds {args.seconds:g}",
             f"({datetime.date.today().isoformat()}, git {_git()})", "",
             f"machine: {machine()}; grain {getattr(grain, '__version__', '?')}",
             f"MNIST train arrays in memory: image {images.shape} {images.dtype}, label "
             f"{labels.shape}; prefetch {args.prefetch} batches, grain read threads "
             f"{args.threads}; resume: {args.check} batches compared after a position saved in "
             "the second epoch", "",
             "| pipeline | batch | batches/s | images/s | resume exact |",
             "|---|---:|---:|---:|---|"]
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        skip = len(images) // bs + 3   # the second epoch's 4th batch
        open_at, start = jaxdiff_pipeline(arrays, bs, args.seed, args.prefetch)
        with open_at(start) as it:
            rate = _rate(it, args.seconds)
        exact = jaxdiff_resume_exact(arrays, bs, args.seed, args.prefetch, skip, args.check)
        lines.append(f"| BatchIterator + Prefetcher | {bs} | {rate:.0f} | {rate * bs:.0f} | "
                     f"{'yes' if exact else 'NO'} |")
        for name, build in (("grain (records)", grain_records),
                            ("grain (index batches)", grain_index_batches)):
            def make():
                return build(arrays, bs, args.seed, args.threads, args.prefetch)

            rate = _rate(iter(make()), args.seconds)
            exact = grain_resume_exact(make, skip, args.check)
            lines.append(f"| {name} | {bs} | {rate:.0f} | {rate * bs:.0f} | "
                         f"{'yes' if exact else 'NO'} |")
        print("\n".join(lines[-3:]), flush=True)
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    return text


if __name__ == "__main__":
    main()
