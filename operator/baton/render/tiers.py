"""The prefill and decode tiers: engine ConfigMap, headless Service and StatefulSet per tier."""

from __future__ import annotations

import math
from typing import Any

from baton import pod_volumes
from baton.api.units import parse_duration, quantity_or_none
from baton.api.v1alpha1 import DecodeTierSpec, DisaggregatedModelSpec, PrefillTierSpec
from baton.render import engine_config, yaml_text
from baton.render.derived import Derived
from baton.render.naming import (
    ANNOTATION_KV_FINGERPRINT,
    LABEL_GENERATION,
    Target,
    Tier,
    child_name,
    generation_child_name,
    labels,
    metadata,
    selector_labels,
)

GPU_RESOURCE = "nvidia.com/gpu"
PROBE_PERIOD_S = 10  # seconds between two probes of an engine container
# Decode replicas finish in-flight generations; prefill replicas keep KV until it is pulled.
TERMINATION_GRACE_S = 120
# How long tritonserver waits for in-flight requests after SIGTERM before it exits (its own default is 30 s): a
# little under the pod's grace period, so that it ends what is left itself before the kubelet's SIGKILL.
TRITON_EXIT_TIMEOUT_S = TERMINATION_GRACE_S - 10
# The Triton model each tier serves (the scheduler's context_only calls go to `context`, everything a decode
# replica does to `generation`, local requests included).
TRITON_TIER_MODELS = {"prefill": "context", "decode": "generation"}
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
# The taints the big clouds put on spot/preemptible nodes; tolerated only when a tier allows spot.
SPOT_TOLERATIONS = [
    {"key": "cloud.google.com/gke-spot", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "kubernetes.azure.com/scalesetpriority", "operator": "Equal", "value": "spot", "effect": "NoSchedule"},
    {"key": "eks.amazonaws.com/capacityType", "operator": "Equal", "value": "SPOT", "effect": "NoSchedule"},
]
MODEL_MOUNT = pod_volumes.MODEL_MOUNT
SHM_SIZE = "16Gi"


def tier_spec(spec: DisaggregatedModelSpec, tier: Tier) -> PrefillTierSpec | DecodeTierSpec:
    return spec.prefill if tier == "prefill" else spec.decode


def model_argument_and_volume(spec: DisaggregatedModelSpec) -> tuple[str, list[dict], list[dict], list[dict]]:
    """(model argument for trtllm-serve, volumes, mounts, env) for the model source."""
    source = spec.model.source
    if source.pvc:
        sub = source.pvc.sub_path.strip("/")
        volume = {"name": pod_volumes.MODEL_VOLUME,
                  "persistentVolumeClaim": {"claimName": source.pvc.claim_name, "readOnly": True}}
        return (f"{MODEL_MOUNT}/{sub}" if sub else MODEL_MOUNT), [volume], [
            {"name": pod_volumes.MODEL_VOLUME, "mountPath": MODEL_MOUNT, "readOnly": True}], []
    if source.host_path:
        volume = {"name": pod_volumes.MODEL_VOLUME, "hostPath": {"path": source.host_path.path, "type": "Directory"}}
        return MODEL_MOUNT, [volume], [{"name": pod_volumes.MODEL_VOLUME, "mountPath": MODEL_MOUNT, "readOnly": True}], []
    hf = source.hugging_face
    assert hf is not None  # the CRD's CEL rule guarantees exactly one source
    env: list[dict] = [{"name": "HF_HOME", "value": f"{pod_volumes.HF_CACHE_MOUNT}/huggingface"}]
    if hf.revision:
        # Informational only: neither huggingface_hub nor trtllm-serve reads HF_REVISION; what pins the weights
        # is the `revision` LLM-API option (engine_config). Kept for images/entrypoints that read it.
        env.append({"name": "HF_REVISION", "value": hf.revision})
    if hf.token_secret:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": hf.token_secret.name, "key": hf.token_secret.key}}})
    cache = {"name": pod_volumes.HF_CACHE_VOLUME, "emptyDir": {}}
    return hf.id, [cache], [{"name": pod_volumes.HF_CACHE_VOLUME, "mountPath": pod_volumes.HF_CACHE_MOUNT}], env


