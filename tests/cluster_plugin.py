"""pytest plugin: the real local control plane for tests that need Kubernetes.

- `cluster` (session): brings the local cluster `baton-test` up once per test session (or reuses one
  that is already running and healthy, removing the test namespaces a killed session left on it), applies
  the default node pools and installs Baton's CRD.
  It stops the cluster at the end only if this session started it (BATON_KEEP_CLUSTER=1 keeps it).
- `namespace`: a fresh namespace per test, deleted afterwards.
- `operator`: Baton's operator running in-process (kopf's KopfRunner) against that namespace.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
# An operator run in-process (KopfRunner) must never get kopf's SIGKILL for a stop that hangs: it would
# take the whole test session with it. Tests of that kill run the operator as a process of its own.
os.environ["BATON_EXIT_TIMEOUT_SECONDS"] = "0"
CLUSTER_NAME = os.environ.get("BATON_TEST_CLUSTER", "baton-test")


def free_port() -> int:
    """A loopback port nothing listens on right now (for a local process the test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.25, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - surfaced in the failure message below
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last_exc})" if last_exc else ""))


@dataclass
class Cluster:
    kubeconfig: Path
    plane: Any
    api_client: Any

    @property
    def core(self):
        from kubernetes import client

        return client.CoreV1Api(self.api_client)

    @property
    def apps(self):
        from kubernetes import client

        return client.AppsV1Api(self.api_client)

    @property
    def custom(self):
        from kubernetes import client

        return client.CustomObjectsApi(self.api_client)

    @property
    def policy(self):
        from kubernetes import client

        return client.PolicyV1Api(self.api_client)

    @property
    def extensions(self):
        from kubernetes import client

        return client.ApiextensionsV1Api(self.api_client)

    def apply_crd(self, crd: dict[str, Any]) -> None:
        from kubernetes.client.rest import ApiException

        name = crd["metadata"]["name"]
        try:
            self.extensions.create_custom_resource_definition(crd)
        except ApiException as exc:
            if exc.status != 409:
                raise
            live = self.extensions.read_custom_resource_definition(name)
            crd = {**crd, "metadata": {**crd["metadata"], "resourceVersion": live.metadata.resource_version}}
            self.extensions.replace_custom_resource_definition(name, crd)

        def established() -> bool:
            live = self.extensions.read_custom_resource_definition(name)
            return any(c.type == "Established" and c.status == "True" for c in live.status.conditions or [])

        wait_for(established, 30, what=f"CRD {name} Established")


TEST_NAMESPACE_LABEL = "baton.dev/test=true"


def remove_leftover_test_namespaces(cluster: Cluster, timeout: float = 120.0,
                                    label: str = TEST_NAMESPACE_LABEL) -> list[str]:
    """Delete the test namespaces a killed session left on a cluster this session reuses, and wait until they
    are gone: their pods hold fake GPUs the node pools are sized to, and tests that fill a pool would wait
    for them. Returns their names."""
    from kubernetes.client.rest import ApiException

    left = [n.metadata.name for n in cluster.core.list_namespace(label_selector=label).items]
    for name in left:
        try:
            cluster.core.delete_namespace(name)
        except ApiException as exc:
            if exc.status != 404:
                raise
    if left:
        wait_for(lambda: not cluster.core.list_namespace(label_selector=label).items, timeout,
                 what=f"the test namespaces an earlier session left ({', '.join(left)}) to go")
    return left


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    from kubernetes import config

    from baton.api import crd as crd_module
    from baton.devcluster import binaries, pools
    from baton.devcluster.cli import wait_nodes_ready
    from baton.devcluster.controlplane import ControlPlane

    plane = ControlPlane(bin_dir=binaries.ensure_built(), name=CLUSTER_NAME)
    started_here = not plane.is_healthy()
    kubeconfig = plane.up(timeout=180)
    try:
        os.environ["KUBECONFIG"] = str(kubeconfig)
        os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
        os.environ["PATH"] = f"{plane.bin_dir}:{os.environ['PATH']}"
        api_client = config.new_client_from_config(config_file=str(kubeconfig))
        c = Cluster(kubeconfig=kubeconfig, plane=plane, api_client=api_client)
        names = pools.apply_pools(c.core, pools.load_pools())
        wait_nodes_ready(c.core, names, timeout=120)
        if not started_here:
            remove_leftover_test_namespaces(c)
        c.apply_crd(crd_module.crd())
    except BaseException:
        # Its components run in sessions of their own: left up, they would outlive the run and take the
        # CPUs from every test after this one.
        if started_here:
            plane.down(keep_logs=True)
        raise
    yield c
    if started_here and os.environ.get("BATON_KEEP_CLUSTER") != "1":
        plane.down()


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    from kubernetes.client.rest import ApiException

    name = f"t-{uuid.uuid4().hex[:10]}"
    cluster.core.create_namespace({"metadata": {"name": name, "labels": {"baton.dev/test": "true"}}})
    # Pods need the namespace's default ServiceAccount, which a controller creates asynchronously.
    wait_for(lambda: cluster.core.read_namespaced_service_account("default", name), 30, what="default ServiceAccount")
    yield name
    try:
        cluster.core.delete_namespace(name)
    except ApiException:
        pass


@pytest.fixture
def operator(cluster: Cluster, namespace: str) -> Iterator[Any]:
    """Baton's operator, in-process, watching only this test's namespace."""
    from kopf.testing import KopfRunner

    os.environ["BATON_WATCH_SERVER_TIMEOUT"] = "10"
    with KopfRunner(
        ["run", "--standalone", "--namespace", namespace, "-m", "baton.operator.handlers"], timeout=90
    ) as runner:
        yield runner
    assert runner.exception is None, runner.output
    assert "Traceback" not in runner.output, runner.output


@pytest.fixture
def pod_runner(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[Any]:
    """Local processes for this namespace's Baton pods (engine simulators at a fast time scale)."""
    from baton.podrunner.runner import PodRunner

    runner = PodRunner(api_client=cluster.api_client, workdir=tmp_path / "pods", namespace=namespace,
                       sim_args=["--sim-speed", "0.05"], kubeconfig=str(cluster.kubeconfig))
    thread = runner.start()
    yield runner
    runner.stop()
    thread.join(timeout=30)


def load_example(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "examples" / name).read_text())
