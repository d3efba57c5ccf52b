"""`baton bench`: run one of Baton's benchmarks and write its section of BENCHMARKS.md.

    baton bench scheduler [--quick] [...]   # scheduler overhead, throughput and overload behaviour
    baton bench operator [...]              # the operator's reconcile benchmark

Each subcommand lives in its own module (`baton.bench.<name>`, exposing `main(argv) -> int`) and is
imported only when it runs.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "scheduler": ("baton.bench.scheduler", "scheduler overhead vs direct engine calls, throughput, CPU, overload"),
    "operator": ("baton.bench.operator", "operator reconcile benchmark"),
}


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: baton bench BENCHMARK [ARGS...]", "", "benchmarks:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `baton bench BENCHMARK --help` for its options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"baton bench: unknown benchmark {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _ = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"baton bench: benchmark {name!r} is not available in this build", file=sys.stderr)
            return 2
        raise
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
