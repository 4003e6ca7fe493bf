r"""Sample quality of a trained MNIST run against sampler, steps and guidance scale: one table, one
picture.

    python -m experiments.eval_sweep --workdir runs/mnist
    python -m experiments.eval_sweep --workdir runs/mnist --num_samples 500 \
        --settings ddim:50:0,ddim:50:1,ddim:50:2,ddim:50:4 --out_png sweep.png

Each setting ``sampler:steps:guidance[:N]`` (``sampler`` any of
``jaxdiff.samplers.sampler_names()``, e.g. ``dpm_solver:20:2``; the guidance may carry an interval
of timesteps, ``ddpm:50:3@200-800``: guidance only at ``200 <= t <= 800``) draws ``N`` class-conditional
samples (labels cycling 0-9; ``--num_samples`` unless the setting names its own ``N``) from the
run's EMA params, from the same keys for every setting, and reports the Frechet distance (FD) to
``N`` MNIST test images in the feature space of ``experiments.eval_mnist``'s classifier, the
conditional accuracy (the fraction the classifier assigns to the requested digit), and the wall
time. FD is biased upwards at small ``N``, so the table also gives the real-vs-real floor (``N``
training vs ``N`` test images) at each ``N`` used: compare a setting with the floor at its ``N``,
never across ``N``. At ``N = 1000`` both move by more than 1 between draws of samples and real
images (measured: ``benchmarks/results/cpu/eval_sweep_long20k_draws.md``): ``--draws K`` repeats
each setting with seeds ``SEED .. SEED+K-1`` (each a new sampling key and new real subsets) and
reports the means, with FD and its floor as mean +- sd.

Writes ``WORKDIR/NAME.json``, ``WORKDIR/NAME.md`` (the markdown table) and a PNG (``--out_png``,
default ``WORKDIR/NAME.png``), ``NAME`` being ``--name`` (default ``sweep``): one row per setting,
the first two samples of each digit.
The classifier is ``WORKDIR/mnist_classifier.msgpack`` (or ``--classifier_path``), trained there
first if missing, as in ``eval_mnist``. ``--ddim_clip`` applies to the DDIM settings (an error when
no setting is DDIM).
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Optional, Sequence

import jax
import numpy as np
from absl import flags, logging

from experiments import cli, mnist_lib, mnist_sampling
from experiments.cli import ConfigError
from experiments.evaluation import (check_outputs, evaluate_samples, generate, has_run,
                                    load_diffusion, load_mnist_arrays, log, references,
                                    workdir_classifier, write_results)
from jaxdiff.samplers import sampler_names, sampler_options

PROG = "python -m experiments.eval_sweep"
DEFAULT_SETTINGS = ("ddpm:1000:2:100,ddim:10:2,ddim:20:2,ddim:50:2,ddim:100:2,"
                    "ddim:50:0,ddim:50:1,ddim:50:4")

__all__ = ["DEFAULT_SETTINGS", "parse_settings", "markdown", "main", "cli_main"]


def parse_settings(text: str, default_n: int) -> list[dict]:
    """``"ddim:50:2,ddpm:1000:2:100,euler/spacing=leading:10:2"`` -> ``[{sampler, steps,
    guidance_scale, n, options, label}, ...]``: a sampler may carry options of its own after
    ``/`` (``name/key=value/key=value``; see :func:`experiments.cli.parse_sampler_options`), the
    guidance an interval after ``@`` (``3@200-800``: ``guidance_interval = (200, 800)``).

    Raises:
      ConfigError: a setting that does not parse, an unknown sampler, steps < 1, guidance < 0 or
        ``N`` outside ``[10, 10000]``.
    """
    out = []
    names = sampler_names()
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.split(":")
        name, *opts = parts[0].split("/")
        options = cli.parse_sampler_options(opts)
        if len(parts) not in (3, 4) or name not in names:
            raise ConfigError(f"--settings: expected sampler:steps:guidance[:N] with sampler one "
                              f"of {names}, got {item!r}")
        w_text, at, interval_text = parts[2].partition("@")
        try:
            steps, w = int(parts[1]), float(w_text)
            interval = (tuple(float(v) for v in interval_text.split("-", 1)) if at else None)
            if interval is not None and len(interval) != 2:
                raise ValueError
            n = int(parts[3]) if len(parts) == 4 else default_n
        except ValueError:
            raise ConfigError(f"--settings: steps and N must be ints, guidance a float (or "
                              f"w@t_lo-t_hi): {item!r}") from None
        if steps < 1 or w < 0 or not 10 <= n <= 10000:
            raise ConfigError(f"--settings: need steps >= 1, guidance >= 0, 10 <= N <= 10000: "
                              f"{item!r}")
        out.append({"sampler": name, "steps": steps, "guidance_scale": w, "n": n,
                    "options": options, "label": parts[0], "guidance_interval": interval})
    if not out:
        raise ConfigError("--settings: no settings given")
    return out


# Sample statistics each row carries besides FD and accuracy (experiments.evaluation).
_SAMPLE_STATS = ("precision", "recall", "clean_background", "haze", "pixel_hist_tv")


def _mean_sd(values: Sequence[float], digits: int = 2) -> str:
    """``"7.42"`` for one value, ``"7.42 +- 0.63"`` (mean, sample sd) for several."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} +- {np.std(values, ddof=1):.{digits}f}"


