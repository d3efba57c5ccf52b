"""Local child processes that announce their port: what the benchmarks and the end-to-end tests start.

A `ListeningProcess` runs a command (an engine simulator, a scheduler, a proxy) in a session of its own with
its output in a log file, learns the port it bound (port 0 on 127.0.0.1) from its "listening" log line,
and waits for an HTTP path to answer 200. Every wait has a deadline and a failure message ends with the
process's last log lines; `stop()` always ends the whole session: SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

# Checks of local processes go straight to them (127.0.0.1, a pod's 127.64.x.x), never through a proxy.
from baton.direct_http import NO_PROXY_OPENER

# `baton engine-sim` logs "listening on http://HOST:PORT", `baton scheduler` "event=listening url=http://HOST:PORT"
LISTENING = re.compile(rb"listening on http://[^:\s]+:(\d+)|event=listening url=http://[^:\s]+:(\d+)")


def proc_start_time(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot), to tell it from a later process that got
    its pid (after it exited, or after a reboot): record it with the pid, and signal the pid only while
    they still match. None when no such process runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def signal_session(pid: int, sig: int) -> None:
    """`sig` to the session process `pid` leads (the process and its children); nothing when it is gone or
    is another user's (not ours to signal)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def baton_command() -> list[str]:
    """How to run the `baton` CLI of this interpreter's environment."""
    script = Path(sys.executable).with_name("baton")
    return [str(script)] if script.exists() else [sys.executable, "-m", "baton.cli"]


class ListeningProcess:
    listening = LISTENING
    poll_s = 0.05

    def __init__(self, name: str, argv: list[str], log_path: Path, *, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env if env is not None else dict(os.environ, PYTHONUNBUFFERED="1"),
                                     cwd=cwd, start_new_session=True)
        self.port: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = 3000) -> str:
        return self.log()[-n:]

    def _exited(self) -> RuntimeError:
        return RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")

    def on_listening(self, match: re.Match[bytes]) -> None:
        """Take what the 'listening' line says (subclasses read more than the port from it)."""
        self.port = int(next(g for g in match.groups() if g))

    def wait_listening(self, deadline: float) -> None:
        while self.port is None:
            match = self.listening.search(self.log_path.read_bytes())
            if match:
                self.on_listening(match)
                return
            if self.proc.poll() is not None:
                raise self._exited()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not report its port in time:\n{self.tail()}")
            time.sleep(self.poll_s)

    def wait_http_ok(self, target: str, deadline: float) -> None:
        """Until GET `target` (a path on this process, or a whole URL) answers 200."""
        url = target if "://" in target else self.url + target
        while True:
            if self.proc.poll() is not None:
                raise self._exited()
            try:
                with NO_PROXY_OPENER.open(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {url} never answered 200:\n{self.tail()}")
            time.sleep(self.poll_s)

    def wait_ready(self, path: str, deadline: float) -> None:
        self.wait_listening(deadline)
        self.wait_http_ok(path, deadline)

    def kill(self) -> None:
        """SIGKILL to the whole session: the process dies without a goodbye."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self) -> None:
        """SIGTERM to the whole session, without waiting."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, up to `timeout` seconds for a graceful exit, then SIGKILL to whatever is left of the
        session (children included)."""
        self.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        signal_session(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        self._log.close()
