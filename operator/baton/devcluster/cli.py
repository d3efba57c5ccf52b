"""`baton devcluster up | down | status | kubeconfig | env | readiness`."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from baton.devcluster import binaries, pools
from baton.devcluster.controlplane import ControlPlane, ControlPlaneError


def _plane(args: argparse.Namespace, build: bool = False) -> ControlPlane:
    bin_dir = binaries.ensure_built() if build else binaries.bin_dir()
    kwargs: dict[str, Any] = {"bin_dir": bin_dir, "name": args.name}
    if args.home:
        kwargs["home"] = Path(args.home)
    return ControlPlane(**kwargs)


def core_api(kubeconfig: Path):
    from kubernetes import client, config

    return client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))


def wait_nodes_ready(core_v1, names: list[str], timeout: float = 60.0) -> None:
    """Wait until every node is Ready and the node lifecycle controller has lifted its not-ready taint
    (a moment after the Ready condition; until then the scheduler places no pod there)."""
    deadline = time.monotonic() + timeout
    pending = set(names)
    while pending and time.monotonic() < deadline:
        for node in core_v1.list_node(label_selector=pools.POOL_LABEL).items:
            ready = any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
            tainted = any(t.key == "node.kubernetes.io/not-ready" for t in node.spec.taints or [])
            if ready and not tainted:
                pending.discard(node.metadata.name)
        if pending:
            time.sleep(0.5)
    if pending:
        raise ControlPlaneError(f"nodes not Ready after {timeout:.0f}s: {', '.join(sorted(pending))}")


def pool_table(core_v1) -> str:
    """One line per pool: nodes ready/total, GPUs per node and in total, GPU product, instance type."""
    rows: dict[str, dict[str, Any]] = {}
    for node in core_v1.list_node(label_selector=pools.POOL_LABEL).items:
        labels = node.metadata.labels or {}
        row = rows.setdefault(labels[pools.POOL_LABEL], {"nodes": 0, "ready": 0, "gpus": 0, "perNode": "-",
                                                          "product": labels.get("nvidia.com/gpu.product", "-"),
                                                          "instance": labels.get("node.kubernetes.io/instance-type", "-")})
        row["nodes"] += 1
        row["ready"] += any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
        gpus = int((node.status.allocatable or {}).get(pools.GPU_RESOURCE, "0"))
        row["gpus"] += gpus
        row["perNode"] = str(gpus) if gpus else "-"
    header = ("POOL", "NODES(READY/TOTAL)", "GPUS/NODE", "GPUS", "GPU PRODUCT", "INSTANCE TYPE")
    lines = [header] + [
        (name, f"{r['ready']}/{r['nodes']}", r["perNode"], str(r["gpus"]), r["product"], r["instance"])
        for name, r in sorted(rows.items())
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def cmd_up(args: argparse.Namespace) -> int:
    pool_file = pools.load_pools(Path(args.pools) if args.pools else None)
    plane = _plane(args, build=True)
    started = time.monotonic()
    already = plane.is_healthy()
    print(f"[devcluster] {'reusing running' if already else 'starting'} cluster {plane.name!r}", file=sys.stderr)
    kubeconfig = plane.up(timeout=args.timeout)
    core_v1 = core_api(kubeconfig)
    names = pools.apply_pools(core_v1, pool_file)
    wait_nodes_ready(core_v1, names, timeout=args.timeout)
    version = plane.version().get("gitVersion", "?")
    print(f"[devcluster] Kubernetes {version} ready in {time.monotonic() - started:.1f}s; "
          f"{len(names)} fake nodes", file=sys.stderr)
    print(pool_table(core_v1), file=sys.stderr)
    print(f"[devcluster] use it with: eval \"$({devcluster_command(args.name)} env)\"", file=sys.stderr)
    print(kubeconfig)
    return 0


def devcluster_command(name: str = "baton") -> str:
    """`baton devcluster` as this process was started (`.venv/bin/baton` is not on PATH), for the hints
    printed to copy: with `--name` unless the cluster is the default one."""
    program = sys.argv[0] if Path(sys.argv[0]).name == "baton" else "baton"
    return f"{shlex.quote(program)} devcluster" + (f" --name {shlex.quote(name)}" if name != "baton" else "")


def cmd_down(args: argparse.Namespace) -> int:
    plane = _plane(args)
    plane.down()
    print(f"[devcluster] cluster {plane.name!r} stopped and its state removed", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    plane = _plane(args)
    running = plane.running_components()
    state = plane.state()
    if not state:
        print(f"cluster {plane.name!r}: not running")
        return 1
    for component, alive in running.items():
        print(f"{component:24} {'running' if alive else 'STOPPED'} (pid {state['pids'].get(component, '-')})")
    healthy = plane.is_healthy()
    print(f"{'api server':24} {'ready' if healthy else 'NOT READY'} https://127.0.0.1:{state['apiserverPort']}")
    print(f"{'kubeconfig':24} {plane.kubeconfig}")
    if healthy:
        print()
        print(pool_table(core_api(plane.kubeconfig)))
    return 0 if healthy else 1


def cmd_kubeconfig(args: argparse.Namespace) -> int:
    plane = _plane(args)
    if not plane.kubeconfig.exists():
        print(f"cluster {plane.name!r} is not running: run `baton devcluster up`", file=sys.stderr)
        return 1
    print(plane.kubeconfig)
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    plane = _plane(args)
    if not plane.kubeconfig.exists():
        print(f"cluster {plane.name!r} is not running: run `baton devcluster up`", file=sys.stderr)
        return 1
    print(f"export KUBECONFIG={shlex.quote(str(plane.kubeconfig))}")
    print(f"export PATH={shlex.quote(str(plane.bin_dir))}:\"$PATH\"")
    print("export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost")
    return 0


def cmd_readiness(args: argparse.Namespace) -> int:
    from baton.devcluster.readiness import main as readiness_main

    return readiness_main(args.kubeconfig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton devcluster", description=__doc__)
    p.add_argument("--name", default="baton", help="cluster name (default: baton)")
    p.add_argument("--home", help="state directory (default: $BATON_DEVCLUSTER_HOME or ~/.local/state/baton/devcluster)")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build the binaries if needed, start the cluster and its node pools; idempotent")
    up.add_argument("--pools", help="node pool file (default: the packaged pools.yaml)")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each readiness step")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop every component and remove the cluster's state").set_defaults(func=cmd_down)
    sub.add_parser("status", help="show components, API readiness and node pools").set_defaults(func=cmd_status)
    sub.add_parser("kubeconfig", help="print the kubeconfig path").set_defaults(func=cmd_kubeconfig)
    sub.add_parser("env", help="print shell exports: eval \"$(baton devcluster env)\"").set_defaults(func=cmd_env)
    readiness = sub.add_parser("readiness", help="run the readiness stand-in (a component `up` starts): pass the "
                               "readiness probe of pods no local process runs")
    readiness.add_argument("--kubeconfig", required=True)
    readiness.set_defaults(func=cmd_readiness)
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ControlPlaneError, ValueError) as exc:
        print(f"baton devcluster: {exc}", file=sys.stderr)
        return 1
