r"""Evaluate a text-to-MNIST latent diffusion run (``experiments.train_latent_mnist``): samples for
held-out prompt templates (never seen in training), for training templates, and for the empty
prompt, scored by ``experiments.evaluation.evaluate_samples`` (the MNIST classifier's conditional
accuracy, FD in its feature space against test images, precision / recall, pixel statistics).

    python -m experiments.eval_latent_mnist --workdir runs/latent_mnist \
        --classifier_path runs/mnist/mnist_classifier.msgpack --out_md results.md \
        --out_png docs/assets/latent_mnist.png

Samples go through ``jaxdiff.pipelines.generate`` with the run's sampler, steps and guidance
(``config.sampling``, overridable with ``--sampler`` / ``--steps`` / ``--guidance_scale``), are
decoded at the padded size and cropped back to 28x28. The labels are balanced (``i % 10``) and
each sample's prompt is drawn for its label (``experiments.mnist_prompts.sample_prompts``). FD is
given at ``N = --num_samples`` with the real-vs-real floor at that ``N`` (N training vs N test
images), and at ``N = 300`` on the first 300 samples with the floor of ``experiments.eval_sweep``
(same seed, same test and training draws), the ``N`` of the pixel-space model's stored sweep.

The attribute-separation table (:mod:`experiments.attribute_eval`): ``--attr_samples`` images
per adjective ("a thin digit seven", "a thick digit seven", ...; 0 skips the table) and for the
unseen composition "a thick slanted digit seven", with each attribute measured on them, against
the same measure on MNIST test images binned by the run's thresholds (``latent_stats.json``; a run
trained before the adjectives were measured gets the tertiles of the training set, computed here).
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional, Sequence

import jax
import numpy as np
from absl import flags, logging

from experiments import (attribute_eval, cli, latent_data, latent_lib, latent_pipeline,
                         mnist_prompts)
from experiments.cli import ConfigError, config_check
from jaxdiff.pipelines import choose_sampler
from experiments.evaluation import (check_outputs, evaluate_samples, load_mnist_arrays, log,
                                    references, workdir_classifier, write_results)

PROG = "python -m experiments.eval_latent_mnist"
FD_N = 300   # experiments.eval_sweep's N for the pixel-space model

__all__ = ["main", "cli_main", "markdown"]


# The table's rows: flag name -> (row title, prompt split; None = the empty prompt).
ROWS = {"heldout": ("held-out templates", "heldout"), "train": ("training templates", "train"),
        "empty": ("empty prompt", None)}


def _define(fv: flags.FlagValues, argv: list) -> None:
    del argv
    d = dict(flag_values=fv)
    flags.DEFINE_string("workdir", None, "a train_latent_mnist workdir", **d)
    flags.DEFINE_integer("num_samples", 1000, "samples per prompt split (>= 300)", **d)
    flags.DEFINE_integer("batch_size", 250, "sampling batch", **d)
    flags.DEFINE_integer("attr_samples", 300, "samples per adjective of the attribute table "
                         "(0: no table)", **d)
    flags.DEFINE_integer("steps", None, "sampler steps (default: the run's sampling.num_steps)",
                         **d)
    flags.DEFINE_float("guidance_scale", None, "guidance (default: the run's)", **d)
    flags.DEFINE_string("sampler", None, "a registered sampler name, with its default options "
                        "on the run's schedule (default: the run's sampling.sampler)", **d)
    flags.DEFINE_string("classifier_path", "", "classifier msgpack (default "
                        "WORKDIR/mnist_classifier.msgpack, trained there if absent)", **d)
    flags.DEFINE_string("data_dir", "", "MNIST IDX directory (default: the run's data.data_dir, "
                        "from WORKDIR/config.json; else jaxdiff.data's search)", **d)
    flags.DEFINE_list("rows", list(ROWS), "which prompt rows to sample and score, any of "
                      f"{', '.join(ROWS)} (the held-out row also draws the grid)", **d)
    flags.DEFINE_integer("seed", 0, "seed of the draws", **d)
    flags.DEFINE_string("name", "eval", "the results go to WORKDIR/NAME.json", **d)
    flags.DEFINE_string("out_md", "", "also write the markdown table here", **d)
    flags.DEFINE_string("out_png", "", "a grid of held-out prompts x 8 samples (default "
                        "WORKDIR/eval_grid.png)", **d)


_KEYS = ("conditional_accuracy", "fid", "precision", "recall", "clean_background", "haze")


def markdown(res: dict) -> str:
    """The results as a markdown table."""
    lines = [f"Run {res['workdir']} at step {res['step']}; sampler {res['sampler']}, "
             f"{res['steps']} steps, guidance {res['guidance_scale']:g}; classifier test "
             f"accuracy {res['classifier']['test_accuracy']:.4f}.", "",
             f"| prompts | N | conditional accuracy | FD (floor at N) | FD at N={FD_N} (floor) "
             "| precision | recall | clean background | haze | time (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in res["rows"].items():
        acc = "-" if r.get("conditional_accuracy") is None else f"{r['conditional_accuracy']:.3f}"
        lines.append(
            f"| {name} | {r['n']} | {acc} | {r['fid']:.2f} ({res['floors'][str(r['n'])]:.2f}) | "
            f"{r['fid_300']:.2f} ({res['floors'][str(FD_N)]:.2f}) | {r['precision']:.3f} | "
            f"{r['recall']:.3f} | {r['clean_background']:.3f} | {r['haze']:.3f} | "
            f"{r['time_s']:.0f} |")
    hist = res["rows"].get("empty prompt", {}).get("class_histogram")
    if hist:
        lines += ["", "Empty prompt (unconditional, no guidance): class histogram "
                  + ", ".join(f"{d}: {h:.2f}" for d, h in enumerate(hist)) + "."]
    if res.get("attributes"):
        lines += ["", attribute_eval.markdown(res["attributes"]).rstrip("\n")]
    lines += ["", f"Latent statistics: {json.dumps(res['latent_stats'])}"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Parses ``argv``, samples, scores; writes ``WORKDIR/NAME.json`` (+ ``--out_md``, the grid)
    and returns the results.

    Raises:
      ConfigError: a bad flag or workdir.
    """
    fv = cli.parse_flags(_define, [] if argv is None else argv, PROG, __doc__)
    if not fv.workdir:
        raise ConfigError("--workdir is required")
    if fv.num_samples < FD_N:
        raise ConfigError(f"--num_samples must be >= {FD_N}, got {fv.num_samples}")
    if fv.attr_samples < 0 or fv.attr_samples == 1:
        raise ConfigError(f"--attr_samples must be 0 (no table) or >= 2, got {fv.attr_samples}")
    bad = [r for r in fv.rows if r not in ROWS]
    if bad or not fv.rows:
        raise ConfigError(f"--rows must be a non-empty list of {', '.join(ROWS)}, got "
                          f"{','.join(fv.rows)!r}")
    if fv.batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {fv.batch_size}")
    logging.set_verbosity(logging.WARNING)
    run = latent_lib.load_latent_run(fv.workdir)
    if fv.sampler:
        sampler = config_check("--sampler: ", choose_sampler, fv.sampler, None,
                               latent_pipeline.scheduler_config(run.config))
        run = run._replace(sd=run.sd.replace(sampler=sampler))
    check_outputs(fv.workdir, fv.classifier_path, out_md=fv.out_md, out_png=fv.out_png)
    s = run.config.sampling
    steps = int(fv.steps or s.num_steps)
    w = float(s.guidance_scale if fv.guidance_scale is None else fv.guidance_scale)
    train = load_mnist_arrays("train", fv.data_dir, workdir=fv.workdir)
    test = load_mnist_arrays("test", fv.data_dir, workdir=fv.workdir)
    n = fv.num_samples
    clf, clf_info = workdir_classifier(fv.workdir, fv.classifier_path, train, test, seed=fv.seed,
                                       epochs=3)

    # The references and floors, drawn as experiments.eval_sweep draws them.
    refs, floors = references(clf, train, test, [n, FD_N], fv.seed), {}
    for m, ref in refs.items():
        floors[str(m)] = float(ref.real["fid"])
        log(f"floor (train vs test) at N={m}: {floors[str(m)]:.3f}")

    key = jax.random.key(fv.seed)
    labels = (np.arange(n) % 10).astype(np.int32)
    rows, grid = {}, None
    for i, (row, (name, split)) in enumerate(ROWS.items()):
        if row not in fv.rows:   # i stays the row's own index: the same draws as a full table
            continue
        k_prompt, k_sample = jax.random.split(jax.random.fold_in(key, i))
        prompts = ([mnist_prompts.EMPTY_PROMPT] * n if split is None else
                   mnist_prompts.sample_prompts(labels, k_prompt, split))
        scale = 1.0 if split is None else w   # the empty prompt: unguided, unconditional
        t0 = time.time()
        imgs = latent_pipeline.sample(run.sd, prompts, k_sample, num_steps=steps,
                                 guidance_scale=scale, batch_size=min(fv.batch_size, n))
        elapsed = time.time() - t0
        imgs = latent_data.crop_images(imgs)
        r = evaluate_samples(clf, imgs, None if split is None else labels, refs[n].stats,
                             reference=refs[n].data)
        r["fid_300"] = float(evaluate_samples(clf, imgs[:FD_N], None, refs[FD_N].stats)["fid"])
        r["time_s"] = elapsed   # with the first batch's compilation
        r["example_prompts"] = prompts[:10]
        rows[name] = r
        acc = r.get("conditional_accuracy")
        log(f"{name}: accuracy {acc if acc is None else round(acc, 4)}, FD {r['fid']:.2f}, "
            f"FD@300 {r['fid_300']:.2f}, {elapsed:.0f} s")
        if split == "heldout":
            grid_prompts = mnist_prompts.sample_prompts(np.arange(10), k_prompt, split)
            grid = latent_pipeline.sample(run.sd, [p for p in grid_prompts for _ in range(8)],
                                     jax.random.fold_in(k_sample, 99), num_steps=steps,
                                     guidance_scale=w, batch_size=80)
    attributes = None
    if fv.attr_samples:
        slant = mnist_prompts.slant_binning(run.stats.get("caption_scheme"))
        if "attribute_thresholds" in run.stats:
            thresholds = latent_data.thresholds_from_json(run.stats["attribute_thresholds"])
        else:
            log("the run records no attribute thresholds: the training set's tertiles")
            thresholds = latent_data.attribute_bins(*train, slant=slant)[2]
        attributes = attribute_eval.evaluate_attributes(
            run.sd, thresholds, test[0], test[1], n=fv.attr_samples, seed=fv.seed,
            num_steps=steps, guidance_scale=w, batch_size=fv.batch_size, classifier=clf, log=log,
            slant=slant)
        for name, p in attributes["pairs"].items():
            log(f"{name}: {p['low_word']} vs {p['high_word']}: separation "
                f"{p['generated']['separation']:.2f} (real {p['real']['separation']:.2f})")
    out_png = None
    if grid is not None:
        out_png = fv.out_png or os.path.join(fv.workdir, "eval_grid.png")
        latent_pipeline.save_prompt_grid(latent_data.crop_images(grid), grid_prompts, out_png)
        log(f"wrote {out_png}")
    res = {"workdir": fv.workdir, "step": run.stats["step"], "sampler": run.sd.sampler.name,
           "steps": steps, "guidance_scale": w, "classifier": clf_info, "floors": floors,
           "rows": rows, "attributes": attributes, "latent_stats": {k: run.stats[k] for k in
                                          ("scaling_factor", "latent_std", "latent_mean")},
           "args": fv.flag_values_dict()}
    write_results(res, markdown(res), json_path=os.path.join(fv.workdir, f"{fv.name}.json"),
                  md_path=fv.out_md, json_default=str)
    return res


def cli_main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m experiments.eval_latent_mnist``: :func:`main` with errors as one line."""
    cli.run(main, argv)


if __name__ == "__main__":
    cli_main()
