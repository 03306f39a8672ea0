"""Everything that touches uvicorn's internals lives here, and only here.

Tested against uvicorn 0.54 (pinned in pyproject.toml). What we rely on:

- ``Server.startup(sockets=...)`` / ``Server.on_tick`` / ``Server.capture_signals``
  / ``Server.handle_exit`` (overridden below);
- ``Server.server_state`` (``total_requests``, ``connections``);
- ``config.http_protocol_class(config=, server_state=, app_state=)``, the
  factory uvicorn itself builds in ``startup``, to serve connections handed to
  the worker (``loop.connect_accepted_socket``);
- the protocols' ``cycle``, ``transport`` and ``server_state.default_headers``
  (``guard_request_head``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Callable, Coroutine, Generator
from types import FrameType
from typing import Any

import uvicorn
from uvicorn._compat import asyncio_run


class WorkerServer(uvicorn.Server):
    """uvicorn's server, plus the hooks a supervised worker needs.

    - ``on_ready`` runs on the event loop once lifespan startup finished and the
      sockets are served;
    - ``on_heartbeat`` runs on the event loop every ``heartbeat_interval``
      seconds (from the loop itself: a blocked loop sends none);
    - SIGTERM drains; nothing is re-raised afterwards, so a cleanly drained
      worker exits 0 instead of looking killed by SIGTERM.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        on_ready: Callable[[], None],
        on_heartbeat: Callable[[WorkerServer], None],
        heartbeat_interval: float,
    ) -> None:
        super().__init__(config)
        self._on_ready = on_ready
        self._on_heartbeat = on_heartbeat
        self._heartbeat_interval = heartbeat_interval
        self._last_beat = 0.0
        #: handlers for messages from the primary, by type ("t")
        self.handlers: dict[str, Callable[[dict[str, Any], list[int]], None]] = {}

    @property
    def total_requests(self) -> int:
        return self.server_state.total_requests

    @property
    def open_connections(self) -> int:
        return len(self.server_state.connections)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit:
            self._on_ready()
            self._beat()

    async def on_tick(self, counter: int) -> bool:
        self._beat()
        return await super().on_tick(counter)

    def _beat(self) -> None:
        now = time.monotonic()
        if now - self._last_beat >= self._heartbeat_interval:
            self._last_beat = now
            self._on_heartbeat(self)

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


def run_on_fresh_loop(main: Coroutine[Any, Any, None], uconfig: uvicorn.Config) -> None:
    """Run ``main`` on a new event loop of the configured kind (uvloop or asyncio)."""
    asyncio_run(main, loop_factory=uconfig.get_loop_factory())


def guard_request_head(uconfig: uvicorn.Config, timeout: float, max_size: int) -> None:
    """Bound the time and the bytes a client may take to send a request head.

    uvicorn waits forever for a request head: a client that opens a connection
    and sends nothing, or sends headers a byte a second (slowloris), holds a
    connection slot for good; and httptools keeps every header byte it is sent,
    with no limit. After ``uconfig.load()``, this swaps ``http_protocol_class``
    (h11 or httptools) for a subclass that watches each request head:

    - it starts watching when the connection opens, and again when the first
      bytes of a new request arrive on a keep-alive connection (between
      requests, uvicorn's own ``--timeout-keep-alive`` applies); a timer is
      armed only for a head that did not arrive whole in one read, so the common
      keep-alive request costs no timer;
    - the head is complete when uvicorn starts a new request cycle (or hands the
      connection to its websocket protocol): it stops watching;
    - after ``timeout`` seconds still watching (0: never), it closes the
      connection, answering ``408`` first if the client had sent anything;
    - past ``max_size`` bytes still watching, it answers ``431`` and closes.

    Both uvicorn protocol classes keep the request in progress in ``self.cycle``
    (None before the first); that attribute, ``transport`` and
    ``server_state.default_headers`` are the internals this relies on.
    """
    base: Any = uconfig.http_protocol_class
    log = logging.getLogger("cluster_server.worker")

    class RequestHeadGuard(base):  # type: ignore[misc]
        _cs_watching = False
        _cs_head_bytes = 0
        _cs_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._cs_watching = True
            self._cs_arm()  # a connection that never sends anything is closed too

        def data_received(self, data: bytes) -> None:
            if not self._cs_watching and (self.cycle is None or self.cycle.response_complete):
                # The next request on a keep-alive connection begins. No timer yet: most
                # heads arrive whole in one read, and then none is needed.
                self._cs_watching = True
                self._cs_head_bytes = 0
            before = self.cycle
            super().data_received(data)
            if not self._cs_watching:
                return
            transport = self.transport
            if self.cycle is not before or transport.is_closing() or transport.get_protocol() is not self:
                self._cs_stop()  # the head is complete (or uvicorn answered/closed/upgraded)
                return
            self._cs_head_bytes += len(data)
            if self._cs_head_bytes > max_size:
                self._cs_stop()
                log.warning("%s: request head over %d bytes; answered 431", _peer(self), max_size)
                self._cs_answer(431, "Request Header Fields Too Large", "Request head too large.")
            elif self._cs_timer is None:
                self._cs_arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cs_stop()
            super().connection_lost(exc)

        def _cs_arm(self) -> None:
            if timeout > 0:
                self._cs_timer = asyncio.get_running_loop().call_later(timeout, self._cs_expired)

        def _cs_stop(self) -> None:
            self._cs_watching = False
            if self._cs_timer is not None:
                self._cs_timer.cancel()
                self._cs_timer = None

        def _cs_expired(self) -> None:
            self._cs_timer = None
            self._cs_watching = False
            transport = self.transport
            if transport.is_closing() or transport.get_protocol() is not self:
                return
            if self._cs_head_bytes:
                log.info("%s: no complete request head within %g s; answered 408", _peer(self), timeout)
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

    RequestHeadGuard.__name__ = RequestHeadGuard.__qualname__ = f"RequestHeadGuard[{base.__name__}]"
    uconfig.http_protocol_class = RequestHeadGuard


def _peer(protocol: Any) -> str:
    client = getattr(protocol, "client", None)
    return f"{client[0]}:{client[1]}" if client else "a client"
