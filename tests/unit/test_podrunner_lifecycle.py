"""The pod runner's life cycle (no cluster): departed pods stopped together without holding up the others,
processes a killed runner left behind stopped by the next one, an exited process's whole session ended,
SIGHUP as SIGTERM, pods left unready by a runner that stops, a claim that expires, a runner that stops once
its own claim lapsed, never two runners for the same pods, and never one on a cluster other than the local one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from baton import demo
from baton.podrunner import main as podrunner_main
from baton.podrunner import runner as podrunner
from baton.podrunner.runner import ALL_NAMESPACES_CLAIM, CLAIM_ANNOTATION, LocalProcess, PodRunner, claim_value
from kubernetes.client import ApiClient
from process_harness import alive
from test_podrunner_sync import FakeCore, make_runner, scheduler_pod

REPO = Path(__file__).resolve().parents[2]
IGNORES_SIGTERM = "import signal, time; signal.signal(signal.SIGTERM, lambda *a: None); time.sleep(60)"


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_departed_pods_get_their_own_grace_period_while_the_others_are_tended(tmp_path: Path) -> None:
    """As the kubelet stops a deleted pod's container: SIGTERM, then SIGKILL after the pod's
    terminationGracePeriodSeconds (not a fixed time of the runner's), in the background; and a new pod at a
    departed one's IP starts as soon as that one's process is gone, whatever the others still stopping."""
    core = FakeCore()
    runner = make_runner(tmp_path, core, tend=True, stop_grace_s=1.0)
    started: list[str] = []
    runner._start = lambda local: started.append(local.key)
    procs = []
    for i, (name, grace) in enumerate([("old-0", 1.0), ("old-1", 4.0), ("live-0", 30.0)]):
        core.pods.append(scheduler_pod(name, name, f"127.64.0.{20 + i}"))
        local = LocalProcess(key=f"ns/{name}", uid=name, argv=[], env={}, probe_url=None, log_path=tmp_path / f"{name}.log",
                             pod_ip=f"127.64.0.{20 + i}", ready=True)
        local.grace_s = grace  # the pod's terminationGracePeriodSeconds (translate reads it from the pod's spec)
        local.proc = subprocess.Popen([sys.executable, "-c", IGNORES_SIGTERM], start_new_session=True)
        procs.append(local.proc)
        runner.processes[local.key] = local
    try:
        time.sleep(0.3)  # the SIGTERM handlers are in place
        # the old generation is deleted; new pods take the old ones' IPs; live-0's process crashes
        core.cms[("ns", "m-scheduler")] = {"config.yaml": "model: m\n"}
        core.pods = [core.pods[2], scheduler_pod("new-0", "new-0", "127.64.0.20"),
                     scheduler_pod("new-1", "new-1", "127.64.0.21")]
        procs[2].kill()
        procs[2].wait(timeout=10)
        t0 = time.monotonic()
        runner.sync()
        assert time.monotonic() - t0 < 0.8, "the pass waited for the departed pods' processes"
        assert core.conditions("live-0")[0][1] == "ProcessExited", "the live pod was not tended meanwhile"
        assert "ns/new-0" not in runner.processes, "started while the old process at its IP still runs"
        assert _wait_for(lambda: procs[0].poll() is not None, 3.0), "old-0 not stopped after its grace period"
        assert procs[0].returncode == -signal.SIGKILL
        assert _wait_for(lambda: "127.64.0.20" not in runner._stopping_ips(), 1.0), "old-0's IP still held"
        assert procs[1].poll() is None, "old-1 killed before its own grace period was over"
        runner.sync()
        assert "ns/new-0" in runner.processes and started[-1] == "ns/new-0", "new-0 waited for another pod's process"
        assert "ns/new-1" not in runner.processes
        assert _wait_for(lambda: procs[1].poll() is not None, 5.0)
        assert 3.5 < time.monotonic() - t0 and procs[1].returncode == -signal.SIGKILL
        assert _wait_for(lambda: not runner._stopping, 1.0)
        runner.sync()
        assert "ns/new-1" in runner.processes
        # meanwhile the waiting pods said what they waited for
        assert core.conditions("new-0")[0] == ("False", "PreviousPodStopping", "waiting for the process of departed "
                                               "pod ns/old-0, which had this pod's IP 127.64.0.20, to stop")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def test_the_runners_own_shutdown_is_bounded_whatever_the_grace_periods(tmp_path: Path) -> None:
    """A stopping runner (SIGTERM, `baton devcluster down`, a test's teardown) gives its processes, and the
    departed pods' ones still stopping, at most `stop_grace_s`, not their pods' minutes."""
    core = FakeCore()
    core.pods = [scheduler_pod("live-0", "u-live", "127.64.0.30"), scheduler_pod("gone-0", "u-gone", "127.64.0.31")]
    runner = make_runner(tmp_path, core, tend=True, stop_grace_s=1.0)
    runner._start = lambda local: None
    runner._reaped = True
    procs = []
    for pod in core.pods:
        local = LocalProcess(key=f"ns/{pod.metadata.name}", uid=pod.metadata.uid, argv=[], env={}, probe_url=None,
                             log_path=tmp_path / f"{pod.metadata.name}.log", pod_ip=pod.status.pod_ip)
        local.grace_s = 120.0
        local.proc = subprocess.Popen([sys.executable, "-c", IGNORES_SIGTERM], start_new_session=True)
        procs.append(local.proc)
        runner.processes[local.key] = local
    time.sleep(0.3)
    core.pods = core.pods[:1]  # gone-0 is deleted: its process stops in the background, with 120 s of grace
    thread = runner.start()
    try:
        assert _wait_for(lambda: runner._stopping, 5.0)
        t0 = time.monotonic()
        runner.stop()
        thread.join(timeout=20)
        assert not thread.is_alive() and time.monotonic() - t0 < 6.0, "the runner waited out its pods' grace periods"
        assert [proc.poll() for proc in procs] == [-signal.SIGKILL, -signal.SIGKILL]
    finally:
        runner.stop()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


CHILD_RUNNER = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{tests!r}, {shared!r}]
    from pathlib import Path
    from baton.podrunner.runner import LocalProcess
    from test_podrunner_sync import FakeCore, make_runner, scheduler_pod
    core = FakeCore(); core.pods = [scheduler_pod()]
    runner = make_runner(Path({tmp!r}), core, tend=True)
    runner.translate = lambda pod: LocalProcess(key="ns/m-scheduler-abc", uid="u1", probe_url=None, env={{}},
        argv=[sys.executable, "-c", "import time; time.sleep(120)"], log_path=Path({tmp!r}) / "p.log")
    runner.run(interval=0.1)
""")


def test_the_processes_a_killed_runner_left_are_stopped_by_the_next(tmp_path: Path) -> None:
    script = CHILD_RUNNER.format(tests=str(REPO / "tests" / "unit"), shared=str(REPO / "tests"), tmp=str(tmp_path))
    runner_proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid_dir = tmp_path / "work" / ".pids"
    mine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    child = None
    try:
        assert _wait_for(lambda: any(pid_dir.glob("*.json")), 20), "the runner never started its process"
        child = int(next(pid_dir.glob("*.json")).stem)
        runner_proc.kill()  # no goodbye: its process keeps running
        runner_proc.wait(timeout=10)
        assert alive(child)
        # a live runner's process (this test's own) is never taken for a leftover
        other = make_runner(tmp_path / "other", FakeCore(), tend=True)
        other._start = lambda local: None
        local = LocalProcess(key="ns/x", uid="x", argv=[], env={}, probe_url=None, log_path=tmp_path / "x.log")
        local.proc = mine
        other.pid_dir = pid_dir
        other._write_pidfile(local)

        successor = make_runner(tmp_path, FakeCore(), tend=True)
        assert successor.reap_orphans(grace_s=2.0) == [child]
        assert _wait_for(lambda: not alive(child), 5.0), "the leftover process still runs"
        assert mine.poll() is None, "the process of a live runner was stopped"
        assert [p.name for p in pid_dir.glob("*.json")] == [f"{mine.pid}.json"]
    finally:
        if runner_proc.poll() is None:
            runner_proc.kill()
            runner_proc.wait(timeout=10)
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)
        mine.kill()
        mine.wait(timeout=10)


