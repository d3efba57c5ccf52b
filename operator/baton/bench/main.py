"""`baton bench`: run one of Baton's benchmarks and write its section of BENCHMARKS.md.

    baton bench scheduler [--quick] [...]   # scheduler overhead, throughput and overload behaviour
    baton bench operator [...]              # the operator's reconcile benchmark

Each subcommand lives in its own module (`baton.bench.<name>`, exposing `main(argv) -> int`) and is
imported only when it runs.
"""

from __future__ import annotations

import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "scheduler": ("baton.bench.scheduler", "scheduler overhead vs direct engine calls, throughput, CPU, overload"),
    "operator": ("baton.bench.operator", "operator reconcile benchmark"),
}


def main(argv: list[str] | None = None) -> int:
    from baton.cli import dispatch

    return dispatch("baton bench", "benchmark", SUBCOMMANDS, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    raise SystemExit(main())