def engine_configmap(target: Target, tier: Tier, decode_capacity_tokens: int, generation: str) -> dict[str, Any]:
    options = engine_config.engine_options(target.spec, tier, decode_capacity_tokens)
    meta = metadata(target, tier, name=generation_child_name(target, tier, generation, "-engine"))
    meta["labels"][LABEL_GENERATION] = generation
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {engine_config.CONFIG_FILE: yaml_text.dump(options, sort_keys=True)},
    }


def headless_service(target: Target, tier: Tier) -> dict[str, Any]:
    port = tier_spec(target.spec, tier).port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(target, tier),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(target, tier),
            "publishNotReadyAddresses": False,
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def _below_limit(request: str, limit: str) -> bool:
    """Whether `request` is at most `limit`; True when either is not a quantity (the API server says why)."""
    req, lim = quantity_or_none(request), quantity_or_none(limit)
    return req is None or lim is None or req <= lim


def _resources(tier: PrefillTierSpec | DecodeTierSpec) -> dict[str, Any]:
    """Requests and limits of an engine container. Baton's default cpu and memory requests fill in only what
    the user left out, and never exceed the user's limit for that resource (the API server refuses a request
    above its limit): a default above the limit is lowered to the limit. GPUs always come from gpusPerReplica."""
    gpus = str(tier.gpus_per_replica)
    limits = dict(tier.resources.limits)
    defaults = {"cpu": str(max(4, tier.gpus_per_replica)), "memory": f"{8 * max(4, tier.gpus_per_replica)}Gi"}
    requests: dict[str, Any] = {}
    for resource, default in defaults.items():
        limit = limits.get(resource)
        requests[resource] = default if limit is None or _below_limit(default, str(limit)) else limit
    requests.update(tier.resources.requests)
    requests[GPU_RESOURCE] = gpus
    limits[GPU_RESOURCE] = gpus
    return {"requests": dict(sorted(requests.items())), "limits": dict(sorted(limits.items()))}


def _baton_env(spec: DisaggregatedModelSpec) -> list[dict]:
    """The variables Baton sets on every engine container, before the user's."""
    _, _, _, model_env = model_argument_and_volume(spec)
    return [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        # KV transfer binds an ephemeral port on an automatically picked interface; pin the pod's own.
        # Overridable (engine.env or podTemplate.env), e.g. net1 when KV travels over a Multus network.
        {"name": "TRTLLM_UCX_INTERFACE", "value": "eth0"},
        {"name": "TRTLLM_SERVER_DISABLE_GC", "value": "1"},
        {"name": "TRTLLM_WORKER_DISABLE_GC", "value": "1"},
        *model_env,
    ]


def reserved_env(spec: DisaggregatedModelSpec) -> dict[str, str]:
    """Baton-set variables a user may not override, each with where its value comes from instead. Only names
    Baton sets are reserved (overriding them used to render a duplicate the API server refused).

    POD_IP: the engine listens on `--host $(POD_IP)`, the address schedulers discover and probes reach.
    HF_REVISION: names the weights, which are part of the KV-format identity the operator compares between the
    tiers (model.source.huggingFace.revision); a per-tier value would contradict that check."""
    reserved = {"POD_IP": "the pod's IP: trtllm-serve listens on --host $(POD_IP), where schedulers and probes reach it"}
    hf = spec.model.source.hugging_face
    if hf and hf.revision:  # only when Baton sets it: a spec that set HF_REVISION alone keeps working
        reserved["HF_REVISION"] = (
            "spec.model.source.huggingFace.revision, part of the KV-format identity both tiers must share"
        )
    return reserved


def reserved_env_overrides(spec: DisaggregatedModelSpec) -> list[str]:
    """Problems for each user env entry that sets a reserved variable (empty: none), one sentence each, in the
    style of `engine_config.reserved_overrides`; meant for the operator's spec validation. Rendering keeps
    Baton's value for these names either way."""
    reserved = reserved_env(spec)
    sources = [("engine.env", spec.engine.env), ("prefill.podTemplate.env", spec.prefill.pod_template.env),
               ("decode.podTemplate.env", spec.decode.pod_template.env)]
    problems = []
    for where, entries in sources:
        for name in sorted({e.get("name") for e in entries if isinstance(e, dict)} & reserved.keys()):
            problems.append(f"{where} sets {name}, which Baton sets itself from {reserved[name]}; remove it from {where}")
    return problems


