"""JSON token-id lists read as bytes: cut out of a request, counted and checked without being decoded.

A prompt sent as token ids is one JSON integer per token, and decoding it (one Python int per id) is
most of the cost of reading such a request: ~270 µs for the trace's mean prompt of 2,048 ids. The
scheduler only needs the prompt's length and passes the ids on; the engine simulator only needs their
length, a checksum and their JSON. Both cut the list out of the body (`cut_id_list`) and work on its
text at C speed: with bytes methods, and with bit operations on the text read as one big integer (each
of which costs a fraction of a substring search through such a text); anything unusual falls back to
decoding.

Lists accepted on the fast path are flat lists of non-negative integers without leading zeros, and
`cut_id_list` hands them back compact (`[1,2,3]`, the same whichever client spacing they came with).
"""

from __future__ import annotations

import binascii
import json
import re
from typing import Any

_DIGITS_AND_COMMAS = b"0123456789,"
_WHITESPACE = b" \t\r\n"
_SPACE = ord(" ")  # `in` bytes tries its operand as a byte value first: a bytes operand costs a TypeError
_LEADING_ZERO = re.compile(rb",0[0-9]")
_SPLIT_NUMBER = re.compile(rb"[0-9][ \t\r\n]+[0-9]")


class RawJSON(bytes):
    """An already-serialized JSON value, spliced into a body as is (never decoded)."""


def count_ids(inner: bytes) -> int | None:
    """How many ids `inner` (a JSON list's text between its brackets) holds when it is a flat list of
    non-negative integers; None for anything else, which the caller then decodes normally. Bytes methods
    and big-integer operations (a regular expression just for unusual spacing, or for a list holding the
    id 0): several times faster than decoding the list."""
    read = _read_ids(inner)
    return None if read is None else read[0]


def _read_ids(inner: bytes) -> tuple[int, bytes] | None:
    """`count_ids`, and the ids as `1,2,3` (`inner` itself when it holds no spacing)."""
    try:
        if _SPACE not in inner[:16]:  # else spaced (after each comma, or indented): strip that first
            count = _count_compact(inner)
            return None if count is None else (count, inner)
    except binascii.Error:  # a byte other than a digit or a comma: spacing, or not a list of ids
        pass
    compact = inner.translate(None, _WHITESPACE)
    spaces = len(inner) - len(compact)
    if not spaces:
        return None  # something other than digits, commas and spacing
    if spaces != inner.count(b", ") and _SPLIT_NUMBER.search(inner):
        return None  # "1 2" is not two ids (spacing other than one space after each comma is checked)
    try:
        count = _count_compact(compact)
    except binascii.Error:
        return None  # something other than digits, commas and spacing
    return None if count is None else (count, compact)


# A compact list's bytes as hex digits, that is four bits each: a comma 0011, a 0 0010, any other digit
# 1000. Any other byte becomes an x, which is not a hex digit (so `binascii.unhexlify` refuses it).
_NIBBLES = bytes(b"32888888888"[b",0123456789".index(byte)] if byte in b",0123456789" else ord("x")
                 for byte in range(256))


def _count_compact(text: bytes) -> int | None:
    """How many ids `text` holds when it is a compact list's text (`1,2,3`: non-negative integers without
    leading zeros, between single commas); None when it is digits and commas but not such a list. Raises
    binascii.Error when it holds any other byte.

    The text is read as one integer, four bits per byte (`_NIBBLES`, the first byte in the top bits, 0000
    after the last when there is an odd number of them), and a few operations on it, each cheaper than one
    substring search through such a text, check and count the ids: `bits & bits >> 3` puts each comma's
    0001 bit on the next byte's 0010 bit, so it is 0 unless a comma is followed by a comma or a 0 (only
    then, for `,,`, a leading zero or the id 0, are the ids looked at more closely); and as a comma has two
    bits set and a digit one, the text has `bits.bit_count() - len(text)` commas."""
    if not text:
        return 0
    nibbles = text.translate(_NIBBLES)
    # other bytes are refused before the ends are looked at: a spaced list gets stripped, not turned down
    bits = int.from_bytes(binascii.unhexlify(nibbles + b"0" if len(nibbles) % 2 else nibbles), "big")
    if text[:1] == b"," or text[-1:] == b"," or (text[:1] == b"0" and text[1:2] not in (b",", b"")):
        return None
    after_comma = bits & bits >> 3  # 0010 in each byte that follows a comma and is a comma or a 0
    if after_comma:  # ",," (that byte's 0001 is set too), a leading zero, or just the id 0
        if after_comma & bits << 1 or _LEADING_ZERO.search(text):
            return None
    return bits.bit_count() - len(text) + 1


