"""The scheduler: its config (the file `baton scheduler --config` reads), RBAC to discover engine
endpoints, the Deployment and the Service clients send requests to."""

from __future__ import annotations

import os
from typing import Any

import yaml

from baton.api.units import parse_duration, parse_quantity, quantity_or_none
from baton.api.v1alpha1 import DegradationSpec, DisaggregatedModelSpec, SchedulerSpec
from baton.render import yaml_text
from baton.render.naming import (
    DEFAULT_IMAGE,
    Target,
    child_name,
    labels,
    metadata,
    selector_labels,
)
from baton.render.tiers import model_argument_and_volume

COMPONENT = "scheduler"
CONFIG_DIR = "/etc/baton/scheduler"
CONFIG_FILE = "config.yaml"
# The Secret behind spec.scheduler.degradation.redisUrlSecret, mounted as a file: the URL stays out of the
# ConfigMap, and a rotated Secret reaches the running scheduler (the kubelet updates the file; the scheduler
# watches it and moves its holds to the new Redis) without a restart, which an environment variable cannot.
REDIS_URL_DIR = "/etc/baton/redis-url"
REDIS_URL_FILE = "url"

# The scheduler settings that belong to an engine generation (each is part of the generation key): the
# served model name (requests naming another model get 404), the engines' protocol and the KV transfer
# compression. They follow the *serving* generation, not the spec: the scheduler hot-reloads its config,
# so a spec value would reach it before the new generation serves (or forever, if that one never does).
ANNOTATION_GENERATION_CONFIG = "baton.dev/scheduler-config"
GENERATION_FIELDS = ("model", "runtime", "kvTransferCompression")


def generation_config(spec: DisaggregatedModelSpec) -> dict[str, str]:
    """The generation-bound scheduler settings of `spec`'s generation (see GENERATION_FIELDS)."""
    return {"model": spec.model.name, "runtime": spec.engine.runtime,
            "kvTransferCompression": spec.engine.kv_transfer.compression}


def generation_config_of_configmap(live: dict[str, Any] | None) -> dict[str, str]:
    """The generation-bound settings a live scheduler ConfigMap carries (empty when unreadable)."""
    try:
        config = yaml.safe_load(((live or {}).get("data") or {}).get(CONFIG_FILE) or "") or {}
    except yaml.YAMLError:
        return {}
    if not isinstance(config, dict):
        return {}
    routing = config.get("routing") if isinstance(config.get("routing"), dict) else {}
    out = {"model": config.get("model"), "runtime": config.get("runtime"),
           "kvTransferCompression": routing.get("kvTransferCompression")}
    return {k: v for k, v in out.items() if isinstance(v, str) and v}


