"""``--metrics-bind HOST:PORT``: Prometheus metrics, served by the primary itself.

The exposition is prometheus-client's (``generate_latest``/``choose_encoder``
over a collector that reads the primary's state at scrape time, see
``ops/metric_families.py``; plus prometheus-client's process collector for the
primary's own ``process_*`` metrics, and, with ``PROMETHEUS_MULTIPROC_DIR``,
the app's metrics summed over every worker), but not its HTTP server: that
one runs in a thread, and the primary is one thread. A tiny non-blocking
responder in the primary's selector loop answers ``GET /metrics`` (anything
else: 404), one request per connection, with bounds (8 KiB request head, 5 s
deadline, at most 16 clients at once), so a slow or hostile scraper cannot hold
the primary up.

Other components can add samples: a component's ``metrics_samples()`` hook
(``primary/component.py``) returns ``(name, help, kind, labels, value)`` tuples
(``kind`` is ``"gauge"`` or ``"counter"``); it is asked on every scrape. The round-robin
scheduler reports ``cluster_server_accept_backlog`` that way.

A storm of scrapes queues, it is never reset: with 16 clients being served the
primary stops accepting, and the others wait in the kernel's listen queue
(``BACKLOG``) until one is done. A body built less than ``CACHE_FOR`` seconds
ago is sent again rather than built anew, so a storm costs the primary little.

Request metrics come from the workers' heartbeats (``worker/request_metrics.py``);
this component keeps the totals of exited workers (``ops/request_totals.py``).
"""

from __future__ import annotations

import collections
import logging
import os
import selectors
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from cluster_server._errors import BindError, ConfigError
from cluster_server.ops import multiproc as _multiproc
from cluster_server.ops.clients import Client, ClientServer
from cluster_server.ops.metric_families import Collector
from cluster_server.ops.request_totals import SlotTotals
from cluster_server.primary.component import WorkerEvent, override
from cluster_server.primary.sockets import _bind_message, _family_of

if TYPE_CHECKING:
    from cluster_server.ops.status import ClusterWatch
    from cluster_server.primary.loop import Primary, Worker

logger = logging.getLogger("cluster_server")

MAX_REQUEST = 8 * 1024
DEADLINE = 5.0
MAX_CLIENTS = 16
#: scrapers waiting in the kernel while MAX_CLIENTS are served (the kernel caps it at net.core.somaxconn)
BACKLOG = 4096
#: a body this fresh is sent again to the next scraper asking for the same format
CACHE_FOR = 0.1


def parse_bind(value: str) -> tuple[str, int]:
    """``"127.0.0.1:8001"``, ``"[::1]:8001"``, ``":8001"`` (all interfaces) -> (host, port)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"--metrics-bind {value!r} must look like HOST:PORT (e.g. 127.0.0.1:8001)")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_text)


def bind(value: str) -> socket.socket:
    host, port = parse_bind(value)
    sock = socket.socket(_family_of(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        message = _bind_message(exc, f"metrics port {port} on {host}", port)
        raise BindError(message.replace("--port", "--metrics-bind")) from None
    sock.setblocking(False)
    return sock


class _Collector:
    """Registered once; reads the primary's state at every scrape (``ops/metric_families.py``)."""

    def __init__(self, server: MetricsServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Any]:
        p = self.server.primary
        assert p is not None
        yield from Collector(p, self.server.watch, self.server.totals, logger).collect()


class _Client(Client):
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__(sock, deadline)
        self.outbuf = b""


