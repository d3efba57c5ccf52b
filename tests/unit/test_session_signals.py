"""The test session's own signal handling (tests/conftest.py): what CI's timeout or a `kill` does to it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_sigterm_ends_a_session_with_its_fixtures_torn_down(tmp_path):
    """A SIGTERM mid-test ends the session as Ctrl-C does: session fixtures are torn down, so the cluster,
    redis-server and engines a session started do not outlive it."""
    ready, torn_down = tmp_path / "ready", tmp_path / "torn-down"
    (tmp_path / "test_sleeper.py").write_text(f"""
import time
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def resource():
    yield
    Path({str(torn_down)!r}).write_text("torn down")


def test_sleeps(resource):
    Path({str(ready)!r}).write_text("ready")
    time.sleep(60)
""")
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    session = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                                "--rootdir", str(tmp_path), str(tmp_path / "test_sleeper.py")],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline and session.poll() is None:
            time.sleep(0.05)
        assert ready.exists(), session.communicate(timeout=5)[0].decode()
        session.send_signal(signal.SIGTERM)
        output = session.communicate(timeout=30)[0].decode()
    finally:
        if session.poll() is None:
            session.kill()
    assert torn_down.read_text() == "torn down", output
    assert session.returncode != 0
