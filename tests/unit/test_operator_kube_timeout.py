"""Every call to the API server has a deadline: a connection that accepts and never answers (a half-open
connection behind a failed-over load balancer) must not hold a reconcile worker forever."""

from __future__ import annotations

import socket
import threading
import time

from kubernetes import client

from baton.operator import kube as kube_module


def test_an_api_server_that_never_answers_times_out(monkeypatch):
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
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{listener.getsockname()[1]}"
    configuration.retries = False
    kube = kube_module.Kube(client.ApiClient(configuration))
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
        assert len(outcome) == 1 and isinstance(outcome[0], Exception) and time.monotonic() - started < 10
    finally:
        stop.set()
        thread.join(2)
        for conn in accepted:
            conn.close()
        listener.close()
