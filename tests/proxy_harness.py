"""A recording HTTP proxy on 127.0.0.1, installed as the environment's HTTP_PROXY: what checks that must
never use a proxy are tested against."""

from __future__ import annotations

import contextlib
import http.server
import threading
import urllib.request
from collections.abc import Iterator


@contextlib.contextmanager
def environment_proxy(monkeypatch) -> Iterator[list[str]]:
    """Yields the paths of the requests that reached the proxy (it answers each 502), as the proxy saw
    them: "http://HOST:PORT/path" for plain HTTP, "HOST:PORT" for an HTTPS tunnel (CONNECT)."""
    hits: list[str] = []

    class Proxy(http.server.BaseHTTPRequestHandler):
        def answer(self):
            hits.append(self.path)
            self.send_response(502)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_CONNECT = answer  # noqa: N815 - http.server's names

        def log_message(self, *args):
            pass

    proxy = http.server.HTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.server_port}")
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen's opener takes the proxies in force now
        yield hits
    finally:
        proxy.shutdown()
        proxy.server_close()
