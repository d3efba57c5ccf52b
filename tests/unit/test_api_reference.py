"""Docs generated from, or tied to, the code: the API reference, and the operations guide's table of
condition reasons. Each fails with the command that fixes it."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from baton.api import reference
from baton.api import v1alpha1 as api

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"


def test_the_api_reference_is_generated_from_the_current_models():
    checked_in = (REPO / reference.DEFAULT_OUTPUT).read_text()
    assert checked_in == reference.render(), (
        f"{reference.DEFAULT_OUTPUT} is stale: run `python -m baton.api.reference --output {reference.DEFAULT_OUTPUT}`"
    )


def _models(model: type[BaseModel], seen: set[type[BaseModel]]) -> None:
    if model in seen:
        return
    seen.add(model)
    for field in model.model_fields.values():
        for arg in _types(field.annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                _models(arg, seen)


def _types(annotation):
    args = getattr(annotation, "__args__", None)
    if not args:
        return [annotation]
    return [t for a in args for t in _types(a)]


def test_every_field_of_every_model_is_in_the_reference():
    text = reference.render()
    models: set[type[BaseModel]] = set()
    _models(api.DisaggregatedModelSpec, models)
    _models(api.DisaggregatedModelStatus, models)
    for model in models:
        assert f"## {model.__name__}\n" in text, model.__name__
        section = text.split(f"## {model.__name__}\n", 1)[1].split("\n## ", 1)[0]
        for name, field in model.model_fields.items():
            wire = field.alias or name
            assert f"`{wire}`" in section, f"{model.__name__}.{wire}"
            if field.description:
                assert " ".join(field.description.split())[:40].replace("|", "\\|") in section, f"{model.__name__}.{wire}"


def test_the_reference_names_the_cel_rules_and_the_kubectl_surface():
    text = reference.render()
    assert "decode.allowSpot must be false" in text
    assert "model.source must set exactly one of pvc, hostPath or huggingFace" in text
    assert "| Short names | `dm` |" in text
    assert ".spec.decode.replicas" in text  # the scale subresource


def test_the_cli_writes_and_checks_the_file(tmp_path):
    out = tmp_path / "api.md"
    assert reference.main(["--output", str(out)]) == 0
    assert reference.main(["--output", str(out), "--check"]) == 0
    out.write_text("stale\n")
    assert reference.main(["--output", str(out), "--check"]) == 1


def test_the_operations_guide_explains_every_condition_reason():
    """Every reason the operator can put on a condition has a row saying what to do."""
    guide = (DOCS / "operations.md").read_text()
    sources = [REPO / "operator/baton/operator/status.py", *sorted((REPO / "operator/baton/operator").glob("rollout*.py"))]
    reasons = set()
    for source in sources:
        text = source.read_text()
        reasons |= set(re.findall(r'^REASON_\w+ = "(\w+)"', text, re.M))
        # Conditions a rollout adds: (type, status, "Reason", message).
        reasons |= set(re.findall(r'self\.problem = \(\w+, (?:True|False), "(\w+)"', text))
    assert {"InvalidSpec", "ApplyFailed", "PodsUnschedulable"} <= reasons
    missing = sorted(r for r in reasons if f"| `{r}` |" not in guide)
    assert missing == [], f"docs/operations.md has no troubleshooting row for: {missing}"


def test_relative_links_in_the_guides_resolve():
    for name in ("quickstart.md", "operations.md", "gitops.md"):
        text = (DOCS / name).read_text()
        for target in re.findall(r"\]\((?!https?://)([^)#\s]+)(?:#[^)]*)?\)", text):
            assert (DOCS / target).resolve().exists(), f"{name} links to missing {target}"
        for anchor in re.findall(r"\]\(#([^)]+)\)", text):
            headings = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.M)}
            assert anchor in headings, f"{name} links to missing section #{anchor}"
