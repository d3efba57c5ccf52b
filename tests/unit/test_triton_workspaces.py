"""The Triton front end's workspaces: a killed simulator's (SIGKILL skips every cleanup, ~20 MB each) is
removed by the next one to start on the machine; a live one's, or one this code did not make, never."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from baton.engine_sim.triton_frontend import WORKSPACE_OWNER, WORKSPACE_PREFIX, new_workspace, sweep_stale_workspaces
from baton.localproc import proc_start_time


def workspace(root: Path, name: str, owner: str | None) -> Path:
    path = root / f"{WORKSPACE_PREFIX}{name}"
    (path / "workspace" / "model-store").mkdir(parents=True)
    (path / "workspace" / "tritonserver").write_bytes(b"\0" * 1024)
    if owner is not None:
        (path / WORKSPACE_OWNER).write_text(owner)
    return path


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_the_workspaces_of_simulators_that_are_gone_are_removed(tmp_path):
    me = os.getpid()
    killed = workspace(tmp_path, "killed", f"{dead_pid()} 12345\n")
    reused = workspace(tmp_path, "reused", f"{me} {int(proc_start_time(me)) - 1}\n")  # our pid, another start
    live = workspace(tmp_path, "live", f"{me} {proc_start_time(me)}\n")
    unmarked = workspace(tmp_path, "unmarked", None)  # an older version's, or one being made right now
    garbled = workspace(tmp_path, "garbled", "not a pid\n")
    other = tmp_path / "something-else"
    other.mkdir()
    (other / WORKSPACE_OWNER).write_text(f"{dead_pid()} 1\n")

    removed = sweep_stale_workspaces(str(tmp_path))

    assert sorted(removed) == sorted([str(killed), str(reused)])
    assert not killed.exists() and not reused.exists()
    assert live.exists() and unmarked.exists() and garbled.exists() and other.exists()


def test_a_new_workspace_is_marked_with_its_process(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    path = Path(new_workspace())
    assert path.parent == tmp_path and path.name.startswith(WORKSPACE_PREFIX)
    assert (path / WORKSPACE_OWNER).read_text().split() == [str(os.getpid()), proc_start_time(os.getpid())]
    assert sweep_stale_workspaces(str(tmp_path)) == [] and path.exists()


def test_without_proc_a_workspace_is_left_unmarked_and_never_swept(tmp_path, monkeypatch):
    """No /proc (no start times): a live simulator's workspace must not look like a dead one's."""
    import baton.engine_sim.triton_frontend as frontend

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setattr(frontend, "proc_start_time", lambda pid: None)
    path = Path(new_workspace())
    assert not (path / WORKSPACE_OWNER).exists()
    assert sweep_stale_workspaces(str(tmp_path)) == [] and path.exists()
