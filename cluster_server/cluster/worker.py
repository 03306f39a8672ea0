"""The worker side of ``cluster_server.cluster``: one link to the primary.

A worker has one :class:`Endpoint`: it sends to the primary, dispatches what
the primary sends, and hands each message to its consumer in the form that
consumer asked for. Two transports sit under it:

- :class:`ThreadLink`, in a worker started by ``cluster.fork()`` (either start
  method). A daemon thread, ``cluster-channel``, blocks in ``recvmsg`` and
  dispatches; sends are blocking ``sendmsg`` calls under a lock, from any
  thread. A thread, because the worker's own code may be anything (a blocking
  ``http.server``, an asyncio program, a computation) and must not have to poll
  the channel. Sync callbacks run on that thread; ``async def`` callbacks and
  ``await recv()`` get their messages on their own event loop
  (``call_soon_threadsafe``).
- ``LoopLink`` (``cluster/http.py``), in an HTTP worker of cluster-server: the
  uvicorn event loop already reads the channel, so dispatch happens there and
  no thread is started.

The messages between a worker and its primary (``online``, ``msg``,
``bcast``, ``req``, ``res``, ``listen``, ``listening``, ``disconnect``,
``disconnecting``) are the ``cluster`` channel's in ``wire/messages.py``, with
their fields (docs/architecture.md has the table).
"""

from __future__ import annotations

import abc
import array
import asyncio
import collections
import concurrent.futures
import inspect
import itertools
import logging
import os
import runpy
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NoReturn

from cluster_server import _logging, _proc
from cluster_server._errors import BindError, ChannelError, ClusterRoleError, DisconnectedError
from cluster_server.cluster import handles
from cluster_server.cluster import role as _role
from cluster_server.cluster.rr import RoundRobinSocket
from cluster_server.cluster.rr import refuse as refuse_conn
from cluster_server.wire import advanced
from cluster_server.wire import channel as _channel
from cluster_server.wire.channel import Message
from cluster_server.wire.messages import (
    BCAST,
    CONN,
    DISCONNECT,
    DISCONNECTING,
    LISTEN,
    LISTENING,
    MSG,
    ONLINE,
    REQ,
    RES,
)
from cluster_server.wire.request import Answer, Pending, Replier
from cluster_server.wire.spawn import child_main

logger = logging.getLogger("cluster_server.cluster")

#: messages kept for ``recv()`` when nobody registered ``on_message``; the oldest go first
MAX_INBOX = 100_000
#: how long ``listen()`` waits for the primary to bind
LISTEN_TIMEOUT = 30.0
#: the signal a worker gets when its primary dies (Linux), on top of the channel closing.
#: SIGTERM, not the HTTP worker's ORPHAN_SIGNAL (SIGUSR2, ``worker/main.py``): this worker
#: runs the user's program, which stops on SIGTERM by default or by its own handler, as
#: any program does; an HTTP worker takes SIGTERM from its primary to mean "drain", so its
#: primary's death needs a signal of its own to be told apart (and drained faster).
ORPHAN_TERM_SIGNAL = signal.SIGTERM
#: marks a spawned worker (like Node's NODE_UNIQUE_ID); removed from its environment at start
WORKER_ID_ENV = "CLUSTER_SERVER_WORKER_ID"
#: the spawned worker's channel fd (passed with pass_fds)
CHANNEL_FD_ENV = "CLUSTER_SERVER_CHANNEL_FD"


@dataclass
class Callback:
    """A registered callback: ``loop`` is set for ``async def`` ones (they run there)."""

    fn: Callable[..., Any]
    loop: asyncio.AbstractEventLoop | None


