"""The port a Baton pod serves on, read from the pod itself.

Tier and scheduler containers name their serving port `http`, and the tier Services target it by that
name, so while a tier's port changes in a rolling update each pod is reached on its own port: the one
its engine container declares, not the one the spec says now.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

PORT_NAME = "http"


def engine_container(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    """The pod's container named `engine`, else its first ({} without any)."""
    containers = (pod.get("spec") or {}).get("containers") or []
    return next((c for c in containers if c.get("name") == "engine"), containers[0] if containers else {})


def http_port(pod: Mapping[str, Any], default: int) -> int:
    """The `http` port of the pod's engine container (`engine_container`), else `default`."""
    for port in engine_container(pod).get("ports") or []:
        if port.get("name") == PORT_NAME and isinstance(port.get("containerPort"), int):
            return int(port["containerPort"])
    return default


def format_address(ip: str, port: int) -> str:
    """host:port of a pod IP, in brackets for IPv6 ([v6]:port): how the scheduler names engine replicas
    (its /metrics labels too) and how a URL takes the address."""
    try:
        if isinstance(ipaddress.ip_address(ip), ipaddress.IPv6Address):
            return f"[{ip}]:{port}"
    except ValueError:
        pass
    return f"{ip}:{port}"
