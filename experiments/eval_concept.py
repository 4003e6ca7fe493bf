r"""Evaluate a concept taught to the text-to-MNIST model ("boxed" digits,
``experiments.boxed_concept``): the base model, and a LoRA on it or a fully fine-tuned copy of it,
on the same prompts and seeds (``experiments.concept_eval``).

    python -m experiments.eval_concept --model runs/latent_mnist/diffusers \
        --out_json concept.json --out_md concept.md
    python -m experiments.eval_concept --model runs/latent_mnist/diffusers \
        --lora runs/boxed_lora/pytorch_lora_weights.safetensors:1.0 \
        --out_json concept_lora.json --out_md concept_lora.md --out_png concept_lora.png
    python -m experiments.eval_concept --model runs/latent_mnist/diffusers \
        --finetuned runs/boxed_full/diffusers --out_json concept_full.json

For each of the sets ``learnt`` (the concept word on the concept images' digits),
``composition`` (on the other digits) and ``prior`` (plain held-out prompts), ``--num_samples``
images per model: the fraction with the box and the MNIST classifier's accuracy on the intended
digit; with a second model, the issue's targets for it (``concept_eval.TARGETS``). Also the box
detector's accuracy on ``--detector_n`` boxed and as many plain MNIST test digits, as drawn and
through the model's VAE. ``--out_png``: a grid, one row per prompt, ``--grid_per_prompt``
samples of each model side by side from the same noise.

The classifier is ``--classifier_path`` or, when empty, ``mnist_classifier.msgpack`` beside
``--model`` (in a ``train_latent_mnist`` workdir, the file ``eval_latent_mnist`` uses): loaded,
or trained on MNIST (3 epochs) and saved there. Invalid flags print one ``error: ...`` line and
exit with status 2 before any work.
"""

from __future__ import annotations

import os
import time
from typing import Optional, Sequence

import numpy as np
from absl import flags, logging

from experiments import boxed_concept, cli, concept_eval
from experiments.cli import ConfigError
from experiments.evaluation import (CLASSIFIER_FILE, get_classifier, load_mnist_arrays, log,
                                    write_results)

PROG = "python -m experiments.eval_concept"

__all__ = ["main", "cli_main", "parse_lora_arg", "load_models"]


def _define(fv: flags.FlagValues, argv: list) -> None:
    del argv
    d = dict(flag_values=fv)
    flags.DEFINE_string("model", None, "the base model: a diffusers Stable Diffusion folder", **d)
    flags.DEFINE_string("lora", "", "a LoRA file for the base model, FILE[:SCALE] (scale 1 by "
                        "default): evaluated as model 'lora'", **d)
    flags.DEFINE_string("finetuned", "", "a fully fine-tuned diffusers folder: evaluated as "
                        "model 'finetuned'", **d)
    flags.DEFINE_string("concept_digits", ",".join(map(str, boxed_concept.DEFAULT_DIGITS)),
                        "the digits of the concept images (the 'learnt' set; the others are "
                        "'composition')", **d)
    flags.DEFINE_enum("word_position", "after", ["after", "before"],
                      "the concept prompts' word after the digit or in front (as the LoRA's "
                      "training captions had it: experiments.boxed_mnist --word_position)", **d)
    flags.DEFINE_string("negative_word", "", "guide the prompts that hold this word against "
                        "the word alone (its negative prompt; dreambooth.word_prior_offset's "
                        "sampling), the others against the empty prompt", **d)
    flags.DEFINE_string("guide_without_word", "", "guide the prompts that hold this word along "
                        "the prompt without it (generate's guidance_prompt: the word's "
                        "attribute drawn once, the rest guided)", **d)
    flags.DEFINE_integer("num_samples", 500, "images per set and model", **d)
    flags.DEFINE_integer("batch_size", 250, "sampling batch", **d)
    flags.DEFINE_integer("steps", 25, "sampler steps (the folder's scheduler: DDIM)", **d)
    flags.DEFINE_float("guidance_scale", 3.0, "classifier-free guidance (train_latent_mnist's "
                       "default)", **d)
    flags.DEFINE_float("threshold", boxed_concept.BOX_THRESHOLD, "box detector threshold", **d)
    flags.DEFINE_integer("detector_n", 500, "boxed and plain MNIST test digits for the "
                         "detector's check (0: none)", **d)
    flags.DEFINE_integer("seed", 0, "seed of the prompts and the noise", **d)
    flags.DEFINE_string("classifier_path", "", "classifier msgpack (default: "
                        f"{CLASSIFIER_FILE} beside --model, trained there if absent)", **d)
    flags.DEFINE_string("data_dir", "", "MNIST IDX directory (default: jaxdiff.data's search, "
                        "$JAXDIFF_MNIST_DIR first)", **d)
    flags.DEFINE_string("out_json", None, "the results as JSON", **d)
    flags.DEFINE_string("out_md", "", "the results as a markdown table", **d)
    flags.DEFINE_string("out_png", "", "the comparison grid (PNG)", **d)
    flags.DEFINE_integer("grid_per_prompt", 4, "grid samples per prompt and model", **d)


