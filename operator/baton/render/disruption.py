"""PodDisruptionBudgets: voluntary disruptions (a node drain, a node upgrade, consolidation by a cluster
autoscaler) take at most one pod of a tier, or of the scheduler, at a time.

A GPU replica takes minutes to load its model again, so a drain that evicted every decode replica packed on
one node at once would take the tier dark for that long. One budget per component selects its pods across
generations (model and tier labels, as its Service does): during a rollout both generations count, and the
operator's own scale-downs go through the scale subresource, which budgets do not gate. `maxUnavailable: 1`
never blocks a drain for good (a one-replica tier's pod may still go), and pods that are not ready (loading,
failing) may always be evicted, so a pod stuck loading cannot hold a node drain up either.
"""

from __future__ import annotations

import os
from typing import Any

from baton.render.naming import Target, metadata, selector_labels

MAX_UNAVAILABLE = 1
# BATON_DISRUPTION_BUDGETS=false (the chart's operator.disruptionBudgets): no budgets, for clusters whose own
# budgets already select Baton's pods (Kubernetes refuses to evict a pod two budgets select) or whose
# policy forbids them. Read once: the operator's watches are set up from it at import.
ENABLED = os.environ.get("BATON_DISRUPTION_BUDGETS", "true").strip().lower() not in ("false", "0", "no")


def disruption_budget(target: Target, component: str) -> dict[str, Any]:
    """The budget of `component` ("prefill", "decode" or "scheduler")."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(target, component),
        "spec": {
            "maxUnavailable": MAX_UNAVAILABLE,
            "selector": {"matchLabels": selector_labels(target, component)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }
