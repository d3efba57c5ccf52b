"""What kopf keeps per watched object, cut down to what Baton's handlers use.

Baton registers only event handlers (`kopf.on.event`): one starts or wakes a model's reconcile loop,
the others refresh the child cache. kopf's machinery for change handlers and daemons still runs on
every event of every watched object, and at a thousand models that is 13,000 objects:

- a per-object record (`ResourceMemory`: memo, error throttler, daemon and indexing state, ~0.7 KB
  with its key), kept until the object is deleted. `ModelMemories` keeps it for DisaggregatedModels
  and makes it per event for the children, which outnumber models twelve to one;
- a "diff base": a deep copy of the whole object on every event, compared with the copy stored on
  the object at the last change-handler run. Without change handlers nothing reads it; `NoDiffBase`
  returns an empty one and stores nothing.

Both rely on there being no change, resume, timer or daemon handlers; a test keeps that true.
kopf takes the memories container as `kopf.operator(memories=...)`, and its class lives in a private
module: kopf is pinned to a minor version (pyproject.toml) and tests run against the installed kopf.
"""

from __future__ import annotations

from typing import Any

import kopf
from kopf._core.reactor import inventory

from baton.api.v1alpha1 import KIND


class ModelMemories(inventory.ResourceMemories):
    """kopf's per-object memories, kept for DisaggregatedModels only."""

    async def recall(self, raw_body: Any, *, memobase: Any = None, noticed_by_listing: bool = False,
                     ephemeral: bool = False) -> inventory.ResourceMemory:
        return await super().recall(raw_body, memobase=memobase, noticed_by_listing=noticed_by_listing,
                                    ephemeral=ephemeral or raw_body.get("kind") != KIND)

    def __len__(self) -> int:
        return len(self._items)


class NoDiffBase(kopf.DiffBaseStorage):
    """A diff base for an operator without change handlers: always empty, never stored."""

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        return {}

    def fetch(self, *, body: Any) -> Any:
        return {}

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        return None
