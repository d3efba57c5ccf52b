"""Kubernetes-style units in the API: durations ("200ms", "2m30s") and quantities ("128Gi")."""

from __future__ import annotations

import re
from decimal import Decimal

DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+|[KMGTPE]i?|[kmunEP])?$"

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_DURATION_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str) -> float:
    """Seconds in a Go-style duration string such as "200ms", "120s" or "1h30m"."""
    if not re.fullmatch(DURATION_PATTERN, value):
        raise ValueError(f"invalid duration {value!r}: use a number with a unit, e.g. 200ms, 30s, 5m, 1h")
    return sum(float(n) * _DURATION_SECONDS[u] for n, u in _DURATION_PART.findall(value))


def parse_quantity(value: str | int | float) -> Decimal:
    """A Kubernetes resource quantity as a number ("128Gi" -> 137438953472)."""
    from kubernetes.utils import parse_quantity as k8s_parse_quantity

    try:
        return k8s_parse_quantity(value)
    except ValueError as exc:
        raise ValueError(f"invalid quantity {value!r}: use Kubernetes units, e.g. 128Gi or 137G") from exc


def quantity_or_none(value: str | int | float) -> Decimal | None:
    """`parse_quantity`, or None when `value` is not a quantity (for code that leaves that to the API server)."""
    try:
        return parse_quantity(value)
    except ValueError:
        return None
