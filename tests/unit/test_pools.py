"""The node pool file: parsing, validation errors, and the Node objects it becomes."""

from pathlib import Path

import pytest

from baton.devcluster import pools


def test_default_pool_file_matches_the_documented_defaults():
    p = {pool.name: pool for pool in pools.load_pools().pools}
    assert (p["prefill-h100"].nodes, p["prefill-h100"].gpu.count) == (2, 8)
    assert (p["decode-l40s"].nodes, p["decode-l40s"].gpu.count) == (4, 4)
    assert p["system"].nodes == 2 and p["system"].gpu is None


def test_gpu_node_manifest_is_a_fake_loopback_node_with_gpu_labels_and_taint():
    pool = pools.load_pools().pools[0]
    node = pools.node_manifest(pool, "prefill-h100-0")
    assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
    assert node["metadata"]["labels"][pools.POOL_LABEL] == "prefill-h100"
    assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert node["status"]["addresses"][0] == {"type": "InternalIP", "address": "127.0.0.1"}
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert node["spec"]["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]


def test_cpu_pool_nodes_have_no_gpu_and_no_taint():
    system = next(p for p in pools.load_pools().pools if p.name == "system")
    node = pools.node_manifest(system, "system-0")
    assert "nvidia.com/gpu" not in node["status"]["capacity"]
    assert node["spec"] == {}


def test_invalid_pool_file_names_the_problem(tmp_path: Path):
    bad = tmp_path / "pools.yaml"
    bad.write_text("pools:\n  - {name: a, nodes: 1, instanceType: x}\n  - {name: a, nodes: 2, instanceType: y}\n")
    with pytest.raises(ValueError, match="repeated: a"):
        pools.load_pools(bad)
    bad.write_text("pools:\n  - {name: a, nodes: -1, instanceType: x, gpus: 8}\n")
    with pytest.raises(ValueError) as err:
        pools.load_pools(bad)
    assert "nodes" in str(err.value) and "gpus" in str(err.value)
