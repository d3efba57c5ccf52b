"""Requests to pod IPs and loopback processes never go through a proxy from the environment: the
operator's handoff probe and drain checks, the demo's requests to the scheduler pod, replay's model lookup.
Each is run against a real server on 127.0.0.1 with HTTP(S)_PROXY set to a recording proxy and no NO_PROXY."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator

import pytest
from proxy_harness import environment_proxy

from baton import demo, replay
from baton.operator import rollout


class Engine(http.server.BaseHTTPRequestHandler):
    """trtllm-serve's answers as the callers read them."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str]] = []

    def _send(self, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server's name
        self.seen.append(("GET", self.path))
        if self.path == "/metrics":
            self._send(json.dumps([{"numActiveRequests": 2, "numQueuedRequests": 1}]).encode())
        elif self.path == "/v1/models":
            self._send(json.dumps({"object": "list", "data": [{"id": "served-model"}]}).encode())
        else:
            self.send_error(404)

    def do_POST(self):  # noqa: N802
        self.seen.append(("POST", self.path))
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body.get("stream"):
            events = b"".join(b"data: " + json.dumps({"choices": [{"text": t}]}).encode() + b"\n\n"
                              for t in ("a", "b", "c")) + b"data: [DONE]\n\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("X-Baton-Route", "local")
            self.send_header("Content-Length", str(len(events)))
            self.end_headers()
            self.wfile.write(events)
            return
        params = dict(body.get("disaggregated_params") or {})
        if params.get("request_type") == "context_only":
            params.update(ctx_request_id=1, encoded_opaque_state="x", first_gen_tokens=[5])
            answer = {"choices": [{"text": "", "disaggregated_params": params}], "prompt_token_ids": body["prompt"]}
        else:
            answer = {"choices": [{"text": " ok"}]}
        self._send(json.dumps(answer).encode())

    def log_message(self, *args):
        pass


class Scheduler(Engine):
    """A scheduler's Prometheus /metrics."""

    def do_GET(self):  # noqa: N802
        self.seen.append(("GET", self.path))
        self._send(b'baton_scheduler_generation_requests_total{generation="g1",outcome="completed"} 7.0\n',
                   "text/plain")


def _serve(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def engine() -> Iterator[str]:
    Engine.seen = []
    yield from _serve(Engine)


@pytest.fixture
def scheduler() -> Iterator[str]:
    yield from _serve(Scheduler)


def test_the_operators_handoff_probe_and_drain_checks_go_straight_to_the_pods(engine, scheduler, monkeypatch):
    with environment_proxy(monkeypatch) as hits:
        assert rollout.probe_handoffs([engine], [engine], "m", timeout=5) == (
            True, "1 handoff(s) succeeded across 1 prefill and 1 decode replica(s)")
        assert rollout.active_requests(engine) == 3
        assert rollout.generation_outcomes(rollout.read_schedulers([scheduler]), "g1") == {"completed": 7.0}
    assert hits == []
    assert [m for m, _ in Engine.seen].count("POST") == 2


def test_the_demos_requests_to_the_scheduler_pod_go_straight_to_it(engine, monkeypatch):
    with environment_proxy(monkeypatch) as hits:
        result = demo._stream(f"http://{engine}", {"model": "m", "prompt": "hi", "max_tokens": 3}, timeout=5)
    assert hits == []
    assert result["tokens"] == 3 and result["headers"]["X-Baton-Route"] == "local"


def test_replay_reads_the_served_model_straight_from_the_scheduler(engine, monkeypatch):
    with environment_proxy(monkeypatch) as hits:
        assert replay.discover_model(f"http://{engine}", timeout=5) == "served-model"
    assert hits == []


class _Streams(http.server.BaseHTTPRequestHandler):
    """Streams as the scheduler may send them: a first chunk whose token ids say it carries none, tokens, a
    usage chunk; or an error event after a token."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        chunks = [{"choices": [{"text": "", "token_ids": []}]}, {"choices": [{"text": " a", "token_ids": [5]}]}]
        if body["prompt"] == "fail":
            chunks.append({"error": {"message": "decode replica ... reported an error", "code": "stream_interrupted"}})
        else:
            chunks += [{"choices": [{"text": " b c", "token_ids": [6, 7]}]}, {"choices": [], "usage": {"completion_tokens": 3}}]
        events = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(events)))
        self.end_headers()
        self.wfile.write(events)

    def log_message(self, *args):
        pass


def test_the_demo_counts_tokens_not_events_and_reports_an_error_event():
    """Neither an empty chunk nor the usage chunk is a token (nor starts TTFT), a chunk may carry several, and
    an error event mid-stream is reported as the row's error, not counted as a token."""
    for address in _serve(_Streams):
        ok = demo._stream(f"http://{address}", {"model": "m", "prompt": "hi", "max_tokens": 3}, timeout=5)
        failed = demo._stream(f"http://{address}", {"model": "m", "prompt": "fail", "max_tokens": 3}, timeout=5)
    assert (ok["tokens"], ok["error"]) == (3, "")
    assert failed["error"] == "stream_interrupted" and failed["tokens"] == 1
