"""Generate the DisaggregatedModel CRD from the pydantic models (`baton crd`, `make crds`).

Pydantic emits JSON Schema (draft 2020-12); Kubernetes wants a structural OpenAPI v3 subset. The
conversion inlines `$ref`s, turns `Optional[X]` (anyOf X|null) into an optional X, drops titles and
null defaults, and keeps Kubernetes extensions (`x-kubernetes-*`) that the models declare.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from baton.api import v1alpha1 as api

CRD_FILE = f"{api.PLURAL}.{api.GROUP}.yaml"

PRINTER_COLUMNS = [
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
     "description": "Whether both tiers and the scheduler are serving"},
    {"name": "Prefill", "type": "string", "jsonPath": ".status.prefill.summary",
     "description": "Prefill replicas ready/desired"},
    {"name": "Decode", "type": "string", "jsonPath": ".status.decode.summary",
     "description": "Decode replicas ready/desired"},
    {"name": "Revision", "type": "string", "jsonPath": ".status.revision",
     "description": "The engine generation serving traffic (its pods' baton.dev/generation label)"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _convert(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_convert(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").split("/")[-1]])
        # keep the referencing site's description (the field's), not the model's docstring
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _convert(merged, defs)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) == 1:
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            return _convert({**options[0], **rest}, defs)
    for key in ("title", "$defs"):
        node.pop(key, None)
    if "const" in node:  # a one-value Literal; OpenAPI v3.0 has no const
        node["enum"] = [node.pop("const")]
    if node.get("default", 0) is None:
        node.pop("default")
    if node.get("x-kubernetes-preserve-unknown-fields"):
        node.pop("additionalProperties", None)
        node.setdefault("type", "object")
    if node.get("type") == "object" and "properties" in node:
        node.pop("additionalProperties", None)  # extra="forbid" -> the API server prunes unknown fields
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: _convert(schema, defs) for name, schema in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _convert(value, defs)
        else:
            out[key] = value
    if "description" in out and "properties" in out and out.get("description", "").startswith(("Base:", "The full")):
        out.pop("description")
    return out


def openapi_schema(model: type) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _convert(raw, defs)


def crd() -> dict[str, Any]:
    spec_schema = openapi_schema(api.DisaggregatedModelSpec)
    status_schema = openapi_schema(api.DisaggregatedModelStatus)
    spec_schema.pop("description", None)
    status_schema.pop("description", None)
    spec_schema["description"] = "Desired state: one model served by a prefill tier, a decode tier and Baton's scheduler."
    status_schema["description"] = "Observed state, written by the operator."
    # Conditions are a map keyed by type (kstatus and `kubectl wait --for=condition=...` rely on it).
    status_schema["properties"]["conditions"]["x-kubernetes-list-type"] = "map"
    status_schema["properties"]["conditions"]["x-kubernetes-list-map-keys"] = ["type"]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "baton", "app.kubernetes.io/part-of": "baton"},
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
                "categories": api.CATEGORIES,
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        # `kubectl scale dm/x` and autoscalers target the decode tier, the one that
                        # sizes a deployment's concurrent users; the prefill tier scales by spec.
                        "scale": {
                            "specReplicasPath": ".spec.decode.replicas",
                            "statusReplicasPath": ".status.decode.replicas",
                            "labelSelectorPath": ".status.decode.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": (
                                "DisaggregatedModel serves one LLM with TensorRT-LLM on two GPU tiers: a prefill "
                                "tier that processes prompts and a decode tier that generates tokens, with Baton's "
                                "scheduler routing requests and handing the KV cache from one to the other."
                            ),
                            "required": ["spec"],
                            # Rules on metadata (CEL reads metadata.name only at the root).
                            "x-kubernetes-validations": api.ROOT_RULES,
                            "properties": {
                                "apiVersion": {"type": "string", "description": "API version: serving.baton.dev/v1alpha1."},
                                "kind": {"type": "string", "description": "DisaggregatedModel."},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def render() -> str:
    header = "# Generated from operator/baton/api/v1alpha1.py by `baton crd` (make crds). Do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="baton crd", description=__doc__)
    parser.add_argument("--output-dir", help=f"write {CRD_FILE} there instead of printing it")
    args = parser.parse_args(argv)
    text = render()
    if args.output_dir:
        path = Path(args.output_dir) / CRD_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path, file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
