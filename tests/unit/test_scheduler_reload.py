"""Hot reload of the parts built at start: the engine client (`runtime`, `engineTimeoutSeconds`), the hold
store (`degradation.store`, the redis URL) and the tokenizer. Each is replaced in place with nothing lost:
requests in flight finish on the client they started with, held requests move to the new store and still
resume and remove themselves, counting goes on with the old tokenizer until the new one is loaded; a part that
cannot be built keeps the running one and the reload is counted rejected."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import pytest
from test_scheduler_service import FakeEngine, StreamSink, long_request

from baton import tokens
from baton.model_tokenizer import TokenizerError
from baton.scheduler import holds as holds_module
from baton.scheduler import service as service_module
from baton.scheduler.config import parse_config
from baton.scheduler.endpoints import Endpoint
from baton.scheduler.engines import EngineFailure, IteratedResponse
from baton.scheduler.replies import RelayReply
from baton.scheduler.service import SchedulerService
from baton.tokens import EstimateTokenizer

BASE = "model: m\nrouting: {localPrefillBelowTokens: 10, alwaysPrefillAtOrAboveTokens: 100}\n"


class Engine(FakeEngine):
    """A FakeEngine that knows how it was built, records its health checks, refuses calls once closed, and
    streams (the second half of a stream waits for `gate` when one is set)."""

    def __init__(self, runtime: str = "trtllm-serve", timeout: float = 600.0) -> None:
        super().__init__()
        self.runtime = runtime
        self.timeout = timeout
        self.closed = False
        self.health_checks: list[str] = []
        self.gate: asyncio.Event | None = None

    async def post(self, endpoint, path, body, request_id):
        assert not self.closed, "a request sent on a closed engine client"
        return await super().post(endpoint, path, body, request_id)

    async def open(self, endpoint, path, body, request_id):
        assert not self.closed, "a stream opened on a closed engine client"
        self.calls.append((endpoint.address, "stream"))
        gate = self.gate

        async def chunks():
            yield b'data: {"choices": [{"index": 0, "text": " a"}]}\n\n'
            if gate is not None:
                await gate.wait()
            yield b'data: {"choices": [{"index": 0, "text": " b"}]}\n\ndata: [DONE]\n\n'

        return IteratedResponse(200, chunks(), "text/event-stream")

    async def health(self, endpoint, timeout):
        assert not self.closed, "a health check on a closed engine client"
        self.health_checks.append(endpoint.address)
        return await super().health(endpoint, timeout)

    async def close(self):
        self.closed = True




# What the service builds its engine clients with (`make_engine_client`) and loads tokenizers with
# (`load_scheduler_tokenizer`), replaced for every test by the fixtures below.
_factory: list = [Engine]
_built: list[Engine] = []


@pytest.fixture(autouse=True)
def engines(monkeypatch):
    def build(runtime: str, timeout: float) -> Engine:
        engine = _factory[0](runtime, timeout)
        _built.append(engine)
        return engine

    _factory[0] = Engine
    _built.clear()
    monkeypatch.setattr(service_module, "make_engine_client", build)
    yield _built
    _built.clear()


@pytest.fixture
def tokenizer_loader(monkeypatch):
    """Install `loader` as the service's tokenizer loader."""
    return lambda loader: monkeypatch.setattr(service_module, "load_scheduler_tokenizer", loader, raising=False)


def make(config_yaml: str = "", prefill=("p1:1",), decode=("d1:1", "d2:1")):
    svc = SchedulerService(parse_config(BASE + config_yaml), discover=False)
    svc.update_endpoints([Endpoint(a, "prefill") for a in prefill], [Endpoint(a, "decode") for a in decode])
    return svc, _built


async def held_request(svc: SchedulerService, request_id: str) -> asyncio.Task:
    """Fill the only decode replica and send a long prompt: its prefill finishes and is held. Its task."""
    svc.decode["d1:1"].active = 1
    task = asyncio.create_task(svc.complete("completions", long_request(), {"X-Request-Id": request_id}))
    await asyncio.sleep(0.05)
    return task


def reloads(svc: SchedulerService) -> list[str]:
    seen: list[str] = []
    orig = svc.hooks.config_reload
    svc.hooks.config_reload = lambda result: (seen.append(result), orig(result))
    return seen


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(autouse=True)
def estimate_tokenizer():
    """Every test starts and ends counting with the estimate (the tokenizer is process-wide)."""
    tokens.set_tokenizer(None)
    yield
    tokens.set_tokenizer(None)


