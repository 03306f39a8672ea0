"""Node.js's ``cluster`` module, in Python.

::

    from cluster_server import cluster

    if cluster.is_primary:
        for _ in range(4):
            cluster.fork()
        cluster.on("exit", lambda worker, code, sig: print(f"worker {worker.pid} died"))
        cluster.run()                      # the event loop Node runs implicitly
    else:
        cluster.HTTPServer(("127.0.0.1", 8000), Handler).serve_forever()

The same program runs in the primary and in every worker: ``fork()`` starts a
worker that runs the program's main again (``fork`` start method: a forked copy
of this process re-runs it; ``spawn``: a fresh interpreter, as Node does), and
``is_primary``/``is_worker`` tell the two apart.

**Primary**: events are dispatched by asyncio. ``cluster.run(main=None)`` runs
the loop until every worker exited (or SIGINT/SIGTERM); inside your own asyncio
program, any primary call made while the loop runs attaches it, and ``await
cluster.wait()`` waits for the workers. Nothing is lost before the loop runs:
events are queued, messages wait in the channels.

**Worker**: a background thread (``cluster-channel``) reads the channel, so a
worker may block (``serve_forever()``) and still get its messages. Sync
callbacks run on that thread; ``async def`` callbacks and ``await recv()`` get
their messages on their own event loop.

**Messages** are JSON: ``dict`` (``str`` keys), ``list``, ``str``, ``int``,
``float``, ``bool``, ``None``. A tuple arrives as a list and non-``str`` dict
keys as strings (``{1: "a"}`` -> ``{"1": "a"}``); ``bytes``, sets and other
objects raise ``TypeError`` in the sender, unless the workers were forked with
``setup_primary(serialization="advanced")`` (``wire/advanced.py``: bytes, sets,
tuples, dates, ``Decimal``, shared and circular values). One encoded message is
at most 256 MiB (past 64 KiB it travels in a memfd, in its place); a socket can
go with one (``send(data, handle=sock)``). Nothing is ever unpickled.

**Listening**: ``cluster.listen(address)`` (and ``cluster.HTTPServer``,
``cluster.start_server``...) asks the primary, which binds once. Under
``SCHED_RR`` (the default, as Node's on Linux) the primary accepts and hands
each connection to the next worker listening there; under ``SCHED_NONE``
every worker accepts on the shared socket. The same server code runs under both.

In an HTTP worker of cluster-server (your ASGI app), ``is_worker`` is True and
``send``, ``broadcast``, ``on_message``, ``recv``, ``messages``, ``request``
work the same; the primary relays broadcasts and answers a few built-in
requests (see ``docs/cluster-api.md``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.server
import os
import socket
import socketserver
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from cluster_server._errors import (
    BindError,
    ChannelError,
    ClusterRoleError,
    DisconnectedError,
    RequestError,
)
from cluster_server.cluster import role as _role
from cluster_server.cluster.primary import START_METHOD_ENV, START_METHODS, ClusterPrimary, Settings, Worker
from cluster_server.cluster.role import CurrentWorker
from cluster_server.cluster.rr import (
    POLICY_ENV,
    SCHED_NONE,
    SCHED_RR,
    RoundRobinServer,
    RoundRobinSocket,
    default_policy,
    policy_from_env,
)
from cluster_server.cluster.worker import CHANNEL_FD_ENV, WORKER_ID_ENV, Endpoint

__all__ = [
    "CHANNEL_FD_ENV",
    "POLICY_ENV",
    "SCHED_NONE",
    "SCHED_RR",
    "START_METHODS",
    "START_METHOD_ENV",
    "WORKER_ID_ENV",
    "BindError",
    "ChannelError",
    "ClusterRoleError",
    "CurrentWorker",
    "DisconnectedError",
    "HTTPServer",
    "RequestError",
    "RoundRobinServer",
    "RoundRobinSocket",
    "ServerMixin",
    "Settings",
    "ThreadingHTTPServer",
    "Worker",
    "broadcast",
    "create_server",
    "disconnect",
    "disconnected",
    "fork",
    "get_message",
    "is_primary",
    "is_worker",
    "listen",
    "messages",
    "off",
    "on",
    "on_message",
    "on_request",
    "once",
    "recv",
    "request",
    "request_sync",
    "run",
    "scheduling_policy",
    "send",
    "settings",
    "setup_primary",
    "start_server",
    "start_unix_server",
    "wait",
    "wait_disconnect",
    "worker",
    "workers",
]


def _policy_at_import() -> int:
    try:
        return policy_from_env()
    except ValueError as exc:  # raised by the first fork(), not by an import
        global _policy_error
        _policy_error = str(exc)
        return default_policy()


_policy_error: str | None = None
#: Node's ``cluster.schedulingPolicy``: ``SCHED_RR`` (the primary accepts and hands each
#: connection to the next worker listening there; the default, as Node's on Linux) or
#: ``SCHED_NONE`` (every worker accepts on the socket the primary bound). Set it, or
#: ``CLUSTER_SERVER_SCHED_POLICY=rr|none``, before the first ``fork()``/``setup_primary()``.
scheduling_policy: int = _policy_at_import()

#: the role, copied from cluster/role.py by ``_read_role`` (the runtimes change it there)
is_primary: bool = True
is_worker: bool = False
#: this worker, in a worker; None in the primary
worker: CurrentWorker | None = None
#: the primary's workers by id (a worker stays until it has both disconnected and exited)
workers: dict[int, Worker] = {}
#: how fork() starts workers (``setup_primary`` changes it)
settings: Settings
_endpoint: Endpoint | None = None
_primary: ClusterPrimary


def _read_role() -> None:
    """Copy the role from cluster/role.py into this module; it calls this on every change."""
    global is_primary, is_worker, worker, workers, settings, _endpoint, _primary
    is_primary, is_worker = _role.name == "primary", _role.name == "worker"
    worker, _endpoint = _role.worker, _role.endpoint
    if _role.primary is not None:
        _primary = _role.primary
        settings = _primary.settings
        # a worker keeps its copy of the primary's state (forked) but has no workers of its own
        workers = {} if is_worker else _primary.workers


if _role.primary is None:
    _role.adopt_primary(ClusterPrimary())
_role.on_change(_read_role)


def _need_primary(what: str) -> ClusterPrimary:
    if _endpoint is not None:
        raise ClusterRoleError(f"cluster.{what} is for the primary; this process is worker {_endpoint.id}")
    return _primary


def _freeze_policy(primary: ClusterPrimary) -> None:
    """The first fork() or setup_primary() fixes the scheduling policy (as Node's)."""
    if primary.policy is None and _policy_error is not None and scheduling_policy == default_policy():
        raise ValueError(_policy_error)
    primary.freeze_policy(scheduling_policy)


def _need_worker(what: str, instead: str = "") -> Endpoint:
    if _endpoint is None:
        hint = f"; in the primary use {instead}" if instead else ""
        raise ClusterRoleError(f"cluster.{what} is for workers{hint}")
    return _endpoint


# -- the primary ---------------------------------------------------------------------------


def setup_primary(
    *,
    exec: str | None = None,
    args: Sequence[str] | None = None,
    exec_argv: Sequence[str] | None = None,
    start_method: str | None = None,
    cwd: str | None = None,
    silent: bool | None = None,
    stdio: Sequence[Any] | None = None,
    uid: int | None = None,
    gid: int | None = None,
    serialization: str | None = None,
) -> None:
    """Change how later ``fork()`` calls start workers (Node's ``cluster.setupPrimary``);
    what is not given stays as it was, and the ``setup`` event gets the new settings.

    ``exec``: the worker's script (default: this program's own main, its script or
    its ``-m`` module); ``args``: its ``sys.argv[1:]`` (default: this program's);
    ``exec_argv``: interpreter options of a spawned worker (default: this
    interpreter's); ``start_method``: ``"fork"`` (default, or the
    ``CLUSTER_SERVER_START_METHOD`` environment variable) or ``"spawn"``.
    ``cwd``, ``silent``, ``stdio``, ``uid``, ``gid``: the worker's process
    (``cluster/child.py``); ``serialization``: ``"json"`` (default) or
    ``"advanced"`` (``wire/advanced.py``: bytes, sets, tuples, dates, Decimal...).
    """
    global settings
    primary = _need_primary("setup_primary()")
    _freeze_policy(primary)
    given: dict[str, Any] = {
        "exec": exec,
        "args": None if args is None else tuple(args),
        "exec_argv": None if exec_argv is None else tuple(exec_argv),
        "start_method": start_method,
        "cwd": None if cwd is None else os.path.abspath(cwd),
        "silent": silent,
        "stdio": None if stdio is None else tuple(stdio),
        "uid": uid,
        "gid": gid,
        "serialization": serialization,
    }
    primary.setup(dataclasses.replace(primary.settings, **{k: v for k, v in given.items() if v is not None}))
    settings = primary.settings


def fork(env: dict[str, str] | None = None) -> Worker:
    """Start a worker running this program (or ``settings.exec``); ``env`` is added to its environment."""
    primary = _need_primary("fork()")
    _freeze_policy(primary)
    return primary.fork(env)


def on(event: str, fn: Callable[..., Any] | None = None) -> Any:
    """Listen to a cluster event in the primary; without ``fn``, a decorator.

    ``fork(worker)``, ``online(worker)``, ``listening(worker, address)``,
    ``message(worker, data)``, ``disconnect(worker)``, ``exit(worker, code, signal)``,
    ``setup(settings)``. An ``async def`` listener runs as a task.
    """
    return _need_primary("on()").on(event, fn)


def once(event: str, fn: Callable[..., Any] | None = None) -> Any:
    return _need_primary("once()").once(event, fn)


def off(event: str, fn: Callable[..., Any]) -> None:
    _need_primary("off()").off(event, fn)


def run(main: Callable[[], Awaitable[Any]] | Awaitable[Any] | None = None, *, grace: float = 10.0) -> Any:
    """Run the primary's event loop: ``main`` first (an async function), then until every
    worker has exited. SIGINT or SIGTERM stops it: every worker is disconnected, and
    SIGKILLed if still there after ``grace`` s. Returns what ``main`` returned."""
    primary = _need_primary("run()")
    return asyncio.run(primary.serve(main, grace))


async def wait() -> None:
    """In the primary's own asyncio code: wait until every worker has exited."""
    await _need_primary("wait()").wait()


def disconnect(callback: Callable[[], Any] | None = None) -> None:
    """Primary: ask every worker to disconnect; ``callback()`` once all have (Node's
    ``cluster.disconnect([callback])``; at once, on the next tick, when none is connected).
    Worker: disconnect this worker (then ``callback()``)."""
    if _endpoint is not None:
        _endpoint.disconnect()
        if callback is not None:
            callback()
        return
    _primary.disconnect_all(callback)


def on_request(fn: Callable[..., Any] | None) -> Callable[..., Any] | None:
    """Answer requests: in the primary ``fn(worker, data)``, in a worker ``fn(data)``.

    The return value (or, for ``async def``, its result) is the answer; an
    exception is sent back as a ``RequestError``. One handler; None removes it.
    """
    if _endpoint is not None:
        _endpoint.on_request(fn)
    else:
        _primary.on_request(fn)
    return fn


# -- both ------------------------------------------------------------------------------------


def broadcast(data: Any, *, include_self: bool = False) -> int | None:
    """Primary: send ``data`` to every connected worker, return how many.

    Worker: have the primary send it to every other worker (and to this one if
    ``include_self``); returns None.
    """
    if _endpoint is not None:
        _endpoint.broadcast(data, include_self)
        return None
    return _primary.broadcast(data)


def listen(
    address: tuple[str, int] | str, *, backlog: int = 511, type: int = socket.SOCK_STREAM
) -> socket.socket | RoundRobinSocket:
    """Listen at ``address`` (``(host, port)`` or a Unix socket path) through the primary.

    In a worker, the primary binds it the first time any worker asks (port 0 is
    random the first time, the same for every worker after), and the policy
    says what you get: under ``SCHED_RR`` a :class:`RoundRobinSocket` that the
    primary's connections come through, under ``SCHED_NONE`` the shared
    listening socket itself. Both have ``accept()``, ``fileno()``,
    ``getsockname()``, ``settimeout()`` and ``close()``, so a server that
    accepts from either runs under both. ``type=socket.SOCK_DGRAM``: a UDP (or
    Unix datagram) socket, always shared, as Node shares a worker's dgram
    socket. In the primary, a duplicate of the same cached socket (yours to close).
    """
    if _endpoint is not None:
        return _endpoint.listen(address, backlog, type)
    addr = address if isinstance(address, str) else list(address)
    return _primary.handle_for(addr, backlog, dgram=type == socket.SOCK_DGRAM).dup()


async def create_server(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    host: str | None = None,
    port: int | None = None,
    *,
    path: str | None = None,
    backlog: int = 511,
    start_serving: bool = True,
    **kwds: Any,
) -> asyncio.AbstractServer:
    """``loop.create_server`` through the primary, under either policy (``path``: a Unix socket).

    In a worker: an ``asyncio.Server`` on the shared socket (``SCHED_NONE``), or a
    :class:`RoundRobinServer` (``SCHED_RR``) with the same interface; either closes
    when the worker disconnects. In the primary: ``loop.create_server``, bound as usual.
    ``kwds`` go to the loop (``ssl``, ``ssl_handshake_timeout``...).
    """
    loop = asyncio.get_running_loop()
    address: tuple[str, int] | str = path if path is not None else (host or "0.0.0.0", port or 0)
    if _endpoint is None:
        if path is not None:
            return await loop.create_unix_server(protocol_factory, path, backlog=backlog, **kwds)
        return await loop.create_server(protocol_factory, host, port, backlog=backlog, **kwds)
    endpoint = _endpoint
    sock = await asyncio.to_thread(endpoint.listen, address, backlog)
    if isinstance(sock, RoundRobinSocket):
        server: asyncio.AbstractServer = RoundRobinServer(loop, sock, protocol_factory, **kwds)
        if start_serving:
            await server.start_serving()
        return server
    if path is not None:
        server = await loop.create_unix_server(protocol_factory, sock=sock, start_serving=start_serving, **kwds)
    else:
        server = await loop.create_server(protocol_factory, sock=sock, start_serving=start_serving, **kwds)
    endpoint.add_closer(lambda: _close_threadsafe(loop, server))
    return server


def _close_threadsafe(loop: asyncio.AbstractEventLoop, server: asyncio.AbstractServer) -> None:
    try:
        loop.call_soon_threadsafe(server.close)
    except RuntimeError:  # that loop is closed: nothing serves any more
        pass


async def start_server(
    client_connected_cb: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
    host: str | None = None,
    port: int | None = None,
    *,
    limit: int = 2**16,
    **kwds: Any,
) -> asyncio.AbstractServer:
    """``asyncio.start_server`` through the primary: the same code serves under both policies.

    ``server = await cluster.start_server(handle, "127.0.0.1", 8000)``; then
    ``await server.serve_forever()`` or ``async with server:``, as with asyncio.
    """
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.StreamReaderProtocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)

    return await create_server(factory, host, port, **kwds)


