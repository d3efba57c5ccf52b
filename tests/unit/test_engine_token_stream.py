"""The engine simulator's streamed answers (`_TokenStream`), pushed by the engine loop: what the client
receives when it keeps up, when its connection is full for a while, when a request fails (before its first
token or mid-stream: broken off, as trtllm-serve's are), when it goes away, and when writing fails (which
must not reach the engine loop)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from baton.engine_sim.engine import EngineError, token_text
from baton.engine_sim.server import _TokenStream


class Sink:
    def __init__(self, fail: bool = False) -> None:
        self.writes: list[bytes] = []
        self.ended: bytes | None = None
        self.cut_with: bytes | None = None  # what `cut` wrote before breaking the answer off
        self.fail = fail

    def write(self, data: bytes) -> None:
        if self.fail:
            raise OSError("connection broke")
        self.writes.append(data)

    def end(self, data: bytes = b"") -> None:
        self.ended = data

    def cut(self, data: bytes = b"") -> None:
        self.cut_with = data


def _events(data: bytes) -> list:
    out = []
    for block in data.decode().split("\n\n"):
        if block:
            assert block.startswith("data: ")
            body = block[len("data: "):]
            out.append(body if body == "[DONE]" else json.loads(body))
    return out


def _stream(include_usage: bool = False, chat: bool = False):
    cancelled = []
    sim = SimpleNamespace(
        cfg=SimpleNamespace(model_name="m"),
        engine=SimpleNamespace(cancel=lambda seq: cancelled.append(seq.rid)),
        _finish_reason=lambda seq: "length",
        _usage=lambda seq: {"prompt_tokens": 3, "completion_tokens": len(seq.tokens),
                            "total_tokens": 3 + len(seq.tokens)},
    )
    stream = _TokenStream(sim, chat, include_usage)
    stream.seq = SimpleNamespace(rid=7, x_request_id="r", tokens=[], finished=False, error=None,
                                 kind="context_and_generation", prompt=SimpleNamespace(length=3))
    return stream, cancelled


def run(coro_fn):
    return asyncio.run(coro_fn())


def test_tokens_go_out_as_produced_and_a_full_connection_holds_them_in_order():
    async def go():
        stream, _ = _stream(include_usage=True)
        seq = stream.seq
        seq.tokens.append(11)
        stream.changed()  # before the response starts: nothing to write to yet
        assert stream.sink is None
        sink = Sink()
        stream.start(sink)
        seq.tokens.append(12)
        stream.changed()
        assert len(sink.writes) == 2  # one write per change
        stream.pause()
        for token in (13, 14, 15):
            seq.tokens.append(token)
            stream.changed()
        assert len(sink.writes) == 2  # held while the client's connection is full
        stream.resume()
        assert len(sink.writes) == 3  # the backlog in one write
        seq.tokens.append(16)
        seq.finished = True
        stream.changed()
        events = _events(b"".join(sink.writes) + sink.ended)
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 6
        choices = [e["choices"][0] for e in events[:-2]]
        assert [t for c in choices for t in c["token_ids"]] == [11, 12, 13, 14, 15, 16]
        assert "".join(c["text"] for c in choices) == "".join(token_text(t) for t in range(11, 17))
        assert [c["finish_reason"] for c in choices] == [None, None, None, "length"]
        stream.changed()  # nothing after the end
        assert len(sink.writes) == 3
    run(go)


def test_a_failure_mid_stream_breaks_the_stream_off_without_an_error_event_or_done():
    """As trtllm-serve's stream generator re-raises and uvicorn closes the connection: the tokens produced go
    out, then the answer is cut (no error event, no [DONE], no last chunk)."""
    async def go():
        stream, cancelled = _stream(chat=True)
        seq = stream.seq
        seq.tokens.append(5)
        stream.changed()
        sink = Sink()
        stream.start(sink)
        seq.tokens.append(6)
        seq.finished = True
        seq.error = EngineError("engine is in a fatal state: boom", 503, "ServiceUnavailableError")
        stream.changed()
        assert sink.ended is None and sink.cut_with is not None
        events = _events(b"".join(sink.writes) + sink.cut_with)
        assert events[0]["choices"][0]["delta"] == {"role": "assistant"}  # trtllm-serve: DeltaMessage(role=...), exclude_none
        assert events[1]["choices"][0]["delta"]["content"] == token_text(5)
        assert events[2]["choices"][0]["delta"]["content"] == token_text(6)
        assert events[2]["choices"][0]["finish_reason"] is None
        assert len(events) == 3 and cancelled == []
    run(go)


@pytest.mark.parametrize("chat", [False, True])
def test_a_failure_before_the_first_token_breaks_off_a_started_stream_with_nothing_in_it(chat):
    """The response starts before the first token (trtllm-serve's StreamingResponse): a chat stream's role
    chunk waits for the first token, so a failed handoff leaves the client a 200 with an empty, cut body."""
    async def go():
        stream, _ = _stream(chat=chat)
        sink = Sink()
        stream.start(sink)
        assert sink.writes == [] and sink.ended is None and sink.cut_with is None  # nothing yet, not even the role
        stream.seq.finished = True
        stream.seq.error = EngineError("KV cache transfer timed out", in_generation=True)
        stream.changed()
        assert sink.writes == [] and sink.ended is None and sink.cut_with == b""
    run(go)


def test_the_client_going_away_cancels_the_request_and_stops_writing():
    async def go():
        stream, cancelled = _stream()
        stream.seq.tokens.append(5)
        sink = Sink()
        stream.start(sink)
        stream.abort()
        assert cancelled == [7]
        stream.seq.tokens.append(6)
        stream.changed()
        assert len(sink.writes) == 1 and sink.ended is None
    run(go)


def test_a_failing_write_ends_the_stream_without_raising_into_the_engine_loop():
    async def go():
        stream, cancelled = _stream()
        stream.seq.tokens.append(5)
        sink = Sink(fail=True)
        stream.start(sink)  # must not raise
        assert cancelled == [7] and sink.cut_with == b"" and sink.ended is None
        stream.seq.tokens.append(6)
        stream.changed()  # must not raise either
    run(go)


@pytest.mark.parametrize("chat", [False, True])
def test_a_request_finished_before_the_response_starts_goes_out_whole(chat):
    async def go():
        stream, _ = _stream(chat=chat)
        stream.seq.tokens.extend([1, 2, 3])
        stream.seq.finished = True
        stream.changed()
        sink = Sink()
        stream.start(sink)
        events = _events(sink.ended)
        assert sink.writes == [] and events[-1] == "[DONE]"
        ids = [t for e in events[:-1] for t in e["choices"][0].get("token_ids", [])]
        assert ids == [1, 2, 3]
    run(go)
