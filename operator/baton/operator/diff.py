"""Is what Baton wants already in the cluster? A pure comparison, so a resync with nothing changed
makes no write at all.

The live object is a superset of what Baton rendered (the API server adds defaults, status and
metadata, and other field managers may add items to merged lists), so the question is whether every
field Baton sets has the value Baton wants. Resource quantities are compared by value: the API server
canonicalises them ("1000m" comes back as "1").

Being a superset cannot tell that Baton stopped setting a field (a nodeSelector key, a limit, a volume
dropped from the spec): the live object still has it, and Baton's apply, which would remove it, would
never be sent. So every child carries a digest of what Baton rendered for it (`stamp`); when the
rendering changes, even by losing a field, the live object's digest differs and the child is applied,
and server-side apply removes the fields Baton no longer sets.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from baton.api.units import parse_quantity
from baton.render.naming import ANNOTATION_RENDERED

# Server-managed metadata that never counts as drift.
_IGNORED_METADATA = {"resourceVersion", "uid", "generation", "creationTimestamp", "managedFields"}


# Where values are resource quantities, which the API server canonicalises: the maps under these keys
# (resources' requests and limits) and these fields (an emptyDir's sizeLimit). Anywhere else "1.10" and
# "1.1" (a label, an env value) are different values.
_QUANTITY_MAPS = {"requests", "limits"}
_QUANTITY_FIELDS = {"sizeLimit"}


def _same_scalar(want: Any, have: Any, quantity: bool = False) -> bool:
    if want == have:
        return True
    if quantity and isinstance(want, (str, int, float)) and isinstance(have, (str, int, float)) and not isinstance(want, bool):
        try:
            return parse_quantity(want) == parse_quantity(have)
        except (ValueError, ArithmeticError):
            return False
    return False


def _is_zero(value: Any) -> bool:
    return value is None or value is False or value in ({}, [], "", 0)


# Lists the API server merges item by item under server-side apply (list-type map: containers by name,
# env by name, ports by number, ...). An item another field manager added to one (a mutating webhook's
# sidecar or env entry, a `kubectl edit`) stays whatever Baton applies, so it is not drift: every item
# Baton wants must be there, in any order, and others may be too. Every other list is atomic: Baton's
# apply replaces it whole, so it must be exactly what Baton wants.
_MAP_LISTS = {"containers", "initContainers", "env", "volumes", "volumeMounts", "ports", "imagePullSecrets"}


def _contains_items(want: list[Any], have: list[Any]) -> bool:
    """Each wanted item is contained in its own item of `have` (matched greedily, in any order)."""
    unused = list(have)
    for w in want:
        match = next((i for i, h in enumerate(unused) if contains(w, h)), None)
        if match is None:
            return False
        unused.pop(match)
    return True


def contains(want: Any, have: Any, key: str = "", quantities: bool = False) -> bool:
    """True when every field in `want` is present in `have` with an equal value (lists item by item; the
    items of a merged list, `key` in `_MAP_LISTS`, in any order and among others; quantities by value
    where the values are quantities)."""
    if isinstance(want, dict):
        if not isinstance(have, dict):
            return False
        inner = key in _QUANTITY_MAPS
        # The API server drops zero values of omitempty fields ({} [] "" false 0), so those match absence.
        return all(contains(v, have[k], k, inner) if k in have else _is_zero(v) for k, v in want.items())
    if isinstance(want, list):
        if not isinstance(have, list):
            return False
        if key in _MAP_LISTS and all(isinstance(w, dict) for w in want):
            return _contains_items(want, have)
        return len(want) == len(have) and all(contains(w, h) for w, h in zip(want, have))
    return _same_scalar(want, have, quantities or key in _QUANTITY_FIELDS)


def in_sync(desired: dict[str, Any], live: dict[str, Any] | None) -> bool:
    """Whether `live` already carries everything `desired` renders (labels, owner, spec/data/rules)."""
    if live is None:
        return False
    want = {k: v for k, v in desired.items() if k not in ("apiVersion", "kind", "status")}
    want["metadata"] = {k: v for k, v in desired["metadata"].items() if k not in _IGNORED_METADATA}
    return contains(want, live)


def stamp(desired: dict[str, Any]) -> dict[str, Any]:
    """`desired` with the digest of its own rendering in an annotation (see the module's docstring)."""
    meta = desired["metadata"]
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != ANNOTATION_RENDERED}
    bare = {**desired, "metadata": {**meta, "annotations": annotations}}
    digest = hashlib.sha256(json.dumps(bare, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    return {**desired, "metadata": {**meta, "annotations": {**annotations, ANNOTATION_RENDERED: digest}}}
