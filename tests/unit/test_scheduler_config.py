"""Scheduler config: the camelCase schema, validation messages, flag overrides and content-based reload."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from baton.scheduler.config import (
    ConfigError,
    ConfigWatcher,
    SchedulerConfig,
    config_to_dict,
    load_config,
    parse_config,
)
from baton.scheduler.main import build_parser, overrides_from_args

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
    with pytest.raises(ConfigError, match="host:port"):
        parse_config("endpoints: {static: {prefill: ['h:\u0663']}}")  # a digit, but not an ASCII one
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
        assert not await watcher.check_once()  # new: acted on once the next poll reads the same
        assert await watcher.check_once()
        assert not await watcher.check_once()
        path.write_text("model: c\nrouting: {bogus: 1}\n")
        assert not await watcher.check_once()
        assert not await watcher.check_once()  # invalid: kept the old one
        assert not await watcher.check_once()  # and reported once

    asyncio.run(run())
    assert [c.model for c in seen] == ["b"]
    assert seen[0].queue.max_depth == 7  # flags keep overriding across reloads
    assert len(errors) == 1 and "bogus" in errors[0]


def test_watcher_applies_a_change_to_a_file_the_config_names_once_per_change(tmp_path):
    """The redis URL file (a mounted Secret) is part of the config: a new URL in it is a new config version,
    whether the config named that file from the start or only since a reload."""
    path, url = tmp_path / "cfg.yaml", tmp_path / "url"
    url.write_text("redis://a:6379/0")
    path.write_text("degradation: {store: redis, redisUrl: 'redis://plain:6379/0'}\n")
    seen: list[str] = []
    seen_errors: list[Exception] = []

    def on_change(c: SchedulerConfig) -> None:
        try:
            seen.append(c.degradation.resolved_redis_url({}) if c.degradation.store == "redis" else "memory")
        except ConfigError as exc:
            seen_errors.append(exc)

    watcher = ConfigWatcher(path, on_change)
    watcher.prime(path.read_bytes(), parse_config(path.read_bytes()))

    async def polls(n: int = 2) -> list[bool]:
        return [await watcher.check_once() for _ in range(n)]

    async def run():
        url.write_text("redis://b:6379/0")  # not named by the running config: no change
        assert await polls() == [False, False]
        path.write_text(f"degradation: {{store: redis, redisUrlFile: '{url}'}}\n")
        assert await polls(3) == [False, True, False]  # applied once, not again for the newly watched file
        url.write_text("redis://c:6379/0")
        assert await polls(3) == [False, True, False]
        url.unlink()
        assert await polls(3) == [False, True, False]  # handed on: the service refuses a missing file
        path.write_text("degradation: {store: memory}\n")
        assert await polls(2) == [False, True]
        url.write_text("redis://d:6379/0")  # no longer named: no change
        assert await polls() == [False, False]

    asyncio.run(run())
    assert seen == ["redis://b:6379/0", "redis://c:6379/0", "memory"]
    assert len(seen_errors) == 1 and "is unreadable" in str(seen_errors[0])


def test_the_config_handed_on_resolves_the_url_the_watcher_digested_not_a_later_one(tmp_path):
    """A file that changes between the watcher's read and the service's use is applied by the next polls,
    and the config applied now uses the settled content (never a half-written or newer one)."""
    path, url = tmp_path / "cfg.yaml", tmp_path / "url"
    url.write_text("redis://a:6379/0")
    path.write_text(f"degradation: {{store: redis, redisUrlFile: '{url}'}}\n")
    seen: list[str] = []

    def on_change(c: SchedulerConfig) -> None:
        url.write_text("redis://c:6379/0")  # changes just as the service takes the config
        seen.append(c.degradation.resolved_redis_url({}))

    watcher = ConfigWatcher(path, on_change)
    config = parse_config(path.read_bytes())
    watcher.prime(path.read_bytes(), config)
    url.write_text("redis://b:6379/0")
    assert config.degradation.resolved_redis_url({}) == "redis://a:6379/0"  # what was primed

    async def run():
        assert [await watcher.check_once() for _ in range(2)] == [False, True]
        assert seen == ["redis://b:6379/0"]
        assert [await watcher.check_once() for _ in range(2)] == [False, True]  # c: a change of its own
        assert seen == ["redis://b:6379/0", "redis://c:6379/0"]

    asyncio.run(run())


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

    async def run():
        assert not await watcher.check_once()
        assert await watcher.check_once()

    asyncio.run(run())
    assert seen == ["two"]


FILE = """\
model: llama-3-8b
endpoints:
  static:
    prefill: ["127.0.0.1:8001"]
    decode: ["127.0.0.1:8002"]
