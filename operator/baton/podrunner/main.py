"""`baton pod-runner`: run local processes for the Baton pods of the current cluster until stopped."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
from pathlib import Path
from urllib.parse import urlsplit

from baton.podrunner.runner import LOOPBACK, ClaimHeld, PodRunner, packaged_models_root


def install_stop_handlers(runner: PodRunner) -> None:
    """SIGTERM, SIGINT (Ctrl-C) and SIGHUP (the terminal closed, the parent session gone) stop the runner
    cleanly: its processes stopped, its pods written unready, its claim withdrawn. None of them interrupts
    that cleanup (a second Ctrl-C included): each only asks the runner to stop. (After a SIGKILL, the next
    runner with the same workdir stops the processes left behind, and the claim expires with its lease.)"""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: runner.stop())


def remote_api_server(server: str) -> bool:
    """Whether the API server at URL `server` is anything but the local cluster's, which listens on a
    loopback address (127.0.0.0/8, by IP: a name proves nothing)."""
    try:
        return ipaddress.ip_address(urlsplit(server).hostname or "") not in LOOPBACK
    except ValueError:
        return True


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="baton pod-runner", description=__doc__)
    parser.add_argument("--namespace", "-n", help="only this namespace (default: all)")
    parser.add_argument("--workdir", default=str(Path.home() / ".local/state/baton/pod-runner"),
                        help="where materialised config files and process logs go")
    parser.add_argument("--models-root", default=str(packaged_models_root()),
                        help="directory of <model id>/config.json for Hugging Face model sources")
    parser.add_argument("--sim-speed", type=float, default=1.0, help="engine simulator time scale (0: no delays)")
    parser.add_argument("--triton-python", metavar="PYTHON", default=None,
                        help="the python of a PyTriton venv (made from Debian's python3.11) to run Triton tier pods "
                             "with (default: the one operator/baton/engine_sim/triton-venv.sh makes once per "
                             "machine, run on the first Triton pod)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from kubernetes import config

    kubeconfig = os.environ.get("KUBECONFIG")
    api_client = config.new_client_from_config(config_file=kubeconfig)
    server = api_client.configuration.host
    if remote_api_server(server):
        print(f"baton pod-runner: refusing to run against the API server at {server} (from "
              f"{kubeconfig or 'the default kubeconfig, ~/.kube/config'}): the pod runner runs Baton's pods as "
              f"processes on this machine and writes their readiness, which is only right on the local cluster, "
              f"whose API server is on 127.0.0.1. Point KUBECONFIG at it first: eval \"$(baton devcluster env)\"",
              file=sys.stderr)
        return 1
    runner = PodRunner(
        api_client=api_client, workdir=Path(args.workdir),
        namespace=args.namespace, models_root=Path(args.models_root),
        sim_args=["--sim-speed", str(args.sim_speed)], kubeconfig=kubeconfig, triton_python=args.triton_python,
    )
    install_stop_handlers(runner)
    try:
        runner.run()
    except KeyboardInterrupt:
        runner.stop()
    except ClaimHeld as exc:
        print(f"baton pod-runner: {exc}", file=sys.stderr)
        return 1
    if runner.claim_lost:
        print(f"baton pod-runner: {runner.claim_lost}", file=sys.stderr)
        return 1
    return 0
