"""The worker's side of connection scheduling: the sockets it serves, the connections it is handed.

The policies and the hand-off protocol are described in ``protocol.py``; the
primary's side is ``primary.py``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from cluster_server._errors import BindError
from cluster_server._proc import close_all
from cluster_server.cluster.http import flush_when_writable
from cluster_server.scheduling.protocol import (
    _RESOURCE_ERRNOS,
    BUSY_MAX,
    HANDOFF,
    REPORT_INTERVAL,
    defer_accept,
)
from cluster_server.wire.channel import Channel
from cluster_server.wire.messages import ACK, CONN

if TYPE_CHECKING:
    from cluster_server._config import Config
    from cluster_server.worker.uvicorn_glue import WorkerServer

logger = logging.getLogger("cluster_server")


# --------------------------------------------------------------------------- worker side


def worker_sockets(config: Config, inherited: Iterable[socket.socket]) -> list[socket.socket]:
    """The listening sockets this worker serves itself, after fork.

    ``shared``: the inherited ones. ``round-robin``/``least-busy``: none (the
    primary hands connections over; the inherited copies are closed).
    ``reuseport``: a new ``SO_REUSEPORT`` socket per reserved address. Raises BindError.
    """
    inherited = list(inherited)
    if config.scheduling == "shared":
        return inherited
    if config.scheduling in HANDOFF:
        for sock in inherited:
            sock.close()
        return []
    own: list[socket.socket] = []
    try:
        for reserved in inherited:
            addr = reserved.getsockname()
            sock = socket.socket(reserved.family, socket.SOCK_STREAM)
            own.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(addr)
            sock.listen(config.backlog)
            defer_accept(sock)
    except OSError as exc:
        for sock in own:
            sock.close()
        raise BindError(f"worker could not bind its SO_REUSEPORT socket: {exc}") from None
    for sock in inherited:
        sock.close()
    return own


class _Batch:
    __slots__ = ("id", "n", "refused", "started")

    def __init__(self, bid: int, n: int) -> None:
        self.id = bid
        self.n = n
        self.started = 0  # connections whose connect_accepted_socket ran its first step
        self.refused: list[int] = []  # indexes the worker could not take (fd limit)


class WorkerHandOff:
    """Worker side of round-robin/least-busy: serve handed-over fds, acknowledge them.

    An ack waits until each connection of a batch went through the first step of
    ``loop.connect_accepted_socket`` (where uvloop dups the fd and can hit EMFILE):
    what failed there is refused back to the primary, not lost. A worker that is
    stopping refuses whatever it is still handed (the primary stopped routing to
    it before it was told to stop; these were already on their way).
    """

    def __init__(
        self,
        server: WorkerServer,
        channel: Channel,
        *,
        least_busy: bool,
        family: socket.AddressFamily = socket.AF_INET,
    ) -> None:
        self.server = server
        self.channel = channel
        self.least_busy = least_busy
        self.family = family  # of the connections handed over: saves socket() probing the fd
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pending: list[_Batch] = []  # batches taken, not yet acknowledged
        self.refused: list[int] = []  # batches refused while draining
        self.fd_refused: list[list[int]] = []  # [batch, index...] refused at the fd limit
        self.taken = 0
        self.connecting = 0  # connects started, not finished
        self.tasks: set[asyncio.Task[None]] = set()
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None  # a rate-limited load report
        self._reported_open = -1
        self._reported_conns = -1
        #: the primary applies BUSY_MAX (it said so in its last "conn"): report drops below it at once
        self.queueing = False
        self._last_flush = 0.0
        self._retries = 0

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.server.handlers[CONN] = self.on_conn
        if self.least_busy:
            self.server.watch_busy(self._open_changed)

    @property
    def open(self) -> int:
        """least-busy's load: busy connections (see ``WorkerServer.watch_busy``) and those
        being taken over; round-robin: open connections."""
        server = self.server
        return (server.busy_connections if server.tracking_busy else server.open_connections) + self.connecting

    def on_conn(self, msg: dict[str, Any], fds: list[int]) -> None:
        bid = msg.get("b")
        self.queueing = bool(msg.get("q"))
        if isinstance(bid, bool) or not isinstance(bid, int):
            close_all(fds)
            logger.warning("worker: a 'conn' message without a batch number: %.200r; dropped", msg)
            return
        if msg.get("ctrunc"):
            # The kernel could not give us every fd (we are at RLIMIT_NOFILE): give them all back.
            close_all(fds)
            self.fd_refused.append([bid])
        elif self.server.should_exit and not msg.get("force"):
            close_all(fds)
            self.refused.append(bid)
        else:
            assert self.loop is not None
            batch = _Batch(bid, len(fds))
            self.pending.append(batch)
            for i, fd in enumerate(fds):
                try:
                    sock = socket.socket(self.family, socket.SOCK_STREAM, fileno=fd)
                except OSError as exc:  # not a socket: nothing we or anyone can serve
                    close_all([fd])
                    batch.started += 1
                    logger.warning("worker: handed fd is not a socket (%s); closed", exc)
                    continue
                self.connecting += 1
                task = self.loop.create_task(self._connect(sock, batch, i))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        self._schedule()

    async def _connect(self, sock: socket.socket, batch: _Batch, index: int) -> None:
        batch.started += 1
        try:
            await self.server.serve_accepted(sock)
        except OSError as exc:
            sock.close()
            if exc.errno in _RESOURCE_ERRNOS and batch in self.pending:
                batch.refused.append(index)  # not acknowledged yet: the primary re-routes it
            else:
                logger.debug("worker: a handed connection failed to start: %s", exc)
        except Exception as exc:  # TLS handshake failures and the like: the client's problem
            sock.close()
            logger.debug("worker: a handed connection failed to start: %s", exc)
        finally:
            self.connecting -= 1

    def _open_changed(self) -> None:
        """least-busy: a connection stopped being busy. Report it at once when the primary
        is queueing and saw us at BUSY_MAX (it may hold connections for us); else soon,
        but not more often than REPORT_INTERVAL."""
        if self._scheduled or self.loop is None:
            return
        if self.queueing and self._reported_open >= BUSY_MAX > self.open:
            self._schedule()
            return
        if self._timer is not None:
            return
        wait = self._last_flush + REPORT_INTERVAL - self.loop.time()
        if wait > 0:
            self._timer = self.loop.call_later(wait, self._flush)
        else:
            self._schedule()

    def _schedule(self) -> None:
        """Flush at the end of this loop iteration (after the connects just started)."""
        if not self._scheduled and self.loop is not None:
            self._scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._scheduled = False
        assert self.loop is not None
        self._last_flush = self.loop.time()
        if self._retries < 3 and any(batch.started < batch.n for batch in self.pending):
            # A connect has not run its first step yet (it is queued behind us): go after it,
            # so that one ack covers every batch received in this iteration.
            self._retries += 1
            self._schedule()
            return
        self._retries = 0
        msg: dict[str, Any] = {"t": ACK}
        acked: list[int] = []
        waiting: list[_Batch] = []
        for batch in self.pending:
            if batch.started < batch.n:
                waiting.append(batch)
            elif batch.refused:
                self.fd_refused.append([batch.id, *batch.refused])
                self.taken += batch.n - len(batch.refused)
            else:
                acked.append(batch.id)
                self.taken += batch.n
        self.pending = waiting
        if acked:
            msg["b"] = acked
        if self.refused:
            msg["r"], self.refused = self.refused, []
        if self.fd_refused:
            msg["f"], self.fd_refused = self.fd_refused, []
        opened = self.open
        conns = self.server.open_connections + self.connecting if self.least_busy else opened
        if len(msg) > 1 or opened != self._reported_open or conns != self._reported_conns:
            msg["k"], msg["o"] = self.taken, opened
            if self.least_busy:
                msg["c"] = conns
            self._reported_open, self._reported_conns = opened, conns
            self._send(msg)
        if waiting and not self.server.should_exit:  # (a task cancelled at shutdown never starts)
            self._schedule()

    def _send(self, msg: dict[str, Any]) -> None:
        try:
            sent = self.channel.send(msg)
        except OSError:
            return  # the primary is gone; the orphan path ends this worker
        if not sent and self.loop is not None:
            flush_when_writable(self.loop, self.channel)