def ids_text(ids: list[int]) -> bytes:
    """A decoded list's ids as `1,2,3` (what `cut_id_list` gives between the brackets)."""
    return ",".join(map(str, ids)).encode()


_AS_D = bytes.maketrans(b"0123456789", b"dddddddddd")
_EXACTLY: dict[int, re.Pattern[bytes]] = {}
# `_RUNS[k]`, for k = 1..8: the weights 1, ..., 1, 9 - k (adding up to 8) in k bytes of an integer.
_RUNS = [0] + [int.from_bytes(b"\x01" * (k - 1) + bytes([9 - k]), "little") for k in range(1, 9)]
_LANES: dict[int, tuple[int, int]] = {}
_LANES_KEPT = 1 << 22  # bytes: a 128k-token prompt is ~1 MB of ids


def _every_byte(value: int, n: int) -> int:
    """An integer whose bytes (at least `n` of them) are all `value`: ANDed with a shorter one, it keeps
    those bits of each of its bytes. Kept (up to `_LANES_KEPT` bytes), and grown when a longer text comes."""
    size, lanes = _LANES.get(value, (0, 0))
    if size < n:
        size = max(1 << 14, 1 << (n - 1).bit_length())
        if size > _LANES_KEPT:
            return int.from_bytes(bytes([value]) * n, "little")  # an unusually long text: not kept
        lanes = int.from_bytes(bytes([value]) * size, "little")
        _LANES[value] = size, lanes
    return lanes


def all_below(compact: bytes, limit: int) -> bool:
    """Whether every id of `compact` (`1,2,3`, as `ids_text` writes them, or a checked list from
    `cut_id_list`: digits and commas only) is below `limit` (> 0).

    The ids have no leading zeros, so an id with more digits than `limit` is larger, one with fewer is
    smaller, and ids with as many digits compare as text: only those are read. How many digits the ids
    have is found on the text read as one integer, byte i in bits 8i..8i+7: of those, 0x10 is set in a
    digit (0x30-0x39) and clear in a comma (0x2c), and these bits times `_RUNS[k]` add up in each byte 16
    times the weights of the digits among the k bytes ending there: 128, the byte's top bit, only when all
    k are digits, at most 112 otherwise (no byte carries into the next). So one multiplication tells
    whether an id has k digits or more: substring searches for that took several times as long (a
    regular expression trying each position, ten times), and only remain for limits of 8 digits or more."""
    digits = len(str(limit))
    if digits < len(_RUNS) - 1:
        digit_bits = int.from_bytes(compact, "little") & _every_byte(0x10, len(compact))
        top_bits = _every_byte(0x80, len(compact))
        if not digit_bits * _RUNS[digits] & top_bits:
            return True
        if digit_bits * _RUNS[digits + 1] & top_bits:
            return False
    else:  # with every digit made a `d`
        shape = (b"," + compact + b",").translate(_AS_D)
        if b"d" * (digits + 1) + b"," in shape:
            return False
        if b"," + b"d" * digits + b"," not in shape:
            return True
    exactly = _EXACTLY.get(digits)
    if exactly is None:
        exactly = _EXACTLY[digits] = re.compile(rb",([0-9]{%d})(?=,)" % digits)
    return max(exactly.findall(b"," + compact + b",")) < str(limit).encode()


def _only_once(data: bytes, key: bytes, at: int, start: int, end: int) -> bool:
    """Whether `key`, found at `at`, is nowhere else in `data`, where `data[start:end + 1]` is the list after
    it. Another `key` can only begin inside the list if the list holds its first byte (for a JSON key, a
    quote): looking for that byte is much faster than searching a long list's ids for the whole key."""
    if end - start < 1024 or data.find(key[:1], start, end + 1) >= 0:
        return data.find(key, at + 1) < 0
    return data.find(key, at + 1, start + len(key) - 1) < 0 and data.find(key, end + 1) < 0


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
    start = data.find(b"[", at) if at >= 0 else -1
    end = data.find(b"]", start) if start >= 0 else -1
    if end > 0 and _only_once(data, key, at, start, end):
        count = None
        raw = data[start: end + 1]
        if data[at + len(key): start].strip() == b":":
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