def _mean_rows(rows: Sequence[dict], skip: Sequence[str] = ()) -> dict:
    """The mean of each numeric field of ``rows`` (the first row's keys, less ``skip``); one row
    is returned as it is (less ``skip``)."""
    if len(rows) == 1:
        return {k: v for k, v in rows[0].items() if k not in skip}
    return {k: float(np.mean([r[k] for r in rows])) for k, v in rows[0].items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _stats(r: dict) -> str:
    """``precision | recall | clean background | haze`` cells (empty where absent)."""
    return " | ".join(f"{r[k]:.3f}" if k in r else ""
                      for k in ("precision", "recall", "clean_background", "haze"))


def _guidance(r: dict) -> str:
    """``2`` or, with an interval, ``2 @ [200, 800]``."""
    interval = r.get("guidance_interval")
    if interval is None:
        return f"{r['guidance_scale']:g}"
    return f"{r['guidance_scale']:g} @ [{interval[0]:g}, {interval[1]:g}]"


def _by_nfe(rows: list) -> list:
    """Where the sweep compares samplers at several NFE (one guidance scale and N), the same rows
    as a sampler x NFE table of "FD / accuracy" (empty otherwise)."""
    if (len({(r["guidance_scale"], r["n"], str(r.get("guidance_interval"))) for r in rows}) != 1
            or "nfe" not in rows[0]):
        return []
    samplers = list(dict.fromkeys(r.get("label", r["sampler"]) for r in rows))
    # Columns: the first sampler's NFE values; a row at another NFE (Heun's 2n - 1) goes in the
    # nearest column with its own NFE in parentheses.
    budgets = sorted({r["nfe"] for r in rows if r.get("label", r["sampler"]) == samplers[0]})
    if len(samplers) < 2 or len(budgets) < 2:
        return []
    cell = {}
    for r in rows:
        b = min(budgets, key=lambda b: abs(b - r["nfe"]))
        own = "" if b == r["nfe"] else f" ({r['nfe']})"
        cell[(r.get("label", r["sampler"]), b)] = (f"{r['fd']:.2f} / "
                                                   f"{r['conditional_accuracy']:.3f}{own}")
    out = ["FD / conditional accuracy by model evaluations (NFE; a sampler's own NFE in "
           f"parentheses where it differs), guidance {rows[0]['guidance_scale']:g}, "
           f"N = {rows[0]['n']}:", "",
           "| sampler | " + " | ".join(f"NFE {b}" for b in budgets) + " |",
           "| --- |" + " ---: |" * len(budgets)]
    for name in samplers:
        out.append(f"| {name} | " + " | ".join(cell.get((name, b), "") for b in budgets) + " |")
    return out + [""]


def markdown(results: dict) -> str:
    """The sweep's results as a markdown table, with the floors and the run's step."""
    clf = results["classifier"]
    lines = [
        "| sampler | steps | NFE | guidance | N | FD (floor at N) | conditional accuracy | "
        "precision | recall | clean background | haze | time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    floors, floor_draws = results["floors"], results.get("floor_draws")
    for r in results["settings"]:
        n = str(r["n"])
        if "fd_sd" in r and floor_draws:
            fd = f"{r['fd']:.2f} +- {r['fd_sd']:.2f} ({_mean_sd(floor_draws[n])})"
        else:
            fd = f"{r['fd']:.2f} ({floors[n]:.2f})"
        lines.append(
            f"| {r.get('label', r['sampler']).upper()} | {r['steps']} | {r.get('nfe', '')} | "
            f"{_guidance(r)} | {r['n']} | "
            f"{fd} | {r['conditional_accuracy']:.3f} | "
            f"{_stats(r)} | {r['time_s']:.0f} |"
        )
    for n, r in sorted(results.get("real", {}).items(), key=lambda kv: int(kv[0])):
        lines.append(f"| (training images) | | | | {n} | {r['fid']:.2f} | "
                     f"{r['conditional_accuracy']:.3f} | {_stats(r)} | |")
    lines.append("")
    if floor_draws:
        k = len(next(iter(floor_draws.values())))
        seed = results.get("args", {}).get("seed", 0)
        lines += [f"Means over {k} draws (seeds {seed}-{seed + k - 1}: each a new sampling key "
                  "and new real subsets); FD and its floor as mean +- sd, the other columns "
                  "as means; time per draw.", ""]
    lines += _by_nfe(results["settings"])
    if results.get("args", {}).get("ddim_clip") == "diffusers":
        lines.append("DDIM clipping: diffusers' form (clipped x0, the model's unclipped eps).")
    lines.append(f"Classifier test accuracy {clf['test_accuracy']:.4f}; run "
                 f"{results['workdir']} at step {results['step']}.")
    return "\n".join(lines) + "\n"


def _define(fv: flags.FlagValues, argv: list) -> None:
    del argv
    d = dict(flag_values=fv)
    flags.DEFINE_string("workdir", None, "a train_mnist workdir with a checkpoint", **d)
    flags.DEFINE_string("settings", DEFAULT_SETTINGS, "comma-separated sampler:steps:guidance[:N]",
                        **d)
    flags.DEFINE_integer("num_samples", 300, "N where a setting names none", **d)
    flags.DEFINE_integer("batch_size", 300, "sampling batch", **d)
    flags.DEFINE_string("classifier_path", "", "classifier msgpack (default "
                        "WORKDIR/mnist_classifier.msgpack; trained there if missing)", **d)
    flags.DEFINE_integer("classifier_epochs", 3, "epochs if the classifier is trained", **d)
    flags.DEFINE_string("data_dir", "", "MNIST IDX directory (default: the run's data.data_dir, "
                        "from WORKDIR/config.json; else jaxdiff.data's search)",
                        **d)
    flags.DEFINE_string("out_png", "", "the picture (default WORKDIR/NAME.png)", **d)
    flags.DEFINE_integer("seed", 0, "seed of the draws", **d)
    flags.DEFINE_integer("draws", 1, "independent draws per setting (seeds SEED..SEED+DRAWS-1: "
                         "each a new sampling key and new real subsets); the table gives means "
                         "+- sd", **d)
    flags.DEFINE_string("name", "sweep", "base name of the json/md/png written to the workdir", **d)
    flags.DEFINE_enum("ddim_clip", None, list(mnist_sampling.DDIM_CLIP_FORMS),
                      "DDIM settings with clipping: re-derive eps from the clipped x0 (consistent, "
                      "the default), or keep the model's eps as diffusers' DDIMScheduler does by "
                      "default", **d)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Parses ``argv`` (without the program name) and runs the sweep; returns the results dict
    (also written as JSON, markdown and a PNG).

    Raises:
      ConfigError: an invalid flag or setting (every setting's sampler is built, and so checked,
        before any sampling).
    """
    fv = cli.parse_flags(_define, [] if argv is None else argv, PROG, __doc__)
    if not fv.workdir:
        raise ConfigError("--workdir is required")
    settings = parse_settings(fv.settings, fv.num_samples)
    if fv.draws < 1:
        raise ConfigError(f"--draws must be >= 1, got {fv.draws}")
    if fv.batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {fv.batch_size}")
    if not fv.name or os.sep in fv.name or fv.name.startswith("."):
        raise ConfigError(f"--name must be a plain file name (no '{os.sep}', not hidden), got "
                          f"{fv.name!r}")
    takes_clip = [s for s in settings
                  if "use_clipped_model_output" in sampler_options(s["sampler"])]
    if fv.ddim_clip is not None and not takes_clip:
        raise ConfigError(f"--ddim_clip applies to DDIM settings; none of {fv.settings!r} is one")
    if not has_run(fv.workdir):
        raise ConfigError(f"--workdir {fv.workdir}: no train_mnist run (config.json + "
                          "checkpoints/)")
    check_outputs(fv.workdir, fv.classifier_path, out_png=fv.out_png)
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    loaded = mnist_lib.load_run(fv.workdir)   # restored once, shared by every setting's sampler
    runs, programs = [], {}
    for s in settings:   # every sampler built (and checked) before anything is computed
        clip_form = fv.ddim_clip if s in takes_clip else None
        sampling = mnist_sampling.sampling_config(
            s["sampler"], s["steps"], s["guidance_scale"], clip_x0=loaded.config.sampling.clip_x0,
            ddim_clip=clip_form, options=s["options"], guidance_interval=s.get("guidance_interval"))
        runs.append(load_diffusion(loaded, sampling))
        # Settings that differ only in the guidance scale share one sample function: the scale
        # is an argument of its program (traced), so a new scale compiles nothing.
        same = json.dumps([s["sampler"], s["steps"], s["options"], clip_form,
                           s.get("guidance_interval")], sort_keys=True, default=str)
        runs[-1]["sample_fn"] = programs.setdefault(same, runs[-1]["sample_fn"])
        # Model evaluations per sample (Heun and KDPM2 make two per step).
        s["nfe"] = runs[-1]["sampler"].model_evaluations(loaded.schedule, s["steps"])
    ckpts = [int(d) for d in os.listdir(os.path.join(fv.workdir, "checkpoints")) if d.isdigit()]
    train = load_mnist_arrays("train", fv.data_dir, workdir=fv.workdir)
    test = load_mnist_arrays("test", fv.data_dir, workdir=fv.workdir)
    most = max(s["n"] for s in settings)
    if most > min(len(test[0]), len(train[0])):
        raise ConfigError(f"--settings/--num_samples: N={most} exceeds the {len(test[0])} test "
                          "images")
    clf, clf_info = workdir_classifier(fv.workdir, fv.classifier_path, train, test, seed=fv.seed,
                                       epochs=fv.classifier_epochs)

    sizes = [s["n"] for s in settings]
    seeds = [fv.seed + d for d in range(fv.draws)]
    refs = {seed: references(clf, train, test, sizes, seed) for seed in seeds}
    floor_draws = {str(n): [float(refs[seed][n].real["fid"]) for seed in seeds]
                   for n in sorted(set(sizes))}
    floors = {n: float(np.mean(v)) for n, v in floor_draws.items()}
    # the reference row: N training images scored like samples (means over the draws)
    real_rows = {str(n): _mean_rows([refs[seed][n].real for seed in seeds])
                 for n in sorted(set(sizes))}
    for n, v in floor_draws.items():
        log(f"floor (train vs test) at N={n}: {_mean_sd(v, 3)}")

    rows, strips = [], []
    for s, run in zip(settings, runs):
        labels = (np.arange(s["n"]) % run["num_classes"]).astype(np.int32)
        log(f"{s['label']}-{s['steps']}, guidance {_guidance(s)}, N={s['n']}")
        draws = []
        for seed in seeds:
            t0 = time.time()
            images = generate(functools.partial(run["sample_fn"],
                                                guidance_scale=s["guidance_scale"]),
                              labels, jax.random.key(seed), min(fv.batch_size, s["n"]))
            elapsed = time.time() - t0
            ref = refs[seed][s["n"]]
            r = evaluate_samples(clf, images, labels, ref.stats, reference=ref.data)
            draws.append({"seed": seed, "fd": float(r["fid"]),
                          "floor": float(ref.real["fid"]),
                          "conditional_accuracy": r["conditional_accuracy"],
                          **{k: r[k] for k in _SAMPLE_STATS}, "time_s": round(elapsed, 1)})
            if seed == seeds[0]:
                order = np.concatenate([np.flatnonzero(labels == d)[:2]
                                        for d in range(run["num_classes"])])
                strips.append(images[order])
            if len(seeds) > 1:
                log(f"  seed {seed}: FD {draws[-1]['fd']:.3f} (floor {draws[-1]['floor']:.3f}), "
                    f"accuracy {draws[-1]['conditional_accuracy']:.3f}, {elapsed:.0f} s")
        row = {**s, **_mean_rows(draws, skip=("seed", "floor"))}
        if len(seeds) > 1:
            row.update(fd_sd=float(np.std([d["fd"] for d in draws], ddof=1)), draws=draws)
        rows.append(row)
        log(f"  FD {_mean_sd([d['fd'] for d in draws], 3)}, accuracy "
            f"{row['conditional_accuracy']:.3f}, {row['time_s']:.0f} s per draw")

    results = {"workdir": fv.workdir, "step": max(ckpts, default=-1),
               "classifier": clf_info, "floors": floors, "settings": rows, "real": real_rows,
               "args": fv.flag_values_dict()}
    if len(seeds) > 1:
        results["floor_draws"] = floor_draws
    out_png = fv.out_png or os.path.join(fv.workdir, f"{fv.name}.png")
    write_results(results, markdown(results),
                  json_path=os.path.join(fv.workdir, f"{fv.name}.json"),
                  md_path=os.path.join(fv.workdir, f"{fv.name}.md"),
                  grid=(np.concatenate(strips), out_png, 2 * runs[0]["num_classes"]),
                  json_default=str)
    return results


def cli_main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m experiments.eval_sweep``: :func:`main` with errors as one line, exit 0."""
    cli.run(main, argv)


if __name__ == "__main__":
    cli_main()
