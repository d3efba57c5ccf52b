"""The prefill -> decode handoff: the opaque state a context-only response carries, and the KV transfer.

`encoded_opaque_state` stands in for TensorRT-LLM's serialized DataTransceiverState: base64 of a JSON object
  {"protocol": "baton-engine-sim/1",
   "comm_state": {"host": ..., "port": ..., "instance": ...},   # how to reach the ctx worker's KV channel
   "ctx_request_id": ...,
   "cache_state": kvformat.to_wire(ctx CacheState)}            # the KV format (CacheState)
`port` is the ctx worker's KV transfer listener (transfer_server.py), not its HTTP port: like UCX and NIXL
under TensorRT-LLM's cache transceiver, the KV moves on a channel of its own, on a port the OS picks unless
`--sim-kv-port` fixes it. `instance` is a random id per ctx process, so a handle from a restarted worker is
refused instead of pulling somebody else's KV.

The channel: one TCP connection from a gen worker to each ctx worker it pulls from, carrying any number of
pulls at once. Each message is a frame: a 4-byte big-endian length, then compact JSON.
  pull    (gen -> ctx) {"id": N, "ctx_request_id", "instance", "cache_state": <gen CacheState>,
                        "link_bytes_per_s", "recv_buffer_tokens", "request_id"}  (recv_buffer_tokens: what
                        the gen worker's pre-allocated receive buffer holds; the ctx side checks both buffers)
  refusal (gen -> ctx) a pull with "refused": <the gen side's error>: the gen worker refused the handle (its
                        CacheState differs), the handshake fails and the ctx side frees the KV
  cancel  (gen -> ctx) {"id": N, "cancel": true}: the gen side gave up pull N (kv_transfer_timeout_ms, its
                        request cancelled); the ctx side stops that transfer and frees the KV, and sends no answer.
                        A pull given up before its frame went out is told as a refusal instead
  answer  (ctx -> gen) {"id": N, "ok": {"ctx_request_id", "kv_cache_size", "num_tokens",
                                         "transfer_start", "transfer_end"}}
                    or {"id": N, "error": {"message", "status", "type"}}
Answers come back in the order transfers end, matched by `id`. The ctx side re-checks compatibility
(TensorRT-LLM's inquireSupport runs on the ctx side; a mismatch fails the context request and frees its KV),
holds the blocks for the transfer time, frees them and answers with the KV size. With kv_transfer_timeout_ms
set, each side bounds the transfer by its own timeout: the ctx side from the end of the prefill (it answers
a "KVTransferTimeout" error), the gen side from the start of its pull.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import logging
from dataclasses import dataclass

from baton import kvformat

log = logging.getLogger("baton.engine_sim.handoff")

# The error type of a transfer whose KV does not fit a pre-allocated transfer buffer, with NIXL (which cannot
# use a buffer allocated for one transfer): HandoffError kind "buffer".
BUFFER_TOO_SMALL = "KVTransferBufferTooSmall"

PROTOCOL = "baton-engine-sim/1"
MAX_FRAME_BYTES = 1 << 20  # far above any pull or answer; a larger length means the peer does not speak this


class HandoffError(Exception):
    """A handoff failed; `kind` says why ("format" = KV-format mismatch, "timeout" = not received within the
    gen side's kv_transfer_timeout_ms, "buffer" = the KV does not fit a transfer buffer and the backend is
    NIXL, else "transfer")."""

    def __init__(self, message: str, kind: str = "transfer") -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind


@dataclass(frozen=True)
class OpaqueState:
    host: str
    port: int
    instance: str
    ctx_request_id: int
    cache_state: kvformat.CacheState


def _compact(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


@functools.lru_cache(maxsize=16)
def _opaque_parts(host: str, port: int, instance: str, cache_state: kvformat.CacheState) -> tuple[str, str]:
    """The JSON of an opaque state around its ctx_request_id, the only part that changes from one context
    request to the next on a worker: serialized once per worker instead of for every handoff."""
    head = _compact({"protocol": PROTOCOL, "comm_state": {"host": host, "port": port, "instance": instance}})
    return head[:-1] + ',"ctx_request_id":', ',"cache_state":' + _compact(kvformat.to_wire(cache_state)) + "}"


def encode_opaque(state: OpaqueState) -> str:
    """base64 of {"protocol", "comm_state", "ctx_request_id", "cache_state"} as compact JSON."""
    head, tail = _opaque_parts(state.host, state.port, state.instance, state.cache_state)
    return base64.b64encode(f"{head}{int(state.ctx_request_id)}{tail}".encode("utf-8")).decode("ascii")


def decode_opaque(text: object) -> OpaqueState:
    """Parse an encoded_opaque_state; ValueError with a readable message when it is not one of ours."""
    if not isinstance(text, str) or not text:
        raise ValueError("encoded_opaque_state must be a non-empty base64 string")
    try:
        payload = json.loads(base64.b64decode(text.encode("ascii"), validate=True))
    except (binascii.Error, UnicodeError, ValueError) as exc:
        raise ValueError(f"encoded_opaque_state is not valid base64 JSON: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("protocol") != PROTOCOL:
        proto = payload.get("protocol") if isinstance(payload, dict) else None
        raise ValueError(f"encoded_opaque_state protocol {proto!r} is not {PROTOCOL!r}")
    try:
        comm = payload["comm_state"]
        return OpaqueState(
            host=str(comm["host"]),
            port=int(comm["port"]),
            instance=str(comm["instance"]),
            ctx_request_id=int(payload["ctx_request_id"]),
            cache_state=kvformat.from_wire(payload["cache_state"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"encoded_opaque_state is incomplete: {exc}") from exc


def frame(payload: bytes) -> bytes:
    """One message on the KV channel: its length, then the JSON."""
    return len(payload).to_bytes(4, "big") + payload


def frame_json(message: dict) -> bytes:
    """`message` as one frame of compact JSON."""
    return frame(_compact(message).encode())


class FrameReader:
    """Cuts the bytes arriving on a KV channel into the JSON payloads of its frames."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The payloads completed by `data`; ValueError when a frame announces an impossible length."""
        buf = self._buf
        buf += data
        out = []
        pos, end = 0, len(buf)
        while end - pos >= 4:
            size = int.from_bytes(buf[pos:pos + 4], "big")
            if size > MAX_FRAME_BYTES:
                raise ValueError(f"a KV channel frame announces {size} bytes (at most {MAX_FRAME_BYTES}): "
                                 "the peer does not speak this protocol")
            stop = pos + 4 + size
            if stop > end:
                break
            out.append(bytes(buf[pos + 4:stop]))
            pos = stop
        if pos:
            del buf[:pos]
        return out


