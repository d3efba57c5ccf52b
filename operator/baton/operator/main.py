"""`baton operator`: run the operator against the cluster in the current kubeconfig (or in-cluster)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

import kopf


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton operator", description=__doc__)
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable; globs allowed)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (the default)")
    p.add_argument("--peering", default="", help="kopf peering name for running several replicas (default: standalone)")
    p.add_argument("--liveness", default="", help="liveness endpoint, e.g. http://127.0.0.1:8080/healthz")
    p.add_argument("--metrics-address", default="", help="serve Prometheus metrics on HOST:PORT, e.g. 127.0.0.1:9090")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--debug", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    import baton.operator.handlers  # noqa: F401  (registers the handlers)
    from baton.operator.bookkeeping import ModelMemories

    kopf.configure(verbose=args.verbose, debug=args.debug)
    if not (args.verbose or args.debug):
        # kopf logs every handler call at INFO: one line per watch event on every child and pod.
        # Baton logs what it does itself; kopf's warnings and errors still show.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if args.metrics_address:
        os.environ["BATON_METRICS_ADDRESS"] = args.metrics_address
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    asyncio.run(
        kopf.operator(
            clusterwide=not args.namespace,
            namespaces=args.namespace or None,
            standalone=not args.peering,
            peering_name=args.peering or None,
            priority=int.from_bytes(os.urandom(4), "big") >> 1 if args.peering else None,  # kopf freezes all peers of equal priority
            liveness_endpoint=args.liveness or None,
            memories=ModelMemories(),  # no per-object records for the children
        )
    )
    return 0
