r"""Evaluate a class-conditional MNIST diffusion model: FID on a classifier's features, conditional
accuracy, the class histogram of unconditional samples, and bits/dim on test images.

    python -m experiments.eval_mnist --workdir runs/mnist
    python -m experiments.eval_mnist --workdir runs/mnist --num_samples 1000 --sampler ddim \
        --steps 50 --guidance_scale 2 --classifier_path ~/.cache/jaxdiff/mnist_classifier.msgpack
    python -m experiments.eval_mnist --workdir runs/mnist --sampler dpm_solver --steps 20

Steps:

1. The feature extractor: a small CNN (``jaxdiff.metrics.MnistClassifier``), loaded from
   ``--classifier_path`` (default ``WORKDIR/mnist_classifier.msgpack``) or, when that file does not
   exist, trained on the 60k training images (3 epochs) and saved there. Its test accuracy is
   reported.
2. The floor: FID between ``N`` random training images and ``N`` test images. FID is biased
   upwards at finite ``N``, so model FIDs are only comparable with the floor at the same ``N``.
3. If ``WORKDIR`` is a ``train_mnist`` run with a checkpoint (``config.json`` + ``checkpoints/``),
   its EMA params sample ``N`` class-conditional images (labels cycling 0-9, with guidance) and
   ``N`` unconditional ones (the null label), and the bound on the negative log-likelihood is
   computed on ``--bpd_examples`` test images (all ``T`` terms, null label). ``--samples_npz``
   evaluates saved samples (``experiments.sample``'s ``.npz``) instead of sampling.

MNIST comes from ``--data_dir`` if given, else from the run's own ``data.data_dir`` /
``data.source`` (``WORKDIR/config.json``), else from ``jaxdiff.data.load_mnist``'s search.
``--sampler`` is any of ``jaxdiff.samplers.sampler_names()``; ``--eta`` and ``--ddim_clip`` are DDIM
options (an error with another sampler). Writes ``WORKDIR/eval_mnist.json`` and
``WORKDIR/eval_mnist.md`` (a markdown table); measured figures are in docs/results.md.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional, Sequence

import jax
import numpy as np
from absl import flags, logging

from experiments import cli, mnist_lib, mnist_sampling
from experiments.cli import ConfigError
from experiments.evaluation import (check_outputs, eval_bpd, evaluate_samples, generate, has_run,
                                    load_diffusion, load_mnist_arrays, load_samples_npz, log,
                                    references, workdir_classifier, write_results)
from jaxdiff.samplers import sampler_names

PROG = "python -m experiments.eval_mnist"

__all__ = ["markdown_table", "main", "cli_main"]


def markdown_table(results: dict) -> str:
    """The results as a two-column markdown table."""
    rows = [("classifier test accuracy", f"{results['classifier']['test_accuracy']:.4f}")]
    floor = results["fid_floor"]
    rows.append((f"FID floor (train vs test, N={floor['n']})", f"{floor['fid']:.3f}"))
    for name in ("conditional", "unconditional"):
        r = results.get(name)
        if r:
            rows.append((f"FID, {name} samples (N={r['n']})", f"{r['fid']:.3f}"))
            if "conditional_accuracy" in r:
                rows.append(("conditional accuracy", f"{r['conditional_accuracy']:.4f}"))
            if "precision" in r:
                rows.append(("precision / recall (k = 3)",
                             f"{r['precision']:.3f} / {r['recall']:.3f}"))
            if "clean_background" in r:
                rows.append(("clean background / haze (pixel fractions)",
                             f"{r['clean_background']:.3f} / {r['haze']:.3f}"))
            if "class_histogram" in r:
                hist = " ".join(f"{h:.3f}" for h in r["class_histogram"])
                last = len(r["class_histogram"]) - 1
                rows.append((f"class histogram 0-{last}", hist))
    if results.get("bpd"):
        b = results["bpd"]
        rows.append((f"bits/dim (N={b['n']}, {b['variance_type']})",
                     f"{b['bpd']:.4f} ± {b['bpd_stderr']:.4f}"))
    lines = ["| metric | value |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def _define(fv: flags.FlagValues, argv: list) -> None:
    del argv
    d = dict(flag_values=fv)
    flags.DEFINE_string("workdir", None, "train_mnist workdir (or any directory, for the floor "
                        "only)", **d)
    flags.DEFINE_string("classifier_path", "", "classifier msgpack; trained and written there if "
                        "missing (default WORKDIR/mnist_classifier.msgpack)", **d)
    flags.DEFINE_integer("classifier_epochs", 3, "epochs if the classifier is trained", **d)
    flags.DEFINE_integer("num_samples", 1000, "N for FID (2 <= N <= 10000)", **d)
    flags.DEFINE_enum("sampler", None, list(sampler_names()),
                      "sampler (default: the run's config.sampling.sampler)", **d)
    flags.DEFINE_integer("steps", None, "sampling steps (default: the run's)", **d)
    flags.DEFINE_float("guidance_scale", None, "classifier-free guidance; 1 = none (default: "
                       "the run's)", **d)
    flags.DEFINE_string("guidance_interval", None, "guide only at timesteps t_lo,t_hi (e.g. "
                        "200,800); all = at every step (default: the run's)", **d)
    flags.DEFINE_float("eta", None, "DDIM's eta (default 0)", **d)
    flags.DEFINE_enum("ddim_clip", None, list(mnist_sampling.DDIM_CLIP_FORMS),
                      "DDIM with clipping: consistent (the default) or diffusers' form", **d)
    flags.DEFINE_integer("batch_size", 250, "sampling batch", **d)
    flags.DEFINE_string("samples_npz", "", "evaluate saved samples instead of sampling", **d)
    flags.DEFINE_integer("bpd_examples", 32, "test images for bits/dim; 0 = skip", **d)
    flags.DEFINE_integer("bpd_batch_size", 32, "bits/dim batch", **d)
    flags.DEFINE_enum("bpd_variance_type", "fixed_small", ["fixed_small", "fixed_large"],
                      "reverse-process variance for bits/dim", **d)
    flags.DEFINE_string("data_dir", "", "MNIST IDX directory (default: the run's data.data_dir "
                        "and data.source, from WORKDIR/config.json; else jaxdiff.data's search)",
                        **d)
    flags.DEFINE_integer("seed", 0, "seed of the draws", **d)


def _check(fv: flags.FlagValues) -> None:
    if not fv.workdir:
        raise ConfigError("--workdir is required")
    if not 2 <= fv.num_samples <= 10000:
        raise ConfigError("--num_samples must be in [2, 10000] (the test set has 10000 images), "
                          f"got {fv.num_samples}")
    if not 0 <= fv.bpd_examples <= 10000:
        raise ConfigError("--bpd_examples must be in [0, 10000] (the test set has 10000 images), "
                          f"got {fv.bpd_examples}")
    for name in ("steps", "batch_size", "bpd_batch_size", "classifier_epochs"):
        if fv[name].value is not None and fv[name].value < 1:
            raise ConfigError(f"--{name} must be >= 1, got {fv[name].value}")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Parses ``argv`` (without the program name) and evaluates; returns the results dict (also
    written as JSON and markdown).

    Raises:
      ConfigError: an invalid flag (checked, with the sampler, the ``--samples_npz`` file and
        the output paths, before any work), or MNIST not found.
      jaxdiff.validation.InvalidFileError: a corrupt data or classifier file.
    """
    fv = cli.parse_flags(_define, [] if argv is None else argv, PROG, __doc__)
    _check(fv)
    interval = mnist_sampling.parse_guidance_interval(fv.guidance_interval)
    saved = load_samples_npz(fv.samples_npz) if fv.samples_npz else None  # checked first
    check_outputs(fv.workdir, fv.classifier_path)
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    run = None
    if has_run(fv.workdir):
        loaded = mnist_lib.load_run(fv.workdir)
        sampling = mnist_sampling.sampling_from_flags(
            loaded.config.sampling, fv.sampler, fv.steps, fv.guidance_scale, eta=fv.eta,
            ddim_clip=fv.ddim_clip, guidance_interval=interval)
        run = load_diffusion(loaded, sampling)  # checks the sampler before any work
    os.makedirs(fv.workdir, exist_ok=True)
    key = jax.random.key(fv.seed)
    train = load_mnist_arrays("train", fv.data_dir, workdir=fv.workdir)
    test = load_mnist_arrays("test", fv.data_dir, workdir=fv.workdir)
    clf, clf_info = workdir_classifier(fv.workdir, fv.classifier_path, train, test, seed=fv.seed,
                                       epochs=fv.classifier_epochs)
    results: dict[str, Any] = {"classifier": clf_info, "args": fv.flag_values_dict()}

    n = fv.num_samples
    t0 = time.time()
    ref = references(clf, train, test, [n], fv.seed)[n]
    ref_stats, reference, floor = ref.stats, ref.data, ref.real["fid"]
    results["fid_floor"] = {"n": n, "fid": floor, "time_s": round(time.time() - t0, 2)}
    log(f"FID floor (train vs test, N={n}): {floor:.4f}")

    if saved is not None:
        results["conditional"] = evaluate_samples(clf, *saved, ref_stats, reference=reference)
    elif run is None:
        log(f"no train_mnist checkpoint in {fv.workdir}: classifier and floor only")
    else:
        labels = (np.arange(n) % run["num_classes"]).astype(np.int32)
        t0 = time.time()
        cond = generate(run["sample_fn"], labels, jax.random.fold_in(key, 1), fv.batch_size)
        results["conditional"] = evaluate_samples(clf, cond, labels, ref_stats,
                                                  reference=reference)
        results["conditional"]["time_s"] = round(time.time() - t0, 1)
        null = np.full(n, run["null_label"], np.int32)
        t0 = time.time()
        uncond = generate(run["sample_fn"], null, jax.random.fold_in(key, 2), fv.batch_size)
        results["unconditional"] = evaluate_samples(clf, uncond, None, ref_stats,
                                                    num_classes=run["num_classes"],
                                                    reference=reference)
        results["unconditional"]["time_s"] = round(time.time() - t0, 1)
        for name in ("conditional", "unconditional"):
            log(f"{name}: {results[name]}")
    if run is not None and fv.bpd_examples > 0:
        m = fv.bpd_examples
        if m > len(test[0]):
            raise ConfigError(f"--bpd_examples {m} exceeds the {len(test[0])} test images")
        # its own draw: independent of --num_samples (and leaves the FID indices as they were)
        bpd_idx = np.random.default_rng([fv.seed, 3]).permutation(len(test[0]))[:m]
        x0 = np.round((test[0][bpd_idx] + 1) * 127.5) / 127.5 - 1      # exact 8-bit grid
        results["bpd"] = eval_bpd(run["apply"], run["variables"], run["schedule"],
                                  x0.astype(np.float32), np.full(m, run["null_label"], np.int32),
                                  jax.random.fold_in(key, 3),
                                  batch_size=min(fv.bpd_batch_size, m),
                                  prediction_type=run["prediction_type"],
                                  variance_type=fv.bpd_variance_type)
        log(f"bits/dim: {results['bpd']}")
    write_results(results, markdown_table(results),
                  json_path=os.path.join(fv.workdir, "eval_mnist.json"),
                  md_path=os.path.join(fv.workdir, "eval_mnist.md"))
    return results


def cli_main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m experiments.eval_mnist``: :func:`main` with errors as one line, exit 0."""
    cli.run(main, argv)


if __name__ == "__main__":
    cli_main()