"""


@pytest.mark.parametrize("empty", ["", "  \n\t\n", "# rendered by the operator\n", "---\n"])
def test_an_empty_file_is_rejected_on_reload_and_the_running_config_kept(tmp_path, empty):
    # `render > cfg.yaml` truncates first: a poll may read nothing (or only a leading comment) for a while.
    path = tmp_path / "cfg.yaml"
    path.write_text(FILE)
    seen: list[SchedulerConfig] = []
    errors: list[str] = []
    watcher = ConfigWatcher(path, seen.append, on_error=errors.append)
    watcher.prime(FILE.encode())
    path.write_text(empty)

    async def run():
        for _ in range(3):
            assert not await watcher.check_once()

    asyncio.run(run())
    assert seen == []  # nothing applied: not an all-defaults config without endpoints and model
    assert len(errors) == 1 and "empty" in errors[0] and "{}" in errors[0]
    # `{}` is how a file says "all defaults"
    path.write_text("{}\n")

    async def defaults():
        assert not await watcher.check_once()
        assert await watcher.check_once()

    asyncio.run(defaults())
    assert seen == [SchedulerConfig()]


def test_an_empty_file_at_start_is_an_error_and_flags_alone_still_work(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: the config is empty .*write \{\}"):
        load_config(path, {"endpoints.static.prefill": "h:1", "endpoints.static.decode": "h:2"})
    cfg = load_config(None, {"model": "m", "endpoints.static.decode": "h:2"})  # no --config: flags only
    assert cfg.model == "m" and [e.address for e in cfg.endpoints.static.decode] == ["h:2"]
    assert load_config(None) == SchedulerConfig()


def test_a_file_caught_mid_write_is_not_applied_even_when_it_parses(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(FILE)
    seen: list[SchedulerConfig] = []
    errors: list[str] = []
    watcher = ConfigWatcher(path, seen.append, on_error=errors.append)
    watcher.prime(FILE.encode())
    new = FILE.replace("llama-3-8b", "llama-3-70b")
    cut = new.index("    decode:")

    async def run():
        path.write_text("")  # the writer truncated ...
        assert not await watcher.check_once()
        path.write_text(new[:cut])  # ... and has written part of it: valid YAML, with no decode endpoints
        assert parse_config(new[:cut]).endpoints.static.decode == []
        assert not await watcher.check_once()
        path.write_text(new)  # done
        assert not await watcher.check_once()
        assert await watcher.check_once()  # read the same twice in a row: applied

    asyncio.run(run())
    assert errors == []  # the passing states were never judged, so never counted as rejected
    assert len(seen) == 1 and seen[0].model == "llama-3-70b"
    assert [e.address for e in seen[0].endpoints.static.decode] == ["127.0.0.1:8002"]


def test_a_change_between_the_initial_load_and_prime_is_applied(tmp_path):
    # serve(): load the file, load the tokenizer (a Hub fetch may take long), then prime the watcher.
    path = tmp_path / "cfg.yaml"
    path.write_text("model: old-name\n")
    loaded = path.read_bytes()
    running = parse_config(loaded)
    path.write_text("model: new-name\n")  # changed while the tokenizer loaded
    seen: list[str] = []
    watcher = ConfigWatcher(path, lambda c: seen.append(c.model))
    watcher.prime(loaded)  # what the running config came from, not the file as it is now

    async def run():
        assert not await watcher.check_once()
        assert await watcher.check_once()

    asyncio.run(run())
    assert running.model == "old-name" and seen == ["new-name"]


def _args(*argv: str):
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("interval", ["0", "-1", "nan", "inf", "soon"])
def test_reload_interval_must_be_positive_seconds(capsys, interval):
    with pytest.raises(SystemExit) as exc:
        _args("--reload-interval", interval)
    assert exc.value.code == 2
    assert "argument --reload-interval" in capsys.readouterr().err
    assert _args("--reload-interval", "0.2").reload_interval == 0.2
    assert _args().reload_interval == 1.0


@pytest.mark.parametrize("port", ["0", "65536", "99999"])
def test_endpoint_ports_outside_1_to_65535_are_rejected(capsys, port):
    with pytest.raises(ConfigError, match=f"port {int(port)} is out of range \\(1-65535\\)"):
        parse_config(f"endpoints: {{static: {{decode: ['127.0.0.1:{port}']}}}}")
    with pytest.raises(SystemExit):
        _args("--prefill-endpoints", f"127.0.0.1:8001,127.0.0.1:{port}")
    err = capsys.readouterr().err
    assert "argument --prefill-endpoints" in err and f"port {int(port)} is out of range (1-65535)" in err


def test_endpoint_ports_at_the_limits_are_accepted():
    args = _args("--prefill-endpoints", "127.0.0.1:1", "--decode-endpoints", "http://127.0.0.1:65535/")
    cfg = parse_config("{}", overrides_from_args(args))
    assert [e.address for e in cfg.endpoints.static.prefill] == ["127.0.0.1:1"]
    assert [e.address for e in cfg.endpoints.static.decode] == ["127.0.0.1:65535"]


def test_the_tokenizer_flag_replaces_the_files_tokenizer_source():
    text = "model: m\ntokenizer: {huggingFaceId: org/model, revision: v2}\n"
    cfg = parse_config(text, overrides_from_args(_args("--tokenizer", "/models/m")))
    assert (cfg.tokenizer.path, cfg.tokenizer.hugging_face_id, cfg.tokenizer.revision) == ("/models/m", "", "")
    assert cfg.model == "m"  # the rest of the file still applies
    # the file alone keeps its own source, and a file naming both is still an error
    assert parse_config(text).tokenizer.hugging_face_id == "org/model"
    with pytest.raises(ConfigError, match="not both"):
        parse_config("tokenizer: {path: /p, huggingFaceId: org/model}")


def test_kubernetes_tier_ports_default_to_port():
    base = "endpoints: {discovery: kubernetes, kubernetes: {prefillService: p, decodeService: d"
    one = parse_config(base + ", port: 9000}}").endpoints.kubernetes  # a hand-written config with one port
    assert (one.tier_port("prefill"), one.tier_port("decode")) == (9000, 9000)
    assert parse_config(base + "}}").endpoints.kubernetes.tier_port("prefill") == 8000
    both = parse_config(base + ", port: 9000, prefillPort: 8001, decodePort: 8002}}").endpoints.kubernetes
    assert (both.prefill_port, both.decode_port) == (8001, 8002)
    assert (both.tier_port("prefill"), both.tier_port("decode")) == (8001, 8002)
    only = parse_config(base + ", port: 9000, prefillPort: 8001}}").endpoints.kubernetes
    assert (only.tier_port("prefill"), only.tier_port("decode")) == (8001, 9000)
    assert parse_config(json.dumps(config_to_dict(parse_config(base + ", prefillPort: 8001}}")))).endpoints.kubernetes == \
        parse_config(base + ", prefillPort: 8001}}").endpoints.kubernetes
    with pytest.raises(ConfigError, match=r"endpoints\.kubernetes\.prefillPort"):
        parse_config(base + ", prefillPort: 0}}")
    with pytest.raises(ConfigError, match=r"endpoints\.kubernetes\.decodePort"):
        parse_config(base + ", decodePort: 65536}}")
