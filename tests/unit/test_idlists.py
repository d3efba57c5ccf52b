"""Token-id lists read as bytes (`baton.idlists`) mean exactly what decoding them would."""

from __future__ import annotations

import json
import random

import pytest
from baton.idlists import all_below, count_ids, cut_id_list, ids_text


@pytest.mark.parametrize("limit", [1, 9, 10, 11, 1000, 32000, 128256, 151936])
def test_all_below_agrees_with_comparing_every_id(limit):
    rng = random.Random(limit)
    edges = [0, limit - 1, limit, limit + 1, limit * 10, max(0, limit // 10), 10 ** len(str(limit)) - 1]
    for _ in range(400):
        ids = [rng.choice(edges) if rng.random() < 0.2 else rng.randrange(0, limit * 2)
               for _ in range(rng.randint(1, 30))]
        assert all_below(ids_text(ids), limit) == (max(ids) < limit), (ids, limit)


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
