"""The pod runner's life cycle (no cluster): departed pods stopped together without holding up the others,
processes a killed runner left behind stopped by the next one, SIGHUP as SIGTERM, a claim that expires."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from baton.podrunner import main as podrunner_main
from baton.podrunner import runner as podrunner
from baton.podrunner.runner import CLAIM_ANNOTATION, LocalProcess
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


def test_departed_pods_are_stopped_together_while_the_others_are_tended(tmp_path: Path) -> None:
    core = FakeCore()
    runner = make_runner(tmp_path, core, tend=True, stop_grace_s=1.0)
    started: list[str] = []
    runner._start = lambda local: started.append(local.key)
    procs = []
    for i, name in enumerate(["old-0", "old-1", "live-0"]):
        core.pods.append(scheduler_pod(name, name, f"127.64.0.{20 + i}"))
        local = LocalProcess(key=f"ns/{name}", uid=name, argv=[], env={}, probe_url=None, log_path=tmp_path / f"{name}.log",
                             pod_ip=f"127.64.0.{20 + i}", ready=True)
        local.proc = subprocess.Popen([sys.executable, "-c", IGNORES_SIGTERM], start_new_session=True)
        procs.append(local.proc)
        runner.processes[local.key] = local
    try:
        time.sleep(0.3)  # the SIGTERM handlers are in place
        # the old generation is deleted; a new pod takes old-0's IP; live-0's process crashes
        core.cms[("ns", "m-scheduler")] = {"config.yaml": "model: m\n"}
        core.pods = [core.pods[2], scheduler_pod("new-0", "new-0", "127.64.0.20")]
        procs[2].kill()
        procs[2].wait(timeout=10)
        t0 = time.monotonic()
        runner.sync()
        assert time.monotonic() - t0 < 0.8, "the pass waited for the departed pods' processes"
        assert core.conditions("live-0")[0][1] == "ProcessExited", "the live pod was not tended meanwhile"
        assert "ns/new-0" not in runner.processes, "started while the old process at its IP still runs"
        assert _wait_for(lambda: not runner._stopping, 4.0), "not stopped within one shared grace period (+ margin)"
        assert procs[0].returncode == procs[1].returncode == -signal.SIGKILL
        runner.sync()
        assert "ns/new-0" in runner.processes and started[-1] == "ns/new-0"
    finally:
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