def test_sighup_stops_the_runner_as_sigterm_does() -> None:
    stopped: list[bool] = []

    class Stub:
        def stop(self) -> None:
            stopped.append(True)

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        podrunner_main.install_stop_handlers(Stub())
        os.kill(os.getpid(), signal.SIGHUP)
        assert _wait_for(lambda: stopped, 2.0)
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_for(lambda: len(stopped) == 2, 2.0)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_second_ctrl_c_does_not_abort_the_cleanup() -> None:
    """SIGINT only asks the runner to stop, as SIGTERM does: a KeyboardInterrupt raised in the middle of
    stopping the processes and writing the pods unready (a second Ctrl-C) would leave both half done."""
    stopped: list[bool] = []

    class Stub:
        def stop(self) -> None:
            stopped.append(True)

    interrupted: list[bool] = []
    saved = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))  # stands in for KeyboardInterrupt
    try:
        podrunner_main.install_stop_handlers(Stub())
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGINT)
        assert _wait_for(lambda: len(stopped) == 2, 2.0) and not interrupted, "Ctrl-C interrupts the runner"
    finally:
        signal.signal(signal.SIGINT, saved)


def test_the_restart_back_off_starts_over_after_ten_minutes_without_an_exit(tmp_path: Path) -> None:
    """As the kubelet's: a process that crashed often gets ever longer back-offs, but one that then ran
    BACKOFF_RESET_S before exiting is restarted after the first back-off again (restartCount still counts)."""
    runner = make_runner(tmp_path, FakeCore(), tend=True)
    pod = SimpleNamespace(metadata=SimpleNamespace(namespace="ns", name="p"))

    def crash(ran_s: float) -> float:
        """The back-off after an exit of a process that ran `ran_s`."""
        local.proc = subprocess.Popen(["true"])
        local.proc.wait(timeout=10)
        local.started_mono = time.monotonic() - ran_s
        runner._tend(local, pod)
        return local.next_start - time.monotonic()

    local = LocalProcess(key="ns/p", uid="u", argv=["true"], env={}, probe_url=None, log_path=tmp_path / "p.log")
    local.restarts = local.crashes = 6  # it crashed often: the back-off is at its longest
    runner._start = lambda local: None
    assert 25 < crash(ran_s=5.0) <= 30
    assert 0.5 < crash(ran_s=10 * 60 + 1) <= 1.0, "the back-off did not start over"
    assert 1.5 < crash(ran_s=5.0) <= 2.0
    assert local.restarts == 9


