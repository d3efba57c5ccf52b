"""The `baton` command line: one entry point, one subcommand per job.

Each subcommand lives in its own module and owns its own argument parsing; this module only
dispatches, importing the subcommand lazily so `baton devcluster status` does not pay for kopf,
and `baton engine-sim` does not pay for the Kubernetes client.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help). Each module exposes `main(argv: list[str]) -> int`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "devcluster": ("baton.devcluster.cli", "bring up, inspect and tear down the local Kubernetes control plane"),
    "crd": ("baton.api.crd", "print the DisaggregatedModel CRD generated from the API models"),
    "api-reference": ("baton.api.reference", "write docs/api-reference.md from the API models"),
    "operator": ("baton.operator.main", "run the operator (kopf) against the current kubeconfig"),
    "convert": ("baton.convert", "turn a TensorRT-LLM disaggregated_config.yaml into a DisaggregatedModel"),
    "demo": ("baton.demo", "run Baton's main job on the local cluster, end to end"),
    "engine-sim": ("baton.engine_sim.main", "run the TensorRT-LLM engine simulator (a stand-in for trtllm-serve)"),
    "scheduler": ("baton.scheduler.main", "run Baton's request scheduler"),
    "replay": ("baton.replay", "replay a request trace against a scheduler and report latencies"),
    "pod-runner": ("baton.podrunner.main", "run local processes for Baton pods placed on fake nodes"),
    "bench": ("baton.bench.main", "run Baton's benchmarks and write BENCHMARKS.md"),
}


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: baton COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `baton COMMAND --help` for a command's own options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        from baton import __version__

        print(f"baton {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"baton: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _ = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"baton: command {name!r} is not available in this build", file=sys.stderr)
            return 2
        raise
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
