"""The local control plane's record of its processes (no cluster): `state.json` names each component by its
pid and that process's start time, so a pid another process has taken since (after a reboot) is never
signalled, while the components `up` started are stopped by `down`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from baton.devcluster.controlplane import ControlPlane
from baton.localproc import proc_start_time
from process_harness import alive

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_down_stops_the_components_up_started_and_never_a_process_that_took_a_recorded_pid(tmp_path: Path) -> None:
    plane = ControlPlane(bin_dir=tmp_path / "bin", home=tmp_path)
    plane.dir.mkdir(parents=True)
    component = subprocess.Popen(SLEEP, start_new_session=True)
    bystander = subprocess.Popen(SLEEP, start_new_session=True)  # has the pid etcd had before a reboot
    try:
        (plane.dir / "state.json").write_text(json.dumps({
            "pids": {"etcd": bystander.pid, "kube-apiserver": component.pid},
            "pidStarts": {"etcd": "1", "kube-apiserver": proc_start_time(component.pid)}}))
        running = plane.running_components()
        assert (running["etcd"], running["kube-apiserver"]) == (False, True)
        plane.down()
        assert component.wait(timeout=15) == -signal.SIGTERM
        assert alive(bystander.pid), "down signalled a process it did not start"
        assert not plane.dir.exists()
    finally:
        for proc in (component, bystander):
            proc.kill()
            proc.wait(timeout=10)


def test_a_cluster_an_older_up_started_is_still_stopped_by_down(tmp_path: Path) -> None:
    """A state.json from before start times were recorded: its components are judged as that `up` judged
    them (a process runs under the pid), so `down` stops them rather than deleting their directory under them."""
    plane = ControlPlane(bin_dir=tmp_path / "bin", home=tmp_path)
    plane.dir.mkdir(parents=True)
    component = subprocess.Popen(SLEEP, start_new_session=True)
    try:
        (plane.dir / "state.json").write_text(json.dumps({"pids": {"etcd": component.pid}}))
        assert plane.running_components()["etcd"]
        plane.down()
        assert component.wait(timeout=15) == -signal.SIGTERM
        assert not plane.dir.exists()
    finally:
        component.kill()
        component.wait(timeout=10)


def test_clusters_under_one_home_get_pod_cidrs_of_their_own(tmp_path: Path) -> None:
    """KWOK hands out pod IPs from the start of its CIDR: two clusters on one CIDR gave their first pods the same
    loopback addresses, and the pod runners' engine processes collided on them."""
    import json

    from baton.devcluster.controlplane import POD_CIDR

    first = ControlPlane(bin_dir=tmp_path / "bin", home=tmp_path, name="baton")
    assert first._pod_cidr() == POD_CIDR == "127.64.0.1/16"  # the first one: as documented
    first.dir.mkdir(parents=True)
    first._save_state({"name": "baton", "podCidr": first._pod_cidr()})
    second = ControlPlane(bin_dir=tmp_path / "bin", home=tmp_path, name="baton-test")
    assert second._pod_cidr() == "127.65.0.1/16"
    older = tmp_path / "old"  # a state written before clusters had one: it has the fixed CIDR
    older.mkdir()
    (older / "state.json").write_text(json.dumps({"name": "old"}))
    second.dir.mkdir(parents=True)
    second._save_state({"name": "baton-test", "podCidr": "127.65.0.1/16"})
    assert ControlPlane(bin_dir=tmp_path / "bin", home=tmp_path, name="third")._pod_cidr() == "127.66.0.1/16"
    assert second._pod_cidr() == "127.65.0.1/16"  # its own state does not count against it


def test_the_printed_hints_name_the_baton_that_was_run_and_the_cluster(monkeypatch):
    """`.venv/bin/baton` is not on PATH: the hints to copy name the program as it was started, and a cluster
    other than the default by --name (`devcluster down` without it would stop another cluster)."""
    from baton.devcluster.cli import devcluster_command

    monkeypatch.setattr(sys, "argv", [".venv/bin/baton", "demo"])
    assert devcluster_command() == ".venv/bin/baton devcluster"
    assert devcluster_command("my cluster") == ".venv/bin/baton devcluster --name 'my cluster'"
    monkeypatch.setattr(sys, "argv", ["/usr/lib/python3/site-packages/baton/cli.py"])  # python -m baton.cli
    assert devcluster_command() == "baton devcluster"
