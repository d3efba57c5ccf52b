"""Client requests: parse once, count the prompt, and build each upstream body with one serialization.

A prompt of token ids is cut out of the client's bytes and counted without being decoded
(`baton.idlists`). `ParsedRequest` keeps the client's raw bytes (forwarded untouched on the local route
whenever possible), the decoded dict, and the prompt serialized at most once. Upstream bodies are built
by serializing the small fields and splicing the prompt's JSON in, so a 220 KB prompt is never
re-encoded per attempt; the context answer's prompt_token_ids are cut out of its bytes and spliced into
the generation request without being decoded (`parse_context_answer`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from baton import tokens as token_counting
from baton.idlists import RawJSON, cut_id_list
from baton.model_tokenizer import OFFLOAD_CHARS  # longer text prompts are counted by `count_deferred`

COMPLETIONS = "completions"
CHAT = "chat"
PATHS = {COMPLETIONS: "/v1/completions", CHAT: "/v1/chat/completions"}

HIGH_PRECISION_HEADER = "X-Baton-High-Precision"
BATON_FIELD = "baton"  # request extension: {"baton": {"highPrecision": true}}; stripped before forwarding

_MARK = "\u0000baton-prompt\u0000"
_MARK_JSON = json.dumps(_MARK).encode()
_RAW_MARK = "\u0000baton-raw\u0000"
_RAW_MARK_JSON = json.dumps(_RAW_MARK).encode()
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

_IDS_KEY = b'"prompt_token_ids"'
_PROMPT_KEY = b'"prompt"'
# How deep a request body may nest arrays and objects. Far beyond any real request (a JSON schema in
# `response_format` included), and low enough that encoding the body again for an engine never comes near
# Python's recursion limit (which a body that only just decoded could hit, deeper in the call stack).
MAX_JSON_DEPTH = 100


def parse_context_answer(data: bytes) -> tuple[Any, RawJSON | None]:
    """A context-only answer, decoded except for its top-level `prompt_token_ids`, returned as raw JSON
    (see `cut_id_list`). They only travel on to the generation request, and the decode engine checks
    them there as it checks any request (a broken list is its 400, relayed), so they are not checked
    here: that took as long as decoding the rest of the answer."""
    answer, ids, _ = cut_id_list(data, _IDS_KEY, "prompt_token_ids", check=False)
    return answer, ids


class RequestError(Exception):
    """The client's request is unusable; carries the HTTP status and an OpenAI-style error code."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


def _is_token_ids(value: object) -> bool:
    """`baton.tokens.is_token_ids` for a JSON-decoded value, at C speed (a prompt can hold 100K ids).

    json.loads only produces exact ints, so `type(t) is int` (which excludes bools) is the same test.
    """
    return isinstance(value, list) and (not value or set(map(type, value)) == {int})


def _nests_too_deep(raw: bytes, data: Any) -> bool:
    """Whether `data`, decoded from `raw`, nests arrays and objects more than MAX_JSON_DEPTH levels deep.
    A body with no more brackets than that cannot: almost every request is spared the walk."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return False
    level = [data]
    for _ in range(MAX_JSON_DEPTH):  # level n + 1 from level n, breadth first: no recursion
        level = [v for value in level for v in (value.values() if isinstance(value, dict) else value)
                 if isinstance(v, (dict, list))]
        if not level:
            return False
    return True


def _too_deep() -> RequestError:
    return RequestError(400, f"request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep",
                        "invalid_request")


def _json_type(value: object) -> str:
    """What a decoded JSON value is, in JSON's words (for error messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _check_messages(messages: list[dict[str, Any]]) -> None:
    """The shape counting a chat prompt relies on (`baton.tokens.chat_prompt_text`, a chat template): a
    message's `role`, when given, is a string; its `content` is a string, a list of content parts (objects
    whose `text`, when given or when the part is a text part, is a string), or absent or null (an assistant
    message with tool calls). RequestError (400) naming the field at fault otherwise."""
    def refuse(field: str, wanted: str, value: object) -> RequestError:
        return RequestError(400, f"`{field}` must be {wanted}, got {_json_type(value)}", "invalid_request",
                            "messages")

    for i, message in enumerate(messages):
        if "role" in message and not isinstance(message["role"], str):
            raise refuse(f"messages[{i}].role", "a string", message["role"])
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise refuse(f"messages[{i}].content", "a string or a list of content parts", content)
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise refuse(f"messages[{i}].content[{j}]", "a content part object", part)
            if ("text" in part or part.get("type") == "text") and not isinstance(part.get("text"), str):
                raise refuse(f"messages[{i}].content[{j}].text", "a string", part.get("text"))


