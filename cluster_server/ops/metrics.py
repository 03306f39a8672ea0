"""``--metrics-bind HOST:PORT``: Prometheus metrics, served by the primary itself.

The exposition is prometheus-client's (``generate_latest``/``choose_encoder``
over a custom collector that reads the worker table at scrape time), but not
its HTTP server: that one runs in a thread, and the primary is one thread. A
tiny non-blocking responder in the primary's selector loop answers
``GET /metrics`` (anything else: 404), one request per connection, with the
same bounds as the control socket (8 KiB request head, 5 s deadline, at most
16 clients), so a slow or hostile scraper cannot hold the primary up.

Other components can add samples: a component's ``metrics_samples()`` hook
(``primary/component.py``) returns ``(name, help, kind, labels, value)`` tuples
(``kind`` is ``"gauge"`` or ``"counter"``); it is asked on every scrape. The round-robin
scheduler reports ``cluster_server_accept_backlog`` that way.
"""

from __future__ import annotations

import collections
import logging
import selectors
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from cluster_server._errors import BindError, ConfigError
from cluster_server.ops.clients import Client, ClientServer
from cluster_server.ops.status import STATES
from cluster_server.primary.component import override
from cluster_server.primary.sockets import _bind_message, _family_of

if TYPE_CHECKING:
    from cluster_server.ops.status import ClusterWatch
    from cluster_server.primary.loop import Primary

logger = logging.getLogger("cluster_server")

MAX_REQUEST = 8 * 1024
DEADLINE = 5.0
MAX_CLIENTS = 16
#: exit reasons always exported (as 0 until one happens); others appear when they do
EXIT_REASONS = ("crash", "boot_failure", "timeout", "ready_timeout", "rolled", "scaled_down")


def parse_bind(value: str) -> tuple[str, int]:
    """``"127.0.0.1:9100"``, ``"[::1]:9100"``, ``":9100"`` (all interfaces) -> (host, port)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"--metrics-bind {value!r} must look like HOST:PORT (e.g. 127.0.0.1:9100)")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_text)


def bind(value: str) -> socket.socket:
    host, port = parse_bind(value)
    sock = socket.socket(_family_of(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(16)
    except OSError as exc:
        sock.close()
        message = _bind_message(exc, f"metrics port {port} on {host}", port)
        raise BindError(message.replace("--port", "--metrics-bind")) from None
    sock.setblocking(False)
    return sock


class _Collector:
    """Reads the worker table on every scrape."""

    def __init__(self, server: MetricsServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Any]:
        watch = self.server.watch
        p = self.server.primary
        assert p is not None
        snap = watch.snapshot()
        yield from _cluster_families(snap)
        yield from _history_families(watch, snap)
        yield from _worker_families(snap["rows"])
        yield from _extra_families(p)


def _cluster_families(snap: dict[str, Any]) -> Iterator[Any]:
    """The cluster as it is configured and runs now."""
    from prometheus_client.core import GaugeMetricFamily

    info = GaugeMetricFamily("cluster_server_info", "cluster-server's version and app", labels=["version", "app"])
    info.add_metric([snap["version"], snap["app"]], 1)
    yield info
    yield GaugeMetricFamily("cluster_server_workers_configured", "Worker slots (--workers, ctl scale)", snap["workers"])
    yield GaugeMetricFamily(
        "cluster_server_generation", "Current code generation (+1 per rolling restart)", snap["generation"]
    )
    by_state = GaugeMetricFamily(
        "cluster_server_workers", "Workers by state (backoff: an empty slot waiting to restart)", labels=["state"]
    )
    for state in STATES:
        by_state.add_metric([state], snap["states"][state])
    yield by_state


def _history_families(watch: ClusterWatch, snap: dict[str, Any]) -> Iterator[Any]:
    """What happened since the primary started: exits by reason, rolling restarts by outcome."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    restarts = CounterMetricFamily(
        "cluster_server_worker_restarts",
        "Workers that exited, by reason: crash, boot_failure, timeout (hung), ready_timeout, rolled...",
        labels=["reason"],
    )
    for reason in EXIT_REASONS:
        restarts.add_metric([reason], watch.exits.get(reason, 0))
    for reason, n in sorted(watch.exits.items()):
        if reason not in EXIT_REASONS:
            restarts.add_metric([reason], n)
    yield restarts

    rolls = CounterMetricFamily("cluster_server_rolling_restarts", "Rolling restarts, by outcome", labels=["outcome"])
    for outcome in ("completed", "failed", "aborted"):
        rolls.add_metric([outcome], watch.rolls.get(outcome, 0))
    yield rolls
    yield GaugeMetricFamily(
        "cluster_server_rolling_restart_in_progress",
        "1 while a rolling restart runs",
        int(snap["roll"] is not None),
    )


def _worker_families(rows: list[dict[str, Any]]) -> Iterator[Any]:
    """One sample per live worker in each family."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    labels = ["worker", "pid"]
    requests = CounterMetricFamily("cluster_server_worker_requests", "Requests a worker served", labels=labels)
    conns = GaugeMetricFamily("cluster_server_worker_open_connections", "Open connections of a worker", labels=labels)
    hb = GaugeMetricFamily(
        "cluster_server_worker_heartbeat_age_seconds", "Seconds since a worker's last heartbeat", labels=labels
    )
    rss = GaugeMetricFamily("cluster_server_worker_rss_bytes", "Resident memory of a worker", labels=labels)
    up = GaugeMetricFamily("cluster_server_worker_uptime_seconds", "Seconds since a worker was started", labels=labels)
    for row in rows:
        if row["pid"] is None:
            continue
        lv = [str(row["id"]), str(row["pid"])]
        requests.add_metric(lv, row["requests"])
        conns.add_metric(lv, row["connections"])
        up.add_metric(lv, row["uptime"])
        if row["heartbeat_age"] is not None:
            hb.add_metric(lv, row["heartbeat_age"])
        if row["rss"] is not None:
            rss.add_metric(lv, row["rss"])
    yield from (requests, conns, hb, rss, up)


def _extra_families(p: Primary) -> Iterator[Any]:
    """Samples other components offer (the round-robin scheduler's accept backlog...)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    extra: dict[str, Any] = {}
    for name, help_text, kind, sample_labels, value in p.metrics_samples():
        family = extra.get(name)
        if family is None:
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = extra[name] = cls(name, help_text, labels=sorted(sample_labels))
        family.add_metric([str(sample_labels[k]) for k in sorted(sample_labels)], value)
    yield from extra.values()


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
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

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
    def _welcome(self, conn: socket.socket) -> None:
        assert self.primary is not None
        if len(self.clients) >= MAX_CLIENTS:
            conn.close()  # a scraper that retries is answered soon enough
            return
        self._add(_Client(conn, self.primary.clock() + DEADLINE))

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
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept)
        try:
            body = encoder(self.registry)
        except Exception:
            logger.exception("metrics: collecting failed")
            return _response(500, "Internal Server Error", b"collecting metrics failed; see the server log\n")
        return _response(200, "OK", body, [("Content-Type", content_type)], head_only=method == "HEAD")

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