def test_the_claim_is_a_lease_the_runner_renews_and_a_dead_runner_loses(tmp_path: Path) -> None:
    core = FakeCore()
    runner = make_runner(tmp_path, core, tend=True)
    runner.claim()
    value = core.annotations["ns"][CLAIM_ANNOTATION]
    assert podrunner.claim_identity(value) == runner._identity
    assert podrunner.claim_live(value) and not podrunner.claim_live(value, now=time.time() + podrunner.CLAIM_LEASE_S + 2)
    assert podrunner.claim_live("host/1/abc"), "a claim without a lease (written by hand) holds"
    assert not podrunner.claim_live(None)

    runner._claim_renewed -= podrunner.CLAIM_LEASE_S  # time for a renewal
    core.annotations["ns"][CLAIM_ANNOTATION] = "stale"
    runner.renew_claim()
    assert podrunner.claim_identity(core.annotations["ns"][CLAIM_ANNOTATION]) == runner._identity
    runner.release()
    assert CLAIM_ANNOTATION not in core.annotations["ns"]


def sleeper_runner(tmp_path: Path, core: FakeCore, **kwargs) -> PodRunner:
    """A runner whose every pod's process is a plain sleep (no probe: Ready once it runs)."""
    runner = make_runner(tmp_path, core, tend=True, stop_grace_s=1.0, **kwargs)
    runner.translate = lambda pod: LocalProcess(
        key=f"{pod.metadata.namespace}/{pod.metadata.name}", uid=pod.metadata.uid, probe_url=None, env={},
        argv=[sys.executable, "-c", "import time; time.sleep(60)"], log_path=tmp_path / f"{pod.metadata.name}.log")
    return runner


