"""One table of training recipes at the same budget: for each run, its recipe (from the workdir's
``config.json``), its training-loop minutes (from ``metrics.jsonl``) and the rows of one
``experiments.eval_sweep`` output (``WORKDIR/NAME.json``, or the run's own ``#NAME``),
with the training-images reference row. Reads stored outputs only; measures nothing itself.

    python -m benchmarks.recipe_table --name recipe \
        --run "default (eps)=runs/mnist" --run "v + min-SNR=runs/recipe_v_minsnr"

Training minutes are the sum over ``metrics.jsonl``'s rows of ``(steps since the previous row)
/ steps_per_sec``: the training loop's wall time including its first compile and its sample
grids, as the run saw it (on a shared machine, comparable only between runs that had the CPU to
themselves). The ``targets``
column marks the rows that meet issue 18's sample targets: haze <= 0.05, clean background >= 0.75
and conditional accuracy >= 0.98.

Prints the markdown table (``--out`` also writes it).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional, Tuple

TARGETS = {"haze": 0.05, "clean_background": 0.75, "conditional_accuracy": 0.98}


def parse_run(text: str) -> Tuple[str, str, Optional[str]]:
    """``"label=path"`` -> ``(label, path, None)``; ``"label=path#name"`` -> ``(label, path,
    name)``, the run's own sweep name (``path/name.json``) instead of ``--name``. ``ValueError``
    without ``=``, with an empty label or path, or with an empty or path-like name."""
    label, sep, rest = text.partition("=")
    path, hash_, name = rest.partition("#")
    if not sep or not label.strip() or not path.strip():
        raise ValueError(f"--run must be LABEL=WORKDIR[#NAME], got {text!r}")
    if hash_ and (not name.strip() or os.sep in name):
        raise ValueError(f"--run {text!r}: NAME after '#' must be a plain eval_sweep --name")
    return label.strip(), path.strip(), (name.strip() if hash_ else None)


def train_minutes(workdir: str) -> float:
    """The training loop's minutes from ``WORKDIR/metrics.jsonl`` (see the module docstring)."""
    total, last = 0.0, 0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "steps_per_sec" in row:
                total += (row["step"] - last) / row["steps_per_sec"]
                last = row["step"]
    return total / 60.0


def recipe(workdir: str) -> str:
    """A short description of the run's recipe from its ``config.json``."""
    with open(os.path.join(workdir, "config.json")) as f:
        c = json.load(f)
    d, t, m = c["diffusion"], c["training"], c["model"]
    width = "/".join(str(w) for w in m["block_channels"])
    weighting = d.get("weighting", "none")
    return (f"{d['prediction_type']}, {weighting}, {d['schedule']}, {t['num_steps']} steps x "
            f"{t['batch_size']}, lr {t['learning_rate']:g}, EMA {t['ema_decay']:g}, "
            f"width {width}")


def _ok(r: dict) -> bool:
    return (r["haze"] <= TARGETS["haze"] and r["clean_background"] >= TARGETS["clean_background"]
            and r["conditional_accuracy"] >= TARGETS["conditional_accuracy"])


def table(runs: List[Tuple[str, str, Optional[str]]], name: str) -> str:
    """The markdown table of ``runs`` (``[(label, workdir, own_name)]``) and their sweeps,
    ``WORKDIR/NAME.json`` with ``own_name`` in place of ``name`` where it is not None."""
    lines = ["| run | train min | sampler | NFE | guidance | N | FD (floor) | accuracy | "
             "precision | recall | clean | haze | targets |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| :---: |"]
    recipes, reals, steps = [], {}, []
    for label, workdir, own in runs:
        with open(os.path.join(workdir, f"{own or name}.json")) as f:
            res = json.load(f)
        minutes = train_minutes(workdir)
        recipes.append(f"- **{label}** (`{workdir}`, step {res['step']}): {recipe(workdir)}")
        for r in res["settings"]:
            floor = res["floors"][str(r["n"])]
            lines.append(
                f"| {label} | {minutes:.1f} | {r.get('label', r['sampler'])} | {r['nfe']} | "
                f"{r['guidance_scale']:g} | {r['n']} | {r['fd']:.2f} ({floor:.2f}) | "
                f"{r['conditional_accuracy']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                f"{r['clean_background']:.3f} | {r['haze']:.3f} | {'yes' if _ok(r) else ''} |")
        reals.update(res.get("real", {}))
        steps.append(res["step"])
    for n, r in sorted(reals.items(), key=lambda kv: int(kv[0])):
        lines.append(f"| (training images) | | | | | {n} | {r['fid']:.2f} | "
                     f"{r['conditional_accuracy']:.3f} | {r['precision']:.3f} | "
                     f"{r['recall']:.3f} | {r['clean_background']:.3f} | {r['haze']:.3f} | |")
    return "\n".join(lines + ["", "Recipes:", ""] + recipes) + "\n"


def main(argv=None) -> Dict[str, str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", action="append", required=True, help="LABEL=WORKDIR[#NAME] (repeatable; NAME: "
                   "this run's eval_sweep --name where it differs from --name)")
    p.add_argument("--name", default="sweep", help="the eval_sweep --name of every run")
    p.add_argument("--out", default="", help="also write the table here")
    args = p.parse_args(argv)
    try:
        runs = [parse_run(r) for r in args.run]
    except ValueError as e:
        p.error(str(e))
    text = table(runs, args.name)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text, end="")
    return {"table": text}


if __name__ == "__main__":
    main()
