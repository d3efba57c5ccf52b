"""Is what Baton wants already in the cluster? A pure comparison, so a resync with nothing changed
makes no write at all.

The live object is a superset of what Baton rendered (the API server adds defaults, status and
metadata), so the question is whether every field Baton sets has the value Baton wants. Quantities
are compared by value: the API server canonicalises them ("1000m" comes back as "1").
"""

from __future__ import annotations

from typing import Any

from baton.api.units import parse_quantity

# Server-managed metadata that never counts as drift.
_IGNORED_METADATA = {"resourceVersion", "uid", "generation", "creationTimestamp", "managedFields"}


def _same_scalar(want: Any, have: Any) -> bool:
    if want == have:
        return True
    if isinstance(want, (str, int, float)) and isinstance(have, (str, int, float)) and not isinstance(want, bool):
        try:
            return parse_quantity(want) == parse_quantity(have)
        except (ValueError, ArithmeticError):
            return False
    return False


def _is_zero(value: Any) -> bool:
    return value is None or value is False or value in ({}, [], "", 0)


def contains(want: Any, have: Any) -> bool:
    """True when every field in `want` is present in `have` with an equal value (lists item by item)."""
    if isinstance(want, dict):
        if not isinstance(have, dict):
            return False
        # The API server drops zero values of omitempty fields ({} [] "" false 0), so those match absence.
        return all(contains(v, have[k]) if k in have else _is_zero(v) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(want) == len(have) and all(contains(w, h) for w, h in zip(want, have))
    return _same_scalar(want, have)


def in_sync(desired: dict[str, Any], live: dict[str, Any] | None) -> bool:
    """Whether `live` already carries everything `desired` renders (labels, owner, spec/data/rules)."""
    if live is None:
        return False
    want = {k: v for k, v in desired.items() if k not in ("apiVersion", "kind", "status")}
    want["metadata"] = {k: v for k, v in desired["metadata"].items() if k not in _IGNORED_METADATA}
    return contains(want, live)