# ---------------------------------------------------------------------------------------------- engine client
def test_a_runtime_change_sends_new_requests_on_a_new_client_and_closes_the_old_one_after_its_requests():
    async def main():
        svc, built = make()
        old = built[0]
        seen = reloads(svc)
        old.delay = 0.1
        in_flight = asyncio.create_task(svc.complete("completions", long_request(), {}))
        await asyncio.sleep(0.05)
        assert old.calls == [("p1:1", "context_only")]  # the prefill is under way on the old client
        checked_before = len(old.health_checks)

        svc.apply_config(parse_config(BASE + "runtime: triton\n"))
        new = svc.engine
        assert new is built[1] and (new.runtime, new.timeout) == ("triton", 600)
        assert seen == ["applied"]
        reply = await svc.complete("completions", long_request(), {})  # started after the reload
        assert reply.status == 200
        assert new.calls == [("p1:1", "context_only"), (reply.headers["X-Baton-Decode-Endpoint"], "generation_only")]
        assert not old.closed  # its request is still in flight

        reply = await asyncio.wait_for(in_flight, 2)
        assert reply.status == 200
        # the hand-off went through the client the attempt started with, not the one in place by then
        assert [kind for _, kind in old.calls] == ["context_only", "generation_only"]
        await svc.reloads_settled()
        assert old.closed and not new.closed
        # health: every known replica was asked again, through the new client only
        assert sorted(new.health_checks) == ["d1:1", "d2:1", "p1:1"]
        assert len(old.health_checks) == checked_before
        await svc.heartbeat_once()
        await svc.stop()
        assert new.closed

    run(main())


def test_an_idle_old_client_is_closed_at_once_and_the_timeout_applies_in_place():
    async def main():
        svc, built = make(prefill=(), decode=("d1:1",))
        svc.apply_config(parse_config(BASE + "engineTimeoutSeconds: 5\n"))
        await svc.reloads_settled()
        assert built[0].closed and (svc.engine.runtime, svc.engine.timeout) == ("trtllm-serve", 5)
        svc.apply_config(parse_config(BASE + "engineTimeoutSeconds: 5\nqueue: {maxDepth: 7}\n"))
        assert len(built) == 2  # nothing about the client changed: the same one goes on
        assert (await svc.complete("completions", long_request(5), {})).status == 200
        await svc.stop()

    run(main())


def test_a_stream_keeps_its_client_open_until_it_ends():
    async def main():
        svc, built = make(prefill=(), decode=("d1:1",))
        old = built[0]
        old.gate = asyncio.Event()
        body = json.dumps({"model": "m", "prompt": [1, 2, 3], "max_tokens": 2, "stream": True}).encode()
        reply = await svc.complete("completions", body, {})
        assert isinstance(reply, RelayReply)
        sink = StreamSink()
        reply.producer.start(sink)

        svc.apply_config(parse_config(BASE + "runtime: triton\n"))
        await asyncio.sleep(0.05)
        assert not old.closed and not sink.ended.is_set()  # the stream is still relaying from the old client
        assert (await svc.complete("completions", long_request(5), {})).status == 200
        assert built[1].calls == [("d1:1", "context_and_generation")]

        old.gate.set()
        await asyncio.wait_for(sink.ended.wait(), 2)
        assert sink.data.endswith(b"data: [DONE]\n\n") and b" b" in sink.data
        await svc.reloads_settled()
        assert old.closed
        await svc.stop()

    run(main())


def test_an_attempt_that_fails_on_the_old_client_is_retried_on_the_new_one():
    async def main():
        svc, built = make("retries: {maxAttempts: 3}\n", prefill=(), decode=("d1:1", "d2:1"))
        old = built[0]
        old.delay = 0.1
        old.fail.update({"d1:1": "500", "d2:1": "500"})
        task = asyncio.create_task(svc.complete("completions", long_request(5), {}))
        await asyncio.sleep(0.05)
        svc.apply_config(parse_config(BASE + "runtime: triton\nretries: {maxAttempts: 3}\n"))
        reply = await asyncio.wait_for(task, 2)
        assert reply.status == 200
        assert len(old.calls) == 1 and len(built[1].calls) == 1  # the retry went through the new client
        assert built[1].calls[0][0] != old.calls[0][0]  # ... and to the other replica
        await svc.reloads_settled()
        assert old.closed
        await svc.stop()

    run(main())


