from __future__ import annotations

from collections.abc import Iterator

import pytest
from redis_harness import RedisServer

pytest_plugins = ["cluster_plugin"]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server on loopback for the session; tests flush what they wrote."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()
