"""What both sides of `baton.http1` read the same way: header field values, chunk size lines."""

from __future__ import annotations

# What a field line may hold (RFC 9110 5.5, RFC 9112 5): HTAB, SP, visible ASCII, obs-text. Deleting these
# from a head leaves exactly one CR LF pair per line end when it is well formed: one C pass finds any bare
# CR or LF, NUL or other control character.
FIELD_BYTES = bytes([0x09, *range(0x20, 0x7F), *range(0x80, 0x100)])
HEX = b"0123456789abcdefABCDEF"


def chunk_size(line: bytes) -> int:
    """The size on a chunk size line (RFC 9112 7.1): 1*HEXDIG, then BWS and chunk extensions (ignored), no
    control characters; ValueError otherwise. int(line, 16) alone would also take a sign, blanks, '_' and a
    0x prefix."""
    digits = line.split(b";", 1)[0].rstrip(b" \t")  # BWS may precede a chunk extension
    if not digits or digits.strip(HEX) or line.translate(None, FIELD_BYTES):
        raise ValueError(f"malformed chunk size line {line[:100]!r}")
    return int(digits, 16)


def connection_options(value: str) -> set[str]:
    """The Connection header's options, a comma-separated list (RFC 9110 7.6.1), lower-cased: `TE, close`
    closes the connection as `close` alone does."""
    return {option.strip(" \t").lower() for option in value.split(",")} if value else set()
