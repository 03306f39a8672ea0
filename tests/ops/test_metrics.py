"""``--metrics-bind``: Prometheus exposition served by the primary, read with prometheus-client's parser."""

from __future__ import annotations

import asyncio
import os
import re
import resource
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster_server import ConfigError
from cluster_server.ops import metrics as _metrics
from cluster_server.ops.request_totals import SlotTotals, parse
from cluster_server.ops.status import EXIT_REASONS, RESTART_REASONS
from cluster_server.primary.component import Component, Sample, override
from cluster_server.worker.request_metrics import BUCKETS

from ..conftest import HELLO_APP, Server, asgi_app, free_port, wait_until

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]

#: every family the server exposes (with --max-worker-memory and --scheduling least-busy), and its type
FAMILIES = {
    "cluster_server_info": "gauge",
    "cluster_server_workers_configured": "gauge",
    "cluster_server_generation": "gauge",
    "cluster_server_workers": "gauge",
    "cluster_server_worker_memory_limit_bytes": "gauge",
    "cluster_server_worker_exits": "counter",
    "cluster_server_worker_restarts": "counter",
    "cluster_server_rolling_restarts": "counter",
    "cluster_server_recycles": "counter",
    "cluster_server_rolling_restart_in_progress": "gauge",
    "cluster_server_worker_info": "gauge",
    "cluster_server_worker_requests": "counter",
    "cluster_server_worker_open_connections": "gauge",
    "cluster_server_worker_heartbeat_age_seconds": "gauge",
    "cluster_server_worker_rss_bytes": "gauge",
    "cluster_server_worker_uptime_seconds": "gauge",
    "cluster_server_http_requests": "counter",
    "cluster_server_http_time_to_first_byte_seconds": "histogram",
    "cluster_server_http_requests_in_flight": "gauge",
    "cluster_server_worker_http_requests": "counter",
    "cluster_server_worker_http_time_to_first_byte_seconds": "histogram",
    "cluster_server_worker_http_requests_in_flight": "gauge",
    "cluster_server_accept_backlog": "gauge",
    "cluster_server_handoff_unacknowledged": "gauge",
    "cluster_server_handoff_queueing": "gauge",
    "cluster_server_connections_accepted": "counter",
    "cluster_server_connections_rerouted": "counter",
    "process_virtual_memory_bytes": "gauge",
    "process_resident_memory_bytes": "gauge",
    "process_start_time_seconds": "gauge",
    "process_cpu_seconds": "counter",
    "process_open_fds": "gauge",
    "process_max_fds": "gauge",
}
UNITS = ("seconds", "bytes")


def get_metrics(port: int, accept: str | None = None) -> str:
    headers = {"Accept": accept} if accept else {}
    r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10, headers=headers)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return r.text


def samples(text: str) -> Samples:
    """{sample name: {sorted labels: value}}, parsed by prometheus_client's own parser."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def scrape(port: int) -> Samples:
    return samples(get_metrics(port))


def by(m: Samples, name: str, label: str) -> dict[str, float]:
    """One label's values -> sample value (summed over the other labels)."""
    out: Counter[str] = Counter()
    for labels, value in m.get(name, {}).items():
        out[dict(labels)[label]] += value
    return dict(out)


