"""StreamRelay: what reaches the client, when, and how a relayed stream ends (pure logic, a real event loop)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from baton.scheduler.relay import StreamRelay

DONE = b"data: [DONE]\n\n"


def event(i: int) -> bytes:
    return b'data: {"choices": [{"text": "t%d"}]}\n\n' % i


class FakeEngineResponse:
    """The engine side: records reading state and hands the relay's callbacks to the test."""

    def __init__(self) -> None:
        self.paused = False
        self.released = False
        self.on_data = self.on_end = self.on_error = None

    def relay(self, on_data, on_end, on_error) -> None:
        self.on_data, self.on_end, self.on_error = on_data, on_end, on_error

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def release(self) -> None:
        self.released = True


class FakeSink:
    def __init__(self) -> None:
        self.writes: list[tuple[float, bytes]] = []
        self.ended: bytes | None = None

    def write(self, data: bytes) -> None:
        self.writes.append((time.monotonic(), data))

    def end(self, data: bytes = b"") -> None:
        assert self.ended is None, "end() called twice"
        self.ended = data

    def body(self) -> bytes:
        return b"".join(d for _, d in self.writes) + (self.ended or b"")


def make(interval_s: float, first: bytes = b""):
    resp, sink, endings = FakeEngineResponse(), FakeSink(), []
    relay = StreamRelay(resp, first or event(0), "127.0.0.9:8000", interval_s, time.monotonic,
                        on_broken=lambda exc: f"{type(exc).__name__}: {exc}",
                        on_finish=lambda outcome, r: endings.append((outcome, r.events)))
    relay.start(sink)
    return relay, resp, sink, endings


def test_first_token_goes_out_at_once_and_fast_tokens_are_gathered_into_one_write():
    async def scenario():
        relay, resp, sink, endings = make(0.05)
        assert [d for _, d in sink.writes] == [event(0)]  # the first token is never held
        resp.on_data(event(1))
        resp.on_data(event(2))
        assert len(sink.writes) == 1  # held ...
        assert not resp.paused  # ... while the engine is read on, so its last event is seen when it comes
        await asyncio.sleep(0.08)
        assert [d for _, d in sink.writes] == [event(0), event(1) + event(2)]
        resp.on_data(event(3))  # within the next interval: held ...
        resp.on_end()  # ... but the end of the stream (here without [DONE]) flushes it at once
        assert sink.ended.startswith(event(3)) and b"stream_interrupted" in sink.ended
        assert endings == [("truncated", 4)] and resp.released
        await asyncio.sleep(0.08)
        assert sink.body().startswith(b"".join(event(i) for i in range(4)))  # nothing written twice
        assert sink.body().count(b"t3") == 1

    asyncio.run(scenario())


def test_the_last_event_is_never_held_and_takes_what_was_held_with_it():
    async def scenario():
        _, resp, sink, endings = make(0.05)
        resp.on_data(event(1))
        assert len(sink.writes) == 1 and not resp.paused  # held, engine read on
        resp.on_data(event(2) + DONE)  # the engine's last iteration, well within the interval ...
        resp.on_end()  # ... and the end of its response, in the same read
        # one write to the client: what was held, the last event and the end of the response
        assert len(sink.writes) == 1 and sink.ended == event(1) + event(2) + DONE
        assert endings == [("completed", 4)]
        await asyncio.sleep(0.08)  # the cancelled hold writes nothing later
        assert sink.body() == b"".join(event(i) for i in range(3)) + DONE and len(sink.writes) == 1

    asyncio.run(scenario())


def test_the_last_event_goes_out_after_its_read_when_the_end_comes_later():
    async def scenario():
        _, resp, sink, endings = make(0.05)
        resp.on_data(event(1))
        resp.on_data(event(2) + DONE)  # the end of the response is not in this read
        await asyncio.sleep(0)  # the next turn of the loop, not the end of the 50 ms interval
        assert sink.writes[-1][1] == event(1) + event(2) + DONE  # written by then
        assert sink.ended is None and endings == []
        resp.on_end()
        assert sink.ended == b"" and endings == [("completed", 4)]
        assert sink.body() == b"".join(event(i) for i in range(3)) + DONE

    asyncio.run(scenario())


