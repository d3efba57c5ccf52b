"""Prompt length, counted the same way by the scheduler and the engine simulator.

Routing depends on prompt length, so both sides must agree on it:
- a prompt given as token ids (OpenAI `prompt` as a list of integers) is exact: its length;
- a text prompt is split by a documented, deterministic stand-in tokenizer: one token per 4 bytes of
  UTF-8 (rounded up), the usual rule of thumb for English text with BPE tokenizers. Token ids are
  derived from the bytes, so the same text always yields the same ids on every process.

When a real tokenizer is available it can be plugged in with `set_tokenizer`; the simulator and the
scheduler then count with it instead.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

BYTES_PER_TOKEN = 4
VOCAB_SIZE = 128_256  # Llama-3 vocabulary size; ids stay in range for any realistic model config

_tokenizer: Callable[[str], list[int]] | None = None


def set_tokenizer(tokenize_fn: Callable[[str], list[int]] | None) -> None:
    """Use a real tokenizer (e.g. a Hugging Face tokenizer's `encode`) instead of the estimate."""
    global _tokenizer
    _tokenizer = tokenize_fn


def tokenize(text: str) -> list[int]:
    """Token ids for `text`: the plugged-in tokenizer, else one id per 4-byte chunk of UTF-8."""
    if _tokenizer is not None:
        return list(_tokenizer(text))
    data = text.encode("utf-8")
    return [
        zlib.crc32(data[i : i + BYTES_PER_TOKEN]) % VOCAB_SIZE for i in range(0, len(data), BYTES_PER_TOKEN)
    ]


def count_text_tokens(text: str) -> int:
    """Token count for `text` without materialising ids when the estimate is in use."""
    if _tokenizer is not None:
        return len(_tokenizer(text))
    return -(-len(text.encode("utf-8")) // BYTES_PER_TOKEN)


def is_token_ids(prompt: object) -> bool:
    return isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)


def count_prompt_tokens(prompt: str | Sequence[int]) -> int:
    """Length of an OpenAI completions `prompt`: exact for token ids, the documented estimate for text."""
    if isinstance(prompt, str):
        return count_text_tokens(prompt)
    if is_token_ids(prompt):
        return len(prompt)
    raise ValueError("prompt must be a string or a list of integer token ids")


def chat_prompt_text(messages: Sequence[dict]) -> str:
    """Flatten OpenAI chat messages into the text both sides tokenize (role, then content, per message)."""
    parts = []
    for message in messages:
        content = message.get("content", "")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"<|{message.get('role', 'user')}|>{content}")
    return "".join(parts)
