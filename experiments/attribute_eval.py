"""Do the adjectives control the image? The attribute-separation table of
``experiments.eval_latent_mnist``.

For each pair of opposite adjectives (:data:`PAIRS`: "thin" / "thick" on stroke thickness,
"small" / "large" on bounding-box size, "upright" / "slanted" on ``|slant|``), ``N`` images per
adjective are generated from the held-out template :data:`TEMPLATE` (``"a thick digit seven"``;
digits balanced, ``i % 10``; the digit's name or numeral at random), cropped to 28x28, and
measured (:mod:`jaxdiff.metrics.digit_attributes`). Each adjective gets the mean and standard
deviation of its attribute, and each pair its **separation**: the difference of the means in
units of the pooled standard deviation (``(mean_high - mean_low) / sqrt((sd_low^2 +
sd_high^2) / 2)``, Cohen's d) and the AUC (the probability that a "high" image measures more than
a "low" one, ties counted half). The same is given for real MNIST test images, binned by the
run's thresholds (the per-class tertiles of its training set): the lowest third against the
highest third of each digit, what a model whose words were perfectly true would reach.

The unseen composition (:data:`COMPOSITION`, "a thick slanted digit seven": a thickness word and a
slant word never share a training caption, ``experiments.mnist_prompts.UNSEEN_PAIRS``) is
generated likewise and measured on both attributes: its separation from "thin" on thickness and
from "upright" on ``|slant|``, beside those of "thick" and "slanted" alone.

The means and deviations pool the ten digits (the same balanced mix for every adjective, and for
the real images), so a separation includes the spread between digits in its deviation; the
table's "slant" is the magnitude ``|slant|`` in degrees, thickness is in pixels and size in
pixels^2.

Images come from :func:`experiments.latent_pipeline.sample`, the prompt set ``i`` from
``fold_in(key(seed), 1000 + i)``.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import numpy as np

from experiments import latent_data, latent_pipeline, mnist_prompts
from jaxdiff.metrics import bin_values, binning_values, classify, measure_attributes

__all__ = ["PAIRS", "COMPOSITION", "TEMPLATE", "attribute_prompts", "separation",
           "real_separation", "evaluate_attributes", "markdown"]

# (attribute, the column of jaxdiff.metrics.binning_values, low word, high word)
PAIRS = (("thickness", 0, "thin", "thick"), ("size", 1, "small", "large"),
         ("slant", 2, "upright", "slanted"))   # slant, degrees: signed or |slant| (the run's)
COMPOSITION = ("thick", "slanted")
_SLANT_NAMES = {"signed": "signed (degrees, positive leaning right)",
                "magnitude": "|slant| (degrees)"}
TEMPLATE = "a {adj} digit {d}"   # a held-out template (experiments.mnist_prompts)


def attribute_prompts(words: Sequence[str], n: int, seed: int):
    """``(prompts [n], labels [n] int32)``: :data:`TEMPLATE` with ``words`` for digits ``i %
    10``, the digit's name or numeral drawn from ``seed``."""
    labels = (np.arange(n) % 10).astype(np.int32)
    forms = np.random.default_rng(seed).integers(0, mnist_prompts.NUM_FORMS, n)
    return [mnist_prompts.caption(TEMPLATE, int(d), int(f), tuple(words))
            for d, f in zip(labels, forms)], labels


def _stats(x: np.ndarray) -> dict:
    x = np.asarray(x, np.float64)
    return {"n": int(len(x)), "mean": float(x.mean()) if len(x) else float("nan"),
            "sd": float(x.std(ddof=1)) if len(x) > 1 else float("nan")}


def separation(low: np.ndarray, high: np.ndarray) -> dict:
    """``{"low", "high": {"n", "mean", "sd"}, "separation", "auc"}`` of two samples of one
    attribute: Cohen's d of ``high`` over ``low`` and ``P(high > low)`` (ties half)."""
    lo, hi = np.sort(np.asarray(low, np.float64)), np.asarray(high, np.float64)
    a, b = _stats(lo), _stats(hi)
    pooled = np.sqrt((a["sd"] ** 2 + b["sd"] ** 2) / 2.0)
    d = (b["mean"] - a["mean"]) / pooled if pooled > 0 else float("nan")
    below = np.searchsorted(lo, hi, "left")
    ties = np.searchsorted(lo, hi, "right") - below
    auc = float((below + 0.5 * ties).sum() / (len(lo) * len(hi))) if len(lo) and len(hi) else (
        float("nan"))
    return {"low": a, "high": b, "separation": float(d), "auc": auc}


def real_separation(images: np.ndarray, labels: np.ndarray, thresholds: np.ndarray,
                    slant: str = "magnitude") -> dict:
    """``{attribute: separation(...)}`` of real images (``[N, 28, 28(, 1)]`` in ``[-1, 1]``):
    each :data:`PAIRS` attribute's lowest bin against its highest (``thresholds [10, 3, 2]`` and
    ``slant``, the run's binning: :func:`jaxdiff.metrics.binning_values`)."""
    values = binning_values(measure_attributes(images), slant)
    bins = bin_values(values, labels, thresholds)
    return {name: separation(values[bins[:, col] == 0, col], values[bins[:, col] == 2, col])
            for name, col, _, _ in PAIRS}