def test_a_client_still_in_use_after_the_grace_is_closed_anyway(monkeypatch, caplog):
    monkeypatch.setattr(service_module, "RETIRED_ENGINE_GRACE_S", 0.1)

    async def main():
        svc, built = make(prefill=(), decode=("d1:1",))
        built[0].gate = asyncio.Event()  # a stream that never ends
        body = json.dumps({"model": "m", "prompt": [1, 2, 3], "max_tokens": 2, "stream": True}).encode()
        reply = await svc.complete("completions", body, {})
        reply.producer.start(StreamSink())
        svc.apply_config(parse_config(BASE + "runtime: triton\n"))
        await asyncio.sleep(0.3)
        assert built[0].closed
        assert "event=engine_client_closed_in_use" in caplog.text
        reply.producer.abort()  # the client goes away: the slot is given back, nothing is closed twice
        await svc.stop()

    with caplog.at_level(logging.INFO, logger="baton.scheduler"):
        run(main())


class Aborting(Engine):
    """Closing the client breaks what it has in flight, as `HttpClient.close` does: its streams end with
    ConnectionAbortedError("client closed"), its requests with a connection failure. With `hang`, requests
    and the second half of streams wait for that."""

    hang = False

    def __init__(self, runtime: str = "trtllm-serve", timeout: float = 600.0) -> None:
        super().__init__(runtime, timeout)
        self.aborted = asyncio.Event()

    async def post(self, endpoint, path, body, request_id):
        if self.hang:
            self.calls.append((endpoint.address, "hung"))
            await self.aborted.wait()
            raise EngineFailure(endpoint, "ConnectionAbortedError: client closed", kind="connection")
        return await super().post(endpoint, path, body, request_id)

    async def open(self, endpoint, path, body, request_id):
        assert not self.closed, "a stream opened on a closed engine client"
        aborted = self.aborted

        async def chunks():
            yield b'data: {"choices": [{"index": 0, "text": " a"}]}\n\n'
            await aborted.wait()
            raise ConnectionAbortedError("client closed")

        return IteratedResponse(200, chunks(), "text/event-stream")

    async def close(self):
        self.closed = True
        self.aborted.set()


def test_calls_broken_by_closing_a_replaced_client_do_not_mark_their_replicas_unhealthy(monkeypatch):
    monkeypatch.setattr(service_module, "RETIRED_ENGINE_GRACE_S", 0.1)
    _factory[0] = Aborting

    async def main():
        svc, built = make(decode=("d1:1",))
        old = built[0]
        old.hang = True
        body = json.dumps({"model": "m", "prompt": [1, 2, 3], "max_tokens": 2, "stream": True}).encode()
        reply = await svc.complete("completions", body, {})  # a stream on d1:1, still relaying
        sink = StreamSink()
        reply.producer.start(sink)
        prefilling = asyncio.create_task(svc.complete("completions", long_request(), {}))  # p1:1 never answers
        await asyncio.sleep(0.05)
        assert ("p1:1", "hung") in old.calls

        svc.apply_config(parse_config(BASE + "runtime: triton\n"))
        await asyncio.wait_for(sink.ended.wait(), 2)  # closed after the grace, under both
        assert old.closed
        # the stream still fails, and the request is retried (avoiding p1:1), as before ...
        assert b"stream_interrupted" in sink.data and b"client closed" in sink.data
        reply = await asyncio.wait_for(prefilling, 2)
        assert reply.status == 200 and reply.headers["X-Baton-Route"] == "local"
        # ... but the replicas did nothing wrong: they stay in rotation, their failure counts untouched
        for replica in (svc.prefill["p1:1"], svc.decode["d1:1"]):
            assert replica.healthy and replica.failures == 0, replica.address
        assert svc.ready() == (True, "ok")
        assert (await svc.complete("completions", long_request(), {})).status == 200  # through the new client
        await svc.stop()

    run(main())


