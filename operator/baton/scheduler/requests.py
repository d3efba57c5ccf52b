"""Client requests: parse once, count the prompt, and build each upstream body with one serialization.

`ParsedRequest` keeps the client's raw bytes (forwarded untouched on the local route whenever possible),
the decoded dict, and the prompt serialized at most once. Upstream bodies are built by serializing the
small fields and splicing the prompt's JSON in, so a 220 KB prompt is never re-encoded per attempt.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from baton.tokens import chat_prompt_text, count_prompt_tokens, count_text_tokens, is_token_ids

COMPLETIONS = "completions"
CHAT = "chat"
PATHS = {COMPLETIONS: "/v1/completions", CHAT: "/v1/chat/completions"}

HIGH_PRECISION_HEADER = "X-Baton-High-Precision"
BATON_FIELD = "baton"  # request extension: {"baton": {"highPrecision": true}}; stripped before forwarding

_MARK = "\u0000baton-prompt\u0000"
_MARK_JSON = json.dumps(_MARK).encode()
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class RequestError(Exception):
    """The client's request is unusable; carries the HTTP status and an OpenAI-style error code."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


def _truthy(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class ParsedRequest:
    __slots__ = ("raw", "api", "data", "prompt_key", "tokens", "stream", "high_precision", "_rewrite", "_prompt_json")

    def __init__(self, raw: bytes, api: str, data: dict[str, Any], prompt_key: str, tokens: int, stream: bool,
                 high_precision: bool, rewrite: bool) -> None:
        self.raw = raw
        self.api = api
        self.data = data
        self.prompt_key = prompt_key
        self.tokens = tokens
        self.stream = stream
        self.high_precision = high_precision
        self._rewrite = rewrite
        self._prompt_json: bytes | None = None

    @property
    def path(self) -> str:
        return PATHS[self.api]

    def prompt_json(self) -> bytes:
        if self._prompt_json is None:
            self._prompt_json = _dumps(self.data[self.prompt_key]).encode()
        return self._prompt_json

    def render(self, overrides: Mapping[str, Any], drop: tuple[str, ...] = (), prompt_json: bytes | None = None,
               ) -> bytes:
        """The request with `overrides` set and `drop` removed; the prompt is spliced in, not re-encoded."""
        small = {
            k: v
            for k, v in self.data.items()
            if k != self.prompt_key and k != BATON_FIELD and k not in drop and k not in overrides
        }
        small.update(overrides)
        small[self.prompt_key] = _MARK  # last key, so the last occurrence of the marker is ours
        head, _, tail = _dumps(small).encode().rpartition(_MARK_JSON)
        return b"".join((head, prompt_json if prompt_json is not None else self.prompt_json(), tail))

    def local_body(self) -> bytes:
        """Context and generation on one worker: the client's bytes, unless something had to change."""
        if not self._rewrite:
            return self.raw
        return self.render({})

    def context_body(self) -> bytes:
        """context_only, non-streaming (as trtllm-serve's router sends it)."""
        return self.render(
            {"disaggregated_params": {"request_type": "context_only"}, "stream": False}, drop=("stream_options",)
        )

    def generation_body(self, handle: Mapping[str, Any], prompt_token_ids: list[int] | None) -> bytes:
        """generation_only with the context handle; the prompt becomes the context's prompt_token_ids."""
        params = dict(handle)
        params["request_type"] = "generation_only"
        if prompt_token_ids is None:
            return self.render({"disaggregated_params": params})
        ids_json = _dumps(prompt_token_ids).encode()
        if self.api == COMPLETIONS:
            return self.render({"disaggregated_params": params}, prompt_json=ids_json)
        return self.render({"disaggregated_params": params, "prompt_token_ids": prompt_token_ids})


def parse_request(raw: bytes, api: str, headers: Mapping[str, str], model: str) -> ParsedRequest:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"request body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(data, dict):
        raise RequestError(400, "request body must be a JSON object", "invalid_request")
    rewrite = False
    requested = data.get("model")
    if requested is None:
        data["model"] = model
        rewrite = True
    elif requested != model:
        raise RequestError(404, f"The model `{requested}` does not exist.", "model_not_found", "model")
    if api == COMPLETIONS:
        prompt_key = "prompt"
        prompt = data.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
            data["prompt"] = prompt
            rewrite = True
        if isinstance(prompt, str):
            tokens = count_text_tokens(prompt)
        elif is_token_ids(prompt):
            tokens = count_prompt_tokens(prompt)
        elif prompt is None:
            raise RequestError(400, "`prompt` is required", "invalid_request", "prompt")
        else:
            raise RequestError(
                400, "`prompt` must be a string or a list of token ids (send one prompt per request)",
                "invalid_request", "prompt",
            )
    else:
        prompt_key = "messages"
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise RequestError(400, "`messages` must be a non-empty list of message objects", "invalid_request",
                               "messages")
        tokens = count_text_tokens(chat_prompt_text(messages))
    extension = data.get(BATON_FIELD)
    high_precision = _truthy(headers.get(HIGH_PRECISION_HEADER, ""))
    if extension is not None:
        rewrite = True
        if isinstance(extension, dict):
            high_precision = high_precision or _truthy(extension.get("highPrecision", False))
    return ParsedRequest(raw, api, data, prompt_key, tokens, _truthy(data.get("stream", False)), high_precision,
                         rewrite)
