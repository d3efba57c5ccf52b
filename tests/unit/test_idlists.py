"""Token-id lists read as bytes (`baton.idlists`) mean exactly what decoding them would."""

from __future__ import annotations

import json
import random

import pytest
from baton.idlists import _only_once, all_below, count_ids, cut_id_list, ids_text


# every number of digits from 1 to 10: from 8 digits on, `all_below` takes another way
@pytest.mark.parametrize("limit", [1, 9, 10, 11, 99, 100, 101, 999, 1000, 4096, 9999, 32000, 99999, 128256, 151936,
                                   999999, 1000000, 1234567, 9999999, 10000000, 12345678, 2**31 - 1])
def test_all_below_agrees_with_comparing_every_id(limit):
    rng = random.Random(limit)
    edges = [0, limit - 1, limit, limit + 1, limit * 10, max(0, limit // 10), 10 ** len(str(limit)) - 1]
    for _ in range(400):
        ids = [rng.choice(edges) if rng.random() < 0.2 else rng.randrange(0, limit * 2)
               for _ in range(rng.randint(1, 30))]
        assert all_below(ids_text(ids), limit) == (max(ids) < limit), (ids, limit)


@pytest.mark.parametrize("limit", [10, 1000, 99999, 128256, 1234567, 10000000])
def test_all_below_finds_one_long_id_anywhere_in_a_long_list(limit):
    rng = random.Random(limit)
    digits = len(str(limit))
    short = [rng.randrange(1, 10 ** (digits - 1)) for _ in range(6000)]  # fewer digits than the limit
    assert all_below(ids_text(short), limit)
    for odd in (0, limit // 10, limit - 1, limit, limit + 1, 10 ** digits - 1, 10 ** digits, limit * 10):
        for at in (0, 1, len(short) // 2, len(short) - 2, len(short) - 1):
            ids = short[:at] + [odd] + short[at + 1:]
            assert all_below(ids_text(ids), limit) == (max(ids) < limit), (odd, at)
    assert all_below(b"", limit)


def test_a_checked_list_comes_back_compact_whatever_its_spacing():
    for text in (b'{"prompt": [1, 2,\n 3\t]}', b'{"prompt":[1,2,3]}', b'{"prompt": [ 1 ,2 , 3 ]}'):
        assert cut_id_list(text, b'"prompt"', "prompt")[1:] == (b"[1,2,3]", 3)
    assert cut_id_list(b'{"prompt": [ ]}', b'"prompt"', "prompt")[1:] == (b"[]", 0)
    assert ids_text([1, 2, 3]) == b"1,2,3" and ids_text([]) == b""
    # unchecked, the list is passed on as it came
    assert cut_id_list(b'{"p": [1, 2]}', b'"p"', "p", check=False)[1] == b"[1, 2]"


JSON_BODIES = [
    '{"prompt": [1, 2, 3], "max_tokens": 4}',
    '{"max_tokens": 4, "prompt":[1,2,3]}',
    '{"prompt": [ 1 ,\n 2 ], "x": [9]}',
    '{"prompt": []}',
    '{"prompt": [0, 10, 0]}',
    '{"prompt": [01, 2]}',  # not JSON
    '{"prompt": [1 2]}',  # not JSON
    '{"prompt": [1, -2]}',
    '{"prompt": [1.5, 2]}',
    '{"prompt": [[1, 2]]}',
    '{"prompt": "text with [1, 2]"}',
    '{"prompt": [1, 2], "prompt": [3]}',
    '{"nested": {"prompt": [1, 2]}, "prompt": "x"}',
    '{"s": "\\"prompt\\": [1]", "prompt": [4, 5]}',
    '[1, 2]',
]


@pytest.mark.parametrize("text", JSON_BODIES)
def test_cut_id_list_reads_what_json_would(text):
    data = text.encode()
    try:
        expected = json.loads(data)
    except ValueError:
        with pytest.raises(ValueError):
            cut_id_list(data, b'"prompt"', "prompt")
        return
    obj, raw, count = cut_id_list(data, b'"prompt"', "prompt")
    if raw is not None:
        ids = json.loads(raw)
        assert count == len(ids) == count_ids(raw[1:-1])
        assert raw == b"[" + ids_text(ids) + b"]"  # compact
        obj["prompt"] = ids
    assert obj == expected


def test_count_ids_agrees_with_json_on_random_lists_and_spacings():
    rng = random.Random(7)
    pieces = ["0", "1", "7", "10", "01", "123", "-4", "1.5", "", " ", "\n", "\t", "a", "1e3", "true", "[1]"]
    for _ in range(3000):
        items = [rng.choice(pieces) for _ in range(rng.randint(0, 6))]
        seps = [rng.choice([",", ", ", " ,", ",\n ", " ", ",,"]) for _ in items]
        inner = "".join(item + sep for item, sep in zip(items, seps))[:-1] if items else rng.choice(["", " "])
        try:
            value = json.loads("[" + inner + "]")
            expected = len(value) if all(type(v) is int and v >= 0 for v in value) else None
        except ValueError:
            expected = None
        assert count_ids(inner.encode()) == expected, inner


def _json_count(inner: bytes) -> int | None:
    """What json makes of `[inner]`: how many ids when it is a list of non-negative integers, else None
    (also for -0: 0, but written with a sign, which is left to decoding)."""
    if b"-" in inner:
        return None
    try:
        value = json.loads(b"[" + inner + b"]")
    except ValueError:
        return None
    return len(value) if all(type(v) is int and v >= 0 for v in value) else None


EDGE_LISTS = [
    b"", b" ", b"\n", b"0", b"7", b"00", b"01", b"10", b"1234567", b"12345678901234567890",
    b"0,0", b"0,01", b"0,00", b"00,0", b"01,1", b"1,0", b"1,00", b"1,01", b"0,1", b"10,0", b"0,10", b"1,2,0",
    b"0,1,0", b"100,200,0", b"1,0,2", b"1,02,3", b"1,2,00",
    b",", b",,", b",0", b"0,", b",1", b"1,", b"1,,2", b"1,2,", b",1,2", b"1,,", b",,1", b"1,2,,3",
    b" 0", b"0 ", b" 0 ", b"0 ,1", b"0, 1", b"0 , 1", b"0,\n1", b"0\t,\r\n1", b"1, 0", b"1 ,0", b"1, 01",
    b"1, 0 1", b"0 1", b"01 ", b"1 2", b"1  ,  2", b" , 1", b"1 , ", b"1, ,2",
    b"-1", b"+1", b"1.0", b"1e2", b"0x1", b"1_0", b"true", b"null", b"[1]", b'"1"', b"1;2", b"1,a", b"\x00",
    b"1\xff", b"\xb1", b"1\x0b,2",
]


@pytest.mark.parametrize("inner", EDGE_LISTS)
def test_count_ids_agrees_with_json_on_edge_cases(inner):
    assert count_ids(inner) == _json_count(inner)
    if _json_count(inner) is not None:
        assert cut_id_list(b'{"p": [' + inner + b"]}", b'"p"', "p")[1:] == (
            b"[" + ids_text(json.loads(b"[" + inner + b"]")) + b"]", _json_count(inner))


def test_count_ids_agrees_with_json_on_long_lists_wherever_they_go_wrong():
    rng = random.Random(11)
    ids = [rng.randrange(1, 200000) for _ in range(6001)]
    for text in (ids_text(ids), ids_text(ids[:-1]), ids_text(ids + [0]), ids_text([0] + ids)):
        assert count_ids(text) == _json_count(text)
        for fault in (b",", b",,", b"0", b"00", b",0", b",01", b" ", b"1 2", b"\n", b"x", b".5", b"-"):
            for at in (0, 1, 2, 7, len(text) // 2, len(text) - 2, len(text) - 1, len(text)):
                inner = text[:at] + fault + text[at:]
                assert count_ids(inner) == _json_count(inner), (fault, at)
    spaced = json.dumps(ids).encode()[1:-1]
    assert count_ids(spaced) == len(ids) == count_ids(ids_text(ids))
    very_long = [rng.randrange(0, 10**6) for _ in range(60000)]
    assert count_ids(ids_text(very_long)) == 60000
    assert count_ids(json.dumps(very_long, indent=1).encode().strip()[1:-1]) == 60000


def test_cut_id_list_falls_back_when_the_key_comes_again_after_a_long_list():
    ids = json.dumps(list(range(1000, 1400)))[1:-1]
    bodies = [
        '{"prompt": [%s], "mode": "prompt"}', '{"prompt": [%s], "prompt": [1]}', '{"prompt": [%s, "prompt"]}',
        '{"a": {"prompt": 1}, "prompt": [%s]}', '{"prompt": [%s], "b": {"prompt": 2}}', '{"prompt" : [%s]}',
        '{"prompt": [%s], "s": "\\"prompt\\""}',
    ]
    for body in bodies:
        data = (body % ids).encode()
        for check in (True, False):
            obj, raw, count = cut_id_list(data, b'"prompt"', "prompt", check)
            if data.count(b'"prompt"') > 1:
                assert raw is None and obj == json.loads(data), (body, check)
            else:
                obj["prompt"] = json.loads(raw)
                assert obj == json.loads(data) and count == (len(obj["prompt"]) if check else 0), (body, check)


def test_only_once_agrees_with_searching_the_whole_body_for_the_key_again():
    # `cut_id_list`'s shortcut past a long list's ids must say what a plain search for a second key says
    rng = random.Random(13)
    ids = ids_text(list(range(1000, 1300)))  # longer than the shortcut's threshold
    pieces = [b'"p"', b"p", b"pp", b'"', b":", b" ", b"1", b",", b'"p":', b"{"]
    checked = 0
    for _ in range(3000):
        key = rng.choice([b'"p"', b"p", b"pp", b'"', b":", b"1", b",", b'"p":', b'""'])
        cut = rng.randrange(len(ids) + 1)
        inside = ids[:cut] + rng.choice([b"", b"", *pieces]) + ids[cut:]
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 3))) + key + b"".join(
            rng.choice(pieces) for _ in range(rng.randint(0, 2))) + b"[" + inside + b"]" + b"".join(
            rng.choice(pieces) for _ in range(rng.randint(0, 3)))
        at = data.find(key)
        start = data.find(b"[", at)
        end = data.find(b"]", start)
        if start >= 0 and end > 0:
            assert _only_once(data, key, at, start, end) == (data.find(key, at + 1) < 0), (data[:40], key)
            checked += 1
    assert checked > 2000