def test_health_answers_through_a_replaced_client_are_dropped():
    async def main():
        svc, built = make(prefill=(), decode=("d1:1",))
        await asyncio.sleep(0.01)
        gate = asyncio.Event()

        async def unhealthy_late(endpoint, timeout):  # e.g. its connection aborted as the client was closed
            await gate.wait()
            return False

        built[0].health = unhealthy_late
        heartbeat = asyncio.create_task(svc._probe([svc.decode["d1:1"]]))  # under way through the old client
        await asyncio.sleep(0.01)
        svc.apply_config(parse_config(BASE + "runtime: triton\n"))
        await asyncio.sleep(0.01)
        assert built[1].health_checks == ["d1:1"]
        gate.set()
        await heartbeat
        assert svc.decode["d1:1"].healthy and svc.ready() == (True, "ok")
        await svc.stop()

    run(main())


def test_an_engine_client_that_cannot_be_built_keeps_the_running_one_and_the_reload_is_rejected(caplog):
    attempts: list[str] = []

    def factory(runtime, timeout):
        attempts.append(runtime)
        if runtime == "triton" and attempts.count("triton") == 1:
            raise ModuleNotFoundError("No module named 'tritonclient'")
        return Engine(runtime, timeout)

    _factory[0] = factory

    async def main():
        svc, built = make(prefill=(), decode=("d1:1",))
        seen = reloads(svc)
        with caplog.at_level(logging.ERROR, logger="baton.scheduler"):
            svc.apply_config(parse_config(BASE + "runtime: triton\nqueue: {maxDepth: 9}\n"))
        assert seen == ["rejected"] and svc.engine is built[0] and not built[0].closed
        assert "event=config_reload_failed field=runtime" in caplog.text and "tritonclient" in caplog.text
        assert svc.config.queue.max_depth == 9  # the rest of the reload applied
        assert (await svc.complete("completions", long_request(5), {})).status == 200
        # the next reload (any change in the file) tries again
        svc.apply_config(parse_config(BASE + "runtime: triton\nqueue: {maxDepth: 10}\n"))
        assert seen == ["rejected", "applied"] and svc.engine.runtime == "triton"
        await svc.reloads_settled()
        assert built[0].closed
        await svc.stop()

    run(main())


# ---------------------------------------------------------------------------------------------- hold store
def _redis_keys(server) -> list[str]:
    with server.client() as c:
        return sorted(k.decode() for k in c.keys("baton:hold:*"))


def test_a_store_change_moves_the_held_requests_which_still_resume_and_remove_themselves(redis_server):
    with redis_server.client() as c:
        c.flushdb()
    full = "backpressure: {maxActivePerDecodeReplica: 1}\n"
    to_redis = full + f"degradation: {{store: redis, redisUrl: '{redis_server.url}'}}\n"

    async def main():
        svc, built = make(full, decode=("d1:1",))
        seen = reloads(svc)
        first = await held_request(svc, "held-1")
        memory = svc.holds
        assert memory.kind == "memory" and len(memory) == 1
        key1 = memory.held()[0].key

        svc.apply_config(parse_config(BASE + to_redis))  # memory -> redis
        assert seen == ["applied"] and svc.holds.kind == "redis" and [h.key for h in svc.holds.held()] == [key1]
        assert svc.snapshot()["holds"] == 1
        second = asyncio.create_task(svc.complete("completions", long_request(150), {"X-Request-Id": "held-2"}))
        await asyncio.sleep(0.05)
        await svc.reloads_settled()
        await svc.holds.flush()
        assert len(memory) == 0  # the old store let go of it
        key2 = next(h.key for h in svc.holds.held() if h.key != key1)
        assert _redis_keys(redis_server) == sorted(f"baton:hold:{k}" for k in (key1, key2))  # moved one published

        # one slot frees: one held request resumes (and stays generating a while) and removes its own record
        built[0].delay = 0.2
        svc.decode["d1:1"].active = 0
        svc.decode_queue.notify()
        await asyncio.sleep(0.05)
        await svc.holds.flush()
        (left,) = svc.holds.held()
        assert _redis_keys(redis_server) == [f"baton:hold:{left.key}"]

        redis_store = svc.holds
        svc.apply_config(parse_config(BASE + full))  # redis -> memory: the held one moves back, its key goes
        assert svc.holds.kind == "memory" and [h.key for h in svc.holds.held()] == [left.key]
        await svc.reloads_settled()
        assert _redis_keys(redis_server) == [] and len(redis_store) == 0
        replies = await asyncio.wait_for(asyncio.gather(first, second), 3)
        assert [r.status for r in replies] == [200, 200]
        assert len(svc.holds) == 0  # each removed itself from the store that held it at the end
        assert seen == ["applied", "applied"]
        await svc.stop()

    run(main())


