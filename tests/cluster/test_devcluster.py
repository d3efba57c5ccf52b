"""The local control plane behaves like a real cluster: GPU pools, scheduling, GC, CRD validation,
and every address on loopback."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
from kubernetes.client.rest import ApiException

from baton.devcluster import pools
from cluster_plugin import CLUSTER_NAME, wait_for
from proxy_harness import environment_proxy

pytestmark = pytest.mark.cluster


def _gpu_statefulset(name: str, replicas: int, gpus: int, pool: str) -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name},
        "spec": {
            "serviceName": name,
            "replicas": replicas,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "nodeSelector": {pools.POOL_LABEL: pool},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [{
                        "name": "engine", "image": "engine:test",
                        "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                    }],
                },
            },
        },
    }


def test_each_pool_has_its_nodes_with_gpu_capacity_labels_and_taints(cluster):
    expected = pools.load_pools()
    nodes = cluster.core.list_node(label_selector=pools.POOL_LABEL).items
    by_pool: dict[str, list] = {}
    for node in nodes:
        by_pool.setdefault(node.metadata.labels[pools.POOL_LABEL], []).append(node)
    for pool in expected.pools:
        members = by_pool.get(pool.name, [])
        assert len(members) == pool.nodes, f"pool {pool.name}"
        for node in members:
            assert any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)
            labels = node.metadata.labels
            assert labels["node.kubernetes.io/instance-type"] == pool.instance_type
            taints = [(t.key, t.effect) for t in node.spec.taints or []]
            if pool.gpu:
                assert node.status.allocatable["nvidia.com/gpu"] == str(pool.gpu.count)
                assert node.status.capacity["nvidia.com/gpu"] == str(pool.gpu.count)
                assert labels["nvidia.com/gpu.product"] == pool.gpu.product
                assert ("nvidia.com/gpu", "NoSchedule") in taints
            else:
                assert "nvidia.com/gpu" not in (node.status.allocatable or {})
                assert taints == []
    # The defaults the issue asks for: 2 x 8 H100 for prefill, 4 x 4 L40S for decode, 2 CPU nodes.
    gpus = {p: sum(int(n.status.allocatable.get("nvidia.com/gpu", 0)) for n in ns) for p, ns in by_pool.items()}
    assert gpus == {"prefill-h100": 16, "decode-l40s": 16, "system": 0}


def test_gpu_statefulset_runs_only_on_its_pool(cluster, namespace):
    cluster.apps.create_namespaced_stateful_set(namespace, _gpu_statefulset("prefill", 2, 8, "prefill-h100"))

    def running_pods():
        pods = cluster.core.list_namespaced_pod(namespace, label_selector="app=prefill").items
        ready = [p for p in pods if p.status.phase == "Running"
                 and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]
        return ready if len(ready) == 2 else None

    pods = wait_for(running_pods, 60, what="2 Running and Ready prefill pods")
    nodes = {p.spec.node_name for p in pods}
    pool_of = {n.metadata.name: n.metadata.labels[pools.POOL_LABEL]
               for n in cluster.core.list_node(label_selector=pools.POOL_LABEL).items}
    assert {pool_of[n] for n in nodes} == {"prefill-h100"}
    assert len(nodes) == 2, "two 8-GPU pods cannot share one 8-GPU node"
    sts = wait_for(lambda: (s := cluster.apps.read_namespaced_stateful_set("prefill", namespace)).status.ready_replicas == 2 and s,
                   30, what="StatefulSet readyReplicas=2")
    assert sts.status.ready_replicas == 2


def test_pod_asking_for_more_gpus_than_any_node_stays_pending_with_the_schedulers_reason(cluster, namespace):
    pod = _gpu_statefulset("huge", 1, 16, "prefill-h100")["spec"]["template"]
    cluster.core.create_namespaced_pod(namespace, {"metadata": {"name": "huge", "labels": pod["metadata"]["labels"]},
                                                   "spec": pod["spec"]})

    def unschedulable():
        p = cluster.core.read_namespaced_pod("huge", namespace)
        cond = next((c for c in p.status.conditions or [] if c.type == "PodScheduled"), None)
        return cond if cond and cond.status == "False" and cond.reason == "Unschedulable" else None

    cond = wait_for(unschedulable, 60, what="PodScheduled=False Unschedulable")
    assert "Insufficient nvidia.com/gpu" in cond.message
    assert cluster.core.read_namespaced_pod("huge", namespace).status.phase == "Pending"


def test_deleting_an_owner_garbage_collects_its_dependents(cluster, namespace):
    owner = cluster.core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}, "data": {}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    cluster.core.create_namespaced_config_map(namespace, {"metadata": {"name": "dependent", "ownerReferences": [ref]}})
    cluster.core.create_namespaced_service(namespace, {
        "metadata": {"name": "dependent-svc", "ownerReferences": [ref]},
        "spec": {"clusterIP": "None", "ports": [{"port": 80}]}})
    cluster.core.delete_namespaced_config_map("owner", namespace)

    def gone():
        names = {c.metadata.name for c in cluster.core.list_namespaced_config_map(namespace).items}
        services = {s.metadata.name for s in cluster.core.list_namespaced_service(namespace).items}
        return "dependent" not in names and "dependent-svc" not in services

    wait_for(gone, 60, what="dependents garbage-collected")


def test_crd_structural_schema_and_cel_rule_reject_a_bad_object_with_the_api_servers_message(cluster):
    group = f"t{uuid.uuid4().hex[:8]}.example.com"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group, "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {"spec": {
                    "type": "object",
                    "properties": {"min": {"type": "integer"}, "max": {"type": "integer"}},
                    "x-kubernetes-validations": [{"rule": "self.min <= self.max", "message": "min must not exceed max"}],
                }},
            }}}],
        },
    }
    cluster.apply_crd(crd)
    try:
        obj = {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"min": 5, "max": 1}}
        wait_for(lambda: _served(cluster, group), 20, what="CRD served")
        with pytest.raises(ApiException) as err:
            cluster.custom.create_namespaced_custom_object(group, "v1", "default", "widgets", obj)
        assert err.value.status == 422
        assert "min must not exceed max" in err.value.body
        good = {**obj, "metadata": {"name": "ok"}, "spec": {"min": 1, "max": 5}}
        assert cluster.custom.create_namespaced_custom_object(group, "v1", "default", "widgets", good)
    finally:
        cluster.extensions.delete_custom_resource_definition(f"widgets.{group}")


def _served(cluster, group):
    cluster.custom.list_namespaced_custom_object(group, "v1", "default", "widgets")
    return True


def _pod(name: str, labels: dict, probe: bool) -> dict:
    container = {"name": "engine", "image": "engine:test", "ports": [{"containerPort": 8000}]}
    if probe:
        container["readinessProbe"] = {"httpGet": {"path": "/health", "port": 8000}}
    return {"metadata": {"name": name, "labels": labels},
            "spec": {"nodeSelector": {pools.POOL_LABEL: "decode-l40s"},
                     "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                     "containers": [container]}}


def _ready(cluster, namespace, name):
    pod = cluster.core.read_namespaced_pod(name, namespace)
    return pod, next((c for c in pod.status.conditions or [] if c.type == "Ready"), None)


def test_a_pod_with_a_readiness_probe_is_ready_only_once_something_passes_the_probe(cluster, namespace):
    """As on a kubelet: no probe, Ready at once; a probe, Ready when it passes. The readiness stand-in
    passes it for pods nothing runs; pods a pod runner claimed wait for that runner's probe."""
    from baton.podrunner.runner import CLAIM_ANNOTATION

    cluster.core.patch_namespace(namespace, {"metadata": {"annotations": {CLAIM_ANNOTATION: "test/claim"}}})
    baton_labels = {"app.kubernetes.io/managed-by": "baton-operator", "baton.dev/tier": "decode"}
    cluster.core.create_namespaced_pod(namespace, _pod("plain", {"app": "plain"}, probe=False))
    cluster.core.create_namespaced_pod(namespace, _pod("probed", {"app": "probed"}, probe=True))
    cluster.core.create_namespaced_pod(namespace, _pod("run-locally", baton_labels, probe=True))

    def ready_with(name, reason):
        pod, ready = _ready(cluster, namespace, name)
        return pod if ready and ready.status == "True" and ready.reason == reason else None

    wait_for(lambda: ready_with("plain", None), 60, what="the probe-less pod Ready from KWOK")
    probed = wait_for(lambda: ready_with("probed", "ReadinessStandIn"), 60, what="the probed pod Ready from the stand-in")
    assert all(s.ready for s in probed.status.container_statuses)
    # The claimed Baton pod started (Running, an IP) but nothing probed it: not Ready, however long.
    time.sleep(3)
    pod, ready = _ready(cluster, namespace, "run-locally")
    assert pod.status.phase == "Running" and pod.status.pod_ip
    assert (ready.status, ready.reason) == ("False", "ReadinessProbePending")
    assert not any(s.ready for s in pod.status.container_statuses)