SPAWNS_A_CHILD_AND_EXITS = ("import subprocess, sys; child = subprocess.Popen([sys.executable, '-c', 'import time; "
                            "time.sleep(60)']); open(sys.argv[1], 'w').write(str(child.pid)); sys.exit(3)")


def test_a_process_that_cannot_be_started_is_backed_off_and_shown_as_a_start_error(tmp_path: Path) -> None:
    """As a container runtime that cannot start a container (the venv's interpreter gone, say): a restart
    counted, CrashLoopBackOff with back-off, StartError as the last termination and the reason on the pod,
    instead of an exception logged once and a retry every half second with the pod still "Starting"."""
    runner = make_runner(tmp_path, FakeCore(), tend=True)
    pod = SimpleNamespace(metadata=SimpleNamespace(namespace="ns", name="p"))
    local = LocalProcess(key="ns/p", uid="u", argv=[str(tmp_path / "no-such-python"), "-m", "baton"], env={},
                         probe_url=None, log_path=tmp_path / "p.log")
    runner._tend(local, pod)
    assert local.proc is None and local.restarts == 1
    assert local.state["waiting"]["reason"] == "CrashLoopBackOff"
    assert local.last_terminated["reason"] == "StartError" and local.last_terminated["exitCode"] == 128
    assert "no-such-python" in local.last_terminated["message"]
    assert local.next_start - time.monotonic() > 0.5
    runner._tend(local, pod)  # within the back-off: not tried again
    assert local.restarts == 1
    entry = runner._container_entry(local, False)
    assert entry["restartCount"] == 1 and entry["lastState"]["terminated"]["reason"] == "StartError"


def test_a_process_that_exits_takes_the_rest_of_its_session_with_it(tmp_path: Path) -> None:
    """A Triton pod's server is a child of the simulator: left running after the simulator exited, it would
    keep the pod's ports, and every restart would fail to bind them."""
    runner = make_runner(tmp_path, FakeCore(), tend=True)
    child_file = tmp_path / "child.pid"
    local = LocalProcess(key="ns/p", uid="u", argv=[sys.executable, "-c", SPAWNS_A_CHILD_AND_EXITS, str(child_file)],
                         env={}, probe_url=None, log_path=tmp_path / "p.log")
    pod = SimpleNamespace(metadata=SimpleNamespace(namespace="ns", name="p"))
    child = None
    try:
        runner._tend(local, pod)  # starts it
        local.proc.wait(timeout=20)
        child = int(child_file.read_text())
        assert alive(child)
        runner._tend(local, pod)  # sees it exit
        assert _wait_for(lambda: not alive(child), 5.0), "the exited process's child still runs"
    finally:
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)
        runner._stop_process(local, grace_s=1.0)


def test_a_runner_that_stops_leaves_its_pods_unready(tmp_path: Path) -> None:
    core = FakeCore()
    core.pods = [scheduler_pod()]
    runner = sleeper_runner(tmp_path, core)
    thread = runner.start()
    try:
        assert _wait_for(lambda: core.conditions("m-scheduler-abc")[-1:] == [
            ("True", "ProbeSucceeded", "readiness probe succeeded")], 10.0)
        proc = runner.processes["ns/m-scheduler-abc"].proc
    finally:
        runner.stop()
        thread.join(timeout=15)
    assert proc.poll() is not None
    assert core.conditions("m-scheduler-abc")[-1] == (
        "False", "PodRunnerStopped", "the pod runner stopped, and with it this pod's local process")
    assert CLAIM_ANNOTATION not in core.annotations["ns"]