def _truthy(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class ParsedRequest:
    __slots__ = ("raw", "api", "data", "prompt_key", "tokens", "stream", "high_precision", "_rewrite", "_prompt_json",
                 "uncounted")

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
        self.uncounted: Any = None  # a long text prompt (str) or chat messages (list) that `count_deferred` counts

    async def count_deferred(self) -> None:
        """Count a prompt `parse_request` left uncounted (long text, a real tokenizer): off the event loop.
        RequestError (400) when the model's chat template refuses the messages, as `parse_request` says."""
        if self.uncounted is None:
            return
        pending, self.uncounted = self.uncounted, None
        try:
            if isinstance(pending, str):
                self.tokens = len(await token_counting.tokenize_async(pending))
            else:
                self.tokens = len(await token_counting.tokenize_async("", pending, self.data))
        except ValueError as exc:
            raise _template_refused(exc) from None

    @property
    def path(self) -> str:
        return PATHS[self.api]

    def prompt_json(self) -> bytes:
        if self._prompt_json is None:
            self._prompt_json = _dumps(self.data[self.prompt_key]).encode()
        return self._prompt_json

    def render(self, overrides: Mapping[str, Any], drop: tuple[str, ...] = (), prompt_json: bytes | None = None,
               ) -> bytes:
        """The request with `overrides` set and `drop` removed; the prompt (and at most one `RawJSON`
        override) is spliced in, not re-encoded."""
        small = {
            k: v
            for k, v in self.data.items()
            if k != self.prompt_key and k != BATON_FIELD and k not in drop and k not in overrides
        }
        raw_value: RawJSON | None = None
        raw_key = ""
        for key, value in overrides.items():
            if isinstance(value, RawJSON):
                raw_key, raw_value = key, value
            else:
                small[key] = value
        if raw_value is not None:
            small[raw_key] = _RAW_MARK  # second to last key: the last raw marker before the prompt's is ours
        small[self.prompt_key] = _MARK  # last key, so the last occurrence of the marker is ours
        head, _, tail = _dumps(small).encode().rpartition(_MARK_JSON)
        if raw_value is not None:
            before, _, after = head.rpartition(_RAW_MARK_JSON)
            head = b"".join((before, raw_value, after))
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

    def generation_body(self, handle: Mapping[str, Any], prompt_token_ids: list[int] | bytes | None) -> bytes:
        """generation_only with the context handle; the prompt becomes the context's prompt_token_ids
        (a list, or their JSON as cut out of the context answer by `parse_context_answer`)."""
        params = dict(handle)
        params["request_type"] = "generation_only"
        if prompt_token_ids is None:
            return self.render({"disaggregated_params": params})
        if isinstance(prompt_token_ids, bytes):
            ids_json = RawJSON(prompt_token_ids)
        else:
            ids_json = RawJSON(_dumps(prompt_token_ids).encode())
        if self.api == COMPLETIONS:
            return self.render({"disaggregated_params": params}, prompt_json=ids_json)
        return self.render({"disaggregated_params": params, "prompt_token_ids": ids_json})


def _template_refused(exc: ValueError) -> RequestError:
    """The model's chat template refused the messages, or the request's fields for it (`tools`, ...:
    `baton.model_tokenizer`): the client's error."""
    return RequestError(400, str(exc), "invalid_request", "messages")


def parse_request(raw: bytes, api: str, headers: Mapping[str, str], model: str) -> ParsedRequest:
    ids_json: RawJSON | None = None
    uncounted: Any = None
    try:
        if api == COMPLETIONS:
            data, ids_json, id_count = cut_id_list(raw, _PROMPT_KEY, "prompt")
        else:
            data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"request body is not valid JSON: {exc}", "invalid_json") from None
    except RecursionError:  # nested deeper than the decoder can follow
        raise _too_deep() from None
    if _nests_too_deep(raw, data):
        raise _too_deep()
    if not isinstance(data, dict):
        raise RequestError(400, "request body must be a JSON object", "invalid_request")
    if b"\\ud" in raw or b"\\uD" in raw:  # only then can a string hold half a surrogate pair
        try:
            _dumps(data).encode()
        except UnicodeEncodeError:
            raise RequestError(400, "request body is not valid JSON: a \\u escape names half of a UTF-16 "
                               "surrogate pair (lone surrogates are not text)", "invalid_json") from None
    if data.get("disaggregated_params") is not None:
        # the scheduler's to set: a client's would run a context-only request on a decode replica (its KV held
        # until the transfer timeout, outside the scheduler's count) or hand it a handle of its own making
        raise RequestError(400, "`disaggregated_params` is set by the scheduler, which decides where the context "
                           "and generation phases run; remove it from the request", "invalid_request",
                           "disaggregated_params")
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
        if ids_json is not None:
            tokens = id_count
        elif isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
            data["prompt"] = prompt
            rewrite = True
        if ids_json is not None:
            pass
        elif isinstance(prompt, str):
            if len(prompt) > OFFLOAD_CHARS and token_counting.active_tokenizer() is not None:
                tokens, uncounted = 0, prompt
            else:
                tokens = token_counting.count_text_tokens(prompt)
        elif _is_token_ids(prompt):
            tokens = len(prompt)
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
        _check_messages(messages)
        prompt_ids = data.get("prompt_token_ids")
        # the prompt when given, as trtllm-serve and the engine simulator take it; decoded with the body (cutting
        # it out, as a completions prompt's, would cost every chat request a search through its bytes)
        if prompt_ids is not None:
            if not _is_token_ids(prompt_ids):
                raise RequestError(400, "`prompt_token_ids` must be a list of token ids", "invalid_request",
                                   "prompt_token_ids")
            tokens = len(prompt_ids)
        elif (token_counting.active_tokenizer() is not None
                and sum(len(str(m.get("content", ""))) for m in messages) > OFFLOAD_CHARS):
            tokens, uncounted = 0, messages
        else:
            try:
                tokens = token_counting.count_chat_tokens(messages, data)
            except ValueError as exc:
                raise _template_refused(exc) from None
    extension = data.get(BATON_FIELD)
    high_precision = _truthy(headers.get(HIGH_PRECISION_HEADER, ""))
    if extension is not None:
        rewrite = True
        if isinstance(extension, dict):
            high_precision = high_precision or _truthy(extension.get("highPrecision", False))
    parsed = ParsedRequest(raw, api, data, prompt_key, tokens, _truthy(data.get("stream", False)), high_precision,
                           rewrite)
    if ids_json is not None:
        parsed._prompt_json = ids_json  # noqa: SLF001 - the prompt's JSON, cut out of the client's bytes
    parsed.uncounted = uncounted
    return parsed
