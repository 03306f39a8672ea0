"""Round-robin scheduling in the cluster API: Node's ``SCHED_RR``, on the HTTP server's hand-off.

Under ``cluster.SCHED_RR`` (the default on Linux, as in Node) only the primary
accepts: a worker's ``cluster.listen(address)`` adds it to the address's
round-robin handle, and the primary hands each connection it accepts there to
the next worker listening on that address. The accept/route/hold/re-route
logic is the HTTP server's own (``scheduling/primary.py``'s ``HandOff``,
policy ``round-robin``); this module is the glue on each side:

- primary: :class:`RoundRobinHandle`, one per address, the ``HandOffHost``
  of one ``HandOff`` on the primary's asyncio loop; :class:`RoundRobinHandles`
  keeps them and knows which worker listens where;
- worker: :class:`RoundRobinSocket`, what ``cluster.listen()`` returns: it
  looks like a listening socket (``fileno()`` is readable while a connection
  is queued, ``accept()`` returns ``(socket, address)``), so ``socketserver``
  servers and :class:`RoundRobinServer` (``cluster.start_server``, asyncio)
  serve it as they would a socket.

On the wire (``wire/messages.py``): the worker names its listener with an id
``h`` in ``listen``; the primary's ``conn`` messages carry it back, and the
worker's ``ack`` for them too. A worker acknowledges a connection when its
server accepts it, not when it arrives: a connection queued in a worker that
dies, or that closes its server first, was never seen by its code, and the
primary gives it to another worker (``close`` in the ack says the listener is
gone; what it still held is refused with ``r``). A worker holds at most
:data:`WINDOW` unaccepted connections, as Node's round-robin handle hands a
worker its next connection only once it took the previous one; so each ``conn``
carries one connection and is acknowledged before the server sees it.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import itertools
import logging
import os
import select
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable, Sized
from typing import TYPE_CHECKING, Any, Final

from cluster_server._proc import close_all
from cluster_server.primary.component import WorkerEvent
from cluster_server.scheduling.primary import HandOff
from cluster_server.scheduling.protocol import ACCEPT_MAX
from cluster_server.wire.channel import Channel, Message
from cluster_server.wire.messages import ACK

if TYPE_CHECKING:
    from cluster_server.cluster.primary import Worker

logger = logging.getLogger("cluster_server.cluster")

#: Node's ``cluster.SCHED_NONE``: every worker accepts on the shared listening socket
SCHED_NONE: Final = 1
#: Node's ``cluster.SCHED_RR``: the primary accepts and hands connections round-robin
SCHED_RR: Final = 2
#: the policy's environment variable (Node's ``NODE_CLUSTER_SCHED_POLICY``): ``rr`` or ``none``
POLICY_ENV: Final = "CLUSTER_SERVER_SCHED_POLICY"
_BY_NAME: Final = {"rr": SCHED_RR, "none": SCHED_NONE}
#: unaccepted connections a worker may hold (Node's round-robin handle: one)
WINDOW: Final = 1

Address = tuple[Any, ...] | str
Send = Callable[..., Any]


def default_policy() -> int:
    """Node's default: round-robin, except on Windows (where Node uses the shared handle)."""
    return SCHED_NONE if sys.platform == "win32" else SCHED_RR


def policy_from_env(environ: dict[str, str] | None = None) -> int:
    """The policy ``CLUSTER_SERVER_SCHED_POLICY`` asks for; the default when unset. ValueError if invalid."""
    value = (os.environ if environ is None else environ).get(POLICY_ENV)
    if value is None or value == "":
        return default_policy()
    if value not in _BY_NAME:
        raise ValueError(f"{POLICY_ENV}={value!r}: expected 'rr' (round-robin) or 'none' (shared handle)")
    return _BY_NAME[value]


def check_policy(value: Any) -> int:
    if isinstance(value, bool) or value not in (SCHED_NONE, SCHED_RR):
        raise ValueError(
            f"cluster.scheduling_policy = {value!r}: expected cluster.SCHED_RR ({SCHED_RR}) "
            f"or cluster.SCHED_NONE ({SCHED_NONE})"
        )
    return int(value)


def policy_name(policy: int) -> str:
    """``rr`` or ``none``: the value of :data:`POLICY_ENV` that means ``policy``."""
    return "rr" if policy == SCHED_RR else "none"


# -- the primary --------------------------------------------------------------------------------


