"""urllib openers for addresses Baton reaches directly, never through a proxy from the environment.

Pod IPs (the operator's handoff probe and drain checks, the demo's requests to the scheduler pod) and
loopback processes (the local control plane, engine simulators, schedulers) are always reachable
directly. urllib's default opener applies HTTP(S)_PROXY to every address NO_PROXY does not list, and
NO_PROXY rarely lists pod CIDRs or 127.64.x.x, so with a proxy configured for egress those requests
would go to the proxy, which cannot reach them (or, worse, reaches something else).
"""

from __future__ import annotations

import ssl
import urllib.request

NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def no_proxy_opener(context: ssl.SSLContext) -> urllib.request.OpenerDirector:
    """An opener for HTTPS with `context` (a private CA), likewise never through a proxy."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
