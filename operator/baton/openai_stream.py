"""How trtllm-serve reads a streamed request's `stream_options`, for everything that answers like it: the
engine simulator, the scheduler's Triton runtime (which turns Triton's stream into trtllm-serve's events)
and the scheduler's own answer to a request its context phase finished."""

from __future__ import annotations


def wants_usage(stream_options: object) -> bool:
    """Whether a streamed answer ends with a usage chunk (empty `choices`). trtllm-serve's `StreamOptions`
    defaults `include_usage` to true, so `"stream_options": {}` asks for one; no `stream_options` (or one
    that is not an object) does not."""
    return isinstance(stream_options, dict) and bool(stream_options.get("include_usage", True))
