"""How a text encoder encodes a new word next to each digit: the cosine similarity of the word's
hidden states between prompts of different digits (1: the word encodes the same whatever digit
is there), and of the digit's own states with and without the word (1: the word does not move
the digit). CLIP attends causally, so a word in front of the prompt encodes the same before
every digit (1.000 by construction) and a word after the digit depends on it. With ``--lora``
(a LoRA file trained with ``text_prior.word``) the same for the adapted encoder.

    python -m benchmarks.concept_word_encoding --model runs/lm_vpred/diffusers
    python -m benchmarks.concept_word_encoding --model runs/lm_vpred/diffusers \
        --lora runs/db/pytorch_lora_weights.safetensors

Prompts: ``experiments.boxed_concept``'s templates (the word after and in front), each digit's
name and numeral (60 prompts per position). Measures, prints a markdown table; no timing.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def measure(sd) -> dict:
    """``{position: {"word_across_digits", "digit_with_word"}}`` mean cosine similarities, for
    ``position`` in ``("after", "before")`` (module docstring)."""
    import jax.numpy as jnp

    from experiments import boxed_concept, mnist_prompts
    from jaxdiff.pipelines.pipeline_args import prompt_tokens
    from jaxdiff.pipelines.sd_program import embed_tokens

    word = boxed_concept.CONCEPT_WORD
    eos = int(sd.tokenizer.eos_token_id)
    k = int(np.argmax(np.asarray(prompt_tokens(sd, [word], "word")[0][1:]) == eos))

    def encode(prompts):
        ids = prompt_tokens(sd, prompts, "prompts")
        return ids, np.asarray(embed_tokens(sd.text_config, jnp.float32,
                                            sd.params["text_encoder"], jnp.asarray(ids)))

    out = {}
    for position in boxed_concept.WORD_POSITIONS:
        templates = boxed_concept.concept_templates(position)
        word_sims, digit_sims = [], []
        for t, form in itertools.product(range(len(templates)), range(mnist_prompts.NUM_FORMS)):
            prompts = [boxed_concept.concept_prompt(d, t, form, position) for d in range(10)]
            plain = [p.replace(f"{word} ", "").replace(f" {word}", "") for p in prompts]
            ids, states = encode(prompts)
            pids, pstates = encode(plain)
            n = int(np.argmax(pids[0][1:] == eos))        # the plain prompt's tokens
            start = 1 + (k if position == "before" else 0)
            w = slice(1, 1 + k) if position == "before" else slice(1 + n, 1 + n + k)
            word_states = _unit(states[:, w])             # [10, k, D]
            for i, j in itertools.combinations(range(10), 2):
                word_sims.append(float((word_states[i] * word_states[j]).sum(-1).mean()))
            digit = _unit(states[:, start:start + n]), _unit(pstates[:, 1:1 + n])
            digit_sims.append(float((digit[0] * digit[1]).sum(-1).mean()))
        out[position] = {"word_across_digits": float(np.mean(word_sims)),
                         "digit_with_word": float(np.mean(digit_sims))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a diffusers Stable Diffusion folder")
    ap.add_argument("--lora", default="", help="a LoRA file for it (its text encoder part)")
    args = ap.parse_args()
    from benchmarks.common import machine
    from jaxdiff.pipelines import fuse_lora, load_stable_diffusion

    models = {"base": load_stable_diffusion(args.model)}
    if args.lora:
        models["lora"] = fuse_lora(models["base"], args.lora, 1.0)
    print(f"Model {args.model}" + (f", LoRA {args.lora}" if args.lora else "")
          + f"; {machine()}\n")
    print("| encoder | word | the word's states across digits (cos) | "
          "the digit's states with / without the word (cos) |")
    print("| --- | --- | ---: | ---: |")
    for name, sd in models.items():
        for position, r in measure(sd).items():
            print(f"| {name} | {position} the digit | {r['word_across_digits']:.3f} | "
                  f"{r['digit_with_word']:.3f} |")


if __name__ == "__main__":
    main()
