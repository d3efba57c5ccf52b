"""Relaying an engine's token stream to the client: `StreamRelay`, a `baton.http1` push producer.

The engine connection's data callback hands each piece straight on to the client's connection (no
coroutine, no copy of the stream), counting SSE events and watching for `[DONE]` and in-stream error
events on the way. Pieces that arrive sooner than `interval_s` after the last write to
the client are held and written together when the interval is up, so a fast stream costs one write to
the client per interval instead of one per token. The engine connection is read on meanwhile: the piece
with `[DONE]` (the last event) goes out, with whatever was held, as soon as the read that brought it is
handled, so the hold never delays a stream's end. The engine's end of the response nearly always comes in
that same read; the last event then goes out in one write with the end of the client's response, and the
client wakes once for both. (Pausing the engine during the hold saved reads but made the end wait for the
interval: at 500 req/s on a fast engine that cost more latency than the whole target allowed.) The
first piece is never held. The client's write backpressure pauses reading the engine. Exactly one
ending (the stream's end, its failure, the client going away) calls `on_finish`.

Endings passed to `on_finish(outcome, relay)`: "completed"; "engine_error" (an error event inside the
stream, `{"object": "error", ...}`, as some engine versions send -- the trtllm-serve this targets closes the
connection instead, see "failed" --, which OpenAI clients do not read as an error and which is followed by
`[DONE]`: the stream ends instead with the scheduler's `stream_interrupted` error event
carrying the engine's message, and nothing of the engine's after it); "truncated" (the engine ended the stream before `[DONE]`; an error event is
appended); "failed" (the engine connection broke, or the engine closed it mid-stream as trtllm-serve does
when a generation fails; `on_broken` names the failure for the error event appended); "shutdown" (the scheduler stopped before the stream ended: a `shutting_down` error event ends
it, so the client can tell it from a complete answer and retry); "cancelled" (the client went away).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from typing import Any

from baton.scheduler.replies import STREAM_ERROR, STREAM_ERROR_COMPACT, sse_error

# `[DONE]` counts only as an event of its own: at the start of a line (a token's text may say "[DONE]",
# but inside an event's JSON a line break is always escaped)
_DONE_EVENT = b"\ndata: [DONE]"
_DONE_EVENT_COMPACT = b"\ndata:[DONE]"
# Events that carry no generated token: a chat stream's first, role-only delta, and the usage chunk
# (`stream_options.include_usage`, empty choices). The time per output token counts the others.
_NO_TOKEN_MARKERS = (b'"role": "assistant"', b'"role":"assistant"', b'"choices": []', b'"choices":[]')
_EVENT_START = b"\ndata:"  # an event's first line; JSON escapes a newline, so text never holds one
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')


def _error_event_at(buf: bytes) -> int:
    """Where the first error event's marker is in `buf` (spaced or compact JSON), -1 if none."""
    at = buf.find(STREAM_ERROR)
    return at if at >= 0 else buf.find(STREAM_ERROR_COMPACT)


def starts_with_error_event(piece: bytes) -> bool:
    """Whether the first event of `piece` (the start of a stream) is an error event, not a token."""
    at = _error_event_at(piece)
    end = piece.find(b"\n\n")
    return at >= 0 and (end < 0 or at < end)


