"""CLIP's byte-level BPE tokenizer, on the ``tokenizers`` package, with no network.

:class:`CLIPTokenizer` turns prompts into the ``[B, max_length]`` int32 ids (and attention mask)
that :class:`jaxdiff.models.CLIPTextModel` reads: ``<|startoftext|>``, the BPE tokens of the
cleaned, lower-cased prompt (truncated to ``max_length - 2``), ``<|endoftext|>``, then
``pad_token`` up to ``max_length``, as transformers' ``CLIPTokenizer(prompts,
padding="max_length", max_length=77, truncation=True)``. It runs in Python, outside ``jit``.

The BPE is transformers' (``CLIPTokenizerFast`` / transformers 5's ``CLIPTokenizer``): words are
split by CLIP's pattern (``<|startoftext|>``, ``<|endoftext|>``, ``'s|'t|'re|'ve|'m|'ll|'d``,
letter runs, single digits, runs of other non-space characters), mapped to GPT-2's byte alphabet,
and merged with ``</w>`` marking a word's last symbol. Text cleanup before it is one of:

- ``normalization="basic"`` (default): transformers 4's Python ``CLIPTokenizer`` when ``ftfy``
  is not installed (its ``BasicTokenizer`` fallback): drop NUL, U+FFFD and control characters
  (Unicode category C*, except tab / newline / CR), map whitespace to spaces, put spaces around
  CJK ideographs (so each is its own word), NFC, split on whitespace, Python ``str.lower()`` per
  word, join with single spaces.
- ``normalization="fast"``: transformers 5's ``CLIPTokenizer`` (a ``tokenizers`` pipeline): NFC,
  every whitespace run to a space, character-wise lowercase. The two agree on text without
  control characters, CJK ideographs, context-dependent lowercase (final sigma) or special
  tokens written in upper case (``"<|ENDOFTEXT|>"``: one EOS under ``"basic"`` and under
  transformers 4's ``CLIPTokenizerFast``; BPE pieces under ``"fast"``, as transformers 5).

Special tokens in a prompt (``<|endoftext|>`` written out) are matched before cleanup, as the
special tokens they are. OpenAI's original tokenizer also ran ``ftfy.fix_text`` and HTML
unescaping; neither mode does.
"""

from __future__ import annotations

import json
import os
import unicodedata
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from jaxdiff.validation import check_bool, check_choice, check_int

__all__ = ["CLIPTokenizer", "TokenizedPrompts", "basic_clean", "NORMALIZATIONS"]

NORMALIZATIONS = ("basic", "fast")
DEFAULT_MAX_LENGTH = 77
PADDINGS = ("max_length", "longest")
# CLIP's word pattern (transformers' CLIPTokenizer, from OpenAI's simple_tokenizer.py).
CLIP_PATTERN = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
_SPECIAL_DEFAULTS = dict(
    bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
    unk_token="<|endoftext|>",
)  # fmt: skip
# tokenizer_config.json keys that do not change the ids (or are checked below).
_CONFIG_NO_EFFECT = {
    "add_prefix_space", "errors", "name_or_path", "special_tokens_map_file", "tokenizer_class",
    "do_lower_case", "clean_up_tokenization_spaces", "added_tokens_decoder", "model_max_length",
    "processor_class", "tokenizer_file", "extra_special_tokens", "additional_special_tokens",
    "model_input_names", "padding_side", "truncation_side", "split_special_tokens", "vocab_file",
    "merges_file", "backend", "auto_map", "max_length", "pad_to_multiple_of",
    "is_local", "local_files_only",  # loading flags transformers 5 saves
}  # fmt: skip
_CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)  # fmt: skip


class TokenizedPrompts(NamedTuple):
    """``input_ids: [B, L]`` int32 numpy; ``attention_mask: [B, L]`` int32 (1: BOS, prompt and
    EOS tokens, 0: padding). ``L = max_length`` with ``padding="max_length"``."""

    input_ids: np.ndarray
    attention_mask: np.ndarray


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def basic_clean(text: str) -> str:
    """transformers' ``BasicTokenizer(strip_accents=False, do_split_on_punc=False)`` followed by
    ``" ".join``: the cleanup of transformers 4's ``CLIPTokenizer`` without ftfy (see the module
    docstring). ``str -> str``.

    >>> basic_clean("A  Photo\tof\u200b 日本, ΟΔΟΣ")
    'a photo of 日 本 , οδος'
    """
    out = []
    for ch in text:
        cp = ord(ch)
        if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
            out.append(" ")
        elif cp == 0 or cp == 0xFFFD or unicodedata.category(ch).startswith("C"):
            continue
        elif _is_cjk(cp):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    words = unicodedata.normalize("NFC", "".join(out)).split()
    return " ".join(w.lower() for w in words)