def parse_lora_arg(text: str) -> tuple:
    """``"FILE[:SCALE]"`` -> ``(FILE, SCALE)`` (scale 1.0 when absent).

    Raises:
      ConfigError: naming ``--lora``: an empty file name or a scale that is not a finite number.
    """
    path, scale = text, 1.0
    if ":" in text:
        head, tail = text.rsplit(":", 1)
        try:
            scale = float(tail)
            path = head
        except ValueError:
            pass   # a ':' in the path itself
    if not path:
        raise ConfigError(f"--lora must be FILE[:SCALE], got {text!r}")
    if not np.isfinite(scale):
        raise ConfigError(f"--lora: the scale must be a finite number, got {scale}")
    return path, scale


def _size(path: str) -> int:
    """Bytes of a file, or of the files in a folder."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())


def load_models(model: str, lora: str = "", finetuned: str = "") -> tuple:
    """``({name: StableDiffusion}, {name: description})``: ``"base"`` from ``model``, plus
    ``"lora"`` (the base with ``lora``, ``FILE[:SCALE]``, merged by
    ``jaxdiff.pipelines.fuse_lora``) and / or ``"finetuned"`` (the folder ``finetuned``).

    Raises:
      ConfigError: a folder or file that does not load (the loader's message), or ``--lora``
        without ``jaxdiff.pipelines.fuse_lora``.
    """
    from jaxdiff.pipelines import load_stable_diffusion

    def load(flag, path):
        try:
            return load_stable_diffusion(path)
        except ValueError as e:
            raise ConfigError(f"--{flag} {path}: {e}") from None

    models = {"base": load("model", model)}
    desc = {"base": f"{model}"}
    if lora:
        path, scale = parse_lora_arg(lora)
        try:
            from jaxdiff.pipelines import fuse_lora
        except ImportError:
            raise ConfigError("--lora needs jaxdiff.pipelines.fuse_lora, which this checkout "
                              "does not have") from None
        if not os.path.exists(path):
            raise ConfigError(f"--lora {path}: no such file")
        try:   # fused: the base model's program, at its speed
            models["lora"] = fuse_lora(models["base"], path, scale)
        except ValueError as e:
            raise ConfigError(f"--lora {path}: {e}") from None
        desc["lora"] = (f"{model} + LoRA {path} at scale {scale:g}, fused "
                        f"({_size(path) / 1024:.1f} KiB)")
    if finetuned:
        models["finetuned"] = load("finetuned", finetuned)
        desc["finetuned"] = f"{finetuned} (fully fine-tuned)"
    return models, desc


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Parses ``argv``, samples and scores each model; writes ``--out_json`` (+ ``--out_md``,
    ``--out_png``) and returns the results.

    Raises:
      ConfigError: a bad flag, a model that does not load, an output that cannot be written.
    """
    fv = cli.parse_flags(_define, [] if argv is None else argv, PROG, __doc__)
    for name in ("model", "out_json"):
        if not getattr(fv, name):
            raise ConfigError(f"--{name} is required")
    if fv.num_samples < 1 or fv.batch_size < 1:
        raise ConfigError(f"--num_samples and --batch_size must be >= 1, got "
                          f"{fv.num_samples} and {fv.batch_size}")
    if fv.detector_n < 0 or fv.grid_per_prompt < 1:
        raise ConfigError("--detector_n must be >= 0 and --grid_per_prompt >= 1")
    digits = boxed_concept.parse_digits(fv.concept_digits, "--concept_digits")
    if len(digits) == 10:
        raise ConfigError("--concept_digits must leave a digit for the composition set")
    clf_path = fv.classifier_path or os.path.join(
        os.path.dirname(os.path.abspath(fv.model)), CLASSIFIER_FILE)
    if not os.path.isfile(clf_path):
        cli.check_writable("--classifier_path", clf_path)
    for flag in ("out_json", "out_md", "out_png"):
        if getattr(fv, flag):
            cli.check_writable(f"--{flag}", getattr(fv, flag))
    logging.set_verbosity(logging.WARNING)
    t_start = time.time()
    models, desc = load_models(fv.model, fv.lora, fv.finetuned)
    train = None if os.path.isfile(clf_path) else load_mnist_arrays("train", fv.data_dir)
    test = load_mnist_arrays("test", fv.data_dir)
    clf, clf_info = get_classifier(clf_path, train, test, seed=fv.seed, epochs=3)
    res = concept_eval.evaluate_concept(
        models, clf, concept_digits=digits, n=fv.num_samples, seed=fv.seed,
        num_steps=fv.steps, guidance_scale=fv.guidance_scale, batch_size=fv.batch_size,
        threshold=fv.threshold, word_position=fv.word_position,
        negative_word=fv.negative_word.strip(),
        guide_without_word=fv.guide_without_word.strip(), log=log)
    res["models"] = desc
    if fv.lora:
        res["lora_file_bytes"] = _size(parse_lora_arg(fv.lora)[0])
    res["classifier"] = clf_info
    tuned = next((m for m in models if m != "base"), None)
    if tuned:
        res["tuned"] = tuned
        res["targets"] = concept_eval.check_targets(res, tuned)
    if fv.detector_n:
        res["detector"] = concept_eval.detector_check(test[0], fv.detector_n, fv.seed,
                                                      sd=models["base"], threshold=fv.threshold)
    if fv.out_png:
        plan = concept_eval.prompt_sets(digits, 10, fv.seed + 7, fv.word_position)
        prompts = ([plan["learnt"]["prompts"][i] for i in range(len(digits))]
                   + plan["composition"]["prompts"][:3] + plan["prior"]["prompts"][:3])
        concept_eval.save_comparison_grid(models, prompts, fv.out_png,
                                          per_prompt=fv.grid_per_prompt, seed=fv.seed,
                                          num_steps=fv.steps, guidance_scale=fv.guidance_scale,
                                          negative_word=fv.negative_word.strip(),
                                          guide_without_word=fv.guide_without_word.strip())
        log(f"wrote {fv.out_png}")
    res["machine"] = concept_eval.machine_info()
    res["total_time_s"] = round(time.time() - t_start, 1)
    res["args"] = fv.flag_values_dict()
    write_results(res, concept_eval.markdown(res), json_path=fv.out_json, md_path=fv.out_md,
                  json_default=str)
    return res


def cli_main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m experiments.eval_concept``: :func:`main` with errors as one line."""
    cli.run(main, argv)


if __name__ == "__main__":
    cli_main()
