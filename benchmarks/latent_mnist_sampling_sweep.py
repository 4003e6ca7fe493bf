"""The sampling levers of a text-to-MNIST latent run (issue 26, "fidelity near the floor"): the
same trained run evaluated with several samplers, step counts and guidance scales, as one table
(measures, never asserts).

    python -m benchmarks.latent_mnist_sampling_sweep --workdir runs/latent_mnist \
        --classifier_path runs/mnist/mnist_classifier.msgpack \
        --settings ddim:25:3 ddim:25:2 ddim:25:1.5 ddpm:50:1.5 --out_md sweep.md

Each ``SAMPLER:STEPS:GUIDANCE`` runs ``experiments.eval_latent_mnist`` (``--attr_samples 0``, the
held-out / training / empty rows at ``--num_samples``; the same seed, so the same prompts and
references in every row) and the table keeps the held-out row: conditional accuracy, FD with its
floor, precision, recall and the sampling time (with the first batch's compilation). The
per-setting JSON goes to ``WORKDIR/sweep_<sampler>_<steps>_<guidance>.json``.
"""

from __future__ import annotations

import argparse
import time


def _setting(text: str):
    try:
        name, steps, w = text.split(":")
        return name, int(steps), float(w)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--settings: expected SAMPLER:STEPS:GUIDANCE (e.g. ddim:25:3), got {text!r}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--classifier_path", required=True)
    ap.add_argument("--data_dir", default="")
    ap.add_argument("--num_samples", type=int, default=1000)
    ap.add_argument("--settings", type=_setting, nargs="+", required=True)
    ap.add_argument("--out_md", default="")
    args = ap.parse_args()

    from benchmarks.common import machine
    from experiments import eval_latent_mnist

    rows = []
    for name, steps, w in args.settings:
        t0 = time.time()
        res = eval_latent_mnist.main([
            f"--workdir={args.workdir}", f"--classifier_path={args.classifier_path}",
            f"--data_dir={args.data_dir}", f"--num_samples={args.num_samples}",
            f"--sampler={name}", f"--steps={steps}", f"--guidance_scale={w}", "--attr_samples=0",
            f"--name=sweep_{name}_{steps}_{w:g}", f"--out_png=/tmp/sweep_{name}_{steps}_{w:g}.png"])
        r, floor = res["rows"]["held-out templates"], res["floors"][str(args.num_samples)]
        rows.append(f"| {name} | {steps} | {w:g} | {r['conditional_accuracy']:.3f} | "
                    f"{r['fid']:.2f} | {r['fid'] / floor:.2f} | {r['precision']:.3f} | "
                    f"{r['recall']:.3f} | {r['time_s']:.0f} |")
        print(rows[-1], f"({time.time() - t0:.0f} s with the other rows)", flush=True)
    lines = [f"Run {args.workdir} at step {res['step']}; held-out templates, N = "
             f"{args.num_samples} (FD floor {floor:.2f}).", "",
             "| sampler | steps | guidance | accuracy | FD | FD / floor | precision | recall "
             "| time (s) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             *rows, "", f"Machine: {machine()}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out_md:
        with open(args.out_md, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
