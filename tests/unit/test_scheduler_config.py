"""Scheduler config: the camelCase schema, validation messages, flag overrides and content-based reload."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from baton.scheduler.config import ConfigError, ConfigWatcher, SchedulerConfig, config_to_dict, parse_config

FULL = """
model: llama-3-70b
runtime: trtllm-serve
endpoints:
  discovery: static
  static: {prefill: ["127.0.0.1:8001"], decode: ["127.0.0.1:8002", {address: "127.0.0.1:8003", fingerprint: abc}]}
  kubernetes: {namespace: ns, prefillService: m-prefill, decodeService: m-decode, port: 8000, generation: ""}
routing:
  localPrefillBelowTokens: 4096
  alwaysPrefillAtOrAboveTokens: 16384
  algorithm: throughput-optimized
  placementPolicy: shortest-prefill-first
  prefillBatchSize: 32
  decodeBatchSize: 1
  maxConcurrentPrefills: 64
  kvTransferCompression: none
  ringSize: 0
queue: {maxDepth: 256}
admission: {prefillTokensPerSecond: 0, prefillBurstTokens: 0, decodeRequestsPerSecond: 0, decodeBurst: 0}
backpressure: {maxActivePerDecodeReplica: 64, decodeP95LatencyThresholdMs: 200}
degradation: {holdTtlSeconds: 120, store: memory, redisUrl: ""}
heartbeatSeconds: 15
retries: {maxAttempts: 2, budgetRatio: 0.2}
server: {host: 127.0.0.1, port: 8000}
"""


def test_full_example_parses_with_camel_case_keys():
    cfg = parse_config(FULL)
    assert cfg.model == "llama-3-70b"
    assert cfg.routing.local_prefill_below_tokens == 4096
    assert cfg.endpoints.kubernetes.prefill_service == "m-prefill"
    assert [e.address for e in cfg.endpoints.static.decode] == ["127.0.0.1:8002", "127.0.0.1:8003"]
    assert cfg.endpoints.static.decode[1].fingerprint == "abc"
    assert cfg.degradation.hold_ttl_seconds == 120
    # round trip: the dict form uses the file's spelling
    again = parse_config(json.dumps(config_to_dict(cfg)))
    assert again == cfg


def test_json_is_accepted_and_defaults_fill_in():
    cfg = parse_config('{"model": "m"}')
    assert cfg == SchedulerConfig(model="m")
    assert cfg.routing.placement_policy == "shortest-prefill-first"
    assert cfg.queue.max_depth == 256


def test_unknown_keys_and_bad_values_name_the_field():
    with pytest.raises(ConfigError, match=r"routing\.localPrefillBelowToken"):
        parse_config("routing: {localPrefillBelowToken: 5}")
    with pytest.raises(ConfigError, match=r"routing\.placementPolicy"):
        parse_config("routing: {placementPolicy: random}")
    with pytest.raises(ConfigError, match="must not exceed"):
        parse_config("routing: {localPrefillBelowTokens: 9000, alwaysPrefillAtOrAboveTokens: 100}")
    with pytest.raises(ConfigError, match="host:port"):
        parse_config("endpoints: {static: {prefill: [nohost]}}")
    with pytest.raises(ConfigError, match="redisUrl"):
        parse_config("degradation: {store: redis}")
    with pytest.raises(ConfigError, match="prefillService"):
        parse_config("endpoints: {discovery: kubernetes}")


def test_overrides_win_and_comma_lists_split():
    cfg = parse_config(
        "model: a\nrouting: {prefillBatchSize: 4}",
        {"model": "b", "routing.prefillBatchSize": 8, "endpoints.static.prefill": "h1:1, http://h2:2/"},
    )
    assert cfg.model == "b"
    assert cfg.routing.prefill_batch_size == 8
    assert [e.address for e in cfg.endpoints.static.prefill] == ["h1:1", "h2:2"]


def test_watcher_applies_only_changed_valid_content(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("model: a\n")
    seen: list[SchedulerConfig] = []
    errors: list[str] = []
    watcher = ConfigWatcher(path, seen.append, {"queue.maxDepth": 7}, on_error=errors.append)
    watcher.prime()

    async def run():
        assert not await watcher.check_once()  # unchanged
        path.write_text("model: b\n")
        assert await watcher.check_once()
        assert not await watcher.check_once()
        path.write_text("model: c\nrouting: {bogus: 1}\n")
        assert not await watcher.check_once()  # invalid: kept the old one

    asyncio.run(run())
    assert [c.model for c in seen] == ["b"]
    assert seen[0].queue.max_depth == 7  # flags keep overriding across reloads
    assert errors and "bogus" in errors[0]


def test_watcher_follows_configmap_symlink_swaps(tmp_path):
    # A ConfigMap volume: cfg.yaml -> ..data/cfg.yaml, ..data -> ..2024_x (swapped atomically on update).
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    (tmp_path / "v1" / "cfg.yaml").write_text("model: one\n")
    (tmp_path / "v2" / "cfg.yaml").write_text("model: two\n")
    os.symlink("v1", tmp_path / "..data")
    os.symlink("..data/cfg.yaml", tmp_path / "cfg.yaml")
    seen: list[str] = []
    watcher = ConfigWatcher(tmp_path / "cfg.yaml", lambda c: seen.append(c.model))
    watcher.prime()
    os.symlink("v2", tmp_path / "..data_tmp")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert asyncio.run(watcher.check_once())
    assert seen == ["two"]