def test_pods_of_a_runner_that_died_are_taken_over_once_its_claim_lapses(cluster, namespace):
    """A runner that died without withdrawing its claim (SIGKILL) leaves pods nothing will ever probe:
    once the claim's lease has run out, the stand-in passes their probe as it does for any pod nothing runs."""
    from baton.podrunner.runner import CLAIM_ANNOTATION, claim_value

    lease_s = 4

    def renew_claim() -> float:
        """What a live runner does: renew its claim (for `lease_s` from now); when."""
        now = time.time()
        cluster.core.patch_namespace(namespace, {"metadata": {"annotations": {
            CLAIM_ANNOTATION: claim_value("test/dead-runner", now, lease_s=lease_s)}}})
        return now

    renew_claim()
    baton_labels = {"app.kubernetes.io/managed-by": "baton-operator", "baton.dev/tier": "prefill"}
    cluster.core.create_namespaced_pod(namespace, _pod("orphan", baton_labels, probe=True))

    def running_with_an_ip():
        renew_claim()  # the runner is alive all along, however long the pod takes to start
        return _ready(cluster, namespace, "orphan")[0].status.pod_ip

    wait_for(running_with_an_ip, 60, what="the pod running with an IP")
    # While the claim holds (renewed at most 0.5 s ago, for 4 s), the pod is the runner's, however long the
    # stand-in has had to look at it.
    hold_until = time.monotonic() + 2
    while time.monotonic() < hold_until:
        last_renewal = renew_claim()
        time.sleep(0.5)
    _, ready = _ready(cluster, namespace, "orphan")
    assert (ready.status, ready.reason) == ("False", "ReadinessProbePending")
    # The runner dies (no more renewals).

    def taken_over():
        _, ready = _ready(cluster, namespace, "orphan")
        return ready if ready.status == "True" else None

    ready = wait_for(taken_over, 60, what="the orphaned pod Ready from the stand-in after the claim lapsed")
    assert ready.reason == "ReadinessStandIn"
    # Not before the lease of the last renewal ran out. The claim counts whole seconds (its renewal time is
    # truncated to the second, so it lapses after int(renewal) + lease) and so does the condition's
    # lastTransitionTime (the stand-in's clock, this machine's, truncated): exact, no margin needed.
    lapsed = datetime.fromtimestamp(int(last_renewal) + lease_s, timezone.utc)
    assert ready.last_transition_time >= lapsed, f"Ready at {ready.last_transition_time}, the claim held until {lapsed}"

