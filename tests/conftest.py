from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest
from redis_harness import RedisServer

pytest_plugins = ["cluster_plugin"]


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (a CI job's timeout, `kill`) and SIGHUP end the session as Ctrl-C does: pytest then tears its
    fixtures down, so the local cluster, redis-server and engine processes it started do not outlive it."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server on loopback for the session; tests flush what they wrote."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()