def baton_volume_mounts(spec: DisaggregatedModelSpec) -> list[dict]:
    """The mounts of Baton's own volumes in an engine container, one per volume of the pod (the engine config,
    shared memory, the model source's), before the tier's podTemplate.volumeMounts."""
    _, _, model_mounts, _ = model_argument_and_volume(spec)
    return [
        {"name": pod_volumes.ENGINE_CONFIG_VOLUME, "mountPath": engine_config.ENGINE_CONFIG_DIR, "readOnly": True},
        {"name": pod_volumes.SHM_VOLUME, "mountPath": pod_volumes.SHM_MOUNT},
        *model_mounts,
    ]


def reserved_volume_overrides(spec: DisaggregatedModelSpec) -> list[str]:
    """Problems for each podTemplate volume named like one of Baton's and each podTemplate mount at one of
    Baton's mount paths (empty: none), naming the entry: Kubernetes refuses a pod with two volumes of one name
    and a container with two mounts at one path (ApplyFailed). Meant for the operator's spec validation; the
    CRD refuses the same at admission. Derived from what the renderer mounts for this spec's model source."""
    mounts = baton_volume_mounts(spec)
    names = {m["name"]: pod_volumes.PURPOSE[m["name"]] for m in mounts}
    paths = {m["mountPath"]: pod_volumes.PURPOSE[m["name"]] for m in mounts}
    problems = []
    for tier in ("prefill", "decode"):
        template = tier_spec(spec, tier).pod_template
        for i, volume in enumerate(template.volumes):
            name = volume.get("name") if isinstance(volume, dict) else None
            if name in names:
                problems.append(f"{tier}.podTemplate.volumes[{i}].name is {name}, the name of Baton's own "
                                f"{names[name]} volume, and Kubernetes refuses two volumes of one name; give the "
                                "volume another name (and its volumeMounts too)")
        for i, mount in enumerate(template.volume_mounts):
            path = mount.get("mountPath") if isinstance(mount, dict) else None
            if path in paths:
                problems.append(f"{tier}.podTemplate.volumeMounts[{i}].mountPath is {path}, where Baton mounts its "
                                f"own {paths[path]} volume, and Kubernetes refuses two mounts at one path; mount it "
                                "at another path")
    return problems


def merge_env(*sources: list[dict], reserved: frozenset[str] | set[str] = frozenset()) -> list[dict]:
    """Concatenate env lists, later sources overriding earlier ones by name: one entry per name (the API
    server refuses duplicates), at the place its first definition had, holding the last definition. Entries
    named in `reserved` keep the first source's value. Entries without a name pass through (the API server
    says what is wrong with them)."""
    merged: dict[Any, dict] = {}
    for index, source in enumerate(sources):
        for position, entry in enumerate(source):
            name = entry.get("name") if isinstance(entry, dict) else None
            if not isinstance(name, str):
                merged[("unnamed", index, position)] = entry
            elif not (index > 0 and name in reserved and name in merged):
                merged[name] = entry
    return list(merged.values())


def startup_probe_failures(spec: DisaggregatedModelSpec) -> int:
    """The startupProbe's failureThreshold: engine.startupTimeout in probe periods, rounded up."""
    return math.ceil(parse_duration(spec.engine.startup_timeout) / PROBE_PERIOD_S)


