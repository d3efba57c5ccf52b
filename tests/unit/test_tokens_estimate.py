"""baton.tokens' estimate: ids inside the model's vocabulary, counts unchanged by it."""

from __future__ import annotations

import asyncio

import pytest

from baton import tokens

TEXTS = ["", "a", "Hello there, how are you doing today?", "ünïcödé — 日本語のテキスト " * 7, "x" * 4097]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture
def estimate_32k():
    tokens.set_tokenizer(tokens.EstimateTokenizer(32_000))
    try:
        yield
    finally:
        tokens.set_tokenizer(None)


def test_ids_stay_inside_a_small_vocabulary(estimate_32k):
    text = "Hello there, how are you doing today?" * 50
    ids = tokens.tokenize(text)
    assert ids and all(0 <= t < 32_000 for t in ids)
    assert max(ids) > 0
    chat = tokens.tokenize_chat(MESSAGES)
    assert all(0 <= t < 32_000 for t in chat)
    assert asyncio.run(tokens.tokenize_async(text)) == ids
    assert asyncio.run(tokens.tokenize_async("", MESSAGES)) == chat


@pytest.mark.parametrize("text", TEXTS)
def test_the_vocabulary_changes_ids_never_counts(text, estimate_32k):
    ids = tokens.tokenize(text)
    assert len(ids) == tokens.count_text_tokens(text) == -(-len(text.encode()) // tokens.BYTES_PER_TOKEN)
    tokens.set_tokenizer(None)  # what a scheduler without the model's vocabulary counts
    assert tokens.count_text_tokens(text) == len(ids)
    assert tokens.count_prompt_tokens(text) == len(ids)


def test_chat_counts_agree_with_the_module_estimate(estimate_32k):
    n = tokens.count_chat_tokens(MESSAGES)
    assert n == len(tokens.tokenize_chat(MESSAGES))
    assert tokens.chat_text(MESSAGES) == tokens.chat_prompt_text(MESSAGES)
    tokens.set_tokenizer(None)
    assert tokens.count_chat_tokens(MESSAGES) == n


def test_llama3_vocabulary_keeps_the_documented_ids():
    text = "Hello there, how are you doing today?"
    assert tokens.active_tokenizer() is None
    default = tokens.tokenize(text)
    assert tokens.EstimateTokenizer(tokens.VOCAB_SIZE).encode_text(text) == default
    assert tokens.EstimateTokenizer().encode_text(text) == default
    # a larger vocabulary is used as is
    big = tokens.EstimateTokenizer(256_000).encode_text(text)
    assert len(big) == len(default) and max(big) < 256_000


@pytest.mark.parametrize("bad", [0, -1, True, 3.5, None])
def test_vocabulary_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="vocab_size"):
        tokens.EstimateTokenizer(bad)  # type: ignore[arg-type]


def test_a_null_content_adds_nothing_and_only_the_texts_of_content_parts_count():
    """An assistant message with tool calls has `content: null`: it flattens to its role alone, not "None"."""
    assert tokens.chat_prompt_text([{"role": "assistant", "content": None, "tool_calls": []}]) == "<|assistant|>"
    assert tokens.count_chat_tokens([{"role": "assistant", "content": None}]) == 4  # 13 bytes
    parts = [{"type": "text", "text": "hello "}, {"type": "image_url", "image_url": {"url": "x"}},
             {"type": "text", "text": None}, "stray", {"type": "text", "text": "there"}]
    assert tokens.chat_prompt_text([{"role": "user", "content": parts}]) == "<|user|>hello there"
