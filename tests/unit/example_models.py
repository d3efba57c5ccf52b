"""The examples/ resources as DisaggregatedModel objects, with fields overridden for a test."""

from __future__ import annotations

from pathlib import Path

import yaml

from baton.api.v1alpha1 import DisaggregatedModel

REPO = Path(__file__).resolve().parents[2]


def example_model(example: str, **spec_overrides) -> DisaggregatedModel:
    """examples/`example` with spec fields set: `decode__port=8001` sets spec.decode.port."""
    data = yaml.safe_load((REPO / "examples" / example).read_text())
    for path, value in spec_overrides.items():
        node = data["spec"]
        keys = path.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return DisaggregatedModel.model_validate(data)
