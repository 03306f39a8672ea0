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
a ``list``/``dict`` found twice (shared,   the first time ``{"$id": n, "$list": [...]}`` (or
or containing itself)                      ``"$obj": {...}``, ``"$dict": [...]``), then ``{"$ref": n}``
=========================================  ==========================================

Nested freely; as V8's clone, shared and circular lists and dicts arrive
shared and circular (``a = []; a.append(a)`` comes back as such). Decoding
builds only these types, from plain strings and numbers, through the fixed
table below: no name in the data is looked up, imported or called; an unknown
tag, or a tag whose value has the wrong shape, is a ``ValueError`` (the
receiver logs and drops the message). Other objects (dataclasses,
exceptions...) are a ``TypeError`` in the sender.
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
    """``value`` as tagged JSON. TypeError for a type it cannot carry."""
    try:
        return _encoder.encode(_Tagger(value).tag(value))
    except RecursionError:
        raise ValueError("a value nested too deeply to send") from None


def loads(text: str) -> Any:
    """The value ``dumps`` wrote. ValueError for anything else (never runs code)."""
    if not isinstance(text, str):
        raise ValueError(f"advanced data is a JSON string, not {type(text).__name__}")
    untagger = _Untagger()
    try:
        value = json.loads(text, object_hook=untagger.untag)
        return untagger.resolve(value, set()) if untagger.refs else value
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


class _Tagger:
    """One value's encoding: lists and dicts met twice get an ``$id`` the first time and a
    ``$ref`` after (found by a first pass, so the others carry nothing extra)."""

    def __init__(self, value: Any) -> None:
        self.ids: dict[int, int] = {}  # id() of a shared list/dict -> its number
        self.emitted: set[int] = set()
        self._count(value, set())

    def _count(self, v: Any, seen: set[int]) -> None:
        if isinstance(v, list | dict):
            if id(v) in seen:
                self.ids.setdefault(id(v), len(self.ids) + 1)
                return
            seen.add(id(v))
            for x in v.values() if isinstance(v, dict) else v:
                self._count(x, seen)
        elif isinstance(v, tuple | set | frozenset):
            for x in v:
                self._count(x, seen)

    def tag(self, v: Any) -> Any:
        if v is None or isinstance(v, str | bool | int | float):
            return v
        simple = _SIMPLE.get(type(v)) or next((f for t, f in _SIMPLE.items() if isinstance(v, t)), None)
        if simple is not None:
            return simple(v)
        if isinstance(v, tuple):
            return {"$tuple": [self.tag(x) for x in v]}
        if isinstance(v, frozenset):
            return {"$frozenset": [self.tag(x) for x in v]}
        if isinstance(v, set):
            return {"$set": [self.tag(x) for x in v]}
        if not isinstance(v, list | dict):
            raise TypeError(f"Object of type {type(v).__name__} is not serializable with serialization='advanced'")
        n = self.ids.get(id(v))
        if n is not None and id(v) in self.emitted:
            return {"$ref": n}
        if n is not None:
            self.emitted.add(id(v))
        if isinstance(v, list):
            out: Any = [self.tag(x) for x in v]
            return out if n is None else {"$id": n, "$list": out}
        if all(isinstance(k, str) and not k.startswith("$") for k in v):
            out = {k: self.tag(x) for k, x in v.items()}
            return out if n is None else {"$id": n, "$obj": out}
        out = [[self.tag(k), self.tag(x)] for k, x in v.items()]
        return {"$dict": out} if n is None else {"$id": n, "$dict": out}


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


class _Ref:
    """Where a shared list or dict goes, until :meth:`_Untagger.resolve` puts it there."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n


class _Untagger:
    """``json.loads``' object_hook for one value, and the pass that ties its shared parts."""

    def __init__(self) -> None:
        self.table: dict[int, Any] = {}
        self.refs = False

    def untag(self, obj: dict[str, Any]) -> Any:
        if len(obj) == 2 and "$id" in obj:
            return self._shared(obj)
        if len(obj) != 1:
            return obj
        ((key, value),) = obj.items()
        if not key.startswith("$"):
            return obj
        if key == "$ref":
            self.refs = True
            return _Ref(_numbers([value], 1, int)[0])
        make = _TAGS.get(key)
        if make is None:
            raise ValueError(f"unknown advanced tag {key!r}")
        return make(value)

    def _shared(self, obj: dict[str, Any]) -> Any:
        n = _numbers([obj.pop("$id")], 1, int)[0]
        ((key, value),) = obj.items()
        if key == "$list":
            made: Any = _list(value)
        elif key == "$obj" and isinstance(value, dict):
            made = value
        elif key == "$dict":
            made = _pairs(value)
        else:
            raise ValueError(f"unknown shared advanced value {key!r}")
        self.table[n] = made
        self.refs = True
        return made

    def resolve(self, v: Any, done: set[int]) -> Any:
        """``v`` with every ``$ref`` replaced by its list or dict (in place where it can be)."""
        if isinstance(v, _Ref):
            if v.n not in self.table:
                raise ValueError(f"advanced data refers to {v.n}, which it never defined")
            return self.table[v.n]
        if isinstance(v, list | dict):
            if id(v) not in done:
                done.add(id(v))
                for k, x in list(v.items()) if isinstance(v, dict) else list(enumerate(v)):
                    if isinstance(v, dict):
                        self._hashable(k, done)
                    if (y := self.resolve(x, done)) is not x:
                        v[k] = y
            return v
        if isinstance(v, tuple):
            items = [self.resolve(x, done) for x in v]
            return v if all(a is b for a, b in zip(items, v, strict=True)) else tuple(items)
        if isinstance(v, set | frozenset):
            for x in v:
                self._hashable(x, done)
        return v

    def _hashable(self, v: Any, done: set[int]) -> None:
        """A set member or a dict key: a shared list or dict cannot be one (nor be in one)."""
        if self.resolve(v, done) is not v:
            raise ValueError("a shared list or dict where only hashable values may be")