def test_tokens_slower_than_the_interval_are_never_held():
    async def scenario():
        relay, resp, sink, endings = make(0.01)
        for i in range(1, 4):
            await asyncio.sleep(0.02)
            resp.on_data(event(i))
            assert sink.writes[-1][1] == event(i) and not resp.paused
        await asyncio.sleep(0.02)
        resp.on_data(DONE)  # arrives long after the last write: out at once, with the end of the response
        resp.on_end()
        assert [d for _, d in sink.writes] == [event(i) for i in range(4)] and sink.ended == DONE
        assert endings == [("completed", 5)]

    asyncio.run(scenario())


def test_interval_zero_writes_every_piece_as_it_arrives():
    async def scenario():
        relay, resp, sink, endings = make(0.0)
        for i in range(1, 6):
            resp.on_data(event(i))
        assert len(sink.writes) == 6 and not resp.paused

    asyncio.run(scenario())


def test_client_backpressure_keeps_the_engine_paused_across_a_flush():
    async def scenario():
        relay, resp, sink, endings = make(0.02)
        resp.on_data(event(1))  # held
        relay.pause()  # the client's connection is full
        assert resp.paused  # the engine is not read while the client cannot take more
        await asyncio.sleep(0.05)
        assert sink.writes[-1][1] == event(1)  # the held token went out ...
        assert resp.paused  # ... and the engine stays paused until the client drains
        relay.resume()
        assert not resp.paused

    asyncio.run(scenario())


@pytest.mark.parametrize("ending", ["truncated", "broken"])
def test_a_stream_that_ends_badly_gets_an_error_event_after_what_was_held(ending):
    async def scenario():
        relay, resp, sink, endings = make(0.05)
        resp.on_data(event(1))
        if ending == "truncated":
            resp.on_end()
        else:
            resp.on_error(ConnectionResetError("peer reset"))
        assert sink.ended is not None and sink.ended.startswith(event(1))
        assert b'"code": "stream_interrupted"' in sink.ended and b"127.0.0.9:8000" in sink.ended
        if ending == "broken":
            assert b"ConnectionResetError: peer reset" in sink.ended
        assert endings == [("truncated" if ending == "truncated" else "failed", 2)] and resp.released

    asyncio.run(scenario())


ENGINE_ERROR = (b'data: {"object": "error", "message": "engine is in a fatal state: boom", '
                b'"type": "ServiceUnavailableError", "param": null, "code": 503}\n\n')


def _client_events(body: bytes) -> list:
    """The events an SSE client parses out of `body` (data lines; [DONE] as the string)."""
    out = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        if block.startswith(b"data:"):
            data = block[5:].strip()
            out.append(data.decode() if data == b"[DONE]" else json.loads(data))
    return out


@pytest.mark.parametrize("split", [None, 10, 40, len(ENGINE_ERROR) - 3])
def test_an_engine_error_event_ends_the_stream_as_an_error_an_openai_client_raises_on(split):
    """trtllm-serve reports a failure inside a stream with {"object": "error", ...} and then [DONE], which
    openai-python reads as a malformed chunk and a complete answer. The client gets the tokens before it,
    then the scheduler's stream_interrupted error event with the engine's message, and no [DONE]."""
    async def scenario():
        relay, resp, sink, endings = make(0.05)
        pieces = [event(1) + ENGINE_ERROR + DONE] if split is None else [
            event(1) + ENGINE_ERROR[:split], ENGINE_ERROR[split:] + DONE]
        for piece in pieces:
            resp.on_data(piece)
        assert sink.ended is not None  # ended at the error event, without waiting for the engine's end
        resp.on_end()
        events = _client_events(sink.body())
        assert [e["choices"][0]["text"] for e in events[:2]] == ["t0", "t1"]
        assert len(events) == 3 and events[2]["error"]["code"] == "stream_interrupted"
        assert "engine is in a fatal state: boom" in events[2]["error"]["message"]
        assert "127.0.0.9:8000" in events[2]["error"]["message"]
        assert [o for o, _ in endings] == ["engine_error"] and resp.released

    asyncio.run(scenario())


