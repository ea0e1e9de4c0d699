"""The tokenizer service's core against transformers, and UTF-8-safe incremental detokenization."""

from __future__ import annotations

import pytest

from services.tokenizer.detokenizer import REPLACEMENT, IncrementalDetokenizer
from services.tokenizer.text import ChatTemplateError, Message, TextTokenizer

TEXTS = [
    "北京是中国的首都，也是一座历史悠久的城市。",
    "Emoji: 🎉👩‍👩‍👧 and Ünïcödé — mixed 中文 text 😀!",
    "Plain English with  double  spaces\nand a newline.",
]


@pytest.fixture(scope="module")
def tok(real_model_dir) -> TextTokenizer:
    return TextTokenizer(real_model_dir)


@pytest.fixture(scope="module")
def hf_tok(real_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_model_dir)


@pytest.mark.parametrize("messages", [
    [Message("user", "What is the capital of France?")],
    [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "你好")],
])
def test_chat_template_matches_transformers(tok, hf_tok, messages):
    expected = hf_tok.apply_chat_template([m.__dict__ for m in messages], add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert tok.encode_chat(messages) == list(expected)


def test_raw_prompt_matches_transformers(tok, hf_tok):
    for text in TEXTS:
        assert tok.encode(text) == hf_tok(text)["input_ids"]


def test_unknown_role_is_refused(tok):
    with pytest.raises(ChatTemplateError, match="role"):
        tok.encode_chat([Message("wizard", "hi")])


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_detokenizer_never_breaks_a_character(tok, text, chunk):
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)] + [detok.flush()]
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == text
    # The test is worth something only if some token really splits a character.
    if not text.isascii():
        assert any(d == "" for d in deltas[:-1])


def test_detokenizer_drops_an_unfinished_character_at_the_end(tok):
    ids = tok.encode("好")
    assert len(ids) > 1, "needs a character split over tokens"
    detok = IncrementalDetokenizer(tok)
    assert detok.push(ids[:-1]) == ""
    assert detok.flush() == ""


def test_special_tokens_are_skipped_unless_asked(tok):
    ids = tok.encode_chat([Message("user", "hi")])
    assert "<|im_start|>" not in "".join([IncrementalDetokenizer(tok).push(ids)])
    assert "<|im_start|>" in IncrementalDetokenizer(tok, skip_special_tokens=False).push(ids)
