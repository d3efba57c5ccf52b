"""Process checks the tests share: whether a pid still runs, and the processes of one session."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie or a dying process counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def session_pids(leader: int) -> list[int]:
    """Every process in the session `leader` leads (it included), e.g. Triton and its Python-backend stubs."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == leader:
                    pids.append(int(entry))
            except OSError:
                continue
    return pids
