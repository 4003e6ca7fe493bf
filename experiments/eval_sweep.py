"""Sample quality of a trained MNIST run against sampler, steps and guidance scale: one table, one
picture.

    python -m experiments.eval_sweep --workdir runs/mnist
    python -m experiments.eval_sweep --workdir runs/mnist --num_samples 500 \
        --settings ddim:50:0,ddim:50:1,ddim:50:2,ddim:50:4 --out_png sweep.png

Each setting ``sampler:steps:guidance[:N]`` draws ``N`` class-conditional samples (labels cycling
0-9; ``--num_samples`` unless the setting names its own ``N``) from the run's EMA params, from
the same keys for every setting, and reports the Frechet distance (FD) to ``N`` MNIST test images
in the feature space of ``experiments.eval_mnist``'s classifier, the conditional accuracy (the
fraction the classifier assigns to the requested digit), and the wall time. FD is biased upwards
at small ``N``, so the table also gives the real-vs-real floor (``N`` training vs ``N`` test
images) at each ``N`` used: compare a setting with the floor at its ``N``, never across ``N``.

Writes ``WORKDIR/NAME.json``, ``WORKDIR/NAME.md`` (the markdown table) and a PNG (``--out_png``,
default ``WORKDIR/NAME.png``), ``NAME`` being ``--name`` (default ``sweep``): one row per setting,
the first two samples of each digit.
The classifier is ``WORKDIR/mnist_classifier.msgpack`` (or ``--classifier_path``), trained there
first if missing, as in ``eval_mnist``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

import jax
import numpy as np

from jaxdiff.metrics import classify, feature_statistics, frechet_distance

DEFAULT_SETTINGS = ("ddpm:1000:2:100,ddim:10:2,ddim:20:2,ddim:50:2,ddim:100:2,"
                    "ddim:50:0,ddim:50:1,ddim:50:4")


def parse_settings(text: str, default_n: int) -> list[dict]:
    """``"ddim:50:2,ddpm:1000:2:100"`` -> ``[{sampler, steps, guidance_scale, n}, ...]``."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.split(":")
        if len(parts) not in (3, 4) or parts[0] not in ("ddim", "ddpm"):
            raise ValueError(f"--settings: expected sampler:steps:guidance[:N] with sampler ddim "
                             f"or ddpm, got {item!r}")
        try:
            steps, w = int(parts[1]), float(parts[2])
            n = int(parts[3]) if len(parts) == 4 else default_n
        except ValueError:
            raise ValueError(f"--settings: steps and N must be ints, guidance a float: {item!r}")
        if steps < 1 or w < 0 or not 10 <= n <= 10000:
            raise ValueError(f"--settings: need steps >= 1, guidance >= 0, 10 <= N <= 10000: "
                             f"{item!r}")
        out.append({"sampler": parts[0], "steps": steps, "guidance_scale": w, "n": n})
    if not out:
        raise ValueError("--settings: no settings given")
    return out


