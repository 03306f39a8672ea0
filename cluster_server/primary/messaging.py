"""The HTTP primary's side of ``cluster_server.cluster``: relay broadcasts, answer requests.

An app in an HTTP worker talks to its primary with ``cluster.send``,
``broadcast`` and ``request`` (the worker's side is ``cluster/http.py``).
:class:`Messaging`, a component of the HTTP primary, handles the worker
messages ``msg`` (logged at debug level: the HTTP primary runs no user code),
``bcast`` (relayed as ``msg`` to every other worker with an open channel, and
to the sender too when it asks) and ``req``, which it answers itself (see
:meth:`Messaging.answer`; the reply goes through
``wire/request.py``'s ``Replier``, as every answer does). A worker gone mid-broadcast is skipped
(``primary.send`` returns False); nothing blocks.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from cluster_server import _proc
from cluster_server.primary.component import Component, override
from cluster_server.wire.channel import Message
from cluster_server.wire.messages import BCAST, MSG, REQ
from cluster_server.wire.request import Replier

if TYPE_CHECKING:
    from cluster_server.primary.loop import Primary, Worker

logger = logging.getLogger("cluster_server")

#: the worker message types this component handles
MESSAGE_TYPES = frozenset({MSG, BCAST, REQ})


class Messaging(Component):
    """A component of the HTTP primary: relays broadcasts, answers built-in requests."""

    primary: Primary  # set by attach

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}

    @override
    def attach(self, primary: Primary) -> None:
        self.primary = primary

    @override
    def worker_message(self, w: Worker, msg: Message, fds: list[int]) -> bool:
        kind = msg.get("t")
        if kind not in MESSAGE_TYPES:
            return False
        _proc.close_all(fds)  # these messages carry none
        if kind == BCAST:
            out = {"t": MSG, "data": msg.get("data")}
            for other in list(self.primary.workers.values()):
                if other is not w or msg.get("self"):
                    self.primary.send(other, out)
        elif kind == MSG:
            logger.debug("%s sent the primary %.200r", w.name, msg.get("data"))
        elif kind == REQ:
            rid = msg.get("id")
            if isinstance(rid, int):
                replier = Replier(lambda reply, fds: self.primary.send(w, reply, list(fds)), "the primary")
                try:
                    value = self.answer(msg.get("data"))
                except Exception as exc:  # whatever a worker asks, the primary answers and goes on
                    replier.refuse(rid, f"the primary cannot answer: {exc}")
                else:
                    replier.answer(rid, value)
        return True

    def answer(self, data: Any) -> Any:
        """The HTTP primary's built-in requests (``await cluster.request({...})``):

        - ``{"op": "workers"}``: ``[{"id", "pid", "state", "generation"}, ...]``;
        - ``{"op": "incr", "key": k, "by": n}``: add ``n`` (default 1) to the
          cluster-wide counter ``k``; returns its new value;
        - ``{"op": "get", "key": k}``: the counter's value (0 if never set).
        """
        if not isinstance(data, dict):
            raise ValueError(f"a request is {{'op': ...}}, not {data!r:.100}")
        op = data.get("op")
        if op == "workers":
            return [
                {"id": w.id, "pid": w.pid, "state": w.state.value, "generation": w.generation}
                for w in sorted(self.primary.workers.values(), key=lambda w: (w.id, w.generation))
            ]
        if op in ("incr", "get"):
            key = data["key"]
            if not isinstance(key, str):
                raise TypeError(f"key must be a string, not {key!r:.100}")
            if op == "incr":
                by = data.get("by", 1)
                if not isinstance(by, int) or isinstance(by, bool):
                    raise TypeError(f"by must be an integer, not {by!r:.100}")
                self.counters[key] = self.counters.get(key, 0) + by
            return self.counters.get(key, 0)
        raise ValueError(f"unknown op {op!r:.100}; expected 'workers', 'incr' or 'get'")