def test_every_node_and_pod_address_is_loopback(cluster, namespace):
    cluster.apps.create_namespaced_stateful_set(namespace, _gpu_statefulset("addr", 2, 1, "decode-l40s"))
    wait_for(lambda: len([p for p in cluster.core.list_namespaced_pod(namespace).items if p.status.pod_ip]) == 2,
             60, what="pods with IPs")
    loopback = ipaddress.ip_network("127.0.0.0/8")
    addresses = []
    for node in cluster.core.list_node().items:
        addresses += [a.address for a in node.status.addresses if a.type in ("InternalIP", "ExternalIP")]
    for pod in cluster.core.list_pod_for_all_namespaces().items:
        addresses += [ip.ip for ip in pod.status.pod_ips or []] + [ip.ip for ip in pod.status.host_ips or []]
    assert addresses, "expected node and pod addresses"
    assert all(ipaddress.ip_address(a) in loopback for a in addresses), sorted(set(addresses))
    server = cluster.api_client.configuration.host
    assert server.startswith("https://127.0.0.1:"), server


def test_every_control_plane_listener_is_on_loopback(cluster):
    """Read the kernel's socket tables for the components' listening sockets."""
    pids = cluster.plane.component_pids()
    inodes: set[str] = set()
    for pid in pids.values():
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = fd.readlink().as_posix()
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    listeners = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A = LISTEN
                listeners.append((table, local))
    # Every component but the readiness stand-in (an API client only) listens somewhere.
    assert len(listeners) >= len(pids) - 1, listeners
    for table, local in listeners:
        addr_hex = local.split(":")[0]
        if table.endswith("tcp"):
            ip = ipaddress.IPv4Address(bytes.fromhex(addr_hex)[::-1])
        else:
            raw = bytes.fromhex(addr_hex)
            ip = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
        assert ip.is_loopback, f"{ip} listening ({table})"