def _swap_in(path, text: str) -> None:
    """Replace `path`'s content the way the kubelet updates a Secret volume: a complete file renamed in."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def test_a_rotated_redis_url_file_moves_the_holds_to_the_new_redis_without_a_restart(redis_server, tmp_path):
    """spec.scheduler.degradation.redisUrlSecret is mounted as a file (the config's redisUrlFile): when the
    Secret is rotated, the config file itself does not change, yet the watcher sees the new URL and the
    holds move to the Redis it names; a rotation to an unusable value keeps the running store."""
    import redis

    db0, db1 = redis_server.url, redis_server.url[:-1] + "1"
    for url in (db0, db1):
        with redis.Redis.from_url(url) as c:
            c.flushdb()
    url_file = tmp_path / "redis-url"
    url_file.write_text(db0 + "\n")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(BASE + "backpressure: {maxActivePerDecodeReplica: 1}\n"
                           f"degradation: {{store: redis, redisUrlFile: '{url_file}'}}\n")

    def keys(url: str) -> list[str]:
        with redis.Redis.from_url(url) as c:
            return sorted(k.decode() for k in c.keys("baton:hold:*"))

    async def polls(watcher, n: int = 2) -> list[bool]:
        return [await watcher.check_once() for _ in range(n)]

    async def main():
        from baton.scheduler.config import ConfigWatcher, read_config_file

        loaded = read_config_file(config_file)
        config = parse_config(loaded)
        watcher = ConfigWatcher(config_file, lambda new: svc.apply_config(new), interval=0.05)
        watcher.prime(loaded, config)
        svc = SchedulerService(config, discover=False)
        svc.update_endpoints([Endpoint("p1:1", "prefill")], [Endpoint("d1:1", "decode")])
        seen = reloads(svc)
        assert await polls(watcher) == [False, False]  # nothing changed: nothing applied
        held = await held_request(svc, "rotated")
        await svc.holds.flush()
        (hold,) = svc.holds.held()
        assert keys(db0) == [f"baton:hold:{hold.key}"] and keys(db1) == []

        _swap_in(url_file, db1 + "\n")  # the Secret was rotated; config.yaml is as it was
        assert await polls(watcher) == [False, True]  # applied once two polls read the same
        assert seen == ["applied"] and svc.holds.kind == "redis" and [h.key for h in svc.holds.held()] == [hold.key]
        await svc.reloads_settled()
        await svc.holds.flush()
        assert keys(db0) == [] and keys(db1) == [f"baton:hold:{hold.key}"]
        assert svc.debug_state()["holdStore"] == {"kind": "redis", "healthy": True, "redis": db1}

        _swap_in(url_file, "not-a-url")  # a bad rotation: refused, the running store and its holds stay
        assert await polls(watcher) == [False, True]  # handed to the service, which keeps its store
        assert seen == ["applied", "rejected"] and keys(db1) == [f"baton:hold:{hold.key}"]
        rotated_store = svc.holds

        url_file.unlink()  # the key removed from the Secret: refused the same way
        assert await polls(watcher) == [False, True]
        assert seen == ["applied", "rejected", "rejected"] and svc.holds is rotated_store
        assert svc.debug_state()["holdStore"]["redis"] == db1

        svc.decode["d1:1"].active = 0  # decode frees up: the held request resumes and ends
        svc.decode_queue.notify()
        reply = await asyncio.wait_for(held, 3)
        assert reply.status == 200
        await svc.holds.flush()
        assert keys(db1) == [] and len(svc.holds) == 0
        await svc.stop()

    run(main())


def test_a_store_that_cannot_be_built_keeps_the_running_one_and_the_reload_is_rejected(monkeypatch, caplog):
    def no_redis(*args, **kwargs):
        raise RuntimeError("degradation.store is 'redis' but the 'redis' package is not installed")

    async def main():
        full = "backpressure: {maxActivePerDecodeReplica: 1}\n"
        svc, _ = make(full, decode=("d1:1",))
        seen = reloads(svc)
        svc.decode["d1:1"].active = 1
        task = asyncio.create_task(svc.complete("completions", long_request(), {}))
        await asyncio.sleep(0.05)
        store = svc.holds
        with caplog.at_level(logging.ERROR, logger="baton.scheduler"):
            monkeypatch.setattr(service_module, "make_hold_store", no_redis)
            svc.apply_config(parse_config(BASE + full + "degradation: {store: redis, redisUrl: 'redis://r:6379'}\n"))
            monkeypatch.undo()
            # a redis URL from a variable that is not set is refused the same way
            svc.apply_config(parse_config(BASE + full + "degradation: {store: redis, redisUrlEnv: BATON_NO_SUCH}\n"))
        assert seen == ["rejected", "rejected"]
        assert svc.holds is store and len(store) == 1
        assert caplog.text.count("event=config_reload_failed field=degradation.store") == 2
        assert "package is not installed" in caplog.text and "BATON_NO_SUCH" in caplog.text
        svc.decode["d1:1"].active = 0
        svc.decode_queue.notify()
        assert (await asyncio.wait_for(task, 2)).status == 200
        assert len(store) == 0
        await svc.stop()

    run(main())


class SlowRedis:
    """A redis client over a dict per URL (`servers`) whose pipelines take `delay` seconds to answer."""

    servers: dict[str, dict[str, str]] = {}

    def __init__(self, url: str, delay: float) -> None:
        self.db = self.servers.setdefault(url, {})
        self.delay = delay

    def pipeline(self, transaction: bool = False) -> SlowRedis._Pipe:
        return SlowRedis._Pipe(self)

    async def aclose(self) -> None:
        pass

    class _Pipe:
        def __init__(self, client: SlowRedis) -> None:
            self.client = client
            self.ops: list[tuple[str, str, str]] = []

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return False

        def set(self, key, value, px):
            self.ops.append(("set", key, value))

        def delete(self, key):
            self.ops.append(("del", key, ""))

        async def execute(self, raise_on_error=False):
            await asyncio.sleep(self.client.delay)
            for op, key, value in self.ops:
                if op == "set":
                    self.client.db[key] = value
                else:
                    self.client.db.pop(key, None)
            return [True] * len(self.ops)


def test_two_quick_store_changes_back_to_the_same_redis_keep_the_held_requests_published(monkeypatch):
    """A -> memory -> A again, the second reload before the first retirement's deletes reached A: they must
    land before the new store publishes the moved holds in A, or they delete its keys."""
    clients: list[SlowRedis] = []

    def client(url, timeout, max_connections):
        clients.append(SlowRedis(url, 0.3 if not clients else 0.0))  # the first store's redis is slow
        return clients[-1]

    SlowRedis.servers.clear()
    monkeypatch.setattr(holds_module, "_redis_client", client)
    full = "backpressure: {maxActivePerDecodeReplica: 1}\n"
    to_redis = full + "degradation: {store: redis, redisUrl: 'redis://a:6379/0'}\n"

    async def main():
        svc, _ = make(to_redis, decode=("d1:1",))
        seen = reloads(svc)
        task = await held_request(svc, "held-1")
        await svc.holds.flush()
        (hold,) = svc.holds.held()
        key = f"baton:hold:{hold.key}"
        redis_a = SlowRedis.servers["redis://a:6379/0"]
        assert list(redis_a) == [key]

        svc.apply_config(parse_config(BASE + full))  # redis A -> memory: deleting the key in A takes a while
        await asyncio.sleep(0.01)
        svc.apply_config(parse_config(BASE + to_redis))  # memory -> a new store on redis A
        await svc.reloads_settled()
        await svc.holds.flush()
        assert seen == ["applied", "applied"] and len(clients) == 2
        assert [h.key for h in svc.holds.held()] == [hold.key]
        assert list(redis_a) == [key]  # still held, still published

        svc.decode["d1:1"].active = 0
        svc.decode_queue.notify()
        assert (await asyncio.wait_for(task, 2)).status == 200
        await svc.holds.flush()
        assert redis_a == {} and len(svc.holds) == 0
        await svc.stop()

    run(main())


# ---------------------------------------------------------------------------------------------- tokenizer
class CharTokenizer(EstimateTokenizer):
    """One token per character (the estimate counts one per 4 bytes)."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source

    def count_text(self, text: str) -> int:
        return len(text)


def _counted(svc: SchedulerService) -> list[int]:
    counts: list[int] = []
    orig = svc.hooks.routed
    svc.hooks.routed = lambda route, reason, n: (counts.append(n), orig(route, reason, n))
    return counts


TEXT = json.dumps({"model": "m", "prompt": "x" * 40, "max_tokens": 2}).encode()  # 10 by the estimate, 40 by chars


def test_a_new_tokenizer_is_loaded_in_a_thread_and_counts_once_loaded(tokenizer_loader):
    loading = {"a": threading.Event(), "b": threading.Event()}
    threads: list[str] = []

    def loader(config, environ):
        threads.append(threading.current_thread().name)
        name = config.path.rsplit("/", 1)[-1]
        assert loading[name].wait(5)
        return CharTokenizer(config.path)

    tokenizer_loader(loader)

    async def main():
        svc, _ = make(prefill=(), decode=("d1:1",))
        seen, counted = reloads(svc), _counted(svc)
        svc.apply_config(parse_config(BASE + "tokenizer: {path: /models/a}\n"))
        await asyncio.sleep(0.05)
        assert seen == []  # counted when the load ends
        assert (await svc.complete("completions", TEXT, {})).status == 200  # meanwhile: the estimate
        # another reload names another tokenizer before the first is loaded: the first load is dropped
        svc.apply_config(parse_config(BASE + "tokenizer: {path: /models/b}\n"))
        loading["b"].set()
        await asyncio.sleep(0.1)
        assert tokens.active_tokenizer().source == "/models/b"
        loading["a"].set()
        await svc.reloads_settled()
        assert tokens.active_tokenizer().source == "/models/b" and seen == ["applied", "applied"]
        assert (await svc.complete("completions", TEXT, {})).status == 200
        assert counted == [10, 40]
        assert threading.main_thread().name not in threads
        # back to the estimate
        svc.apply_config(parse_config(BASE))
        await svc.reloads_settled()
        assert tokens.active_tokenizer() is None and seen == ["applied"] * 3
        await svc.stop()

    run(main())


def test_a_tokenizer_that_cannot_be_loaded_keeps_the_running_one(caplog, tokenizer_loader):
    running = CharTokenizer("/models/a")
    tried: list[str] = []

    def loader(config, environ):
        tried.append(config.path)
        raise TokenizerError(f"cannot read {config.path}/tokenizer.json: No such file or directory")

    tokenizer_loader(loader)

    async def main():
        tokens.set_tokenizer(running)  # what the scheduler loaded at start for tokenizer.path /models/a
        svc, _ = make("tokenizer: {path: /models/a}\n", prefill=(), decode=("d1:1",))
        seen, counted = reloads(svc), _counted(svc)
        with caplog.at_level(logging.ERROR, logger="baton.scheduler"):
            svc.apply_config(parse_config(BASE + "tokenizer: {path: /missing}\n"))
            await svc.reloads_settled()
        assert seen == ["rejected"] and tokens.active_tokenizer() is running
        assert "event=config_reload_failed field=tokenizer" in caplog.text and "/missing/tokenizer.json" in caplog.text
        assert (await svc.complete("completions", TEXT, {})).status == 200 and counted == [40]
        # the next reload still naming it tries again; one going back to the running tokenizer loads nothing
        svc.apply_config(parse_config(BASE + "tokenizer: {path: /missing}\nqueue: {maxDepth: 5}\n"))
        await svc.reloads_settled()
        svc.apply_config(parse_config(BASE + "tokenizer: {path: /models/a}\n"))
        await svc.reloads_settled()
        assert tried == ["/missing", "/missing"] and seen == ["rejected", "rejected", "applied"]
        assert tokens.active_tokenizer() is running
        await svc.stop()

    run(main())


def test_stop_does_not_wait_for_a_tokenizer_load(tokenizer_loader):
    release = threading.Event()

    def loader(config, environ):
        release.wait(5)
        return CharTokenizer(config.path)

    tokenizer_loader(loader)

    async def main():
        svc, _ = make(prefill=(), decode=("d1:1",))
        seen = reloads(svc)
        svc.apply_config(parse_config(BASE + "tokenizer: {path: /models/slow}\n"))
        await asyncio.sleep(0.02)
        await asyncio.wait_for(svc.stop(), 1)
        assert seen == [] and tokens.active_tokenizer() is None
        release.set()

    run(main())


def test_a_tokenizer_load_under_way_does_not_hold_up_the_process_exit(tokenizer_loader):
    """`asyncio.run` joins the loop's default executor at exit, without a timeout: the load must not run there."""
    release = threading.Event()

    def loader(config, environ):  # a download that takes its time
        release.wait(5)
        return CharTokenizer(config.path)

    tokenizer_loader(loader)

    async def main():
        svc, _ = make(prefill=(), decode=("d1:1",))
        svc.apply_config(parse_config(BASE + "tokenizer: {path: /models/slow}\n"))
        await asyncio.sleep(0.05)
        await svc.stop()

    t0 = time.monotonic()
    try:
        run(main())
        elapsed = time.monotonic() - t0
    finally:
        release.set()
    assert elapsed < 2, f"asyncio.run returned after {elapsed:.1f}s"
    assert tokens.active_tokenizer() is None


# ---------------------------------------------------------------------------------------------- counting
def test_a_discovery_that_cannot_be_built_is_a_rejected_reload_counted_once(monkeypatch, caplog, tokenizer_loader):
    tokenizer_loader(lambda config, environ: CharTokenizer(config.path))
    refuse = [True]
    real = service_module.make_discovery

    def make_discovery(config, on_update, loop):
        if refuse[0]:
            raise RuntimeError("Service host/port is not set")  # e.g. no Kubernetes credentials
        return real(config, on_update, loop)

    monkeypatch.setattr(service_module, "make_discovery", make_discovery)
    static = "endpoints: {static: {decode: ['%s:1']}}\n"

    async def main():
        svc = SchedulerService(parse_config(BASE + static % "d1"))  # with its discovery (static lists)
        refuse[0] = False
        await svc.start()
        refuse[0] = True
        assert list(svc.decode) == ["d1:1"]
        seen = reloads(svc)
        changed = BASE + static % "d2" + "tokenizer: {path: /models/a}\n"
        with caplog.at_level(logging.ERROR, logger="baton.scheduler"):
            svc.apply_config(parse_config(changed))  # a tokenizer load starts too
            await svc.reloads_settled()
        assert seen == ["rejected"]  # once, when the load ended (not "applied")
        assert "event=config_reload_failed field=endpoints" in caplog.text and "Service host" in caplog.text
        assert list(svc.decode) == ["d1:1"]  # the running discovery goes on
        assert tokens.active_tokenizer().source == "/models/a"  # the rest of the reload applied
        refuse[0] = False
        svc.apply_config(parse_config(changed + "queue: {maxDepth: 5}\n"))  # the next reload tries again
        assert list(svc.decode) == ["d2:1"] and seen == ["rejected", "applied"]
        await svc.stop()

    run(main())


def test_a_reload_to_kubernetes_discovery_without_credentials_is_rejected_and_keeps_the_running_one(
        monkeypatch, tmp_path, caplog):
    """No in-cluster service account and no kubeconfig: the new discovery could only fail in its watch
    threads forever, so the reload is refused up front and the running discovery goes on."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))

    async def main():
        svc = SchedulerService(parse_config(BASE + "endpoints: {static: {decode: ['d1:1']}}\n"), engine=Engine())
        await svc.start()
        seen = reloads(svc)
        with caplog.at_level(logging.ERROR, logger="baton.scheduler"):
            svc.apply_config(parse_config(BASE + "endpoints: {discovery: kubernetes, kubernetes: "
                                          "{namespace: ns, prefillService: p, decodeService: d}}\n"))
            await svc.reloads_settled()
        assert seen == ["rejected"]
        assert "event=config_reload_failed field=endpoints discovery=kubernetes" in caplog.text
        assert list(svc.decode) == ["d1:1"]  # still served from the running (static) discovery
        assert type(svc._discovery).__name__ == "StaticDiscovery"
        await svc.stop()

    run(main())


def test_a_reload_that_raises_is_counted_once_and_starts_no_tokenizer_load(monkeypatch, tokenizer_loader):
    loaded: list[str] = []
    tokenizer_loader(lambda config, environ: loaded.append(config.path) or CharTokenizer(config.path))

    async def main():
        svc, _ = make(prefill=(), decode=("d1:1",))
        seen = reloads(svc)

        def broken(*args):
            raise KeyError("a bug")

        monkeypatch.setattr(service_module, "build_rings", broken)  # a ring size change fails, after the rest
        with pytest.raises(KeyError):  # the config watcher logs it (event=config_reload_failed)
            svc.apply_config(parse_config(BASE.replace("100}", "100, ringSize: 3}") + "tokenizer: {path: /models/a}\n"))
        await svc.reloads_settled()
        assert seen == ["rejected"] and loaded == [] and tokens.active_tokenizer() is None
        await svc.stop()

    run(main())
