"""The one warning about prompts the tokenizer cuts (:mod:`jaxdiff.text.truncation`): it quotes
what was dropped, groups the rows that lose the same text, and comes from the caller's logger;
the text-to-MNIST training prompts get it too. (The Stable Diffusion pipeline's prompts and
negative prompts: tests/test_sd_pipeline.py; fine-tuning captions: tests/test_image_folder.py.)"""

from __future__ import annotations

import logging

import pytest

from jaxdiff.text import CLIPTokenizer, truncation_messages, warn_truncated
from jaxdiff.text.bpe import save_clip_tokenizer, train_clip_bpe

WORDS = ("a", "handwritten", "digit", "that", "is", "seven", "neat", "and", "bold")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A CLIP BPE learnt on WORDS (one token a word), 4 prompt tokens (6 with BOS and EOS)."""
    folder = str(tmp_path_factory.mktemp("tok"))
    save_clip_tokenizer(folder, *train_clip_bpe([" ".join(WORDS)]), max_length=6)
    return CLIPTokenizer.from_pretrained(folder)


def test_the_message_names_the_dropped_words(tok):
    long = "a handwritten digit that is a seven"
    [msg] = truncation_messages(tok, [long])
    assert msg == ("prompt is longer than the 4 tokens the text encoder reads (6 with BOS and "
                   "EOS); this part was truncated: 'is a seven'")
    assert truncation_messages(tok, ["a seven", "a neat bold seven"]) == []


def test_rows_that_lose_the_same_text_are_one_message(tok):
    texts = ["a neat and bold seven", "a seven", "a bold and neat seven", "digit that is bold"]
    msgs = truncation_messages(tok, texts, name="negative_prompt")
    assert msgs == [
        "negative_prompt[0, 2] is longer than the 4 tokens the text encoder reads (6 with BOS "
        "and EOS); this part was truncated: 'seven'"]
    msgs = truncation_messages(tok, texts, label=lambda rows: f"the caption of file{rows[0]}")
    assert msgs[0].startswith("the caption of file0 is longer than")


def test_runs_of_rows_are_written_as_ranges(tok):
    from jaxdiff.text.truncation import rows_text

    assert rows_text([2, 0]) == "0, 2" and rows_text([5]) == "5"
    assert rows_text([1, 2, 3, 7, 8, 10, 11, 12, 13]) == "1..3, 7, 8, 10..13"
    [msg] = truncation_messages(tok, ["a neat and bold seven"] * 100)
    assert msg.startswith("prompt[0..99] is longer than"), msg


def test_a_very_long_cut_is_shown_in_part(tok):
    dropped = " ".join(["seven"] * 100)                       # 599 characters
    [msg] = truncation_messages(tok, ["a a a a " + dropped])
    assert msg.endswith(f"truncated: '{dropped[:300]} ... (299 more characters)'"), msg


def test_warn_truncated_logs_on_the_callers_logger(tok, caplog):
    logger = logging.getLogger("some.caller")
    with caplog.at_level(logging.WARNING, logger="some.caller"):
        out = warn_truncated(tok, ["a seven", "a digit that is a seven"], logger=logger)
    assert [r.name for r in caplog.records] == ["some.caller"]
    assert caplog.records[0].getMessage() == out[0] and out[0].startswith("prompt[1] is longer")
    assert out[0].endswith("truncated: 'a seven'")


def test_training_prompts_that_do_not_fit_are_named(tmp_path, caplog):
    """The text-to-MNIST training table (experiments.latent_data.prompt_ids_table) with a
    tokenizer too short for its longer templates: a warning names what was dropped."""
    from experiments import latent_data

    small = latent_data.build_tokenizer(str(tmp_path / "tok"), max_length=5)
    with caplog.at_level(logging.WARNING, logger="jaxdiff.text.truncation"):
        latent_data.prompt_ids_table(small)
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs and all(m.startswith("train prompt[") for m in msgs), msgs[:3]
    assert all("the text encoder reads (5 with BOS and EOS); this part was truncated: '" in m
               for m in msgs)
