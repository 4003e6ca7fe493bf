"""Cold vs warm start with JAX's persistent compilation cache (``jaxdiff.compile_cache``, which
every command line switches on), each program in fresh processes:

- ``train_mnist``: the default config (``experiments/configs/mnist.py``) for a few steps on the
  MNIST files (``$JAXDIFF_MNIST_DIR``), logging every step, ending with its checkpoint and its
  sample grid (80 images with ``config.sampling``'s sampler: DDIM, 25 steps, guidance 2 when
  ``benchmarks/results/cpu/bench_compile_cache.md`` was measured);
- ``text_to_image``: the tiny Stable Diffusion folder of ``jaxdiff.pipelines.tiny`` (written once,
  needs torch and diffusers), one 32x32 image.

Per program three modes, in this order: ``off`` (``JAXDIFF_COMPILATION_CACHE=off``), ``cold``
(an empty cache directory: compile and write), ``warm`` (the same directory again, ``--warm``
times). Reported: seconds from the process start to the first train step's metrics (its
``metrics.jsonl`` row appearing on disk, polled every 20 ms; train_mnist only), the process's wall
seconds, and the cache's files / MB after the run.

    python -m benchmarks.bench_compile_cache
    python -m benchmarks.bench_compile_cache --train_steps 5 --t2i_steps 10 --warm 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(cache) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    env["JAXDIFF_COMPILATION_CACHE"] = cache
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    return env


def _cache_size(path):
    files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs] \
        if os.path.isdir(path) else []
    return len(files), sum(os.path.getsize(f) for f in files) / 2**20


def _first_line_written(path):
    try:
        with open(path) as f:
            return f.readline().endswith("\n")
    except OSError:
        return False


def _run(argv, cache, watch=None):
    """Runs ``python -m argv``; returns (seconds until ``watch`` had a complete first line, or
    None; wall seconds). The file is polled every 20 ms from this process."""
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", *argv], env=_env(cache), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=err)
        first = None
        while proc.poll() is None:
            if watch and first is None and _first_line_written(watch):
                first = time.perf_counter() - start
            time.sleep(0.02)
        wall = time.perf_counter() - start
        if proc.returncode:
            err.seek(0)
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n"
                             f"{err.read()[-3000:]}")
    if watch and first is None and _first_line_written(watch):
        first = wall
    return first, wall


def bench_train(tmp, cache, steps):
    workdir = tempfile.mkdtemp(dir=tmp, prefix="train_")
    argv = ["experiments.train_mnist", f"--workdir={workdir}",
            f"--config.training.num_steps={steps}", "--config.training.log_every=1"]
    return _run(argv, cache, watch=os.path.join(workdir, "metrics.jsonl"))


def bench_t2i(tmp, cache, folder, steps):
    out = os.path.join(tempfile.mkdtemp(dir=tmp, prefix="t2i_"), "out.png")
    return _run(["experiments.text_to_image", "--model", folder, "--prompt", "a cat",
                 "--steps", str(steps), "--seed", "0", "--out", out], cache)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train_steps", type=int, default=5)
    p.add_argument("--t2i_steps", type=int, default=10)
    p.add_argument("--warm", type=int, default=2, help="warm runs per program")
    p.add_argument("--programs", default="train_mnist,text_to_image")
    args = p.parse_args(argv)

    import jax

    from benchmarks.common import machine

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        programs = args.programs.split(",")
        if "text_to_image" in programs:
            from jaxdiff.pipelines.tiny import write_tiny_stable_diffusion

            folder = os.path.join(tmp, "tiny_sd")
            write_tiny_stable_diffusion(folder)
        for prog in programs:
            cache = os.path.join(tmp, f"cache_{prog}")
            for mode in ["off", "cold"] + ["warm"] * args.warm:
                c = "off" if mode == "off" else cache
                if prog == "train_mnist":
                    first, wall = bench_train(tmp, c, args.train_steps)
                    what = f"train_mnist (mnist.py, {args.train_steps} steps + grid)"
                else:
                    first, wall = bench_t2i(tmp, c, folder, args.t2i_steps)
                    what = f"text_to_image (tiny SD, 32x32, {args.t2i_steps} steps)"
                files, mb = _cache_size(cache) if mode != "off" else (0, 0.0)
                rows.append((what, mode, first, wall, files, mb))
                print(f"{what} {mode}: first step {first} wall {wall:.1f}", file=sys.stderr)

    print(f"machine: {machine()}, jax {jax.__version__}\n")
    print("| program | cache | first train step s | wall s | cache files | cache MB |")
    print("|---|---|---|---|---|---|")
    for what, mode, first, wall, files, mb in rows:
        f = "-" if first is None else f"{first:.1f}"
        print(f"| {what} | {mode} | {f} | {wall:.1f} | {files} | {mb:.1f} |")


if __name__ == "__main__":
    main()
