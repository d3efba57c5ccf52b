"""The scheduler's config file: schema (pydantic, camelCase keys), loading, CLI overrides and hot reload.

The operator renders this file into a ConfigMap; standalone users write it by hand or pass flags instead.
Unknown keys are rejected so that a typo fails loudly instead of silently falling back to a default.
`ConfigWatcher` polls the file's *content* (a ConfigMap volume swaps a symlink, so mtimes lie), and that of
the files the config names as part of it (the redis URL file a Secret volume holds), and
hands every valid new version to a callback once two consecutive polls read the same bytes (a file caught
in the middle of a write is never acted on); an invalid new version is logged and the old one kept. An
empty file (or one holding only comments) is never a config: to mean "all defaults", write `{}`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

log = logging.getLogger("baton.scheduler.config")


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class StaticEndpoint(_Model):
    """One engine address, optionally with the KV-format fingerprint it serves."""

    address: str
    fingerprint: str | None = None


def parse_address(value: str) -> str:
    """`host:port` (an http:// or https:// prefix and a trailing slash are dropped); ValueError otherwise."""
    value = value.strip()
    for prefix in ("http://", "https://"):
        if value.startswith(prefix):
            value = value[len(prefix) :]
    value = value.rstrip("/")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()):
        raise ValueError(f"endpoint {value!r} must be host:port")
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"endpoint {value!r}: port {int(port)} is out of range (1-65535)")
    return value


