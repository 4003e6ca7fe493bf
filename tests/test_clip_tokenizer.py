"""jaxdiff.text.CLIPTokenizer against transformers' ``CLIPTokenizer`` built from the same files.

The vocabulary is learned here (a few BPE merges over a small corpus, GPT-2's byte alphabet, with
and without ``</w>``, then the special tokens: CLIP's layout), so nothing is downloaded.
``normalization="fast"`` is compared with transformers 5's ``CLIPTokenizer`` directly;
``"basic"`` (transformers 4's Python ``CLIPTokenizer`` without ftfy) with transformers'
``BasicTokenizer(strip_accents=False, do_split_on_punc=False)`` followed by that tokenizer, which
is how transformers 4 composed it.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import regex
import transformers
from transformers import CLIPTokenizer as HFCLIPTokenizer
from transformers.models.bert.tokenization_bert_legacy import BasicTokenizer

from jaxdiff.text import CLIPTokenizer, basic_clean
from jaxdiff.text.tokenizer import CLIP_PATTERN

transformers.logging.set_verbosity_error()

CORPUS = (
    "a photo of a cat sitting on the mat. the quick brown fox jumps over the lazy dog "
    "an astronaut riding a horse on the moon, highly detailed, 4k, trending on artstation "
    "café naïve straße résumé 日本語の写真 ΟΔΟΣ οδος emoji 🙂 it's don't we're they've I'm"
)
TEXTS = [
    "a photo of a cat", "", "   ", "A Photo OF a CAT!!!", "the quick brown fox, jumps... 42 dogs",
    "café naïve straße résumé", "cafe\u0301 (decomposed)", "日本語の写真です", "ΟΔΟΣ οδος ΑΣ",
    "emoji 🙂🙂 ok", "it's don't WE'RE they've i'm you'll he'd", "tabs\tand\nnewlines\r\n  x",
    "zero\u200bwidth\u00a0nbsp", "ctrl\x01char\x7f and \ufffd", "a <|endoftext|> b",
    "<|startoftext|>x", "İstanbul ǅ ß ﬁ", "unknown ✓ ∑ 𝔘𝔫𝔦", "x\u2028y\u2029z\u0085w",
    "𠀀 漢字 ｶﾀｶﾅ", "1234567890", "a.b,c;d:e!f?g", "‘curly’ “quotes”",
]  # fmt: skip
LONG = "an astronaut riding a horse on the moon, highly detailed, 4k, trending " * 4


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (CLIP's ``bytes_to_unicode``)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_bpe(corpus: str, n_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-layout vocabulary (bytes, bytes + ``</w>``, merges, BOS, EOS) and its merges."""
    alphabet = byte_alphabet()
    words = collections.Counter()
    for w in regex.findall(CLIP_PATTERN, corpus.lower()):
        symbols = [alphabet[b] for b in w.encode()]
        symbols[-1] += "</w>"
        words[tuple(symbols)] += 1
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, c in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = collections.Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if w[i : i + 2] == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += c
        words = merged
    chars = list(alphabet.values())
    tokens = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges),
              "<|startoftext|>", "<|endoftext|>"]  # fmt: skip
    return {t: i for i, t in enumerate(tokens)}, merges


