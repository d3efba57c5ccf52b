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
import json
from dataclasses import dataclass

import aiohttp

from baton import kvformat

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


def encode_opaque(state: OpaqueState) -> str:
    payload = {
        "protocol": PROTOCOL,
        "comm_state": {"host": state.host, "port": state.port, "instance": state.instance},
        "ctx_request_id": state.ctx_request_id,
        "cache_state": kvformat.to_wire(state.cache_state),
    }
    return base64.b64encode(json.dumps(payload, separators=(",", ":")).encode("utf-8")).decode("ascii")


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


def _url(host: str, port: int, path: str) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}{path}"


class KVPuller:
    """The gen side of the KV transfer: one pooled HTTP client per gen worker."""

    def __init__(self, *, timeout_s: float = 60.0) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def pull(
        self,
        handle: OpaqueState,
        own_state: kvformat.CacheState,
        *,
        link_bytes_per_s: float,
        x_request_id: str = "",
    ) -> dict:
        """Pull the KV named by `handle`; returns the ctx answer ({"kv_cache_size", "num_tokens", ...})."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, connector=aiohttp.TCPConnector(limit=0, force_close=False)
            )
        body = {
            "ctx_request_id": handle.ctx_request_id,
            "instance": handle.instance,
            "cache_state": kvformat.to_wire(own_state),
            "link_bytes_per_s": link_bytes_per_s,
        }
        headers = {"X-Request-Id": x_request_id} if x_request_id else None
        where = f"{handle.host}:{handle.port}"
        try:
            async with self._session.post(
                _url(handle.host, handle.port, "/_sim/kv/pull"), json=body, headers=headers
            ) as resp:
                try:
                    data = await resp.json(content_type=None)
                except (aiohttp.ContentTypeError, ValueError):
                    data = {}
                if resp.status == 200 and isinstance(data, dict):
                    return data
                message = data.get("message") if isinstance(data, dict) else None
                kind = "format" if isinstance(data, dict) and data.get("type") == "CacheStateMismatch" else "transfer"
                raise HandoffError(
                    message or f"KV transfer from context worker {where} failed with HTTP {resp.status}", kind
                )
        except HandoffError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise HandoffError(
                f"KV transfer from context worker {where} failed: {type(exc).__name__}: {exc}"
            ) from exc
