"""The examples/ resources as DisaggregatedModel objects, with fields overridden for a test."""

from __future__ import annotations

from pathlib import Path

import yaml

from baton.api.v1alpha1 import DisaggregatedModel
from spec_fields import set_spec_fields

REPO = Path(__file__).resolve().parents[2]


def example_model(example: str, **spec_overrides) -> DisaggregatedModel:
    """examples/`example` with spec fields set: `decode__port=8001` sets spec.decode.port."""
    data = yaml.safe_load((REPO / "examples" / example).read_text())
    set_spec_fields(data["spec"], spec_overrides)
    return DisaggregatedModel.model_validate(data)
