"""Generate the API reference (docs/api-reference.md) from the pydantic models and the CRD.

The same models the CRD is generated from (`baton.api.v1alpha1`, via `baton.api.crd`) give every
field's name on the wire, type, default, bounds and description, and every cross-field (CEL) rule
with its message, so the reference cannot drift from what the API server enforces.
`tests/unit/test_api_reference.py` fails when the checked-in file is stale.

    python -m baton.api.reference --output docs/api-reference.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from baton.api import crd as crd_module
from baton.api import v1alpha1 as api

DEFAULT_OUTPUT = "docs/api-reference.md"
HEADER = (
    "<!-- Generated from operator/baton/api/v1alpha1.py by `python -m baton.api.reference "
    f"--output {DEFAULT_OUTPUT}`. Do not edit. -->\n"
)


def _schemas() -> tuple[dict[str, Any], dict[str, Any]]:
    """(top-level schema per root model, every model's schema by name)."""
    roots: dict[str, Any] = {}
    defs: dict[str, Any] = {}
    for model in (api.DisaggregatedModelSpec, api.DisaggregatedModelStatus):
        schema = model.model_json_schema(by_alias=True, mode="validation")
        defs.update(schema.pop("$defs", {}))
        roots[model.__name__] = schema
        defs[model.__name__] = schema
    return roots, defs


def _anchor(name: str) -> str:
    return name.lower()


def _ref_name(node: dict[str, Any]) -> str | None:
    if "$ref" in node:
        return node["$ref"].split("/")[-1]
    return None


def _unwrap(node: dict[str, Any]) -> dict[str, Any]:
    """Optional[X] (anyOf X|null) -> X, keeping the outer node's description and default."""
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) == 1:
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            return {**options[0], **rest}
    return node


def _type(node: dict[str, Any]) -> str:
    node = _unwrap(node)
    ref = _ref_name(node)
    if ref:
        return f"[{ref}](#{_anchor(ref)})"
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return "object (free-form)"
    kind = node.get("type")
    if kind == "array":
        items = node.get("items", {})
        if items.get("x-kubernetes-preserve-unknown-fields"):
            return "[]object (free-form)"
        return f"[]{_type(items)}"
    if kind == "object":
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            return f"map[string]{_type(extra)}"
        return "object"
    return kind or "any"


def _code(value: Any) -> str:
    text = json.dumps(value, separators=(", ", ": "))
    return "`" + text.replace("|", "\\|") + "`"


def _default(node: dict[str, Any]) -> str:
    if "default" not in node or node["default"] is None:
        return ""
    value = node["default"]
    if isinstance(value, dict) and value:
        return "(each field's default)"
    return _code(value)


def _validation(node: dict[str, Any]) -> str:
    node = _unwrap(node)
    out = []
    if "enum" in node:
        out.append("one of " + ", ".join(_code(v) for v in node["enum"]))
    if "minimum" in node and "maximum" in node:
        out.append(f"{node['minimum']}..{node['maximum']}")
    elif "minimum" in node:
        out.append(f">= {node['minimum']}")
    elif "maximum" in node:
        out.append(f"<= {node['maximum']}")
    if "exclusiveMinimum" in node:
        out.append(f"> {node['exclusiveMinimum']}")
    if "minLength" in node:
        out.append(f"length >= {node['minLength']}")
    if "maxLength" in node:
        out.append(f"length <= {node['maxLength']}")
    if "pattern" in node:
        out.append("pattern `" + node["pattern"].replace("|", "\\|") + "`")
    return "; ".join(out)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _walk(defs: dict[str, Any]) -> tuple[list[str], dict[str, list[str]]]:
    """Model names in reading order (depth-first from spec, then status) and where each appears."""
    order: list[str] = []
    used_at: dict[str, list[str]] = {}

    def visit(name: str, path: str) -> None:
        used_at.setdefault(name, []).append(path)
        if name in order:
            return
        order.append(name)
        for prop, node in defs[name].get("properties", {}).items():
            node = _unwrap(node)
            child = _ref_name(node) or _ref_name(node.get("items", {}) if node.get("type") == "array" else {})
            if child:
                visit(child, f"{path}.{prop}" + ("[]" if node.get("type") == "array" else ""))

    visit(api.DisaggregatedModelSpec.__name__, "spec")
    visit(api.DisaggregatedModelStatus.__name__, "status")
    return order, used_at


