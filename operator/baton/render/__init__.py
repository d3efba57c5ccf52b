"""Pure builders: a DisaggregatedModel in, the Kubernetes objects that serve it out.

No client, no I/O: every function takes the parsed spec and returns plain dicts, deterministic for the
same input, so the operator can compare them with what is in the cluster and tests can check them
alone. Modules: `naming` (names and labels), `engine_config` (the TensorRT-LLM YAML per tier),
`tiers` (prefill/decode StatefulSets and Services), `scheduler` (Deployment, Service, config, RBAC),
`disruption` (PodDisruptionBudgets).
"""

from __future__ import annotations

from typing import Any

from baton.render import disruption, scheduler, tiers
from baton.render.derived import Derived, derive
from baton.render.naming import Target


def render_shared(target: Target, serving: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Objects every generation shares: the tier Services, the scheduler with its config and RBAC, and the
    disruption budgets of the tiers and the scheduler. `serving`: the generation-bound scheduler settings
    (`scheduler.generation_config`) of the generation that serves, when that is not the spec's (a rollout in
    progress, blocked or rolled back)."""
    return [tiers.headless_service(target, "prefill"), tiers.headless_service(target, "decode"),
            *scheduler.render_scheduler(target, serving),
            *(disruption.disruption_budget(target, c) for c in ("prefill", "decode", scheduler.COMPONENT)
              if disruption.ENABLED)]


def render_generation(target: Target, derived: Derived) -> list[dict[str, Any]]:
    """Both tiers of the spec's generation (engine configs, then StatefulSets)."""
    return [*tiers.render_generation(target, "prefill", derived), *tiers.render_generation(target, "decode", derived)]


def render_children(target: Target, derived: Derived | None = None) -> list[dict[str, Any]]:
    """Every child object of one DisaggregatedModel for its current spec, in apply order."""
    derived = derived or derive(target.spec)
    return [*render_shared(target), *render_generation(target, derived)]
