"""The prefill -> decode handoff: the opaque state a context-only response carries, and the KV pull.

`encoded_opaque_state` stands in for TensorRT-LLM's serialized DataTransceiverState: base64 of a JSON object
  {"protocol": "baton-engine-sim/1",
   "comm_state": {"host": ..., "port": ..., "instance": ...},   # how to reach the ctx worker (CommState)
   "ctx_request_id": ...,
   "cache_state": kvformat.to_wire(ctx CacheState)}            # the KV format (CacheState)
`instance` is a random id per ctx process, so a handle from a restarted worker is refused instead of
pulling somebody else's KV.

The gen worker pulls the KV with `POST /_sim/kv/pull` on the ctx worker (see server.py), sending its own
CacheState; the ctx side re-checks compatibility (TensorRT-LLM's inquireSupport runs on the ctx side),
holds the blocks for the transfer time, frees them and answers with the KV size.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from dataclasses import dataclass

from baton import kvformat
from baton.http1.client import HttpClient

PROTOCOL = "baton-engine-sim/1"


class HandoffError(Exception):
    """A handoff failed; `kind` says why ("format" = KV-format mismatch, else "transfer")."""

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
        raise ValueError("disaggregated_params.encoded_opaque_state must be a non-empty base64 string")
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


def _header_value(text: str) -> str:
    """`text` as one header line's value the client can send (latin-1 on the wire; other text as its UTF-8)."""
    if "\r" in text or "\n" in text:
        text = text.replace("\r", " ").replace("\n", " ")
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogateescape").decode("latin-1")
    return text


@functools.lru_cache(maxsize=16)
def _state_json(state: kvformat.CacheState) -> bytes:
    """A worker's own CacheState as JSON, sent with every KV pull: serialized once."""
    return _compact(kvformat.to_wire(state)).encode()


class KVPuller:
    """The gen side of the KV transfer: one pooled HTTP client per gen worker."""

    def __init__(self, *, timeout_s: float = 60.0) -> None:
        self._timeout = timeout_s  # the whole pull: connect, the ctx side's transfer time, the answer
        self._client: HttpClient | None = None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def pull(
        self,
        handle: OpaqueState,
        own_state: kvformat.CacheState,
        *,
        link_bytes_per_s: float,
        x_request_id: str = "",
    ) -> dict:
        """Pull the KV named by `handle`; returns the ctx answer ({"kv_cache_size", "num_tokens", ...})."""
        if self._client is None:
            self._client = HttpClient(connect_timeout=self._timeout, read_timeout=self._timeout)
        body = b'{"ctx_request_id":%d,"instance":%s,"cache_state":%s,"link_bytes_per_s":%s}' % (
            handle.ctx_request_id, _compact(handle.instance).encode(), _state_json(own_state),
            _compact(link_bytes_per_s).encode())
        headers = {"Content-Type": "application/json"}
        if x_request_id:
            headers["X-Request-Id"] = _header_value(x_request_id)
        host = handle.host
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        where = f"{handle.host}:{handle.port}"
        try:
            status, _, raw = await self._client.request(
                "POST", host, handle.port, "/_sim/kv/pull", body, headers, timeout=self._timeout)
        except OSError as exc:  # ConnectionError (refused, reset, closed early) or TimeoutError
            raise HandoffError(
                f"KV transfer from context worker {where} failed: {type(exc).__name__}: {exc}"
            ) from exc
        data: object
        stripped = raw.strip()
        if not stripped:
            data = None
        else:
            try:
                data = json.loads(stripped)
            except ValueError:
                data = {}
        if status == 200 and isinstance(data, dict):
            return data
        message = data.get("message") if isinstance(data, dict) else None
        kind = "format" if isinstance(data, dict) and data.get("type") == "CacheStateMismatch" else "transfer"
        raise HandoffError(message or f"KV transfer from context worker {where} failed with HTTP {status}", kind)
