"""YAML text for config files the operator renders into ConfigMaps, remembered by content.

PyYAML's emitter is pure Python: dumping a model's engine and scheduler configs on every reconcile pass
was a tenth of the operator's CPU while hundreds of models started. The same settings give the same
text, so the text is kept per distinct content (their JSON, which the C encoder makes cheaply), for a
bounded number of contents.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import yaml


@functools.lru_cache(maxsize=256)
def _dump(content_json: str, sort_keys: bool) -> str:
    return yaml.safe_dump(json.loads(content_json), sort_keys=sort_keys)


def dump(data: Any, sort_keys: bool) -> str:
    """`yaml.safe_dump(data, sort_keys=...)` for JSON-compatible `data` (key order kept when not sorting)."""
    return _dump(json.dumps(data, separators=(",", ":")), sort_keys)