def write_folder(path, vocab, merges, **configs):
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(" ".join(m) for m in merges)]
    (path / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for name, content in configs.items():
        (path / f"{name}.json").write_text(json.dumps(content), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    vocab, merges = learn_bpe(CORPUS, 120)
    at = lambda c: {"__type": "AddedToken", "content": c, "lstrip": False,  # noqa: E731
                    "normalized": True, "rstrip": False, "single_word": False}  # fmt: skip
    config = {  # SD 1.x's tokenizer_config.json, as written by transformers 4
        "add_prefix_space": False, "bos_token": at("<|startoftext|>"), "do_lower_case": True,
        "eos_token": at("<|endoftext|>"), "errors": "replace", "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14", "pad_token": "<|endoftext|>",
        "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer",
        "unk_token": at("<|endoftext|>"),
    }  # fmt: skip
    special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    path = tmp_path_factory.mktemp("tokenizer")
    return write_folder(path, vocab, merges, tokenizer_config=config, special_tokens_map=special)


@pytest.fixture(scope="module")
def hf(folder):
    return HFCLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def hf_ids(hf, texts, **kw):
    kw = {"padding": "max_length", "max_length": 77, "truncation": True, **kw}
    enc = hf(texts, **kw)
    return np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"])


def basic_reference(text: str) -> str:
    """transformers 4's CLIPTokenizer._tokenize cleanup without ftfy."""
    return " ".join(BasicTokenizer(strip_accents=False, do_split_on_punc=False).tokenize(text))


def test_vocabulary_has_merged_words(folder):
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert "photo</w>" in vocab and "the</w>" in vocab and len(vocab) > 512 + 60


@pytest.mark.parametrize("text", TEXTS + [LONG])
def test_fast_matches_transformers(folder, hf, text):
    tok = CLIPTokenizer.from_pretrained(folder, normalization="fast")
    ids, mask = tok(text)
    ref_ids, ref_mask = hf_ids(hf, [text])
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (1, 77)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)


@pytest.mark.parametrize("text", TEXTS + [LONG, "AB<|ENDOFTEXT|>c"])
def test_basic_matches_transformers_basic_tokenizer_path(folder, hf, text):
    tok = CLIPTokenizer.from_pretrained(folder)
    assert basic_clean(text) == basic_reference(text)
    ref_ids, ref_mask = hf_ids(hf, [basic_reference(text)])
    ids, mask = tok(text)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)


def test_the_two_normalizations_differ_where_documented(folder):
    basic = CLIPTokenizer.from_pretrained(folder)
    fast = CLIPTokenizer.from_pretrained(folder, normalization="fast")
    for text in ("日本語", "zero\u200bwidth", "ΟΔΟΣ", "AB<|ENDOFTEXT|>c"):
        assert basic.encode(text) != fast.encode(text), text
    assert basic.encode("A photo, of 2 cats!") == fast.encode("A photo, of 2 cats!")
    assert basic.encode("AB<|ENDOFTEXT|>c").count(basic.eos_token_id) == 1


def test_batch_truncation_padding_and_empty_prompt(folder, hf):
    tok = CLIPTokenizer.from_pretrained(folder)
    prompts = ["a photo of a cat", "", LONG]
    ids, mask = tok(prompts)
    ref_ids, ref_mask = hf_ids(hf, prompts)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)
    assert ids[1, :3].tolist() == [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]
    assert mask[1].sum() == 2 and mask[2].all() and ids[2, -1] == tok.eos_token_id
    assert len(tok.encode(LONG)) > 75  # the long prompt really was truncated
    for kw in (dict(max_length=12), dict(padding="longest"), dict(padding="longest", max_length=9)):
        ids, mask = tok(prompts, **kw)
        ref_ids, ref_mask = hf_ids(hf, prompts, **{"max_length": 77, **kw})
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(mask, ref_mask)
    ids, _ = tok(prompts[:2], padding="longest", truncation=False)
    assert ids.shape == (2, len(tok.encode(prompts[0])) + 2)


def test_truncated_text_is_what_diffusers_warns_about(folder, hf):
    """diffusers' ``encode_prompt`` warns with ``batch_decode(untruncated_ids[:, L - 1:-1])``
    (the ids past the kept ones, without the final EOS); ``truncated_text`` is that text."""
    tok = CLIPTokenizer.from_pretrained(folder)
    assert tok.truncated_text("a photo of a cat") == "" and tok.truncated_text("") == ""
    untruncated = hf(LONG, padding="longest", return_tensors="np").input_ids
    ref = hf.batch_decode(untruncated[:, 77 - 1:-1])[0]
    assert tok.truncated_text(LONG) == ref.strip() != ""
    kept = tok.encode(LONG)[:75]
    assert tok.encode(tok.decode(kept) + " " + tok.truncated_text(LONG)) == tok.encode(LONG)
    assert tok.truncated_text(LONG, max_length=10) == tok.decode(tok.encode(LONG)[8:])


