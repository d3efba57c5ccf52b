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


def _usage(prog: str, noun: str, subcommands: dict[str, tuple[str, str]]) -> str:
    width = max(len(name) for name in subcommands)
    lines = [f"usage: {prog} {noun.upper()} [ARGS...]", "", f"{noun}s:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in subcommands.items()]
    lines += ["", f"Run `{prog} {noun.upper()} --help` for its own options."]
    return "\n".join(lines)


def dispatch(prog: str, noun: str, subcommands: dict[str, tuple[str, str]], args: list[str]) -> int:
    """Run `args[0]`'s module (`main(argv) -> int`) with the rest of the arguments, imported lazily."""
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage(prog, noun, subcommands))
        return 0
    name, rest = args[0], args[1:]
    if name not in subcommands:
        print(f"{prog}: unknown {noun} {name!r}\n\n{_usage(prog, noun, subcommands)}", file=sys.stderr)
        return 2
    module_name, _ = subcommands[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"{prog}: {noun} {name!r} is not available in this build", file=sys.stderr)
            return 2
        raise
    return int(module.main(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["-V"], ["--version"]):
        from baton import __version__

        print(f"baton {__version__}")
        return 0
    return dispatch("baton", "command", SUBCOMMANDS, args)


if __name__ == "__main__":
    raise SystemExit(main())
