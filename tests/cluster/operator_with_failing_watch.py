"""`baton operator ARGS...` whose ConfigMaps watch stream fails for good once the file named by
$FAIL_CONFIGMAPS_WATCH_WHEN exists: the stream gets an error event other than 410 Gone, as from an API
server in trouble. With $HANG_ON_CLEANUP set, the operator's stop never finishes either (a cleanup that
ignores cancellation), as kopf's own stop can after such a failure.

Run as a process of its own: the tests check what happens to the process (it stops, it is gone in time),
which must not take the test runner with it.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import kopf
from kopf._cogs.clients import watching

from baton import cli

FAIL_WHEN = Path(os.environ["FAIL_CONFIGMAPS_WATCH_WHEN"])
_original = watching.watch_objs


async def _watch_objs(*, resource: Any, **kwargs: Any) -> Any:
    if resource.plural == "configmaps" and FAIL_WHEN.exists():
        yield {"type": "ERROR", "object": {"kind": "Status", "code": 500, "reason": "InternalError",
                                           "message": "etcdserver: request timed out"}}
        return
    async for event in _original(resource=resource, **kwargs):
        yield event


watching.watch_objs = _watch_objs

if os.environ.get("HANG_ON_CLEANUP"):
    @kopf.on.cleanup()
    async def never_finishes(**_: Any) -> None:
        print("cleanup: hanging", flush=True)
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass


if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
