"""The GPU evidence in one prepared run (issue 29): five measurements, in order of importance, each
in its own process with its own time cap, each written as a stored output.

    python -m benchmarks.gpu_suite                 # on a GPU machine (BENCHMARKS.md, "GPU suite")
    python -m benchmarks.gpu_suite --smoke         # every part at tiny sizes, on the CPU
    python -m benchmarks.gpu_suite --parts sd_pipeline,finetune --workdir /tmp/suite   # a rerun

Parts (modules ``benchmarks.gpu_suite_<part>``; their docstrings say what each measures):

1. ``sd_pipeline``: SD 1.5 architecture, 512x512, 30 steps, guidance 7.5, batch 1 and 8: jaxdiff
   bf16 against diffusers fp16 eager and ``torch.compile``; the same-image check.
2. ``train_mfu``: the ``mnist_accel`` config: steps/s, images/s, MFU.
3. ``compile_cache``: compile time of the train step and the SD program, cold vs warm cache.
4. ``cudnn_attention``: cuDNN attention against the XLA path in the SD UNet at 512x512.
5. ``finetune``: one SD 1.5 fine-tuning step at 512x512, batch 4: full / LoRA, with and without
   remat (one process per row, so that each row's peak memory is its own).

First the suite prints what is installed (:data:`benchmarks.gpu_suite_env.PACKAGES`, read from
the installed metadata, nothing imported) and the GPU (``nvidia-smi``); a part whose packages are
missing is skipped with a line naming them. A part that runs past its cap (or past what is left
of ``--budget`` for the whole run) is stopped; the rows it printed and recorded are kept. This
process imports neither JAX nor torch, so that the GPU's memory is the parts'.

Output, in ``--out`` (default ``$OUT`` when set, else ``benchmarks/results/gpu/``; with
``--smoke`` a new temporary folder): ``gpu_suite_<part>.md`` per part (the command, date, git
revision, GPU, versions, then the part's own output verbatim and its status), and
``gpu_suite.json`` with every row of every part (the test and the docs read it). Exit status 0
when every part that ran finished, 1 when one failed or hit its cap, 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks.gpu_suite_env import missing_modules, package_versions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_PART_S = 20  # a part is not started with less time than this left in the budget


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    module: str
    cap_s: float        # on a GPU
    smoke_cap_s: float  # with --smoke on a 2-core CPU
    needs: tuple

    def splits(self, smoke: bool) -> list:
        """The argument lists of the part's processes (one, except for ``finetune``)."""
        if self.name != "finetune":
            return [[]]
        # smoke: one row (LoRA and remat together: the code paths of all four, one process)
        rows = ("lora_remat",) if smoke else ("full", "lora", "full_remat", "lora_remat")
        return [["--ft_rows", r] + (["--header"] if i == 0 else []) for i, r in enumerate(rows)]


_JAX = ("jax", "flax", "numpy", "safetensors", "tokenizers")
_SD = _JAX + ("torch", "diffusers", "transformers")
_TRAIN = _JAX + ("optax", "orbax.checkpoint", "chex", "ml_collections")
PARTS = (
    Part("sd_pipeline", "benchmarks.gpu_suite_sd", 270, 300, _SD),
    Part("train_mfu", "benchmarks.gpu_suite_train", 90, 240, _TRAIN),
    Part("compile_cache", "benchmarks.gpu_suite_compile", 60, 300, _SD + _TRAIN[len(_JAX):]),
    Part("cudnn_attention", "benchmarks.gpu_suite_attention", 60, 120, _SD),
    Part("finetune", "benchmarks.gpu_suite_finetune", 150, 300, _SD + _TRAIN[len(_JAX):]),
)
NAMES = tuple(p.name for p in PARTS)


def gpu_line() -> str:
    """``nvidia-smi``'s name, memory and driver of each GPU, or why there is none."""
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU (nvidia-smi not found)"
    proc = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                           "--format=csv,noheader"], capture_output=True, text=True)
    return ("; ".join(proc.stdout.strip().splitlines()) if proc.returncode == 0
            else f"nvidia-smi failed: {proc.stderr.strip()[:200]}")


def git_rev() -> str:
    if os.environ.get("GIT_REV"):
        return os.environ["GIT_REV"]
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True)
    if proc.returncode:
        return "?"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return proc.stdout.strip() + ("+" if dirty else "")


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               # JAX and torch share the GPU in parts 1 and 5: no preallocation by JAX
               XLA_PYTHON_CLIENT_PREALLOCATE="false",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")])))
    return env


