"""`baton pod-runner`: run local processes for the Baton pods of the current cluster until stopped."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path

from baton.podrunner.runner import PodRunner, packaged_models_root


def install_stop_handlers(runner: PodRunner) -> None:
    """SIGTERM and SIGHUP (the terminal closed, the parent session gone) stop the runner cleanly: its
    processes stopped, its claim withdrawn. (After a SIGKILL, the next runner with the same workdir stops
    the processes left behind, and the claim expires with its lease.)"""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: runner.stop())


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
    runner = PodRunner(
        api_client=config.new_client_from_config(config_file=kubeconfig), workdir=Path(args.workdir),
        namespace=args.namespace, models_root=Path(args.models_root),
        sim_args=["--sim-speed", str(args.sim_speed)], kubeconfig=kubeconfig, triton_python=args.triton_python,
    )
    install_stop_handlers(runner)
    try:
        runner.run()
    except KeyboardInterrupt:
        runner.stop()
    return 0
