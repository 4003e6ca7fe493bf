r"""Evaluate an unconditional score-SDE MNIST model (``experiments.train_score_mnist``): samples by
predictor-corrector and by the probability-flow ODE, judged by an MNIST classifier, and bits/dim
of test images from the ODE likelihood, next to a discrete model's variational bound.

    python -m experiments.eval_score_mnist --workdir runs/ve_sde
    python -m experiments.eval_score_mnist --workdir runs/ve_sde --num_samples 1000 \
        --pc_steps 1000 --ode_solver rk4 --ode_steps 50 --adaptive_solver tsit5 \
        --bpd_examples 128 --discrete_workdir runs/mnist \
        --classifier_path runs/mnist/mnist_classifier.msgpack

Steps:

1. The classifier (``--classifier_path``, default ``WORKDIR/mnist_classifier.msgpack``; trained on
   the 60k training images and saved there when missing) and the FD floor: ``N`` training images
   against ``N`` test images (``N = --num_samples``).
2. ``N`` samples from each of: predictor-corrector (the run's predictor / corrector / snr,
   ``--pc_steps`` steps; 0 skips), the probability-flow ODE with a fixed-step solver
   (``--ode_solver``, ``--ode_steps``; 0 skips) and with an adaptive diffrax solver
   (``--adaptive_solver`` at ``--ode_rtol`` / ``--ode_atol``; ``none`` skips). Each gets
   ``experiments.evaluation.evaluate_samples``'s FD against ``N`` test images, precision /
   recall, pixel statistics and, the model being unconditional, the classifier's class histogram
   with its entropy (bits; uniform is log2 10 = 3.32), and its counted NFE per image.
3. Bits/dim of ``--bpd_examples`` test images (a fixed random subset): the ODE likelihood
   (uniform dequantisation, Hutchinson's estimator, ``--bpd_solver``) and, with
   ``--discrete_workdir`` (a ``train_mnist`` run), that model's variational bound (null label, all
   ``T`` terms, fixed-small variance) on the same images.

``--out_png`` writes ``--png_per_sampler`` samples of each sampler, one row per sampler. Writes
``WORKDIR/eval_score_mnist.json`` and ``WORKDIR/eval_score_mnist.md``. Invalid flags print one
``error: ...`` line and exit with status 2 before any work.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
from absl import flags, logging

from experiments import cli, mnist_lib, mnist_sampling, score_eval, score_mnist
from experiments.cli import ConfigError
from experiments.evaluation import (check_outputs, eval_bpd, evaluate_samples, has_run,
                                    load_diffusion, load_mnist_arrays, log, references,
                                    workdir_classifier, write_json, write_results)
from jaxdiff.sde import ADAPTIVE_SOLVERS, FIXED_SOLVERS, PROBES

PROG = "python -m experiments.eval_score_mnist"

__all__ = ["markdown_table", "main", "cli_main"]


def markdown_table(results: dict) -> str:
    """The results as markdown: one row per sampler, then the bits/dim."""
    floor = results["fid_floor"]
    lines = [f"classifier test accuracy {results['classifier']['test_accuracy']:.4f}; "
             f"FD floor (train vs test, N={floor['n']}) {floor['fid']:.3f}; "
             f"model step {results['step']}", "",
             "| sampler | NFE | FD | precision | recall | clean background | haze | "
             "class entropy (bits) | max class deviation | time (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results["samplers"].items():
        lines.append(f"| {name} (N={r['n']}) | {r['nfe']:.0f} | {r['fid']:.2f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {r['clean_background']:.3f} | "
                     f"{r['haze']:.3f} | {r['class_entropy_bits']:.3f} | "
                     f"{r['histogram_max_deviation']:.3f} | {r['time_s']:.0f} |")
    for name, r in results["samplers"].items():
        hist = " ".join(f"{h:.3f}" for h in r["class_histogram"])
        lines.append(f"\n{name}: class histogram 0-9: {hist}")
    b = results.get("bpd")
    if b:
        lines += ["", "| bits/dim | N | value | NFE | time (s) |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        o = b["ode"]
        how = (f"rtol={o['rtol']:g}, atol={o['atol']:g}" if "rtol" in o
               else f"{o['num_steps']} steps")
        lines.append(f"| score SDE, probability-flow ODE ({o['solver']}, {how}, {o['probe']} "
                     f"probe, uniform dequantisation) | {o['n']} | {o['bpd']:.4f} ± "
                     f"{o['bpd_stderr']:.4f} | {o.get('nfe', float('nan')):.0f} | "
                     f"{o['time_s']:.0f} |")
        d = b.get("discrete_vlb")
        if d:
            lines.append(f"| discrete model ({d['workdir']}), variational bound "
                         f"({d['variance_type']}, null label) | {d['n']} | {d['bpd']:.4f} ± "
                         f"{d['bpd_stderr']:.4f} | {d['nfe']} | {d['time_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _define(fv: flags.FlagValues, argv: list) -> None:
    del argv
    d = dict(flag_values=fv)
    flags.DEFINE_string("workdir", None, "train_score_mnist workdir", **d)
    flags.DEFINE_string("classifier_path", "", "classifier msgpack; trained and written there if "
                        "missing (default WORKDIR/mnist_classifier.msgpack)", **d)
    flags.DEFINE_integer("classifier_epochs", 3, "epochs if the classifier is trained", **d)
    flags.DEFINE_integer("num_samples", 500, "N per sampler, and for the FD floor", **d)
    flags.DEFINE_integer("batch_size", 250, "sampling batch", **d)
    flags.DEFINE_integer("pc_steps", 500, "predictor-corrector steps; 0 = skip", **d)
    flags.DEFINE_enum("ode_solver", "rk4", list(FIXED_SOLVERS), "fixed-step ODE solver", **d)
    flags.DEFINE_integer("ode_steps", 25, "fixed-step ODE steps; 0 = skip", **d)
    flags.DEFINE_enum("adaptive_solver", "tsit5", list(ADAPTIVE_SOLVERS) + ["none"],
                      "adaptive ODE solver (diffrax); none = skip", **d)
    flags.DEFINE_float("ode_rtol", 1e-3, "adaptive sampling rtol", **d)
    flags.DEFINE_float("ode_atol", 1e-3, "adaptive sampling atol", **d)
    flags.DEFINE_integer("bpd_examples", 64, "test images for bits/dim; 0 = skip", **d)
    flags.DEFINE_integer("bpd_batch_size", 32, "bits/dim batch", **d)
    flags.DEFINE_enum("bpd_solver", "tsit5", list(ADAPTIVE_SOLVERS) + list(FIXED_SOLVERS),
                      "ODE-likelihood solver", **d)
    flags.DEFINE_integer("bpd_steps", 100, "steps of a fixed-step bits/dim solver", **d)
    flags.DEFINE_float("bpd_rtol", 1e-5, "adaptive bits/dim rtol", **d)
    flags.DEFINE_float("bpd_atol", 1e-5, "adaptive bits/dim atol", **d)
    flags.DEFINE_enum("bpd_probe", "rademacher", list(PROBES[:2]), "Hutchinson probe", **d)
    flags.DEFINE_string("discrete_workdir", "", "a train_mnist run: its variational bound on the "
                        "same test images", **d)
    flags.DEFINE_string("out_png", "", "picture: --png_per_sampler samples per sampler", **d)
    flags.DEFINE_integer("png_per_sampler", 16, "samples per sampler in --out_png", **d)
    flags.DEFINE_string("data_dir", "", "MNIST IDX directory (default: the run's data.data_dir, "
                        "from WORKDIR/config.json; else jaxdiff.data's search)",
                        **d)
    flags.DEFINE_integer("seed", 0, "seed of the draws", **d)


def _check(fv: flags.FlagValues) -> None:
    if not fv.workdir:
        raise ConfigError("--workdir is required")
    if not 2 <= fv.num_samples <= 10000:
        raise ConfigError(f"--num_samples must be in [2, 10000], got {fv.num_samples}")
    if not 0 <= fv.bpd_examples <= 10000:
        raise ConfigError(f"--bpd_examples must be in [0, 10000], got {fv.bpd_examples}")
    for name in ("batch_size", "bpd_batch_size", "classifier_epochs", "bpd_steps",
                 "png_per_sampler"):
        if fv[name].value < 1:
            raise ConfigError(f"--{name} must be >= 1, got {fv[name].value}")
    for name in ("pc_steps", "ode_steps"):
        if fv[name].value < 0:
            raise ConfigError(f"--{name} must be >= 0 (0 = skip), got {fv[name].value}")
    for name in ("ode_rtol", "ode_atol", "bpd_rtol", "bpd_atol"):
        if not fv[name].value > 0:
            raise ConfigError(f"--{name} must be > 0, got {fv[name].value}")
    if fv.discrete_workdir and not has_run(fv.discrete_workdir):
        raise ConfigError(f"--discrete_workdir {fv.discrete_workdir!r} is not a train_mnist run "
                          "(config.json + checkpoints/)")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Parses ``argv`` (without the program name) and evaluates; returns the results dict (also
    written as JSON and markdown into the workdir).

    Raises:
      ConfigError: an invalid flag or a workdir without a score run (before any work).
    """
    fv = cli.parse_flags(_define, [] if argv is None else argv, PROG, __doc__)
    _check(fv)
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    run = score_mnist.load_run(fv.workdir)
    check_outputs(fv.workdir, fv.classifier_path, out_png=fv.out_png)
    key = jax.random.key(fv.seed)
    train = load_mnist_arrays("train", fv.data_dir, workdir=fv.workdir)
    test = load_mnist_arrays("test", fv.data_dir, workdir=fv.workdir)
    clf, clf_info = workdir_classifier(fv.workdir, fv.classifier_path, train, test, seed=fv.seed,
                                       epochs=fv.classifier_epochs)
    results: dict[str, Any] = {"classifier": clf_info, "step": run.step,
                               "args": fv.flag_values_dict(), "samplers": {}}

    n = fv.num_samples
    ref = references(clf, train, test, [n], fv.seed)[n]
    ref_stats, reference, floor = ref.stats, ref.data, ref.real["fid"]
    results["fid_floor"] = {"n": n, "fid": floor}
    log(f"FD floor (train vs test, N={n}): {floor:.4f}")

    s = run.config.sampling
    settings = []
    if fv.pc_steps:
        settings.append((f"PC {s.predictor} + {s.corrector}, {fv.pc_steps} steps", "pc",
                         dict(num_steps=fv.pc_steps)))
    if fv.ode_steps:
        settings.append((f"ODE {fv.ode_solver}, {fv.ode_steps} steps", "ode",
                         dict(solver=fv.ode_solver, num_steps=fv.ode_steps)))
    if fv.adaptive_solver != "none":
        settings.append((f"ODE {fv.adaptive_solver}, rtol={fv.ode_rtol:g} atol={fv.ode_atol:g}",
                         "ode", dict(solver=fv.adaptive_solver, rtol=fv.ode_rtol,
                                     atol=fv.ode_atol)))
    json_path = os.path.join(fv.workdir, "eval_score_mnist.json")

    def save():  # after every stage: a long evaluation cut short keeps what it measured
        write_json(json_path, results)

    counter = score_eval.EvalCounter()
    pictures = []
    for i, (name, method, opts) in enumerate(settings):
        log(f"sampling {n} images: {name}")
        sample = score_eval.make_sampler(run, method, counter=counter, **opts)
        images, info = score_eval.sample_many(sample, jax.random.fold_in(key, 10 + i), n,
                                              min(fv.batch_size, n), counter)
        r = evaluate_samples(clf, images, None, ref_stats, reference=reference)
        r.update(info, class_entropy_bits=score_eval.class_entropy_bits(r["class_histogram"]))
        results["samplers"][name] = r
        pictures.append(images[:fv.png_per_sampler])
        log(f"{name}: {r}")
        save()

    if fv.bpd_examples:
        m = fv.bpd_examples
        bpd_idx = np.random.default_rng([fv.seed, 3]).permutation(len(test[0]))[:m]
        levels = score_eval.to_uint8(test[0][bpd_idx])
        log(f"ODE bits/dim on {m} test images ({fv.bpd_solver})")
        ode = score_eval.ode_bits_per_dim(
            run, levels, jax.random.fold_in(key, 3), batch_size=min(fv.bpd_batch_size, m),
            solver=fv.bpd_solver, num_steps=fv.bpd_steps, rtol=fv.bpd_rtol, atol=fv.bpd_atol,
            probe=fv.bpd_probe, eps=float(run.config.training.eps), counter=counter)
        results["bpd"] = {"ode": ode, "indices_seed": [fv.seed, 3]}
        save()
        if fv.discrete_workdir:
            log(f"variational bound of {fv.discrete_workdir} on the same {m} images")
            disc = load_diffusion(mnist_lib.load_run(fv.discrete_workdir),
                                  mnist_sampling.sampling_config())
            t0 = time.time()
            x0 = (levels.astype(np.float32) / 127.5 - 1.0).astype(np.float32)
            vlb = eval_bpd(disc["apply"], disc["variables"], disc["schedule"], x0,
                           np.full(m, disc["null_label"], np.int32), jax.random.fold_in(key, 4),
                           batch_size=min(fv.bpd_batch_size, m),
                           prediction_type=disc["prediction_type"], variance_type="fixed_small")
            vlb.update(workdir=fv.discrete_workdir, nfe=int(disc["schedule"].num_timesteps),
                       time_s=round(time.time() - t0, 1))
            results["bpd"]["discrete_vlb"] = vlb
        log(f"bits/dim: {results['bpd']}")

    grid = None
    if fv.out_png and pictures:
        grid = (np.concatenate(pictures), fv.out_png, fv.png_per_sampler)
        results["png"] = fv.out_png
    write_results(results, markdown_table(results), json_path=json_path,
                  md_path=os.path.join(fv.workdir, "eval_score_mnist.md"), grid=grid)
    return results


def cli_main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m experiments.eval_score_mnist``: :func:`main`, errors as one line (exit 2)."""
    cli.run(main, argv)


if __name__ == "__main__":
    cli_main()
