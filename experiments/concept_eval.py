"""Evaluating a taught concept ("boxed" digits, :mod:`experiments.boxed_concept`) on the
text-to-MNIST model: the same prompts and seeds through a base model and a fine-tuned one
(DreamBooth-LoRA, or full fine-tuning), scored by the box detector and the MNIST classifier.

Three prompt sets, ``N`` prompts each, digits balanced (``i % len(digits)``):

- ``learnt``: concept prompts (``"the digit seven boxed"``) on the digits of the concept images;
- ``composition``: concept prompts on every other digit (never seen boxed);
- ``prior``: plain prompts from the held-out templates (``experiments.mnist_prompts``), all
  ten digits: what the fine-tuning must not change.

Each set reports the fraction of images with the box (:func:`experiments.boxed_concept.has_box`
on the model's full 32x32 image) and the classifier's accuracy on the intended digit (on the
centred 28x28 crop, as ``experiments.eval_latent_mnist`` scores, with the box's pixels set to
the background first: the classifier never saw a box). :data:`TARGETS` are the issue's targets
for the fine-tuned model; :func:`check_targets` compares.

Images come from :func:`experiments.latent_pipeline.sample` (``jaxdiff.pipelines.generate`` in
batches, batch ``i`` drawn from ``fold_in(key(seed + set index), i)``): every model gets the
same initial noise for the same prompt, so a grid of base against fine-tuned images compares
like with like.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Callable, Dict, Mapping, Optional, Sequence

import jax
import numpy as np

from experiments import boxed_concept, latent_data, latent_pipeline, mnist_prompts
from jaxdiff.metrics import classify

__all__ = ["SETS", "TARGETS", "prompt_sets", "classifier_view", "score_images",
           "detector_check", "evaluate_concept", "check_targets", "save_comparison_grid",
           "machine_info", "markdown"]

SETS = ("learnt", "composition", "prior")
# The targets, for the fine-tuned model: (set, metric, "min" | "max" | "max_drop", value).
TARGETS = (
    ("learnt", "box_rate", "min", 0.9),
    ("composition", "box_rate", "min", 0.9),
    ("composition", "accuracy", "min", 0.9),
    ("prior", "box_rate", "max", 0.05),
    ("prior", "accuracy", "max_drop", 0.02),
)


def _balanced(digits: Sequence[int], n: int) -> np.ndarray:
    return np.asarray([digits[i % len(digits)] for i in range(n)], np.int32)


def prompt_sets(concept_digits: Sequence[int], n: int, seed: int,
                word_position: str = "after") -> Dict[str, dict]:
    """``{set: {"prompts": [n] str, "labels": [n] int32, "digits": [...]}}`` for :data:`SETS`,
    deterministic in ``seed``; the concept sets' prompts with the word ``word_position``
    (:func:`experiments.boxed_concept.concept_templates`).

    Raises:
      ValueError: ``n < 1``, ``concept_digits`` empty, out of range or all ten digits (no
        digit is left for ``composition``), or a bad ``word_position``.
    """
    boxed_concept.concept_templates(word_position)
    digits = boxed_concept.parse_digits(",".join(str(int(d)) for d in concept_digits),
                                      "concept_digits")
    others = tuple(d for d in range(10) if d not in digits)
    if not others:
        raise ValueError("concept_digits must leave at least one digit for the composition set")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = {}
    for i, (name, ds) in enumerate((("learnt", digits), ("composition", others),
                                    ("prior", tuple(range(10))))):
        labels = _balanced(ds, n)
        if name == "prior":
            prompts = mnist_prompts.sample_prompts(labels, jax.random.key(seed + i), "heldout")
        else:
            prompts = boxed_concept.sample_concept_prompts(labels, seed + i, word_position)
        out[name] = {"prompts": prompts, "labels": labels, "digits": list(ds)}
    return out


def classifier_view(images: np.ndarray) -> np.ndarray:
    """What the MNIST classifier scores: ``[N, S, S, C]`` in ``[-1, 1]`` (the model's frame) ->
    ``[N, 28, 28, 1]``: grayscale, the box's rows and columns
    (:func:`experiments.boxed_concept.box_lines`) set to the background ``-1``, the centred 28x28
    crop (:func:`experiments.latent_data.crop_images`)."""
    g = boxed_concept.to_gray01(images) * 2.0 - 1.0
    lines = [k for k in boxed_concept.box_lines(g.shape[1]) if 0 <= k < g.shape[1]]
    g = g.copy()
    g[:, lines, :] = -1.0
    g[:, :, lines] = -1.0
    return latent_data.crop_images(g[..., None])


def score_images(images: np.ndarray, labels: np.ndarray, classifier=None, *,
                 threshold: float = boxed_concept.BOX_THRESHOLD) -> dict:
    """One set's row: ``n``, ``box_rate`` (the fraction with :func:`boxed_concept.has_box`),
    ``box_score_mean``, and, with ``classifier`` (``jaxdiff.metrics`` params), ``accuracy`` on
    ``labels`` (:func:`classifier_view`); per digit, ``box_rate_by_digit`` /
    ``accuracy_by_digit`` (``{digit: value}``).

    Args:
      images: ``[N, S, S, C]`` in ``[-1, 1]``.
      labels: ``[N]`` the intended digits.

    Raises:
      ValueError: naming ``labels`` (not one per image) or ``images``.
    """
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(images):
        raise ValueError(f"labels must hold one digit per image ({len(images)}), got "
                         f"{len(labels)}")
    scores = boxed_concept.box_scores(images)
    boxed = scores > threshold
    row = {"n": int(len(images)), "box_rate": float(boxed.mean()),
           "box_score_mean": float(scores.mean()),
           "box_rate_by_digit": {int(d): float(boxed[labels == d].mean())
                                 for d in np.unique(labels)}}
    if classifier is not None:
        _, logits = classify(classifier, classifier_view(images))
        right = np.argmax(logits, -1) == labels
        row["accuracy"] = float(right.mean())
        row["accuracy_by_digit"] = {int(d): float(right[labels == d].mean())
                                    for d in np.unique(labels)}
    return row


def detector_check(images28: np.ndarray, n: int, seed: int, *, sd=None,
                   threshold: float = boxed_concept.BOX_THRESHOLD) -> dict:
    """The detector on real digits: ``n`` images of ``images28`` (``[M, 28, 28, 1]``, e.g. MNIST
    test, ``M >= 2n``) padded to the frame and boxed, ``n`` others not; with ``sd`` also after a
    round trip through its VAE (encode, posterior mean, decode: the blur of generated images).
    Returns ``{"n", "threshold", "real": {"boxed_rate", "unboxed_rate", "accuracy"},
    "vae": {...}}``.

    Raises:
      ValueError: fewer than ``2n`` images.
    """
    if len(images28) < 2 * n:
        raise ValueError(f"detector_check needs {2 * n} images, got {len(images28)}")
    idx = np.random.default_rng(seed).permutation(len(images28))[:2 * n]
    plain = latent_data.pad_images(np.asarray(images28)[idx], boxed_concept.FRAME)
    pos, neg = boxed_concept.draw_box(plain[:n]), plain[n:]
    out = {"n": int(n), "threshold": float(threshold)}

    def rates(p, q):
        tp = float(boxed_concept.has_box(p, threshold).mean())
        fp = float(boxed_concept.has_box(q, threshold).mean())
        return {"boxed_rate": tp, "unboxed_rate": fp, "accuracy": (tp + 1.0 - fp) / 2.0,
                "boxed_score_min": float(boxed_concept.box_scores(p).min()),
                "unboxed_score_max": float(boxed_concept.box_scores(q).max())}

    out["real"] = rates(pos, neg)
    if sd is not None:
        rt = _vae_round_trip(sd)
        out["vae"] = rates(rt(pos), rt(neg))
    return out


def _vae_round_trip(sd) -> Callable[[np.ndarray], np.ndarray]:
    from jaxdiff.models import AutoencoderKL

    model = AutoencoderKL(sd.vae_config)
    c = sd.vae_config.in_channels
    fn = jax.jit(lambda x: model.apply({"params": sd.params["vae"]}, x)[0])

    def run(images):
        x = np.repeat(images, c, axis=-1) if images.shape[-1] != c else images
        return np.concatenate([np.asarray(fn(x[i:i + 250])) for i in range(0, len(x), 250)])
    return run


def negative_prompts(prompts: Sequence[str], word: str) -> Optional[list]:
    """``word`` as the negative prompt of each prompt that holds it (a whole word), the empty
    prompt for the others; None when ``word`` is empty. Guidance then scales what the prompt
    adds to the word (the digit), not the word's attribute (whose offset guidance against the
    empty prompt multiplies: :mod:`jaxdiff.finetune.offset`)."""
    if not word:
        return None
    return [word if word in p.split() else "" for p in prompts]


def guidance_prompts(prompts: Sequence[str], word: str) -> Optional[list]:
    """Each prompt without ``word`` (a whole word: :func:`jaxdiff.finetune.remove_word`) as its
    guidance prompt when it holds it, else the prompt itself; None when ``word`` is empty.
    Guidance then adds what the rest of the prompt adds, and the word's attribute is drawn once,
    as the conditional model draws it (``generate``'s ``guidance_prompt``)."""
    from jaxdiff.finetune import remove_word

    if not word:
        return None
    return [remove_word(p, word) if word in p.split() else p for p in prompts]


def evaluate_concept(models: Mapping[str, object], classifier, *,
                     concept_digits: Sequence[int] = boxed_concept.DEFAULT_DIGITS,
                     n: int = 500, seed: int = 0, num_steps: int = 25,
                     guidance_scale: float = 3.0, batch_size: int = 250,
                     threshold: float = boxed_concept.BOX_THRESHOLD,
                     word_position: str = "after", negative_word: str = "",
                     guide_without_word: str = "",
                     log: Callable[[str], None] = print) -> dict:
    """Samples :func:`prompt_sets` through each of ``models`` (``{name: StableDiffusion}``, e.g.
    ``{"base": sd, "lora": sd_lora}``: the same prompts and noise for each) and scores them
    (:func:`score_images`); with ``negative_word`` the prompts that hold it are guided against
    it alone (:func:`negative_prompts`); with ``guide_without_word`` they are guided along the
    prompt without it (:func:`guidance_prompts`). Returns ``{"sets": {set: {"prompts_example": [...], "digits":
    [...], "rows": {model: row}}}, "settings": {...}}``; each row also has ``time_s`` (the
    sampling's wall time, with the first batch's compilation).

    Raises:
      ValueError: no model, or a bad ``n`` / ``concept_digits`` (:func:`prompt_sets`).
    """
    if not models:
        raise ValueError("models must name at least one model")
    plan = prompt_sets(concept_digits, n, seed, word_position)
    out = {"sets": {}, "settings": {
        "concept_digits": [int(d) for d in concept_digits], "n": int(n), "seed": int(seed),
        "word_position": word_position, "negative_word": negative_word,
        "guide_without_word": guide_without_word,
        "num_steps": int(num_steps), "guidance_scale": float(guidance_scale),
        "batch_size": int(batch_size), "threshold": float(threshold)}}
    for i, name in enumerate(SETS):
        p = plan[name]
        rows = {}
        for model_name, sd in models.items():
            t0 = time.time()
            imgs = latent_pipeline.sample(sd, p["prompts"], jax.random.key(seed + 100 + i),
                                          num_steps=num_steps, guidance_scale=guidance_scale,
                                          batch_size=min(batch_size, n),
                                          negative_prompts=negative_prompts(p["prompts"],
                                                                            negative_word),
                                          guidance_prompts=guidance_prompts(
                                              p["prompts"], guide_without_word))
            elapsed = time.time() - t0
            row = score_images(imgs, p["labels"], classifier, threshold=threshold)
            row["time_s"] = round(elapsed, 1)
            rows[model_name] = row
            acc = row.get("accuracy")
            log(f"{name} / {model_name}: box rate {row['box_rate']:.3f}, accuracy "
                f"{'-' if acc is None else f'{acc:.3f}'} ({elapsed:.0f} s)")
        out["sets"][name] = {"digits": p["digits"], "prompts_example": p["prompts"][:6],
                             "rows": rows}
    return out


def check_targets(res: dict, tuned: str, base: Optional[str] = "base") -> list:
    """:data:`TARGETS` for model ``tuned`` in :func:`evaluate_concept`'s result: ``[{"set",
    "metric", "target", "value", "pass"}]`` (``max_drop``: the drop from ``base``'s value;
    skipped without a base row)."""
    out = []
    for set_name, metric, kind, bound in TARGETS:
        rows = res["sets"][set_name]["rows"]
        value = rows[tuned].get(metric)
        if value is None:
            continue
        if kind == "max_drop":
            if base is None or base not in rows or rows[base].get(metric) is None:
                continue
            value = rows[base][metric] - value
            ok, text = value <= bound, f"drop <= {bound:g}"
        elif kind == "min":
            ok, text = value >= bound, f">= {bound:g}"
        else:
            ok, text = value <= bound, f"<= {bound:g}"
        out.append({"set": set_name, "metric": metric if kind != "max_drop" else
                    f"{metric} drop vs {base}", "target": text, "value": float(value),
                    "pass": bool(ok)})
    return out


def save_comparison_grid(models: Mapping[str, object], prompts: Sequence[str], path: str, *,
                         per_prompt: int = 4, seed: int = 0, num_steps: int = 25,
                         guidance_scale: float = 3.0, negative_word: str = "",
                         guide_without_word: str = "") -> str:
    """A PNG, one row per prompt: ``per_prompt`` samples of each model side by side (models in
    ``models``' order, the same noise for each: row ``r`` column ``j`` of every model starts
    from the same latents), a dark gray tile between two models, each row's prompt on its
    left, each model's name above its columns (and in ``path``'s ``.txt`` twin, beside the
    prompts). Returns ``path``."""
    prompts = list(prompts)
    rep = [p for p in prompts for _ in range(per_prompt)]
    blocks = [latent_pipeline.sample(sd, rep, jax.random.key(seed + 999),
                                     num_steps=num_steps, guidance_scale=guidance_scale,
                                     batch_size=len(rep),
                                     negative_prompts=negative_prompts(rep, negative_word),
                                     guidance_prompts=guidance_prompts(rep, guide_without_word))
              for sd in models.values()]
    tiles = []
    for k in range(len(prompts)):
        for i, b in enumerate(blocks):
            g = boxed_concept.to_gray01(b[k * per_prompt:(k + 1) * per_prompt]) * 2.0 - 1.0
            if i:   # a dark gray tile between two models' samples
                tiles.append(np.full((1, *g.shape[1:], 1), -0.6, np.float32))
            tiles.append(g[..., None])
    latent_pipeline.save_prompt_grid(np.concatenate(tiles), prompts, path)
    _add_header(path, list(models), prompts, per_prompt, tile=blocks[0].shape[2] * 2)
    with open(os.path.splitext(path)[0] + ".txt", "a") as f:
        f.write(f"columns: {per_prompt} samples each of " + ", ".join(models) + "\n")
    return path


def _add_header(path: str, names: Sequence[str], prompts: Sequence[str], per_prompt: int,
                tile: int) -> None:
    """Writes each model's name above its block of columns in the grid at ``path`` (the layout
    of :func:`experiments.latent_pipeline.save_prompt_grid`: a label column, then tiles)."""
    from PIL import Image, ImageDraw

    with Image.open(path) as im:
        grid = im.copy()
    label_w = 6 * max(len(p) for p in prompts) + 16   # save_prompt_grid's label column
    out = Image.new("L", (grid.width, grid.height + 16), 0)
    out.paste(grid, (0, 16))
    draw = ImageDraw.Draw(out)
    for i, name in enumerate(names):
        draw.text((label_w + i * (per_prompt + 1) * tile + 4, 2), name, fill=255)
    tmp = path + ".tmp.png"
    out.save(tmp)
    os.replace(tmp, path)


def machine_info() -> dict:
    """The machine the numbers were measured on: CPU model, cores, jax version and backend,
    load average."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "jax": jax.__version__,
            "backend": jax.default_backend(), "load_average": round(os.getloadavg()[0], 2)}


def markdown(res: dict) -> str:
    """The results of :mod:`experiments.eval_concept` as markdown: the models, one table row per
    set and model, the targets, the detector's check, the machine."""
    s = res["settings"]
    lines = [f"Concept \"{boxed_concept.CONCEPT_WORD}\" on digits "
             f"{', '.join(map(str, s['concept_digits']))}; N = {s['n']} per set and model; "
             f"{s['num_steps']} sampler steps, guidance {s['guidance_scale']:g}, seed "
             f"{s['seed']}; box threshold {s['threshold']:g}"
             + (f"; prompts with \"{s['negative_word']}\" guided against it alone"
                if s.get("negative_word") else "")
             + (f"; prompts with \"{s['guide_without_word']}\" guided along the prompt "
                "without it" if s.get("guide_without_word") else "") + ".", ""]
    for name, desc in res.get("models", {}).items():
        lines.append(f"- `{name}`: {desc}")
    lines += ["", "| set | model | N | box rate | accuracy | time (s) |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    for set_name, entry in res["sets"].items():
        for model_name, row in entry["rows"].items():
            acc = row.get("accuracy")
            lines.append(f"| {set_name} | {model_name} | {row['n']} | {row['box_rate']:.3f} | "
                         f"{'-' if acc is None else f'{acc:.3f}'} | {row['time_s']:.0f} |")
    lines += ["", "Example prompts: " + "; ".join(
        f"{k}: \"{v['prompts_example'][0]}\"" for k, v in res["sets"].items()) + "."]
    if res.get("targets"):
        lines += ["", f"Targets (model `{res['tuned']}`):", "",
                  "| set | metric | target | value | pass |", "| --- | --- | --- | ---: | --- |"]
        for t in res["targets"]:
            lines.append(f"| {t['set']} | {t['metric']} | {t['target']} | {t['value']:.3f} | "
                         f"{'yes' if t['pass'] else 'NO'} |")
    det = res.get("detector")
    if det:
        parts = [f"{k}: boxed {v['boxed_rate']:.3f}, unboxed {v['unboxed_rate']:.3f} "
                 f"(accuracy {v['accuracy']:.3f})" for k, v in det.items()
                 if isinstance(v, dict)]
        lines += ["", f"Box detector on {det['n']} boxed and {det['n']} other MNIST test digits "
                  "(real: as drawn; vae: through the base model's VAE): " + "; ".join(parts)
                  + "."]
    m = res.get("machine")
    if m:
        lines += ["", f"Machine: {m['cpu']}, {m['cores']} CPU cores; jax {m['jax']} "
                  f"({m['backend']}); load average {m['load_average']}. Total "
                  f"{res.get('total_time_s', 0):.0f} s."]
    return "\n".join(lines) + "\n"