@functools.lru_cache(maxsize=16)
def _state_json(state: kvformat.CacheState) -> bytes:
    """A worker's own CacheState as JSON, sent with every KV pull: serialized once."""
    return _compact(kvformat.to_wire(state)).encode()


class _Channel(asyncio.Protocol):
    """The gen side of one KV channel: pulls in flight wait on futures keyed by their frame id."""

    def __init__(self, key: tuple[str, int], on_close) -> None:
        self.key = key  # (host, port) of the ctx worker's listener
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader()
        self.waiting: dict[int, asyncio.Future] = {}
        self.next_id = 1
        self.closed = False
        self._on_close = on_close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            for payload in self.reader.feed(data):
                answer = json.loads(payload)
                fut = self.waiting.pop(answer["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(answer)
        except (ValueError, KeyError, TypeError) as exc:  # not our protocol: nothing more on it can be trusted
            self.fail(ConnectionError(f"unreadable answer on the KV channel: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(exc or ConnectionResetError("the context worker closed the KV channel"))

    def fail(self, exc: BaseException) -> None:
        if not self.closed:
            self.closed = True
            self._on_close(self)
            if self.transport is not None:
                self.transport.abort()
        waiting, self.waiting = self.waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(exc)


class _PullTimeout(TimeoutError):
    """The gen side's limit on one pull ran out (kv_transfer_timeout_ms, else the puller's own)."""


def _time_out(fut: asyncio.Future, seconds: float) -> None:
    if not fut.done():
        fut.set_exception(_PullTimeout(f"no answer within {seconds:g} s"))


class _PullState:
    """How far one pull got: whether its pull frame went out (`sent`), and what it was doing before (`stage`, for
    the context worker's log when the pull is given up before that)."""

    __slots__ = ("sent", "stage")

    def __init__(self) -> None:
        self.sent = False
        self.stage = "waited for its turn to receive"


class _Turn:
    """One receive turn (a lock) and how many pulls hold or wait for it: dropped when none does, so a puller
    does not keep a lock for every context worker it ever pulled from."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class KVPuller:
    """The gen side of the KV transfer: one channel per ctx worker, opened on first use, shared by all pulls.

    A gen worker receives KV one request at a time, as TensorRT-LLM's generation executor does by default (it
    reuses one set of receive resources); with `receive_per_context_worker` (TRTLLM_REQUEST_KV_CACHE_CONCURRENT=1)
    one at a time per ctx worker, different ctx workers' side by side. A pull holds its turn from sending its
    request until the answer, so it also waits out the ctx side's queue for that worker's link. Without
    `in_turn` (no modelled time: --sim-speed 0, where the ctx side does not take its link either) pulls do
    not wait for turns."""

    def __init__(self, *, timeout_s: float = 60.0, receive_per_context_worker: bool = False,
                 in_turn: bool = True) -> None:
        self._timeout = timeout_s  # the whole pull: connect, the ctx side's transfer time, the answer
        self._channels: dict[tuple[str, int], _Channel] = {}
        self._connecting: dict[tuple[str, int], asyncio.Task] = {}
        self._per_context_worker = receive_per_context_worker
        self._in_turn = in_turn
        self._turns: dict[tuple[str, int] | None, _Turn] = {}  # the receive turns in use, by ctx worker or None
        self._telling: set[asyncio.Task] = set()  # ctx workers being told of pulls given up unsent

    async def close(self) -> None:
        telling = list(self._telling)
        for task in [*self._connecting.values(), *telling]:
            task.cancel()
        for chan in list(self._channels.values()):
            chan.fail(ConnectionAbortedError("the generation worker is shutting down"))
        self._channels.clear()
        await asyncio.gather(*telling, return_exceptions=True)

    def _forget(self, chan: _Channel) -> None:
        if self._channels.get(chan.key) is chan:
            del self._channels[chan.key]

    async def _connect(self, key: tuple[str, int]) -> _Channel:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._timeout):
            _, chan = await loop.create_connection(lambda: _Channel(key, self._forget), *key)
        self._channels[key] = chan
        return chan

    async def _channel(self, host: str, port: int) -> _Channel:
        key = (host, port)
        chan = self._channels.get(key)
        if chan is not None and not chan.closed:
            return chan
        task = self._connecting.get(key)
        if task is None:  # one connect per ctx worker, however many pulls wait for it
            task = asyncio.get_running_loop().create_task(self._connect(key))
            self._connecting[key] = task
            task.add_done_callback(lambda _t: self._connecting.pop(key, None))
        return await asyncio.shield(task)

    async def pull(
        self,
        handle: OpaqueState,
        own_state: kvformat.CacheState,
        *,
        link_bytes_per_s: float,
        recv_buffer_tokens: int | None = None,
        x_request_id: str = "",
        timeout_s: float | None = None,
    ) -> dict:
        """Pull the KV named by `handle`; returns the ctx answer ({"kv_cache_size", "num_tokens", ...}).

        `timeout_s` (the worker's kv_transfer_timeout_ms) bounds the whole pull: the wait for this worker's
        turn to receive, connecting, the ctx side's transfer time and the answer. When it runs out the pull is
        cancelled on the ctx side too, and this raises a HandoffError of kind "timeout". Without it, the
        puller's own limit (60 s) applies from the pull's turn. A pull given up before its pull frame went out
        (its timeout, or its request cancelled, while it waited for its turn or connected) never asked the ctx
        worker for the KV: that worker is told, and frees the KV."""
        extra = b'"link_bytes_per_s":%s' % _compact(link_bytes_per_s).encode()
        if recv_buffer_tokens is not None:
            extra += b',"recv_buffer_tokens":%d' % recv_buffer_tokens
        state = _PullState()
        try:
            if not self._in_turn:
                return await self._ask(handle, own_state, extra, x_request_id, timeout_s, pull=state)
            return await self._pull_in_turn(handle, own_state, extra, x_request_id, timeout_s, state)
        except asyncio.CancelledError:
            if not state.sent:
                self._give_up_unsent(handle, own_state, x_request_id, f"its request went away while it {state.stage}")
            raise

    async def _pull_in_turn(self, handle: OpaqueState, own_state: kvformat.CacheState, extra: bytes,
                            x_request_id: str, timeout_s: float | None, state: _PullState) -> dict:
        """`pull` once this worker's turn to receive (from that ctx worker) comes."""
        loop = asyncio.get_running_loop()
        queued = loop.time()
        deadline = None if timeout_s is None else queued + timeout_s
        key = (handle.host, handle.port) if self._per_context_worker else None
        turn = self._turns.get(key)
        if turn is None:
            turn = self._turns[key] = _Turn()
        turn.users += 1
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    await turn.lock.acquire()
                if deadline is not None and loop.time() >= deadline:  # its turn came as its time ran out
                    turn.lock.release()
                    raise TimeoutError
            except TimeoutError as exc:
                self._give_up_unsent(handle, own_state, x_request_id, "its kv_transfer_timeout_ms ran out while it "
                                     "waited for its turn to receive")
                raise self._timed_out(f"{handle.host}:{handle.port}", handle, timeout_s,
                                      _PullTimeout(f"not begun within {timeout_s:g} s"), loop.time() - queued) from exc
            try:
                return await self._ask(handle, own_state, extra, x_request_id, timeout_s, deadline=deadline,
                                       waited_s=loop.time() - queued, pull=state)
            finally:
                turn.lock.release()
        finally:
            turn.users -= 1
            if not turn.users and self._turns.get(key) is turn:
                del self._turns[key]

    def _give_up_unsent(self, handle: OpaqueState, own_state: kvformat.CacheState, x_request_id: str,
                        why: str) -> None:
        """A pull given up before its pull frame went out never asked the ctx worker for the KV: tell that worker,
        which frees the KV now instead of at its own kv_transfer_timeout_ms, or never without one."""
        self.tell_refused(handle, own_state, f"it gave up the pull: {why}", x_request_id=x_request_id,
                          what="a pull given up", event="kv_give_up_unsent")

    def tell_refused(self, handle: OpaqueState, own_state: kvformat.CacheState, reason: str, *,
                     x_request_id: str, what: str, event: str) -> None:
        """`refuse` in the background (until `close`): the caller's answer does not wait for it. When the ctx
        worker cannot be told, that is logged (`event`, about `what`)."""
        async def tell() -> None:
            try:
                await self.refuse(handle, own_state, reason, x_request_id=x_request_id)
            except HandoffError as exc:
                log.info(f"could not tell the context worker about {what}", extra={"fields": {
                    "event": event, "request_id": x_request_id, "ctx_request_id": handle.ctx_request_id,
                    "error": exc.message}})

        task = asyncio.get_running_loop().create_task(tell())
        self._telling.add(task)
        task.add_done_callback(self._telling.discard)

    async def refuse(
        self, handle: OpaqueState, own_state: kvformat.CacheState, reason: str, *, x_request_id: str = "",
    ) -> None:
        """Tell the ctx worker named by `handle` that this worker refused it (the handshake fails there too, and
        the ctx side frees the KV). Its error answer is the expected outcome; HandoffError only when the ctx
        worker could not be told."""
        extra = b'"refused":%s' % _compact(reason).encode()
        try:
            await self._ask(handle, own_state, extra, x_request_id, None)
        except HandoffError as exc:
            if exc.kind != "format":
                raise

    async def _ask(
        self, handle: OpaqueState, own_state: kvformat.CacheState, extra: bytes, x_request_id: str,
        timeout_s: float | None, *, deadline: float | None = None, waited_s: float = 0.0,
        pull: _PullState | None = None,
    ) -> dict:
        """Send one pull frame (with `extra` fields) and wait for its answer, until `deadline` (loop time; else
        the limit from now). `waited_s`: how long the pull waited for its turn to receive (said on a timeout).
        `pull`: the state of a KV pull (None for a refusal), marked sent once its frame is written; a pull whose
        limit runs out while it connects tells the ctx worker, which frees the KV."""
        host = handle.host
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        where = f"{handle.host}:{handle.port}"
        loop = asyncio.get_running_loop()
        limit = self._timeout if timeout_s is None else timeout_s
        if deadline is None:
            deadline = loop.time() + limit
        if pull is not None:
            pull.stage = "connected to the context worker"
        try:
            async with asyncio.timeout_at(deadline):
                chan = await self._channel(host, handle.port)
        except TimeoutError as exc:
            if pull is not None:
                self._give_up_unsent(handle, own_state, x_request_id, "its time ran out while it connected to the "
                                     "context worker")
            raise self._timed_out(where, handle, timeout_s, _PullTimeout(f"not connected within {limit:g} s"),
                                  waited_s) from exc
        except OSError as exc:  # ConnectionError (refused, reset, closed early)
            raise HandoffError(
                f"KV transfer from context worker {where} failed: {type(exc).__name__}: {exc}"
            ) from exc
        fid = chan.next_id
        chan.next_id += 1
        fut = loop.create_future()
        chan.waiting[fid] = fut
        try:
            chan.transport.write(frame(b'{"id":%d,"ctx_request_id":%d,"instance":%s,"cache_state":%s,'  # type: ignore[union-attr]
                                       b'%s,"request_id":%s}' % (
                fid, handle.ctx_request_id, _compact(handle.instance).encode(), _state_json(own_state),
                extra, _compact(x_request_id).encode())))
            if pull is not None:
                pull.sent = True
            timer = loop.call_at(deadline, _time_out, fut, limit)
            try:
                answer = await fut
            finally:
                timer.cancel()
                chan.waiting.pop(fid, None)
        except _PullTimeout as exc:
            self._cancel(chan, fid)
            raise self._timed_out(where, handle, timeout_s, exc, waited_s) from exc
        except asyncio.CancelledError:  # the generation request went away
            self._cancel(chan, fid)
            raise
        except OSError as exc:  # the channel broke with the pull in flight
            raise HandoffError(
                f"KV transfer from context worker {where} failed: {type(exc).__name__}: {exc}"
            ) from exc
        ok = answer.get("ok")
        if isinstance(ok, dict):
            return ok
        error = answer.get("error")
        error = error if isinstance(error, dict) else {}
        kind = {"CacheStateMismatch": "format", BUFFER_TOO_SMALL: "buffer"}.get(error.get("type"), "transfer")
        message = str(error.get("message") or "")
        if not message or error.get("type") == "ServiceUnavailableError":  # e.g. its engine is in a fatal state
            message = f"KV transfer from context worker {where} failed" + (f": {message}" if message else "")
        raise HandoffError(message, kind)

    @staticmethod
    def _cancel(chan: _Channel, fid: int) -> None:
        """Stop the ctx side's transfer of pull `fid` too (its blocks, its place on the link): the gen side
        gave it up, whatever the reason."""
        if not chan.closed and chan.transport is not None:
            chan.transport.write(frame(b'{"id":%d,"cancel":true}' % fid))

    def _timed_out(self, where: str, handle: OpaqueState, timeout_s: float | None, exc: Exception,
                   waited_s: float = 0.0) -> HandoffError:
        """The pull's limit ran out; `waited_s`: how much of it went on waiting for this worker's turn to receive."""
        order = "from this context worker " if self._per_context_worker else ""
        waited = (f" (it waited {waited_s * 1000:.0f} ms for this generation worker's turn to receive KV, one "
                  f"request at a time {order}behind other requests)") if waited_s >= 0.001 else ""
        if timeout_s is None:  # the puller's own limit: a context worker that does not answer
            return HandoffError(f"KV transfer from context worker {where} failed: TimeoutError: {exc}{waited}")
        return HandoffError(
            f"KV cache transfer timed out: ctx_request_id {handle.ctx_request_id} was not received from context "
            f"worker {where} within kv_transfer_timeout_ms={timeout_s * 1000:g} of the generation worker; the "
            f"request was cancelled{waited}", "timeout")
