"""``serialization="advanced"``: what JSON cannot carry, in a tagged JSON that runs no code on decode.

Node's advanced serialization is V8's structured clone. Python's counterpart
would be ``pickle``, which runs code while it decodes: never on a channel that a
worker, perhaps running as another user (``setup_primary(uid=...)``), writes
to. So it is JSON, with the types JSON lacks written as one-key objects whose
key is a tag. Its own format, about 100 lines and no dependency: CBOR or
MessagePack libraries would add a dependency and still need the same tags for
sets, tuples, dates and decimals, which is most of the work.

=========================================  ==========================================
Python                                     encoded
=========================================  ==========================================
``dict`` (``str`` keys), ``list``, ``str``  themselves
``int``, ``float`` (also nan, inf), bool,   themselves
``None``
``tuple``                                  ``{"$tuple": [...]}``
``set``, ``frozenset``                     ``{"$set": [...]}``, ``{"$frozenset": [...]}``
``dict`` with other keys (or a ``$`` key)  ``{"$dict": [[key, value], ...]}``
``bytes``, ``bytearray``                   ``{"$bytes": base64}``, ``{"$bytearray": base64}``
``datetime``, ``date``, ``time``           ``{"$datetime": iso}`` (tz kept), ``$date``, ``$time``
``timedelta``                              ``{"$timedelta": [days, seconds, microseconds]}``
``Decimal``                                ``{"$decimal": "1.10"}`` (exact, nan and inf too)
``complex``, ``uuid.UUID``                 ``{"$complex": [re, im]}``, ``{"$uuid": "..."}``
=========================================  ==========================================

Nested freely. Decoding builds only these types, from plain strings and
numbers, through the fixed table below: no name in the data is looked up,
imported or called; an unknown tag, or a tag whose value has the wrong shape,
is a ``ValueError`` (the receiver logs and drops the message). Unlike V8's
clone, a value that contains itself is a ``ValueError`` in the sender, and
other objects (dataclasses, exceptions...) a ``TypeError``.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import uuid
from collections.abc import Callable
from typing import Any, Final

#: the setting's values
MODES: Final = ("json", "advanced")
#: a cluster worker's mode, set by its primary (Node's ``NODE_CHANNEL_SERIALIZATION_MODE``)
ENV: Final = "CLUSTER_SERVER_SERIALIZATION"

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def dumps(value: Any) -> str:
    """``value`` as tagged JSON. TypeError for a type it cannot carry, ValueError for a cycle."""
    try:
        return _encoder.encode(_tag(value, set()))
    except RecursionError:
        raise ValueError("a value nested too deeply to send") from None


def loads(text: str) -> Any:
    """The value ``dumps`` wrote. ValueError for anything else (never runs code)."""
    if not isinstance(text, str):
        raise ValueError(f"advanced data is a JSON string, not {type(text).__name__}")
    try:
        return json.loads(text, object_hook=_untag)
    except RecursionError:
        raise ValueError("advanced data nested too deeply") from None
    except (TypeError, KeyError, IndexError, decimal.InvalidOperation) as exc:
        raise ValueError(f"malformed advanced data: {exc!r}") from None


def pack(msg: dict[str, Any]) -> dict[str, Any]:
    """A message with its ``data`` in advanced form: ``"a"``, the tagged JSON, as a string
    (a message without ``data`` is unchanged). TypeError/ValueError as :func:`dumps`."""
    if "data" not in msg:
        return msg
    out = {k: v for k, v in msg.items() if k != "data"}
    out["a"] = dumps(msg["data"])
    return out


def unpack(msg: dict[str, Any]) -> dict[str, Any]:
    """The message :func:`pack` made, with its ``data`` back; ValueError if ``"a"`` is malformed."""
    if "a" not in msg:
        return msg
    out = dict(msg)
    out["data"] = loads(out.pop("a"))
    return out


def _tag(v: Any, seen: set[int]) -> Any:
    if v is None or isinstance(v, str | bool | int | float):
        return v
    kind = type(v)
    simple = _SIMPLE.get(kind) or next((f for t, f in _SIMPLE.items() if isinstance(v, t)), None)
    if simple is not None:
        return simple(v)
    if not isinstance(v, list | tuple | set | frozenset | dict):
        raise TypeError(f"Object of type {kind.__name__} is not serializable with serialization='advanced'")
    if id(v) in seen:
        raise ValueError("a value that contains itself cannot be sent")
    seen.add(id(v))
    try:
        if isinstance(v, list):
            return [_tag(x, seen) for x in v]
        if isinstance(v, tuple):
            return {"$tuple": [_tag(x, seen) for x in v]}
        if isinstance(v, frozenset):
            return {"$frozenset": [_tag(x, seen) for x in v]}
        if isinstance(v, set):
            return {"$set": [_tag(x, seen) for x in v]}
        if all(isinstance(k, str) and not k.startswith("$") for k in v):
            return {k: _tag(x, seen) for k, x in v.items()}
        return {"$dict": [[_tag(k, seen), _tag(x, seen)] for k, x in v.items()]}
    finally:
        seen.discard(id(v))


def _b64(v: bytes | bytearray) -> str:
    return base64.b64encode(v).decode("ascii")


# datetime before date: a datetime is a date too
_SIMPLE: dict[type, Callable[[Any], dict[str, Any]]] = {
    bytes: lambda v: {"$bytes": _b64(v)},
    bytearray: lambda v: {"$bytearray": _b64(v)},
    memoryview: lambda v: {"$bytes": _b64(v.tobytes())},
    datetime.datetime: lambda v: {"$datetime": v.isoformat()},
    datetime.date: lambda v: {"$date": v.isoformat()},
    datetime.time: lambda v: {"$time": v.isoformat()},
    datetime.timedelta: lambda v: {"$timedelta": [v.days, v.seconds, v.microseconds]},
    decimal.Decimal: lambda v: {"$decimal": str(v)},
    complex: lambda v: {"$complex": [v.real, v.imag]},
    uuid.UUID: lambda v: {"$uuid": str(v)},
}


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {type(v).__name__}")
    return v


def _list(v: Any) -> list[Any]:
    if not isinstance(v, list):
        raise TypeError(f"expected a list, got {type(v).__name__}")
    return v


def _numbers(v: Any, n: int, kind: type) -> list[Any]:
    items = _list(v)
    if len(items) != n or not all(isinstance(x, kind) and not isinstance(x, bool) for x in items):
        raise TypeError(f"expected {n} {kind.__name__}s, got {v!r:.100}")
    return items


def _pairs(v: Any) -> dict[Any, Any]:
    items = _list(v)
    if not all(isinstance(p, list) and len(p) == 2 for p in items):
        raise TypeError("expected [key, value] pairs")
    return {k: x for k, x in items}


_TAGS: Final[dict[str, Callable[[Any], Any]]] = {
    "$tuple": lambda v: tuple(_list(v)),
    "$set": lambda v: set(_list(v)),
    "$frozenset": lambda v: frozenset(_list(v)),
    "$dict": _pairs,
    "$bytes": lambda v: base64.b64decode(_str(v), validate=True),
    "$bytearray": lambda v: bytearray(base64.b64decode(_str(v), validate=True)),
    "$datetime": lambda v: datetime.datetime.fromisoformat(_str(v)),
    "$date": lambda v: datetime.date.fromisoformat(_str(v)),
    "$time": lambda v: datetime.time.fromisoformat(_str(v)),
    "$timedelta": lambda v: datetime.timedelta(*_numbers(v, 3, int)),
    "$decimal": lambda v: decimal.Decimal(_str(v)),
    "$complex": lambda v: complex(*_numbers(v, 2, float)),
    "$uuid": lambda v: uuid.UUID(_str(v)),
}


def _untag(obj: dict[str, Any]) -> Any:
    if len(obj) != 1:
        return obj
    ((key, value),) = obj.items()
    if not key.startswith("$"):
        return obj
    make = _TAGS.get(key)
    if make is None:
        raise ValueError(f"unknown advanced tag {key!r}")
    return make(value)