class StaticEndpoints(_Model):
    prefill: list[StaticEndpoint] = Field(default_factory=list)
    decode: list[StaticEndpoint] = Field(default_factory=list)

    @field_validator("prefill", "decode", mode="before")
    @classmethod
    def _strings_to_endpoints(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        out = []
        for item in value or []:
            if isinstance(item, str):
                item = {"address": item}
            if isinstance(item, Mapping):
                item = dict(item)
                item["address"] = parse_address(str(item.get("address", "")))
            out.append(item)
        return out


class KubernetesEndpoints(_Model):
    namespace: str = "default"
    prefill_service: str = ""
    decode_service: str = ""
    # The engines' port: endpoints are dialled at pod IP + this port, for both tiers unless the tier's
    # own port below is set.
    port: int = Field(8000, ge=1, le=65535)
    # Each tier's own port (the operator renders both, from spec.prefill.port and spec.decode.port); unset
    # (or null): `port`.
    prefill_port: int | None = Field(None, ge=1, le=65535)
    decode_port: int | None = Field(None, ge=1, le=65535)
    # When set, only pods labelled baton.dev/generation=<generation> are used (pods without the label
    # are accepted too, so a scheduler can run against unlabelled engines).
    generation: str = ""
    # Where ready endpoints come from: the Services' EndpointSlices (what a cluster publishes), or the
    # pods the Services select (same readiness, read directly). The local cluster needs `pods`: its pod
    # IPs are loopback addresses, which the API server refuses in EndpointSlices. The environment
    # variable BATON_DISCOVERY_SOURCE overrides this.
    source: Literal["endpointslices", "pods"] = "endpointslices"
    # The DisaggregatedModel whose status.rollout.servingGeneration selects the generation to route
    # to (it overrides `generation` as soon as it is set); empty: no generation filter from the API.
    model: str = ""

    def tier_port(self, tier: str) -> int:
        """The port `tier`'s ("prefill" or "decode") endpoints are dialled on."""
        if tier == "prefill":
            return self.prefill_port if self.prefill_port is not None else self.port
        if tier == "decode":
            return self.decode_port if self.decode_port is not None else self.port
        raise ValueError(f"unknown tier {tier!r}")


class EndpointsConfig(_Model):
    discovery: Literal["static", "kubernetes"] = "static"
    static: StaticEndpoints = Field(default_factory=StaticEndpoints)
    kubernetes: KubernetesEndpoints = Field(default_factory=KubernetesEndpoints)

    @model_validator(mode="after")
    def _check_kubernetes(self) -> EndpointsConfig:
        if self.discovery == "kubernetes" and not (self.kubernetes.prefill_service and self.kubernetes.decode_service):
            raise ValueError("endpoints.kubernetes.prefillService and decodeService are required for kubernetes discovery")
        return self


class RoutingConfig(_Model):
    local_prefill_below_tokens: int = Field(4096, ge=0)
    always_prefill_at_or_above_tokens: int = Field(16384, ge=0)
    algorithm: Literal["throughput-optimized", "latency-optimized"] = "throughput-optimized"
    placement_policy: Literal["shortest-prefill-first", "round-robin", "least-loaded"] = "shortest-prefill-first"
    prefill_batch_size: int = Field(32, ge=1)
    decode_batch_size: int = Field(1, ge=1)
    max_concurrent_prefills: int = Field(64, ge=1)
    kv_transfer_compression: Literal["none", "fp8"] = "none"
    # with compression on, high-precision requests take the uncompressed path (prefilled on decode)
    high_precision_fallback: bool = True
    ring_size: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check_thresholds(self) -> RoutingConfig:
        if self.local_prefill_below_tokens > self.always_prefill_at_or_above_tokens:
            raise ValueError(
                "routing.localPrefillBelowTokens "
                f"({self.local_prefill_below_tokens}) must not exceed routing.alwaysPrefillAtOrAboveTokens "
                f"({self.always_prefill_at_or_above_tokens})"
            )
        return self


class QueueConfig(_Model):
    max_depth: int = Field(256, ge=0)
    # How long a request may wait in the queue before it is rejected with 429 (reason queue_timeout).
    max_wait_seconds: float = Field(30.0, gt=0)


class AdmissionConfig(_Model):
    prefill_tokens_per_second: float = Field(0, ge=0)
    prefill_burst_tokens: float = Field(0, ge=0)
    decode_requests_per_second: float = Field(0, ge=0)
    decode_burst: float = Field(0, ge=0)


class BackpressureConfig(_Model):
    max_active_per_decode_replica: int = Field(64, ge=1)
    decode_p95_latency_threshold_ms: float = Field(200, ge=0)  # 0 disables latency throttling


REDIS_URL_SCHEMES = ("redis://", "rediss://", "unix://")


def read_files(paths: list[Path]) -> dict[Path, bytes | OSError]:
    """Each file's content, or the error reading it."""
    read: dict[Path, bytes | OSError] = {}
    for path in paths:
        try:
            read[path] = path.read_bytes()
        except OSError as exc:
            read[path] = exc
    return read


class DegradationConfig(_Model):
    hold_ttl_seconds: float = Field(120, gt=0)
    store: Literal["memory", "redis"] = "memory"
    redis_url: str = ""
    # A file holding the URL: the operator mounts the Secret behind spec.scheduler.degradation.redisUrlSecret
    # there, so a password never lands in the ConfigMap and a rotated Secret applies without a restart (the
    # watcher re-reads the file as the kubelet updates it).
    redis_url_file: str = ""
    # The name of an environment variable holding the URL (read at start and on each reload; a process's
    # environment does not change, so this suits standalone use, where the value is fixed for its life).
    redis_url_env: str = ""
    # What the config watcher read of redisUrlFile when it took this config (the bytes, or the error): the
    # URL then comes from exactly what the watcher digested, never from a later read of a file that may be
    # changing meanwhile. None: read the file when the URL is asked for.
    _url_file_read: bytes | OSError | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check_redis(self) -> DegradationConfig:
        sources = [name for name, value in (("redisUrl", self.redis_url), ("redisUrlFile", self.redis_url_file),
                                            ("redisUrlEnv", self.redis_url_env)) if value]
        if self.store == "redis" and not sources:
            raise ValueError("degradation.redisUrl (or redisUrlFile, or redisUrlEnv) is required when "
                             "degradation.store is redis")
        if self.store == "redis" and len(sources) > 1:
            raise ValueError(f"degradation: set one of redisUrl, redisUrlFile and redisUrlEnv, not {' and '.join(sources)}")
        if self.redis_url and not self.redis_url.startswith(REDIS_URL_SCHEMES):
            raise ValueError(f"degradation.redisUrl must start with {', '.join(REDIS_URL_SCHEMES)}")
        return self

    def watched_files(self) -> list[Path]:
        """Files whose content is part of this config (the redis URL file), for the watcher."""
        return [Path(self.redis_url_file)] if self.store == "redis" and self.redis_url_file else []

    def resolved_redis_url(self, environ: Mapping[str, str]) -> str:
        """The redis URL: `redisUrl`, else the content of `redisUrlFile` (surrounding whitespace dropped),
        else the value of the variable `redisUrlEnv` names. ConfigError when that is missing, empty or not
        a redis URL; the message never contains the value (it may hold a password)."""
        if self.redis_url:
            return self.redis_url
        if self.redis_url_file:
            where = f"degradation.redisUrlFile {self.redis_url_file}"
            hint = "(the key of the Secret behind spec.scheduler.degradation.redisUrlSecret?)"
            read = self._url_file_read
            if read is None:
                read = read_files([Path(self.redis_url_file)])[Path(self.redis_url_file)]
            if isinstance(read, OSError):
                raise ConfigError(f"{where} is unreadable {hint}: {read.strerror or read}")
            url = read.decode(errors="replace").strip()
        else:
            where = f"degradation.redisUrlEnv {self.redis_url_env}"
            hint = "(the Secret behind spec.scheduler.degradation.redisUrlSecret?)"
            url = environ.get(self.redis_url_env, "").strip() if self.redis_url_env else ""
        if not url:
            raise ConfigError(f"{where} holds no URL: it is unset or empty {hint}")
        if not url.startswith(REDIS_URL_SCHEMES):
            raise ConfigError(f"the redis URL in {where} must start with {', '.join(REDIS_URL_SCHEMES)}")
        return url


class TokenizerConfig(_Model):
    """How text prompts are counted for routing: empty, the documented estimate (`baton.tokens`); else the
    model's own tokenizer, from `path` (a checkpoint directory with tokenizer.json, or that file) or fetched
    from the Hugging Face Hub at start (`huggingFaceId`, `revision`; HF_ENDPOINT and HF_TOKEN apply)."""

    path: str = ""
    hugging_face_id: str = ""
    revision: str = ""

    @model_validator(mode="after")
    def _one_source(self) -> TokenizerConfig:
        if self.path and self.hugging_face_id:
            raise ValueError("tokenizer: set path or huggingFaceId, not both")
        if self.revision and not self.hugging_face_id:
            raise ValueError("tokenizer.revision needs tokenizer.huggingFaceId")
        return self


class RetriesConfig(_Model):
    max_attempts: int = Field(2, ge=1)
    budget_ratio: float = Field(0.2, ge=0, le=1)


class ServerConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # Streamed pieces that arrive from an engine sooner than this after the last write to the client are
    # gathered and written together, at most this much later; the first token and the last event ([DONE]) are
    # never held (the engine is read on meanwhile), and 0 writes every piece at once. Fewer, larger writes cost
    # the scheduler less CPU when an engine streams faster than one token per interval; at usual decode speeds
    # nothing is held.
    stream_flush_interval_ms: float = Field(1.0, ge=0, le=100)


class SchedulerConfig(_Model):
    model: str = "model"
    runtime: Literal["trtllm-serve", "triton"] = "trtllm-serve"
    endpoints: EndpointsConfig = Field(default_factory=EndpointsConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    backpressure: BackpressureConfig = Field(default_factory=BackpressureConfig)
    degradation: DegradationConfig = Field(default_factory=DegradationConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    heartbeat_seconds: float = Field(15, gt=0)
    retries: RetriesConfig = Field(default_factory=RetriesConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    # Per-request upstream read timeout (seconds without a byte from an engine before it counts as failed).
    engine_timeout_seconds: float = Field(600, gt=0)

    def watched_files(self) -> list[Path]:
        """Files besides the config file whose content the running config depends on: a change to one is
        applied as a change to the config is."""
        return self.degradation.watched_files()

    def use_read_files(self, read: Mapping[Path, bytes | OSError]) -> None:
        """Take the watched files' content from `read` (what the watcher digested) instead of reading them
        again later."""
        if self.degradation.redis_url_file:
            self.degradation._url_file_read = read.get(Path(self.degradation.redis_url_file))


class ConfigError(ValueError):
    """The config file is unreadable or invalid; the message names the file and the field."""


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[leaf] = value


# An override naming one tokenizer source (the --tokenizer flag) replaces the file's whole `tokenizer`
# section: the file may name the other source, and both together are an error.
_TOKENIZER_SOURCES = ("tokenizer.path", "tokenizer.huggingFaceId")


def parse_config(text: str | bytes, overrides: Mapping[str, Any] | None = None, source: str = "<config>") -> SchedulerConfig:
    """Parse YAML or JSON text (JSON is YAML) into a validated config; `overrides` are dotted camelCase paths.

    Text without a document (empty, whitespace, only comments) is an error, not an all-defaults config: it
    is what a reader sees of a file that a writer has just truncated. `{}` spells "all defaults"."""
    try:
        data = yaml.safe_load(text) if text.strip() else None  # whitespace-only (a tab, say) is no YAML error
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML/JSON: {exc}") from exc
    if data is None:
        raise ConfigError(f"{source}: the config is empty (no settings, at most comments); "
                          "write {} for an all-defaults config")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    overrides = overrides or {}
    if any(key in overrides for key in _TOKENIZER_SOURCES):
        data.pop("tokenizer", None)
    for dotted, value in overrides.items():
        _set_path(data, dotted, value)
    try:
        return SchedulerConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{source}: invalid scheduler config: {problems}") from exc


def read_config_file(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> SchedulerConfig:
    """The config in `path` with `overrides` applied; without a file, the defaults with `overrides` applied."""
    if path is None:
        return parse_config("{}", overrides, source="<flags>")
    return parse_config(read_config_file(path), overrides, source=str(path))


def config_to_dict(config: SchedulerConfig) -> dict[str, Any]:
    """The config as the file would spell it (camelCase), e.g. for logging or rendering."""
    return json.loads(config.model_dump_json(by_alias=True))


class ConfigWatcher:
    """Polls a config file's content, and that of the files the config names as part of it (the redis URL
    file: `SchedulerConfig.watched_files`), and calls `on_change(config)` for each valid new version.

    New content is acted on (applied, or rejected and reported to `on_error`) only when two consecutive
    polls read the same bytes. A writer that truncates the file and then writes it (`render > file`) can be
    caught in between: the reader sees an empty file, or a prefix that may well be valid YAML (a config
    without its decode endpoints, say). Such a state lasts as long as the write, so it is not read twice in
    a row a poll interval apart unless the writer stalls for a whole interval, while a finished file is; a
    change thus lands one interval later than it would otherwise. It costs nothing extra: one read and one
    sha256 per poll, as before. (A writer that renames a complete file into place, as a ConfigMap or Secret
    volume does, is never seen mid-write at all.) The config handed on carries the watched files' content
    as digested (`SchedulerConfig.use_read_files`), so the service applies exactly the settled content; a
    file that changes afterwards is seen by the next polls.
    """

    def __init__(
        self,
        path: str | Path,
        on_change: Callable[[SchedulerConfig], Awaitable[None] | None],
        overrides: Mapping[str, Any] | None = None,
        interval: float = 1.0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.on_change = on_change
        self.overrides = dict(overrides or {})
        self.interval = interval
        self.on_error = on_error
        self._digest: str | None = None  # the content last acted on: applied (or primed), or rejected
        self._pending: str | None = None  # new content read at the previous poll, not acted on yet
        self._watched: list[Path] = []  # the running config's other files (`SchedulerConfig.watched_files`)
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def _digest_of(content: bytes, read: Mapping[Path, bytes | OSError]) -> str:
        """One digest over the config's bytes and the watched files' (an unreadable file counts as a state)."""
        h = hashlib.sha256(content)
        for path, data in read.items():
            marked = b"\x00" if isinstance(data, OSError) else b"\x01" + data
            h.update(b"\x00" + str(path).encode() + b"\x00" + hashlib.sha256(marked).digest())
        return h.hexdigest()

    def prime(self, content: str | bytes | None = None, config: SchedulerConfig | None = None) -> None:
        """Remember `content`, the bytes the running config was loaded from, as already applied, with the
        current content of the files `config` (the running config) watches, which `config` then uses
        (`use_read_files`): a file that differs from them is applied by the next polls. Pass the loaded
        bytes: without them the file is read again now, and a change made since the initial load would be
        taken as applied and never applied."""
        if content is None:
            try:
                content = self.path.read_bytes()
            except OSError:
                self._digest = None
                return
        if isinstance(content, str):
            content = content.encode()
        self._watched = config.watched_files() if config is not None else []
        read = read_files(self._watched)
        if config is not None:
            config.use_read_files(read)
        self._digest = self._digest_of(content, read)
        self._pending = None

    async def check_once(self) -> bool:
        """Re-read the file (and the watched ones); apply it if its content changed, read the same at the
        previous call (settled) and is valid. Returns True when applied."""
        try:
            text = await asyncio.to_thread(self.path.read_bytes)
        except OSError as exc:
            log.warning("event=config_unreadable path=%s error=%r", self.path, str(exc))
            self._pending = None
            return False
        read = await asyncio.to_thread(read_files, self._watched)
        digest = self._digest_of(text, read)
        if digest == self._digest:
            self._pending = None
            return False
        if digest != self._pending:  # new content: wait for the next poll to read the same (a writer may be busy)
            self._pending = digest
            log.debug("event=config_change_seen path=%s sha256=%s", self.path, digest[:12])
            return False
        self._pending = None
        self._digest = digest
        try:
            config = parse_config(text, self.overrides, source=str(self.path))
        except ConfigError as exc:
            log.error("event=config_reload_rejected path=%s sha256=%s error=%r detail=%r", self.path, digest[:12],
                      str(exc), "keeping the running config")
            if self.on_error:
                self.on_error(str(exc))
            return False
        watched = config.watched_files()
        if watched != self._watched:  # newly named files: read now (a later change is seen by the next polls)
            self._watched = watched
            read = await asyncio.to_thread(read_files, watched)
            self._digest = digest = self._digest_of(text, read)
        config.use_read_files(read)  # the service applies what was digested, not a later read
        result = self.on_change(config)
        if asyncio.iscoroutine(result):
            await result
        log.info("event=config_reloaded path=%s sha256=%s", self.path, digest[:12])
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep watching whatever one bad reload did
                log.exception("event=config_reload_failed")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="baton-config-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
