"""Degradation holds: the in-memory store with a fake clock, and the redis store against a real redis-server
(running, stopped, hung, and coming back)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from redis_harness import RedisServer, SilentServer, free_port

from baton.scheduler.config import ConfigError, DegradationConfig
from baton.scheduler.holds import Hold, MemoryHoldStore, RedisHoldStore, hold_key, make_hold_store


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def test_memory_store_expires_by_clock():
    clock = Clock()
    store = MemoryHoldStore(clock)

    async def main():
        await store.put(Hold("r1", "p:1", {"ctx_request_id": 1}, 0.0, 10.0))
        await store.put(Hold("r2", "p:1", {"ctx_request_id": 2}, 0.0, 20.0))
        assert len(store) == 2
        assert (await store.get("r1")).handle == {"ctx_request_id": 1}
        clock.now = 15
        assert await store.get("r1") is None
        gone = await store.expired()
        assert [h.request_id for h in gone] == ["r1"]
        assert len(store) == 1
        assert (await store.remove("r2")).request_id == "r2"
        assert await store.remove("r2") is None

    asyncio.run(main())


def test_holds_of_one_request_id_are_kept_and_removed_apart():
    store = MemoryHoldStore(Clock())
    a, b = (Hold("dup", "p:1", {"ctx_request_id": n}, 0.0, 10.0, key=hold_key("dup")) for n in (1, 2))
    assert a.key != b.key and a.key.startswith("dup#") and len(a.key) == len("dup#") + 16

    async def main():
        await store.put(a)
        await store.put(b)
        assert len(store) == 2
        assert (await store.remove(a.key)).handle == {"ctx_request_id": 1}
        assert (await store.get(b.key)).handle == {"ctx_request_id": 2}  # the other one is still held
        assert await store.remove(a.key) is None

    asyncio.run(main())


def test_a_shortened_hold_ends_by_the_new_ttl_counted_from_its_creation():
    clock = Clock()
    store = MemoryHoldStore(clock)

    async def main():
        await store.put(Hold("r1", "p:1", {"ctx_request_id": 1}, 2.0, 32.0))
        assert not store.shorten("r1", 40.0)  # a longer TTL leaves it be
        assert store.shorten("r1", 5.0) and (await store.get("r1")).expires == 7.0
        assert not store.shorten("r1", 6.0) and not store.shorten("unknown", 1.0)
        clock.now = 7.0
        assert [h.request_id for h in await store.expired()] == ["r1"]

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------- redis
def _keys(server: RedisServer) -> list[str]:
    with server.client() as c:
        return sorted(k.decode() for k in c.keys("baton:hold:*"))


@pytest.fixture
def redis(redis_server: RedisServer):
    with redis_server.client() as c:
        c.flushdb()
    yield redis_server
    with redis_server.client() as c:
        c.flushdb()


def _hold(rid: str, expires_in: float, now: float = 0.0) -> Hold:
    return Hold(rid, "127.64.0.7:8000", {"ctx_request_id": 41, "encoded_opaque_state": "abc"}, now, now + expires_in,
                ("127.64.0.8:8000", "127.64.0.9:8000"))


def test_redis_store_publishes_each_hold_with_its_ttl_and_deletes_it_on_remove(redis):
    clock = Clock()
    errors: list[str] = []
    store = RedisHoldStore(redis.url, clock, on_error=errors.append)

    async def main():
        await store.put(_hold("r1", 30.0))
        await store.flush()
        with redis.client() as c:
            assert 29_000 < c.pttl("baton:hold:r1") <= 30_000
            published = json.loads(c.get("baton:hold:r1"))
        # times are wall-clock epoch seconds (other replicas read them), not the store's (monotonic) clock
        created, expires = published.pop("created"), published.pop("expires")
        assert abs(created - time.time()) < 5 and expires - created == pytest.approx(30.0)
        assert published == {"request_id": "r1", "key": "r1", "prefill": "127.64.0.7:8000",
                             "handle": {"ctx_request_id": 41, "encoded_opaque_state": "abc"},
                             "ring": ["127.64.0.8:8000", "127.64.0.9:8000"]}
        assert (await store.get("r1")).created == 0.0  # in memory the hold keeps the store's clock
        assert len(store) == 1 and (await store.get("r1")).ring == ("127.64.0.8:8000", "127.64.0.9:8000")
        assert (await store.remove("r1")).request_id == "r1"
        await store.flush()
        assert _keys(redis) == [] and len(store) == 0
        assert store.healthy() and store.writes == 2 and errors == []
        await store.close()

    asyncio.run(main())


def test_redis_store_publishes_a_shortened_hold_again_with_its_shorter_ttl(redis):
    clock = Clock()
    store = RedisHoldStore(redis.url, clock)

    async def main():
        await store.put(_hold("r1", 30.0))
        await store.flush()
        clock.now = 1.0  # a second after it was held, the TTL goes down to 5 s: 4 s are left
        assert store.shorten("r1", 5.0)
        await store.flush()
        with redis.client() as c:
            assert 3_000 < c.pttl("baton:hold:r1") <= 4_000
            published = json.loads(c.get("baton:hold:r1"))
        assert published["expires"] - published["created"] == pytest.approx(5.0)
        assert not store.shorten("r1", 20.0)
        await store.flush()
        with redis.client() as c:
            assert c.pttl("baton:hold:r1") <= 4_000  # not lengthened again
        await store.close()

    asyncio.run(main())


def test_redis_expires_a_held_key_by_itself(redis):
    store = RedisHoldStore(redis.url, time.monotonic)

    async def main():
        await store.put(_hold("short", 0.3, time.monotonic()))
        await store.flush()
        assert _keys(redis) == ["baton:hold:short"]
        await asyncio.sleep(0.6)
        assert _keys(redis) == []  # nobody deleted it: the key's own expiry did
        assert [h.request_id for h in await store.expired()] == ["short"]
        assert len(store) == 0
        await store.close()

    asyncio.run(main())


def test_a_remove_right_after_its_put_never_leaves_the_key_behind(redis):
    store = RedisHoldStore(redis.url, Clock())

    async def main():
        for i in range(50):
            await store.put(_hold(f"r{i}", 60.0))
            await store.remove(f"r{i}")  # before the put's write has even started
        await store.flush()
        assert _keys(redis) == []
        assert store.writes == 100
        await store.close()

    asyncio.run(main())


def finished_at_once(coro) -> bool:
    """Whether a coroutine ends at its first step, awaiting nothing that is not ready: a check that a call
    never waits, which a slow machine cannot make fail (as a bound on elapsed time could)."""
    try:
        coro.send(None)
    except StopIteration:
        return True
    coro.close()
    return False


def test_an_unreachable_redis_costs_requests_nothing_and_holds_go_on_from_memory(tmp_path):
    clock = Clock()
    errors: list[str] = []
    store = RedisHoldStore(f"redis://127.0.0.1:{free_port()}/0", clock, timeout_s=0.2, backoff_s=30,
                           on_error=errors.append)

    async def main():
        # the request path never waits for redis: each put ends without suspending once
        assert finished_at_once(store.put(_hold("r1", 10.0))) and finished_at_once(store.put(_hold("r2", 10.0)))
        assert len(store) == 2 and (await store.get("r1")) is not None
        await store.flush()
        assert not store.healthy()
        assert errors == ["put", "put"]
        assert (await store.remove("r1")).request_id == "r1"
        clock.now = 11
        assert [h.request_id for h in await store.expired()] == ["r2"]
        await store.flush()
        assert errors == ["put", "put", "remove", "expire"] and len(store) == 0
        await store.close()

    asyncio.run(main())


def test_a_hung_redis_is_cut_off_by_the_write_timeout():
    silent = SilentServer()
    errors: list[str] = []
    store = RedisHoldStore(silent.url, Clock(), timeout_s=1.5, on_error=errors.append)

    async def main():
        await store.put(_hold("r1", 10.0))
        await asyncio.wait_for(store.flush(), 10)  # cut off at 1.5 s, not left hanging
        assert errors == ["put"] and not store.healthy()
        # within the back-off, later writes are skipped at once instead of each waiting for the timeout (1.5 s)
        await store.put(_hold("r2", 10.0))
        await store.remove("r1")
        await asyncio.wait_for(store.flush(), 1.0)
        assert errors == ["put", "put", "remove"]
        await store.close()

    try:
        asyncio.run(main())
    finally:
        silent.close()


def test_a_hung_redis_under_load_gets_one_connection_per_back_off_period():
    """Many holds a second against a redis that accepts and never answers: every write started before the first
    timeout must not open its own connection and wait its own timeout; one probe per back-off period does."""
    connections = 0
    errors: list[str] = []

    async def hung(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while await reader.read(1 << 16):
                pass
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(hung, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        store = RedisHoldStore(f"redis://127.0.0.1:{port}/0", time.monotonic, timeout_s=0.2, backoff_s=0.8,
                               on_error=errors.append)
        made = 0
        counted: dict[str, int] = {}

        async def load(seconds: float) -> None:
            nonlocal made
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for _ in range(10):  # ~1000 holds/s, each removed right after the next tick
                    now = time.monotonic()
                    rid = f"r{made}"
                    made += 1
                    # the request path never waits for redis: the put ends without suspending once
                    assert finished_at_once(store.put(Hold(rid, "p:1", {"ctx_request_id": 1}, now, now + 10)))
                    asyncio.get_running_loop().call_soon(lambda rid=rid: asyncio.ensure_future(store.remove(rid)))
                await asyncio.sleep(0.01)

        try:
            started = time.monotonic()
            await load(0.9)  # the first timeout (0.2 s) and most of the first back-off period (to 1.0 s)
            counted["first"] = connections
            await load(0.8)  # the back-off ends at ~1.0 s: one probe, its timeout, a second back-off period
            counted["second"] = connections
            assert time.monotonic() - started < 3.0
        finally:
            await store.close()
            server.close()
        assert counted["first"] < 3, counted  # one probe; before the fix ~100 (one per write in flight)
        assert counted["second"] < 5, counted
        assert not store.healthy() and len(store) == 0
        assert len(errors) == store.errors >= 2 * made - 50  # every failed or skipped write is counted

    asyncio.run(main())


def test_the_store_recovers_when_redis_comes_back(tmp_path):
    server = RedisServer(tmp_path)  # its port is known, nothing listens on it yet
    store = RedisHoldStore(server.url, Clock(), timeout_s=0.3, backoff_s=0.2)

    async def main():
        await store.put(_hold("before", 60.0))
        await store.flush()
        assert not store.healthy() and store.errors == 1
        server.start()
        await asyncio.sleep(0.3)  # past the back-off
        await store.put(_hold("after", 60.0))
        await store.flush()
        assert store.healthy()
        # "before", whose write was skipped while redis was down, is published once redis answers again
        assert _keys(server) == ["baton:hold:after", "baton:hold:before"]
        assert len(store) == 2
        await store.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_holds_skipped_while_redis_was_down_reach_it_with_no_new_hold_to_write(tmp_path):
    """Redis comes back while the holds made during its outage are still held and no request writes
    anything: the scheduler's periodic sweep (`expired`, every heartbeat) publishes them once the
    back-off has passed, with their remaining TTL."""
    server = RedisServer(tmp_path)
    clock = Clock()
    store = RedisHoldStore(server.url, clock, timeout_s=0.3, backoff_s=0.2)

    async def main():
        await store.put(_hold("a", 60.0))
        await store.put(_hold("b", 60.0))
        await store.flush()
        assert not store.healthy() and store.errors == 2
        server.start()
        await store.expired()  # within the back-off: nothing is tried
        await store.flush()
        assert not store.healthy() and _keys(server) == []
        await asyncio.sleep(0.3)
        clock.now = 20.0
        await store.expired()
        await store.flush()
        assert store.healthy() and _keys(server) == ["baton:hold:a", "baton:hold:b"]
        with server.client() as c:
            ttl_ms = c.pttl("baton:hold:a")
        assert 35_000 < ttl_ms <= 40_000  # what is left of the hold's 60 s, not a fresh 60 s
        await store.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_redis_url_from_the_environment_and_clear_errors():
    config = DegradationConfig(store="redis", redis_url_env="BATON_REDIS_URL")
    assert config.resolved_redis_url({"BATON_REDIS_URL": "redis://r:6379/1"}) == "redis://r:6379/1"
    with pytest.raises(ConfigError, match="BATON_REDIS_URL holds no URL: it is unset or empty"):
        config.resolved_redis_url({})
    with pytest.raises(ConfigError, match="must start with redis://"):
        config.resolved_redis_url({"BATON_REDIS_URL": "http://r:6379"})
    with pytest.raises(ValueError, match="redisUrl .or redisUrlFile, or redisUrlEnv. is required"):
        DegradationConfig(store="redis")
    with pytest.raises(ValueError, match="must start with redis://"):
        DegradationConfig(store="redis", redis_url="localhost:6379")
    with pytest.raises(ValueError, match="set one of redisUrl, redisUrlFile and redisUrlEnv, not redisUrl and redisUrlEnv"):
        DegradationConfig(store="redis", redis_url="redis://r:6379", redis_url_env="BATON_REDIS_URL")


def test_redis_url_from_a_file_is_read_each_time_and_errors_never_show_the_url(tmp_path):
    url_file = tmp_path / "url"
    config = DegradationConfig(store="redis", redis_url_file=str(url_file))
    with pytest.raises(ConfigError, match=f"redisUrlFile {url_file} is unreadable .*redisUrlSecret"):
        config.resolved_redis_url({})
    url_file.write_text("redis://:secret-pw@r:6379/1\n")  # as a Secret's value often ends: with a newline
    assert config.resolved_redis_url({}) == "redis://:secret-pw@r:6379/1"
    url_file.write_text("redis://:rotated-pw@r2:6379/1")  # the kubelet updated the mounted Secret
    assert config.resolved_redis_url({}) == "redis://:rotated-pw@r2:6379/1"
    url_file.write_text("  \n")
    with pytest.raises(ConfigError, match="holds no URL"):
        config.resolved_redis_url({})
    url_file.write_text("http://:secret-pw@r:6379")
    with pytest.raises(ConfigError, match="must start with redis://") as raised:
        config.resolved_redis_url({})
    assert "secret-pw" not in str(raised.value)


def test_redis_store_without_package_explains(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_redis(name, *args, **kwargs):
        if name.startswith("redis"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_redis)
    with pytest.raises(RuntimeError, match=r"pip install 'baton\[redis\]'"):
        make_hold_store("redis", "redis://localhost:6379")
    assert isinstance(make_hold_store("memory"), MemoryHoldStore)


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cret@redis.infra:6379/2", "redis://:***@redis.infra:6379/2"),
    ("rediss://baton:s3cret@redis.infra:6380/0?ssl_cert_reqs=required", "rediss://baton:***@redis.infra:6380/0?ssl_cert_reqs=required"),
    ("redis://redis.infra:6379/0", "redis://redis.infra:6379/0"),
    ("unix:///run/redis.sock?db=1", "unix:///run/redis.sock?db=1"),
    ("unix:///run/redis.sock?db=1&password=s3cret", "unix:///run/redis.sock?db=1&password=***"),
    ("redis://redis.infra:6379/0?Password=s3cret&client_name=b", "redis://redis.infra:6379/0?Password=***&client_name=b"),
    ("redis://u:s3/cr@et@redis.infra:6379/0", "redis://u:***@redis.infra:6379/0"),  # unescaped / and @
    ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
    ("redis://:s3cret@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
])
def test_a_redis_url_is_shown_without_its_password(url, shown):
    from baton.scheduler.holds import redacted_redis_url

    assert redacted_redis_url(url) == shown


def test_an_unparseable_redis_url_is_refused_without_quoting_it():
    from baton.scheduler.holds import make_hold_store

    with pytest.raises(RuntimeError, match="cannot be parsed: percent-encode") as raised:
        make_hold_store("redis", "redis://:xyzzy/plugh@r:6379/0")  # an unescaped / in the password
    assert "xyzzy" not in str(raised.value) and "plugh" not in str(raised.value)


def test_a_redis_that_refuses_every_write_is_unhealthy_and_the_holds_reach_it_once_it_takes_writes(tmp_path):
    """A reachable Redis that answers each write with an error (out of memory under noeviction, a replica
    gone READONLY) keeps no record, as an unreachable one does: the store says it is unhealthy, and what was
    held meanwhile is published once Redis takes writes again."""
    server = RedisServer(tmp_path).start()
    clock = Clock()
    store = RedisHoldStore(server.url, clock, backoff_s=0.2)

    async def main():
        await store.put(_hold("a", 60.0))
        await store.flush()
        assert store.healthy() and _keys(server) == ["baton:hold:a"]
        with server.client() as c:
            c.config_set("maxmemory-policy", "noeviction")
            c.config_set("maxmemory", "1")  # every write now: OOM command not allowed
        await store.put(_hold("b", 60.0))
        await store.put(_hold("c", 60.0))
        await store.flush()
        assert not store.healthy() and store.errors >= 1
        with server.client() as c:
            c.config_set("maxmemory", "0")
        await asyncio.sleep(0.3)  # the back-off
        await store.expired()  # the periodic sweep republishes what the record lacks
        await store.flush()
        assert store.healthy() and _keys(server) == ["baton:hold:a", "baton:hold:b", "baton:hold:c"]
        await store.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()