async def start_unix_server(
    client_connected_cb: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
    path: str,
    *,
    limit: int = 2**16,
    **kwds: Any,
) -> asyncio.AbstractServer:
    """``asyncio.start_unix_server`` through the primary (see :func:`start_server`)."""
    return await start_server(client_connected_cb, path=path, limit=limit, **kwds)


# -- a worker ----------------------------------------------------------------------------------


def send(data: Any, handle: socket.socket | None = None, *, keep_open: bool = False) -> None:
    """Send ``data`` to the primary (Node's ``process.send``). Raises DisconnectedError when cut off.

    ``handle``: a socket sent along (Node's ``sendHandle``): the primary's ``message``
    listeners that take a third argument get it. A connection is closed here once
    sent, unless ``keep_open``; listening and datagram sockets stay open.
    """
    _need_worker("send()", "worker.send(data) or cluster.broadcast(data)").send(data, handle, keep_open)


def on_message(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Call ``fn(data)`` for each message from the primary (usable as a decorator);
    ``fn(data, handle)`` also gets the socket that came with a message (Node's
    ``process.on('message', (m, handle) => ...)``).

    A sync ``fn`` runs on the channel thread (in an HTTP worker: on its event loop);
    an ``async def`` one on the loop it was registered from. While any is
    registered, messages go to them and not to ``recv()``.
    """
    _need_worker("on_message()", "cluster.on('message', fn)").on_message(fn)
    return fn


async def recv(timeout: float | None = None, *, with_handle: bool = False) -> Any:
    """The next message from the primary (queued if it came while nobody waited).

    ``with_handle``: ``(data, handle)``, the handle None when none came; without
    it, a handle that came with the message is closed.
    """
    return await _need_worker("recv()").recv(timeout, with_handle)


def messages(*, with_handle: bool = False) -> AsyncIterator[Any]:
    """``async for data in cluster.messages()``: every message, until disconnected."""
    return _need_worker("messages()").messages(with_handle)


def get_message(timeout: float | None = None, *, with_handle: bool = False) -> Any:
    """Blocking ``recv()``, for sync code; TimeoutError after ``timeout`` s."""
    return _need_worker("get_message()").get_message(timeout, with_handle)


async def request(data: Any, *, timeout: float | None = 5.0) -> Any:
    """Ask the primary; return the answer of its ``on_request`` handler.

    Raises TimeoutError, RequestError (the handler raised, or there is none) or
    DisconnectedError. In the primary, use ``await worker.request(data)``.
    """
    return await _need_worker("request()", "await worker.request(data)").request(data, timeout)


def request_sync(data: Any, *, timeout: float | None = 5.0) -> Any:
    """Blocking ``request()``, for sync code (not from a message callback)."""
    return _need_worker("request_sync()").request_sync(data, timeout)


def wait_disconnect(timeout: float | None = None) -> bool:
    """Block until this worker is disconnected; False on timeout."""
    return _need_worker("wait_disconnect()").wait_disconnect(timeout)


async def disconnected() -> None:
    """Wait until this worker is disconnected (then close your servers and return)."""
    await _need_worker("disconnected()").disconnected()


# -- servers that listen through the primary ----------------------------------------------------


class ServerMixin:
    """For ``socketserver`` servers: in a worker, take the listening socket from the
    primary instead of binding, and shut down gracefully when the worker disconnects
    (``serve_forever()`` returns once the request in progress is done)."""

    socket: socket.socket
    server_address: Any

    def server_bind(self) -> None:
        if _endpoint is None:
            super().server_bind()  # type: ignore[misc]
            return
        self.socket.close()
        # under SCHED_RR a RoundRobinSocket: socketserver only needs accept(), fileno(), close()
        self.socket = _endpoint.listen(self.server_address, getattr(self, "request_queue_size", 511))  # type: ignore[assignment]
        self.server_address = self.socket.getsockname()
        if isinstance(self.server_address, tuple):
            # http.server.HTTPServer.server_bind would look the host up (getfqdn): not needed
            host, port = self.server_address[:2]
            self.server_name, self.server_port = host, port
        _endpoint.add_closer(self._cluster_disconnect)

    def server_activate(self) -> None:
        if _endpoint is None:
            super().server_activate()  # type: ignore[misc]

    def _cluster_disconnect(self) -> None:
        shutdown = getattr(self, "shutdown", None)
        if shutdown is not None:
            # shutdown() waits for serve_forever() to return; never on the channel thread.
            threading.Thread(target=shutdown, name="cluster-shutdown", daemon=True).start()


class HTTPServer(ServerMixin, http.server.HTTPServer):
    """``http.server.HTTPServer`` listening through the primary in a worker."""


class ThreadingHTTPServer(ServerMixin, http.server.ThreadingHTTPServer):
    """``http.server.ThreadingHTTPServer`` listening through the primary in a worker."""


class TCPServer(ServerMixin, socketserver.TCPServer):
    """``socketserver.TCPServer`` listening through the primary in a worker."""
