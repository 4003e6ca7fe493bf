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

    python -m benchmarks.bench_data
    python -m benchmarks.bench_data --batch_sizes 32,128 --seconds 3
"""

from __future__ import annotations

import argparse
import datetime
import functools
import subprocess
import time

import numpy as np

from jaxdiff.data import BatchIterator, Prefetcher, load_mnist


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


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch_sizes", default="32,128")
    p.add_argument("--seconds", type=float, default=3.0, help="timing window per row")
    p.add_argument("--prefetch", type=int, default=2, help="batches buffered ahead")
    p.add_argument("--threads", type=int, default=2, help="grain read threads")
    p.add_argument("--check", type=int, default=8, help="batches compared after a resume")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from benchmarks.common import machine
    import grain

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
