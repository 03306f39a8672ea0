"""wire/advanced.py: serialization="advanced", a tagged JSON that runs no code on decode."""

from __future__ import annotations

import datetime
import decimal
import math
import uuid
from typing import Any

import pytest

from cluster_server.wire import advanced

EVERYTHING: dict[str, Any] = {
    "bytes": b"\x00\xffbinary",
    "bytearray": bytearray(b"mutable"),
    "tuple": (1, "two", (3.0, None)),
    "set": {1, 2, (3, 4)},
    "frozenset": frozenset({"a", "b"}),
    "int keys": {1: "one", (2, 3): "tuple key", None: "none key", "$dollar": "escaped"},
    "datetime": datetime.datetime(2024, 2, 29, 12, 30, 1, 123456, tzinfo=datetime.UTC),
    "naive": datetime.datetime(2024, 1, 1),
    "date": datetime.date(1999, 12, 31),
    "time": datetime.time(23, 59, 59, 5),
    "timedelta": datetime.timedelta(days=-1, seconds=5, microseconds=7),
    "decimal": decimal.Decimal("1.10"),
    "decimal nan": decimal.Decimal("NaN"),
    "complex": 1 + 2j,
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "nested": [{"deep": [{"set": {b"x"}}]}],
    "plain": {"list": [1, 2.5, True, None, "é"]},
    "big int": 2**100,
}


def test_every_type_round_trips() -> None:
    back = advanced.loads(advanced.dumps(EVERYTHING))
    nan = back.pop("decimal nan")
    assert nan.is_nan()
    expected = dict(EVERYTHING)
    expected.pop("decimal nan")
    assert back == expected
    assert type(back["tuple"]) is tuple and type(back["tuple"][2]) is tuple
    assert type(back["bytearray"]) is bytearray and type(back["frozenset"]) is frozenset
    assert str(back["decimal"]) == "1.10"  # exact, trailing zero kept
    assert back["datetime"].tzinfo == datetime.UTC


def test_floats_and_user_dicts_that_look_like_tags() -> None:
    back = advanced.loads(advanced.dumps([math.inf, {"$tuple": [1]}, {"$a": 1, "b": 2}]))
    assert back[0] == math.inf
    assert back[1] == {"$tuple": [1]} and back[2] == {"$a": 1, "b": 2}  # data, never read as tags


@pytest.mark.parametrize(
    "value, error",
    [
        (object(), TypeError),
        (ValueError("x"), TypeError),
        (lambda: 1, TypeError),
    ],
)
def test_what_cannot_be_sent(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="not serializable with serialization='advanced'"):
        advanced.dumps({"x": value})


def test_shared_and_circular_lists_and_dicts_stay_so() -> None:
    # as V8's structured clone (Node's test-cluster-advanced-serialization.js sends a circular object)
    cyclic: list[Any] = [1]
    cyclic.append(cyclic)
    back = advanced.loads(advanced.dumps(cyclic))
    assert back[0] == 1 and back[1] is back
    shared = [1, 2]
    node: dict[str, Any] = {"a": shared, "b": shared, "t": (shared,), 5: "x"}
    node["self"] = node
    back = advanced.loads(advanced.dumps([node, node]))
    assert back[0] is back[1] and back[0]["self"] is back[0]
    assert back[0]["a"] is back[0]["b"] is back[0]["t"][0] and back[0]["a"] == [1, 2]
    through_tuple: list[Any] = []
    through_tuple.append((through_tuple,))
    back = advanced.loads(advanced.dumps(through_tuple))
    assert back[0][0] is back
    assert '"$id"' not in advanced.dumps([[1], [1]])  # equal is not shared: nothing extra


@pytest.mark.parametrize(
    "text",
    [
        '{"$pickle": "gASVDAAAAAAAAACMBXBvc2l4lIwGc3lzdGVtlJOULg=="}',  # an unknown tag: never looked up
        '{"$bytes": 12}',
        '{"$bytes": "not base64!"}',
        '{"$set": [[1, 2]]}',  # unhashable member
        '{"$dict": [[1]]}',
        '{"$timedelta": [1, 2]}',
        '{"$complex": ["1", 2.0]}',
        '{"$decimal": "one"}',
        '{"$datetime": "yesterday"}',
        '{"$ref": 1}',  # never defined
        '{"$id": 1, "$set": [1]}',  # only lists and dicts are shared
        '{"$id": 1, "$list": [{"$set": [{"$ref": 1}]}]}',  # a list in a set
        '{"$id": 1, "$list": [{"$dict": [[{"$tuple": [{"$ref": 1}]}, 2]]}]}',  # a list in a key
        "[" * 100_000,
        "not json",
    ],
)
def test_malformed_data_is_a_value_error_and_runs_nothing(text: str) -> None:
    with pytest.raises(ValueError):
        advanced.loads(text)