def test_devcluster_cli_up_is_idempotent_and_env_gives_a_working_shell(cluster):
    baton = [sys.executable, "-m", "baton.cli", "devcluster", "--name", CLUSTER_NAME]
    up = subprocess.run([*baton, "up"], capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr
    assert "reusing running cluster" in up.stderr
    assert up.stdout.strip() == str(cluster.kubeconfig)
    again = subprocess.run([*baton, "kubeconfig"], capture_output=True, text=True, timeout=60)
    assert again.stdout.strip() == str(cluster.kubeconfig)
    env = subprocess.run([*baton, "env"], capture_output=True, text=True, timeout=60)
    shell = subprocess.run(["bash", "-c", env.stdout + "\nkubectl get nodes -l baton.dev/pool=prefill-h100 -o name"],
                           capture_output=True, text=True, timeout=60)
    assert shell.returncode == 0, shell.stderr
    assert sorted(shell.stdout.split()) == ["node/prefill-h100-0", "node/prefill-h100-1"]
    status = subprocess.run([*baton, "status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0
    assert "prefill-h100" in status.stdout and "2/2" in status.stdout


def test_control_plane_checks_never_go_through_a_proxy(cluster, monkeypatch):
    """The local control plane is on loopback: its health checks reach it even with HTTP(S)_PROXY set and
    no NO_PROXY, and the proxy sees nothing."""
    with environment_proxy(monkeypatch) as hits:
        assert cluster.plane.version()["major"] == "1"
        assert cluster.plane.is_healthy()
    assert hits == []


def test_the_test_namespaces_a_killed_session_left_are_removed_before_a_reused_cluster_serves_again(cluster):
    """A session killed before its teardown leaves its namespaces, whose pods hold fake GPUs; the next session,
    reusing the cluster, removes those (and nothing else) before its tests run."""
    from cluster_plugin import remove_leftover_test_namespaces

    label = f"baton.dev/leftover-{uuid.uuid4().hex[:6]}"  # this test's own: other tests' namespaces stay
    left = [f"t-left-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    other = f"keep-{uuid.uuid4().hex[:6]}"
    for name in left:
        cluster.core.create_namespace({"metadata": {"name": name, "labels": {label: "true"}}})
    cluster.core.create_namespace({"metadata": {"name": other}})
    try:
        assert sorted(remove_leftover_test_namespaces(cluster, label=f"{label}=true")) == sorted(left)
        for name in left:
            with pytest.raises(ApiException) as gone:
                cluster.core.read_namespace(name)
            assert gone.value.status == 404
        assert cluster.core.read_namespace(other).status.phase == "Active"
    finally:
        cluster.core.delete_namespace(other)
