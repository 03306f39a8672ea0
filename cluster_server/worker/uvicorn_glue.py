"""Everything that touches uvicorn's internals lives here, and only here.

Tested against uvicorn 0.54 (pinned in pyproject.toml). What we rely on:

- ``Server.startup(sockets=...)`` / ``Server.on_tick`` / ``Server.capture_signals``
  / ``Server.handle_exit`` (overridden below);
- ``Server.server_state`` (``total_requests``, ``connections``);
- ``config.http_protocol_class(config=, server_state=, app_state=)``, the
  factory uvicorn itself builds in ``startup``, to serve connections handed to
  the worker (``loop.connect_accepted_socket``); ``serve(sockets=[])`` still
  runs lifespan and the main loop;
- for ``watch_busy`` (``--scheduling least-busy``): protocols ``add`` and
  ``discard`` themselves in ``server_state.connections``; an HTTP protocol's
  ``timeout_keep_alive_task`` is set exactly while its connection is idle
  between requests (armed when a response completes with nothing pipelined,
  cleared when data arrives or the connection closes cleanly);
- for the drain: the HTTP protocols' ``cycle`` (``response_started``,
  ``response_complete``, ``keep_alive``, ``default_headers``, and
  ``on_response``, the callback it calls once its response is sent, which is
  the protocol's ``on_response_complete``), ``shutdown()``,
  ``handle_websocket_upgrade()``, ``server_state.default_headers``, the
  ``connections`` set each protocol holds, and the WebSocket protocols'
  ``handshake_complete`` / ``handshake_completed_event``.
- the protocols' ``cycle``, ``transport`` and ``server_state.default_headers``
  (``guard_request_head``).
- for ``count_requests``: the module-level name ``RequestResponseCycle`` in
  ``uvicorn.protocols.http.httptools_impl`` and ``h11_impl``, which the
  protocols look up for each request; its ``run_asgi(app)`` (called once per
  request, when the app's task is created), ``send(message)``,
  ``response_started`` and ``scope``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import socket
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable
from types import FrameType
from typing import Any

import uvicorn
from uvicorn._compat import asyncio_run

from cluster_server.worker.request_metrics import BUCKETS, METHODS, OTHER, RequestStats

logger = logging.getLogger("cluster_server.worker")

#: a connection that is idle when its worker starts draining (accepted but not
#: yet read, or a keep-alive connection between requests) gets this long to send
#: its next request, which is answered (with ``Connection: close``); uvicorn
#: alone closes such connections at once, losing a request already on its way
DRAIN_IDLE_WINDOW = 1.0
CLOSE_HEADER = (b"connection", b"close")
#: how long an idle connection closed by the drain may take to be gone before it is
#: aborted: a TLS close waits for the client's close_notify, which an idle client
#: (a pool's connection, a browser's) sends only when it next reads, and the
#: event loop's own limit (``ssl_shutdown_timeout``, 30 s) would hold the drain
DRAIN_CLOSE_WAIT = 1.0


class WorkerServer(uvicorn.Server):
    """uvicorn's server, plus the hooks a supervised worker needs.

    - ``on_ready`` runs on the event loop once lifespan startup finished and the
      sockets are served;
    - ``on_heartbeat`` runs on the event loop every ``heartbeat_interval``
      seconds (from the loop itself: a blocked loop sends none), and sooner,
      ``fresh_interval`` after the last one, when requests completed since
      (the request counts it carries stay fresh), and once more when the
      drain is over (the last counts);
    - SIGTERM drains; nothing is re-raised afterwards, so a cleanly drained
      worker exits 0 instead of looking killed by SIGTERM.

    Draining (``shutdown``), for connections from the shared listening socket
    and handed-over ones alike: the listeners close (other workers keep
    accepting from the kernel's queue); a request in flight finishes and its
    response carries ``Connection: close`` if it has not started yet (else the
    connection counts as idle once it is sent); an idle
    connection gets ``DRAIN_IDLE_WINDOW`` to send one more request, answered with
    ``Connection: close``, and is closed after it; WebSockets get close code
    1012; whatever still runs at uvicorn's ``timeout_graceful_shutdown`` is
    cancelled, and the primary SIGKILLs at ``--graceful-timeout``.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        on_ready: Callable[[], None],
        on_heartbeat: Callable[[WorkerServer], None],
        heartbeat_interval: float,
        fresh_interval: float | None = None,
        head_guard: HeadGuard | None = None,
    ) -> None:
        super().__init__(config)
        self._head_guard = head_guard
        self._on_ready = on_ready
        self._on_heartbeat = on_heartbeat
        self._heartbeat_interval = heartbeat_interval
        self._fresh_interval = heartbeat_interval if fresh_interval is None else fresh_interval
        self._last_beat = 0.0
        self._beat_requests = 0  # total_requests at the last heartbeat
        #: True once the graceful shutdown began; protocols read it
        self.draining = False
        self.drain_window = DRAIN_IDLE_WINDOW
        #: handlers for messages from the primary, by type ("t")
        self.handlers: dict[str, Callable[[dict[str, Any], list[int]], None]] = {}
        self._factory: Callable[[], asyncio.Protocol] | None = None
        #: least-busy: counts behind ``busy_connections`` (see ``watch_busy``)
        self.tracking_busy = False
        self.idle_connections = 0
        self.websockets: set[Any] = set()
        self._on_not_busy: Callable[[], None] = _nothing

    @property
    def total_requests(self) -> int:
        return self.server_state.total_requests

    @property
    def open_connections(self) -> int:
        return len(self.server_state.connections)

    @property
    def requests_in_flight(self) -> int:
        """HTTP requests received and not yet fully answered (one per connection at most)."""
        return sum(1 for c in self.server_state.connections if _busy(c))

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        config: Any = self.config
        # Wrap uvicorn's own class for this server (a config built before a fork
        # may carry another server's wrapper).
        base = getattr(config.http_protocol_class, "_cluster_server_base", config.http_protocol_class)
        cls = draining_protocol(base, self)
        if self.tracking_busy:
            cls = busy_tracking_protocol(cls, self)
        cls._cluster_server_base = base
        config.http_protocol_class = cls
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit:
            self._on_ready()
            self._beat()

    async def on_tick(self, counter: int) -> bool:
        self._beat()
        if self._head_guard is not None:
            self._head_guard.tick(self.server_state.connections)
        return await super().on_tick(counter)

    def _beat(self) -> None:
        now = time.monotonic()
        since = now - self._last_beat
        if since >= self._heartbeat_interval or (
            since >= self._fresh_interval and self.server_state.total_requests != self._beat_requests
        ):
            self._last_beat = now
            self._beat_requests = self.server_state.total_requests
            self._on_heartbeat(self)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.begin_drain()
        await super().shutdown(sockets=sockets)
        if self.started:
            self._on_heartbeat(self)  # the last counts, with every request done

    def begin_drain(self) -> None:
        """From now on every response says ``Connection: close`` (uvicorn's
        main loop, which refreshes the default headers, has ended)."""
        if self.draining:
            return
        self.draining = True
        state = self.server_state
        if CLOSE_HEADER not in state.default_headers:
            state.default_headers = [*state.default_headers, CLOSE_HEADER]
        self.drain_window = min(DRAIN_IDLE_WINDOW, (self.config.timeout_graceful_shutdown or DRAIN_IDLE_WINDOW) / 2)
        busy = sum(1 for c in state.connections if _busy(c))
        logger.info(
            "worker draining: %d connection(s), %d with a request in flight; idle ones get %.1f s for one more request",
            len(state.connections),
            busy,
            self.drain_window,
        )

    def drain(self, grace: float | None = None) -> None:
        """Begin a graceful shutdown (from the event loop or a signal handler)."""
        if grace is not None:
            current = self.config.timeout_graceful_shutdown
            self.config.timeout_graceful_shutdown = grace if current is None else min(current, grace)  # type: ignore[assignment]
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        previous = signal.signal(signal.SIGTERM, self.handle_exit)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A second SIGTERM keeps draining: the primary escalates with SIGKILL.
        self.should_exit = True

    def serve_accepted(self, sock: socket.socket) -> Awaitable[Any]:
        """Serve a connection accepted elsewhere (handed over by the primary), TLS if configured.

        Returns ``loop.connect_accepted_socket(...)``: its first step (run when
        awaited) takes the fd over; uvloop dups it there, so EMFILE shows up there.
        """
        if self._factory is None:
            self._factory = self.protocol_factory()
        loop = asyncio.get_running_loop()
        return loop.connect_accepted_socket(self._factory, sock, ssl=self.config.ssl)

    @property
    def busy_connections(self) -> int:
        """Open connections less the idle ones (``watch_busy`` only)."""
        # (never negative: uvicorn discards a closing connection before it clears its timer)
        return max(0, len(self.server_state.connections) - self.idle_connections - len(self.websockets))

    def watch_busy(self, callback: Callable[[], None]) -> None:
        """Keep ``busy_connections`` counted; call ``callback`` when one stops being busy.

        Busy: a request in progress, or none answered yet. A keep-alive
        connection between requests is not, nor is an upgraded WebSocket: they
        cost the worker nothing while idle, so they must not count against it.
        Counted incrementally where uvicorn already does keep-alive timer
        bookkeeping (idle is exactly "``timeout_keep_alive_task`` is set"): a
        property access instead of an attribute, about four calls per request.
        Call before serving.
        """
        self.tracking_busy = True
        self._on_not_busy = callback
        self.server_state.connections = _WatchedSet(self)

    def protocol_factory(self) -> Callable[[], asyncio.Protocol]:
        """The factory uvicorn's own ``startup`` builds, for handed-over connections."""
        config: Any = self.config

        def create_protocol() -> asyncio.Protocol:
            proto: asyncio.Protocol = config.http_protocol_class(
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
            )
            return proto

        return create_protocol


