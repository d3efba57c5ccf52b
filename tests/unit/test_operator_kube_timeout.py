"""Every call to the API server has a deadline: a connection that accepts and never answers (a half-open
connection behind a failed-over load balancer) must not hold a reconcile worker forever, nor for several
deadlines in a row (the reconcile pass and kopf retry; the HTTP client must not as well)."""

from __future__ import annotations

import socket
import threading
import time

import yaml

from kubernetes.client.rest import ApiException

from baton.operator import kube as kube_module
from baton.operator.reconciler import transient


def test_an_api_server_that_never_answers_times_out_once(monkeypatch, tmp_path):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept():  # take connections, read nothing, answer nothing
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    monkeypatch.setattr(kube_module, "REQUEST_TIMEOUT", (1.0, 1.0))
    # The operator's own client, as it builds it outside a pod: from $KUBECONFIG.
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{listener.getsockname()[1]}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kube = kube_module.Kube()
    outcome: list[BaseException | object] = []

    def call():  # in a thread of its own, so that a call without a deadline fails this test instead of hanging it
        try:
            outcome.append(kube.get("ConfigMap", "ns", "x"))
        except Exception as exc:  # noqa: BLE001 - the timeout, whatever urllib3 calls it
            outcome.append(exc)

    caller = threading.Thread(target=call, daemon=True)
    started = time.monotonic()
    try:
        caller.start()
        caller.join(10)
        assert not caller.is_alive(), "the call to an API server that never answers is still waiting"
        took = time.monotonic() - started
        assert len(outcome) == 1 and isinstance(outcome[0], ApiException)
        # no answer is "not now" (a transient error, retried with the pass's short backoff), not a bug
        assert outcome[0].status == 0 and transient(outcome[0]), outcome[0]
        # One read deadline on one connection, not one per retry (four, with urllib3's default of three retries).
        assert took < 3.5 and len(accepted) == 1, f"{took:.1f}s over {len(accepted)} connections"
    finally:
        stop.set()
        thread.join(2)
        for conn in accepted:
            conn.close()
        listener.close()
