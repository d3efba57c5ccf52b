"""Fake node pools: a declarative file in, Node objects out, applied to the cluster.

The file format is `pools.yaml` beside this module. Nodes are KWOK-managed (annotation
`kwok.x-k8s.io/node: fake`), report InternalIP 127.0.0.1 (the loopback rule), and advertise their GPUs
as the `nvidia.com/gpu` extended resource, exactly as the NVIDIA device plugin would.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

POOL_LABEL = "baton.dev/pool"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
NODE_IP = "127.0.0.1"


class GPUSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int = Field(gt=0, description="GPUs per node (nvidia.com/gpu allocatable)")
    product: str = Field(description="nvidia.com/gpu.product label value")
    memory: str = Field(default="", description="nvidia.com/gpu.memory label value, in MiB")


class Pool(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=50)
    nodes: int = Field(ge=0, le=2000)
    instance_type: str = Field(alias="instanceType")
    gpu: GPUSpec | None = None
    cpu: str = "16"
    memory: str = "64Gi"
    pods: str = "110"
    labels: dict[str, str] = Field(default_factory=dict)
    taints: list[dict[str, str]] | None = Field(
        default=None, description="taints for every node; default: the nvidia.com/gpu taint on GPU pools"
    )

    def node_names(self) -> list[str]:
        return [f"{self.name}-{i}" for i in range(self.nodes)]


class PoolFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pools: list[Pool]

    @field_validator("pools")
    @classmethod
    def _unique_names(cls, pools: list[Pool]) -> list[Pool]:
        names = [p.name for p in pools]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"pool names must be unique; repeated: {', '.join(dupes)}")
        return pools


def default_pools_path() -> Path:
    return Path(str(resources.files("baton.devcluster") / "pools.yaml"))


def load_pools(path: Path | None = None) -> PoolFile:
    path = path or default_pools_path()
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read node pool file {path}: {exc}") from exc
    try:
        return PoolFile.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"invalid node pool file {path}:\n{exc}") from exc


def node_manifest(pool: Pool, name: str) -> dict[str, Any]:
    """The Node object for one fake node of `pool`."""
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "node.kubernetes.io/instance-type": pool.instance_type,
        "type": "kwok",
        POOL_LABEL: pool.name,
    }
    capacity = {"cpu": pool.cpu, "memory": pool.memory, "pods": pool.pods}
    if pool.gpu:
        labels.update(
            {
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": pool.gpu.product,
                "nvidia.com/gpu.count": str(pool.gpu.count),
            }
        )
        if pool.gpu.memory:
            labels["nvidia.com/gpu.memory"] = pool.gpu.memory
        capacity[GPU_RESOURCE] = str(pool.gpu.count)
    labels.update(pool.labels)
    taints = pool.taints if pool.taints is not None else ([GPU_TAINT] if pool.gpu else [])
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"taints": [dict(t) for t in taints]} if taints else {},
        "status": {
            "addresses": [{"type": "InternalIP", "address": NODE_IP}, {"type": "Hostname", "address": name}],
            "allocatable": dict(capacity),
            "capacity": dict(capacity),
        },
    }


def all_node_manifests(pools: PoolFile) -> list[dict[str, Any]]:
    return [node_manifest(pool, name) for pool in pools.pools for name in pool.node_names()]


def apply_pools(core_v1: Any, pools: PoolFile) -> list[str]:
    """Create or update every pool node; remove fake nodes of Baton pools no longer in the file.

    Node status (capacity, addresses) is only honoured on create and through the status subresource,
    so an existing node gets its metadata/spec patched and its status patched separately.
    """
    from kubernetes.client.rest import ApiException

    wanted = {m["metadata"]["name"]: m for m in all_node_manifests(pools)}
    for name, manifest in wanted.items():
        try:
            core_v1.create_node(manifest)
            continue
        except ApiException as exc:
            if exc.status != 409:
                raise
        current = core_v1.read_node(name)
        stale = [k for k in (current.metadata.labels or {}) if k not in manifest["metadata"]["labels"]]
        labels: dict[str, str | None] = {**{k: None for k in stale}, **manifest["metadata"]["labels"]}
        core_v1.patch_node(
            name, {"metadata": {"labels": labels}, "spec": {"taints": manifest["spec"].get("taints", [])}}
        )
        core_v1.patch_node_status(name, {"status": manifest["status"]})
    existing = core_v1.list_node(label_selector=POOL_LABEL).items
    removed = [n.metadata.name for n in existing if n.metadata.name not in wanted]
    for name in removed:
        core_v1.delete_node(name)
    return sorted(wanted)