def _nothing() -> None:
    pass


class _WatchedSet(set[Any]):
    """uvicorn's ``server_state.connections``, reporting closes (``watch_busy``)."""

    __slots__ = ("_server",)

    def __init__(self, server: WorkerServer) -> None:
        super().__init__()
        self._server = server

    def discard(self, item: Any) -> None:
        if item in self:
            super().discard(item)
            self._server.websockets.discard(item)
            self._server._on_not_busy()

    def remove(self, item: Any) -> None:
        super().remove(item)
        self._server.websockets.discard(item)
        self._server._on_not_busy()


def _busy(protocol: Any) -> bool:
    """Is a request in flight on this HTTP connection (received, response not finished)?"""
    cycle = getattr(protocol, "cycle", None)
    return cycle is not None and not cycle.response_complete


def busy_tracking_protocol(base: Any, server: WorkerServer) -> Any:
    """``base`` counting its idle connections in ``server.idle_connections``, and the
    WebSockets it upgrades to in ``server.websockets`` (see ``WorkerServer.watch_busy``).

    uvicorn arms ``timeout_keep_alive_task`` when a response completes with
    nothing pipelined and clears it when data arrives; making it a property
    counts the transitions with no method of uvicorn's overridden on the request path.
    """

    class BusyTrackingProtocol(base):  # type: ignore[misc]
        _cs_keep_alive: asyncio.TimerHandle | None = None

        @property
        def timeout_keep_alive_task(self) -> asyncio.TimerHandle | None:
            return self._cs_keep_alive

        @timeout_keep_alive_task.setter
        def timeout_keep_alive_task(self, task: asyncio.TimerHandle | None) -> None:
            if task is None:
                if self._cs_keep_alive is not None:
                    server.idle_connections -= 1
            elif self._cs_keep_alive is None:
                server.idle_connections += 1
                server._on_not_busy()
            self._cs_keep_alive = task

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            if self._cs_keep_alive is not None:  # lost with an error: uvicorn leaves the timer
                self._cs_keep_alive.cancel()
                self.timeout_keep_alive_task = None

        def handle_websocket_upgrade(self, *args: Any) -> None:
            super().handle_websocket_upgrade(*args)
            ws = self.transport.get_protocol()
            if ws is not self and ws in self.connections:
                server.websockets.add(ws)

    BusyTrackingProtocol.__name__ = BusyTrackingProtocol.__qualname__ = f"BusyTracking{base.__name__}"
    return BusyTrackingProtocol


