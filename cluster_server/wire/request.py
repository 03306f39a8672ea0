"""Request and reply over a channel: the one implementation every asker and answerer uses.

A request is a message with an ``id`` (``req``, or ``listen`` on the cluster
channel); its answer is ``{"t": "res", "id": n, "data": ...}``, or
``{"t": "res", "id": n, "error": "..."}`` when there is none (see
``wire/messages.py``). Who uses it:

- a worker asks its primary and answers it (``cluster/worker.py``'s
  ``Endpoint``, in a ``cluster.fork()`` worker and in an HTTP worker alike);
- a ``cluster_server.cluster`` primary asks each worker and answers it
  (``cluster/primary.py``);
- the HTTP primary answers its workers' built-in requests (``cluster/http.py``).

Two halves:

- :class:`Pending`, the asker's: a fresh id per request, the future each
  answer settles (its data and fds, or a ``RequestError``/``BindError``), and
  every waiting request failed at once when the channel closes. Thread-safe:
  a worker asks from any thread and its answers arrive on the channel thread.
- :class:`Replier`, the answerer's: exactly one ``res`` per request, whatever
  the handler returned, raised, or will return (an awaitable, settled later);
  an answer that cannot be sent (not JSON, over 64 KiB) becomes an error
  answer saying why, so the asker is never left waiting for its timeout.

Futures are duck-typed, so each side keeps the one its thread model needs:
asyncio's in the cluster primary (one event loop), ``concurrent.futures``' in
a worker (answered on the channel thread, awaited from any thread or loop).
Waiting for an answer (blocking, or on an event loop) stays with the caller:
this module imports no asyncio, because the HTTP primary answers with it.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import itertools
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from cluster_server._errors import BindError, ChannelError, DisconnectedError, RequestError
from cluster_server._proc import close_all
from cluster_server.wire.channel import Message
from cluster_server.wire.messages import RES

#: an answer: its data, and the fds that came with it (the receiver owns them)
Answer = tuple[Any, list[int]]


class Settleable(Protocol):
    """What :class:`Pending` needs of a future (asyncio's and ``concurrent.futures``' both are)."""

    def set_result(self, result: Answer, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


class Settled(Protocol):
    """What :class:`Replier` needs of a finished future (asyncio's and ``concurrent.futures``' both are)."""

    def cancelled(self) -> bool: ...

    def exception(self) -> BaseException | None: ...

    def result(self) -> Any: ...


F = TypeVar("F", bound=Settleable)


def _invalid_state() -> tuple[type[Exception], ...]:
    """What setting a finished future raises: ``concurrent.futures``' error, and asyncio's
    where asyncio is loaded (an asyncio future exists only then). Evaluated only when
    something was raised, so settling a future costs no check first."""
    asyncio = sys.modules.get("asyncio")
    errors: tuple[type[Exception], ...] = (concurrent.futures.InvalidStateError,)
    return errors if asyncio is None else (*errors, asyncio.InvalidStateError)


def describe_exception(exc: BaseException) -> str:
    """``ValueError: bad op``: how an answerer's exception reads in the asker's ``RequestError``."""
    return f"{type(exc).__name__}: {exc}"


class Pending(Generic[F]):
    """The asker's requests that are not answered yet, by id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, F] = {}
        self.closed = False

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, fut: F) -> int | None:
        """Wait for an answer with ``fut``: its request's id, or None once closed (disconnected)."""
        with self._lock:
            if self.closed:
                return None
            rid = next(self._ids)
            self._waiting[rid] = fut
        return rid

    def discard(self, rid: int) -> None:
        """Stop waiting for request ``rid`` (answered, timed out, or never sent)."""
        with self._lock:
            self._waiting.pop(rid, None)

    def resolve(self, msg: Message, fds: list[int]) -> bool:
        """Settle the request that ``msg`` (a ``res``) answers. False when nobody waits for it
        (late, or a stray id): its fds are closed then.

        An ``error`` becomes ``RequestError``, or ``BindError`` when the answerer says
        ``"kind": "bind"`` (the primary could not bind what ``listen`` asked for).
        """
        rid = msg.get("id")
        with self._lock:
            fut = self._waiting.pop(rid, None) if isinstance(rid, int) else None
        if fut is None:
            close_all(fds)
            return False
        try:
            if "error" in msg:
                close_all(fds)
                error = str(msg["error"])
                fut.set_exception(BindError(error) if msg.get("kind") == "bind" else RequestError(error))
            else:
                fut.set_result((msg.get("data"), fds))
        except _invalid_state():  # its waiter gave up (timed out) meanwhile
            close_all(fds)
            return False
        return True

    def close(self, error: Callable[[], BaseException]) -> None:
        """No answer will come any more: fail every waiting request with ``error()``, refuse new ones."""
        with self._lock:
            self.closed = True
            waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            try:
                fut.set_exception(error())
            except _invalid_state():  # its waiter gave up meanwhile
                pass