class MetricsServer(ClientServer[_Client]):
    """The metrics endpoint, as a primary component."""

    max_clients = MAX_CLIENTS
    what = "metrics"

    def __init__(
        self, bind_to: str, watch: ClusterWatch, *, sock: socket.socket | None = None, defer: bool = False
    ) -> None:
        self.bind_to = bind_to
        self.watch = watch
        #: bound before the primary starts (a BindError stops start-up), or inherited in an upgrade
        self.sock: socket.socket | None = sock if sock is not None else bind(bind_to)
        self.defer = defer
        self.active = False
        self.primary: Primary | None = None
        self.clients: dict[int, _Client] = {}
        #: request totals of the workers that exited, per slot
        self.totals = SlotTotals()
        #: True while MAX_CLIENTS are served and the listening socket is not watched
        self._full = False
        #: content type -> (when it was built, the response)
        self._cache: dict[str, tuple[float, bytes]] = {}
        self.registry = _registry(self)

    @property
    def address(self) -> tuple[str, int]:
        name = self.sock.getsockname() if self.sock is not None else ("", 0)
        return str(name[0]), int(name[1])

    @override
    def attach(self, primary: Primary) -> None:
        self.primary = primary
        if not self.defer:
            self.activate()

    def activate(self) -> None:
        if self.active or self.sock is None or self.primary is None:
            return
        self.active = True
        self.primary.add_reader(self.sock, self._accept)
        host, port = self.address
        logger.info("metrics: http://%s:%d/metrics", f"[{host}]" if ":" in host else host, port)

    @override
    def stop_listening(self) -> None:
        """Stop accepting (an upgrade's successor has the socket now)."""
        if self.sock is not None:
            if self.primary is not None and self.active:
                self.primary.remove_reader(self.sock)
            self.sock.close()
            self.sock = None
        self.active = False

    @override
    def worker_event(self, event: WorkerEvent, w: Worker) -> None:
        if event == "exited":
            self.totals.worker_exited(w)

    @override
    def _accept(self, mask: int) -> None:
        assert self.sock is not None and self.primary is not None
        for conn in self._accepted(self.sock, MAX_CLIENTS - len(self.clients), "metrics"):
            self._welcome(conn)
        if len(self.clients) >= MAX_CLIENTS:
            # The others wait in the kernel's listen queue until a client is done. (Also when
            # already full: the end of an accept pause may have watched the socket again.)
            self._full = True
            self.primary.remove_reader(self.sock)

    @override
    def _welcome(self, conn: socket.socket) -> None:
        assert self.primary is not None
        self._add(_Client(conn, self.primary.clock() + DEADLINE))

    @override
    def _drop(self, fd: int) -> None:
        super()._drop(fd)
        if self._full and len(self.clients) < MAX_CLIENTS:
            self._full = False
            if self.sock is not None and self.active and self._paused is None and self.primary is not None:
                self.primary.add_reader(self.sock, self._accept)

    @override
    def _serve(self, fd: int, c: _Client, mask: int) -> None:
        if c.outbuf:
            self._write(fd, c)
            return
        try:
            data = c.sock.recv(MAX_REQUEST + 1 - len(c.inbuf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(fd)
            return
        if not data:
            self._drop(fd)
            return
        c.inbuf += data
        end = c.inbuf.find(b"\r\n\r\n")
        if end < 0:
            end = c.inbuf.find(b"\n\n")
        if end < 0:
            if len(c.inbuf) >= MAX_REQUEST:
                c.outbuf = _response(431, "Request Header Fields Too Large", b"request head too large\n")
                self._write(fd, c)
            return
        c.outbuf = self.respond(bytes(c.inbuf[:end]))
        self._write(fd, c)

    def respond(self, head: bytes) -> bytes:
        lines = head.decode("latin-1").split("\n")
        parts = lines[0].strip().split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _response(400, "Bad Request", b"bad request\n")
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return _response(405, "Method Not Allowed", b"GET /metrics\n", [("Allow", "GET, HEAD")])
        if target.split("?", 1)[0] != "/metrics":
            return _response(404, "Not Found", b"metrics are at /metrics\n")
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        return self._exposition(accept, head_only=method == "HEAD")

    def _exposition(self, accept: str, head_only: bool) -> bytes:
        """The metrics in the format the scraper accepts; built at most every CACHE_FOR seconds."""
        from prometheus_client.exposition import choose_encoder

        assert self.primary is not None
        encoder, content_type = choose_encoder(accept)
        now = self.primary.clock()
        cached = self._cache.get(content_type)
        if cached is not None and now - cached[0] < CACHE_FOR:
            body = cached[1]
        else:
            try:
                body = encoder(self.registry)
            except Exception:
                logger.exception("metrics: collecting failed")
                return _response(500, "Internal Server Error", b"collecting metrics failed; see the server log\n")
            self._cache[content_type] = (now, body)
        return _response(200, "OK", body, [("Content-Type", content_type)], head_only=head_only)

    def _write(self, fd: int, c: _Client) -> None:
        try:
            n = c.sock.send(c.outbuf)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._drop(fd)
            return
        c.outbuf = c.outbuf[n:]
        assert self.primary is not None
        if c.outbuf:
            self.primary.modify_reader(c.sock, selectors.EVENT_WRITE)
            return
        self._linger(fd, c)


def _registry(server: MetricsServer) -> Any:
    """The primary's metrics, its process_* metrics, and the app's multiprocess metrics if any."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(server))
    ProcessCollector(registry=registry)
    path = _multiproc.directory()
    if path is not None and os.path.isdir(path):
        from prometheus_client.multiprocess import MultiProcessCollector

        MultiProcessCollector(registry, path)  # type: ignore[no-untyped-call]
    return registry


def _response(
    status: int, reason: str, body: bytes, headers: list[tuple[str, str]] | None = None, head_only: bool = False
) -> bytes:
    hdrs = collections.OrderedDict([("Content-Type", "text/plain; charset=utf-8")])
    for k, v in headers or []:
        hdrs[k] = v
    hdrs["Content-Length"] = str(len(body))
    hdrs["Connection"] = "close"
    head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
    return head.encode("latin-1") + (b"" if head_only else body)
