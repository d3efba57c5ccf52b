"""Whether kopf has paused this replica in favour of a peer, for the work kopf does not manage itself.

With `--peering`, a replica that sees a live peer of higher priority pauses: kopf closes its watch
streams and stops its own daemons and timers. Baton's per-model reconcile loops are plain asyncio
tasks (a daemon would put a finalizer on every model), so they must stop too, or two replicas would
reconcile the same models at once.

kopf keeps that state in a toggle set it creates inside `spawn_tasks()` and hands to its daemon
killer; it has no public accessor. `install()` wraps the daemon killer to receive the same toggle
set. If a kopf release changes that function, `install()` reports it and the gate stays open
(standalone behaviour); a unit test pins the supported kopf versions.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

log = logging.getLogger("baton.operator")


class PauseGate:
    def __init__(self) -> None:
        self._toggles: Any = None  # kopf's ToggleSet: on while the operator is paused
        self.installed = False

    def install(self) -> bool:
        """Hook into kopf before the operator starts; returns whether the hook is in place."""
        if self.installed:
            return True
        try:
            from kopf._core.engines import daemons
        except ImportError:
            log.warning("this kopf release has no daemon killer to hook; per-model loops will not pause with peering")
            return False
        original = daemons.daemon_killer

        @functools.wraps(original)
        async def daemon_killer(*args: Any, operator_paused: Any = None, **kwargs: Any) -> Any:
            self._toggles = operator_paused
            return await original(*args, operator_paused=operator_paused, **kwargs)

        daemons.daemon_killer = daemon_killer
        self.installed = True
        return True

    @property
    def paused(self) -> bool:
        return self._toggles is not None and self._toggles.is_on()

    async def wait(self, paused: bool) -> None:
        """Return once the operator is (or is no longer) paused."""
        while self._toggles is None:
            if not paused:
                return
            await asyncio.sleep(0.5)  # not known yet: kopf starts the daemon killer after startup handlers
        await self._toggles.wait_for(paused)


gate = PauseGate()