class StreamRelay:
    __slots__ = ("resp", "first", "address", "interval", "clock", "on_broken", "on_finish", "t_first", "t_last",
                 "events", "no_token_events", "completion_tokens", "tail", "done", "errored", "sink", "finished",
                 "flushed_at", "held", "timer", "loop")

    def __init__(self, resp: Any, first: bytes, address: str, interval_s: float, clock: Callable[[], float], *,
                 on_broken: Callable[[Exception], str], on_finish: Callable[[str, StreamRelay], None]) -> None:
        self.resp = resp  # baton.scheduler.engines.EngineResponse
        self.first = first
        self.address = address  # the engine replica, for error events
        self.interval = interval_s
        self.clock = clock
        self.on_broken = on_broken
        self.on_finish = on_finish
        self.t_first = self.t_last = clock()
        self.events = 0  # SSE events seen ("data:" lines)
        self.no_token_events = 0  # of them, a chat role chunk and a usage chunk (`_NO_TOKEN_MARKERS`)
        self.completion_tokens = 0  # from a usage chunk's `completion_tokens`, when the stream has one
        self.tail = b"\n"  # the end of the previous piece, so markers split across pieces are still seen
        self.done = False
        self.errored = False
        self.sink: Any = None
        self.finished = False
        self.loop = asyncio.get_running_loop()
        self.flushed_at = 0.0  # loop time of the last write to the client
        self.held: list[bytes] = []
        self.timer: asyncio.Handle | None = None

    # ------------------------------------------------------------------ producer interface
    def start(self, sink: Any) -> None:
        self.sink = sink
        first, self.first = self.first, b""
        self._scan(first)
        if self.errored:
            self.held.append(first)
            self.resp.relay(self._data, self._end, self._error)
            self._end_at_error_event()
            return
        sink.write(first)
        self.flushed_at = self.loop.time()
        self.resp.relay(self._data, self._end, self._error)

    def pause(self) -> None:
        """The client's connection is full: stop reading the engine."""
        self.resp.pause()

    def resume(self) -> None:
        self.resp.resume()

    def abort(self) -> None:
        """The client went away."""
        self._take_held()
        self._finish("cancelled")

    def cut(self) -> None:
        """The scheduler is stopping and the stream has not ended: end it with an error event (after what
        is held), and the engine's stream with it."""
        if self.finished:
            return
        if self.errored:
            self._end_at_error_event(complete=True)
            return
        held = self._take_held()
        if self.done:  # [DONE] is here, only the end of the engine's response is not: the answer is whole
            self.sink.end(held)
            self._finish("completed")
            return
        self.sink.end(held + sse_error("the scheduler shut down before this stream ended; retry the request",
                                       "service_unavailable", "shutting_down"))
        self._finish("shutdown")

    # ------------------------------------------------------------------ engine callbacks
    def _scan(self, chunk: bytes) -> None:
        # events start a line; one whose "\ndata:" straddles the seam is counted with the piece it ends in
        self.events += chunk.count(_EVENT_START) + (self.tail[-5:] + chunk[:5]).count(_EVENT_START)
        for marker in _NO_TOKEN_MARKERS:
            if marker in chunk:
                self.no_token_events += chunk.count(marker)
        if b'"completion_tokens"' in chunk:  # usage: the last one counts (it may come with every chunk)
            counts = _COMPLETION_TOKENS.findall(chunk)
            if counts:
                self.completion_tokens = int(counts[-1])
        # Markers are looked for in the piece, and across the seam with the previous one (no copy of the piece).
        seam = self.tail + chunk[:24]
        if (b"[DONE]" in chunk or b"[DONE]" in seam) and (
                _DONE_EVENT in seam or _DONE_EVENT in chunk or _DONE_EVENT_COMPACT in seam
                or _DONE_EVENT_COMPACT in chunk):
            self.done = True
        if (STREAM_ERROR in chunk or STREAM_ERROR_COMPACT in chunk or STREAM_ERROR in seam
                or STREAM_ERROR_COMPACT in seam):
            self.errored = True
        self.tail = chunk[-24:] if len(chunk) >= 24 else (self.tail + chunk)[-24:]

    @property
    def token_events(self) -> int:
        """Events that carried generated tokens: one token each, unless the engine merged tokens into one
        event (a client reading slower than tokens come, speculative decoding, stream_interval > 1)."""
        return max(0, self.events - self.no_token_events - (1 if self.done else 0))

    @property
    def tokens(self) -> int:
        """Tokens generated: the usage chunk's count when the stream carries one, else `token_events`."""
        return self.completion_tokens or self.token_events

    def _data(self, chunk: bytes) -> None:
        if self.finished:
            return
        if not self.errored:  # after an error event, only the rest of its line matters
            self._scan(chunk)
        if self.errored:
            if self.timer is not None:  # nothing held goes out before the error event is rewritten
                self.timer.cancel()
                self.timer = None
            self.held.append(chunk)
            self._end_at_error_event()
            return
        self.t_last = self.clock()
        if self.done:
            # `[DONE]` is the stream's last event: nothing more is coming worth waiting for, so what is held
            # goes out with it right after this read, or with the end of the response if that is in it too.
            self.held.append(chunk)
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_soon(self._flush)
            return
        if self.held:
            self.held.append(chunk)
            return
        now = self.loop.time()
        due = self.flushed_at + self.interval
        if now >= due:
            self.flushed_at = now
            self.sink.write(chunk)
            return
        self.held.append(chunk)
        self.timer = self.loop.call_at(due, self._flush)

    def _flush(self) -> None:
        self.timer = None
        held, self.held = self.held, []
        if held and not self.finished:
            self.flushed_at = self.loop.time()
            self.sink.write(held[0] if len(held) == 1 else b"".join(held))

    def _take_held(self) -> bytes:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        held, self.held = self.held, []
        return b"".join(held)

    def _end_at_error_event(self, complete: bool = False) -> None:
        """The engine sent an error event: what came before it goes out, then the scheduler's own error event
        with the engine's message, and the stream ends there. Waits for the rest of the event's line unless
        the engine's response is `complete` (ended, broken or cut)."""
        if self.finished:
            return
        buf = b"".join(self.held)
        at = _error_event_at(buf)
        line_end = buf.find(b"\n", at) if at >= 0 else -1
        if at >= 0 and line_end < 0 and not complete:
            return
        self._take_held()
        message = "an error event"
        start = buf.rfind(b"data:", 0, at) if at >= 0 else -1
        if at >= 0:
            line = buf[start + 5 if start >= 0 else at:line_end if line_end >= 0 else len(buf)]
            try:
                event = json.loads(line if start >= 0 else b"{" + line)
                message = str(event.get("message") or event)
            except (ValueError, AttributeError):
                message = line.decode("utf-8", "replace").strip()[:500] or message
        # What came before the event. One whose start went out already (the marker straddled a piece that
        # was written) is closed with a blank line.
        prefix = buf[:start] if start >= 0 else b"\n\n"
        self.sink.end(prefix + sse_error(f"decode replica {self.address} reported an error mid-stream: {message}",
                                         "engine_error", "stream_interrupted"))
        self._finish("engine_error")

    def _end(self) -> None:
        if self.errored:
            self._end_at_error_event(complete=True)
            return
        held = self._take_held()
        if not self.done:
            self.sink.end(held + sse_error(f"decode replica {self.address} ended the stream before [DONE]",
                                           "engine_error", "stream_interrupted"))
            self._finish("truncated")
            return
        self.sink.end(held)
        self._finish("completed")

    def _error(self, exc: Exception) -> None:
        if self.errored:
            self._end_at_error_event(complete=True)
            return
        held = self._take_held()
        if self.done:  # [DONE] came: the answer is whole, whatever became of the rest of the engine's response
            self.sink.end(held)
            self._finish("completed")
            return
        message = self.on_broken(exc)
        self.sink.end(held + sse_error(f"decode replica {self.address} failed mid-stream: {message}",
                                       "engine_error", "stream_interrupted"))
        self._finish("failed")

    def _finish(self, outcome: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.resp.release()
        self.on_finish(outcome, self)