def test_a_runner_whose_claim_lapsed_stops_its_processes_and_exits(tmp_path: Path) -> None:
    """`baton devcluster down` under a running runner: the API server is gone and the claim cannot be
    renewed. Once a whole lease has passed, its processes are stopped (the next cluster hands the same pod
    IPs out again) and the runner exits, saying why."""
    core = FakeCore()
    core.pods = [scheduler_pod()]
    runner = sleeper_runner(tmp_path, core, claim_lease_s=1)
    thread = runner.start()
    try:
        assert _wait_for(lambda: "ns/m-scheduler-abc" in runner.processes and runner.processes["ns/m-scheduler-abc"].proc,
                         10.0)
        proc = runner.processes["ns/m-scheduler-abc"].proc

        def gone(*args, **kwargs):
            raise ConnectionRefusedError(111, "Connection refused")

        for call in ("list_namespaced_pod", "read_namespace", "patch_namespace", "patch_namespaced_pod_status"):
            setattr(core, call, gone)
        thread.join(timeout=10)
        assert not thread.is_alive(), "the runner carried on with a claim that lapsed"
        assert proc.poll() is not None, "its process still runs"
        assert "could not renew its claim" in runner.claim_lost and "Connection refused" in runner.claim_lost
    finally:
        runner.stop()
        thread.join(timeout=15)


def test_a_runner_does_not_start_over_the_live_claim_of_another(tmp_path: Path) -> None:
    core = FakeCore()
    other = claim_value("elsewhere/4242/abc")
    core.annotations["ns"] = {CLAIM_ANNOTATION: other}
    runner = make_runner(tmp_path, core)
    with pytest.raises(RuntimeError) as refused:
        runner.claim()
    assert core.annotations["ns"] == {CLAIM_ANNOTATION: other}, "the other runner's claim was taken over"
    assert "namespace ns is claimed by pod runner elsewhere/4242/abc" in str(refused.value)
    assert "kubectl annotate namespace ns baton.dev/pod-runner-)" in str(refused.value)

    # a claim of every namespace covers this one; a claim of any namespace bars a runner of every namespace
    core.annotations = {"kube-system": {ALL_NAMESPACES_CLAIM: other}}
    with pytest.raises(RuntimeError, match="every namespace is claimed by pod runner elsewhere/4242/abc"):
        make_runner(tmp_path, core).claim()
    core.annotations = {"kube-system": {}, "ns": {CLAIM_ANNOTATION: other}}
    everywhere = PodRunner(ApiClient(), tmp_path / "everywhere")
    everywhere.core = core
    with pytest.raises(RuntimeError, match="namespace ns is claimed by pod runner elsewhere/4242/abc"):
        everywhere.claim()
    assert ALL_NAMESPACES_CLAIM not in core.annotations["kube-system"]

    # the claim of a runner that was killed lapses with its lease: then it is taken over
    core.annotations = {"ns": {CLAIM_ANNOTATION: claim_value("elsewhere/4242/abc", now=time.time() - 120)}}
    runner.claim()
    assert podrunner.claim_identity(core.annotations["ns"][CLAIM_ANNOTATION]) == runner._identity



def _orphan_of_a_killed_runner(runner: PodRunner) -> tuple[subprocess.Popen, int]:
    """An engine process left running by a runner of this host that was SIGKILLed (its pid file says so), and
    that runner's pid (no longer running)."""
    import json

    from baton.localproc import proc_start_time

    killed = subprocess.Popen(["true"])
    killed.wait()
    orphan = subprocess.Popen(["sleep", "60"], start_new_session=True)
    runner.pid_dir.mkdir(parents=True, exist_ok=True)
    (runner.pid_dir / f"{orphan.pid}.json").write_text(json.dumps({
        "pid": orphan.pid, "start": proc_start_time(orphan.pid), "key": "ns/m-decode-0",
        "runner_pid": killed.pid, "runner_start": "1"}))
    return orphan, killed.pid


