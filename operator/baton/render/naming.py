"""Names, labels and the revision hash shared by every rendered object."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Literal

from baton import __version__
from baton.api.v1alpha1 import STARTUP_TIMEOUT_DEFAULT, DisaggregatedModelSpec

Tier = Literal["prefill", "decode"]

LABEL_MODEL = "baton.dev/model"
LABEL_TIER = "baton.dev/tier"
LABEL_REVISION = "baton.dev/revision"
LABEL_GENERATION = "baton.dev/generation"
ANNOTATION_KV_FINGERPRINT = "baton.dev/kv-fingerprint"
ANNOTATION_RENDERED = "baton.dev/rendered"  # digest of what Baton rendered for a child (operator.diff.stamp)
MANAGED_BY = "baton-operator"
FIELD_MANAGER = "baton-operator"

DEFAULT_IMAGE = os.environ.get("BATON_IMAGE", f"ghcr.io/baton-serving/baton:{__version__}")


@dataclass(frozen=True)
class Target:
    """The DisaggregatedModel being rendered: identity plus parsed spec."""

    name: str
    namespace: str
    uid: str
    spec: DisaggregatedModelSpec

    def owner_reference(self) -> dict[str, Any]:
        from baton.api.v1alpha1 import GROUP, KIND, VERSION

        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def child_name(target: Target, component: str) -> str:
    return f"{target.name}-{component}"


def label_selector(labels: dict[str, str]) -> str:
    """A label selector string (`k=v,k=v`, sorted) for equality-matching `labels`."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def selector_labels(target: Target, component: str) -> dict[str, str]:
    """Immutable selector labels (a StatefulSet's selector can never change)."""
    return {LABEL_MODEL: target.name, LABEL_TIER: component}


def labels(target: Target, component: str, revision: str | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "baton",
        "app.kubernetes.io/instance": target.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "baton",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        **selector_labels(target, component),
    }
    if revision:
        out[LABEL_REVISION] = revision
    return out


def metadata(target: Target, component: str, name: str | None = None, revision: str | None = None) -> dict[str, Any]:
    return {
        "name": name or child_name(target, component),
        "namespace": target.namespace,
        "labels": labels(target, component, revision),
        "ownerReferences": [target.owner_reference()],
    }


def stable_hash(value: Any, length: int = 10) -> str:
    """Short sha256 of a JSON-able value, independent of dict ordering."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def _engine_fields(spec: DisaggregatedModelSpec, exclude: set[str] | None = None) -> dict[str, Any]:
    """spec.engine as hashed: `kvTransfer.highPrecisionFallback` is a routing setting of the scheduler (it
    reaches the engines in no way), so it counts at its default whatever it is, keeping every hash what it
    was before the scheduler read it; `startupTimeout`, added later, counts only when set to other than its
    default, for the same reason."""
    engine = spec.engine.model_dump(mode="json", exclude=exclude)
    engine["kv_transfer"]["high_precision_fallback"] = True
    if engine.get("startup_timeout") == STARTUP_TIMEOUT_DEFAULT:
        del engine["startup_timeout"]  # hashed only when set otherwise: every hash stays what it was without it
    return engine


_REPLICA_FIELDS = {"replicas", "min_replicas", "max_replicas"}


def revision(spec: DisaggregatedModelSpec) -> str:
    """Hash of what shapes both tiers' pods: model, engine and each tier's template-relevant fields (what a
    failed generation was rendered from, status.rollout.failedRevision; until a change to the spec, also the
    baton.dev/revision label of pods rendered before each tier had its own, see `tier_revision`).

    Replica counts and the scheduler are left out: scaling or retuning routing is not a new revision.
    """
    return stable_hash(
        {
            "model": spec.model.model_dump(mode="json"),
            "engine": _engine_fields(spec),
            "prefill": spec.prefill.model_dump(mode="json", exclude=_REPLICA_FIELDS),
            "decode": spec.decode.model_dump(mode="json", exclude=_REPLICA_FIELDS),
        }
    )


def tier_revision(spec: DisaggregatedModelSpec, tier: str) -> str:
    """Hash of what shapes one tier's pods and engine config, its pods' baton.dev/revision label: model,
    engine, the tier's own fields, and the one field of the other tier that reaches them (the prefill tier's
    maxPromptTokens sets both tiers' max_input_len, max_seq_len and transfer buffer). A change to one tier
    rolls only that tier's pods: a decode batch limit does not restart the prefill engines."""
    return stable_hash(
        {
            "model": spec.model.model_dump(mode="json"),
            "engine": _engine_fields(spec),
            "tier": tier,
            tier: spec.tier(tier).model_dump(mode="json", exclude=_REPLICA_FIELDS),
            "prefillMaxPromptTokens": spec.prefill.max_prompt_tokens,
        }
    )


def generation_key(spec: DisaggregatedModelSpec) -> str:
    """What makes a new generation of BOTH tiers: everything that shapes the engines' KV format or the
    engine itself (image, TensorRT-LLM version, model, KV and transfer settings, parallelism, engine
    options). Replicas, resources, pools, batch limits and the scheduler are left out: those roll in
    place, because old and new pods of one generation can always hand KV to each other."""
    return stable_hash(
        {
            "model": spec.model.model_dump(mode="json"),
            "engine": _engine_fields(spec, exclude={"env", "startup_timeout"}),  # both roll in place
            "tiers": {
                tier: {
                    "engine": spec.tier_engine(tier).model_dump(mode="json"),
                    "tp": spec.tier(tier).tensor_parallel_size,
                    "pp": spec.tier(tier).pipeline_parallel_size,
                    "gpus": spec.tier(tier).gpus_per_replica,
                }
                for tier in ("prefill", "decode")
            },
        },
        length=8,
    )


def generation_child_name(target: Target, tier: str, generation: str, suffix: str = "") -> str:
    return f"{target.name}-{tier}{suffix}-{generation}"
