"""Keep the operator running when one watched namespace stops letting it watch.

In namespace mode the operator's rights in each namespace come from a Role there. Deleting a watched
namespace deletes that Role while the namespace terminates, and the next list or watch of it is
refused (403). kopf lets that error end the namespace's watch stream, and a watch stream that ends
stops the whole operator; restarted, it is refused again at once and crash-loops, so every other
namespace goes unserved as well.

`install()` wraps kopf's `infinite_watch` (the generator each watch stream reads from) so that a 403
in one namespace is logged as a warning and the stream tries again, with a growing delay, until the
namespace is watchable again (the Role is back) or it is removed from the operator's namespaces. A
cluster-wide stream refused is still fatal: that is a missing ClusterRole, not a namespace going away.
If a kopf release changes that function, `install()` reports it and kopf's own behaviour stays; a unit
test pins the supported kopf versions.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

log = logging.getLogger("baton.operator")

# Delay before watching a refused namespace again: doubling from the first to the last.
RETRY_FIRST_SECONDS = 5.0
RETRY_MAX_SECONDS = 300.0


Stream = Callable[..., AsyncIterator[Any]]


def tolerate_forbidden(original: Stream, forbidden: type[Exception]) -> Stream:
    """`original` (kopf's infinite_watch), retried after `forbidden` in a namespace instead of ending."""

    @functools.wraps(original)
    async def infinite_watch(*, resource: Any, namespace: str | None, **kwargs: Any) -> AsyncIterator[Any]:
        delay = RETRY_FIRST_SECONDS
        while True:
            try:
                async for event in original(resource=resource, namespace=namespace, **kwargs):
                    delay = RETRY_FIRST_SECONDS  # watching again
                    yield event
                return
            except forbidden as exc:
                if namespace is None:
                    raise
                log.warning("watching %s in namespace %s is forbidden (%s): its Role is gone, as when the namespace "
                            "is being deleted. The operator keeps serving its other namespaces and tries again in "
                            "%.0fs; remove %s from watch.namespaces if it is going away", resource, namespace,
                            getattr(exc, "message", None) or exc, delay, namespace)
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX_SECONDS, delay * 2)

    return infinite_watch


def install() -> bool:
    """Wrap kopf's watch stream before the operator starts; returns whether the wrapper is in place."""
    try:
        from kopf._cogs.clients import errors, watching
    except ImportError:
        log.warning("this kopf release has no watch stream to wrap: a namespace refusing it stops the operator")
        return False
    if not getattr(watching.infinite_watch, "baton_guarded", False):
        watching.infinite_watch = tolerate_forbidden(watching.infinite_watch, errors.APIForbiddenError)
        watching.infinite_watch.baton_guarded = True  # type: ignore[attr-defined]
    return True