def _token_content(value: Any, name: str) -> str:
    """A special token as written in tokenizer_config.json / special_tokens_map.json: a string
    or an ``AddedToken`` dict with ``content``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string (or a dict with 'content')")
    return value


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer (see the module docstring for the exact pipeline).

    Args:
      vocab: token -> id, holding the special tokens (CLIP's ``vocab.json``: the 256 byte
        symbols, each with ``</w>``, the merged tokens, ``<|startoftext|>``, ``<|endoftext|>``).
      merges: the BPE merges in rank order, ``"a b"`` strings or ``(a, b)`` pairs (``merges.txt``
        without its ``#version`` line); each merged token must be in ``vocab``.
      max_length: the padded / truncated length ``L`` (77 for Stable Diffusion), >= 2.
      bos_token, eos_token, pad_token, unk_token: special tokens (in ``vocab``); SD 2.x pads with
        ``"!"``. A symbol that is not in ``vocab`` becomes ``unk_token``.
      normalization: ``"basic"`` or ``"fast"`` (module docstring).

    Raises:
      ValueError: naming the argument: a special token missing from ``vocab``, a merge that is
        not a pair or whose result is not in ``vocab``, a bad ``max_length`` / ``normalization``.
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[str | tuple[str, str]],
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        bos_token: str = _SPECIAL_DEFAULTS["bos_token"],
        eos_token: str = _SPECIAL_DEFAULTS["eos_token"],
        pad_token: str = _SPECIAL_DEFAULTS["pad_token"],
        unk_token: str = _SPECIAL_DEFAULTS["unk_token"],
        normalization: str = "basic",
    ):
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        self.max_length = check_int("max_length", max_length, minimum=2)
        self.normalization = check_choice("normalization", normalization, NORMALIZATIONS)
        vocab = dict(vocab)
        specials = dict(bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                        unk_token=unk_token)  # fmt: skip
        for name, token in specials.items():
            if token not in vocab:
                raise ValueError(f"{name}={token!r} is not in vocab")
        pairs = []
        for i, merge in enumerate(merges):
            pair = tuple(merge.split()) if isinstance(merge, str) else tuple(merge)
            if len(pair) != 2 or not all(isinstance(p, str) for p in pair):
                raise ValueError(f"merges[{i}] must be a pair of symbols, got {merge!r}")
            if pair[0] + pair[1] not in vocab:
                raise ValueError(f"merges[{i}] = {merge!r}: {pair[0] + pair[1]!r} is not in vocab")
            pairs.append(pair)
        tok = Tokenizer(
            BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk_token)
        )  # fmt: skip
        if normalization == "fast":
            tok.normalizer = normalizers.Sequence([
                normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()
            ])  # fmt: skip
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),  # + GPT-2 regex, as transformers
        ])  # fmt: skip
        tok.decoder = decoders.ByteLevel()
        unique = dict.fromkeys(specials.values())
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in unique])
        self._tokenizer = tok
        self._vocab = vocab
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token, self.unk_token = pad_token, unk_token
        self.bos_token_id, self.eos_token_id = vocab[bos_token], vocab[eos_token]
        self.pad_token_id, self.unk_token_id = vocab[pad_token], vocab[unk_token]

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, max_length: int | None = None, normalization: str = "basic"
    ) -> "CLIPTokenizer":
        """Load a checkpoint's ``tokenizer/`` folder, with no network.

        Reads ``vocab.json`` and ``merges.txt`` (a first line starting with ``#version`` is
        skipped, as the ``tokenizers`` reader does), and, when present, the special tokens of
        ``special_tokens_map.json`` and then ``tokenizer_config.json`` (which wins), and
        ``model_max_length`` (values above 10**6, transformers' "no limit", are ignored).

        Args:
          path: the folder.
          max_length: overrides the folder's ``model_max_length``; default that, else 77.
          normalization: see the class.

        Raises:
          ValueError: naming the folder / file for a missing ``vocab.json`` / ``merges.txt``, a
            JSON file that does not parse or holds no object, a ``vocab.json`` whose ids are not
            ints; naming the folder and the option for a ``tokenizer_config.json`` option that
            changes the ids and
            is not supported (``do_lower_case: false``, ``add_prefix_space: true``, a
            ``tokenizer_class`` other than CLIP's, added tokens other than the special tokens).
        """
        path = os.fspath(path)
        files = {n: os.path.join(path, n) for n in ("vocab.json", "merges.txt")}
        for name, file in files.items():
            if not os.path.isfile(file):
                raise ValueError(f"tokenizer folder {path!r} has no {name}")
        vocab = _read_json_object(files["vocab.json"])
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                   for v in vocab.values()):
            raise ValueError(f"{files['vocab.json']!r} must map tokens to ids (ints >= 0)")
        try:
            with open(files["merges.txt"], encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {files['merges.txt']!r} ({e})") from None
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = [line for line in lines if line.strip()]
        kwargs: dict[str, Any] = {}
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            file = os.path.join(path, name)
            if os.path.isfile(file):
                loaded = _read_json_object(file)
                config.update(loaded)
                for key in _SPECIAL_DEFAULTS:
                    if loaded.get(key) is not None:
                        kwargs[key] = _token_content(loaded[key], f"{name}: {key}")
        try:
            _check_tokenizer_config(config, vocab, kwargs)
            if max_length is None:
                model_max = config.get("model_max_length")
                ok = isinstance(model_max, int) and not isinstance(model_max, bool)
                max_length = model_max if ok and 2 <= model_max <= 10**6 else DEFAULT_MAX_LENGTH
            return cls(vocab, merges, max_length=max_length, normalization=normalization,
                       **kwargs)
        except ValueError as e:
            raise ValueError(f"tokenizer folder {path!r}: {e}") from None

    @property
    def vocab_size(self) -> int:
        """Entries of the vocabulary."""
        return len(self._vocab)

    def _bpe_model(self) -> dict:
        """The serialized BPE model that the ids come from (``tokenizers``' JSON)."""
        return json.loads(self._tokenizer.to_str())["model"]

    def get_vocab(self) -> dict[str, int]:
        """The vocabulary, token -> id, in id order: a new dict (as transformers'
        ``CLIPTokenizer.get_vocab``; the special tokens are in it). With :meth:`get_merges`, what
        a ``tokenizer/`` folder's ``vocab.json`` and ``merges.txt`` hold
        (:func:`jaxdiff.pipelines.save_tokenizer` writes them)."""
        return {str(k): int(v) for k, v in self._bpe_model()["vocab"].items()}

    def get_merges(self) -> list[tuple[str, str]]:
        """The BPE merges in rank order, as ``(a, b)`` pairs: a new list (``merges.txt`` holds
        them as ``"a b"`` lines after its ``#version`` line)."""
        merges = self._bpe_model()["merges"]   # "a b" strings or [a, b] lists by version
        return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]

    def _split_specials(self, text: str) -> list[str]:
        """Special tokens written in the text stay whole; the rest is cleaned (``basic``)."""
        if self.normalization == "fast":
            return [text]
        specials = sorted({self.bos_token, self.eos_token, self.pad_token, self.unk_token},
                          key=len, reverse=True)  # fmt: skip
        pieces, start, i = [], 0, 0
        while i < len(text):
            hit = next((s for s in specials if text.startswith(s, i)), None)
            if hit is None:
                i += 1
                continue
            pieces += [basic_clean(text[start:i]), hit]
            start = i = i + len(hit)
        pieces.append(basic_clean(text[start:]))
        return pieces

    def tokenize(self, text: str) -> list[str]:
        """The BPE tokens of one prompt, without BOS / EOS (``"a photo"`` ->
        ``["a</w>", "photo</w>"]`` with a vocabulary that has them)."""
        return [self._tokenizer.id_to_token(i) for i in self.encode(text)]

    def encode(self, text: str) -> list[int]:
        """The ids of one prompt, without BOS / EOS, not truncated."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        for piece in self._split_specials(text):
            if piece:
                ids += self._tokenizer.encode(piece, add_special_tokens=False).ids
        return ids

    def __call__(
        self,
        prompts: str | Sequence[str],
        *,
        max_length: int | None = None,
        padding: str = "max_length",
        truncation: bool = True,
    ) -> TokenizedPrompts:
        """Tokenize a prompt or a batch of prompts.

        Args:
          prompts: a ``str`` (a batch of one) or a non-empty sequence of ``str``; ``""`` is
            allowed (BOS, EOS, padding).
          max_length: default ``self.max_length``.
          padding: ``"max_length"`` (``L = max_length``) or ``"longest"`` (``L`` = the longest
            tokenized prompt, at most ``max_length`` when truncating).
          truncation: keep the first ``max_length - 2`` prompt tokens (then EOS). With False a
            longer prompt raises under ``"max_length"`` (the batch would be ragged).

        Returns:
          :class:`TokenizedPrompts`: ``input_ids`` and ``attention_mask``, ``[B, L]`` int32
          (:meth:`truncated_text` says what truncation cut off).

        Raises:
          ValueError: naming the argument, for a non-string prompt (``prompts[i]``), an empty
            batch, a bad ``padding`` / ``max_length``, or an over-long prompt without
            truncation.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("prompts must be a str or a non-empty sequence of str")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ValueError(f"prompts[{i}] must be a str, got {type(p).__name__}")
        max_length = self.max_length if max_length is None else max_length
        max_length = check_int("max_length", max_length, minimum=2)
        check_choice("padding", padding, PADDINGS)
        truncation = check_bool("truncation", truncation)
        rows = []
        for i, p in enumerate(prompts):
            ids = self.encode(p)
            if truncation:
                ids = ids[: max_length - 2]
            elif padding == "max_length" and len(ids) + 2 > max_length:
                raise ValueError(
                    f"prompts[{i}] has {len(ids) + 2} tokens > max_length={max_length} and "
                    f"truncation=False"
                )
            rows.append([self.bos_token_id, *ids, self.eos_token_id])
        length = max_length if padding == "max_length" else max(map(len, rows))
        input_ids = np.full((len(rows), length), self.pad_token_id, np.int32)
        mask = np.zeros((len(rows), length), np.int32)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return TokenizedPrompts(input_ids, mask)

    def truncated_text(self, prompt: str, *, max_length: int | None = None) -> str:
        """The part of ``prompt`` that ``__call__`` with ``truncation=True`` cuts off: its tokens
        beyond the first ``max_length - 2`` (default ``self.max_length``), decoded; ``""`` when
        the prompt fits. For the warning diffusers' pipelines give about long prompts.

        >>> tok = CLIPTokenizer({**{c: i for i, c in enumerate("abc")}, "a</w>": 3,
        ...                      "b</w>": 4, "c</w>": 5, "<|startoftext|>": 6, "<|endoftext|>": 7},
        ...                     [], max_length=4)
        >>> tok.truncated_text("a b"), tok.truncated_text("a b c")
        ('', 'c')
        """
        max_length = check_int("max_length", self.max_length if max_length is None
                               else max_length, minimum=2)
        cut = self.encode(prompt)[max_length - 2:]
        return self.decode(cut, skip_special_tokens=False) if cut else ""

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Ids -> text (``</w>`` becomes a space, ends stripped), as transformers decodes."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        return text.replace("</w>", " ").strip()


def _read_json_object(file: str) -> dict:
    """The JSON object in ``file``; ``ValueError`` naming the file otherwise."""
    try:
        with open(file, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {file!r} as JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file!r} must hold a JSON object, got {type(value).__name__}")
    return value


def _check_tokenizer_config(config: Mapping[str, Any], vocab: Mapping[str, int], specials) -> None:
    unknown = sorted(
        k for k in config
        if k not in _CONFIG_NO_EFFECT and k not in _SPECIAL_DEFAULTS
    )  # fmt: skip
    if unknown:
        raise ValueError(f"unknown tokenizer_config.json options: {unknown}")
    bad = []
    if config.get("do_lower_case", True) is not True:
        bad.append(f"do_lower_case={config['do_lower_case']!r} (supported: true)")
    if config.get("add_prefix_space", False) is not False:
        bad.append(f"add_prefix_space={config['add_prefix_space']!r} (supported: false)")
    cls = config.get("tokenizer_class")
    if cls is not None and cls not in ("CLIPTokenizer", "CLIPTokenizerFast"):
        bad.append(f"tokenizer_class={cls!r} (supported: CLIPTokenizer, CLIPTokenizerFast)")
    known = set(_SPECIAL_DEFAULTS.values()) | set(specials.values())
    extra = [
        _token_content(t, "added_tokens_decoder entry")
        for t in (config.get("added_tokens_decoder") or {}).values()
    ] + [_token_content(t, "additional_special_tokens") for t in
         config.get("additional_special_tokens") or []]  # fmt: skip
    extra = sorted({t for t in extra if t not in known})
    if extra:
        bad.append(f"added tokens {extra} (supported: only the bos/eos/pad/unk tokens)")
    if bad:
        raise ValueError("unsupported tokenizer_config.json options: " + "; ".join(bad))
