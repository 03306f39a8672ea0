"""Non-blocking clients served in the primary's loop: the control socket and the metrics endpoint.

Both answer short exchanges from the primary's own selector loop, so neither
may hold it up: sockets are non-blocking, work per wake-up is bounded, each
client has a deadline (``tick`` drops it) and, once answered, a lingering close.
:class:`ClientServer` is that shared part; a subclass accepts its clients and
says what to do when one is readable or writable (``_serve``).
"""

from __future__ import annotations

import abc
import functools
import logging
import selectors
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar

from cluster_server._logging import Throttle
from cluster_server.primary.component import Component, override

if TYPE_CHECKING:
    from cluster_server.primary.loop import Primary

logger = logging.getLogger("cluster_server")

#: a client we are done with gets this long to stop sending before it is closed
LINGER = 2.0
#: bytes read per ``recv``
READ_SIZE = 65536
#: after a failed accept (out of fds), the listening socket is not watched for this long
ACCEPT_PAUSE = 0.1


class Client:
    """One connection: its socket, what it sent so far, and when it is cut off."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.deadline = deadline
        #: answered and shut for writing: what it still sends is read and dropped
        self.lingering = False


C = TypeVar("C", bound=Client)


class ClientServer(Component, abc.ABC, Generic[C]):
    """Clients by fd, watched in the primary's selector (a base for primary components)."""

    primary: Primary | None
    clients: dict[int, C]
    #: the listening socket (None once it stopped listening)
    sock: socket.socket | None
    #: clients served at once, and what to call the server in logs
    max_clients: ClassVar[int]
    what: ClassVar[str]

    #: the listening socket while accepting is paused (accept failed: out of fds)
    _paused: socket.socket | None = None
    _paused_until = 0.0
    _accept_trouble: Throttle | None = None

    @override
    def next_deadline(self) -> float | None:
        soonest = min((c.deadline for c in self.clients.values()), default=None)
        if self._paused is not None and (soonest is None or self._paused_until < soonest):
            return self._paused_until
        return soonest

    @override
    def tick(self) -> None:
        assert self.primary is not None
        now = self.primary.clock()
        for fd, c in list(self.clients.items()):
            if now >= c.deadline:
                self._drop(fd)
        if self._paused is not None and now >= self._paused_until:
            listener, self._paused = self._paused, None
            if getattr(self, "sock", None) is listener:  # not closed meanwhile
                self.primary.add_reader(listener, self._accept)

    @override
    def close(self) -> None:
        self._drop_all()
        self.stop_listening()

    @override
    def fds_to_close_in_child(self) -> list[int]:
        return [*self.clients, *([self.sock.fileno()] if self.sock is not None else [])]

    @abc.abstractmethod
    def stop_listening(self) -> None:
        """Stop accepting; the clients being served are finished."""

    def _accept(self, mask: int) -> None:
        """The listening socket is readable: welcome the clients waiting there."""
        assert self.sock is not None
        for conn in self._accepted(self.sock, self.max_clients, self.what):
            self._welcome(conn)

    @abc.abstractmethod
    def _welcome(self, conn: socket.socket) -> None:
        """A new client: make room for it (at most ``max_clients``) and serve it (``_add``), or close it."""

    def _accepted(self, listener: socket.socket, limit: int, what: str) -> Iterator[socket.socket]:
        """The connections waiting on ``listener`` (at most ``limit`` a wake-up), non-blocking.

        When accept fails (EMFILE and friends), the connection stays in the kernel's
        queue and the socket stays readable: accepting pauses for ``ACCEPT_PAUSE``,
        or the loop would spin on it, and the failure is logged at most every 5 s.
        """
        for _ in range(limit):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                assert self.primary is not None
                if self._accept_trouble is None:
                    self._accept_trouble = Throttle(logger)
                self._accept_trouble.log(
                    logging.WARNING, "%s: accept failed (%s); pausing it for %g s", what, exc, ACCEPT_PAUSE
                )
                self.primary.remove_reader(listener)
                self._paused, self._paused_until = listener, self.primary.clock() + ACCEPT_PAUSE
                return
            conn.setblocking(False)
            yield conn

    def _add(self, client: C) -> None:
        """Serve a new (non-blocking) client: ``_serve`` runs when it is ready."""
        assert self.primary is not None
        fd = client.sock.fileno()
        self.clients[fd] = client
        self.primary.add_reader(client.sock, functools.partial(self._on_client, fd))

    def _on_client(self, fd: int, mask: int) -> None:
        client = self.clients.get(fd)
        if client is None:
            return
        if client.lingering:
            self._discard(fd, client)
            return
        self._serve(fd, client, mask)

    @abc.abstractmethod
    def _serve(self, fd: int, client: C, mask: int) -> None:
        """Read from / write to one client; the subclass's protocol."""

    def _linger(self, fd: int, client: C) -> None:
        """Close once answered. Closing a socket with unread input resets the
        connection, and the client could lose our last answer (an error, say).
        So: shut our side, discard what it still sends, close at its EOF."""
        assert self.primary is not None
        try:
            client.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(fd)
            return
        client.lingering = True
        client.deadline = min(client.deadline, self.primary.clock() + LINGER)
        self.primary.modify_reader(client.sock, selectors.EVENT_READ)
        self._discard(fd, client)

    def _discard(self, fd: int, client: C) -> None:
        for _ in range(16):  # bounded work per wake-up; the deadline ends it
            try:
                if not client.sock.recv(READ_SIZE):
                    break
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                break
        else:
            return
        self._drop(fd)

    def _drop(self, fd: int) -> None:
        client = self.clients.pop(fd, None)
        if client is None:
            return
        if self.primary is not None:
            self.primary.remove_reader(client.sock)
        client.sock.close()

    def _drop_all(self) -> None:
        for fd in list(self.clients):
            self._drop(fd)
