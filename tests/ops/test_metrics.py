"""``--metrics-bind``: Prometheus text exposition served by the primary."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster_server import ConfigError
from cluster_server.ops import metrics as _metrics
from cluster_server.primary.component import Component, Sample, override

from ..conftest import HELLO_APP, Server, free_port, wait_until
from ..ops_helpers import ctl, status


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}}, parsed by prometheus_client's own parser."""
    r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_follow_the_worker_table(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path], tmp_path: Path
) -> None:
    write_app("hello", HELLO_APP)
    mport = free_port()
    path = str(tmp_path / "ctl.sock")
    srv = start_server(
        "hello:app", "--workers", "2", "--metrics-bind", f"127.0.0.1:{mport}", "--control-socket", path
    ).wait_ready()
    m = scrape(mport)
    assert m["cluster_server_workers"] == {
        (("state", "booting"),): 0,
        (("state", "ready"),): 2,
        (("state", "draining"),): 0,
        (("state", "backoff"),): 0,
    }
    assert m["cluster_server_workers_configured"][()] == 2
    pids = {dict(labels)["pid"] for labels in m["cluster_server_worker_rss_bytes"]}
    assert pids == {str(p) for p in srv.worker_pids()}
    assert all(v > 1_000_000 for v in m["cluster_server_worker_rss_bytes"].values())
    assert all(0 <= v < 3 for v in m["cluster_server_worker_heartbeat_age_seconds"].values())

    for _ in range(7):
        assert srv.get().status_code == 200
    wait_until(lambda: sum(scrape(mport)["cluster_server_worker_requests_total"].values()) == 7, 5, what="7 requests")

    # A crash, then a rolling restart: counted by reason and outcome.
    os.kill(srv.worker_pids()[0], signal.SIGKILL)
    wait_until(lambda: scrape(mport)["cluster_server_workers"][(("state", "ready"),)] == 2, 10, what="replaced")
    ctl(path, "reload")
    wait_until(
        lambda: scrape(mport)["cluster_server_rolling_restarts_total"][(("outcome", "completed"),)] == 1,
        20,
        what="roll counted",
    )
    m = scrape(mport)
    restarts = {labels[0][1]: v for labels, v in m["cluster_server_worker_restarts_total"].items()}
    assert restarts["crash"] == 1
    wait_until(lambda: status(path)["exits"].get("rolled") == 2, 10, what="old workers drained")
    m = scrape(mport)
    restarts = {labels[0][1]: v for labels, v in m["cluster_server_worker_restarts_total"].items()}
    assert restarts["rolled"] == 2 and restarts["timeout"] == 0
    assert m["cluster_server_generation"][()] == 2
    assert m["cluster_server_rolling_restart_in_progress"][()] == 0


def test_the_responder_is_bounded_and_answers_only_metrics(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path]
) -> None:
    write_app("hello", HELLO_APP)
    mport = free_port()
    srv = start_server("hello:app", "--metrics-bind", f"127.0.0.1:{mport}", "--no-control-socket").wait_ready()
    base = f"http://127.0.0.1:{mport}"
    assert httpx.get(base + "/", timeout=5).status_code == 404
    assert httpx.post(base + "/metrics", timeout=5).status_code == 405
    head = httpx.head(base + "/metrics", timeout=5)
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 100
    om = httpx.get(base + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}, timeout=5)
    assert om.headers["content-type"].startswith("application/openmetrics-text") and om.text.endswith("# EOF\n")

    # A client that says nothing, one that sends garbage, one with a huge head:
    # none of them holds up a scrape or the app.
    silent = socket.create_connection(("127.0.0.1", mport))
    garbage = socket.create_connection(("127.0.0.1", mport))
    garbage.sendall(b"\x00\x01\x02 nonsense\r\n\r\n")
    assert garbage.recv(100).startswith(b"HTTP/1.1 400")
    huge = socket.create_connection(("127.0.0.1", mport))
    huge.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000)
    assert huge.recv(100).startswith(b"HTTP/1.1 431")
    assert scrape(mport)["cluster_server_workers"][(("state", "ready"),)] == 1
    assert srv.get().status_code == 200

    # Many scrapes at once, while the silent one waits out its deadline.
    errors: list[BaseException] = []

    def scrape_some() -> None:
        try:
            for _ in range(10):
                scrape(mport)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=scrape_some) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    # The silent one is cut at its deadline.
    silent.settimeout(_metrics.DEADLINE + 3)
    assert silent.recv(1) == b""
    for s in (silent, garbage, huge):
        s.close()
    assert srv.proc.poll() is None


def test_bad_bind_is_a_one_line_error(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path]
) -> None:
    write_app("hello", HELLO_APP)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = start_server("hello:app", "--metrics-bind", f"127.0.0.1:{port}")
        assert srv.wait_exit(20) == 3  # a socket that cannot be bound: 3, as uvicorn exits for its own
        assert f"Error: metrics port {port} on 127.0.0.1 is in use by another process" in srv.log()
    srv = start_server("hello:app", "--metrics-bind", "nonsense")
    assert srv.wait_exit(20) == 2
    assert "Error: --metrics-bind 'nonsense' must look like HOST:PORT" in srv.log()


def test_parse_bind() -> None:
    assert _metrics.parse_bind("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert _metrics.parse_bind("[::1]:9100") == ("::1", 9100)
    assert _metrics.parse_bind(":9100") == ("0.0.0.0", 9100)
    for bad in ("9100", "host:", "host:99999", "host:x"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            _metrics.parse_bind(bad)


class _Backlog(Component):
    """What the round-robin scheduler does to report its queue."""

    @override
    def metrics_samples(self) -> list[Sample]:
        return [("cluster_server_accept_backlog", "Connections accepted, not yet handed over", "gauge", {}, 7)]


def test_components_can_add_samples() -> None:
    from cluster_server._config import Config
    from cluster_server.ops.status import ClusterWatch
    from cluster_server.primary.loop import Primary

    p = Primary(Config(app="m:app", workers=1), [], clock=lambda: 0.0)
    watch = ClusterWatch()
    watch.attach(p)
    server = _metrics.MetricsServer("127.0.0.1:0", watch)
    try:
        server.primary = p
        p.components += [watch, _Backlog()]
        response = server.respond(b"GET /metrics HTTP/1.1\r\nHost: x")
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        assert families["cluster_server_accept_backlog"].samples[0].value == 7
        assert families["cluster_server_workers"].type == "gauge"
    finally:
        server.close()
