"""Header field values both sides of `baton.http1` read the same way."""

from __future__ import annotations


def connection_options(value: str) -> set[str]:
    """The Connection header's options, a comma-separated list (RFC 9110 7.6.1), lower-cased: `TE, close`
    closes the connection as `close` alone does."""
    return {option.strip(" \t").lower() for option in value.split(",")} if value else set()
