"""Evaluation helpers shared by the evaluation command lines (``experiments.eval_mnist``,
``eval_sweep``, ``eval_score_mnist``, ``eval_latent_mnist``): the MNIST arrays, the feature
classifier (trained once, cached in the workdir), the real reference images and FD floors, FID /
conditional accuracy / class histogram of samples, chunked sampling of a loaded run, bits/dim, and
writing the results (JSON, markdown, picture)."""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import ml_collections
import numpy as np

from experiments import cli, mnist_lib, mnist_sampling
from experiments.cli import ConfigError
from experiments.images import save_grid
from jaxdiff.compile_options import cpu_compiler_options
from jaxdiff.data import load_mnist
from jaxdiff.metrics import (class_histogram, classifier_accuracy, classify, conditional_accuracy,
                             feature_statistics, frechet_distance, load_classifier,
                             pixel_histogram_distance, pixel_statistics, precision_recall,
                             save_classifier, train_classifier, vlb_terms)
from jaxdiff.validation import read_json

__all__ = ["CLASSIFIER_FILE", "Reference", "log", "mnist_source", "load_mnist_arrays",
           "check_outputs", "load_samples_npz", "get_classifier",
           "workdir_classifier", "references", "evaluate_samples", "generate", "has_run",
           "load_diffusion", "eval_bpd", "write_json", "write_results"]

# The evaluation classifier's file in a workdir, where no --classifier_path is given.
CLASSIFIER_FILE = "mnist_classifier.msgpack"

SampleFn = Callable[[np.ndarray, jax.Array], np.ndarray]   # (labels [n], key) -> images [n,28,28,1]


def log(msg: str) -> None:
    """Progress on stdout, flushed."""
    print(f"[eval] {msg}", flush=True)


def mnist_source(workdir: Optional[str], data_dir: str = "") -> tuple[Optional[str], str, str]:
    """Where an evaluation of the run in ``workdir`` reads MNIST: ``(data_dir, source, origin)``.

    ``data_dir`` (``--data_dir``) when given; else the run's own ``data.data_dir`` and
    ``data.source`` from ``WORKDIR/config.json`` (every trainer writes them), so that an
    evaluation reads the data its run trained on (and does not fall back to a tfds download the
    run never needed); else ``(None, "auto", ...)``: :func:`jaxdiff.data.load_mnist`'s search.
    ``origin`` names the setting for messages.

    Raises:
      jaxdiff.validation.InvalidFileError: ``config.json`` is not valid JSON.
    """
    if data_dir:
        return data_dir, "auto", f"--data_dir {data_dir!r}"
    path = os.path.join(workdir, "config.json") if workdir else None
    if path and os.path.isfile(path):
        data = read_json(path)
        data = data.get("data") if isinstance(data, dict) else None
        if isinstance(data, dict):
            run_dir = str(data.get("data_dir") or "")
            source = str(data.get("source") or "auto")
            if run_dir or source != "auto":
                return (run_dir or None, source,
                        f"the run's data.data_dir {run_dir!r} / data.source {source!r} (from "
                        f"{path}; --data_dir overrides them)")
    return None, "auto", "--data_dir (not given: searched the default places)"


def load_mnist_arrays(split: str, data_dir: Optional[str] = None, *,
                      workdir: Optional[str] = None):
    """``images [N, 28, 28, 1]`` float32 in ``[-1, 1]``, ``labels [N]`` int32 (``jaxdiff.data``),
    from where :func:`mnist_source` says (``--data_dir``, else the run's ``config.json`` in
    ``workdir``, else the default search).

    Raises:
      ConfigError: the data cannot be found (naming ``--data_dir`` or the run's setting).
      jaxdiff.validation.InvalidFileError: a data file is corrupt (naming it).
    """
    directory, source, origin = mnist_source(workdir, data_dir or "")
    try:
        return load_mnist(split, directory, source=source, data_dir_name="--data_dir")
    except (FileNotFoundError, ImportError) as e:
        raise ConfigError(f"{origin}: {e}") from None


def check_outputs(workdir: str, classifier_path: str = "", **paths: str) -> None:
    """Checks, before any work, that an evaluation can write what it writes at the end: the
    results in ``workdir``; a ``--classifier_path`` that does not exist yet (the classifier is
    trained, then saved there); each of ``paths`` (``{flag name: path}``; an empty path is a
    default inside ``workdir``).

    Raises:
      ConfigError: naming the flag and the path (:func:`experiments.cli.check_writable`).
    """
    cli.check_writable("--workdir", workdir, directory=True)
    if classifier_path and not os.path.isfile(classifier_path):
        cli.check_writable("--classifier_path", classifier_path)
    for name, path in paths.items():
        if path:
            cli.check_writable(f"--{name}", path)


