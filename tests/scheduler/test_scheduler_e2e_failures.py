"""Failures end to end: a decode replica dying mid-request, and an incompatible prefill/decode pair."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from scheduler_harness import (
    MODEL,
    http,
    metric,
    metrics,
    parse_sse,
    post,
    prompt_ids,
    start_engine,
    stream_text,
    wait_all,
    wait_for,
)


@pytest.fixture
def fresh_engines(tmp_path):
    """Engines this test may kill: one prefill, two decode replicas."""
    procs = [start_engine(tmp_path, "p", "prefill", 0.2), start_engine(tmp_path, "d1", "decode", 0.2),
             start_engine(tmp_path, "d2", "decode", 0.2)]
    try:
        wait_all(procs, "/health")
        yield procs
    finally:
        for p in procs:
            p.stop()


def _long_stream(sched, body: dict):
    """A streamed completion through `sched`, open while tokens flow (a context manager)."""
    req = urllib.request.Request(sched.url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=30)


def _state(url: str) -> dict:
    return json.loads(http("GET", url + "/debug/state")[2])


def test_decode_killed_mid_stream_ends_the_stream_with_an_explicit_error(fresh_engines, make_scheduler):
    prefill, d1, d2 = fresh_engines
    sched = make_scheduler([prefill], [d1, d2])
    body = {"model": MODEL, "prompt": prompt_ids(2000, 1), "max_tokens": 3000, "stream": True}
    with _long_stream(sched, body) as resp:
        assert resp.status == 200 and resp.headers["X-Baton-Route"] == "disaggregated"
        victim = {d1.address: d1, d2.address: d2}[resp.headers["X-Baton-Decode-Endpoint"]]
        assert resp.readline().startswith(b"data: ")  # tokens are flowing
        victim.kill()
        rest = resp.read().decode()
    assert "[DONE]" not in rest
    error = json.loads(rest.strip().splitlines()[-1][len("data: "):])["error"]
    assert error["code"] == "stream_interrupted" and victim.address in error["message"]
    values = metrics(sched.url)
    assert metric(values, "baton_scheduler_requests_total", route="disaggregated", outcome="failed") == 1
    # the dead replica is out of rotation; the next request is served by the survivor
    wait_for(lambda: not [d for d in _state(sched.url)["decode"] if d["address"] == victim.address][0]["healthy"],
             5, "the killed replica to be marked unhealthy")
    status, headers, _ = post(sched.url + "/v1/completions", {**body, "stream": False, "max_tokens": 4})
    assert status == 200 and headers["X-Baton-Decode-Endpoint"] != victim.address


def test_a_decode_engine_failing_mid_stream_ends_the_stream_as_an_error(fresh_engines, make_scheduler):
    """A generation that fails after tokens were streamed: trtllm-serve's stream generator re-raises and the
    connection closes without an error event or [DONE] (here the engine enters its fatal state). The client
    gets the scheduler's stream_interrupted event naming the replica and no [DONE], so an OpenAI client raises
    instead of taking a cut answer for a whole one; the request counts as failed, and the replica, whose
    health check now fails, leaves rotation."""
    prefill, d1, d2 = fresh_engines
    sched = make_scheduler([prefill], [d1, d2])
    body = {"model": MODEL, "prompt": prompt_ids(2000, 1), "max_tokens": 3000, "stream": True}
    with _long_stream(sched, body) as resp:
        victim = {d1.address: d1, d2.address: d2}[resp.headers["X-Baton-Decode-Endpoint"]]
        assert resp.readline().startswith(b"data: ")  # tokens are flowing
        http("POST", victim.url + "/_sim/fatal", {"reason": "xid 79: GPU has fallen off the bus"})
        rest = resp.read().decode()
    events = [line[len("data: "):] for line in rest.splitlines() if line.startswith("data: ")]
    assert "[DONE]" not in events and '"object": "error"' not in rest
    error = json.loads(events[-1])["error"]
    assert error["code"] == "stream_interrupted" and victim.address in error["message"]
    assert "closed the connection mid-stream with no error event" in error["message"]
    values = metrics(sched.url)
    assert metric(values, "baton_scheduler_requests_total", route="disaggregated", outcome="failed") == 1
    wait_for(lambda: not [d for d in _state(sched.url)["decode"] if d["address"] == victim.address][0]["healthy"],
             5, "the failed replica to be marked unhealthy")


def test_decode_killed_before_the_answer_is_retried_on_another_pair(fresh_engines, make_scheduler):
    prefill, d1, d2 = fresh_engines
    sched = make_scheduler([prefill], [d1, d2])
    import threading

    out: list = []
    body = {"model": MODEL, "prompt": prompt_ids(2000, 2), "max_tokens": 2500}
    thread = threading.Thread(target=lambda: out.append(post(sched.url + "/v1/completions", body, timeout=60)))
    thread.start()
    busy = wait_for(lambda: [d for d in _state(sched.url)["decode"] if d["active"] == 1], 10,
                    "the request to reach a decode replica")
    victim = {d1.address: d1, d2.address: d2}[busy[0]["address"]]
    victim.kill()
    thread.join(60)
    status, headers, answer = out[0]
    assert status == 200, answer
    assert headers["X-Baton-Decode-Endpoint"] != victim.address
    assert answer["usage"]["completion_tokens"] == 2500
    values = metrics(sched.url)
    assert metric(values, "baton_scheduler_retries_total", route="disaggregated") == 1
    assert metric(values, "baton_scheduler_requests_total", outcome="completed") == 1
    assert metric(values, "baton_scheduler_requests_total", outcome="failed") == 0


def test_a_decode_engine_whose_executor_is_gone_is_retried_elsewhere_not_passed_on_as_the_clients_400(
        fresh_engines, make_scheduler):
    """trtllm-serve whose executor died answers every request 400 "LLM is shutting down" (its /health may well
    still say 200 for a while): each request that meets it goes to the other replica, and the client never sees
    that 400 as its own mistake."""
    prefill, d1, d2 = fresh_engines
    sched = make_scheduler([prefill], [d1, d2], heartbeatSeconds=3600)  # no probe finds it first
    assert http("POST", d1.url + "/_sim/fatal", {"reason": "xid 79: GPU has fallen off the bus"})[0] == 200
    status, _, err = post(d1.url + "/v1/completions", {"model": MODEL, "prompt": prompt_ids(10), "max_tokens": 2})
    assert status == 400 and err["message"] == "LLM is shutting down", err  # what the scheduler meets
    answers = [post(sched.url + "/v1/completions", {"model": MODEL, "prompt": prompt_ids(n, n), "max_tokens": 2})
               for n in (20, 30, 40, 50, 600, 700)]  # local and disaggregated
    assert [a[0] for a in answers] == [200] * 6, [a[2] for a in answers if a[0] != 200]
    assert {a[1]["X-Baton-Decode-Endpoint"] for a in answers} == {d2.address}
    values = metrics(sched.url)
    assert metric(values, "baton_scheduler_retries_total") >= 1  # it met the gone one at least once
    assert metric(values, "baton_scheduler_requests_total", outcome="invalid") == 0


def test_incompatible_kv_formats_fail_with_the_engines_error(engines, make_scheduler):
    prefill, decode16 = engines["prefill"], engines["decode_fp16"]  # fp8 KV vs fp16 KV
    sched = make_scheduler([prefill], [decode16])
    body = {"model": MODEL, "prompt": prompt_ids(2000, 7), "max_tokens": 4}
    status, headers, answer = post(sched.url + "/v1/completions", body)
    assert status == 502
    assert headers["X-Baton-Error"] == "kv_format_mismatch" and headers["X-Baton-Route"] == "disaggregated"
    message = answer["error"]["message"]
    assert "Disagg server does not currently support these cacheState" in message
    assert prefill.address in message and decode16.address in message
    state = _state(sched.url)
    assert state["incompatiblePairs"] == [f"{prefill.address}->{decode16.address}"]
    # the pair is not used again: long prompts degrade to local prefill on the decode tier instead
    status, headers, answer = post(sched.url + "/v1/completions", body)
    assert status == 200 and headers["X-Baton-Route"] == "local"
    values = metrics(sched.url)
    assert metric(values, "baton_scheduler_routing_decisions_total", reason="no-prefill-pair") == 1
    assert metric(values, "baton_scheduler_retries_total") == 0


def _stream_events(sched, body: dict) -> tuple[int, dict, list]:
    status, headers, raw = http("POST", sched.url + "/v1/completions", {**body, "stream": True})
    return status, headers, parse_sse(raw) if status == 200 else json.loads(raw)


def _decode_state(sched, address: str) -> dict:
    return [d for d in _state(sched.url)["decode"] if d["address"] == address][0]


def test_a_streamed_handoff_the_decode_replica_cuts_is_retried_on_another_pair(engines, make_scheduler):
    """trtllm-serve answers a streamed generation_only request 200 at once, and when the handoff then fails (here
    a KV-format mismatch) closes the stream before its first event, saying why only in its log. Nothing
    reached the client: the request is prefilled again and served by another pair, and the decode replica that
    refused the handoff stays in rotation (its health check passes; only repeated failures take it out)."""
    prefill, good, mismatched = engines["prefill"], engines["decode1"], engines["decode_fp16"]
    sched = make_scheduler([prefill], [good, mismatched])
    for seed in (31, 32):  # idle replicas are picked in turn: one of the two requests goes to `mismatched` first
        status, headers, events = _stream_events(sched, {"model": MODEL, "prompt": prompt_ids(2000, seed),
                                                         "max_tokens": 6})
        assert status == 200, events
        assert headers["X-Baton-Decode-Endpoint"] == good.address and headers["X-Baton-Route"] == "disaggregated"
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
        assert stream_text(events[:-1])[1] and len(stream_text(events[:-1])[1]) == 6
    values = metrics(sched.url)
    assert metric(values, "baton_scheduler_retries_total", route="disaggregated", reason="stream_cut") >= 1
    assert metric(values, "baton_scheduler_requests_total", outcome="completed") == 2
    log = sched.log()
    assert "event=stream_cut_before_first_token request_id=" in log and f"decode={mismatched.address}" in log
    # its health was checked (it answered) before the retry or the answer: `SchedulerService._run`
    assert _decode_state(sched, mismatched.address)["healthy"]
    assert f"event=endpoint_unhealthy tier=decode endpoint={mismatched.address}" not in sched.log()
    # The cut said nothing of why; the scheduler's own unstreamed check of the pair got the engine's reason, and
    # the pair is kept out of placement: later streamed requests no longer cost a prefill and a retry there.
    wait_for(lambda: _state(sched.url)["incompatiblePairs"] == [f"{prefill.address}->{mismatched.address}"], 10,
             "the pair to be found incompatible")
    assert "event=kv_format_mismatch found_by=pair_check" in sched.log()
    retries = metric(metrics(sched.url), "baton_scheduler_retries_total", route="disaggregated")
    for seed in (33, 34, 35, 36):
        status, headers, events = _stream_events(sched, {"model": MODEL, "prompt": prompt_ids(2000, seed),
                                                         "max_tokens": 6})
        assert status == 200 and headers["X-Baton-Decode-Endpoint"] == good.address and events[-1] == "[DONE]"
    assert metric(metrics(sched.url), "baton_scheduler_retries_total", route="disaggregated") == retries


def test_an_incompatible_pair_streamed_fails_502_naming_both_replicas_and_where_the_reason_is(engines,
                                                                                              make_scheduler):
    """No retry allowed: the streamed request the decode replica cut before its first event fails with a 502
    that says what happened (200, then the stream ended with no error event), names both replicas, and says
    that trtllm-serve reports the reason (a KV-format mismatch, or KV already freed) only in its own log. The
    decode replica is not taken out of rotation for it."""
    prefill, decode16 = engines["prefill"], engines["decode_fp16"]
    sched = make_scheduler([prefill], [decode16], retries={"maxAttempts": 1})
    status, headers, answer = _stream_events(sched, {"model": MODEL, "prompt": prompt_ids(2000, 33),
                                                     "max_tokens": 4})
    assert status == 502, answer
    assert headers["X-Baton-Error"] == "engine_stream_cut" and headers["X-Baton-Route"] == "disaggregated"
    error = answer["error"]
    assert error["code"] == "engine_stream_cut" and error["type"] == "engine_error"
    message = error["message"]
    assert f"decode replica {decode16.address} ended its stream before the first token" in message
    assert f"prefill replica {prefill.address}" in message
    assert "trtllm-serve reports the reason only in its own log" in message
    assert "KV-format mismatch" in message and "already freed" in message
    assert headers["X-Request-Id"] in message
    # its health was checked (it answered) before the retry or the answer: `SchedulerService._run`
    assert _decode_state(sched, decode16.address)["healthy"]
    values = metrics(sched.url)
    assert metric(values, "baton_scheduler_requests_total", route="disaggregated", outcome="failed") == 1
    # its pair, checked unstreamed, is known incompatible now: the next long prompt is prefilled on the decode
    # replica itself (as with no prefill tier) and served, rather than failing the same way
    wait_for(lambda: _state(sched.url)["incompatiblePairs"] == [f"{prefill.address}->{decode16.address}"], 10,
             "the pair to be found incompatible")
    status, headers, events = _stream_events(sched, {"model": MODEL, "prompt": prompt_ids(2000, 34), "max_tokens": 4})
    assert status == 200 and headers["X-Baton-Route"] == "local" and events[-1] == "[DONE]", events


def test_client_leaving_mid_stream_frees_the_slot_and_is_counted(engines, make_scheduler):
    import socket

    decode = engines["decode2"]
    sched = make_scheduler([engines["prefill"]], [decode])
    body = json.dumps({"model": MODEL, "prompt": prompt_ids(30, 9), "max_tokens": 3000, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", sched.port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert b"200 OK" in sock.recv(4096)
    assert _state(sched.url)["decode"][0]["active"] == 1
    sock.close()
    wait_for(lambda: _state(sched.url)["decode"][0]["active"] == 0, 10, "the decode slot to be released")
    wait_for(lambda: metric(metrics(sched.url), "baton_scheduler_requests_total", outcome="cancelled") == 1, 10,
             "the request to be counted as cancelled")
    # the upstream request was dropped too: the engine is not left generating for nobody
    wait_for(lambda: json.loads(http("GET", decode.url + "/_sim/state")[2])["numActiveRequests"] == 0, 10,
             "the engine to drop the abandoned sequence")


def _send_and_leave_later(port: int, body: dict):
    import socket

    raw = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
    return sock


def test_a_client_leaving_before_its_answer_starts_takes_its_request_with_it(engines, make_scheduler):
    decode = engines["decode2"]
    sched = make_scheduler([engines["prefill"]], [decode], backpressure={"maxActivePerDecodeReplica": 1})
    long_running = {"model": MODEL, "prompt": prompt_ids(30, 11), "max_tokens": 3000, "stream": False}
    first = _send_and_leave_later(sched.port, long_running)  # holds the only decode slot, answer not started
    wait_for(lambda: _state(sched.url)["decode"][0]["active"] == 1, 10, "the first request to take the slot")
    second = _send_and_leave_later(sched.port, {**long_running, "prompt": prompt_ids(30, 12)})

    def waiting() -> int:
        queue = _state(sched.url)["queue"]
        return queue["prefill"] + queue["decode"] + queue["holds"]

    wait_for(lambda: waiting() == 1, 10, "the second request to wait for a slot (queued or held)")
    second.close()  # gives up while waiting: its place (or hold) is given back, it never reaches a decode engine
    wait_for(lambda: waiting() == 0, 10, "the place to be given back")
    first.close()  # gives up during the engine call: the slot and the engine's sequence are freed
    wait_for(lambda: _state(sched.url)["decode"][0]["active"] == 0, 10, "the decode slot to be released")
    wait_for(lambda: json.loads(http("GET", decode.url + "/_sim/state")[2])["numActiveRequests"] == 0, 10,
             "the engine to drop the abandoned sequence")
    wait_for(lambda: metric(metrics(sched.url), "baton_scheduler_requests_total", outcome="cancelled") == 2, 10,
             "both requests to be counted as cancelled")
    assert metric(metrics(sched.url), "baton_scheduler_requests_total", outcome="completed") == 0


def test_on_sigterm_waiting_requests_get_503_with_retry_after_once_the_drain_ends(engines, make_scheduler):
    import signal
    import threading

    decode = engines["decode2"]
    sched = make_scheduler([engines["prefill"]], [decode], extra_args=["--drain-seconds", "1"],
                           backpressure={"maxActivePerDecodeReplica": 1})
    running = _send_and_leave_later(sched.port, {"model": MODEL, "prompt": prompt_ids(30, 21), "max_tokens": 3000,
                                                 "stream": True})
    wait_for(lambda: _state(sched.url)["decode"][0]["active"] == 1, 10, "the first request to take the slot")
    answers: list = []
    waiter = threading.Thread(target=lambda: answers.append(post(
        sched.url + "/v1/completions", {"model": MODEL, "prompt": prompt_ids(30, 22), "max_tokens": 4}, timeout=30)))
    waiter.start()

    def waiting() -> int:
        queue = _state(sched.url)["queue"]
        return queue["prefill"] + queue["decode"] + queue["holds"]

    wait_for(lambda: waiting() == 1, 10, "the second request to wait for the slot")
    sched.proc.send_signal(signal.SIGTERM)
    waiter.join(15)
    assert answers, "the waiting request got no answer"
    status, headers, body = answers[0]
    assert status == 503 and headers["Retry-After"] == "1" and body["error"]["code"] == "shutting_down"
    assert sched.proc.wait(15) == 0  # then the process ends
    # the stream still running at the drain's end is cut, but never so that it passes for a whole answer:
    # an error event says why, then the chunked body ends properly
    received = b""
    while chunk := running.recv(65536):
        received += chunk
    running.close()
    assert received.startswith(b"HTTP/1.1 200")
    assert b'"code": "shutting_down"' in received and b"[DONE]" not in received
    assert received.endswith(b"\r\n0\r\n\r\n")
    log = sched.log()
    assert "event=shutdown_shed waiting=1" in log and "event=stream_cut_at_shutdown" in log
    assert "outcome=failed" in log and "outcome=cancelled" not in log


def test_on_sigterm_requests_still_in_an_engine_call_get_503_not_a_closed_connection(engines, make_scheduler):
    """Non-streamed requests whose generation (local, or after their prefill) still runs a second after the
    drain ends are answered 503 shutting_down with Retry-After, counted failed: not left with a connection
    closed on them and counted as clients that went away."""
    import signal
    import threading

    decode = engines["decode2"]
    sched = make_scheduler([engines["prefill"]], [decode], extra_args=["--drain-seconds", "1"])
    bodies = {"local": {"model": MODEL, "prompt": prompt_ids(30, 41), "max_tokens": 5000},
              "disaggregated": {"model": MODEL, "prompt": prompt_ids(2000, 42), "max_tokens": 5000}}
    answers: dict = {}
    threads = [threading.Thread(target=lambda route=route, body=body: answers.__setitem__(
        route, post(sched.url + "/v1/completions", body, timeout=30))) for route, body in bodies.items()]
    for thread in threads:
        thread.start()
    wait_for(lambda: json.loads(http("GET", decode.url + "/_sim/state")[2])["numActiveRequests"] == 2, 10,
             "both generations to run")
    sched.proc.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(15)
    assert set(answers) == set(bodies), "a request got no answer"
    for route, (status, headers, body) in answers.items():
        assert status == 503 and headers["Retry-After"] == "1", (route, status, body)
        assert body["error"]["code"] == "shutting_down" and headers["X-Baton-Route"] == route
    assert sched.proc.wait(15) == 0
    log = sched.log()
    assert log.count("event=cut_at_shutdown") == 2
    assert log.count("outcome=failed status=503") == 2 and "outcome=cancelled" not in log
    wait_for(lambda: json.loads(http("GET", decode.url + "/_sim/state")[2])["numActiveRequests"] == 0, 10,
             "the engine to drop the sequences cut")


def _outcome(sched, body: dict) -> tuple[str, str]:
    """One request through `sched`, read to its end: ("ok", "") for a whole answer (200, and every token asked
    for: completion_tokens, or the streamed ids, equal to max_tokens), else ("error", its code) for an explicit
    error (an HTTP error with an OpenAI error body, or a stream's error event). Anything else -- a connection
    cut, a stream ending without [DONE] or an error event, a short answer -- raises: a lost request."""
    req = urllib.request.Request(sched.url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        return "error", json.loads(exc.read())["error"]["code"]
    if not body.get("stream"):
        answer = json.loads(raw)
        assert answer["usage"]["completion_tokens"] == body["max_tokens"], answer["usage"]
        return "ok", ""
    events = parse_sse(raw)
    if events and events[-1] == "[DONE]":
        _, ids = stream_text(events[:-1])
        assert len(ids) == body["max_tokens"], (len(ids), body["max_tokens"])
        return "ok", ""
    error = events[-1]["error"]  # no [DONE]: the stream must end with an error event
    return "error", error["code"]


def test_a_decode_replica_killed_under_load_loses_no_request(fresh_engines, make_scheduler):
    """Twenty requests at once, local and disaggregated, streamed and not, more than the decode tier takes (two
    per replica): some generating, some queued, some prefilled and held. One decode replica is killed: every
    request still ends in a whole answer or an explicit error, each counted once, and nothing is left queued,
    held or active."""
    import threading

    prefill, d1, d2 = fresh_engines
    sched = make_scheduler([prefill], [d1, d2], backpressure={"maxActivePerDecodeReplica": 2},
                           routing={"localPrefillBelowTokens": 100, "alwaysPrefillAtOrAboveTokens": 1000})
    bodies = [{"model": MODEL, "prompt": prompt_ids(50 if i % 2 else 2000, 100 + i), "max_tokens": 800,
               "stream": i % 4 < 2} for i in range(20)]
    outcomes: list = [None] * len(bodies)

    def run(i: int) -> None:
        try:
            outcomes[i] = _outcome(sched, bodies[i])
        except Exception as exc:  # noqa: BLE001 - recorded: a lost request fails the test below
            outcomes[i] = ("lost", f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    state = wait_for(lambda: (s := _state(sched.url)) and s["queue"]["decode"] + s["queue"]["holds"] > 0
                     and all(d["active"] for d in s["decode"]) and s, 30, "requests generating and waiting")
    victim = {d1.address: d1, d2.address: d2}[state["decode"][0]["address"]]
    victim.kill()
    for t in threads:
        t.join(150)
    assert all(o is not None and o[0] != "lost" for o in outcomes), [o for o in outcomes if not o or o[0] == "lost"]
    ok = sum(1 for o in outcomes if o[0] == "ok")
    assert ok >= 10, outcomes  # the survivor served the rest
    values = metrics(sched.url)
    counted = {k: metric(values, "baton_scheduler_requests_total", outcome=k) for k in ("completed", "failed")}
    assert counted == {"completed": ok, "failed": len(bodies) - ok}, (counted, outcomes)
    # the kill met requests in flight on the victim: retried elsewhere, or ended with an explicit error
    assert metric(values, "baton_scheduler_retries_total") + counted["failed"] >= 1
    after = _state(sched.url)
    assert after["queue"] == {"prefill": 0, "decode": 0, "holds": 0}
    assert all(r["active"] == 0 for r in (*after["prefill"], *after["decode"]))
