"""The request fields trtllm-serve's OpenAI models accept, and the checks its pydantic validation makes
before a request reaches the engine.

trtllm-serve's request models (`tensorrt_llm/serve/openai_protocol.py`) derive from a base with
`extra="forbid"`: a field the model does not define is refused with 400, as is one inside
`disaggregated_params` or `stream_options`. The sets below are the union over the TensorRT-LLM 1.x
releases (a field a newer release added is accepted whatever `--sim-trtllm-version` says), so the simulator
refuses what no release would take: a misspelt field, or one a router added that the engine does not know.
Besides, as there: `model` is required, chat needs `messages` (also with `prompt_token_ids`),
`stream_options` needs `stream`, and a non-empty `suffix` is refused.

The message follows FastAPI's RequestValidationError as trtllm-serve reports it (`create_error_response(
str(exc))`: 400, BadRequestError): one line per error with its type, location and message.
"""

from __future__ import annotations

from typing import Any

from baton.engine_sim.engine import EngineError

_SAMPLING = frozenset((
    "best_of", "use_beam_search", "top_k", "top_p_min", "min_p", "repetition_penalty", "length_penalty",
    "early_stopping", "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "min_tokens",
    "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens", "lora_request",
    "prompt_ignore_length", "conversation_params",
))
_COMMON = frozenset((
    "model", "frequency_penalty", "logit_bias", "logprobs", "n", "presence_penalty", "seed", "stop", "stream",
    "stream_options", "temperature", "top_p", "user", "response_format", "disaggregated_params",
    "add_special_tokens", "echo", *_SAMPLING,
))
COMPLETION_FIELDS = _COMMON | {"prompt", "max_tokens", "suffix", "return_context_logits", "detokenize"}
CHAT_FIELDS = _COMMON | {
    "messages", "prompt_token_ids", "max_tokens", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
    "reasoning_effort", "add_generation_prompt", "documents", "chat_template", "chat_template_kwargs",
    "mm_processor_kwargs", "cache_salt",
}
DISAGGREGATED_PARAMS_FIELDS = frozenset((
    "request_type", "first_gen_tokens", "ctx_request_id", "encoded_opaque_state", "draft_tokens",
    "disagg_request_id", "ctx_dp_rank", "ctx_info_endpoint", "schedule_style", "multimodal_embedding_handles",
    "multimodal_hashes",
))
STREAM_OPTIONS_FIELDS = frozenset(("include_usage", "continuous_usage_stats"))


def _error(kind: str, loc: tuple[str, ...], msg: str, value: Any) -> dict[str, Any]:
    return {"type": kind, "loc": ("body", *loc), "msg": msg, "input": value}


def _extra(fields: dict[str, Any], known: frozenset[str] | set[str], *where: str) -> list[dict[str, Any]]:
    return [_error("extra_forbidden", (*where, k), "Extra inputs are not permitted", v)
            for k, v in fields.items() if k not in known]


def check_request_fields(body: dict[str, Any], chat: bool) -> None:
    """Raise EngineError (400) as trtllm-serve's request validation would refuse `body`."""
    # The models' "before" validators run first and stop validation at their ValueError.
    options = body.get("stream_options")
    if (options is not None if chat else bool(options)) and not body.get("stream"):
        message = ("stream_options can only be set if stream is true" if chat
                   else "Stream options can only be defined when stream is true.")
        _refuse([_error("value_error", (), f"Value error, {message}", body)])
    if body.get("suffix"):
        _refuse([_error("value_error", (), "Value error, suffix is not supported", body)])
    errors = _extra(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    for field, known in (("disaggregated_params", DISAGGREGATED_PARAMS_FIELDS), ("stream_options", STREAM_OPTIONS_FIELDS)):
        value = body.get(field)
        if isinstance(value, dict):
            errors += _extra(value, known, field)
    if "model" not in body:
        errors.append(_error("missing", ("model",), "Field required", body))
    if chat and "messages" not in body:
        errors.append(_error("missing", ("messages",), "Field required", body))
    if errors:
        _refuse(errors)


def _refuse(errors: list[dict[str, Any]]) -> None:
    shown = [{**e, "input": _short(e["input"])} for e in errors]
    n = len(errors)
    raise EngineError(f"{n} validation error{'s' if n > 1 else ''}:\n" + "\n".join(f"  {e}" for e in shown))


def _short(value: Any) -> Any:
    """The request itself as the input of a whole-body error, cut short: a long prompt would fill the log."""
    if isinstance(value, dict):
        return {k: (v if len(repr(v)) <= 80 else f"<{type(v).__name__}>") for k, v in value.items()}
    return value
