"""Token ids -> text with the scheduler's model tokenizer, for Triton models without a `text_output` tensor.

TensorRT-LLM's `tensorrt_llm` Triton model (and the disaggregated `context` / `generation` models copied from it)
answers token ids only: the text is the ensemble's postprocessing's to make. The `triton` runtime makes it
itself from `output_ids`, as trtllm-serve detokenizes (special tokens skipped). A stream is decoded
incrementally: each response's text is what its tokens add to the sequence's decoded text, and a trailing
incomplete UTF-8 sequence (a replacement character: the rest of the character is in later tokens) is held back
until the tokens that complete it arrive, or the sequence ends.
"""

from __future__ import annotations

from typing import Any

from baton.model_tokenizer import ModelTokenizer
from baton.tokens import active_tokenizer

INCOMPLETE = "\ufffd"  # what decoding makes of the first bytes of a character whose rest is in later tokens


def model_tokenizer() -> ModelTokenizer | None:
    """The scheduler's model tokenizer (its `tokenizer` config), or None when it counts with the estimate."""
    tokenizer = active_tokenizer()
    return tokenizer if isinstance(tokenizer, ModelTokenizer) else None


class Detokenizer:
    """The text of one sequence, produced as its token ids arrive (`push`); the last push (`final`) gives
    what was held back.

    Each call decodes a short window of the sequence: the tokens whose text was produced by the previous call
    (`_prefix:_read`, for the context a token's text depends on, e.g. a leading space) and the new ones; the
    new text is what decoding the window adds to decoding its old part."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer  # a `tokenizers.Tokenizer`
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, ids: list[int], final: bool = False) -> str:
        """The text the new `ids` add: all of it when `final`, else without a trailing incomplete character."""
        self._ids += ids
        before = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(before) or (text.endswith(INCOMPLETE) and not final):
            return ""  # nothing new yet, or a character still incomplete: held back
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(before):]
