"""A small grammar of English prompts for MNIST digits, split into training and held-out templates,
whose adjectives are measured on the image.

A prompt is a template filled with a digit, written as its name or its numeral (``"seven"`` /
``"7"``), and, for the templates with an ``{adj}`` slot, an adjective combination (none, one word
or two)::

    a handwritten seven      the digit 7      number seven written by hand      a thin 7
    a large slanted seven    a seven (the slot left empty)

:data:`TRAIN_TEMPLATES` are the only templates the text-to-MNIST model sees in training;
:data:`HELDOUT_TEMPLATES` are never produced by the training sampler (a test checks that no
held-out prompt equals a training prompt) and use only words of the training prompts, so that
they test new phrasings, not new words. The empty prompt :data:`EMPTY_PROMPT` is the
unconditional prompt of classifier-free guidance.

**The adjectives are true of the image.** Each word of :data:`ADJECTIVES` names one bin of one
measured attribute (:data:`WORDS`; :mod:`jaxdiff.metrics.digit_attributes`): "thin" is the
lowest third of stroke thickness *for that digit* (per-class tertiles of the training set),
"thick" and its synonym "bold" the highest third; "small" / "large" the lowest / highest third
of bounding-box area; "upright" / "slanted" the least / most right-leaning third of the signed
slant (:data:`SLANT_BINNING`; the scheme v2 binned ``|slant|``, whose highest third put digits
leaning left and right under one word, whose mean shape is upright). An image
in the middle third of an attribute gets no word of it. An image's bins (``[3]`` int, 0 / 1 / 2
per attribute in :data:`ATTRIBUTES` order) decide which adjective combinations of :data:`COMBOS`
are true of it (:func:`allowed_combos`); the empty combination always is.

Two adjectives go together only as a size word and a thickness word ("a small thick seven") or a
size word and a slant word ("a large slanted seven"). :data:`UNSEEN_PAIRS`: **a thickness word
and a slant word never occur in the same training caption** ("a thick slanted seven" is a
composition the model never saw), so an evaluation can test composition.

A prompt is drawn by three indices, ``(template, form, combo)`` (:func:`prompt_indices`). For a
training caption of an image (with its bins), the templates with an ``{adj}`` slot get
:data:`ADJ_TEMPLATE_SHARE` of the mass between them and the combinations allowed for the image are
weighted by :data:`COMBO_WORD_WEIGHT` to the power of their word count, so that a word true of the
image is said often enough to be learnt (an image of the slanted third gets "slanted" in about a
third of its captions, not in one in twelve as with uniform draws); without bins (prompts for an
evaluation) the template and combination are uniform over all of :data:`COMBOS`. The form is
uniform in both. :func:`prompt_indices` runs inside ``jit``
(the training loss draws the prompts of a batch from the step's key); :func:`prompt_table` lists
every ``(template, form, combo)`` prompt per digit (templates without a slot repeat over that
axis), and :func:`sample_prompts` is the host-side equivalent that returns strings.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["DIGIT_NAMES", "ATTRIBUTES", "ADJECTIVES", "WORDS", "COMBOS", "UNSEEN_PAIRS",
           "CAPTION_SCHEME", "SLANT_BINNING", "slant_binning", "ADJ_TEMPLATE_SHARE",
           "COMBO_WORD_WEIGHT", "TRAIN_TEMPLATES", "HELDOUT_TEMPLATES", "SPLITS", "EMPTY_PROMPT",
           "NUM_FORMS", "templates", "caption", "fill", "all_prompts", "prompt_table",
           "longest_prompts",
           "combo_requirements", "allowed_combos", "prompt_indices", "template_logits",
           "combo_logits", "sample_prompts",
           "training_words"]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# The measured attributes, in the order of an image's bins (jaxdiff.metrics.digit_attributes).
ATTRIBUTES = ("thickness", "size", "slant")
# word -> (attribute index, bin): bin 0 = the lowest third of the digit's class, 2 = the highest.
WORDS = {"thin": (0, 0), "thick": (0, 2), "bold": (0, 2), "small": (1, 0), "large": (1, 2),
         "upright": (2, 0), "slanted": (2, 2)}
ADJECTIVES = tuple(WORDS)
_THICK, _SIZE, _SLANT = (tuple(w for w, (a, _) in WORDS.items() if a == k) for k in range(3))
# Every adjective combination of the training captions: none, one word, or a size word followed
# by a thickness or a slant word. Never a thickness word with a slant word (UNSEEN_PAIRS).
COMBOS = (((),) + tuple((w,) for w in ADJECTIVES)
          + tuple((s, t) for s in _SIZE for t in _THICK)
          + tuple((s, t) for s in _SIZE for t in _SLANT))
UNSEEN_PAIRS = (("thickness", "slant"),)
_AN = ("upright", "eight", "8")   # words that take "an"
# Names the captioning scheme in a run's compatibility record (a run trained with another
# scheme is not resumed with this one).
CAPTION_SCHEME = "measured-adjectives-v3"
# How the slant is binned (jaxdiff.metrics.binning_values' ``slant``), per scheme: v3 bins the
# signed slant; v2 (and runs before it) its magnitude.
_SLANT_BY_SCHEME = {"measured-adjectives-v3": "signed"}
SLANT_BINNING = _SLANT_BY_SCHEME[CAPTION_SCHEME]


def slant_binning(scheme: Optional[str]) -> str:
    """The slant binning of a run trained with captioning ``scheme`` (its ``latent_stats.json``'s
    ``caption_scheme``): ``"signed"`` from v3 on, ``"magnitude"`` before (or ``None``)."""
    return _SLANT_BY_SCHEME.get(scheme, "magnitude")

# The training draw (prompt_indices with bins): the {adj} templates' total share of the captions,
# and the weight of a combination per word it has (1: uniform over the allowed combinations).
ADJ_TEMPLATE_SHARE = 0.5
COMBO_WORD_WEIGHT = 2.0
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


def caption(template: str, digit: int, form: int, words: Sequence[str] = ()) -> str:
    """``template`` with ``{d}`` = the digit's name (``form == 0``) or numeral (``form == 1``)
    and ``{adj}`` = ``words`` joined by spaces (any words of :data:`ADJECTIVES`, also
    combinations that are not in :data:`COMBOS`, e.g. ``("thick", "slanted")`` for an
    evaluation); an empty ``words`` leaves the slot out (``"a {adj} {d}"`` -> ``"a seven"``).
    The article agrees with the next word (``"an upright seven"``, ``"an eight"``).

    Raises:
      ValueError: naming ``digit``, ``form`` or ``words`` when out of range.
    """
    digit = _check_digit(digit)
    if form not in (0, 1):
        raise ValueError(f"form must be 0 (name) or 1 (numeral), got {form!r}")
    bad = [w for w in words if w not in WORDS]
    if bad or isinstance(words, str):
        raise ValueError(f"words must be a sequence of {ADJECTIVES}, got {words!r}")
    word = DIGIT_NAMES[digit] if form == 0 else str(digit)
    out = template.format(d=word, adj=" ".join(words)).split()
    return " ".join("an" if w == "a" and i + 1 < len(out) and out[i + 1] in _AN else w
                    for i, w in enumerate(out))


def fill(template: str, digit: int, form: int, combo: int = 0) -> str:
    """``template`` filled with the digit and the adjective combination ``COMBOS[combo]``
    (:func:`caption`; combo 0 is the empty one).

    Raises:
      ValueError: naming ``digit``, ``form`` or ``combo`` when out of range.
    """
    if isinstance(combo, bool) or not isinstance(combo, (int, np.integer)) or not (
            0 <= combo < len(COMBOS)):
        raise ValueError(f"combo must be an int in [0, {len(COMBOS)}), got {combo!r}")
    return caption(template, digit, form, COMBOS[combo])


def all_prompts(split: str, digit: int) -> list:
    """Every distinct prompt of ``split`` for ``digit``, in a fixed order."""
    out = dict.fromkeys(fill(t, digit, f, c) for t in templates(split) for f in range(NUM_FORMS)
                        for c in range(len(COMBOS)))
    return list(out)


def prompt_table(split: str) -> list:
    """``table[digit][template][form][combo]``: the prompt strings, nested lists of shape
    ``[10, len(templates(split)), 2, len(COMBOS)]`` (templates without ``{adj}`` repeat)."""
    return [[[[fill(t, d, f, c) for c in range(len(COMBOS))] for f in range(NUM_FORMS)]
             for t in templates(split)] for d in range(10)]


def combo_requirements() -> np.ndarray:
    """``[len(COMBOS), 3]`` int32: the bin that each combination needs of each attribute
    (:data:`ATTRIBUTES` order), ``-1`` where it says nothing of that attribute."""
    req = -np.ones((len(COMBOS), len(ATTRIBUTES)), np.int32)
    for c, words in enumerate(COMBOS):
        for w in words:
            a, b = WORDS[w]
            req[c, a] = b
    return req


def allowed_combos(bins) -> jax.Array:
    """``[N, len(COMBOS)]`` bool: which combinations are true of each image, from its ``bins``
    (``[N, 3]`` ints in ``{0, 1, 2}``, :func:`jaxdiff.metrics.bin_values`). Column 0 (no
    adjective) is always true. Jittable."""
    req = jnp.asarray(combo_requirements())
    bins = jnp.asarray(bins).astype(jnp.int32)
    return jnp.all((req[None] < 0) | (req[None] == bins[:, None, :]), axis=-1)


def prompt_indices(key: jax.Array, n: int, split: str, bins: Optional[jax.Array] = None):
    """``(template [n], form [n], combo [n])`` int32 indices drawn from ``key`` (one ``split``
    into three). With ``bins`` (``[n, 3]``: each image's attribute bins), a training caption:
    the ``{adj}`` templates of ``split`` share :data:`ADJ_TEMPLATE_SHARE` of the mass (each
    group uniform within), and the combination is drawn over :func:`allowed_combos` of ``bins``
    (adjectives true of the image) with weight ``COMBO_WORD_WEIGHT ** len(words)``. With
    ``bins=None``: template and combination uniform (over all of :data:`COMBOS`). The form is
    uniform. Jittable (``n`` and ``split`` static).

    Raises:
      ValueError: ``bins`` not of ``n`` rows; ``split`` unknown.
    """
    k_t, k_f, k_c = jax.random.split(key, 3)
    temps = templates(split)
    form = jax.random.randint(k_f, (n,), 0, NUM_FORMS, jnp.int32)
    if bins is None:
        return (jax.random.randint(k_t, (n,), 0, len(temps), jnp.int32), form,
                jax.random.randint(k_c, (n,), 0, len(COMBOS), jnp.int32))
    allowed = allowed_combos(bins)
    if allowed.shape[0] != n:
        raise ValueError(f"bins must be [n={n}, {len(ATTRIBUTES)}], got {bins.shape}")
    return (jax.random.categorical(k_t, template_logits(split), shape=(n,)).astype(jnp.int32),
            form, jax.random.categorical(k_c, jnp.where(allowed, combo_logits(), -jnp.inf))
            .astype(jnp.int32))


def template_logits(split: str) -> np.ndarray:
    """``[len(templates(split))]`` float32 log-weights of the training draw: the ``{adj}``
    templates share :data:`ADJ_TEMPLATE_SHARE` of the mass, the others the rest (all of it to
    one group when the other is empty).

    Raises:
      ValueError: naming ``split``.
    """
    slot = np.array(["{adj}" in t for t in templates(split)])
    share = ADJ_TEMPLATE_SHARE if slot.any() and (~slot).any() else float(slot.all())
    w = np.where(slot, share / max(slot.sum(), 1), (1.0 - share) / max((~slot).sum(), 1))
    return np.log(w).astype(np.float32)


def combo_logits() -> np.ndarray:
    """``[len(COMBOS)]`` float32 log-weights of the training draw's combinations:
    ``len(words) * log(COMBO_WORD_WEIGHT)`` (masked to the allowed ones by
    :func:`prompt_indices`)."""
    return (np.array([len(c) for c in COMBOS], np.float32)
            * np.float32(np.log(COMBO_WORD_WEIGHT)))


def sample_prompts(labels: Sequence[int], key: jax.Array, split: str, bins=None) -> list:
    """One prompt of ``split`` per label, drawn by :func:`prompt_indices` from ``key`` (with
    ``bins``, ``[n, 3]``, true of each image): the same key and labels always give the same
    prompts.

    Raises:
      ValueError: naming ``split`` or ``labels`` (a label outside ``[0, 9]``).
    """
    table = prompt_table(split)
    labels = [int(x) for x in np.asarray(labels).reshape(-1)]
    for x in labels:
        if not 0 <= x <= 9:
            raise ValueError(f"labels must lie in [0, 9], got {x}")
    t, f, c = (np.asarray(v) for v in prompt_indices(key, len(labels), split, bins))
    return [table[d][t[i]][f[i]][c[i]] for i, d in enumerate(labels)]


def longest_prompts() -> list:
    """Every distinct prompt of both splits, and every held-out prompt with an unseen pair of
    :data:`UNSEEN_PAIRS` (what an evaluation asks for), for length checks: one token per word
    (the tokenizer learns every training word as one token), plus the start and end tokens."""
    words = {a: [w for w, (k, _) in WORDS.items() if k == ATTRIBUTES.index(a)]
             for a in ATTRIBUTES}
    unseen = [(x, y) for a, b in UNSEEN_PAIRS for x in words[a] for y in words[b]]
    out = [p for s in SPLITS for d in range(10) for p in all_prompts(s, d)]
    out += [caption(t, d, f, pair) for t in HELDOUT_TEMPLATES if "{adj}" in t for d in range(10)
            for f in range(NUM_FORMS) for pair in unseen]
    return out


def training_words() -> list:
    """The distinct words of every training prompt (what the tokenizer's BPE is trained on)."""
    words = set()
    for d in range(10):
        for p in all_prompts("train", d):
            words.update(p.split())
    return sorted(words)