def test_an_error_event_as_the_first_piece_or_cut_short_still_ends_as_an_error():
    async def scenario():
        _, resp, sink, endings = make(0.0, first=ENGINE_ERROR + DONE)
        (only,) = _client_events(sink.body())
        assert only["error"]["code"] == "stream_interrupted" and "boom" in only["error"]["message"]
        assert [o for o, _ in endings] == ["engine_error"]
        # the engine's response ends in the middle of the error event: what there is of it is reported
        _, resp, sink, endings = make(0.0)
        resp.on_data(ENGINE_ERROR[:30])
        assert sink.ended is None
        resp.on_end()
        events = _client_events(sink.body())
        assert events[-1]["error"]["code"] == "stream_interrupted" and [o for o, _ in endings] == ["engine_error"]

    asyncio.run(scenario())


def test_token_events_leave_out_a_chat_role_chunk_the_usage_chunk_and_done():
    async def scenario():
        role = b'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}\n\n'
        usage = b'data: {"choices": [], "usage": {"completion_tokens": 2}}\n\n'
        relay, resp, sink, endings = make(0.0, first=role + event(0))
        resp.on_data(event(1) + usage + DONE)
        resp.on_end()
        assert relay.events == 5 and relay.token_events == 2
        relay, resp, sink, endings = make(0.0)
        resp.on_data(event(1) + DONE)
        resp.on_end()
        assert relay.token_events == 2

    asyncio.run(scenario())


def test_done_split_across_two_reads_is_still_seen():
    async def scenario():
        relay, resp, sink, endings = make(0.0)
        resp.on_data(b"data: [DO")
        resp.on_data(b"NE]\n\n")
        resp.on_end()
        assert endings[0][0] == "completed"

    asyncio.run(scenario())


def test_client_going_away_drops_held_tokens_and_ends_once():
    async def scenario():
        relay, resp, sink, endings = make(0.05)
        resp.on_data(event(1))
        relay.abort()
        await asyncio.sleep(0.08)
        assert [d for _, d in sink.writes] == [event(0)]  # the held token was not written to a dead client
        assert endings == [("cancelled", 2)] and resp.released
        relay.abort()
        assert len(endings) == 1

    asyncio.run(scenario())


def test_a_stream_cut_at_shutdown_ends_with_what_was_held_and_a_shutting_down_event_once():
    async def scenario():
        relay, resp, sink, endings = make(0.05)
        resp.on_data(event(1))  # held: within the interval
        relay.cut()
        assert sink.ended is not None and sink.ended.startswith(event(1))
        assert b'"code": "shutting_down"' in sink.ended and b"[DONE]" not in sink.body()
        assert endings == [("shutdown", 2)] and resp.released
        relay.cut()
        relay.abort()  # the connection then closes: nothing more happens
        await asyncio.sleep(0.08)
        assert len(endings) == 1 and len(sink.writes) == 1

    asyncio.run(scenario())


def test_a_stream_cut_after_its_done_event_ends_as_the_whole_answer_it_is():
    async def scenario():
        relay, resp, sink, endings = make(0.05)
        resp.on_data(event(1) + DONE)  # the last event came; the end of the engine's response has not
        relay.cut()
        assert sink.body().endswith(DONE) and b"shutting_down" not in sink.body()
        assert endings == [("completed", 3)]

    asyncio.run(scenario())