def markdown(results: dict) -> str:
    clf = results["classifier"]
    lines = [
        "| sampler | steps | guidance | N | FD (floor at N) | conditional accuracy | "
        "time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    floors = results["floors"]
    for r in results["settings"]:
        lines.append(
            f"| {r['sampler'].upper()} | {r['steps']} | {r['guidance_scale']:g} | {r['n']} | "
            f"{r['fd']:.2f} ({floors[str(r['n'])]:.2f}) | {r['conditional_accuracy']:.3f} | "
            f"{r['time_s']:.0f} |"
        )
    lines.append("")
    if results.get("args", {}).get("ddim_clip") == "diffusers":
        lines.append("DDIM clipping: diffusers' form (clipped x0, the model's unclipped eps).")
    lines.append(f"Classifier test accuracy {clf['test_accuracy']:.4f}; run "
                 f"{results['workdir']} at step {results['step']}.")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.eval_sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a train_mnist workdir with a checkpoint")
    p.add_argument("--settings", default=DEFAULT_SETTINGS,
                   help="comma-separated sampler:steps:guidance[:N]")
    p.add_argument("--num_samples", type=int, default=300, help="N where a setting names none")
    p.add_argument("--batch_size", type=int, default=300, help="sampling batch")
    p.add_argument("--classifier_path", default="")
    p.add_argument("--classifier_epochs", type=int, default=3)
    p.add_argument("--data_dir", default="")
    p.add_argument("--out_png", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="sweep",
                   help="base name of the json/md/png written to the workdir")
    p.add_argument("--ddim_clip", choices=["consistent", "diffusers"], default="consistent",
                   help="DDIM with clipping: re-derive eps from the clipped x0 (consistent), or "
                        "keep the model's eps as diffusers' DDIMScheduler does by default")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = parse_settings(args.settings, args.num_samples)
    except ValueError as e:
        p.error(str(e))
    if args.batch_size < 1:
        p.error("--batch_size must be >= 1")
    if not args.name or os.sep in args.name or args.name.startswith("."):
        p.error(f"--name must be a plain file name (no '{os.sep}', not hidden), got {args.name!r}")

    from experiments.eval_mnist import (evaluate_samples, generate, get_classifier, has_run,
                                        load_diffusion, load_mnist_arrays, log)
    from experiments.images import save_grid
    from experiments.sample import load_run

    if not has_run(args.workdir):
        p.error(f"--workdir {args.workdir}: no train_mnist run (config.json + checkpoints/)")
    loaded = load_run(args.workdir)   # restored once, shared by every setting's sampler
    ckpts = [int(d) for d in os.listdir(os.path.join(args.workdir, "checkpoints")) if d.isdigit()]
    train = load_mnist_arrays("train", args.data_dir)
    test = load_mnist_arrays("test", args.data_dir)
    clf_path = args.classifier_path or os.path.join(args.workdir, "mnist_classifier.msgpack")
    clf, clf_info = get_classifier(clf_path, train, test, seed=args.seed,
                                   epochs=args.classifier_epochs)

    most = max(s["n"] for s in settings)
    if most > min(len(test[0]), len(train[0])):
        p.error(f"--settings/--num_samples: N={most} exceeds the {len(test[0])} test images")
    rng = np.random.default_rng(args.seed)
    test_perm, train_perm = rng.permutation(len(test[0])), rng.permutation(len(train[0]))
    refs, floors = {}, {}
    for n in sorted({s["n"] for s in settings}):
        refs[n] = feature_statistics(classify(clf, test[0][test_perm[:n]])[0])
        real = feature_statistics(classify(clf, train[0][train_perm[:n]])[0])
        floors[str(n)] = float(frechet_distance(*real, *refs[n]))
        log(f"floor (train vs test) at N={n}: {floors[str(n)]:.3f}")

    key = jax.random.PRNGKey(args.seed)
    rows, strips = [], []
    for s in settings:
        run = load_diffusion(args.workdir, sampler=s["sampler"], steps=s["steps"],
                             ddim_clip=args.ddim_clip, loaded=loaded,
                             guidance_scale=s["guidance_scale"], eta=0.0)
        labels = (np.arange(s["n"]) % run["num_classes"]).astype(np.int32)
        log(f"{s['sampler']}-{s['steps']}, guidance {s['guidance_scale']:g}, N={s['n']}")
        t0 = time.time()
        images = generate(run["sample_fn"], labels, key, min(args.batch_size, s["n"]))
        elapsed = time.time() - t0
        r = evaluate_samples(clf, images, labels, refs[s["n"]])
        row = {**s, "fd": float(r["fid"]), "conditional_accuracy": r["conditional_accuracy"],
               "time_s": round(elapsed, 1)}
        rows.append(row)
        log(f"  FD {row['fd']:.3f}, accuracy {row['conditional_accuracy']:.3f}, {elapsed:.0f} s")
        order = np.concatenate([np.flatnonzero(labels == d)[:2] for d in range(10)])
        strips.append(images[order])

    results = {"workdir": args.workdir, "step": max(ckpts, default=-1),
               "classifier": clf_info, "floors": floors, "settings": rows,
               "args": vars(args)}
    with open(os.path.join(args.workdir, f"{args.name}.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    table = markdown(results)
    with open(os.path.join(args.workdir, f"{args.name}.md"), "w") as f:
        f.write(table)
    out_png = args.out_png or os.path.join(args.workdir, f"{args.name}.png")
    save_grid(np.concatenate(strips), out_png, ncols=20)
    log(f"wrote {out_png}")
    print(table)
    return results


if __name__ == "__main__":
    main()
