"""The ctx side of the KV transfer channel: the listener a context worker's handles point at.

TensorRT-LLM's cache transceiver moves KV over its own connection (UCX, NIXL), on a port the OS picks, never
through the OpenAI server. So does the simulator: `KVTransferServer` listens on the worker's host, on
`--sim-kv-port` (default 0: any free port), and that port goes into every handle's comm_state. The frames are
described in handoff.py, which holds the gen side (`KVPuller`).

Each pull runs `Engine.begin_pull` (instance, CacheState and availability checks, with TensorRT-LLM's error
text; a failed CacheState check, or a refusal sent by the gen side, fails the context request and frees its
KV), keeps the blocks while the transfer waits for the worker's link (one transfer at a time, first come
first served) and for the modelled transfer time (`Engine.transfer_buffer_check` adds to it, or fails the
transfer, when the KV does not fit a pre-allocated transfer buffer), then `Engine.end_pull` frees them and
the answer goes back. With kv_transfer_timeout_ms set, a transfer that would end after the timeout (counted from the end of the
prefill) is cut off when it runs out: `Engine.send_timed_out` frees the blocks and the gen side gets a
"KVTransferTimeout" error. A pull whose connection drops before its answer is sent, or that the gen side
cancels (its own timeout ran out), frees the blocks without counting as served.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from baton import kvformat
from baton.engine_sim.engine import Engine, EngineError
from baton.engine_sim.handoff import FrameReader, frame_json

log = logging.getLogger("baton.engine_sim.transfer")


def _error(fid: int, message: str, status: int, err_type: str) -> bytes:
    return frame_json({"id": fid, "error": {"message": message, "status": status, "type": err_type}})


class _Connection(asyncio.Protocol):
    """One gen worker's channel: reads pulls, answers each when its transfer ends."""

    def __init__(self, server: KVTransferServer) -> None:
        self.server = server
        self.engine = server.engine
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader()
        self.transfers: dict[int, asyncio.Task] = {}  # by frame id: the transfers waiting out their time

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for task in list(self.transfers.values()):  # nobody to send these to: their blocks are freed, not sent
            task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            payloads = self.reader.feed(data)
        except ValueError as exc:
            self._drop(str(exc))
            return
        for payload in payloads:
            try:
                msg = json.loads(payload)
                fid = msg["id"]
                if type(fid) is not int:
                    raise TypeError("the frame id must be an integer")
            except (ValueError, KeyError, TypeError) as exc:
                self._drop(f"unreadable pull: {exc}")
                return
            if msg.get("cancel") is True:  # the gen side gave up this pull: stop sending, free the blocks
                task = self.transfers.get(fid)
                if task is not None:
                    task.cancel()
                continue
            self._pull(fid, msg)

    def _drop(self, why: str) -> None:
        log.warning("KV channel closed: not our protocol", extra={"fields": {"event": "kv_channel_refused",
                                                                            "error": why}})
        assert self.transport is not None
        self.transport.abort()

    def _pull(self, fid: int, msg: dict) -> None:
        transport = self.transport
        assert transport is not None
        x_rid = msg.get("request_id") or ""
        try:
            ctx_request_id = int(msg["ctx_request_id"])
            instance = str(msg["instance"])
            peer = kvformat.from_wire(msg["cache_state"])
            link = msg.get("link_bytes_per_s")
            link = float(link) if link else None
            refused = msg.get("refused")
            refused = None if refused is None else str(refused)
            recv_buffer = msg.get("recv_buffer_tokens")
            if recv_buffer is not None and (type(recv_buffer) is not int or recv_buffer < 0):
                raise TypeError(f"recv_buffer_tokens must be a whole number of tokens, got {recv_buffer!r}")
            x_rid = str(x_rid)
        except (ValueError, KeyError, TypeError, OverflowError) as exc:
            transport.write(_error(fid, f"invalid KV pull request: {exc}", 400, "BadRequestError"))
            return
        engine = self.engine
        try:
            held = engine.begin_pull(ctx_request_id, instance, peer, x_rid, refused=refused)
        except EngineError as exc:
            transport.write(_error(fid, exc.message, exc.status, exc.err_type))
            return
        budget = engine.send_budget(held)  # None: no kv_transfer_timeout_ms
        if budget is not None and budget <= 0:  # out of time before it began
            transport.write(_error(fid, engine.send_timed_out(held, x_rid), 500, "KVTransferTimeout"))
            return
        try:
            extra = engine.transfer_buffer_check(held, recv_buffer, x_rid)
        except EngineError as exc:
            engine.send_failed(held, exc.message, x_rid)
            transport.write(_error(fid, exc.message, exc.status, exc.err_type))
            return
        seconds = engine.pull_seconds(held, link, peer)
        if seconds <= 0 and extra <= 0:  # no modelled time (--sim-speed 0): answered at once
            transport.write(frame_json({"id": fid, "ok": engine.end_pull(held, time.monotonic(), x_request_id=x_rid)}))
            return
        task = asyncio.get_running_loop().create_task(self._send(fid, held, seconds, extra, budget, x_rid))

        def done(t: asyncio.Task) -> None:
            if self.transfers.get(fid) is t:
                del self.transfers[fid]
            if t.cancelled():  # also before its first step (a cancel right behind the pull), when `_send`'s own
                # handler never ran; after it, the send has ended and this does nothing
                engine.end_pull(held, time.monotonic(), sent=False, x_request_id=x_rid)
        self.transfers[fid] = task
        task.add_done_callback(done)

    async def _send(self, fid: int, held, seconds: float, extra: float, budget: float | None, x_rid: str) -> None:
        """Allocate what the buffers need (`extra`), wait for the worker's link (its transfers go out one after
        another, first come first served), then send for `seconds`. With kv_transfer_timeout_ms (`budget`
        left of it) the transfer is cut off when it runs out, waiting or sending: the blocks are freed and the
        gen side gets a KVTransferTimeout error. Cancelled (the gen side gave up, the channel broke): the blocks
        are freed, not counted as served; a transfer that leaves the link's queue takes no time on it."""
        engine = self.engine
        started = time.monotonic()
        queued: float | None = None  # when it began to wait for the link (after the buffers' allocation)
        sending = False
        try:
            async with asyncio.timeout(budget):
                if extra > 0:
                    await asyncio.sleep(extra)
                queued = time.monotonic()
                async with self.server.link:
                    started, sending = time.monotonic(), True
                    await asyncio.sleep(seconds)
        except TimeoutError:
            waited = 0.0 if queued is None else (started if sending else time.monotonic()) - queued
            message = engine.send_timed_out(held, x_rid, waited_s=waited)
            assert self.transport is not None
            self.transport.write(_error(fid, message, 500, "KVTransferTimeout"))
            return
        except asyncio.CancelledError:
            engine.end_pull(held, started, sent=False, x_request_id=x_rid)
            raise
        answer = engine.end_pull(held, started, x_request_id=x_rid)
        assert self.transport is not None
        self.transport.write(frame_json({"id": fid, "ok": answer}))


class KVTransferServer:
    """A context worker's KV transfer listener."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.port: int | None = None
        self.connections: set[_Connection] = set()
        # The worker's links to the gen workers: one transfer at a time on them, at the link rate (several at
        # once would share the NIC, for the same aggregate rate); asyncio.Lock serves waiters in arrival order.
        self.link = asyncio.Lock()
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int = 0) -> int:
        """Listen on host:port (0 = any free port); returns the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host or None, port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def _transfers(self) -> list[asyncio.Task]:
        """The transfers still waiting out their modelled time, on every channel."""
        return [task for conn in self.connections for task in conn.transfers.values()]

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop listening; transfers still running get `grace_s` to end, then every channel is closed."""
        if self._server is not None:
            self._server.close()
        running = self._transfers()
        if running and grace_s > 0:
            await asyncio.wait(running, timeout=grace_s)
        running = self._transfers()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