def load_samples_npz(path: str, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Saved samples for an evaluation (``--samples_npz``, as :mod:`experiments.sample` writes):
    ``images [N, 28, 28, 1]`` float and finite, ``labels [N]`` integers in
    ``[0, num_classes)``, ``N >= 2``.

    Raises:
      ConfigError: one line naming the file, the key and what was expected (a missing file or
        key, not an ``.npz``, a wrong shape or dtype, NaN/inf pixels, labels out of range).
    """
    what = ("expected images [N, 28, 28, 1] floats in [-1, 1] and labels [N] ints, as "
            "experiments.sample writes")
    where = f"--samples_npz {path}"
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: no such file")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:  # not a numpy file, truncated, pickled objects
        raise ConfigError(f"{where}: not a readable .npz archive ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:200]}); {what}") from None
    if not hasattr(archive, "files"):   # np.load gives an NpzFile for an .npz
        raise ConfigError(f"{where}: a single .npy array, not an .npz archive; {what}")
    with archive:
        missing = [k for k in ("images", "labels") if k not in archive.files]
        if missing:
            raise ConfigError(f"{where}: no key {missing[0]!r} (it holds {sorted(archive.files)})"
                              f"; {what}")
        try:
            images, labels = archive["images"], archive["labels"]
        except Exception as e:  # a truncated archive member, an object array
            raise ConfigError(f"{where}: cannot read its arrays ({type(e).__name__}: {e}); "
                              f"{what}") from None
    if images.ndim != 4 or images.shape[1:] != (28, 28, 1):
        raise ConfigError(f"{where}: key 'images' has shape {images.shape}, expected "
                          "[N, 28, 28, 1]")
    if not np.issubdtype(images.dtype, np.floating):
        raise ConfigError(f"{where}: key 'images' has dtype {images.dtype}, expected floats in "
                          "[-1, 1] (scale uint8 pixels with x / 127.5 - 1)")
    bad = int(np.size(images) - np.count_nonzero(np.isfinite(images)))
    if bad:
        raise ConfigError(f"{where}: key 'images' holds {bad} NaN or infinite values "
                          f"(of {images.size}); expected finite floats in [-1, 1]")
    n = len(images)
    if n < 2:
        raise ConfigError(f"{where}: key 'images' holds {n} images, expected at least 2 (FID)")
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"{where}: key 'labels' has shape {labels.shape} and dtype "
                          f"{labels.dtype}, expected [{n}] integers (one per image)")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ConfigError(f"{where}: key 'labels' holds values in [{labels.min()}, "
                          f"{labels.max()}], expected classes in [0, {num_classes})")
    return images, labels.astype(np.int32)


def get_classifier(path: str, train_data, test_data, *, seed: int, epochs: int):
    """Load the classifier at ``path``, or train it on ``train_data`` and save it there.

    Returns ``(params, info)`` with ``info`` holding the test accuracy and the training time."""
    if os.path.isfile(path):
        params, meta = load_classifier(path, with_metadata=True)
        log(f"loaded classifier {path}")
        info = {"path": path, "trained_now": False, **meta}
    else:
        log(f"training the classifier ({epochs} epochs on {len(train_data[0])} images)")
        t0 = time.time()
        params = train_classifier(*train_data, key=jax.random.key(seed), epochs=epochs,
                                  batch_size=128, log_fn=log)
        params = jax.block_until_ready(params)
        info = {"path": path, "trained_now": True, "train_time_s": round(time.time() - t0, 1),
                "epochs": epochs}
    t0 = time.time()
    info["test_accuracy"] = classifier_accuracy(params, *test_data)
    info["eval_time_s"] = round(time.time() - t0, 2)
    if info["trained_now"]:
        save_classifier(path, params, {k: v for k, v in info.items() if k != "trained_now"})
        log(f"saved classifier to {path}")
    log(f"classifier test accuracy {info['test_accuracy']:.4f}")
    return params, info


def workdir_classifier(workdir: str, classifier_path: str, train_data, test_data, *, seed: int,
                       epochs: int):
    """:func:`get_classifier` at ``classifier_path`` (``--classifier_path``) or, when that is
    empty, at ``WORKDIR/mnist_classifier.msgpack``: loaded, or trained on ``train_data`` and saved
    there. Returns ``(params, info)``."""
    path = classifier_path or os.path.join(workdir, CLASSIFIER_FILE)
    return get_classifier(path, train_data, test_data, seed=seed, epochs=epochs)


class Reference(NamedTuple):
    """``N`` real images to score ``N`` samples against (:func:`references`).

    Attributes:
      stats: ``(mu, sigma)`` of the classifier features of ``N`` test images (FD's reference).
      data: ``{"feats": [N, 128], "images": [N, 28, 28, 1]}``, those test images and features
        (:func:`evaluate_samples`' ``reference``).
      real: :func:`evaluate_samples` of ``N`` training images, with their labels, against them;
        ``real["fid"]`` is the FD floor at ``N`` (real against real).
    """

    stats: Any
    data: dict
    real: dict


def references(clf_params, train_data, test_data, sizes: Sequence[int], seed: int) -> dict:
    """``{N: Reference}`` for each ``N`` in ``sizes``: the first ``N`` test and the first ``N``
    training images of one seeded draw (``rng = np.random.default_rng(seed)``: a permutation of
    the test set, then one of the training set), so that every command line with the same seed
    compares with the same real images at the same ``N``."""
    rng = np.random.default_rng(seed)
    test_perm, train_perm = rng.permutation(len(test_data[0])), rng.permutation(len(train_data[0]))
    out = {}
    for n in sorted(set(int(m) for m in sizes)):
        test_images = test_data[0][test_perm[:n]]
        feats = classify(clf_params, test_images)[0]
        stats, data = feature_statistics(feats), {"feats": feats, "images": test_images}
        real = evaluate_samples(clf_params, train_data[0][train_perm[:n]],
                                train_data[1][train_perm[:n]], stats, reference=data)
        out[n] = Reference(stats, data, real)
    return out


def evaluate_samples(clf_params, images: np.ndarray, labels: Optional[np.ndarray],
                     ref_stats, num_classes: int = 10, reference: Optional[dict] = None) -> dict:
    """FID against ``ref_stats``; conditional accuracy if ``labels`` ([n] requested classes) is
    given, else the class histogram (fractions) and its largest deviation from uniform; the
    pixel statistics (``clean_background``, ``haze``, ``pixel_mean``:
    :func:`jaxdiff.metrics.pixel_statistics`). With ``reference = {"feats": [m, 128], "images":
    [m, 28, 28, 1]}`` (real test images and their classifier features) also ``precision`` and
    ``recall`` (k = 3) and ``pixel_hist_tv``, the intensity histogram's distance to the
    reference's."""
    feats, logits = classify(clf_params, images)
    out = {"n": int(len(images)), "fid": frechet_distance(*feature_statistics(feats), *ref_stats)}
    px = pixel_statistics(images)
    out.update(clean_background=px["clean_background"], haze=px["haze"], pixel_mean=px["mean"])
    if reference is not None:
        out["precision"], out["recall"] = precision_recall(reference["feats"], feats, k=3)
        out["pixel_hist_tv"] = pixel_histogram_distance(images, reference["images"])
    if labels is not None:
        out["conditional_accuracy"] = float(conditional_accuracy(logits, labels))
    else:
        hist = np.asarray(class_histogram(logits, normalize=True))
        out["class_histogram"] = [round(float(h), 4) for h in hist]
        out["histogram_max_deviation"] = float(np.max(np.abs(hist - 1.0 / num_classes)))
    return out


def generate(
    sample_fn: SampleFn, labels: np.ndarray, key: jax.Array, batch_size: int
) -> np.ndarray:
    """Calls ``sample_fn`` on chunks of ``labels`` (the last padded to ``batch_size``, one
    compilation); chunk ``i`` uses ``fold_in(key, i)``. Returns ``[n, 28, 28, 1]`` numpy."""
    out = []
    for i, start in enumerate(range(0, len(labels), batch_size)):
        chunk = labels[start:start + batch_size]
        pad = batch_size - len(chunk)
        padded = np.concatenate([chunk, np.full(pad, chunk[0], chunk.dtype)])
        out.append(np.asarray(sample_fn(padded, jax.random.fold_in(key, i)))[:len(chunk)])
        log(f"  sampled {start + len(chunk)}/{len(labels)}")
    return np.concatenate(out)


def has_run(workdir: str) -> bool:
    """Whether ``workdir`` holds a ``train_mnist`` run (``config.json`` + ``checkpoints/``)."""
    return (os.path.isfile(os.path.join(workdir, "config.json"))
            and os.path.isdir(os.path.join(workdir, "checkpoints")))


def load_diffusion(run: mnist_lib.Run, sampling: ml_collections.ConfigDict) -> dict:
    """A sampler over a loaded run (:func:`experiments.mnist_lib.load_run`), for the evaluations.

    Args:
      run: the loaded run; one restore can serve several samplers.
      sampling: a ``config.sampling``-shaped ConfigDict
        (:func:`experiments.mnist_sampling.sampling_config`).

    Returns:
      ``dict(sample_fn, sampler, apply, variables, schedule, prediction_type, null_label,
      num_classes)``: ``sample_fn(labels [n] int32, key, guidance_scale=None) -> images``
      samples the EMA params with ``sampler``
      (:func:`experiments.mnist_sampling.make_sampler`'s, built once) at ``guidance_scale``
      (None: ``sampling.guidance_scale``; another scale compiles nothing new, see
      :func:`experiments.mnist_sampling.make_sample_fn`); ``apply(variables, x, t, labels)`` is
      the model (for bits/dim).

    Raises:
      ConfigError: an invalid ``sampling`` field.
    """
    prediction_type = run.config.diffusion.prediction_type
    sampler = mnist_sampling.make_sampler(sampling, prediction_type, run.schedule)
    fn = mnist_sampling.make_sample_fn(run.model, run.schedule, run.mesh, sampling,
                                       prediction_type, sampler=sampler)

    def sample_fn(labels, key, guidance_scale=None):
        return mnist_sampling.sample_images(fn, run.ema_params, labels, key, run.mesh,
                                            guidance_scale)

    def apply(variables, x, t, labels):
        return run.model.apply(variables, x, t, labels=labels, train=False)

    num_classes = int(run.model.config.num_classes)
    return dict(sample_fn=sample_fn, sampler=sampler, apply=apply, variables=run.ema_params,
                schedule=run.schedule, prediction_type=prediction_type, null_label=num_classes,
                num_classes=num_classes)


def eval_bpd(apply, variables, schedule, images: np.ndarray, labels: np.ndarray, key: jax.Array, *,
             batch_size: int, prediction_type: str, variance_type: str) -> dict:
    """Mean of the variational bound (bits/dim) over ``images``, with its terms' means."""
    @functools.partial(jax.jit, compiler_options=cpu_compiler_options())
    def run(variables, x0, y, key):
        def model_fn(x, t):
            return apply(variables, x, t, y)

        return vlb_terms(model_fn, schedule, x0, key, prediction_type=prediction_type,
                         variance_type=variance_type)

    totals, priors, decoders = [], [], []
    n = len(images)
    for i, start in enumerate(range(0, n, batch_size)):
        x0, y = images[start:start + batch_size], labels[start:start + batch_size]
        pad = batch_size - len(x0)
        x0 = np.concatenate([x0, np.repeat(x0[:1], pad, 0)])
        y = np.concatenate([y, np.repeat(y[:1], pad, 0)])
        out = jax.device_get(run(variables, x0, y, jax.random.fold_in(key, i)))
        keep = slice(0, batch_size - pad)
        totals.append(out.total[keep]), priors.append(out.prior[keep])
        decoders.append(out.terms[keep, 0])
        running = np.concatenate(totals).mean()
        log(f"  bits/dim {start + batch_size - pad}/{n}: running mean {running:.4f}")
    totals = np.concatenate(totals)
    return {"n": int(n), "variance_type": variance_type, "bpd": float(totals.mean()),
            "bpd_stderr": float(totals.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
            "prior_bpd": float(np.concatenate(priors).mean()),
            "decoder_bpd": float(np.concatenate(decoders).mean())}


def write_json(path: str, results: dict, *, default: Optional[Callable] = None) -> None:
    """``results`` as indented JSON at ``path`` (``default``: ``json.dump``'s, for values JSON
    does not hold)."""
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=default)


def write_results(results: dict, table: str, *, json_path: str, md_path: Optional[str] = None,
                  grid: Optional[tuple] = None, json_default: Optional[Callable] = None) -> None:
    """An evaluation's outputs: ``grid = (images [M, 28, 28, 1] in [-1, 1], path, ncols)`` as a
    PNG (:func:`experiments.images.save_grid`), then ``results`` as JSON at ``json_path``
    (:func:`write_json`), the markdown ``table`` at ``md_path`` (when given), and the table on
    stdout."""
    if grid is not None:
        images, path, ncols = grid
        save_grid(images, path, ncols=ncols)
        log(f"wrote {path}")
    write_json(json_path, results, default=json_default)
    if md_path:
        with open(md_path, "w") as f:
            f.write(table)
    print(table)
