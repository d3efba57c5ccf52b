"""The engine core: continuous batching, KV-block accounting, held KV for handoffs, and statistics.

One asyncio task (`Engine._run`) plays the executor loop. Each iteration it
1. admits queued requests in FIFO order while an active slot is free (max_batch_size x pipeline-parallel
   size: TensorRT-LLM's PyTorch backend keeps a micro-batch of up to max_batch_size in flight per pipeline
   stage) and the KV cache can reserve ceil((prompt + max_tokens) / tokens_per_block) blocks (TensorRT-LLM's
   GUARANTEED_NO_EVICT policy); a generation-only request starts its KV pull instead of a prefill;
2. picks at most max_batch_size of the active sequences (all of them without pipeline parallelism; with it,
   those that waited longest first), schedules their decoding sequences (one token each, at most
   max_num_tokens of them) and, in FIFO order, the prefills that fit in max_num_tokens minus the decode
   tokens, as TensorRT-LLM's MicroBatchScheduler does. With `enable_chunked_prefill` a prompt that does not
   fit is prefilled in chunks over several iterations (first come, first served): each chunk takes what is
   left of the iteration's token budget, rounded down to whole chunk units of tokens_per_block (the last
   chunk takes the rest of the prompt), and a later prompt takes what is left after that, whole if it fits;
   a chunk's attention covers the prompt tokens of the chunks before it;
3. sleeps the modelled iteration time (timing.TimingModel: the prefill pass costs its linear part over all
   its tokens plus each sequence's attention, a x (end^2 - start^2) over the prompt positions [start, end) it
   covers, `ModelTiming.prefill_pass`; nothing at --sim-speed 0, but still yields);
4. emits one token per scheduled sequence whose prompt is fully prefilled (the first token comes with the
   last chunk) and per decoding sequence, and finishes those that reached max_tokens.

A context-only request ends after its prefill; its KV stays allocated ("held") until a generation worker
pulls it (`begin_pull` / `end_pull`, driven by transfer_server.py), the handshake of a pull fails (the
CacheStates differ: the context request fails and its KV is freed), or `kv_transfer_timeout_ms` expires
(counted from the end of the prefill, it also bounds the transfer itself; the generation side bounds its pull
by its own `kv_transfer_timeout_ms`).
The HTTP layer (server.py) only translates requests into `submit()` calls and results into OpenAI
responses.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
import uuid
import zlib
from collections.abc import Callable

from baton import kvformat
from baton.engine_sim.config import SimConfig, blocks_for
from baton.engine_sim.handoff import BUFFER_TOO_SMALL, HandoffError, KVPuller, OpaqueState
from baton.idlists import ids_text

log = logging.getLogger("baton.engine_sim.engine")

CTX_AND_GEN = "context_and_generation"
CTX_ONLY = "context_only"
GEN_ONLY = "generation_only"
REQUEST_TYPES = (CTX_AND_GEN, CTX_ONLY, GEN_ONLY)
# What a request to an engine in the fatal state gets (a 400 BadRequestError): trtllm-serve's LLM.generate_async
# raises it once the executor has shut down, and the server answers that like any failed generation. The
# scheduler knows the text: a replica failure, retried elsewhere, not the client's mistake.
ENGINE_GONE = "LLM is shutting down"

QUEUED, PREFILL, TRANSFER, DECODE, FINISHED = range(5)
_LIVE = (PREFILL, TRANSFER, DECODE)

OVERLAP_CTX_ONLY_MESSAGE = "Context only requests are not supported in pytorch backend when overlap is enabled."

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there one all we their can has more will would been if no when what so out up "
    "time into only new some could them these two may first then do any like my now over such our man me "
    "even most made after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see men work long "
    "get here between both life being under never day same another know while last might us great old year "
    "off come since against go came right used take three"
).split()


class Prompt:
    """A request's prompt as the engine keeps it: its length, the seed of its generated tokens (a CRC of
    its ids, the same on every process) and its ids as compact JSON (what a context-only answer returns
    as prompt_token_ids). Prompts sent as token ids stay text (`baton.idlists`): nothing in the engine
    needs them as Python ints, and decoding them was the largest part of reading a request."""

    __slots__ = ("ids_json", "length", "seed")

    def __init__(self, compact: bytes, length: int) -> None:
        """`compact`: the ids as `1,2,3` (`baton.idlists.ids_text`, or a list `cut_id_list` cut out)."""
        self.length = length
        self.seed = zlib.crc32(compact)
        self.ids_json = b"[" + compact + b"]"

    @classmethod
    def of(cls, ids: list[int]) -> Prompt:
        return cls(ids_text(ids), len(ids))


def token_at(seed: int, index: int, vocab: int) -> int:
    """The index-th generated token of a sequence (deterministic; index 0 is produced by the prefill)."""
    x = (seed * 0x9E3779B1 + (index + 1) * 0x85EBCA77) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
    x ^= x >> 12
    return x % vocab


def token_text(token: int) -> str:
    """The text of one generated token: a space and a word chosen by the id."""
    return " " + _WORDS[token % len(_WORDS)]


class EngineError(Exception):
    """A request failed; `status` is the HTTP status and `err_type` the error type the server reports.

    `in_generation`: the request was accepted and its generation failed (in TensorRT-LLM, an exception raised
    from the request's promise, such as a failed KV handoff), as opposed to a refusal when it is submitted.
    trtllm-serve answers such a failure of a request not streamed 400 BadRequestError with the message, and
    breaks off a streamed one (its 200 and SSE headers are out already); see server.py."""

    def __init__(self, message: str, status: int = 400, err_type: str = "BadRequestError", *,
                 in_generation: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.err_type = err_type
        self.in_generation = in_generation

    @property
    def is_failure(self) -> bool:
        """A failure of the engine or of an accepted request's generation, logged as such; the rest are refusals
        of a request (logged at debug level)."""
        return self.status >= 500 or self.in_generation


class Seq:
    """One request inside the engine."""

    __slots__ = (
        "rid", "x_request_id", "kind", "prompt", "max_tokens", "need_blocks", "tokens", "phase", "done", "changed",
        "notify", "error", "arrival", "first_scheduled", "first_token_time", "last_token_time", "first_iter", "last_iter",
        "handle", "first_tokens", "kv_size", "kv_start", "kv_end", "prefilled", "pulling", "ran_iter",
    )

    def __init__(self, rid: int, kind: str, prompt: Prompt, max_tokens: int, x_request_id: str) -> None:
        self.rid = rid
        self.x_request_id = x_request_id
        self.kind = kind
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.need_blocks = 0
        self.tokens: list[int] = []
        self.phase = QUEUED
        self.prefilled = 0  # prompt tokens already prefilled (by earlier chunks of a chunked prefill)
        self.pulling: asyncio.Task | None = None  # generation_only: the task pulling its KV (done once it has)
        self.ran_iter = 0  # the last iteration it was scheduled in (0: never): who goes first when not all fit
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.changed: asyncio.Event | None = None  # set at each change, for a consumer that waits (stream=True)
        self.notify: Callable[[], None] | None = None  # called at each change: new tokens, the end, a failure
        self.error: EngineError | None = None
        self.arrival = time.monotonic()
        self.first_scheduled: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.first_iter: int | None = None
        self.last_iter: int | None = None
        self.handle: OpaqueState | None = None
        self.first_tokens: list[int] = []
        self.kv_size: int | None = None
        self.kv_start: float | None = None
        self.kv_end: float | None = None

    @property
    def finished(self) -> bool:
        return self.phase == FINISHED


def buffer_too_small_for_nixl(ctx_request_id: int, num_tokens: int, sides: list[str]) -> str:
    where = (f"the {sides[0]} worker's pre-allocated transfer buffer" if len(sides) == 1
             else "the pre-allocated transfer buffers of both workers")
    return (f"KV cache transfer failed: the KV cache of ctx_request_id {ctx_request_id} ({num_tokens} tokens) does "
            f"not fit {where}, and the NIXL backend cannot transfer through a buffer allocated for one transfer; "
            "set cache_transceiver_config.max_tokens_in_buffer to at least the longest prompt")


def dynamic_buffer_warning(ctx_request_id: int, num_tokens: int, source: str) -> str:
    return (f"KV cache of ctx_request_id {ctx_request_id} ({num_tokens} tokens) does not fit the pre-allocated "
            f"transfer buffer ({source}); it goes through a dynamically allocated buffer, which is slower (and "
            "fails with NIXL): set cache_transceiver_config.max_tokens_in_buffer to at least the longest prompt")


def _ran_iter(s: Seq) -> int:
    return s.ran_iter


class _Held:
    __slots__ = ("rid", "blocks", "num_tokens", "kv_bytes", "timer", "created")

    def __init__(self, rid: int, blocks: int, num_tokens: int, kv_bytes: int) -> None:
        self.rid = rid
        self.blocks = blocks
        self.num_tokens = num_tokens
        self.kv_bytes = kv_bytes
        self.timer: asyncio.TimerHandle | None = None
        self.created = time.monotonic()


_COUNTERS = (
    "requestsReceived", "requestsCompleted", "requestsFailed", "requestsRejected", "requestsCancelled",
    "kvFormatRejections", "kvPullsServed", "kvPullsFailed", "kvExpired", "kvTransfersCompleted",
    "kvTransferFailures", "kvBytesSent", "kvBytesReceived", "kvTransfersDynamicBuffer",
)


class Engine:
    def __init__(self, cfg: SimConfig, *, puller: KVPuller | None = None) -> None:
        self.cfg = cfg
        self.state = cfg.cache_state
        self.instance = uuid.uuid4().hex[:16]
        self.kv_bytes_per_token = kvformat.kv_bytes_per_token(cfg.cache_state)
        self.puller = puller or KVPuller(receive_per_context_worker=cfg.kv_receive_per_context_worker,
                                         in_turn=cfg.time_scale > 0)
        # a prompt longer than max_num_tokens is prefilled in chunks instead of refused
        self._chunked_prefill = cfg.chunked_prefill
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self.fatal: str | None = None
        self.on_fatal: Callable[[str], None] | None = None
        # ctx_request_ids start at a random offset so a restarted worker does not reuse live ids.
        self._next_id = random.randrange(1, 1 << 40)
        self._queue: collections.deque[Seq] = collections.deque()
        self._active: list[Seq] = []
        # TensorRT-LLM's PyTorch backend admits max_batch_size x pp_size requests (PyExecutor's
        # max_num_active_requests = PyTorchModelEngine.get_max_num_sequences(), the capacity scheduler's
        # max_num_sequences): with pipeline parallelism one micro-batch of up to max_batch_size is in flight
        # per stage. One iteration still runs at most max_batch_size of them (the MicroBatchScheduler's limit).
        self.max_active = cfg.max_batch_size * max(1, cfg.cache_state.pp)
        self._completed_between = 0  # requests that finished outside an iteration (`_transfer`), for the next record
        self._reserved = 0  # blocks reserved by live sequences and held KV
        self._held: dict[int, _Held] = {}
        self._sending: dict[int, _Held] = {}
        self._held_blocks = 0
        self._gone: collections.OrderedDict[int, str] = collections.OrderedDict()  # freed KV: why
        self._iter = 0
        self._iter_stats: collections.deque[tuple] = collections.deque(maxlen=cfg.iter_stats_max)
        self._perf: collections.deque[dict] = collections.deque(maxlen=cfg.perf_metrics_max)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._transfers: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="engine-loop")

    async def stop(self) -> None:
        for task in [self._task, *self._transfers]:
            if task is not None:
                task.cancel()
        for task in [self._task, *self._transfers]:
            if task is not None:
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        for held in self._held.values():
            if held.timer:
                held.timer.cancel()
        await self.puller.close()

    def set_fatal(self, reason: str) -> None:
        """Enter the fatal state: /health turns 503, every request fails, held KV is dropped."""
        if self.fatal is not None:
            return
        self.fatal = reason
        log.error("engine entered the fatal state", extra={"fields": {"event": "fatal", "reason": reason}})
        error = EngineError(f"engine is in a fatal state: {reason}", 503, "ServiceUnavailableError")
        for seq in list(self._queue) + list(self._active):
            self._fail(seq, error)
        for held in list(self._held.values()):
            self._drop_held(held)
        if self.on_fatal:
            self.on_fatal(reason)

    # ------------------------------------------------------------------ requests
    def _new_id(self) -> int:
        rid = self._next_id
        self._next_id += 1
        return rid

    def submit(
        self,
        *,
        kind: str,
        prompt: Prompt,
        max_tokens: int | None,
        x_request_id: str = "",
        stream: bool = False,
        handle: OpaqueState | None = None,
        first_tokens: list[int] | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> Seq:
        """Validate and queue a request; raises EngineError when it must be refused.

        A streamed request is followed either by waiting on `seq.changed` (`stream=True`) or through
        `on_change`, called by the engine loop itself after each change (new tokens, the end, a failure).
        `max_tokens` None: what max_seq_len leaves after the prompt, as the worker's _deduce_max_tokens."""
        self.counters["requestsReceived"] += 1
        try:
            return self._submit(kind, prompt, max_tokens, x_request_id, stream, handle, first_tokens, on_change)
        except EngineError:
            self.counters["requestsRejected"] += 1
            raise

    def _submit(self, kind, prompt, max_tokens, x_request_id, stream, handle, first_tokens, on_change) -> Seq:
        cfg = self.cfg
        if self.fatal is not None:
            raise EngineError(ENGINE_GONE, 400, "BadRequestError")  # see ENGINE_GONE
        if kind not in REQUEST_TYPES:
            raise EngineError(f"unknown disaggregated_params.request_type {kind!r}")
        if kind == CTX_ONLY and cfg.overlap_enabled:
            raise EngineError(OVERLAP_CTX_ONLY_MESSAGE)
        n = prompt.length
        if n == 0:
            raise EngineError("the prompt must contain at least one token")
        if max_tokens is not None and max_tokens < 1:
            raise EngineError(f"max_tokens must be at least 1, got {max_tokens}")
        if kind == CTX_ONLY:
            max_tokens = 1  # the PyTorch backend forces max_tokens=1 on context-only requests
        cp = self.state.cp
        # LLM._check_arguments (PyTorch backend): the prompt must fit one iteration unless chunked prefill is on
        # (then the loop prefills it in chunks); generation-only requests skip the check (their prompt was
        # prefilled elsewhere).
        if kind != GEN_ONLY and n / cp > cfg.max_num_tokens and not self._chunked_prefill:
            raise EngineError(
                f"The sum of prompt length ({n / cp}), query length (0) should not exceed "
                f"max_num_tokens ({cfg.max_num_tokens})"
            )
        if cfg.max_input_len is not None and n > cfg.max_input_len:
            raise EngineError(f"prompt length ({n}) exceeds max_input_len ({cfg.max_input_len})")
        # The worker's _deduce_max_tokens, on every request type: what is left of max_seq_len after the prompt
        # bounds max_tokens (lowered, with a warning); a prompt that leaves nothing is refused.
        split_prompt_len = int(n / cp)
        default_max_tokens = cfg.max_seq_len - split_prompt_len
        if default_max_tokens <= 0:
            raise EngineError(
                f"`default_max_tokens` ({default_max_tokens}) must be greater than 0, `default_max_tokens` "
                f"({default_max_tokens}) = max_seq_len ({cfg.max_seq_len}) - `splited_prompt_len` ({split_prompt_len})"
            )
        if max_tokens is None:  # none asked for: the whole rest of the sequence, quietly
            max_tokens = default_max_tokens
        elif max_tokens > default_max_tokens:
            log.warning(
                f"User-specified `max_tokens` ({max_tokens}) is greater than deduced `default_max_tokens` "
                f"({default_max_tokens}), using default_max_tokens instead.",
                extra={"fields": {"event": "max_tokens_lowered", "request_id": x_request_id,
                                  "max_tokens": max_tokens, "default_max_tokens": default_max_tokens}},
            )
            max_tokens = default_max_tokens
        need = blocks_for(n + max_tokens, cfg.tokens_per_block)
        if need > cfg.max_blocks:
            raise EngineError(
                f"request can never fit in the KV cache: {n} prompt + {max_tokens} max_tokens tokens need {need} "
                f"blocks of {cfg.tokens_per_block} tokens, the cache has {cfg.max_blocks} ({cfg.kv_capacity_source})"
            )
        seq = Seq(self._new_id(), kind, prompt, max_tokens, x_request_id)
        seq.need_blocks = need
        if kind == GEN_ONLY:
            if handle is None or not first_tokens:
                raise EngineError("generation_only requests need first_gen_tokens, ctx_request_id and encoded_opaque_state")
            mismatches = kvformat.compare(handle.cache_state, self.state)
            if mismatches or self.state.transfer_backend == "MPI":
                message = kvformat.trtllm_error(mismatches) if mismatches else (
                    f"KV cache transfer over MPI needs the context and generation executors in one MPI world, "
                    f"launched together; the context server at {handle.host}:{handle.port} was started on its "
                    f"own: set cache_transceiver_config.backend to UCX or NIXL")
                self.counters["kvFormatRejections"] += 1
                log.warning(
                    "handoff refused: KV format mismatch",
                    extra={"fields": {"event": "kv_format_rejected", "request_id": x_request_id,
                                      "ctx_request_id": handle.ctx_request_id,
                                      "ctx": f"{handle.host}:{handle.port}", "error": message}},
                )
                seq.handle = handle
                # TensorRT-LLM fails the handoff in the cache transceiver, after the request was accepted: a
                # generation failure (400 when not streamed, a broken-off stream when streamed)
                seq.error = EngineError(message, in_generation=True)
                self._record_perf(seq, "rejected")
                self._refuse_handoff(handle, message, x_request_id)
                raise seq.error
            seq.handle = handle
            seq.first_tokens = list(first_tokens)
        if on_change is not None:
            seq.notify = on_change
        elif stream:
            seq.changed = asyncio.Event()
            seq.notify = seq.changed.set
        self._queue.append(seq)
        self._wake.set()
        return seq

    def _refuse_handoff(self, handle: OpaqueState, message: str, x_request_id: str) -> None:
        """Tell the context worker that this worker refused its handle (TensorRT-LLM fails the handoff in the
        handshake between the two workers, which fails the context request there too): it frees the KV at
        once instead of holding it until kv_transfer_timeout_ms, or forever without one. In the background:
        the refused request's answer does not wait for it."""
        self.puller.tell_refused(handle, self.state, message, x_request_id=x_request_id, what="a refused handoff",
                                 event="kv_refusal_unsent")

    def cancel(self, seq: Seq) -> None:
        """The client went away: drop the request and free what it holds (held KV of a finished ctx stays)."""
        if seq.phase == FINISHED:
            return
        self.counters["requestsCancelled"] += 1
        self._fail(seq, EngineError("request cancelled by the client", 499, "RequestCancelled"), count=False)
        started = seq.kv_start is not None  # its pull task has run (`_transfer` sets kv_start first)
        if seq.pulling is not None:
            # Its KV pull too: the puller tells the context worker, which frees the KV (and its link), whatever
            # the pull was doing (a cancel frame once the pull frame is out, a refusal before).
            seq.pulling.cancel()
        if seq.kind == GEN_ONLY and seq.handle is not None and not started:
            # Still queued, or admitted with its pull task not yet run (a task cancelled before its first step
            # never runs, so the puller cannot tell): its KV was never asked for, and the context worker would
            # hold it until its kv_transfer_timeout_ms (or forever without one). Told, it frees it now.
            self.puller.tell_refused(seq.handle, self.state, "its request went away before its KV was pulled",
                                     x_request_id=seq.x_request_id, what="a cancelled request's KV",
                                     event="kv_cancel_unsent")

    # ------------------------------------------------------------------ the ctx side of a handoff
    def begin_pull(
        self, ctx_request_id: int, instance: str, peer_state: kvformat.CacheState, x_request_id: str = "",
        *, refused: str | None = None,
    ) -> _Held:
        """A generation worker asks for the KV of a finished context-only request (TensorRT-LLM: inquireSupport
        on the ctx side, then the block transfer). Raises EngineError when it cannot have it; otherwise the
        blocks stay allocated, marked as being sent, until `end_pull` (after `pull_seconds`).

        A handshake that fails (the CacheStates differ, or the generation worker already refused the handle:
        `refused` holds its reason) fails the context request: its KV is freed at once."""
        if self.fatal is not None:
            raise EngineError(f"engine is in a fatal state: {self.fatal}", 503, "ServiceUnavailableError")
        if instance != self.instance:
            self.counters["kvPullsFailed"] += 1
            raise EngineError(
                f"KV cache for ctx_request_id {ctx_request_id} is not available: the handle names context worker "
                f"instance {instance}, this worker is {self.instance} (it restarted since the prefill)",
                404, "NotFoundError",
            )
        mismatches = kvformat.compare(self.state, peer_state)
        if mismatches or refused is not None:
            if mismatches:
                self.counters["kvFormatRejections"] += 1
                message = kvformat.trtllm_error(mismatches)
                log.warning("KV pull refused: format mismatch", extra={"fields": {
                    "event": "kv_format_rejected", "request_id": x_request_id, "ctx_request_id": ctx_request_id,
                    "error": message}})
            else:
                self.counters["kvPullsFailed"] += 1
                message = f"the generation worker refused the handoff: {refused}"
            held = self._held.get(ctx_request_id)
            if held is not None:
                self._drop_held(held)
                why = "the KV cache formats differ" if mismatches else f"the generation worker refused it: {refused}"
                self._forget(ctx_request_id, f"its handoff failed in the handshake with a generation worker ({why}) "
                                             "and it was freed")
                log.info("held KV freed: handoff refused", extra={"fields": {
                    "event": "kv_refused_freed", "request_id": x_request_id, "ctx_request_id": ctx_request_id,
                    "blocks": held.blocks}})
            raise EngineError(message, 409, "CacheStateMismatch")
        held = self._held.pop(ctx_request_id, None)
        if held is None:
            self.counters["kvPullsFailed"] += 1
            reason = self._gone.get(ctx_request_id)
            if reason is None:
                if ctx_request_id in self._sending:
                    reason = "it is being transferred to another generation request"
                else:
                    reason = "unknown ctx_request_id, or it was already transferred"
            raise EngineError(
                f"KV cache for ctx_request_id {ctx_request_id} is not available on this context worker: {reason}",
                404, "NotFoundError",
            )
        if held.timer:
            held.timer.cancel()
        self._sending[ctx_request_id] = held
        return held

    def send_budget(self, held: _Held) -> float | None:
        """Seconds left for sending `held` before kv_transfer_timeout_ms, counted from the end of its prefill
        as TensorRT-LLM does on the context side (None: no timeout)."""
        timeout = self.cfg.kv_transfer_timeout_s
        if timeout is None:
            return None
        return held.created + timeout - time.monotonic()

    def send_timed_out(self, held: _Held, x_request_id: str = "", *, waited_s: float = 0.0) -> str:
        """The transfer begun by `begin_pull` did not end within kv_transfer_timeout_ms: the context request
        is cancelled and its blocks freed. Returns the error the generation worker gets. `waited_s`: how long
        it waited for the worker's link behind other transfers."""
        self._end_send(held)
        self.counters["kvExpired"] += 1
        timeout_ms = (self.cfg.kv_transfer_timeout_s or 0) * 1000
        self._forget(held.rid, f"its transfer did not finish within kv_transfer_timeout_ms={timeout_ms:g} and "
                               "it was freed")
        log.warning(f"Terminating context request {held.rid} due to KV cache transfer timeout", extra={"fields": {
            "event": "kv_send_timed_out", "request_id": x_request_id, "ctx_request_id": held.rid,
            "blocks": held.blocks, "timeout_ms": timeout_ms, "link_wait_ms": round(waited_s * 1000, 3)}})
        queued = (f" (it waited {waited_s * 1000:.0f} ms for the context worker's link behind other transfers)"
                  if waited_s >= 0.0005 else "")
        return (f"KV cache transfer timed out: ctx_request_id {held.rid} was not sent within "
                f"kv_transfer_timeout_ms={timeout_ms:g} of the context worker{queued}; the context request was "
                "cancelled and its KV cache freed")

    def send_failed(self, held: _Held, message: str, x_request_id: str = "") -> None:
        """The transfer begun by `begin_pull` cannot be sent (`transfer_buffer_check` refused it): the context
        request fails and its blocks are freed, as TensorRT-LLM ends a request whose transfer failed."""
        self._end_send(held)
        self.counters["kvPullsFailed"] += 1
        self._forget(held.rid, f"its transfer failed and it was freed: {message}")

    def buffer_fits(self, num_tokens: int, buffer_tokens: int) -> bool:
        """Whether the KV of `num_tokens` tokens (whole blocks) fits a transfer buffer of `buffer_tokens`."""
        tpb = self.cfg.tokens_per_block
        return blocks_for(num_tokens, tpb) * tpb <= buffer_tokens

    def transfer_buffer_check(self, held: _Held, recv_buffer_tokens: int | None, x_request_id: str = "") -> float:
        """The ctx side of a transfer that passed the handshake: does the KV fit this worker's send buffer and
        the gen worker's receive buffer (`recv_buffer_tokens`, None: not said)? Returns the extra seconds the
        transfer takes (0 when both fit). KV that does not fit goes through a buffer allocated for the
        transfer, as in TensorRT-LLM's CacheTransBufferManager: with UCX slower (`--sim-dynamic-buffer-ms` per
        side), with a warning; NIXL cannot do that, and the transfer fails (EngineError)."""
        cfg = self.cfg
        short = [side for side, room in (("context", cfg.transfer_buffer_tokens), ("generation", recv_buffer_tokens))
                 if room is not None and not self.buffer_fits(held.num_tokens, room)]
        if not short:
            return 0.0
        if "context" in short:
            self.counters["kvTransfersDynamicBuffer"] += 1
        if self.state.transfer_backend == "NIXL":
            message = buffer_too_small_for_nixl(held.rid, held.num_tokens, short)
            log.error("KV transfer failed: transfer buffer too small for NIXL", extra={"fields": {
                "event": "kv_transfer_buffer_too_small", "error": message,
                **self._buffer_fields(held.rid, held.num_tokens, short, x_request_id, recv_buffer_tokens)}})
            raise EngineError(message, 500, BUFFER_TOO_SMALL)
        if "context" in short:
            self._warn_dynamic_buffer(held.rid, held.num_tokens, short, x_request_id, recv_buffer_tokens)
        return cfg.timing.dynamic_buffer_seconds() * len(short)

    def _buffer_fields(self, ctx_request_id: int, num_tokens: int, sides: list[str], x_request_id: str,
                       recv_buffer_tokens: int | None) -> dict:
        """The log fields of a transfer whose KV does not fit a pre-allocated buffer on `sides`."""
        return {"request_id": x_request_id, "ctx_request_id": ctx_request_id, "tokens": num_tokens, "sides": sides,
                "send_buffer_tokens": self.cfg.transfer_buffer_tokens, "recv_buffer_tokens": recv_buffer_tokens,
                "backend": self.state.transfer_backend}

    def _warn_dynamic_buffer(self, ctx_request_id: int, num_tokens: int, sides: list[str], x_request_id: str,
                             recv_buffer_tokens: int | None) -> None:
        log.warning(dynamic_buffer_warning(ctx_request_id, num_tokens, self.cfg.transfer_buffer_source),
                    extra={"fields": {"event": "kv_transfer_dynamic_buffer", **self._buffer_fields(
                        ctx_request_id, num_tokens, sides, x_request_id, recv_buffer_tokens)}})

    def received_through_dynamic_buffer(self, s: Seq, error: str | None) -> None:
        """The gen side, once its pull is answered: count (and, when the transfer went through, warn) when the
        KV did not fit this worker's own receive buffer. The ctx side already modelled what that costs."""
        if s.handle is None or self.buffer_fits(s.prompt.length, self.cfg.transfer_buffer_tokens):
            return
        self.counters["kvTransfersDynamicBuffer"] += 1
        if error is None:
            self._warn_dynamic_buffer(s.handle.ctx_request_id, s.prompt.length, ["generation"], s.x_request_id,
                                      self.cfg.transfer_buffer_tokens)

    def pull_seconds(self, held: _Held, link_bytes_per_s: float | None,
                     peer: kvformat.CacheState | None = None) -> float:
        """How long sending `held` takes once it has the worker's link (`KVTransferServer.link`: a worker's
        transfers go out one after another): its bytes over the slower of the two workers' per-GPU links, the
        ranks of each side that hold parts of its KV sending in parallel, one NIC per GPU (so as many streams
        as the side with fewer such ranks has: `kv_transfer_streams`)."""
        streams = kvformat.kv_transfer_streams(self.state)
        if peer is not None:
            streams = min(streams, kvformat.kv_transfer_streams(peer))
        return self.cfg.timing.transfer_seconds(held.kv_bytes, link_bytes_per_s, streams)

    def end_pull(self, held: _Held, started: float, *, sent: bool = True, x_request_id: str = "") -> dict:
        """The transfer begun by `begin_pull` is over: the blocks are freed. `sent` is False when it broke off
        (the generation worker went away, or this worker stops): the KV is lost, and not counted as served.
        A transfer that had already ended (timed out, failed, broken off) is left as it is: returns {}."""
        if not self._end_send(held):
            return {}
        if not sent:
            self.counters["kvPullsFailed"] += 1
            return {}
        self.counters["kvPullsServed"] += 1
        self.counters["kvBytesSent"] += held.kv_bytes
        log.debug("KV sent", extra={"fields": {"event": "kv_sent", "request_id": x_request_id,
                                               "ctx_request_id": held.rid, "bytes": held.kv_bytes}})
        return {
            "ctx_request_id": held.rid,
            "kv_cache_size": held.kv_bytes,
            "num_tokens": held.num_tokens,
            "transfer_start": started,
            "transfer_end": time.monotonic(),
        }

    def _end_send(self, held: _Held) -> bool:
        """End the send of `held` begun by `begin_pull`, freeing its blocks; False (and nothing done) when it had
        already ended: each send ends once, however many of its endings race."""
        if self._sending.get(held.rid) is not held:
            return False
        del self._sending[held.rid]
        self._release_held(held)
        return True

    def _release_held(self, held: _Held) -> None:
        self._reserved -= held.blocks
        self._held_blocks -= held.blocks
        self._wake.set()

    def _drop_held(self, held: _Held) -> None:
        if self._held.pop(held.rid, None) is not None:
            if held.timer:
                held.timer.cancel()
            self._release_held(held)

    def _forget(self, rid: int, reason: str) -> None:
        """Remember why the KV of `rid` is gone, for a later pull of it (the last 10,000)."""
        self._gone[rid] = reason
        while len(self._gone) > 10_000:
            self._gone.popitem(last=False)

    def _expire(self, rid: int) -> None:
        held = self._held.pop(rid, None)
        if held is None:
            return
        self._release_held(held)
        self.counters["kvExpired"] += 1
        self._forget(rid, f"it expired after kv_transfer_timeout_ms={(self.cfg.kv_transfer_timeout_s or 0) * 1000:g} "
                          "and was freed")
        log.info("held KV expired", extra={"fields": {"event": "kv_expired", "ctx_request_id": rid,
                                                      "blocks": held.blocks}})

    # ------------------------------------------------------------------ the loop
    async def _run(self) -> None:
        try:
            await self._loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not leave every request hanging: turn it into the fatal state
            log.exception("engine loop crashed", extra={"fields": {"event": "engine_crashed"}})
            self.set_fatal(f"engine loop crashed: {type(exc).__name__}: {exc}")

    async def _loop(self) -> None:
        cfg = self.cfg
        model = cfg.timing
        loop = asyncio.get_running_loop()
        while True:
            self._admit()
            decoders: list[Seq] = []
            waiting_prefill: list[Seq] = []
            runnable = [s for s in self._active if s.phase == DECODE or s.phase == PREFILL]
            if len(runnable) > cfg.max_batch_size:
                # More active than one iteration runs (pipeline parallelism: the other micro-batches are in
                # flight). Those that ran longest ago go first (stable: FIFO among equals), so every sequence
                # takes its turn as the micro-batches of the pipeline do.
                runnable.sort(key=_ran_iter)
                del runnable[cfg.max_batch_size:]
            for s in runnable:
                if s.phase == DECODE:
                    # one token each; TensorRT-LLM's MicroBatchScheduler stops at the first one that would
                    # take the iteration past max_num_tokens
                    if len(decoders) < cfg.max_num_tokens:
                        decoders.append(s)
                else:
                    waiting_prefill.append(s)
            budget = cfg.max_num_tokens - len(decoders)
            prefills: list[tuple[Seq, int]] = []  # (sequence, prompt position its prefill reaches this iteration)
            ctx_tokens = 0  # context tokens of this iteration: whole prompts and chunks
            spans: list[tuple[int, int]] = []  # (start, end) prompt positions of each prefill in this pass
            tpb = cfg.tokens_per_block
            cp = self.state.cp
            for s in waiting_prefill:
                start = s.prefilled
                left = s.prompt.length - start
                room = budget - ctx_tokens
                # each context-parallel rank prefills its share of a prompt in this iteration's token budget
                # (admission allows a prompt of up to cp x max_num_tokens without chunking)
                cost = -(-left // cp)
                if cost <= room:
                    take = left
                elif self._chunked_prefill:
                    # a chunk that is not the prompt's last is a whole number of chunk units (tokens_per_block);
                    # an iteration with nothing else to do takes what it can, so that a budget below one unit
                    # still moves. First come, first served (TensorRT-LLM's FIRST_COME_FIRST_SERVED chunking):
                    # the prompts after a cut one get what is left of the budget, a prompt that fits it whole
                    # included, and a prompt that gets nothing waits for the next iteration.
                    take = room - room % tpb
                    if take <= 0 and not prefills and not decoders:
                        take = room
                    if take <= 0:
                        continue
                else:
                    break  # without chunking the first prompt that does not fit ends the pass (FIFO)
                prefills.append((s, start + take))
                ctx_tokens += cost if take == left else take
                spans.append((start, start + take))
            if not prefills and not decoders:
                self._wake.clear()
                await self._wake.wait()
                continue
            context = sum(s.prompt.length + len(s.tokens) for s in decoders) / len(decoders) if decoders else 0.0
            delay = model.iteration_seconds(spans, len(decoders), context)
            self._iter += 1
            it = self._iter
            started = loop.time()
            await asyncio.sleep(delay)
            now = time.monotonic()
            completed = 0
            vocab = cfg.vocab_size
            for s, end in prefills:
                s.ran_iter = it
                if s.phase == PREFILL:
                    if s.first_iter is None:
                        s.first_iter = it
                    s.prefilled = end
                    if end >= s.prompt.length:
                        completed += self._emit(s, token_at(s.prompt.seed, 0, vocab), now, it)
            for s in decoders:
                s.ran_iter = it
                if s.phase == DECODE:
                    completed += self._emit(s, token_at(s.prompt.seed, len(s.tokens), vocab), now, it)
            self._active = [s for s in self._active if s.phase in _LIVE]
            # requests that finished since the last record without running in an iteration (`_transfer`)
            completed += self._completed_between
            self._completed_between = 0
            self._record_iteration(it, (loop.time() - started) * 1000.0, len(prefills), len(decoders),
                                   ctx_tokens, completed)
            self._check_fail_after()

    def _check_fail_after(self) -> None:
        """--sim-fail-after: enter the fatal state once that many requests have finished."""
        fail_after = self.cfg.fail_after
        if fail_after is not None and self.counters["requestsCompleted"] >= fail_after:
            self.set_fatal(f"injected fault after {fail_after} finished requests (--sim-fail-after)")

    def _admit(self) -> None:
        cfg = self.cfg
        queue = self._queue
        limit = self.max_active
        if queue and len(self._active) >= limit:
            self._active = [s for s in self._active if s.phase in _LIVE]
        while queue:
            s = queue[0]
            if len(self._active) >= limit or self._reserved + s.need_blocks > cfg.max_blocks:
                break
            queue.popleft()
            self._reserved += s.need_blocks
            s.first_scheduled = time.monotonic()
            self._active.append(s)
            if s.kind == GEN_ONLY:
                s.phase = TRANSFER
                task = asyncio.get_running_loop().create_task(self._transfer(s))
                s.pulling = task
                self._transfers.add(task)
                task.add_done_callback(self._transfers.discard)
            else:
                s.phase = PREFILL

    async def _transfer(self, s: Seq) -> None:
        assert s.handle is not None
        s.kv_start = time.monotonic()
        try:
            result = await self.puller.pull(s.handle, self.state, link_bytes_per_s=self.cfg.link_bytes_per_s,
                                            recv_buffer_tokens=self.cfg.transfer_buffer_tokens,
                                            x_request_id=s.x_request_id, timeout_s=self.cfg.kv_transfer_timeout_s)
        except HandoffError as exc:
            if exc.kind == "buffer":
                self.received_through_dynamic_buffer(s, exc.message)
            if exc.kind == "format":
                self.counters["kvFormatRejections"] += 1
            if s.phase == TRANSFER:  # not a pull whose request had already ended (the engine went fatal)
                self.counters["kvTransferFailures"] += 1
            if exc.kind == "timeout" and s.phase == TRANSFER:
                log.warning(f"Terminating generation request {s.rid} due to KV cache transfer timeout",
                            extra={"fields": {"event": "kv_receive_timed_out", "request_id": s.x_request_id,
                                              "ctx_request_id": s.handle.ctx_request_id}})
            if s.phase == TRANSFER:
                log.warning("KV transfer failed", extra={"fields": {
                    "event": "kv_transfer_failed", "request_id": s.x_request_id,
                    "ctx_request_id": s.handle.ctx_request_id, "error": exc.message}})
                self._fail(s, EngineError(exc.message, in_generation=True))
            return
        s.kv_end = time.monotonic()
        self.received_through_dynamic_buffer(s, None)
        if s.phase != TRANSFER:
            return
        s.kv_size = int(result.get("kv_cache_size") or 0)
        self.counters["kvTransfersCompleted"] += 1
        self.counters["kvBytesReceived"] += s.kv_size
        it = self._iter
        s.first_iter = it
        for token in s.first_tokens[: s.max_tokens]:
            if self._emit(s, token, s.kv_end, it):
                # max_tokens no more than the context worker produced: it ends here, with no iteration of its
                # own; the next iteration record counts it, and --sim-fail-after counts it now
                self._completed_between += 1
                self._check_fail_after()
                break
        self._active = [x for x in self._active if x.phase in _LIVE]
        self._wake.set()

    def _emit(self, s: Seq, token: int, now: float, it: int) -> int:
        """Append one generated token; returns 1 when that finished the sequence."""
        s.tokens.append(token)
        if s.first_token_time is None:
            s.first_token_time = now
        s.last_token_time = now
        s.last_iter = it
        finished = len(s.tokens) >= s.max_tokens
        if finished:
            self._finish(s)
        else:
            s.phase = DECODE
            if s.notify is not None:
                s.notify()
        return 1 if finished else 0

    def _finish(self, s: Seq) -> None:
        s.phase = FINISHED
        if s.kind == CTX_ONLY:
            tpb = self.cfg.tokens_per_block
            kept = blocks_for(s.prompt.length, tpb)
            self._reserved -= s.need_blocks - kept
            # TensorRT-LLM sends, and counts in kv_cache_size, whole blocks (the last one partly filled)
            held = _Held(s.rid, kept, s.prompt.length, kept * tpb * self.kv_bytes_per_token)
            self._held[s.rid] = held
            self._held_blocks += kept
            if self.cfg.kv_transfer_timeout_s is not None:
                held.timer = asyncio.get_running_loop().call_later(self.cfg.kv_transfer_timeout_s, self._expire, s.rid)
        else:
            self._reserved -= s.need_blocks
        self.counters["requestsCompleted"] += 1
        self._record_perf(s, "ok")
        if s.notify is not None:
            s.notify()
        if not s.done.done():
            s.done.set_result(None)
        self._wake.set()

    def _fail(self, s: Seq, error: EngineError, *, count: bool = True) -> None:
        if s.phase == FINISHED:
            return
        if s.phase == QUEUED:
            try:
                self._queue.remove(s)
            except ValueError:
                pass
        else:
            self._reserved -= s.need_blocks
        s.phase = FINISHED
        s.error = error
        if count:
            self.counters["requestsFailed"] += 1
        self._record_perf(s, "error")
        if s.notify is not None:
            s.notify()
        if not s.done.done():
            s.done.set_exception(error)
            s.done.exception()  # mark retrieved: a cancelled client may never await it
        self._wake.set()

    # ------------------------------------------------------------------ statistics
    def used_blocks(self) -> int:
        return self._state_counts()[1]

    def _state_counts(self) -> tuple[int, int, int]:
        """(active sequences, used KV blocks, sequences pulling KV), in one pass over the batch."""
        tpb = self.cfg.tokens_per_block
        used = self._held_blocks
        active = transferring = 0
        for s in self._active:
            phase = s.phase
            if phase in _LIVE:
                active += 1
                used += -(-(s.prompt.length + len(s.tokens)) // tpb)
                if phase == TRANSFER:
                    transferring += 1
        return active, used, transferring

    def _kv_stats(self, used: int) -> dict:
        return {
            "maxNumBlocks": self.cfg.max_blocks,
            "freeNumBlocks": self.cfg.max_blocks - used,
            "usedNumBlocks": used,
            "tokensPerBlock": self.cfg.tokens_per_block,
            "allocTotalBlocks": used,
            "allocNewBlocks": 0,
            "reusedBlocks": 0,
            "missedBlocks": 0,
            "cacheHitRate": 0.0,
        }

    def _sim_fields(self, transferring: int) -> tuple:
        return (dict(self.counters), self._reserved, len(self._held), self._held_blocks, len(self._sending),
                transferring, self.fatal)

    @staticmethod
    def _sim_stats(fields: tuple) -> dict:
        counters, reserved, held, held_blocks, sending, transferring, fatal = fields
        return {
            **counters,
            "reservedNumBlocks": reserved,
            "numHeldKvRequests": held,
            "heldKvBlocks": held_blocks,
            "numSendingKvRequests": sending,
            "numTransferringRequests": transferring,
            "fatal": fatal,
        }

    def _iteration_fields(self, it: int, latency_ms: float, timestamp: float, active: int, queued: int,
                          completed: int, used: int) -> dict:
        """The fields of trtllm-serve's /metrics iteration records that do not depend on what ran."""
        return {
            "iter": it,
            "iterLatencyMS": latency_ms,
            "timestamp": timestamp,
            "numActiveRequests": active,
            "numQueuedRequests": queued,
            "numCompletedRequests": completed,
            "maxNumActiveRequests": self.max_active,
            "maxBatchSizeStatic": self.cfg.max_batch_size,
            "maxNumTokensStatic": self.cfg.max_num_tokens,
            "gpuMemUsage": 0,
            "cpuMemUsage": 0,
            "pinnedMemUsage": 0,
            "kvCacheStats": self._kv_stats(used),
        }

    def _record_iteration(self, it: int, latency_ms: float, n_ctx: int, n_gen: int, ctx_tokens: int,
                          completed: int) -> None:
        # Kept as a tuple of the numbers; the record is built only when /metrics is read (most never are: the
        # deque keeps the last iter_stats_max_iterations), which took a few percent of the engine's CPU.
        active, used, transferring = self._state_counts()
        self._iter_stats.append((it, latency_ms, time.time(), active, len(self._queue), completed, used,
                                 n_ctx, n_gen, ctx_tokens, self._sim_fields(transferring)))

    def _iteration_record(self, raw: tuple) -> dict:
        it, latency_ms, timestamp, active, queued, completed, used, n_ctx, n_gen, ctx_tokens, sim = raw
        return {
            **self._iteration_fields(it, latency_ms, timestamp, active, queued, completed, used),
            "inflightBatchingStats": {
                "numScheduledRequests": n_ctx + n_gen,
                "numContextRequests": n_ctx,
                "numGenRequests": n_gen,
                "numPausedRequests": 0,
                "numCtxTokens": ctx_tokens,
                "microBatchId": 0,
                "avgNumDecodedTokensPerIter": 1.0 if n_gen else 0.0,
            },
            "sim": self._sim_stats(sim),
        }

    def snapshot(self) -> dict:
        """The current state in the shape of an iteration record (iteration fields describe the last one)."""
        active, used, transferring = self._state_counts()
        return {**self._iteration_fields(self._iter, 0.0, time.time(), active, len(self._queue), 0, used),
                "sim": {**self._sim_stats(self._sim_fields(transferring)), "snapshot": True}}

    def drain_iteration_stats(self) -> list[dict]:
        out = [self._iteration_record(raw) for raw in self._iter_stats]
        self._iter_stats.clear()
        return out

    def _record_perf(self, s: Seq, status: str) -> None:
        ctx_request_id = s.rid if s.kind == CTX_ONLY else (s.handle.ctx_request_id if s.handle else None)
        record = {
            "request_id": s.rid,
            "x_request_id": s.x_request_id,
            "request_type": s.kind,
            "ctx_request_id": ctx_request_id,
            "status": status,
            "prompt_tokens": s.prompt.length,
            "completion_tokens": len(s.tokens),
            "perf_metrics": {
                "first_iter": s.first_iter,
                "last_iter": s.last_iter,
                "timing_metrics": {
                    "arrival_time": s.arrival,
                    "first_scheduled_time": s.first_scheduled,
                    "first_token_time": s.first_token_time,
                    "last_token_time": s.last_token_time,
                    "kv_cache_size": s.kv_size,
                    "kv_cache_transfer_start": s.kv_start,
                    "kv_cache_transfer_end": s.kv_end,
                },
            },
        }
        if s.error is not None:
            record["error"] = s.error.message
        self._perf.append(record)

    def drain_perf(self) -> list[dict]:
        out = list(self._perf)
        self._perf.clear()
        return out