def run_process(argv: list, timeout: float, lines: list, err_path: str) -> tuple:
    """Runs ``argv``, its stdout lines echoed and appended to ``lines`` as they come, stderr to
    ``err_path``; the whole process group is killed after ``timeout`` s.
    Returns ``(status, return code or None, seconds)``."""
    t0 = time.perf_counter()
    with open(err_path, "w") as err:
        proc = subprocess.Popen(argv, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                                stderr=err, text=True, start_new_session=True)

        def pump():
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                print(line, end="", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        reader.join(timeout=5)
    status = "ok" if rc == 0 else ("timeout" if rc is None else "failed")
    return status, rc, time.perf_counter() - t0


def read_rows(path: str) -> list:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="every part at tiny sizes (the CPU)")
    p.add_argument("--parts", default=",".join(NAMES), help=f"comma-separated, of {NAMES}")
    p.add_argument("--out", default=None, help="the stored outputs' folder")
    p.add_argument("--workdir", default=None,
                   help="folder for the SD folder and the compilation caches, shared by the "
                        "parts and kept (a rerun reuses the written SD folder); default: a "
                        "temporary folder, removed at the end")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run (default 420; smoke 1500)")
    args = p.parse_args(argv)
    parts = [s for s in args.parts.split(",") if s]
    bad = [s for s in parts if s not in NAMES]
    if bad or not parts:
        sys.stderr.write(f"error: --parts: unknown {bad or 'empty list'}; choose from "
                         f"{', '.join(NAMES)}\n")
        raise SystemExit(2)
    if args.budget is not None and not args.budget > 0:
        sys.stderr.write(f"error: --budget must be a positive number of seconds, got "
                         f"{args.budget}\n")
        raise SystemExit(2)
    args.parts = parts
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = args.budget or (1500.0 if args.smoke else 420.0)
    out = args.out or os.environ.get("OUT") or (
        tempfile.mkdtemp(prefix="gpu_suite_smoke_") if args.smoke
        else os.path.join(REPO, "benchmarks", "results", "gpu"))
    os.makedirs(out, exist_ok=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="gpu_suite_work_")
    os.makedirs(workdir, exist_ok=True)
    command = "python -m benchmarks.gpu_suite " + " ".join(shlex.quote(a) for a in (
        sys.argv[1:] if argv is None else argv))
    versions = package_versions()
    summary = {"command": command.strip(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                   time.gmtime()),
               "git": git_rev(), "gpu": gpu_line(), "python": platform.python_version(),
               "versions": versions, "smoke": args.smoke, "budget_s": budget, "parts": []}
    vline = ", ".join(f"{k} {v or 'MISSING'}" for k, v in versions.items())
    print(f"GPU: {summary['gpu']}\nPython {summary['python']}; {vline}\noutput: {out}; "
          f"workdir: {workdir}; budget {budget:.0f} s", flush=True)
    start = time.perf_counter()
    failed = False
    for part in (p for p in PARTS if p.name in args.parts):
        rec = {"name": part.name, "status": "ok", "seconds": 0.0, "rows": [], "reason": None}
        lines: list = []
        rows_path = os.path.join(workdir, f"rows_{part.name}.jsonl")
        if os.path.exists(rows_path):
            os.remove(rows_path)
        missing = missing_modules(part.needs, versions)
        cap = part.smoke_cap_s if args.smoke else part.cap_s
        print(f"\n== {part.name} (cap {cap:.0f} s)", flush=True)
        if missing:
            rec.update(status="skipped", reason=f"missing packages: {', '.join(missing)} "
                       "(the carried wheels: BENCHMARKS.md, 'GPU suite')")
        for extra in ([] if missing else part.splits(args.smoke)):
            left = min(cap - rec["seconds"], budget - (time.perf_counter() - start))
            if left < MIN_PART_S:
                rec.update(status="skipped" if not lines else "timeout",
                           reason=f"time cap: {left:.0f} s left (part cap {cap:.0f} s, suite "
                                  f"budget {budget:.0f} s)")
                break
            argv_p = [sys.executable, "-m", part.module, "--rows", rows_path, "--workdir",
                      workdir, *(["--smoke"] if args.smoke else []), *extra]
            err_path = os.path.join(workdir, f"stderr_{part.name}.txt")
            status, rc, secs = run_process(argv_p, left, lines, err_path)
            rec["seconds"] += secs
            if status != "ok":
                with open(err_path) as f:
                    tail = f.read()[-2500:]
                rec.update(status=status, reason=(f"stopped at {left:.0f} s" if rc is None
                                                  else f"exit status {rc}"), stderr_tail=tail)
                print(f"!! {part.name} {status} ({rec['reason']}); stderr tail:\n{tail}",
                      flush=True)
                break
        rec["rows"] = read_rows(rows_path)
        failed |= rec["status"] in ("failed", "timeout")
        if rec["status"] == "skipped":
            print(f"skipped: {rec['reason']}", flush=True)
        summary["parts"].append(rec)
        write_part(out, part, rec, lines, summary, vline)
        with open(os.path.join(out, "gpu_suite.json"), "w") as f:
            json.dump(summary, f, indent=1)
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    total = time.perf_counter() - start
    print(f"\nsuite done in {total:.0f} s; " + ", ".join(
        f"{r['name']} {r['status']}" for r in summary["parts"]) + f"; outputs in {out}")
    return 1 if failed else 0


def write_part(out: str, part: Part, rec: dict, lines: list, summary: dict, vline: str):
    """``gpu_suite_<part>.md``: header, the part's stdout verbatim, its status."""
    status = f"status: {rec['status']} after {rec['seconds']:.0f} s"
    if rec["reason"]:
        status += f" ({rec['reason']})"
    text = [f"$ {summary['command']}", f"(part {part.name}: python -m {part.module}; "
            f"{summary['date']}, git {summary['git']})", "",
            f"GPU: {summary['gpu']}", f"Python {summary['python']}; {vline}", "", *lines, "",
            status]
    with open(os.path.join(out, f"gpu_suite_{part.name}.md"), "w") as f:
        f.write("\n".join(text) + "\n")


if __name__ == "__main__":
    sys.exit(main())
