"""GPU suite, part 3: compile time of the train step (part 2's) and of the SD program (part 1's,
batch 1), cold (an empty persistent compilation cache) against warm (the cache that a cold process
filled), each in its own process.

    python -m benchmarks.gpu_suite_compile --rows rows.jsonl --workdir /tmp/suite [--smoke]

Parts 1 and 2 run with their caches in ``WORKDIR/cache_sd_program`` and
``WORKDIR/cache_train_step``; when those started empty, the parts left their compile times in
``WORKDIR/cold_<program>.json``, and those processes are this part's cold rows (no second cold
compile). A program whose cold record is missing gets a cold process here first, in a fresh cache
directory. Then one warm process per program, with the same cache.

- ``train_step``: seconds to trace + lower and to compile (``lower(...).compile()``, which reads
  the persistent cache).
- ``sd_program``: the first ``generate`` call minus the median of the next calls (trace, lowering
  and compile, or the cache read), same folder, dtype, size, steps, guidance and batch as part 1.
- Also reported: the process's wall seconds (imports and loading included, cold rows measured
  here only), and the cache's files and MB after the run; ``(+N)``: files a warm run added,
  which means it compiled a program that the cold run did not write (a cache miss).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from benchmarks.gpu_suite_env import Recorder, fmt, part_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAMS = ("train_step", "sd_program")


def cache_size(path: str) -> tuple:
    """``(files, MB)`` under ``path`` (0, 0 when absent)."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    return len(files), sum(os.path.getsize(f) for f in files) / 2**20


def measure(program: str, workdir: str, cache: str, smoke: bool) -> dict:
    """Runs in the measuring process: the program's compile seconds with ``cache``."""
    import jaxdiff.compile_cache

    jaxdiff.compile_cache.enable(cache)
    if program == "train_step":
        from benchmarks.gpu_suite_train import build_step, lower_and_compile

        _, state, step_fn, batches = build_step(smoke)
        _, lower_s, compile_s = lower_and_compile(step_fn, state, batches[0])
        return {"trace_lower_s": lower_s, "compile_s": compile_s}
    import jax.numpy as jnp

    from benchmarks.gpu_suite_env import median_time
    from benchmarks.gpu_suite_sd import jaxdiff_call, latents_for, sd_folder, settings
    from jaxdiff.pipelines import load_stable_diffusion

    cfg = settings(smoke)
    folder, _ = sd_folder(workdir, smoke)
    sd = load_stable_diffusion(folder, dtype=jnp.bfloat16)
    batch = cfg["batches"][0]
    lat = latents_for(batch, cfg["size"], sd.vae_scale_factor)
    first, med, _ = median_time(jaxdiff_call(sd, batch, cfg, lat), 2)
    return {"compile_s": first - med, "batch": batch}


def spawn(program: str, workdir: str, cache: str, smoke: bool) -> dict:
    """Runs :func:`measure` in a fresh process; adds its wall seconds."""
    out = os.path.join(workdir, f"measure_{program}.json")
    argv = [sys.executable, "-m", "benchmarks.gpu_suite_compile", "--measure", program,
            "--cache", cache, "--out", out, "--workdir", workdir, "--rows", os.devnull]
    if smoke:
        argv.append("--smoke")
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{program} ({cache}) failed ({proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    with open(out) as f:
        return {**json.load(f), "wall_s": wall}


def main(argv=None):
    p = part_parser(__doc__.splitlines()[0])
    p.add_argument("--measure", choices=PROGRAMS, default=None, help="(internal) measure one")
    p.add_argument("--cache", default=None, help="(internal) the cache directory")
    p.add_argument("--out", default=None, help="(internal) where the measurement goes")
    args = p.parse_args(argv)
    if args.measure:
        with open(args.out, "w") as f:
            json.dump(measure(args.measure, args.workdir, args.cache, args.smoke), f)
        return

    rec = Recorder(args.rows, "compile_cache")
    print("Each row is its own process; 'cold' starts from an empty persistent compilation cache, "
          "'warm' reads the cache the cold process wrote. Seconds.\n", flush=True)
    print("| program | cache | trace+lower s | compile s | process wall s | cold measured by | "
          "cache files | cache MB |\n|---|---|---:|---:|---:|---|---:|---:|", flush=True)
    for program in PROGRAMS:
        record = os.path.join(args.workdir, f"cold_{program}.json")
        runs = []
        if os.path.isfile(record):
            with open(record) as f:
                cold = json.load(f)
            runs.append(("cold", cold, f"part {1 if program == 'sd_program' else 2}'s process"))
            cache = cold["cache"]
        else:
            cache = os.path.join(args.workdir, f"cache_{program}_part3")
            runs.append(("cold", spawn(program, args.workdir, cache, args.smoke), "this part"))
        files_cold = cache_size(cache)
        runs.append(("warm", spawn(program, args.workdir, cache, args.smoke), "-"))
        for mode, r, source in runs:
            files, mb = files_cold if mode == "cold" else cache_size(cache)
            added = files - files_cold[0] if mode == "warm" else None
            rec.row(program=program, mode=mode, trace_lower_s=r.get("trace_lower_s"),
                    compile_s=r["compile_s"], wall_s=r.get("wall_s"), cold_source=source,
                    cache_files=files, cache_mb=mb, cache_files_added=added)
            print(f"| {program} | {mode} | {fmt(r.get('trace_lower_s'), '.1f')} | "
                  f"{r['compile_s']:.1f} | {fmt(r.get('wall_s'), '.1f')} | {source} | {files}"
                  f"{'' if added is None else f' (+{added})'} | {mb:.1f} |", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
