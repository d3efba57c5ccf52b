"""Config reload: routing thresholds change without a restart; an invalid or empty file is refused; a change
made while the scheduler starts (the tokenizer may take long to fetch) is applied, not lost."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml
from scheduler_harness import (
    MODEL,
    http,
    metric,
    metrics,
    parse_sse,
    post,
    prompt_ids,
    scheduler_config,
    start_scheduler,
    wait_all,
    wait_for,
)
from tokenizer_fixture import write_tokenizer


def test_reload_changes_routing_thresholds_without_restart(engines, make_scheduler):
    sched = make_scheduler([engines["prefill"]], [engines["decode1"]])
    pid = sched.proc.pid
    body = {"model": MODEL, "prompt": prompt_ids(600), "max_tokens": 2}

    def route() -> str:
        status, headers, _ = post(sched.url + "/v1/completions", body)
        assert status == 200
        return headers["X-Baton-Route"]

    assert route() == "disaggregated"  # 600 >= 256 (in between: throughput-optimized disaggregates)
    cfg = yaml.safe_load(sched.config_path.read_text())
    broken = dict(cfg, routing={**cfg["routing"], "localPrefillBelowTokens": "many"})
    sched.config_path.write_text(yaml.safe_dump(broken))
    wait_for(lambda: metric(metrics(sched.url), "baton_scheduler_config_reloads_total", result="rejected") == 1,
             10, "the invalid config to be rejected")
    assert route() == "disaggregated"
    cfg["routing"] = {**cfg["routing"], "localPrefillBelowTokens": 1000, "alwaysPrefillAtOrAboveTokens": 4000}
    sched.config_path.write_text(yaml.safe_dump(cfg))
    wait_for(lambda: route() == "local", 10, "the new thresholds to apply")
    assert sched.proc.pid == pid and sched.proc.poll() is None
    assert metric(metrics(sched.url), "baton_scheduler_config_reloads_total", result="applied") == 1


def _served_models(url: str) -> list[str]:
    status, _, raw = http("GET", url + "/v1/models")
    assert status == 200
    return [m["id"] for m in json.loads(raw)["data"]]


def test_an_empty_file_is_rejected_and_the_running_config_kept(engines, make_scheduler):
    # What a poll reads right after `render > scheduler.yaml` truncated the file; were it applied, the
    # scheduler would drop its endpoints and rename its model to the default (404 for every request).
    sched = make_scheduler([engines["prefill"]], [engines["decode1"]])
    text = sched.config_path.read_text()
    sched.config_path.write_text("")
    wait_for(lambda: metric(metrics(sched.url), "baton_scheduler_config_reloads_total", result="rejected") == 1,
             10, "the empty config to be rejected")
    assert "the config is empty" in sched.log()
    assert _served_models(sched.url) == [MODEL]
    status, _, answer = post(sched.url + "/v1/completions", {"model": MODEL, "prompt": prompt_ids(8), "max_tokens": 2})
    assert status == 200, answer
    assert metric(metrics(sched.url), "baton_scheduler_config_reloads_total", result="applied") == 0
    sched.config_path.write_text(text.replace(f"model: {MODEL}", "model: renamed"))
    wait_for(lambda: _served_models(sched.url) == ["renamed"], 10, "the complete file to apply")


class _SlowHub:
    """A loopback Hugging Face Hub that holds the tokenizer download until `release` is set."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.asked, self.release = threading.Event(), threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = files.get(self.path)
                if body is not None:
                    hub.asked.set()
                    hub.release.wait(30)
                self.send_response(200 if body is not None else 404)
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_change_made_while_the_tokenizer_loads_is_applied(engines, tmp_path):
    tok = write_tokenizer(tmp_path / "tokenizer")
    hub = _SlowHub({"/org/m/resolve/main/tokenizer.json": (tok / "tokenizer.json").read_bytes()})
    config = scheduler_config([engines["prefill"]], [engines["decode1"]], tokenizer={"huggingFaceId": "org/m"})
    sched = start_scheduler(tmp_path, "slow-start", config, env={"HF_ENDPOINT": hub.url})
    try:
        assert hub.asked.wait(30), "the scheduler never fetched its tokenizer"
        # The file was read; the tokenizer is still loading: change the file now.
        sched.config_path.write_text(yaml.safe_dump({**config, "model": "renamed"}))
        hub.release.set()
        wait_all([sched], "/readyz")
        wait_for(lambda: _served_models(sched.url) == ["renamed"], 10, "the change made during start-up to apply")
        assert metric(metrics(sched.url), "baton_scheduler_config_reloads_total", result="applied") == 1
    finally:
        hub.close()
        sched.stop()


def test_a_replica_taken_out_of_the_lists_counts_its_requests_until_they_end(engines, make_scheduler):
    """A generation switch takes the old replicas out of the scheduler's lists while requests still run on
    them: /metrics keeps counting those requests on their replica until they end, which is what the
    operator waits for before deleting a draining generation (`rollout.in_flight`)."""
    from baton.operator import rollout

    old, new = engines["decode1"], engines["decode2"]
    sched = make_scheduler([engines["prefill"]], [old])
    address = sched.url.removeprefix("http://")
    answer: dict[str, Any] = {}

    def long_stream() -> None:  # ~4,000 decode steps of ~1 ms: seconds on `old`
        answer["reply"] = http("POST", sched.url + "/v1/completions", {
            "model": MODEL, "prompt": prompt_ids(40), "max_tokens": 4000, "stream": True}, timeout=60)

    def counted() -> float:
        return metric(metrics(sched.url), "baton_scheduler_endpoint_active_requests", endpoint=old.address)

    thread = threading.Thread(target=long_stream, daemon=True)
    thread.start()
    wait_for(lambda: counted() == 1, 10, "the stream to start on the old replica")
    cfg = yaml.safe_load(sched.config_path.read_text())
    cfg["endpoints"]["static"]["decode"] = [new.address]
    sched.config_path.write_text(yaml.safe_dump(cfg))
    wait_for(lambda: metric(metrics(sched.url), "baton_scheduler_endpoint_active_requests", endpoint=new.address,
                            tier="decode") == 0 and f'endpoint="{new.address}"' in http("GET", sched.url + "/metrics")[2].decode(),
             10, "the new endpoint list to apply")
    assert thread.is_alive(), "the stream ended before the lists changed: make it longer"
    assert counted() == 1, "the replica taken out of the lists no longer counts the request still running on it"
    readout = rollout.read_schedulers([address])
    assert readout.complete and readout.in_flight.get(old.address) == 1, readout
    assert rollout.in_flight([old.address], readout) >= 1
    thread.join(60)
    status, _, raw = answer["reply"]
    assert status == 200 and parse_sse(raw)[-1] == "[DONE]"
    wait_for(lambda: counted() == 0, 5, "the ended request to leave the count")
    assert rollout.in_flight([old.address], rollout.read_schedulers([address])) == 0
