"""A small grammar of English prompts for MNIST digits, split into training and held-out templates.

A prompt is a template filled with a digit, written as its name or its numeral (``"seven"`` /
``"7"``), and, for the templates with an ``{adj}`` slot, an adjective::

    a handwritten seven      the digit 7      number seven written by hand      a thin 7

:data:`TRAIN_TEMPLATES` are the only templates the text-to-MNIST model sees in training;
:data:`HELDOUT_TEMPLATES` are never produced by the training sampler (a test checks that no
held-out prompt equals a training prompt) and use only words of the training prompts, so that
they test new phrasings, not new words. The empty prompt :data:`EMPTY_PROMPT` is the
unconditional prompt of classifier-free guidance.

A prompt is drawn by three indices, ``(template, form, adjective)``, each uniform:
:func:`prompt_indices` draws them from a JAX key (also inside ``jit``: the training loss draws
the prompts of a batch from the step's key), :func:`prompt_table` lists every ``(template, form,
adjective)`` combination per digit (templates without an adjective repeat over that axis, so the
three draws stay uniform), and :func:`sample_prompts` is the host-side equivalent that returns
strings.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["DIGIT_NAMES", "ADJECTIVES", "TRAIN_TEMPLATES", "HELDOUT_TEMPLATES", "SPLITS",
           "EMPTY_PROMPT", "templates", "fill", "all_prompts", "prompt_table", "prompt_indices",
           "sample_prompts", "training_words"]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ADJECTIVES = ("thin", "thick", "bold", "small", "large", "neat", "messy", "slanted")
TRAIN_TEMPLATES = (
    "{d}",
    "a handwritten {d}",
    "the digit {d}",
    "number {d} written by hand",
    "an image of the number {d}",
    "a {adj} {d}",
    "a {adj} handwritten digit {d}",
)
HELDOUT_TEMPLATES = (
    "handwritten digit {d}",
    "the number {d} written by hand",
    "a {adj} digit {d}",
    "an image of a handwritten {d}",
)
SPLITS = ("train", "heldout")
EMPTY_PROMPT = ""
NUM_FORMS = 2  # 0: the digit's name, 1: its numeral


def templates(split: str) -> tuple:
    """The templates of ``split`` (``"train"`` or ``"heldout"``).

    Raises:
      ValueError: naming ``split``.
    """
    if split == "train":
        return TRAIN_TEMPLATES
    if split == "heldout":
        return HELDOUT_TEMPLATES
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _check_digit(digit) -> int:
    if isinstance(digit, bool) or not isinstance(digit, (int, np.integer)) or not 0 <= digit <= 9:
        raise ValueError(f"digit must be an int in [0, 9], got {digit!r}")
    return int(digit)


def fill(template: str, digit: int, form: int, adjective: int = 0) -> str:
    """``template`` with ``{d}`` = the digit's name (``form == 0``) or numeral (``form == 1``)
    and ``{adj}`` = ``ADJECTIVES[adjective]``.

    Raises:
      ValueError: naming ``digit``, ``form`` or ``adjective`` when out of range.
    """
    digit = _check_digit(digit)
    if form not in (0, 1):
        raise ValueError(f"form must be 0 (name) or 1 (numeral), got {form!r}")
    if not 0 <= adjective < len(ADJECTIVES):
        raise ValueError(f"adjective must be in [0, {len(ADJECTIVES)}), got {adjective!r}")
    word = DIGIT_NAMES[digit] if form == 0 else str(digit)
    return template.format(d=word, adj=ADJECTIVES[adjective])


def all_prompts(split: str, digit: int) -> list:
    """Every distinct prompt of ``split`` for ``digit``, in a fixed order."""
    out = dict.fromkeys(fill(t, digit, f, a) for t in templates(split) for f in range(NUM_FORMS)
                        for a in range(len(ADJECTIVES)))
    return list(out)


def prompt_table(split: str) -> list:
    """``table[digit][template][form][adjective]``: the prompt strings, nested lists of shape
    ``[10, len(templates(split)), 2, len(ADJECTIVES)]`` (templates without ``{adj}`` repeat)."""
    return [[[[fill(t, d, f, a) for a in range(len(ADJECTIVES))] for f in range(NUM_FORMS)]
             for t in templates(split)] for d in range(10)]


def prompt_indices(key: jax.Array, n: int, split: str):
    """``(template [n], form [n], adjective [n])`` int32 indices, each uniform, drawn from
    ``key`` (one ``split`` into three). Jittable (``n`` and ``split`` static)."""
    k_t, k_f, k_a = jax.random.split(key, 3)
    return (jax.random.randint(k_t, (n,), 0, len(templates(split)), jnp.int32),
            jax.random.randint(k_f, (n,), 0, NUM_FORMS, jnp.int32),
            jax.random.randint(k_a, (n,), 0, len(ADJECTIVES), jnp.int32))


def sample_prompts(labels: Sequence[int], key: jax.Array, split: str) -> list:
    """One prompt of ``split`` per label, drawn by :func:`prompt_indices` from ``key``: the same
    key and labels always give the same prompts.

    Raises:
      ValueError: naming ``split`` or ``labels`` (a label outside ``[0, 9]``).
    """
    table = prompt_table(split)
    labels = [int(x) for x in np.asarray(labels).reshape(-1)]
    for x in labels:
        if not 0 <= x <= 9:
            raise ValueError(f"labels must lie in [0, 9], got {x}")
    t, f, a = (np.asarray(v) for v in prompt_indices(key, len(labels), split))
    return [table[d][t[i]][f[i]][a[i]] for i, d in enumerate(labels)]


def training_words() -> list:
    """The distinct words of every training prompt (what the tokenizer's BPE is trained on)."""
    words = set()
    for d in range(10):
        for p in all_prompts("train", d):
            words.update(p.split())
    return sorted(words)