def evaluate_attributes(sd, thresholds: np.ndarray, real_images: np.ndarray,
                        real_labels: np.ndarray, *, n: int = 300, seed: int = 0,
                        num_steps: int = 25, guidance_scale: float = 3.0, batch_size: int = 250,
                        classifier=None, log: Callable[[str], None] = print,
                        slant: str = "magnitude") -> dict:
    """The table's numbers: ``{"pairs": {attribute: {"low_word", "high_word",
    "generated": separation(...), "real": separation(...)}}, "composition": {"words",
    "prompt_example", "n", attribute: {"mean", "sd", "vs": {word: separation(...)}}},
    "accuracy": {words: accuracy} (with ``classifier``), "settings": {...}}``; ``sd`` a
    :class:`jaxdiff.pipelines.StableDiffusion`; ``slant`` the run's slant binning
    (:func:`experiments.mnist_prompts.slant_binning`).

    Raises:
      ValueError: ``n < 2``.
    """
    if n < 2:
        raise ValueError(f"n must be >= 2 (a standard deviation per adjective), got {n}")
    key = jax.random.key(seed)
    sets = [(w,) for _, _, lo, hi in PAIRS for w in (lo, hi)] + [COMPOSITION]
    values, accuracy, examples = {}, {}, {}
    for i, words in enumerate(sets):
        prompts, labels = attribute_prompts(words, n, seed + i)
        t0 = time.time()
        imgs = latent_data.crop_images(latent_pipeline.sample(
            sd, prompts, jax.random.fold_in(key, 1000 + i), num_steps=num_steps,
            guidance_scale=guidance_scale, batch_size=min(batch_size, n)))
        values[words] = binning_values(measure_attributes(imgs[..., :1]), slant)
        examples[words] = prompts[0]
        if classifier is not None:
            _, logits = classify(classifier, imgs[..., :1])
            accuracy[" ".join(words)] = float((np.argmax(logits, -1) == labels).mean())
        log(f"attributes: {' '.join(words)!r}: {n} samples in {time.time() - t0:.0f} s")
    real = real_separation(real_images, real_labels, thresholds, slant)
    pairs = {name: {"low_word": lo, "high_word": hi, "example_prompts": [examples[(lo,)],
                                                                       examples[(hi,)]],
                    "generated": separation(values[(lo,)][:, col], values[(hi,)][:, col]),
                    "real": real[name]}
             for name, col, lo, hi in PAIRS}
    comp = {"words": list(COMPOSITION), "prompt_example": examples[COMPOSITION], "n": n}
    for name, col, lo, hi in PAIRS:
        word = next((w for w in COMPOSITION if w in (lo, hi)), None)
        if word is None:
            continue
        other = lo if word == hi else hi
        mine = values[COMPOSITION][:, col]
        comp[name] = dict(_stats(mine), vs={
            other: separation(values[(other,)][:, col], mine) if word == hi else
            separation(mine, values[(other,)][:, col]),
            word: separation(values[(word,)][:, col], mine)})
    return {"pairs": pairs, "composition": comp, "accuracy": accuracy,
            "settings": {"n": int(n), "seed": int(seed), "template": TEMPLATE,
                         "num_steps": int(num_steps), "guidance_scale": float(guidance_scale),
                         "real_n": int(len(real_images)), "slant": slant}}


def _ms(s: dict) -> str:
    return f"{s['mean']:.2f} ± {s['sd']:.2f}"


def markdown(res: dict) -> str:
    """The table (and the composition's) as markdown lines."""
    s = res["settings"]
    lines = [f"Attribute separation: N = {s['n']} samples per adjective ('{s['template']}', "
             f"digits balanced), measured on the 28x28 crop; real: MNIST test images "
             f"(N = {s['real_n']}), lowest vs highest third of their digit by the run's "
             "thresholds. Separation: difference of means in pooled standard deviations. "
             f"Slant: {_SLANT_NAMES[s.get('slant', 'magnitude')]}.", "",
             "| attribute | adjectives | low: mean ± sd | high: mean ± sd | separation | AUC "
             "| real low | real high | real separation | real AUC |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, p in res["pairs"].items():
        g, r = p["generated"], p["real"]
        lines.append(f"| {name} | {p['low_word']} / {p['high_word']} | {_ms(g['low'])} | "
                     f"{_ms(g['high'])} | {g['separation']:.2f} | {g['auc']:.3f} | "
                     f"{_ms(r['low'])} | {_ms(r['high'])} | {r['separation']:.2f} | "
                     f"{r['auc']:.3f} |")
    c = res["composition"]
    lines += ["", f"Unseen composition '{c['prompt_example']}' (a thickness word and a slant "
              "word never share a training caption), N = " + str(c["n"]) + ":", "",
              "| attribute | mean ± sd | separation from the opposite word | from the word alone "
              "|", "| --- | ---: | ---: | ---: |"]
    for name, col, lo, hi in PAIRS:
        if name not in c:
            continue
        word = next(w for w in c["words"] if w in (lo, hi))
        other = lo if word == hi else hi
        vs = c[name]["vs"]
        lines.append(f"| {name} | {_ms(c[name])} | {vs[other]['separation']:.2f} (vs "
                     f"'{other}') | {vs[word]['separation']:.2f} (vs '{word}') |")
    if res.get("accuracy"):
        lines += ["", "Classifier accuracy on these prompts: " + ", ".join(
            f"'{k}' {v:.3f}" for k, v in res["accuracy"].items()) + "."]
    return "\n".join(lines) + "\n"