class Replier:
    """The answering side of one channel: sends exactly one ``res`` per request.

    ``send(msg, fds)`` puts a message on the channel and owns ``fds`` from then
    on, whatever happens (the senders in use close them when they fail); it may
    return False (the peer is gone: dropped) or raise ``DisconnectedError`` (the
    same, in a worker). ``who`` names the answerer in error texts ("the primary",
    "worker 3"): ``the primary's request handler raised KeyError: 'x'``.
    """

    def __init__(self, send: Callable[[Message, Sequence[int]], object], who: str) -> None:
        self._send = send
        self.who = who

    def answer(self, rid: int, data: Any, fds: Sequence[int] = ()) -> None:
        """Answer request ``rid`` with ``data`` (and ``fds``, handed over)."""
        self._reply({"t": RES, "id": rid, "data": data}, fds)

    def refuse(self, rid: int, error: str, **extra: Any) -> None:
        """Answer request ``rid`` with an error (``extra``: more fields, e.g. ``kind="bind"``)."""
        self._reply({"t": RES, "id": rid, **extra, "error": error})

    def call(
        self,
        rid: int,
        handler: Callable[[Any], Any],
        data: Any,
        schedule: Callable[[Awaitable[Any]], Any] | None = None,
    ) -> None:
        """Answer request ``rid`` with ``handler(data)``.

        An exception is sent back as the error. When ``schedule`` is given and the
        handler returns an awaitable, ``schedule(awaitable)`` runs it (it returns a
        future) and the answer is sent once that is done; ``schedule`` raising
        ``RuntimeError`` (its event loop is closed) is an error answer too.
        """
        try:
            result = handler(data)
        except Exception as exc:
            self.refuse(rid, f"{self.who}'s request handler raised {describe_exception(exc)}")
            return
        if schedule is None or not inspect.isawaitable(result):
            self._reply({"t": RES, "id": rid, "data": result})
            return
        try:
            fut = schedule(result)
        except RuntimeError as exc:
            if inspect.iscoroutine(result):
                result.close()  # never to run: no "never awaited" warning
            self.refuse(rid, f"{self.who}: {exc}")
            return
        fut.add_done_callback(lambda f: self.settle(rid, f))

    def settle(self, rid: int, fut: Settled) -> None:
        """Answer request ``rid`` with what the finished ``fut`` holds."""
        if fut.cancelled():
            self.refuse(rid, f"{self.who}'s request handler was cancelled")
        elif (exc := fut.exception()) is not None:
            self.refuse(rid, f"{self.who}'s request handler raised {describe_exception(exc)}")
        else:
            self.answer(rid, fut.result())

    def _reply(self, msg: Message, fds: Sequence[int] = ()) -> None:
        try:
            self._send(msg, fds)
        except (TypeError, ValueError, ChannelError) as exc:  # not JSON, or too big (``send`` owns the fds)
            self.refuse(msg["id"], f"{self.who}'s answer cannot be sent: {exc}")
        except DisconnectedError:
            pass  # the asker is gone: nobody to answer
