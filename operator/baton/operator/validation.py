"""Checks on a spec that the CRD schema cannot express; each problem is a sentence a user can act on."""

from __future__ import annotations

from baton.api.v1alpha1 import DisaggregatedModelSpec
from baton.render import engine_config, tiers


def spec_problems(spec: DisaggregatedModelSpec) -> list[str]:
    problems = engine_config.reserved_override_problems(spec)
    for tier_name, tier in (("prefill", spec.prefill), ("decode", spec.decode)):
        gpu_limit = tier.resources.limits.get("nvidia.com/gpu") or tier.resources.requests.get("nvidia.com/gpu")
        if gpu_limit and str(gpu_limit) != str(tier.gpus_per_replica):
            problems.append(
                f"{tier_name}.resources sets nvidia.com/gpu={gpu_limit} but gpusPerReplica is "
                f"{tier.gpus_per_replica}; drop nvidia.com/gpu from resources (it comes from gpusPerReplica)"
            )
    problems.extend(tiers.reserved_env_overrides(spec))
    return problems
