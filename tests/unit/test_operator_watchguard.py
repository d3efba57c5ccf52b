"""A watched namespace that refuses the operator (its Role deleted with the namespace) must not stop it."""

from __future__ import annotations

import asyncio
import inspect
import logging

import kopf
import pytest
from kopf._cogs.clients import errors, watching
from kopf._core.reactor import queueing

from baton.operator import watchguard

RESOURCE = kopf.Resource("apps", "v1", "statefulsets", namespaced=True)


def forbidden() -> errors.APIForbiddenError:
    message = 'statefulsets.apps is forbidden: User "system:serviceaccount:baton:baton" cannot list resource'
    return errors.APIForbiddenError({"message": message, "code": 403}, status=403, headers={})


def test_the_wrapper_fits_the_installed_kopf():
    # What install() relies on: kopf's watcher reads its stream through the module attribute, by keyword.
    assert "watching.infinite_watch(" in inspect.getsource(queueing.watcher)
    parameters = inspect.signature(inspect.unwrap(watching.infinite_watch)).parameters
    assert {"settings", "resource", "namespace"} <= set(parameters)
    assert issubclass(errors.APIForbiddenError, errors.APIError)


def _stream_refused(times: int, calls: list[str | None]):
    """kopf's list-then-watch of one stream, refused (403) `times` times, then delivering one event."""

    async def continuous_watch(*, namespace, **_):
        calls.append(namespace)
        if len(calls) <= times:
            raise forbidden()
        yield {"type": "ADDED", "object": {"metadata": {"uid": "u1", "name": "m-prefill", "namespace": namespace}}}
        await asyncio.Event().wait()  # the stream stays open

    return continuous_watch


async def _watch(namespace: str | None, handled: list) -> asyncio.Task:
    """kopf's watcher of one stream, as its orchestrator runs it."""
    async def processor(*, raw_event, **_):
        handled.append(raw_event)

    return asyncio.create_task(queueing.watcher(namespace=namespace, settings=kopf.OperatorSettings(),
                                                resource=RESOURCE, processor=processor))


def test_a_namespace_that_refuses_watching_is_retried_without_stopping_the_operator(monkeypatch, caplog):
    assert watchguard.install()
    calls: list[str | None] = []
    monkeypatch.setattr(watching, "continuous_watch", _stream_refused(2, calls))
    monkeypatch.setattr(watchguard, "RETRY_FIRST_SECONDS", 0.05)
    handled: list[dict] = []

    async def scenario():
        task = await _watch("team-a", handled)
        for _ in range(100):
            if handled:
                break
            await asyncio.sleep(0.05)
        alive = not task.done()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return alive

    with caplog.at_level(logging.WARNING, logger="baton.operator"):
        alive = asyncio.run(scenario())
    # The watch stream lives on (kopf ends the operator when one ends), and once allowed again it delivers.
    assert alive and calls == ["team-a"] * 3
    assert [e["object"]["metadata"]["name"] for e in handled] == ["m-prefill"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("namespace team-a is forbidden" in w and "watch.namespaces" in w
                                      and "cannot list resource" in w for w in warnings)


def test_a_refused_cluster_wide_watch_still_stops_the_operator(monkeypatch):
    assert watchguard.install()
    monkeypatch.setattr(watching, "continuous_watch", _stream_refused(1, []))

    async def scenario():
        task = await _watch(None, [])
        await asyncio.wait_for(task, 5)

    with pytest.raises(errors.APIForbiddenError):
        asyncio.run(scenario())
