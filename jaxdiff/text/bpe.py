"""Build a CLIP byte-level BPE vocabulary for a small corpus, in the files CLIP checkpoints use.

:func:`train_clip_bpe` learns BPE merges on the words of ``texts`` (cleaned and split as
:class:`jaxdiff.text.CLIPTokenizer` does; ``</w>`` marks a word's last symbol), merging the most
frequent adjacent pair (ties: the lexicographically smallest) until every word of the corpus is a
single token or ``max_merges`` is reached. The vocabulary is laid out as OpenAI's CLIP's: the 256
byte symbols (GPT-2's byte-to-unicode alphabet), the same with ``</w>``, one token per merge in
merge order, then ``<|startoftext|>`` and ``<|endoftext|>`` (the largest id, as in CLIP). Text
outside the corpus still tokenizes (into byte symbols and the learned pieces).

:func:`save_clip_tokenizer` writes ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and
``special_tokens_map.json``: a folder that :meth:`CLIPTokenizer.from_pretrained` and transformers'
``CLIPTokenizer.from_pretrained`` load.

    >>> vocab, merges = train_clip_bpe(["a handwritten seven", "the digit 7"])
    >>> from jaxdiff.text import CLIPTokenizer
    >>> tok = CLIPTokenizer(vocab, merges, max_length=8)
    >>> tok.tokenize("a handwritten seven")
    ['a</w>', 'handwritten</w>', 'seven</w>']
"""

from __future__ import annotations

import collections
import json
import os
from typing import Iterable

from jaxdiff.text.tokenizer import CLIP_PATTERN, basic_clean
from jaxdiff.validation import check_int

__all__ = ["bytes_to_unicode", "train_clip_bpe", "save_clip_tokenizer", "BOS", "EOS"]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict:
    """GPT-2's (and CLIP's) reversible byte -> printable unicode character table (256 entries)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _words(texts: Iterable[str]) -> collections.Counter:
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True)
    byte_map = bytes_to_unicode()
    counts: collections.Counter = collections.Counter()
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}] must be a str, got {type(text).__name__}")
        for word, _ in split.pre_tokenize_str(basic_clean(text)):
            if word in (BOS, EOS):
                continue
            symbols = [byte_map[b] for b in word.encode("utf-8")]
            symbols[-1] += "</w>"
            counts[tuple(symbols)] += 1
    return counts


def train_clip_bpe(texts: Iterable[str], *, max_merges: int | None = None):
    """Learns CLIP BPE merges on ``texts``; returns ``(vocab: dict[str, int], merges: list[str])``
    (``merges`` as ``"a b"`` lines in rank order).

    Args:
      texts: the corpus (strings); repeated words weigh more.
      max_merges: stop after this many merges (default: until every word is one token).

    Raises:
      ValueError: naming ``texts`` (a non-string entry) or ``max_merges``.
    """
    if max_merges is not None:
        max_merges = check_int("max_merges", max_merges, minimum=0)
    words = _words(texts)
    byte_map = bytes_to_unicode()
    base = list(byte_map.values())
    vocab_list = base + [s + "</w>" for s in base]
    merges: list[str] = []
    while max_merges is None or len(merges) < max_merges:
        pairs: collections.Counter = collections.Counter()
        for symbols, c in words.items():
            for a, b in zip(symbols, symbols[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(f"{best[0]} {best[1]}")
        vocab_list.append(best[0] + best[1])
        merged = collections.Counter()
        for symbols, c in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += c
        words = merged
    vocab_list += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def save_clip_tokenizer(folder: str, vocab: dict, merges: list, *, max_length: int) -> str:
    """Writes a CLIP tokenizer folder (``vocab.json``, ``merges.txt`` with its ``#version``
    line, ``tokenizer_config.json`` with ``model_max_length = max_length``,
    ``special_tokens_map.json``; padding with ``<|endoftext|>`` as SD 1.x). Returns ``folder``.

    Raises:
      ValueError: naming ``max_length`` (< 2) or ``vocab`` (without the special tokens).
    """
    max_length = check_int("max_length", max_length, minimum=2)
    for tok in (BOS, EOS):
        if tok not in vocab:
            raise ValueError(f"vocab has no {tok!r}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(["#version: 0.2", *merges]) + "\n")
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(specials, f, indent=2)
    config = dict(specials, tokenizer_class="CLIPTokenizer", model_max_length=max_length,
                  do_lower_case=True, errors="replace")
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return folder