def scheduler_config(target: Target, serving: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything the scheduler needs: where each tier's endpoints are and every routing setting.
    `serving`: the generation-bound settings of the generation that serves (default: the spec's);
    everything else always comes from the spec."""
    spec = target.spec
    s = spec.scheduler
    bound = {**generation_config(spec), **(serving or {})}
    return {
        "model": bound["model"],
        "runtime": bound["runtime"],
        "endpoints": {
            "discovery": "kubernetes",
            "kubernetes": {
                "namespace": target.namespace,
                "prefillService": child_name(target, "prefill"),
                "decodeService": child_name(target, "decode"),
                # Each tier's engines on their own port (the tiers' ports may differ).
                "prefillPort": spec.prefill.port,
                "decodePort": spec.decode.port,
                "model": target.name,
            },
        },
        "routing": {
            "localPrefillBelowTokens": s.local_prefill_below_tokens,
            "alwaysPrefillAtOrAboveTokens": s.always_prefill_at_or_above_tokens,
            "algorithm": s.algorithm,
            "placementPolicy": s.placement_policy,
            "prefillBatchSize": s.prefill_batch_size,
            "decodeBatchSize": s.decode_batch_size,
            "maxConcurrentPrefills": s.max_concurrent_prefills,
            "kvTransferCompression": bound["kvTransferCompression"],
            "highPrecisionFallback": spec.engine.kv_transfer.high_precision_fallback,
        },
        "queue": {"maxDepth": s.max_queue_depth},
        "admission": {
            "prefillTokensPerSecond": s.admission.prefill_tokens_per_second,
            "prefillBurstTokens": s.admission.prefill_burst_tokens,
            "decodeRequestsPerSecond": s.admission.decode_requests_per_second,
            "decodeBurst": s.admission.decode_burst,
        },
        "backpressure": {
            "maxActivePerDecodeReplica": s.backpressure.max_active_per_decode_replica,
            "decodeP95LatencyThresholdMs": parse_duration(s.backpressure.decode_p95_latency_threshold) * 1000,
        },
        "degradation": _degradation(s.degradation, parse_duration(spec.engine.kv_transfer.timeout)),
        "tokenizer": _tokenizer(spec)[0],
        "heartbeatSeconds": parse_duration(s.heartbeat_interval),
        "server": {"host": "0.0.0.0", "port": s.port, "streamFlushIntervalMs": s.stream_flush_interval_ms},
    }


# Of the prefill engine's kv_transfer_timeout_ms, the share a hold may wait: the rest is left for the
# transfer itself, which must end before the context worker frees the KV.
KV_TIMEOUT_HOLD_SHARE = 0.9


def _degradation(d: DegradationSpec, kv_transfer_timeout_s: float) -> dict[str, Any]:
    """The scheduler's degradation settings. A hold waits `holdTtl`, but never past the share of the engines'
    KV transfer timeout that leaves room for the transfer: TensorRT-LLM's context worker frees a request's
    KV when it was not sent within kv_transfer_timeout_ms of the end of its prefill, which is when the hold
    begins, so a longer hold would hand the decode a handle whose KV is gone."""
    ttl = min(parse_duration(d.hold_ttl), KV_TIMEOUT_HOLD_SHARE * kv_transfer_timeout_s)
    out: dict[str, Any] = {"holdTtlSeconds": ttl, "store": d.store}
    if d.store == "redis":
        if d.redis_url_secret is not None:
            out["redisUrlFile"] = f"{REDIS_URL_DIR}/{REDIS_URL_FILE}"  # the Secret, mounted: no password here
        else:
            out["redisUrl"] = d.redis_url
    return out


def _tokenizer(spec: DisaggregatedModelSpec) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]],
                                                   list[dict[str, Any]]]:
    """Where the scheduler reads the model's tokenizer (`spec.scheduler.tokenizer: model`): (its config
    section, and the volumes, mounts and env the scheduler pod needs for it). The model's own checkpoint,
    mounted as the engines mount it, or fetched from the Hugging Face Hub at start (into memory: no cache
    volume, only the token for gated models)."""
    if spec.scheduler.tokenizer != "model":
        return {}, [], [], []
    hf = spec.model.source.hugging_face
    if hf is not None:
        token = hf.token_secret
        env = [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}}] if token else []
        return {"huggingFaceId": hf.id, **({"revision": hf.revision} if hf.revision else {})}, [], [], env
    model_path, volumes, mounts, _ = model_argument_and_volume(spec)
    return {"path": model_path}, volumes, mounts, []


def configmap(target: Target, serving: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(target, COMPONENT),
        "data": {CONFIG_FILE: yaml_text.dump(scheduler_config(target, serving), sort_keys=False)},
    }


def service_account(target: Target) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata(target, COMPONENT)}


def role(target: Target) -> dict[str, Any]:
    # Endpoint discovery only: EndpointSlices of the tier Services and the pods behind them (for
    # their KV-format fingerprints). Nothing else, and nothing cluster-wide.
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": metadata(target, COMPONENT),
        "rules": [
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["pods", "services"], "verbs": ["get", "list", "watch"]},
            # The serving generation is read from the model's status (one field switches traffic).
            {"apiGroups": ["serving.baton.dev"], "resources": ["disaggregatedmodels"], "verbs": ["get", "list", "watch"],
             "resourceNames": [target.name]},
        ],
    }


def role_binding(target: Target) -> dict[str, Any]:
    name = child_name(target, COMPONENT)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": metadata(target, COMPONENT),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": target.namespace}],
    }


def service(target: Target) -> dict[str, Any]:
    port = target.spec.scheduler.port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(target, COMPONENT),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(target, COMPONENT),
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def _env(s: SchedulerSpec) -> list[dict[str, Any]]:
    return [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]


def _redis_url_volume(s: SchedulerSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The volume and mount of the Secret holding the redis URL (none without redisUrlSecret): only its
    one key, as the file the config's redisUrlFile names. The default file mode stays: the files belong to
    root, and the scheduler runs as the image's non-root user."""
    secret = s.degradation.redis_url_secret
    if s.degradation.store != "redis" or secret is None:
        return [], []
    volume = {"name": "redis-url",
              "secret": {"secretName": secret.name, "items": [{"key": secret.key, "path": REDIS_URL_FILE}]}}
    return [volume], [{"name": "redis-url", "mountPath": REDIS_URL_DIR, "readOnly": True}]


def image_pull_secrets() -> list[dict[str, str]]:
    """The scheduler pod's imagePullSecrets: the Secret names in BATON_IMAGE_PULL_SECRETS (comma-separated;
    the chart sets them from its imagePullSecrets, since the scheduler runs the operator's image by default).
    Each names a Secret in the model's namespace."""
    names = (n.strip() for n in os.environ.get("BATON_IMAGE_PULL_SECRETS", "").split(","))
    return [{"name": n} for n in dict.fromkeys(names) if n]


DEFAULT_REQUESTS = {"cpu": "1", "memory": "512Mi"}
DEFAULT_LIMITS = {"memory": "2Gi"}


def resources(s: SchedulerSpec) -> dict[str, dict[str, str]]:
    """The scheduler container's requests and limits: the user's, plus defaults that never conflict with
    them (Kubernetes refuses a request above its limit). A default request is left out where the user's
    limit is below it (Kubernetes then requests the limit); a default limit below the user's request is
    raised to that request."""
    requests, limits = dict(s.resources.requests), dict(s.resources.limits)
    for name, default in DEFAULT_REQUESTS.items():
        if name in requests:
            continue
        limit = quantity_or_none(limits[name]) if name in limits else None
        if name not in limits or (limit is not None and parse_quantity(default) <= limit):
            requests[name] = default
    for name, default in DEFAULT_LIMITS.items():
        if name in limits:
            continue
        request = quantity_or_none(requests[name]) if name in requests else None
        if name in requests and request is None:
            continue  # an unreadable request: the API server names it; no default to compare it with
        limits[name] = requests[name] if request is not None and request > parse_quantity(default) else default
    return {"requests": dict(sorted(requests.items())), "limits": dict(sorted(limits.items()))}


def deployment(target: Target) -> dict[str, Any]:
    s = target.spec.scheduler
    probe = {"httpGet": {"port": "http"}, "periodSeconds": 5, "timeoutSeconds": 3}
    _, tokenizer_volumes, tokenizer_mounts, tokenizer_env = _tokenizer(target.spec)
    redis_volumes, redis_mounts = _redis_url_volume(s)
    container = {
        "name": COMPONENT,
        "image": s.image or DEFAULT_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": ["baton", "scheduler"],
        "args": ["--config", f"{CONFIG_DIR}/{CONFIG_FILE}", "--host", "$(POD_IP)", "--port", str(s.port)],
        "env": _env(s) + tokenizer_env,
        "ports": [{"name": "http", "containerPort": s.port, "protocol": "TCP"}],
        "resources": resources(s),
        "readinessProbe": {**probe, "httpGet": {**probe["httpGet"], "path": "/readyz"}, "failureThreshold": 2},
        "livenessProbe": {**probe, "httpGet": {**probe["httpGet"], "path": "/healthz"}, "failureThreshold": 6},
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}, *tokenizer_mounts,
                         *redis_mounts],
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": child_name(target, COMPONENT),
        "containers": [container],
        "nodeSelector": dict(s.pool.node_selector),
        "tolerations": list(s.pool.tolerations),
        "volumes": [{"name": "config", "configMap": {"name": child_name(target, COMPONENT)}}, *tokenizer_volumes,
                    *redis_volumes],
        # In-flight streams finish before the pod goes.
        "terminationGracePeriodSeconds": 60,
    }
    if s.pool.affinity:
        pod_spec["affinity"] = s.pool.affinity
    if pull_secrets := image_pull_secrets():
        pod_spec["imagePullSecrets"] = pull_secrets
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(target, COMPONENT),
        "spec": {
            "replicas": s.replicas,
            "selector": {"matchLabels": selector_labels(target, COMPONENT)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": labels(target, COMPONENT)}, "spec": pod_spec},
        },
    }


def render_scheduler(target: Target, serving: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """`serving`: the generation-bound settings of the serving generation (default: the spec's)."""
    return [configmap(target, serving), service_account(target), role(target), role_binding(target), service(target), deployment(target)]