def draining_protocol(base: Any, server: WorkerServer) -> Any:
    """``base`` (uvicorn's HTTP protocol class) with a drain that loses no request.

    uvicorn's ``shutdown()`` closes a connection with no request in flight at
    once; that loses the request a client sent just before (a keep-alive client
    between two requests, or a connection accepted but not yet read). Here such
    a connection gets ``server.drain_window`` to send it; it is answered with
    ``Connection: close``, and the connection is closed when the window ends
    with nothing in flight. A response whose head went out before the drain makes
    its connection idle once complete (a close right after it would cross the
    client's next request)."""

    class DrainingProtocol(base):  # type: ignore[misc]
        _drain_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            if server.draining:  # accepted (or handed over) after the drain began
                self.shutdown()

        def shutdown(self) -> None:
            cycle = getattr(self, "cycle", None)
            if cycle is None or cycle.response_complete:
                self._open_drain_window()
            elif not cycle.response_started:
                if CLOSE_HEADER not in cycle.default_headers:
                    cycle.default_headers = [*cycle.default_headers, CLOSE_HEADER]
                super().shutdown()  # keep_alive = False: closed once the response is sent
            else:  # too late to say Connection: close: idle once it is sent
                # (set on this cycle alone, so that no request pays for a method override)
                cycle.on_response = self._response_complete_then_drain

        def _response_complete_then_drain(self) -> None:
            super().on_response_complete()
            self._open_drain_window()

        def _open_drain_window(self) -> None:  # one more request, within server.drain_window
            if self._drain_timer is None and not self.transport.is_closing():
                self._drain_timer = asyncio.get_running_loop().call_later(server.drain_window, self._drain_window_over)

        def _drain_window_over(self) -> None:
            if self.transport.is_closing():
                return
            cycle = getattr(self, "cycle", None)
            if cycle is None or cycle.response_complete:  # (else its response closes the connection)
                super().shutdown()  # nothing came: close it
                asyncio.get_running_loop().call_later(DRAIN_CLOSE_WAIT, _abort_if_still_open, self)

        # (no connection_lost override, one call less per connection: a drain timer left
        # behind finds the transport closing and does nothing)

        def handle_websocket_upgrade(self, *args: Any) -> None:
            super().handle_websocket_upgrade(*args)
            if server.draining:  # a WebSocket opened during the drain is closed with 1012 once open
                _shutdown_when_open(self.transport.get_protocol())

    DrainingProtocol.__name__ = DrainingProtocol.__qualname__ = f"Draining{base.__name__}"
    return DrainingProtocol