def check_conventions(text: str) -> None:
    """Prometheus' naming rules, on every family of a real exposition."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {name: f.type for name, f in families.items()} == FAMILIES
    for name, family in families.items():
        assert re.fullmatch(r"(cluster_server|process)_[a-z0-9_]+", name), name
        assert not name.endswith("_total"), f"{name}: the parser strips _total from a counter's family name"
        for unit in UNITS:  # a unit in the name comes last (before _total / _bucket...)
            assert unit not in name or name.endswith("_" + unit), name
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created")}
        for sample in family.samples:
            rest = sample.name[len(name) :]
            assert rest in ("", *suffixes.get(family.type, ())), (name, sample.name)
            if family.type == "counter":
                assert sample.name == name + "_total" or rest == "_created", sample.name
            # stable labels: a pid or a generation only in an info metric
            if not name.endswith("_info"):
                assert not {"pid", "generation"} & set(sample.labels), (sample.name, sample.labels)
            assert sample.value >= 0, sample


# -- the worker table, names and labels --------------------------------------------------


def test_metrics_follow_the_worker_table_with_stable_labels(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path]
) -> None:
    write_app("hello", HELLO_APP)
    mport = free_port()
    srv = start_server(
        "hello:app",
        "--workers",
        "2",
        "--scheduling",
        "least-busy",  # every family, the hand-off's included
        "--metrics-bind",
        f"127.0.0.1:{mport}",
        "--max-worker-memory",
        "512",
    ).wait_ready()
    text = get_metrics(mport)
    check_conventions(text)
    m = samples(text)
    assert m["cluster_server_workers"] == {
        (("state", "booting"),): 0,
        (("state", "ready"),): 2,
        (("state", "draining"),): 0,
        (("state", "backoff"),): 0,
    }
    assert m["cluster_server_workers_configured"][()] == 2
    assert m["cluster_server_worker_memory_limit_bytes"][()] == 512 * 1024 * 1024
    info = {dict(labels)["worker"]: dict(labels) for labels in m["cluster_server_worker_info"]}
    assert sorted(int(i["pid"]) for i in info.values()) == srv.worker_pids()
    assert {i["generation"] for i in info.values()} == {"1"}
    assert set(by(m, "cluster_server_worker_rss_bytes", "worker")) == {"1", "2"}
    assert all(v > 1_000_000 for v in m["cluster_server_worker_rss_bytes"].values())
    assert all(0 <= v < 3 for v in m["cluster_server_worker_heartbeat_age_seconds"].values())
    # the primary's own process metrics
    assert m["process_resident_memory_bytes"][()] > 1_000_000 and m["process_open_fds"][()] > 3
    assert set(by(m, "cluster_server_worker_exits_total", "reason")) == set(EXIT_REASONS)
    assert set(by(m, "cluster_server_worker_restarts_total", "reason")) == set(RESTART_REASONS)
    # OpenMetrics too, for a scraper that asks for it
    om = httpx.get(
        f"http://127.0.0.1:{mport}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        timeout=10,
    )
    assert om.headers["content-type"].startswith("application/openmetrics-text") and om.text.endswith("# EOF\n")


# -- request metrics -----------------------------------------------------------------------

STATUS_APP = asgi_app(
    "",
    """
    # /CODE answers CODE; /raise raises before answering (uvicorn answers 500)
    if scope["path"] == "/raise":
        raise RuntimeError("failing on purpose")
    status = int(scope["path"].strip("/"))
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"" if status in (204, 304) else b"ok"})
    """,
)
#: requests of the exactness test: (method, path, expected status class)
PLAN = [
    (method, path, cls)
    for method in ("GET", "POST", "PUT", "DELETE", "HEAD")
    for path, cls in (("/200", "2xx"), ("/201", "2xx"), ("/301", "3xx"), ("/404", "4xx"), ("/503", "5xx"))
]


def _drive(url: str, plan: list[tuple[str, str, str]], errors: list[str]) -> None:
    with httpx.Client(timeout=10) as client:
        for method, path, _ in plan:
            expected = 500 if path == "/raise" else int(path.strip("/"))
            try:
                r = client.request(method, url + path)
                if r.status_code != expected:
                    errors.append(f"{method} {path}: {r.status_code}")
            except httpx.HTTPError as exc:
                errors.append(f"{method} {path}: {exc!r}")


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_requests_read_back_exactly_from_one_scrape(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path], http: str
) -> None:
    """1,000 requests with known methods and statuses through 2 workers: one scrape, one
    second later, has exactly those counts (both of uvicorn's HTTP implementations)."""
    write_app("statuses", STATUS_APP)
    mport = free_port()
    srv = start_server(
        "statuses:app", "--workers", "2", "--metrics-bind", f"127.0.0.1:{mport}", "--no-access-log", "--http", http
    ).wait_ready()
    plan = [*(PLAN * 39), *[("GET", "/raise", "5xx")] * 25]  # 975 + 25 = 1,000 requests
    assert len(plan) == 1000
    errors: list[str] = []
    threads = [threading.Thread(target=_drive, args=(srv.url, plan[i::4], errors)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert errors == []
    time.sleep(1.0)  # the property under test: one scrape, one second after the burst, is exact
    m = scrape(mport)
    expected = Counter((method, cls) for method, _, cls in plan)
    got = {
        (dict(labels)["method"], dict(labels)["status_class"]): v
        for labels, v in m["cluster_server_http_requests_total"].items()
    }
    assert got == expected
    per_worker: Counter[tuple[str, str]] = Counter()
    for labels, v in m["cluster_server_worker_http_requests_total"].items():
        per_worker[(dict(labels)["method"], dict(labels)["status_class"])] += int(v)
    assert per_worker == expected
    workers = by(m, "cluster_server_worker_http_requests_total", "worker")
    assert set(workers) == {"1", "2"} and all(n > 0 for n in workers.values()), workers
    assert m["cluster_server_http_time_to_first_byte_seconds_count"][()] == 1000
    assert m["cluster_server_http_time_to_first_byte_seconds_bucket"][(("le", "+Inf"),)] == 1000
    assert len(m["cluster_server_http_time_to_first_byte_seconds_bucket"]) == len(BUCKETS) + 1
    assert 0 < m["cluster_server_http_time_to_first_byte_seconds_sum"][()] < 100
    assert sum(m["cluster_server_worker_http_time_to_first_byte_seconds_count"].values()) == 1000
    assert sum(m["cluster_server_worker_requests_total"].values()) == 1000  # uvicorn's count, fresh too
    assert m["cluster_server_http_requests_in_flight"][()] == 0


# -- exit reasons --------------------------------------------------------------------------


def _reasons(port: int) -> dict[str, float]:
    return by(scrape(port), "cluster_server_worker_exits_total", "reason")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_recycle_roll_crash_and_scale_down_each_show_their_reason(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path]
) -> None:
    write_app("hello", HELLO_APP)
    mport = free_port()
    srv = start_server(
        "hello:app", "--workers", "2", "--metrics-bind", f"127.0.0.1:{mport}", "--max-requests", "10", "--no-access-log"
    ).wait_ready()
    # Recycling: 30 requests, so at least one worker serves its 10.
    for _ in range(30):
        assert srv.get().status_code == 200
    wait_until(lambda: _reasons(mport)["max_requests"] >= 1, 20, what="a recycle by max_requests")
    wait_until(lambda: scrape(mport)["cluster_server_workers"][(("state", "ready"),)] == 2, 20, what="2 ready")

    # A SIGHUP roll: both workers exit "rolled"; counted as a roll, not as a recycle.
    srv.signal(signal.SIGHUP)
    wait_until(lambda: _reasons(mport)["rolled"] == 2, 30, what="2 workers rolled")
    m = scrape(mport)
    assert by(m, "cluster_server_rolling_restarts_total", "outcome") == {"completed": 1, "failed": 0, "aborted": 0}
    assert by(m, "cluster_server_recycles_total", "outcome")["completed"] >= 1
    assert m["cluster_server_generation"][()] == 2

    # A crash.
    info = {dict(labels)["worker"]: int(dict(labels)["pid"]) for labels in m["cluster_server_worker_info"]}
    os.kill(info["1"], signal.SIGKILL)
    wait_until(lambda: _reasons(mport)["crash"] == 1, 20, what="a crash")
    wait_until(lambda: scrape(mport)["cluster_server_workers"][(("state", "ready"),)] == 2, 20, what="replaced")

    # A scale-down: an exit, not a restart.
    srv.signal(signal.SIGTTOU)
    wait_until(lambda: _reasons(mport)["scaled_down"] == 1, 20, what="a scale-down")
    m = scrape(mport)
    exits = by(m, "cluster_server_worker_exits_total", "reason")
    restarts = by(m, "cluster_server_worker_restarts_total", "reason")
    assert exits["max_requests"] == restarts["max_requests"] >= 1
    assert exits["rolled"] == restarts["rolled"] == 2 and exits["crash"] == restarts["crash"] == 1
    assert exits["scaled_down"] == 1 and "scaled_down" not in restarts
    assert exits["hang"] == exits["stopped"] == exits["upgrade"] == exits["reloaded"] == 0
    assert m["cluster_server_workers_configured"][()] == 1
    # a slot's counter goes on across its workers (no reset at a replacement), and a
    # removed slot's stays: every request of every worker that drained is there
    assert sum(m["cluster_server_worker_requests_total"].values()) == 30


# -- the responder -------------------------------------------------------------------------


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
    # The silent one is cut at its deadline.
    silent.settimeout(_metrics.DEADLINE + 3)
    assert silent.recv(1) == b""
    for s in (silent, garbage, huge):
        s.close()
    assert srv.proc.poll() is None


async def _scrape_raw(port: int, results: list[str]) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await reader.read()  # the responder closes after its answer
        writer.close()
        results.append(data.split(b"\r\n", 1)[0].decode() if data else "empty reply")
    except OSError as exc:
        results.append(f"{type(exc).__name__}: {exc}")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_storm_of_scrapes_queues_and_is_never_reset(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path]
) -> None:
    """1,000 scrapes at once: every one is answered 200 (issue 13, finding 9)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if min(hard, 4096) < 1200:
        pytest.skip(f"1,000 client sockets need a higher fd limit than {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    write_app("hello", HELLO_APP)
    mport = free_port()
    srv = start_server("hello:app", "--metrics-bind", f"127.0.0.1:{mport}", "--no-access-log").wait_ready()
    results: list[str] = []

    async def storm() -> None:
        await asyncio.wait_for(asyncio.gather(*(_scrape_raw(mport, results) for _ in range(1000))), 90)

    try:
        asyncio.run(storm())
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert Counter(results) == {"HTTP/1.1 200 OK": 1000}
    assert srv.get().status_code == 200 and srv.proc.poll() is None


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
    assert _metrics.parse_bind("127.0.0.1:8001") == ("127.0.0.1", 8001)
    assert _metrics.parse_bind("[::1]:8001") == ("::1", 8001)
    assert _metrics.parse_bind(":8001") == ("0.0.0.0", 8001)
    for bad in ("8001", "host:", "host:99999", "host:x"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            _metrics.parse_bind(bad)


# -- without processes -----------------------------------------------------------------------


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


def _report(**counts: int) -> dict[str, Any]:
    n = sum(counts.values())
    return {"q": {k.replace("_", " "): v for k, v in counts.items()}, "h": [n] + [0] * len(BUCKETS), "s": 0.5, "i": 1}


def test_a_workers_report_is_checked_before_it_counts() -> None:
    good = parse(_report(GET_2=3, OTHER_5=1))
    assert good is not None and good.counts == {("GET", "2xx"): 3, ("OTHER", "5xx"): 1} and good.requests == 4
    bad: list[Any] = [
        None,
        [],
        {**_report(GET_2=1), "h": [1]},  # wrong number of buckets
        {**_report(GET_2=1), "q": {"BREW 2": 1}},  # a method outside the list: the worker says OTHER
        {**_report(GET_2=1), "q": {"GET 9": 1}},
        {**_report(GET_2=1), "q": {"GET 2": -1}},
        {**_report(GET_2=1), "q": {"GET 2": True}},
        {**_report(GET_2=1), "q": {f"GET {i}": 1 for i in range(100)}},
        {**_report(GET_2=1), "i": "many"},
        {**_report(GET_2=1), "s": float("inf")},
    ]
    assert [parse(r) for r in bad] == [None] * len(bad)


def test_a_slots_totals_go_on_across_its_workers() -> None:
    from cluster_server._config import Config
    from cluster_server.primary.loop import Primary, Worker

    p = Primary(Config(app="m:app", workers=1), [], clock=lambda: 0.0)
    totals = SlotTotals()
    old = Worker(id=1, generation=1, spawned_at=0, pid=100, requests=5, report=_report(GET_2=5))
    p.workers[100] = old
    assert totals.per_slot(p)[1].requests == 5 and totals.per_slot(p)[1].in_flight == 1
    del p.workers[100]
    totals.worker_exited(old)
    new = Worker(id=1, generation=2, spawned_at=0, pid=101, requests=2, report=_report(GET_2=1, POST_4=1))
    p.workers[101] = new
    slot = totals.per_slot(p)[1]
    assert slot.counts == {("GET", "2xx"): 6, ("POST", "4xx"): 1}
    assert slot.in_flight == 1  # an exited worker has none in flight
    assert totals.requests_per_slot(p) == {1: 7}


# -- PROMETHEUS_MULTIPROC_DIR ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_multiprocess_dir_is_wiped_at_start_and_dead_workers_are_marked(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    from ..conftest import ROOT, run_in_session

    mp = tmp_path / "mp"
    mp.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(mp), "PYTHONPATH": str(ROOT)}
    # A previous run's files: 1,000 orders that must not be summed in.
    leftover = "from examples.multiproc_app.app import ORDERS; ORDERS.labels(kind='standard').inc(1000)"
    code, _, err = run_in_session([sys.executable, "-c", leftover], ROOT, env)
    assert code == 0, err
    assert list(mp.glob("counter_*.db"))
    mport = free_port()
    srv = start_server(
        "examples.multiproc_app.app:app",
        "--workers",
        "2",
        "--metrics-bind",
        f"127.0.0.1:{mport}",
        "--no-access-log",
        env={"PROMETHEUS_MULTIPROC_DIR": str(mp)},
        cwd=ROOT,
    ).wait_ready()
    for i in range(10):
        assert httpx.post(f"{srv.url}/orders?kind={'express' if i % 2 else 'standard'}&items=3", timeout=10).is_success
    m = scrape(mport)
    assert by(m, "shop_orders_total", "kind") == {"standard": 5, "express": 5}
    assert m["shop_basket_items_count"][()] == 10
    # livesum: the live workers (each sets its gauge once its app is imported)
    wait_until(lambda: scrape(mport)["shop_workers"][()] == 2, 10, what="both workers' gauges")
    assert "cluster_server_workers" in m  # next to cluster-server's own
    # The app's own route, from inside a worker, says the same.
    assert "shop_orders_total" in httpx.get(f"{srv.url}/metrics", timeout=10).text

    victim = srv.worker_pids()[0]
    assert (mp / f"gauge_livesum_{victim}.db").exists()
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not (mp / f"gauge_livesum_{victim}.db").exists(), 10, what="mark_process_dead")
    wait_until(lambda: scrape(mport)["cluster_server_workers"][(("state", "ready"),)] == 2, 20, what="replaced")
    # not 3: the dead worker's gauge is gone (and the new one's is written once it imported the app)
    wait_until(lambda: scrape(mport)["shop_workers"][()] == 2, 10, what="the live workers' gauges")
    m = scrape(mport)
    assert by(m, "shop_orders_total", "kind") == {"standard": 5, "express": 5}  # counters stay


def test_an_unusable_multiprocess_dir_is_a_one_line_error(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path], tmp_path: Path
) -> None:
    write_app("hello", HELLO_APP)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    srv = start_server("hello:app", env={"PROMETHEUS_MULTIPROC_DIR": str(not_a_dir / "sub")})
    assert srv.wait_exit(20) == 2
    assert f"Error: PROMETHEUS_MULTIPROC_DIR={not_a_dir / 'sub'}: Not a directory" in srv.log()
