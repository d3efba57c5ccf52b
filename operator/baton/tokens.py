"""Prompt length, counted the same way by the scheduler and the engine simulator.

Routing depends on prompt length, so both sides must agree on it:
- a prompt given as token ids (OpenAI `prompt` as a list of integers) is exact: its length;
- a text prompt is counted with the model's own tokenizer when the process has one
  (`set_tokenizer`, a `baton.model_tokenizer.ModelTokenizer`: the scheduler's `tokenizer` config, the
  engine simulator's MODEL_DIR/tokenizer.json), exactly as trtllm-serve would;
- otherwise with a documented, deterministic stand-in: one token per 4 bytes of UTF-8 (rounded up), the
  usual rule of thumb for English text with BPE tokenizers. Token ids are derived from the bytes (CRC-32 of
  each 4-byte chunk modulo the vocabulary size), so the same text always yields the same ids on every
  process. The vocabulary is the model's when the process knows it (`EstimateTokenizer(vocab_size)`, what
  the engine simulator installs from config.json `vocab_size`), else Llama-3's 128,256; the vocabulary
  changes only the ids, never the count. Chat messages are flattened first (`chat_prompt_text`).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

BYTES_PER_TOKEN = 4
VOCAB_SIZE = 128_256  # Llama-3 vocabulary size: the estimate's ids when no model vocabulary is known
ESTIMATE_SOURCE = "estimate (4 bytes of UTF-8 per token)"


class Tokenizer(Protocol):
    """What a real tokenizer provides (`baton.model_tokenizer.ModelTokenizer`)."""

    def encode_text(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], request: Mapping[str, Any] | None = None,
                    ) -> list[int]: ...

    def count_text(self, text: str) -> int: ...

    def count_chat(self, messages: Sequence[Mapping[str, Any]], request: Mapping[str, Any] | None = None) -> int: ...

    def chat_text(self, messages: Sequence[Mapping[str, Any]], request: Mapping[str, Any] | None = None,
                  ) -> tuple[str, bool]: ...

    async def encode_async(self, text: str, special: bool = True) -> list[int]: ...


_tokenizer: Tokenizer | None = None


def set_tokenizer(tokenizer: Tokenizer | None) -> None:
    """Count and tokenize with `tokenizer` in this process from now on (None: the estimate)."""
    global _tokenizer
    _tokenizer = tokenizer


def active_tokenizer() -> Tokenizer | None:
    return _tokenizer


def _estimate_ids(text: str, vocab_size: int = VOCAB_SIZE) -> list[int]:
    data = text.encode("utf-8")
    return [
        zlib.crc32(data[i : i + BYTES_PER_TOKEN]) % vocab_size for i in range(0, len(data), BYTES_PER_TOKEN)
    ]


def _estimate_count(text: str) -> int:
    return -(-len(text.encode("utf-8")) // BYTES_PER_TOKEN)


class EstimateTokenizer:
    """The documented estimate (one token per 4 bytes of UTF-8) with ids inside a model's vocabulary.

    Counts exactly as the module-level estimate does (so a scheduler without the model's vocabulary still
    agrees on every length); only the ids are reduced modulo `vocab_size` instead of Llama-3's 128,256, so
    that ids a worker returns (`prompt_token_ids`) are valid input for another worker of the same model."""

    source = ESTIMATE_SOURCE

    def __init__(self, vocab_size: int = VOCAB_SIZE) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        self.vocab_size = vocab_size

    def encode_text(self, text: str) -> list[int]:
        return _estimate_ids(text, self.vocab_size)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], request: Mapping[str, Any] | None = None,
                    ) -> list[int]:
        return _estimate_ids(chat_prompt_text(messages), self.vocab_size)

    def count_text(self, text: str) -> int:
        return _estimate_count(text)

    def count_chat(self, messages: Sequence[Mapping[str, Any]], request: Mapping[str, Any] | None = None) -> int:
        return _estimate_count(chat_prompt_text(messages))

    def chat_text(self, messages: Sequence[Mapping[str, Any]], request: Mapping[str, Any] | None = None,
                  ) -> tuple[str, bool]:
        return chat_prompt_text(messages), False

    async def encode_async(self, text: str, special: bool = True) -> list[int]:
        return _estimate_ids(text, self.vocab_size)

    def __repr__(self) -> str:
        return f"EstimateTokenizer(vocab_size={self.vocab_size})"


def tokenize(text: str) -> list[int]:
    """Token ids of a completions prompt: the model's tokenizer, else one id per 4-byte chunk of UTF-8."""
    if _tokenizer is not None:
        return _tokenizer.encode_text(text)
    return _estimate_ids(text)


def tokenize_chat(messages: Sequence[Mapping[str, Any]], request: Mapping[str, Any] | None = None) -> list[int]:
    """Token ids of a chat prompt: the model's chat template and tokenizer, else the flattened messages.
    `request` is the chat request's body: the fields trtllm-serve passes to the template besides the messages
    (`tools`, `documents`, `add_generation_prompt`, `chat_template_kwargs`) are read from it."""
    if _tokenizer is not None:
        return _tokenizer.encode_chat(messages, request)
    return _estimate_ids(chat_prompt_text(messages))


def chat_text(messages: Sequence[Mapping[str, Any]], request: Mapping[str, Any] | None = None) -> str:
    """A chat prompt as text (what a text-input runtime such as Triton gets): the model's chat template
    when there is one, else the flattened messages."""
    if _tokenizer is not None:
        return _tokenizer.chat_text(messages, request)[0]
    return chat_prompt_text(messages)


def count_text_tokens(text: str) -> int:
    """Token count for `text` without materialising ids when the estimate is in use."""
    if _tokenizer is not None:
        return _tokenizer.count_text(text)
    return _estimate_count(text)


def count_chat_tokens(messages: Sequence[Mapping[str, Any]], request: Mapping[str, Any] | None = None) -> int:
    if _tokenizer is not None:
        return _tokenizer.count_chat(messages, request)
    return count_text_tokens(chat_prompt_text(messages))


async def tokenize_async(text: str, chat_messages: Sequence[Mapping[str, Any]] | None = None,
                         request: Mapping[str, Any] | None = None) -> list[int]:
    """`tokenize` (or `tokenize_chat` when `chat_messages` is given, with its `request`), with a real
    tokenizer's work on a long text done off the event loop."""
    if _tokenizer is None:
        return _estimate_ids(chat_prompt_text(chat_messages) if chat_messages is not None else text)
    if chat_messages is not None:
        text, special = _tokenizer.chat_text(chat_messages, request)
        return await _tokenizer.encode_async(text, special)
    return await _tokenizer.encode_async(text)


def is_token_ids(prompt: object) -> bool:
    return isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)


def count_prompt_tokens(prompt: str | Sequence[int]) -> int:
    """Length of an OpenAI completions `prompt`: exact for token ids; text as `count_text_tokens` counts it."""
    if isinstance(prompt, str):
        return count_text_tokens(prompt)
    if is_token_ids(prompt):
        return len(prompt)
    raise ValueError("prompt must be a string or a list of integer token ids")


def chat_prompt_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """Flatten OpenAI chat messages into the text both sides tokenize (role, then content, per message). A
    null or absent content (an assistant message with tool calls) adds nothing; of a list of content parts,
    the texts of its text parts are kept."""
    parts = []
    for message in messages:
        content = message.get("content") or ""
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(text for p in content if isinstance(p, dict) and isinstance(text := p.get("text"), str))
        parts.append(f"<|{message.get('role', 'user')}|>{content}")
    return "".join(parts)