def test_a_connection_lost_after_the_done_event_ends_the_stream_as_the_whole_answer_it_is():
    """The engine sent [DONE], then its connection broke before the end of its chunked response: the client
    has the whole answer, with no error event after [DONE], and the replica is not blamed."""
    async def scenario():
        broken = []
        resp, sink, endings = FakeEngineResponse(), FakeSink(), []
        relay = StreamRelay(resp, event(0), "127.0.0.9:8000", 0.05, time.monotonic,
                            on_broken=lambda exc: broken.append(exc) or str(exc),
                            on_finish=lambda outcome, r: endings.append((outcome, r.events)))
        relay.start(sink)
        resp.on_data(event(1) + DONE)
        resp.on_error(ConnectionResetError("reset by peer"))
        assert sink.body().endswith(DONE) and b"stream_interrupted" not in sink.body()
        assert endings == [("completed", 3)] and broken == [] and resp.released

    asyncio.run(scenario())


@pytest.mark.parametrize("split", [None, 3, 9])
def test_a_token_that_reads_done_does_not_end_the_stream(split):
    async def scenario():
        _, resp, sink, endings = make(0.0)
        text = b'data: {"choices": [{"text": "data: [DONE]"}]}\n\n'  # what a model wrote, not the last event
        pieces = [text] if split is None else [text[:split], text[split:]]
        for piece in pieces:
            resp.on_data(piece)
        resp.on_end()  # the engine stopped without its [DONE] event: the client must be told
        assert b'"code": "stream_interrupted"' in sink.ended
        assert [outcome for outcome, _ in endings] == ["truncated"]

    asyncio.run(scenario())


@pytest.mark.parametrize("done", [DONE, b"data:[DONE]\n\n", b"data: [DONE]\r\n\r\n"])
def test_the_done_event_is_seen_when_split_across_reads_and_as_the_first_piece(done):
    async def scenario():
        _, resp, sink, endings = make(0.0)
        resp.on_data(event(1) + done[:4])
        resp.on_data(done[4:])
        resp.on_end()
        assert [outcome for outcome, _ in endings] == ["completed"] and b"stream_interrupted" not in sink.body()
        _, resp, sink, endings = make(0.0, first=done)
        resp.on_end()
        assert [outcome for outcome, _ in endings] == ["completed"]

    asyncio.run(scenario())


def test_tokens_are_counted_by_event_starts_and_by_the_usage_chunk_when_there_is_one():
    """TPOT divides by the tokens generated. 'data:' inside a token's text (code) is no event; an event whose
    'data:' is split across two reads is one; a usage chunk's completion_tokens counts the tokens an engine
    merged into fewer events (speculative decoding, a slow reader)."""
    async def scenario():
        def text_event(text: str) -> bytes:
            return b'data: {"choices": [{"index": 0, "text": %s}]}\n\n' % json.dumps(text).encode()

        relay, resp, sink, endings = make(0.0, first=text_event("x = {'data:': 1}"))
        piece = text_event("data: y") + event(2)
        resp.on_data(piece[:-len(event(2)) + 3])  # the next event's 'data:' straddles two reads
        resp.on_data(piece[-len(event(2)) + 3:] + DONE)
        resp.on_end()
        assert relay.token_events == 3 and relay.tokens == 3
        merged = b'data: {"choices": [{"index": 0, "text": " a b c"}]}\n\n'
        usage = b'data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 7}}\n\n'
        relay, resp, sink, endings = make(0.0, first=merged)
        resp.on_data(merged + usage + DONE)
        resp.on_end()
        assert relay.token_events == 2 and relay.tokens == 7

    asyncio.run(scenario())


def test_a_stream_is_known_to_start_with_an_error_event_only_when_its_first_event_is_one():
    from baton.scheduler.relay import starts_with_error_event

    assert starts_with_error_event(ENGINE_ERROR + DONE)
    assert not starts_with_error_event(event(0) + ENGINE_ERROR)
    assert not starts_with_error_event(event(0))