def _abort_if_still_open(protocol: Any) -> None:
    """A connection the drain closed while idle, still there ``DRAIN_CLOSE_WAIT`` later:
    nothing of a response can be cut, only the TLS goodbye the client never sent."""
    if protocol in protocol.connections and protocol.transport.get_write_buffer_size() == 0:
        protocol.transport.abort()


def _shutdown_when_open(ws: Any, interval: float = 0.02) -> None:
    """Call ``ws.shutdown()`` (close code 1012) once its handshake completed."""
    if ws.transport.is_closing():
        return
    event = getattr(ws, "handshake_completed_event", None)
    done = event.is_set() if event is not None else getattr(ws, "handshake_complete", True)
    if done:
        ws.shutdown()
    else:
        asyncio.get_running_loop().call_later(interval, _shutdown_when_open, ws, interval)


def count_requests(stats: RequestStats) -> None:
    """Count every HTTP request uvicorn answers in this process into ``stats``.

    Swaps the request class of uvicorn's HTTP protocols (both, whichever is
    configured) for a subclass that notes when the app starts (``run_asgi``)
    and, when the response starts (the first ``send``), adds the request to
    ``stats`` with its method, status and time to first byte. No coroutine is
    added: both overrides are plain functions that hand back uvicorn's own
    coroutine, and nothing the garbage collector tracks is allocated (the start
    time is a slot). A response uvicorn sends itself through the same object
    (500 for an app that failed, 503 over --limit-concurrency) is counted too.
    Call once, before serving.
    """
    import importlib

    for name in ("uvicorn.protocols.http.h11_impl", "uvicorn.protocols.http.httptools_impl"):
        try:
            module = importlib.import_module(name)
        except ImportError:  # httptools not installed
            continue
        base = getattr(module, "RequestResponseCycle", None)
        if base is not None and not getattr(base, "_cs_counting", False):
            setattr(module, "RequestResponseCycle", _counting_cycle(base, stats))  # noqa: B010


