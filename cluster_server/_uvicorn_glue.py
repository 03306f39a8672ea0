"""Everything that touches uvicorn's internals lives here, and only here.

Tested against uvicorn 0.54 (pinned in pyproject.toml). What we rely on:

- ``Server.startup(sockets=...)`` / ``Server.on_tick`` / ``Server.capture_signals``
  / ``Server.handle_exit`` (overridden below);
- ``Server.server_state`` (``total_requests``, ``connections``);
- ``config.http_protocol_class(config=, server_state=, app_state=)``, the
  factory uvicorn itself builds in ``startup``, to serve connections handed to
  the worker (``loop.connect_accepted_socket``).
"""

from __future__ import annotations

import asyncio
import contextlib
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


def wrap_loaded_app(uconfig: uvicorn.Config, wrap: Callable[[Any], Any]) -> None:
    """Put an ASGI middleware around the app uvicorn loaded (after ``Config.load()``),
    outside uvicorn's own wrappers (WSGI adapter, proxy headers...)."""
    uconfig.loaded_app = wrap(uconfig.loaded_app)
