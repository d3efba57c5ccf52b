"""Locate, and on first use build, the pinned control-plane binaries.

The versions are pinned in `build-binaries.sh` beside this module; the binaries land in a per-user
cache directory keyed by those versions (`$BATON_TESTBED_CACHE`, default `~/.cache/baton-testbed`),
so every clone on a machine shares one build and a version bump builds afresh.
"""

from __future__ import annotations

import os
import subprocess
from importlib import resources
from pathlib import Path

BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "kwokctl",
    "helm",
)


def build_script() -> Path:
    return Path(str(resources.files("baton.devcluster") / "build-binaries.sh"))


def bin_dir() -> Path:
    """Where the binaries for the pinned versions live (whether or not they are built yet)."""
    out = subprocess.run(
        ["bash", str(build_script()), "--print-bin"], check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip())


def monitoring_crds_dir() -> Path:
    """The Prometheus Operator's ServiceMonitor and PrometheusRule CRDs (fetched with the binaries)."""
    out = subprocess.run(
        ["bash", str(build_script()), "--print-crds"], check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip())


def missing(directory: Path) -> list[str]:
    return [b for b in BINARIES if not os.access(directory / b, os.X_OK)]


def ensure_built() -> Path:
    """Build whatever is missing (streaming the build's progress to the terminal); return the bin dir."""
    directory = bin_dir()
    if missing(directory) or not any(monitoring_crds_dir().glob("*.yaml")):
        subprocess.run(["bash", str(build_script())], check=True)
        still = missing(directory)
        if still:
            raise RuntimeError(f"build finished but these binaries are missing in {directory}: {', '.join(still)}")
    return directory