def engine_container(target: Target, tier: Tier) -> dict[str, Any]:
    spec = target.spec
    t = tier_spec(spec, tier)
    model_arg, _, _, _ = model_argument_and_volume(spec)
    # Baton's defaults < engine.env < the tier's podTemplate.env, one entry per name.
    env = merge_env(_baton_env(spec), spec.engine.env, t.pod_template.env, reserved=set(reserved_env(spec)))
    config_path = f"{engine_config.ENGINE_CONFIG_DIR}/{engine_config.CONFIG_FILE}"
    if spec.engine.runtime == "trtllm-serve":
        command = ["trtllm-serve"]
        args = [
            model_arg, "--host", "$(POD_IP)", "--port", str(t.port), "--backend", "pytorch",
            "--tp_size", str(t.tensor_parallel_size), "--pp_size", str(t.pipeline_parallel_size),
            "--extra_llm_api_options", config_path,
        ]
        health = "/health"
    else:
        command = ["tritonserver"]
        args = [
            # the model source's path in the pod, its pvc.subPath included (as trtllm-serve's model argument);
            # a huggingFace source mounts no repository (refused with triton: `triton_source_problems`)
            f"--model-repository={model_arg if spec.model.source.hugging_face is None else MODEL_MOUNT}",
            f"--http-port={t.port}", f"--grpc-port={t.port + 1}",
            f"--metrics-port={t.port + 2}", "--strict-readiness=true", f"--exit-timeout-secs={TRITON_EXIT_TIMEOUT_S}",
            # only the model the tier serves (both tiers mount the same repository): a second executor would
            # hold a second copy of the weights and of the KV cache on the same GPUs
            "--model-control-mode=explicit", f"--load-model={TRITON_TIER_MODELS[tier]}",
        ]
        health = "/v2/health/ready"
    probe = {"httpGet": {"path": health, "port": "http"}, "periodSeconds": PROBE_PERIOD_S, "timeoutSeconds": 5}
    # Triton's liveness is /v2/health/live: with --strict-readiness a model not ready (loading, unloaded)
    # makes /ready fail, which must take the pod out of rotation, not restart the server
    live = probe if command != ["tritonserver"] else {**probe, "httpGet": {"path": "/v2/health/live", "port": "http"}}
    return {
        "name": "engine",
        "image": spec.tier_engine(tier).image,
        "imagePullPolicy": "IfNotPresent",
        "command": command,
        "args": args,
        "env": env,
        "ports": [{"name": "http", "containerPort": t.port, "protocol": "TCP"}],
        "resources": _resources(t),
        # Download, load and warm-up take minutes: engine.startupTimeout (30 minutes) before liveness applies.
        "startupProbe": {**probe, "failureThreshold": startup_probe_failures(spec)},
        "readinessProbe": {**probe, "failureThreshold": 3},
        "livenessProbe": {**live, "failureThreshold": 6},
        "volumeMounts": [*baton_volume_mounts(spec), *t.pod_template.volume_mounts],
    }


def statefulset(target: Target, tier: Tier, revision: str, generation: str, kv_fingerprint: str = "") -> dict[str, Any]:
    spec = target.spec
    t = tier_spec(spec, tier)
    _, model_volumes, _, _ = model_argument_and_volume(spec)
    pod_labels = {**t.pod_template.labels, **labels(target, tier, revision), LABEL_GENERATION: generation}
    annotations = dict(t.pod_template.annotations)
    if kv_fingerprint:
        annotations[ANNOTATION_KV_FINGERPRINT] = kv_fingerprint
    tolerations = [GPU_TOLERATION, *(SPOT_TOLERATIONS if t.allow_spot else []), *t.pool.tolerations]
    pod_spec: dict[str, Any] = {
        "containers": [engine_container(target, tier)],
        "nodeSelector": dict(t.pool.node_selector),
        "tolerations": tolerations,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "volumes": [
            {"name": pod_volumes.ENGINE_CONFIG_VOLUME,
             "configMap": {"name": generation_child_name(target, tier, generation, "-engine")}},
            {"name": pod_volumes.SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}},
            *model_volumes,
            *t.pod_template.volumes,
        ],
    }
    if t.pool.affinity:
        pod_spec["affinity"] = t.pool.affinity
    if t.pod_template.priority_class_name:
        pod_spec["priorityClassName"] = t.pod_template.priority_class_name
    if t.pod_template.topology_spread_constraints:
        pod_spec["topologySpreadConstraints"] = t.pod_template.topology_spread_constraints
    if t.pod_template.service_account_name:
        pod_spec["serviceAccountName"] = t.pod_template.service_account_name
    template_metadata: dict[str, Any] = {"labels": pod_labels}
    if annotations:
        template_metadata["annotations"] = annotations
    meta = metadata(target, tier, name=generation_child_name(target, tier, generation), revision=revision)
    meta["labels"][LABEL_GENERATION] = generation
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta,
        "spec": {
            "serviceName": child_name(target, tier),
            "replicas": t.desired_replicas(),
            # Engines are independent replicas: start and replace them in parallel, not one by one.
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            "minReadySeconds": spec.rollout.min_ready_seconds,
            # One StatefulSet per generation: selectors must not overlap between generations.
            "selector": {"matchLabels": {**selector_labels(target, tier), LABEL_GENERATION: generation}},
            "template": {"metadata": template_metadata, "spec": pod_spec},
        },
    }


def render_generation(target: Target, tier: Tier, derived: Derived) -> list[dict[str, Any]]:
    """One tier of one generation: its engine config and its StatefulSet."""
    return [
        engine_configmap(target, tier, derived.decode_kv_capacity_tokens, derived.generation),
        statefulset(target, tier, derived.tier_revisions[tier], derived.generation, derived.fingerprint(tier)),
    ]