def test_sd2_style_pad_token_and_max_length_from_folder(tmp_path, folder):
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(m.split()) for m in (folder / "merges.txt").read_text().split("\n")[1:] if m]
    path = write_folder(tmp_path / "sd2", vocab, merges,
                        special_tokens_map={"pad_token": "!"},
                        tokenizer_config={"model_max_length": 20})  # fmt: skip
    tok = CLIPTokenizer.from_pretrained(path)
    ref = HFCLIPTokenizer.from_pretrained(str(path))
    assert tok.max_length == 20 and tok.pad_token_id == vocab["!"]
    ids, mask = tok(["a cat!", ""])
    ref_ids, ref_mask = hf_ids(ref, ["a cat!", ""], max_length=20)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)
    # transformers' "no limit" model_max_length, or none at all: 77
    big = write_folder(tmp_path / "big", vocab, merges,
                       tokenizer_config={"model_max_length": 10**30})  # fmt: skip
    assert CLIPTokenizer.from_pretrained(big).max_length == 77
    assert CLIPTokenizer.from_pretrained(write_folder(tmp_path / "no_config", vocab, merges)
                                         ).max_length == 77  # fmt: skip
    assert CLIPTokenizer.from_pretrained(big, max_length=8).max_length == 8


def test_tokenize_and_decode(folder, hf):
    tok = CLIPTokenizer.from_pretrained(folder)
    assert tok.tokenize("a photo") == hf.tokenize("a photo")
    assert tok.tokenize("a photo")[-1].endswith("</w>")
    ids, _ = tok("A photo of a cat, 4k!")
    assert tok.decode(ids[0]) == hf.decode(ids[0].tolist(), skip_special_tokens=True)
    assert tok.decode(ids[0]) == "a photo of a cat , 4 k !"
    assert tok.vocab_size == len(json.loads((folder / "vocab.json").read_text(encoding="utf-8")))


def test_get_vocab_and_merges_are_the_folders(folder, hf):
    """The public accessors (what save_tokenizer writes): the folder's vocabulary, in id order,
    as transformers' get_vocab has it, and its merges in rank order; new containers each call."""
    tok = CLIPTokenizer.from_pretrained(folder)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    got = tok.get_vocab()
    assert got == vocab == hf.get_vocab() and list(got.values()) == sorted(got.values())
    assert tok.get_merges() == [tuple(m.split(" ")) for m in lines if m]
    got["extra"] = 10**6
    tok.get_merges().clear()
    assert "extra" not in tok.get_vocab() and len(tok.get_merges()) == len([m for m in lines if m])
    shuffled = CLIPTokenizer(dict(reversed(list(vocab.items()))), tok.get_merges())
    assert list(shuffled.get_vocab().items()) == list(vocab.items())   # id order, not insertion


def test_errors_name_the_argument(folder, tmp_path):
    tok = CLIPTokenizer.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        tok(["ok", 3])
    with pytest.raises(ValueError, match="prompts"):
        tok([])
    with pytest.raises(ValueError, match="padding"):
        tok("x", padding="do_not_pad")
    with pytest.raises(ValueError, match="max_length"):
        tok("x", max_length=1)
    with pytest.raises(ValueError, match=r"prompts\[0\].*truncation=False"):
        tok(LONG, truncation=False)
    with pytest.raises(ValueError, match="normalization"):
        CLIPTokenizer.from_pretrained(folder, normalization="ftfy")
    only_vocab = tmp_path / "only_vocab"
    only_vocab.mkdir()
    (only_vocab / "vocab.json").write_text("{}")
    with pytest.raises(ValueError, match="no merges.txt"):
        CLIPTokenizer.from_pretrained(only_vocab)
    vocab, merges = learn_bpe("a cat", 2)
    with pytest.raises(ValueError, match="bos_token"):
        CLIPTokenizer({k: v for k, v in vocab.items() if k != "<|startoftext|>"}, merges)
    with pytest.raises(ValueError, match=r"merges\[0\]"):
        CLIPTokenizer(vocab, [("zz", "qq")])
    for config, match in (({"do_lower_case": False}, "do_lower_case"),
                          ({"tokenizer_class": "GPT2Tokenizer"}, "tokenizer_class"),
                          ({"additional_special_tokens": ["<cat>"]}, "added tokens"),
                          ({"some_new_option": 1}, "some_new_option")):  # fmt: skip
        path = write_folder(tmp_path / match, vocab, merges, tokenizer_config=config)
        with pytest.raises(ValueError, match=match):
            CLIPTokenizer.from_pretrained(path)