def test_the_runner_after_a_killed_one_takes_its_claim_and_stops_what_it_left(tmp_path: Path) -> None:
    """A SIGKILLed runner's claim is still within its lease, but its holder (a pid of this host) is gone:
    the next runner takes the claim at once and stops the processes the dead one left behind."""
    import socket

    core = FakeCore()
    runner = make_runner(tmp_path, core)
    orphan, killed_pid = _orphan_of_a_killed_runner(runner)
    try:
        core.annotations["ns"] = {CLAIM_ANNOTATION: claim_value(f"{socket.gethostname()}/{killed_pid}/abc")}
        runner.start()
        assert podrunner.claim_identity(core.annotations["ns"][CLAIM_ANNOTATION]) == runner._identity
        assert _wait_for(lambda: orphan.poll() is not None, 15), "the dead runner's process was left running"
    finally:
        runner.stop()
        if orphan.poll() is None:
            orphan.kill()


def test_a_runner_that_may_not_start_stops_nothing(tmp_path: Path) -> None:
    """Refused by another runner's live claim, a runner leaves every process alone: whatever its workdir
    holds is not its to stop."""
    core = FakeCore()
    core.annotations["ns"] = {CLAIM_ANNOTATION: claim_value("elsewhere/4242/abc")}
    runner = make_runner(tmp_path, core)
    orphan, _ = _orphan_of_a_killed_runner(runner)
    try:
        with pytest.raises(podrunner.ClaimHeld):
            runner.start()
        time.sleep(0.3)
        assert orphan.poll() is None, "a runner that did not start stopped a process"
    finally:
        orphan.kill()


def test_the_runner_refuses_an_api_server_that_is_not_the_local_clusters(tmp_path: Path, monkeypatch, capsys) -> None:
    """With KUBECONFIG unset it would take ~/.kube/config: on a real cluster it would claim kube-system and
    write the readiness of every Baton pod."""
    started: list[dict] = []

    class StubRunner:
        claim_lost = None

        def __init__(self, **kwargs) -> None:
            started.append(kwargs)

        def run(self) -> None:
            pass

    monkeypatch.setattr(podrunner_main, "PodRunner", StubRunner)
    monkeypatch.setattr(podrunner_main, "install_stop_handlers", lambda runner: None)

    def use_cluster(server: str) -> None:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": server}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))

    use_cluster("https://10.20.0.1:6443")
    assert podrunner_main.main(["--workdir", str(tmp_path / "work")]) == 1
    assert started == [], "it ran against a real cluster"
    error = capsys.readouterr().err
    assert "refusing to run against the API server at https://10.20.0.1:6443" in error
    assert 'eval "$(baton devcluster env)"' in error

    use_cluster("https://127.0.0.1:6443")  # the local cluster's
    assert podrunner_main.main(["--workdir", str(tmp_path / "work")]) == 0
    assert len(started) == 1


def test_the_demo_waits_for_the_claim_of_the_runner_it_started(tmp_path: Path) -> None:
    core = FakeCore()
    core.annotations["ns"] = {CLAIM_ANNOTATION: claim_value("host/4242/abc", now=time.time() - 120)}  # long gone
    started = SimpleNamespace(pid=os.getpid(), returncode=None, poll=lambda: None)  # this process plays the runner
    with pytest.raises(SystemExit, match="did not claim namespace ns"):
        demo.wait_claimed(core, "ns", started, tmp_path / "runner.log", timeout=0.5)
    make_runner(tmp_path, core).claim()
    demo.wait_claimed(core, "ns", started, tmp_path / "runner.log", timeout=5)