def _counting_cycle(base: Any, stats: RequestStats) -> Any:
    run_asgi, send = base.run_asgi, base.send
    clock = time.perf_counter
    by_method, buckets, bounds = stats.by_method, stats.buckets, BUCKETS

    class CountingCycle(base):  # type: ignore[misc]
        __slots__ = ("_cs_start",)
        _cs_counting = True

        def run_asgi(self, app: Any) -> Any:
            self._cs_start = clock()
            return run_asgi(self, app)

        def send(self, message: Any) -> Any:
            if not self.response_started:  # (inlined: this runs for every request)
                seconds = clock() - self._cs_start
                method = self.scope["method"]
                counts = by_method.get(method)
                if counts is None:
                    counts = by_method.setdefault(method if method in METHODS else OTHER, {})
                status = message.get("status", 500)
                counts[status] = counts.get(status, 0) + 1
                buckets[bisect_left(bounds, seconds)] += 1
                stats.seconds += seconds
            return send(self, message)

    CountingCycle.__name__ = CountingCycle.__qualname__ = f"Counting{base.__name__}"
    return CountingCycle


def run_on_fresh_loop(main: Coroutine[Any, Any, None], uconfig: uvicorn.Config) -> None:
    """Run ``main`` on a new event loop of the configured kind (uvloop or asyncio)."""
    asyncio_run(main, loop_factory=uconfig.get_loop_factory())


def wrap_loaded_app(uconfig: uvicorn.Config, wrap: Callable[[Any], Any]) -> None:
    """Put an ASGI middleware around the app uvicorn loaded (after ``Config.load()``),
    outside uvicorn's own wrappers (WSGI adapter, proxy headers...)."""
    uconfig.loaded_app = wrap(uconfig.loaded_app)


#: uvicorn's main loop calls ``Server.on_tick`` every 0.1 s (later when the loop is busy)
TICK = 0.1


class HeadGuard:
    """The clock and the sweep of ``guard_request_head``: no work per request.

    A timer armed for every new connection and cancelled when its head arrived
    cost about 2% of the CPU of a short request (a timer object, and a
    ``getpid()`` in ``get_running_loop``). Instead ``WorkerServer.on_tick``
    sweeps the open connections a few times per timeout, and a connection is
    waiting for a head when uvicorn's own state says so: no request yet
    (``cycle`` is None), or the last response complete and its keep-alive timer
    cleared (bytes of the next request arrived; uvicorn clears the timer on
    every read and starts a new ``cycle`` once the head is complete). The
    timeout runs from the first sweep that saw it waiting: a head is never cut
    off early (a tick is at least 0.1 s), and at most two sweeps late (half
    the timeout, at most two seconds), or later while the loop is blocked.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        #: uvicorn's ticks so far
        self.now = 0
        #: ticks a head may take once seen waiting (0: no limit)
        self.allowed = math.ceil(timeout / TICK) if timeout > 0 else 0
        #: sweep every this many ticks: a quarter of the timeout, at most once a second
        self.every = max(1, min(10, int(timeout / TICK / 4)))
        #: the guarded protocol class (set by ``guard_request_head``)
        self.protocol: Any = ()  # (isinstance of an empty tuple: nothing yet)

    def tick(self, connections: Iterable[Any]) -> None:
        """One of uvicorn's ticks: every ``every`` ticks, cut off the heads that took too long."""
        self.now += 1
        if not self.allowed or self.now % self.every:
            return
        for protocol in list(connections):
            if not isinstance(protocol, self.protocol):
                continue  # a WebSocket
            cycle = protocol.cycle
            if cycle is not None and not (cycle.response_complete and protocol.timeout_keep_alive_task is None):
                continue  # a request in progress, or idle between requests (uvicorn's keep-alive timeout)
            if protocol._cs_seen is not cycle:
                protocol._cs_seen, protocol._cs_seen_at = cycle, self.now
            elif self.now - protocol._cs_seen_at >= self.allowed:
                protocol._cs_expired()


