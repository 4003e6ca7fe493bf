"""The warning about text that the tokenizer cuts off, as diffusers' pipelines give it: one home
for every place jaxdiff tokenizes prompts or captions (the Stable Diffusion pipeline's prompts and
negative prompts, fine-tuning captions, the text-to-MNIST training prompts).

A prompt longer than the tokenizer's ``max_length - 2`` tokens (BOS and EOS take two) is
truncated by :class:`~jaxdiff.text.CLIPTokenizer`; :func:`warn_truncated` says so with a
``logging`` warning that quotes the part that was dropped (here the second of two prompts,
"an image of a thick and slanted handwritten digit that is a seven", with the text-to-MNIST
tokenizer's 12 positions)::

    prompt[1] is longer than the 10 tokens the text encoder reads (12 with BOS and EOS); this
    part was truncated: 'that is a seven'
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

__all__ = ["MAX_SHOWN", "truncation_messages", "warn_truncated", "rows_text"]

log = logging.getLogger(__name__)

# Characters of the dropped text quoted in a warning; the rest is counted.
MAX_SHOWN = 300


def _shown(dropped: str) -> str:
    if len(dropped) <= MAX_SHOWN:
        return dropped
    return f"{dropped[:MAX_SHOWN]} ... ({len(dropped) - MAX_SHOWN} more characters)"


def truncation_messages(tokenizer, texts: Sequence[str], *, name: str = "prompt",
                        label: Optional[Callable[[list], str]] = None) -> list[str]:
    """The warnings for ``texts``: one per distinct dropped text, in order of first appearance.

    Args:
      tokenizer: a :class:`~jaxdiff.text.CLIPTokenizer` (anything with ``max_length`` and
        ``truncated_text(text) -> str``).
      texts: the prompts (or captions), as tokenized in one call.
      name: what they are, for the default label: ``name`` for a single text, else
        ``name[rows]`` (``"prompt[1, 3]"``, ``"prompt[0..99]"``: the rows that lose the same
        text, :func:`rows_text`).
      label: ``label(rows) -> str`` instead of the default (e.g. naming the caption's file).

    Returns:
      ``"<label> is longer than the K tokens the text encoder reads (K + 2 with BOS and EOS);
      this part was truncated: '<dropped>'"`` for each distinct dropped text (the dropped text
      quoted with ``repr``, its first :data:`MAX_SHOWN` characters); ``[]`` when all fit.
    """
    texts = list(texts)
    cut: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        dropped = tokenizer.truncated_text(text)
        if dropped:
            cut.setdefault(dropped, []).append(i)
    if label is None:
        def label(rows):
            return name if len(texts) == 1 else f"{name}[{rows_text(rows)}]"
    n = tokenizer.max_length
    return [f"{label(rows)} is longer than the {n - 2} tokens the text encoder reads ({n} with "
            f"BOS and EOS); this part was truncated: {_shown(dropped)!r}"
            for dropped, rows in cut.items()]


def rows_text(rows: Sequence[int]) -> str:
    """Sorted row indices, with runs of three or more written as ``first..last``:
    ``[0, 2]`` -> ``"0, 2"``, ``[0, 1, ..., 99]`` -> ``"0..99"``, ``[1, 2, 3, 7]`` ->
    ``"1..3, 7"``."""
    rows, parts, i = sorted(rows), [], 0
    while i < len(rows):
        j = i
        while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1:
            j += 1
        parts += [f"{rows[i]}..{rows[j]}"] if j - i >= 2 else [str(r) for r in rows[i:j + 1]]
        i = j + 1
    return ", ".join(parts)


def warn_truncated(tokenizer, texts: Sequence[str], *, name: str = "prompt",
                   label: Optional[Callable[[list], str]] = None,
                   logger: Optional[logging.Logger] = None) -> list[str]:
    """Log a warning for each distinct text that ``tokenizer`` truncates
    (:func:`truncation_messages`), on ``logger`` (default this module's; the callers pass
    their own, so that the warning comes from the module that tokenized). Returns the
    messages."""
    messages = truncation_messages(tokenizer, texts, name=name, label=label)
    for message in messages:
        (logger or log).warning("%s", message)
    return messages