class _Listener:
    """One worker's listener on one handle: the "worker" ``HandOff`` routes to.

    ``pid`` is the HandOff's key for it: unique per listener (a worker that
    closes its server and listens again is a new peer), never a process id.
    """

    __slots__ = ("lid", "name", "pid", "worker")

    def __init__(self, worker: Worker, lid: int, key: int) -> None:
        self.worker = worker
        self.lid = lid
        self.pid = key
        self.name = f"worker {worker.id} [pid {worker.pid}]"

    @property
    def channel(self) -> Channel | None:
        return self.worker._channel


class RoundRobinHandle:
    """One address under ``SCHED_RR``: the listening socket the primary bound, and the
    ``HandOff`` that accepts on it and hands connections to the workers listening there.

    It is that HandOff's host (``scheduling/primary.py``'s ``HandOffHost``) on an
    asyncio loop: readers are the loop's, the clock is the loop's, and its
    timers (accept paused at the fd limit, a worker backing off) are re-armed
    after every event.
    """

    def __init__(self, sock: socket.socket, send: Send, workers: Sized, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.listeners = (self,)
        self.slots = workers
        self.stopping = False
        self._send = send
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self.handoff = HandOff("round-robin", window=WINDOW)
        self.handoff.attach(self)

    # -- HandOffHost ------------------------------------------------------------

    def clock(self) -> float:
        return self._loop.time()

    def add_reader(self, fileobj: Any, callback: Callable[[int], None]) -> None:
        self._loop.add_reader(fileobj, self._readable, callback)

    def remove_reader(self, fileobj: Any) -> None:
        if not self._loop.is_closed():
            self._loop.remove_reader(fileobj)

    def send(self, w: _Listener, msg: Message, fds: list[int] | None = None) -> bool:
        msg["h"] = w.lid
        return bool(self._send(w.worker, msg, fds or []))

    # -- events -----------------------------------------------------------------

    def _readable(self, callback: Callable[[int], None]) -> None:
        callback(selectors.EVENT_READ)
        self.rearm()

    def event(self, what: WorkerEvent, listener: _Listener) -> None:
        """``ready``, ``draining`` or ``exited`` (HandOff's worker events) for one listener."""
        self.handoff.worker_event(what, listener)
        self.rearm()

    def rearm(self) -> None:
        """Wake up for the HandOff's next deadline (none most of the time)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.handoff.next_deadline()
        if deadline is not None and not self._loop.is_closed():
            self._timer = self._loop.call_at(deadline, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.handoff.tick()
        self.rearm()

    def close(self) -> None:
        """Stop accepting; connections no worker took are closed (the socket is the caller's)."""
        self.stopping = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.handoff.close()


class RoundRobinHandles:
    """The primary's round-robin handles by address, and each worker's listeners on them."""

    def __init__(self, send: Send, workers: Sized) -> None:
        self._send = send
        self._workers = workers
        #: by the listening socket's fd: one handle per socket, whatever address it was asked for by
        self.handles: dict[int, RoundRobinHandle] = {}
        #: worker id -> its listener id -> (handle, listener)
        self._listeners: dict[int, dict[int, tuple[RoundRobinHandle, _Listener]]] = {}
        self._keys = itertools.count(1)

    def add(self, w: Worker, sock: socket.socket, lid: int) -> None:
        """Worker ``w`` listens on ``sock`` (the primary's) with its listener ``lid``."""
        mine = self._listeners.setdefault(w.id, {})
        if lid in mine:
            raise ValueError(f"listener id {lid} is in use already")
        handle = self.handles.get(sock.fileno())
        if handle is None:
            handle = RoundRobinHandle(sock, self._send, self._workers, asyncio.get_running_loop())
            self.handles[sock.fileno()] = handle
        listener = _Listener(w, lid, next(self._keys))
        mine[lid] = (handle, listener)
        handle.event("ready", listener)

    def ack(self, w: Worker, msg: Message, fds: list[int]) -> None:
        """An ``ack`` from worker ``w``: for the handle its listener ``h`` is on."""
        lid = msg.get("h")
        entry = self._listeners.get(w.id, {}).get(lid) if isinstance(lid, int) else None
        if entry is None:
            close_all(fds)
            logger.warning("worker %d [pid %d] acknowledged for no listener of its own: %.200r", w.id, w.pid, msg)
            return
        handle, listener = entry
        if msg.get("close"):
            handle.handoff.worker_event("draining", listener)
        handle.handoff.worker_message(listener, msg, fds)
        handle.rearm()

    def disconnected(self, w: Worker) -> None:
        """``w``'s channel closed: it gets no more connections (what it holds waits for its exit)."""
        for handle, listener in self._listeners.get(w.id, {}).values():
            handle.event("draining", listener)

    def exited(self, w: Worker) -> None:
        """``w`` exited: what it was handed and never accepted goes to the other workers."""
        for handle, listener in self._listeners.pop(w.id, {}).values():
            handle.event("exited", listener)

    def fds_to_close_in_child(self) -> list[int]:
        return [fd for h in self.handles.values() for fd in h.handoff.fds_to_close_in_child()]

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        self.handles.clear()
        self._listeners.clear()


# -- a worker -------------------------------------------------------------------------------------


class RoundRobinSocket:
    """What ``cluster.listen()`` returns in a worker under ``SCHED_RR``: a listening socket
    whose connections the primary accepted and handed over.

    ``fileno()`` is an eventfd, readable while connections are queued, so
    selectors, ``socketserver`` and event loops wait on it as on a socket;
    ``accept()`` returns ``(socket.socket, address)`` and honours the timeout
    (``settimeout``, ``setblocking``). Thread-safe: the channel thread queues,
    any thread accepts. Closing it gives what is still queued back to the
    primary, which hands it to another worker.
    """

    type = socket.SOCK_STREAM
    proto = 0

    def __init__(self, send: Send, lid: int, forget: Callable[[int], None]) -> None:
        self.lid = lid
        self.family = socket.AF_INET
        self._send = send
        self._forget = forget
        self._lock = threading.Lock()
        self._queue: collections.deque[tuple[int, int, int]] = collections.deque()  # (batch, index, fd)
        self._batches: dict[int, list[int]] = {}  # batch -> [fds, taken]
        self._efd = os.eventfd(0, os.EFD_SEMAPHORE | os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._timeout: float | None = socket.getdefaulttimeout()
        self._shut = False  # no more connections: disconnected, or closed
        self._address: Address = ""

    def __repr__(self) -> str:
        state = "closed" if self._efd < 0 else "shut down" if self._shut else f"fd={self._efd}"
        return f"<cluster.RoundRobinSocket {state} laddr={self._address!r}>"

    def listening(self, address: Any) -> None:
        """The primary listens at ``address`` for us (its answer to ``listen``)."""
        if isinstance(address, str):
            self.family, self._address = socket.AF_UNIX, address
        else:
            self._address = tuple(address)
            self.family = socket.AF_INET6 if len(self._address) == 4 else socket.AF_INET

    # -- like a socket ------------------------------------------------------------

    def fileno(self) -> int:
        return self._efd

    def getsockname(self) -> Address:
        return self._address

    def gettimeout(self) -> float | None:
        return self._timeout

    def settimeout(self, timeout: float | None) -> None:
        if timeout is not None and timeout < 0:
            raise ValueError("Timeout value out of range")
        self._timeout = timeout

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def getblocking(self) -> bool:
        return self._timeout != 0.0

    def listen(self, backlog: int = 0) -> None:
        """Nothing to do: the primary listens."""

    def accept(self) -> tuple[socket.socket, Any]:
        """The next connection; blocks (up to the timeout) while none is queued."""
        timeout = self._timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            got = self.take()
            if got is not None:
                return got
            if timeout == 0.0:
                raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError("timed out")
            poller = select.poll()
            poller.register(self._efd, select.POLLIN)
            poller.poll(None if remaining is None else max(1, int(remaining * 1000)))

    def close(self) -> None:
        """Give queued connections back to the primary and release the fd."""
        self.shutdown()
        with self._lock:
            efd, self._efd = self._efd, -1
        if efd >= 0:
            os.close(efd)

    def discard(self) -> None:
        """Never listened (the primary shared its socket, or refused): release the fd, say nothing."""
        with self._lock:
            self._shut = True
            efd, self._efd = self._efd, -1
        self._forget(self.lid)
        if efd >= 0:
            os.close(efd)

    def __enter__(self) -> RoundRobinSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the hand-off ---------------------------------------------------------------

    def shutdown(self, how: int = socket.SHUT_RDWR) -> None:
        """No more connections: refuse what is queued (the primary re-routes it); accept()
        raises from now on. The fd stays readable until ``close()``, so a server waiting on
        it wakes up and finds out (run when the worker disconnects)."""
        with self._lock:
            if self._shut:
                return
            self._shut = True
            queued, self._queue = list(self._queue), collections.deque()
            batches, self._batches = self._batches, {}
            if self._efd >= 0:
                os.eventfd_write(self._efd, 1)
        refused: dict[int, list[int]] = {}
        for bid, index, _ in queued:
            refused.setdefault(bid, []).append(index)
        close_all(fd for _, _, fd in queued)
        whole = [bid for bid, idx in refused.items() if len(idx) == batches[bid][0]]
        partial = [[bid, *idx] for bid, idx in refused.items() if len(idx) < batches[bid][0]]
        self._ack({"close": True, "r": whole, "f": partial})
        self._forget(self.lid)

    def on_conn(self, msg: Message, fds: list[int]) -> None:
        """A ``conn`` from the primary (on the channel thread): queue its connections."""
        bid = msg.get("b")
        if isinstance(bid, bool) or not isinstance(bid, int):
            close_all(fds)
            logger.warning("worker: a 'conn' message without a batch number: %.200r; dropped", msg)
            return
        if msg.get("ctrunc") or not fds:  # we are at our fd limit: the primary re-routes them
            close_all(fds)
            self._ack({"f": [[bid]]})
            return
        with self._lock:
            if not self._shut:
                self._batches[bid] = [len(fds), 0]
                self._queue.extend((bid, i, fd) for i, fd in enumerate(fds))
                os.eventfd_write(self._efd, len(fds))
                return
        refuse(self._send, msg, fds)

    def take(self) -> tuple[socket.socket, Any] | None:
        """One queued connection, acknowledged to the primary first; None when none is queued.

        A connection is never handed to the server unless the primary has its
        acknowledgement: one it could re-route must not be served here too.
        """
        while True:
            with self._lock:
                if self._shut:
                    raise OSError(errno.EBADF, "the cluster listener is closed")
                if not self._queue:
                    return None
                bid, _, fd = self._queue.popleft()
                os.eventfd_read(self._efd)
                batch = self._batches[bid]
                batch[1] += 1
                complete = batch[1] == batch[0]
                if complete:
                    del self._batches[bid]
            if complete and not self._ack({"b": [bid]}):
                os.close(fd)  # the primary cannot know we took it: it will give it to another
                continue
            sock = socket.socket(self.family, socket.SOCK_STREAM, 0, fd)
            try:
                address = sock.getpeername()
            except OSError:
                address = None
            return sock, address

    def _ack(self, fields: dict[str, Any]) -> bool:
        msg = {"t": ACK, "h": self.lid, **{k: v for k, v in fields.items() if v}}
        try:
            self._send(msg)
        except Exception as exc:  # disconnected: nothing more to tell the primary
            logger.debug("worker: ack not sent (%s)", exc)
            return False
        return True


def refuse(send: Send, msg: Message, fds: list[int]) -> None:
    """A ``conn`` for a listener that is gone: close ours, the primary re-routes its copies."""
    close_all(fds)
    bid, lid = msg.get("b"), msg.get("h")
    if isinstance(bid, int) and isinstance(lid, int):
        try:
            send({"t": ACK, "h": lid, "close": True, "r": [bid]})
        except Exception as exc:
            logger.debug("worker: refusal not sent (%s)", exc)


class RoundRobinServer(asyncio.AbstractServer):
    """``asyncio.Server``'s interface over a :class:`RoundRobinSocket` (``cluster.start_server``,
    ``cluster.create_server``): each connection handed over becomes a transport with a
    ``protocol_factory()`` protocol, through ``loop.connect_accepted_socket``."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: RoundRobinSocket,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        **connect: Any,
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._factory = protocol_factory
        self._connect_kw = connect
        self._serving = False
        self._closed = asyncio.Event()
        self._forever: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    @property
    def sockets(self) -> tuple[RoundRobinSocket, ...]:
        return () if self._closed.is_set() else (self._sock,)

    async def start_serving(self) -> None:
        if self._serving or self._closed.is_set():
            return
        self._serving = True
        self._loop.add_reader(self._sock.fileno(), self._readable)

    async def serve_forever(self) -> None:
        await self.start_serving()
        self._forever = self._loop.create_future()
        try:
            await self._forever
        finally:
            self.close()

    def close(self) -> None:
        """Stop serving (the connections open go on); queued ones go back to the primary."""
        if self._closed.is_set():
            return
        if self._serving and not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())
        self._serving = False
        self._sock.close()
        self._closed.set()
        if self._forever is not None and not self._forever.done():
            self._forever.cancel()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def __aenter__(self) -> RoundRobinServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()

    def _readable(self) -> None:
        for _ in range(ACCEPT_MAX):
            try:
                got = self._sock.take()
            except OSError:  # shut down (the worker disconnected)
                self.close()
                return
            if got is None:
                return
            task = self._loop.create_task(self._start(got[0]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _start(self, sock: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, sock, **self._connect_kw)
        except Exception as exc:  # a TLS handshake that failed, a client gone: theirs
            sock.close()
            logger.debug("worker: a handed connection failed to start: %s", exc)
