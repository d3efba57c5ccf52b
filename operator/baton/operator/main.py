"""`baton operator`: run the operator against the cluster in the current kubeconfig (or in-cluster)."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import urllib.parse

import kopf


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton operator", description=__doc__)
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable; globs allowed)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (the default)")
    p.add_argument("--peering", default="", help="kopf peering name for running several replicas (default: standalone)")
    p.add_argument("--liveness", default="",
                   help="liveness endpoint, e.g. http://127.0.0.1:8080/healthz (an IPv6 host may be left unbracketed)")
    p.add_argument("--metrics-address", default="",
                   help="serve Prometheus metrics on HOST:PORT, e.g. 127.0.0.1:9090 or [fd00::5]:9090")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--debug", action="store_true")
    return p


def _host_port(address: str) -> tuple[str, str]:
    """HOST:PORT, [IPV6]:PORT or IPV6:PORT (the port is what follows the last colon) as (host without
    brackets, port). The chart builds both addresses from `$(POD_IP)`, which is unbracketed on IPv6."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{address!r} is not HOST:PORT: {host!r} is no IPv6 address") from None
    return host, port


def liveness_endpoint(url: str) -> str:
    """`url` with an IPv6 host in brackets, as kopf needs it (it reads the port with urlsplit, which fails on
    `http://fd00::5:8081/healthz`); any other URL unchanged."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if netloc.startswith("[") or netloc.count(":") < 2:
        return url
    host, port = _host_port(netloc)
    return urllib.parse.urlunsplit(parts._replace(netloc=f"[{host}]:{port}"))


def metrics_address(address: str) -> str:
    """`address` as HOST:PORT with the host unbracketed, the form the metrics server is started from (the
    port after the last colon, the rest the host to bind, IPv6 included)."""
    host, port = _host_port(address)
    return f"{host}:{port}"


def main(argv: list[str]) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        liveness = liveness_endpoint(args.liveness) if args.liveness else None
        metrics = metrics_address(args.metrics_address) if args.metrics_address else ""
    except ValueError as e:
        p.error(str(e))
    import baton.operator.handlers  # noqa: F401  (registers the handlers)
    from baton.operator.bookkeeping import ModelMemories

    kopf.configure(verbose=args.verbose, debug=args.debug)
    if not (args.verbose or args.debug):
        # kopf logs every handler call at INFO: one line per watch event on every child and pod.
        # Baton logs what it does itself; kopf's warnings and errors still show.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if metrics:
        os.environ["BATON_METRICS_ADDRESS"] = metrics
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    asyncio.run(
        kopf.operator(
            clusterwide=not args.namespace,
            namespaces=args.namespace or None,
            standalone=not args.peering,
            peering_name=args.peering or None,
            priority=int.from_bytes(os.urandom(4), "big") >> 1 if args.peering else None,  # kopf freezes all peers of equal priority
            liveness_endpoint=liveness,
            memories=ModelMemories(),  # no per-object records for the children
        )
    )
    return 0