class Endpoint(abc.ABC):
    """A worker's end of its link to the primary; the transport is a subclass."""

    def __init__(self, worker_id: int) -> None:
        self.id = worker_id
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        #: (data, handle or None) for recv() while no on_message callback is registered
        self._inbox: collections.deque[tuple[Any, socket.socket | None]] = collections.deque()
        self._inbox_full_warned = False
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._on_message: list[Callback] = []
        self._on_disconnect: list[Callback] = []
        self._request_handler: Callback | None = None
        #: requests that came before any handler was set: they wait for one (the
        #: asker's timeout bounds the wait), so a worker's start-up is no race
        self._unanswered: collections.deque[Message] = collections.deque(maxlen=MAX_INBOX)
        #: this worker's requests to the primary, waiting for their answers
        self._requests: Pending[concurrent.futures.Future[Answer]] = Pending()
        self._replier = Replier(self._send, f"worker {worker_id}")
        self._closers: list[Callable[[], None]] = []
        #: round-robin listeners by id (``cluster/rr.py``)
        self._rr_sockets: dict[int, RoundRobinSocket] = {}
        self._listener_ids = itertools.count(1)
        self._zero_ports: dict[str, int] = {}  # host -> listen(0) calls so far
        self.connected = True
        self.disconnecting = False
        self._disconnected = threading.Event()

    # -- what a transport provides ------------------------------------------------

    @abc.abstractmethod
    def _send(self, msg: Message, fds: Sequence[int] = ()) -> None:
        """Put one message (and fds) on the wire."""

    @abc.abstractmethod
    def _close_transport(self) -> None:
        """Close the underlying channel."""

    def default_loop(self) -> asyncio.AbstractEventLoop | None:
        """Where ``async def`` callbacks registered outside any event loop run."""
        return None

    def _check_may_block(self, what: str) -> None:  # noqa: B027 - optional hook
        """Raise if blocking here would deadlock the dispatcher."""

    # -- sending ------------------------------------------------------------------

    def send(self, data: Any, handle: socket.socket | None = None, keep_open: bool = False) -> None:
        """Send ``data`` to the primary; ``handle``: a socket sent along (``cluster/handles.py``)."""
        if handle is None:
            self._send({"t": MSG, "data": data})
            return
        self._send_handle({"t": MSG, "data": data, "handle": handles.SOCKET}, handles.fd_of(handle))
        handles.close_after_send(handle, keep_open)

    def _send_handle(self, msg: Message, fd: int) -> None:
        """Send ``msg`` with a copy of ``fd`` (the caller keeps ``fd``)."""
        raise ClusterRoleError("this worker's primary takes no handles: cluster-server's HTTP primary runs no app code")

    def broadcast(self, data: Any, include_self: bool = False) -> None:
        self._send({"t": BCAST, "data": data, "self": include_self})

    def _start_request(self, msg: Message) -> tuple[int, concurrent.futures.Future[Answer]]:
        fut: concurrent.futures.Future[Answer] = concurrent.futures.Future()
        rid = self._requests.add(fut)
        if rid is None:
            raise DisconnectedError(f"worker {self.id} is disconnected from its primary")
        try:
            self._send({**msg, "id": rid})
        except BaseException:
            self._requests.discard(rid)
            raise
        return rid, fut

    def _wait_answer(
        self, rid: int, fut: concurrent.futures.Future[Answer], timeout: float | None, late: str
    ) -> Answer:
        """Block until request ``rid`` is answered: (data, fds); TimeoutError(``late``) after ``timeout`` s."""
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(late) from None
        finally:
            self._requests.discard(rid)

    def request_sync(self, data: Any, timeout: float | None = 5.0) -> Any:
        self._check_may_block("cluster.request_sync()")
        rid, fut = self._start_request({"t": REQ, "data": data})
        value, fds = self._wait_answer(rid, fut, timeout, f"the primary did not answer within {timeout} s")
        _proc.close_all(fds)
        return value

    async def request(self, data: Any, timeout: float | None = 5.0) -> Any:
        rid, fut = self._start_request({"t": REQ, "data": data})
        try:
            value, fds = await asyncio.wait_for(asyncio.wrap_future(fut), timeout)
        except TimeoutError:
            raise TimeoutError(f"the primary did not answer within {timeout} s") from None
        finally:
            self._requests.discard(rid)
        _proc.close_all(fds)
        return value

    def listen(
        self, address: tuple[str, int] | str, backlog: int = 511, type: int = socket.SOCK_STREAM
    ) -> socket.socket | RoundRobinSocket:
        """Ask the primary to listen at ``address`` (bound once for every worker).

        The primary's policy decides what comes back: the shared listening
        socket (``SCHED_NONE``), or a :class:`RoundRobinSocket` that the
        connections it accepts come through (``SCHED_RR``). A datagram socket
        (``type=SOCK_DGRAM``) is always the shared socket.
        """
        self._check_may_block("cluster.listen()")
        request: Message = {"t": LISTEN, "backlog": int(backlog)}
        if type == socket.SOCK_DGRAM:  # shared whatever the policy, as Node's dgram sockets
            request["type"] = "dgram"
        if isinstance(address, str):
            request["addr"] = address
        else:
            host, port = address
            request["addr"] = [str(host), int(port)]
            if int(port) == 0:  # Node: the n-th listen(0) of a host in each worker shares one port
                request["index"] = self._zero_ports[str(host)] = self._zero_ports.get(str(host), -1) + 1
        rr = RoundRobinSocket(self._send, next(self._listener_ids), self._forget_listener)
        self._rr_sockets[rr.lid] = rr
        request["h"] = rr.lid
        try:
            rid, fut = self._start_request(request)
            late = f"the primary did not answer a listen request within {LISTEN_TIMEOUT} s"
            answer, fds = self._wait_answer(rid, fut, LISTEN_TIMEOUT, late)
        except BaseException:
            rr.discard()
            raise
        if isinstance(answer, dict):  # round-robin: connections come through the channel
            _proc.close_all(fds)
            rr.listening(answer.get("addr"))
            self.add_closer(rr.shutdown)
            self._send({"t": LISTENING, "addr": answer.get("addr")})
            return rr
        rr.discard()
        if not fds:
            raise BindError(f"the primary sent no socket for {address!r}")
        _proc.close_all(fds[1:])
        sock = socket.socket(fileno=fds[0])
        self._send({"t": LISTENING, "addr": answer})
        return sock

    def _forget_listener(self, lid: int) -> None:
        self._rr_sockets.pop(lid, None)

    def _on_conn(self, msg: Message, fds: list[int]) -> None:
        """Connections the primary handed to one of our round-robin listeners."""
        rr = self._rr_sockets.get(msg.get("h"))  # type: ignore[arg-type]
        if rr is None:
            refuse_conn(self._send, msg, fds)
        else:
            rr.on_conn(msg, fds)

    # -- receiving ----------------------------------------------------------------

    def on_message(self, fn: Callable[[Any], Any]) -> None:
        self._on_message.append(self._callback(fn))

    def on_disconnect(self, fn: Callable[[], Any]) -> None:
        self._on_disconnect.append(self._callback(fn))

    def on_request(self, fn: Callable[[Any], Any] | None) -> None:
        """Set the request handler; requests that came before it was set are answered now."""
        handler = None if fn is None else self._callback(fn)
        with self._lock:
            self._request_handler = handler
            waiting, self._unanswered = self._unanswered, collections.deque()
        for msg in waiting:
            self._answer(msg)

    def _callback(self, fn: Callable[..., Any]) -> Callback:
        if not callable(fn):
            raise TypeError(f"expected a function, got {fn!r}")
        if not inspect.iscoroutinefunction(fn):
            return Callback(fn, None)
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = self.default_loop()
        if loop is None:
            raise RuntimeError(
                f"{fn.__qualname__} is an async function: register it from inside the event loop it should run on"
            )
        return Callback(fn, loop)

    def get_message(self, timeout: float | None = None, with_handle: bool = False) -> Any:
        self._check_may_block("cluster.get_message()")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._inbox:
                if not self.connected:
                    raise DisconnectedError(f"worker {self.id} is disconnected from its primary")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no message within {timeout} s")
                self._cond.wait(remaining)
            return _unpack(self._inbox.popleft(), with_handle)

    async def recv(self, timeout: float | None = None, with_handle: bool = False) -> Any:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            with self._lock:
                if self._inbox:
                    return _unpack(self._inbox.popleft(), with_handle)
                if not self.connected:
                    raise DisconnectedError(f"worker {self.id} is disconnected from its primary")
                waker: asyncio.Future[None] = loop.create_future()
                entry = (loop, waker)
                self._wakers.append(entry)
            try:
                if deadline is None:
                    await waker
                else:
                    await asyncio.wait_for(waker, max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise TimeoutError(f"no message within {timeout} s") from None
            finally:
                with self._lock:
                    if entry in self._wakers:
                        self._wakers.remove(entry)

    async def messages(self, with_handle: bool = False) -> AsyncIterator[Any]:
        while True:
            try:
                msg = await self.recv(with_handle=with_handle)
            except DisconnectedError:
                return
            yield msg

    def wait_disconnect(self, timeout: float | None = None) -> bool:
        return self._disconnected.wait(timeout)

    async def disconnected(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._disconnected.is_set():
            with self._lock:
                if self._disconnected.is_set():
                    return
                waker: asyncio.Future[None] = loop.create_future()
                entry = (loop, waker)
                self._wakers.append(entry)
            try:
                await waker
            finally:
                with self._lock:
                    if entry in self._wakers:
                        self._wakers.remove(entry)

    def add_closer(self, fn: Callable[[], None]) -> None:
        """Something to close when the worker disconnects (a server it runs); closed at once
        if the disconnect already began (it can come between ``listen`` and this call)."""
        with self._lock:
            late = self.disconnecting
            if not late:
                self._closers.append(fn)
        if late:
            fn()

    # -- dispatch (on the transport's thread) ---------------------------------------

    def dispatch(self, msg: Message, fds: list[int]) -> None:
        if "a" in msg:  # serialization="advanced" (wire/advanced.py)
            try:
                msg = advanced.unpack(msg)
            except ValueError as exc:
                _proc.close_all(fds)
                logger.warning("worker %d: dropped a message from the primary: %s", self.id, exc)
                return
        kind = msg.get("t")
        if kind == RES:
            self._resolve(msg, fds)
            return
        if kind == CONN:
            self._on_conn(msg, fds)
            return
        if kind == MSG:
            self._deliver(msg.get("data"), handles.adopt(msg, fds, f"worker {self.id}"))
            return
        _proc.close_all(fds)
        if kind == REQ:
            self._answer(msg)
        elif kind == DISCONNECT:
            self.disconnect(asked=True)
        else:
            logger.warning("worker %d: unknown message from the primary %.200r; ignored", self.id, msg)

    def _deliver(self, data: Any, handle: socket.socket | None = None) -> None:
        with self._lock:
            callbacks = list(self._on_message)
            if not callbacks:
                if len(self._inbox) >= MAX_INBOX:
                    _, dropped = self._inbox.popleft()
                    if dropped is not None:
                        dropped.close()
                    if not self._inbox_full_warned:
                        self._inbox_full_warned = True
                        logger.warning(
                            "worker %d: %d messages wait for recv(); dropping the oldest", self.id, MAX_INBOX
                        )
                self._inbox.append((data, handle))
                self._wake_all()
                return
        took = False
        for callback in callbacks:
            args = handles.call_args(callback.fn, (data,), handle)
            took = took or len(args) > 1
            self._call(callback, *args)
        if handle is not None and not took:
            handle.close()  # no callback takes it: never leaked

    def _wake_all(self) -> None:
        """Wake every waiter (sync and async); the caller holds the lock."""
        self._cond.notify_all()
        wakers, self._wakers = self._wakers, []
        for loop, waker in wakers:
            try:
                loop.call_soon_threadsafe(_wake, waker)
            except RuntimeError:  # that loop is closed
                pass

    def _call(self, callback: Callback, *args: Any) -> None:
        try:
            if callback.loop is None:
                callback.fn(*args)
            else:
                cf = asyncio.run_coroutine_threadsafe(callback.fn(*args), callback.loop)
                cf.add_done_callback(_log_failure(callback.fn))
        except Exception:
            logger.exception("worker %d: callback %r raised", self.id, callback.fn)

    def _answer(self, msg: Message) -> None:
        rid = msg.get("id")
        if not isinstance(rid, int):
            logger.warning("worker %d: request without an id %.200r; ignored", self.id, msg)
            return
        with self._lock:
            handler = self._request_handler
            if handler is None:
                self._unanswered.append(msg)
                return
        loop = handler.loop
        schedule = None if loop is None else lambda aw: asyncio.run_coroutine_threadsafe(aw, loop)
        self._replier.call(rid, handler.fn, msg.get("data"), schedule)

    def _resolve(self, msg: Message, fds: list[int]) -> None:
        if not self._requests.resolve(msg, fds):
            logger.debug("worker %d: an answer nobody waits for (late?) %.200r", self.id, msg)

    # -- disconnecting --------------------------------------------------------------

    def disconnect(self, asked: bool = False) -> None:
        """Close this worker's servers and its channel (Node's ``worker.disconnect()``)."""
        with self._lock:
            if self.disconnecting:
                return
            self.disconnecting = True
        if not asked:
            try:
                self._send({"t": DISCONNECTING})
            except DisconnectedError:
                pass
        for close in self._closers:
            try:
                close()
            except Exception:
                logger.exception("worker %d: closing %r on disconnect raised", self.id, close)
        self._mark_disconnected(emit=True)
        self._close_transport()

    def _mark_disconnected(self, emit: bool = False) -> None:
        """No longer connected; with ``emit``, the ``disconnect`` listeners run once the channel
        is closed (Node's order: ``is_connected()`` is False in them) and before anything that
        waits for the disconnect wakes up (the program may end right after)."""
        with self._lock:
            if not self.connected:
                return
            self.connected = False
        self._requests.close(lambda: DisconnectedError(f"worker {self.id} disconnected before the answer came"))
        if emit:
            self._close_transport()
            for callback in self._on_disconnect:
                self._call(callback)
        with self._lock:
            self._disconnected.set()
            self._wake_all()


def _unpack(item: tuple[Any, socket.socket | None], with_handle: bool) -> Any:
    """An inbox item as ``recv()`` returns it: ``(data, handle)``, or ``data`` (the handle closed)."""
    if with_handle:
        return item
    data, handle = item
    if handle is not None:
        handle.close()
    return data


def _wake(waker: asyncio.Future[None]) -> None:
    if not waker.done():
        waker.set_result(None)


def _log_failure(fn: Callable[..., Any]) -> Callable[[concurrent.futures.Future[Any]], None]:
    def done(fut: concurrent.futures.Future[Any]) -> None:
        if not fut.cancelled() and (exc := fut.exception()) is not None:
            logger.error("callback %r raised", fn, exc_info=exc)

    return done


class ThreadLink(Endpoint):
    """The link of a worker started by ``cluster.fork()``: a reader thread, blocking sends."""

    def __init__(self, worker_id: int, sock: socket.socket) -> None:
        super().__init__(worker_id)
        sock.setblocking(True)
        self._sock = sock
        self._send_lock = threading.Lock()
        self._thread = threading.Thread(target=self._read_loop, name="cluster-channel", daemon=True)
        #: serialization="advanced": messages' data in wire/advanced.py's tagged JSON
        self.advanced = os.environ.get(advanced.ENV) == "advanced"

    def start(self) -> None:
        self._send({"t": ONLINE})
        self._thread.start()

    def fileno(self) -> int:
        return self._sock.fileno()

    def _send(self, msg: Message, fds: Sequence[int] = ()) -> None:
        data, wire_fds = _channel.frame(_channel.encode(advanced.pack(msg) if self.advanced else msg), list(fds))
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", wire_fds).tobytes())] if wire_fds else []
        try:
            with self._send_lock:
                if not self.connected:
                    raise DisconnectedError(f"worker {self.id} is disconnected from its primary")
                try:
                    self._sock.sendmsg([data], anc)
                except OSError as exc:  # EPIPE, ECONNRESET, EBADF after close: the channel is gone
                    raise DisconnectedError(f"worker {self.id}'s channel to the primary is closed ({exc})") from None
        finally:
            _proc.close_all(wire_fds[len(fds) :])  # a large message's memfd: the kernel has its copy

    def _send_handle(self, msg: Message, fd: int) -> None:
        self._send(msg, [fd])  # a blocking sendmsg: the kernel copies the fd before it returns

    def _check_may_block(self, what: str) -> None:
        if threading.current_thread() is self._thread:
            raise RuntimeError(f"{what} cannot wait in a callback on the channel thread: it would never get its answer")

    def _close_transport(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reader, which closes the socket
        except OSError:
            pass

    def _read_loop(self) -> None:
        while True:
            try:
                got = self._receive()
            except EOFError:
                break
            if got is None:
                continue
            msg, fds = got
            try:
                self.dispatch(msg, fds)
            except Exception:
                logger.exception("worker %d: handling %.200r raised", self.id, msg)
        self._on_eof()

    def _receive(self) -> tuple[Message, list[int]] | None:
        """The next message from the primary; None when it was dropped (and logged). EOFError at the end."""
        try:
            data, anc, flags, _ = self._sock.recvmsg(_channel.MAX_MESSAGE + 1, _channel._ANCBUF, _channel._CMSG_CLOEXEC)
        except InterruptedError:
            return None
        except OSError:
            raise EOFError from None
        fds = _channel._fds_from(anc)
        if not data and not fds:
            raise EOFError
        try:
            msg = _channel.decode(data)
            if flags & socket.MSG_TRUNC:
                raise ChannelError("a truncated message")
        except ChannelError as exc:
            _proc.close_all(fds)
            logger.warning("worker %d: dropped a message from the primary: %s", self.id, exc)
            return None
        if flags & socket.MSG_CTRUNC:  # at our fd limit: a connection handed over goes back
            if msg.get("t") == CONN:
                return {**msg, "ctrunc": True}, fds
            _proc.close_all(fds)
            logger.warning("worker %d: dropped a message whose fds were truncated (at the fd limit?)", self.id)
            return None
        try:
            return _channel.unframe(msg, fds)
        except ChannelError as exc:  # (its fds are closed)
            logger.warning("worker %d: dropped a message from the primary: %s", self.id, exc)
            return None

    def _on_eof(self) -> None:
        expected = self.disconnecting
        self._mark_disconnected()
        with self._send_lock:
            self._sock.close()
        if not expected:
            # Like Node: the primary is gone (or closed our channel without asking):
            # a worker does not outlive it.
            _proc.flush_output()
            os._exit(0)


# -- starting a worker ----------------------------------------------------------------

MainTarget = tuple[str, str]  # ("path", "/abs/script.py") or ("module", "pkg.mod")


def main_target() -> MainTarget:
    """What re-running "the program" means for this process: its script or its ``-m`` module."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = getattr(spec, "name", None)
    if isinstance(name, str) and name != "__main__":
        return ("module", name.removesuffix(".__main__"))
    path = getattr(main, "__file__", None)
    if not path:
        raise ClusterRoleError(
            "cannot re-run the main program in a worker: it has no file (interactive session or -c); "
            "name the worker's script with cluster.setup_primary(exec='worker.py')"
        )
    return ("path", os.path.abspath(path))


def reset_signals() -> None:
    """Give a forked worker the signal dispositions of a fresh interpreter."""
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        try:
            handler = signal.getsignal(sig)
        except (OSError, ValueError):
            continue
        if callable(handler) and handler is not signal.default_int_handler:
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
    signal.signal(signal.SIGINT, signal.default_int_handler)


def start_link(worker_id: int, sock: socket.socket, primary_pid: int | None) -> ThreadLink:
    """Become a worker: link to the primary, tell it we are online."""
    _proc.set_parent_death_signal(ORPHAN_TERM_SIGNAL)
    link = ThreadLink(worker_id, sock)
    _role.become_worker(link)
    _quiet_keyboard_interrupt()
    try:
        if primary_pid is not None and os.getppid() != primary_pid:
            raise DisconnectedError("the primary died before the worker started")
        link.start()
    except DisconnectedError:  # the primary is gone already: so are we
        _proc.flush_output()
        os._exit(0)
    return link


def _quiet_keyboard_interrupt() -> None:
    """In a (spawned) worker, an uncaught KeyboardInterrupt ends it without a traceback."""
    hook = sys.excepthook

    def excepthook(tp: type[BaseException], value: BaseException, tb: Any) -> None:
        if not issubclass(tp, KeyboardInterrupt):
            hook(tp, value, tb)

    sys.excepthook = excepthook


def run_forked(
    worker_id: int,
    sock: socket.socket,
    primary_pid: int,
    env: dict[str, str] | None,
    target: MainTarget,
    args: Sequence[str],
) -> NoReturn:
    """A forked worker: re-run the program's main (Node's semantics), then exit. Never returns."""

    def body() -> int:
        reset_signals()
        _logging.set_role(f"worker {worker_id}", worker_id)
        # The parent's running loop must never be touched here (its epoll is shared
        # with the parent's): forget it without closing it. The stack keeps it alive.
        asyncio.events._set_running_loop(None)
        if env:
            os.environ.update(env)
        start_link(worker_id, sock, primary_pid)
        return run_main(target, args)

    child_main(body, f"worker {worker_id} crashed")


def spawned_main() -> NoReturn:
    """A spawned worker: link to the primary, then run the program as ``__main__``; exit with its code.

    A fresh interpreter runs this first (``python [options] -c BOOTSTRAP kind name
    args...``, see ``cluster/primary.py``'s ``SPAWN_BOOTSTRAP``), as Node sets up a
    worker's channel before its main module runs: the role is set and the channel
    thread started before the program imports anything, never from inside an import
    of ``cluster_server.cluster``. The environment names the worker and its channel
    (like Node's ``NODE_UNIQUE_ID``); both are removed before the program runs.
    """
    worker_id = int(os.environ.pop(WORKER_ID_ENV))
    fd = int(os.environ.pop(CHANNEL_FD_ENV))
    kind, name, *args = sys.argv[1:]
    target: MainTarget = ("module", name) if kind == "module" else ("path", name)
    if not sys.flags.safe_path and sys.path and sys.path[0] == "":
        # `python -c` put the current directory first; `python script.py` puts the
        # script's directory there, and `python -m` the current directory, by its full path
        sys.path[0] = os.path.dirname(os.path.realpath(name)) if kind == "path" else os.getcwd()
    os.set_inheritable(fd, False)
    start_link(worker_id, socket.socket(fileno=fd), None)
    sys.exit(run_main(target, args))


def run_main(target: MainTarget, args: Sequence[str]) -> int:
    """Run the program's main as ``__main__``; return the exit code it asks for."""
    kind, name = target
    sys.argv = [name, *args]
    try:
        if kind == "path":
            runpy.run_path(name, run_name="__main__")
        else:
            runpy.run_module(name, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return exit_code_of(exc)
    except KeyboardInterrupt:
        # Ctrl+C reaches every worker: die of SIGINT, as an interpreter does, but
        # without N copies of the same traceback.
        _proc.flush_output()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)  # die of SIGINT, as an interpreter does
        return 130
    except BaseException as exc:
        exc.__traceback__ = _program_frames(exc.__traceback__)  # (the hook shows the exception's own)
        sys.excepthook(type(exc), exc, exc.__traceback__)
        return 1
    return 0


def _program_frames(tb: TracebackType | None) -> TracebackType | None:
    """The traceback from the program's first frame: without runpy's and ours, as
    ``python script.py`` shows it."""
    while tb is not None and tb.tb_next is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename != __file__ and not filename.startswith("<frozen runpy>") and "runpy" not in filename:
            break
        tb = tb.tb_next
    return tb


def exit_code_of(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1