def guard_request_head(uconfig: uvicorn.Config, timeout: float, max_size: int) -> HeadGuard:
    """Bound the time and the bytes a client may take to send a request head.

    uvicorn waits forever for a request head: a client that opens a connection
    and sends nothing, or sends headers a byte a second (slowloris), holds a
    connection slot for good; and httptools keeps every header byte it is sent,
    with no limit. After ``uconfig.load()``, this swaps ``http_protocol_class``
    (h11 or httptools) for a subclass that bounds each request head:

    - a connection waits for a head from when it opens, and again from the
      first bytes of a new request on a keep-alive connection (between
      requests, uvicorn's own ``--timeout-keep-alive`` applies); the head is
      complete when uvicorn starts a new request cycle (or hands the
      connection to its websocket protocol);
    - after ``timeout`` seconds waiting (0: never), it closes the connection,
      answering ``408`` first if the client had sent anything; the returned
      ``HeadGuard`` keeps that time and must be ticked by the server
      (``WorkerServer(head_guard=...)``);
    - past ``max_size`` bytes of a head not yet complete, it answers ``431``
      and closes.

    A read that completes a head (nearly all of them) costs two attribute reads
    more than uvicorn's own ``data_received``. Both uvicorn protocol classes keep
    the request in progress in ``self.cycle`` (None before the first), clear
    ``timeout_keep_alive_task`` on every read and arm it when a response
    completes with nothing pipelined, and remove themselves from
    ``server_state.connections`` when the connection is lost; those,
    ``transport`` and ``server_state.default_headers`` are the internals this
    relies on.
    """
    base: Any = uconfig.http_protocol_class
    guard = HeadGuard(timeout)
    name = f"RequestHeadGuard[{base.__name__}]"
    attrs = {"_cs_guard": guard, "_cs_max_size": max_size, "__qualname__": name}
    guard.protocol = uconfig.http_protocol_class = type(name, (_RequestHeadGuard, base), attrs)
    return guard


#: no cycle seen yet (None is a cycle value: no request yet)
_UNSEEN: Any = object()


class _RequestHeadGuard(asyncio.Protocol):
    """What ``guard_request_head`` mixes into uvicorn's HTTP protocol class (see there)."""

    _cs_guard: HeadGuard
    _cs_max_size = 0
    _cs_seen: Any = _UNSEEN  # the cycle a sweep last saw this connection wait after
    _cs_seen_at = 0
    _cs_counted: Any = _UNSEEN  # the cycle the head bytes below were counted after
    _cs_head_bytes = 0
    # uvicorn's protocol internals this relies on
    cycle: Any
    transport: Any
    server_state: Any
    timeout_keep_alive_task: Any

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        super().data_received(data)
        if before is self.cycle and (before is None or before.response_complete):
            self._cs_partial(len(data))  # no new request: a head still incomplete (rare)

    def _cs_partial(self, n: int) -> None:
        transport = self.transport
        if transport.is_closing() or transport.get_protocol() is not self:
            return  # uvicorn answered, closed or upgraded
        if self._cs_counted is not self.cycle:
            self._cs_counted, self._cs_head_bytes = self.cycle, 0  # a new head
        self._cs_head_bytes += n
        if self._cs_head_bytes > self._cs_max_size:
            logger.warning("%s: request head over %d bytes; answered 431", _peer(self), self._cs_max_size)
            self._cs_answer(431, "Request Header Fields Too Large", "Request head too large.")

    def _cs_expired(self) -> None:
        transport = self.transport
        if transport.is_closing() or transport.get_protocol() is not self:
            return
        if self._cs_counted is self.cycle and self._cs_head_bytes:
            logger.info("%s: no complete request head within %g s; answered 408", _peer(self), self._cs_guard.timeout)
            self._cs_answer(408, "Request Timeout", "Request head not received in time.")
        else:
            transport.close()  # opened and never used (a browser's preconnect, say)

    def _cs_answer(self, status: int, reason: str, body: str) -> None:
        head = [f"HTTP/1.1 {status} {reason}\r\n".encode("ascii")]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(
            f"content-type: text/plain; charset=utf-8\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n{body}".encode("ascii")
        )
        self.transport.write(b"".join(head))
        self.transport.close()


def _peer(protocol: Any) -> str:
    client = getattr(protocol, "client", None)
    return f"{client[0]}:{client[1]}" if client else "a client"