def _resource_section() -> list[str]:
    crd = crd_module.crd()
    spec = crd["spec"]
    names = spec["names"]
    version = spec["versions"][0]
    subresources = version.get("subresources", {})
    lines = [
        f"# {api.KIND} API reference",
        "",
        f"`{api.GROUP}/{api.VERSION}`, kind `{api.KIND}`: one LLM served by a prefill tier, a decode tier and "
        "Baton's scheduler. Every field below is what `kubectl explain dm.<path>` prints; the API server "
        "enforces every bound, pattern and rule at `kubectl apply` time.",
        "",
        "| | |",
        "|---|---|",
        f"| Group / version | `{api.GROUP}` / `{api.VERSION}` |",
        f"| Scope | {spec['scope']} |",
        f"| Plural / singular | `{names['plural']}` / `{names['singular']}` |",
        f"| Short names | {', '.join(f'`{n}`' for n in names.get('shortNames', []))} |",
        f"| Categories | {', '.join(f'`{c}`' for c in names.get('categories', []))} (`kubectl get baton`) |",
        f"| Status subresource | {'yes' if 'status' in subresources else 'no'} |",
    ]
    scale = subresources.get("scale")
    if scale:
        detail = f"spec `{scale['specReplicasPath']}`, status `{scale['statusReplicasPath']}`"
        if scale.get("labelSelectorPath"):
            detail += f", selector `{scale['labelSelectorPath']}`"
        lines.append(f"| Scale subresource | {detail} (`kubectl scale dm/NAME --replicas=N`, HorizontalPodAutoscaler) |")
    lines += ["", "`kubectl get dm` columns:", "", "| Column | JSONPath | Meaning |", "|---|---|---|"]
    for column in version.get("additionalPrinterColumns", []):
        lines.append(f"| {column['name']} | `{_cell(column['jsonPath'])}` | {_cell(column.get('description', ''))} |")
    lines += [
        "",
        f"## {api.KIND}",
        "",
        "| Field | Type | Description |",
        "|---|---|---|",
        f"| `apiVersion` | string | `{api.GROUP}/{api.VERSION}` |",
        f"| `kind` | string | `{api.KIND}` |",
        "| `metadata` | ObjectMeta | Standard object metadata. |",
        f"| **`spec`** | [{api.DisaggregatedModelSpec.__name__}](#{_anchor(api.DisaggregatedModelSpec.__name__)}) | "
        "Desired state (required). |",
        f"| `status` | [{api.DisaggregatedModelStatus.__name__}](#{_anchor(api.DisaggregatedModelStatus.__name__)}) | "
        "Observed state, written by the operator. |",
    ]
    root_rules = version["schema"]["openAPIV3Schema"].get("x-kubernetes-validations", [])
    if root_rules:
        lines += ["", "Rules (checked by the API server):", ""]
        lines += [f"- {rule['message']} (`{rule['rule']}`)" for rule in root_rules]
    return lines


def _model_section(name: str, schema: dict[str, Any], used_at: list[str]) -> list[str]:
    lines = ["", f"## {name}", ""]
    lines.append("Appears at: " + ", ".join(f"`{p}`" for p in sorted(set(used_at))) + ".")
    lines += ["", "| Field | Type | Default | Validation | Description |", "|---|---|---|---|---|"]
    required = set(schema.get("required", []))
    for prop, node in schema.get("properties", {}).items():
        field = f"**`{prop}`**" if prop in required else f"`{prop}`"
        lines.append(
            f"| {field} | {_type(node)} | {_default(node)} | {_validation(node)} | {_cell(node.get('description', ''))} |"
        )
    rules = schema.get("x-kubernetes-validations", [])
    if rules:
        lines += ["", "Rules (checked by the API server):", ""]
        for rule in rules:
            lines.append(f"- {rule['message']} (`{rule['rule']}`)")
    return lines


def render() -> str:
    _, defs = _schemas()
    order, used_at = _walk(defs)
    lines = [HEADER.rstrip("\n"), "", *_resource_section()]
    lines += ["", "Fields in **bold** are required. Free-form fields take the Kubernetes object named in their description."]
    for name in order:
        lines += _model_section(name, defs[name], used_at[name])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="baton api-reference", description=__doc__.splitlines()[0])
    parser.add_argument("--output", help=f"write the reference there (e.g. {DEFAULT_OUTPUT}) instead of printing it")
    parser.add_argument("--check", action="store_true", help="exit 1 when --output differs from what would be written")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.output:
            parser.error("--check needs --output")
        current = Path(args.output).read_text() if Path(args.output).exists() else ""
        if current != text:
            print(f"{args.output} is stale: run python -m baton.api.reference --output {args.output}", file=sys.stderr)
            return 1
        return 0
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
        print(args.output, file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
