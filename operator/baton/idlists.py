"""JSON token-id lists read as bytes: cut out of a request, counted and checked without being decoded.

A prompt sent as token ids is one JSON integer per token, and decoding it (one Python int per id) is
most of the cost of reading such a request: ~270 µs for the trace's mean prompt of 2,048 ids. The
scheduler only needs the prompt's length and passes the ids on; the engine simulator only needs their
length, a checksum and their JSON. Both cut the list out of the body (`cut_id_list`) and work on its
text with bytes methods, which run at C speed; anything unusual falls back to decoding.

Lists accepted on the fast path are flat lists of non-negative integers without leading zeros, and
`cut_id_list` hands them back compact (`[1,2,3]`, the same whichever client spacing they came with).
"""

from __future__ import annotations

import json
import re
from typing import Any

_DIGITS_AND_COMMAS = b"0123456789,"
_WHITESPACE = b" \t\r\n"
_LEADING_ZERO = re.compile(rb",0[0-9]")
_SPLIT_NUMBER = re.compile(rb"[0-9][ \t\r\n]+[0-9]")


class RawJSON(bytes):
    """An already-serialized JSON value, spliced into a body as is (never decoded)."""


def count_ids(inner: bytes) -> int | None:
    """How many ids `inner` (a JSON list's text between its brackets) holds when it is a flat list of
    non-negative integers; None for anything else, which the caller then decodes normally. Bytes methods
    only (a regular expression just for unusual spacing): several times faster than decoding the list."""
    read = _read_ids(inner)
    return None if read is None else read[0]


def _read_ids(inner: bytes) -> tuple[int, bytes] | None:
    """`count_ids`, and the ids as `1,2,3` (`inner` itself when it holds no spacing)."""
    if not inner.translate(None, _DIGITS_AND_COMMAS):
        compact = inner  # only digits and commas (a compact list): no spacing to look at
    else:
        compact = inner.translate(None, _WHITESPACE)
        spaces = len(inner) - len(compact)
        if not spaces or compact.translate(None, _DIGITS_AND_COMMAS):
            return None  # something other than digits, commas and spacing
        if spaces != inner.count(b", ") and _SPLIT_NUMBER.search(inner):
            return None  # "1 2" is not two ids (spacing other than one space after each comma is checked)
    if not compact:
        return 0, compact
    if (b",," in compact or compact[:1] == b"," or compact[-1:] == b","
            or (compact[:1] == b"0" and compact[1:2] not in (b",", b""))
            or (b",0" in compact and _LEADING_ZERO.search(compact))):
        return None
    return compact.count(b",") + 1, compact


def ids_text(ids: list[int]) -> bytes:
    """A decoded list's ids as `1,2,3` (what `cut_id_list` gives between the brackets)."""
    return ",".join(map(str, ids)).encode()


_AS_D = bytes.maketrans(b"0123456789", b"dddddddddd")
_EXACTLY: dict[int, re.Pattern[bytes]] = {}


def all_below(compact: bytes, limit: int) -> bool:
    """Whether every id of `compact` (`1,2,3`, as `ids_text` writes them) is below `limit` (> 0).

    The ids have no leading zeros, so an id with more digits than `limit` is larger, one with fewer is
    smaller, and ids with as many digits compare as text: only those are read. With every digit made a
    `d`, substring searches find how long the ids are (a regular expression trying each position took
    ten times as long)."""
    digits = len(str(limit))
    framed = b"," + compact + b","
    shape = framed.translate(_AS_D)
    if b"d" * (digits + 1) + b"," in shape:
        return False
    if b"," + b"d" * digits + b"," not in shape:
        return True
    exactly = _EXACTLY.get(digits)
    if exactly is None:
        exactly = _EXACTLY[digits] = re.compile(rb",([0-9]{%d})(?=,)" % digits)
    return max(exactly.findall(framed)) < str(limit).encode()


def cut_id_list(data: bytes, key: bytes, name: str, check: bool = True) -> tuple[Any, RawJSON | None, int]:
    """`data` decoded except for the top-level `name` (spelled `key` in JSON) when that holds a flat list of
    non-negative integers: `(object with [] in its place, the list's raw JSON, its length)`. A checked
    list's raw JSON is compact (`[1,2,3]`, spacing dropped), so its ids are `raw[1:-1]`.

    Anything unusual (the key seen more than once, a value that is not such a list, the key not at the
    top level) falls back to decoding everything, with `None` for the raw list. `check=False` skips
    checking and counting the ids (the length is then 0): for lists that are only passed on to an engine,
    which checks them itself. Raises ValueError when `data` is not JSON.
    """
    at = data.find(key)
    if at >= 0 and data.find(key, at + 1) < 0:
        start = data.find(b"[", at)
        end = data.find(b"]", start) if start >= 0 else -1
        count = None
        raw = data[start: end + 1]
        if end > 0 and data[at + len(key): start].strip() == b":":
            if not check:
                count = 0
            else:
                read = _read_ids(raw[1:-1])
                if read is not None:
                    count, compact = read
                    if len(compact) != len(raw) - 2:
                        raw = b"[" + compact + b"]"
        if count is not None:
            try:
                obj = json.loads(data[:start] + b"[]" + data[end + 1:])
            except ValueError:  # unchecked, the cut was not around one flat list (a nested one, a "]" in a string)
                obj = None
            if isinstance(obj, dict) and obj.get(name) == []:
                return obj, RawJSON(raw), count
    return json.loads(data), None, 0
