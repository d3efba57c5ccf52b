"""Setting nested spec fields from keyword arguments, as the tests spell them: `decode__port=8001`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def set_spec_fields(spec: dict[str, Any], fields: Mapping[str, Any]) -> None:
    """Set each `a__b__c=value` of `fields` in `spec` (spec["a"]["b"]["c"] = value), making the maps on the way."""
    for path, value in fields.items():
        node = spec
        keys = path.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
