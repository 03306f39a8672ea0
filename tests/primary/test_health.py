"""--health-path and --shutdown-delay: the middleware, the primary's component, and a real server."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster_server._config import Config
from cluster_server._errors import ConfigError
from cluster_server.primary.loop import Primary
from cluster_server.primary.shutdown_delay import ShutdownDelay
from cluster_server.worker.health import HealthMiddleware, HealthState, health_handler
from tests.conftest import HELLO_APP, Server, wait_until
from tests.fakes import FakeLauncher

# -- the middleware, called as ASGI -------------------------------------------------


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"from the app"})


def _call(mw: HealthMiddleware, method: str, path: str, root_path: str = "") -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": root_path + path, "root_path": root_path}
    asyncio.run(mw(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_middleware_answers_the_health_path_before_the_app() -> None:
    state = HealthState()
    mw = HealthMiddleware(_app, "/healthz", state)
    assert _call(mw, "GET", "/healthz") == (503, b"starting\n")  # until the primary says ok
    health_handler(state)({"t": "health", "ok": True, "status": "ok"}, [])
    assert _call(mw, "GET", "/healthz") == (200, b"ok\n")
    assert _call(mw, "HEAD", "/healthz") == (200, b"")
    assert _call(mw, "GET", "/healthz", root_path="/api") == (200, b"ok\n")
    assert _call(mw, "GET", "/") == (200, b"from the app")
    assert _call(mw, "GET", "/healthz/x") == (200, b"from the app")
    assert _call(mw, "POST", "/healthz") == (200, b"from the app")
    health_handler(state)({"t": "health", "ok": False, "status": "shutting down"}, [])
    assert _call(mw, "GET", "/healthz") == (503, b"shutting down\n")
    assert _call(mw, "GET", "/") == (200, b"from the app")
    health_handler(state)({"t": "health", "ok": "no"}, [])  # malformed: ignored
    assert state.ok is False


def test_health_path_must_be_absolute() -> None:
    with pytest.raises(ConfigError, match="must start with '/'"):
        Config(app="m:app", health_path="healthz")


# -- the primary's component, with a fake launcher and a fake clock ----------------


Made = tuple[Primary, FakeLauncher, ShutdownDelay, list[float]]


@pytest.fixture
def make_primary() -> Iterator[Callable[..., Made]]:
    made: list[Made] = []

    def make(delay: float, health_path: str | None = "/healthz") -> Made:
        made.append(_primary(delay, health_path))
        return made[-1]

    yield make
    for primary, launcher, _, _ in made:
        for w in primary.workers.values():
            if w.channel is not None:
                w.channel.close()
        launcher.close()


def _primary(delay: float, health_path: str | None = "/healthz") -> Made:
    now = [1000.0]
    launcher = FakeLauncher(channels=True)
    config = Config(app="m:app", workers=2, shutdown_delay=delay, health_path=health_path)
    primary = Primary(config, [], launcher=launcher, clock=lambda: now[0])
    component = ShutdownDelay(config)
    primary.add_component(component)
    component.attach(primary)
    primary.manage_workers()
    return primary, launcher, component, now


OK = {"t": "health", "ok": True, "status": "ok"}
DOWN = {"t": "health", "ok": False, "status": "shutting down"}


def _all_ready(primary: Primary, launcher: FakeLauncher) -> None:
    """Make every booting worker ready; the component then says ok to all of them."""
    for w in list(primary.workers.values()):
        primary.worker_ready(w)
    primary.tick()
    for pid in primary.workers:
        assert launcher.received(pid) == [OK]


def test_health_says_ok_once_every_first_worker_is_ready(make_primary: Callable[..., Made]) -> None:
    primary, launcher, _, _ = make_primary(5)
    first, second = (primary.workers[pid] for pid in sorted(primary.workers))
    primary.worker_ready(first)
    primary.tick()
    assert launcher.received(first.pid) == []  # one of two ready: still "starting"
    primary.worker_ready(second)
    primary.tick()
    assert launcher.received(first.pid) == [OK]
    assert launcher.received(second.pid) == [OK]
    primary.tick()
    assert launcher.received(first.pid) == []  # said once

    # A replacement for a crashed worker is told at once: the cluster is serving.
    primary.child_exited(first.pid, signal.SIGKILL)
    primary.manage_workers()
    new_pid = max(primary.workers)
    assert launcher.received(new_pid) == [OK]


def test_sigterm_fails_health_at_once_then_drains_after_the_delay(make_primary: Callable[..., Made]) -> None:
    primary, launcher, component, now = make_primary(5)
    _all_ready(primary, launcher)
    pids = sorted(primary.workers)
    primary.handle_term()
    assert not primary.stopping
    for pid in pids:
        assert launcher.received(pid) == [DOWN]
    assert launcher.kills == []  # nobody drains during the delay
    assert primary.next_deadline() == pytest.approx(1005.0)

    # A worker spawned during the delay (a crash replaced, say) starts unhealthy.
    primary.child_exited(pids[0], signal.SIGKILL)  # wait status: killed by SIGKILL
    primary.manage_workers()
    new_pid = max(primary.workers)
    assert new_pid not in pids
    assert launcher.received(new_pid) == [DOWN]

    now[0] = 1004.9
    primary.tick()
    assert not primary.stopping and launcher.kills == []
    now[0] = 1005.0
    primary.tick()
    assert primary.stopping
    assert sorted(launcher.kills) == sorted((pid, signal.SIGTERM) for pid in primary.workers)
    assert component.next_deadline() is None


def test_second_sigterm_drains_at_once(make_primary: Callable[..., Made]) -> None:
    primary, launcher, _, _ = make_primary(30)
    _all_ready(primary, launcher)
    primary.handle_term()
    assert not primary.stopping
    primary.handle_term()
    assert primary.stopping
    assert len(launcher.kills) == 2


def test_without_delay_sigterm_drains_at_once_and_still_fails_health(make_primary: Callable[..., Made]) -> None:
    primary, launcher, _, _ = make_primary(0)
    _all_ready(primary, launcher)
    primary.handle_term()
    assert primary.stopping
    for pid in primary.workers:
        assert launcher.received(pid) == [DOWN]


def test_sigint_fails_health_before_draining(make_primary: Callable[..., Made]) -> None:
    primary, launcher, _, _ = make_primary(5)
    _all_ready(primary, launcher)
    primary.handle_int()  # no delay for Ctrl+C, but the workers still hear it first
    assert primary.stopping
    for pid in primary.workers:
        assert launcher.received(pid) == [DOWN]


def test_delay_without_health_path_sends_workers_nothing(make_primary: Callable[..., Made]) -> None:
    # Workers without --health-path have no handler for health messages.
    primary, launcher, _, now = make_primary(2, health_path=None)
    for w in list(primary.workers.values()):
        primary.worker_ready(w)
    primary.tick()
    primary.handle_term()
    assert not primary.stopping
    now[0] += 2
    primary.tick()
    assert primary.stopping
    for pid in primary.workers:
        assert launcher.received(pid) == []


# -- a real server --------------------------------------------------------------------

SLOW_APP = (
    HELLO_APP
    + """
import asyncio

_hello = app

async def app(scope, receive, send):
    if scope["type"] == "http" and scope["path"] == "/slow":
        await asyncio.sleep(1.5)
    await _hello(scope, receive, send)
"""
)


def test_health_path_is_off_by_default(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path]
) -> None:
    write_app("hello", HELLO_APP)
    server = start_server("hello:app").wait_ready()
    assert server.get("/healthz").text.isdigit()  # the app answered


def test_shutdown_delay_serves_on_with_503_health_then_drains(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path]
) -> None:
    write_app("slowapp", SLOW_APP)
    server = start_server("slowapp:app", "--workers", "2", "--health-path", "/healthz", "--shutdown-delay", "1")
    server.wait_ready()
    wait_until(lambda: server.get("/healthz").status_code == 200, 5, what="health path 200 once all are ready")
    assert server.get("/healthz").text == "ok\n"

    # Ordinary requests, a new connection each, in a bounded loop until told to stop.
    ok_at: list[float] = []
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(headers={"connection": "close"}, timeout=5) as client:
            for _ in range(5000):
                if stop.is_set():
                    return
                try:
                    resp = client.get(server.url + "/")
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if resp.status_code == 200:
                    ok_at.append(time.monotonic())
                else:
                    failures.append(f"status {resp.status_code}")

    slow_result: list[Any] = []

    def slow() -> None:
        try:
            slow_result.append(httpx.get(server.url + "/slow", timeout=10).status_code)
        except httpx.HTTPError as exc:
            slow_result.append(repr(exc))

    loader = threading.Thread(target=load)
    loader.start()
    wait_until(lambda: len(ok_at) >= 5, 5, what="the load loop to get going")

    sent_at = time.monotonic()
    server.signal(signal.SIGTERM)

    with httpx.Client(headers={"connection": "close"}, timeout=2) as probe:
        wait_until(
            lambda: probe.get(server.url + "/healthz").status_code == 503,
            0.5,
            interval=0.005,
            what="health path 503 within 0.5 s of SIGTERM",
        )
    unhealthy_at = time.monotonic()
    slow_thread = threading.Thread(target=slow)  # in flight when the drain starts
    slow_thread.start()
    # Keep the load going through the delay, and stop it before the drain begins.
    wait_until(lambda: time.monotonic() >= sent_at + 0.8, 2, what="0.8 s of the shutdown delay")
    during_delay = [t for t in ok_at if t > unhealthy_at]
    stop.set()
    loader.join(10)
    assert not loader.is_alive()
    assert server.proc.poll() is None, "the server stopped before the shutdown delay was over"

    assert server.wait_exit(15) == 0
    slow_thread.join(10)
    assert failures == []
    assert len(during_delay) >= 5, f"only {len(during_delay)} requests succeeded during the shutdown delay"
    assert max(ok_at) >= sent_at + 0.7, "requests stopped succeeding early in the shutdown delay"
    assert slow_result == [200], "the request in flight at the end of the delay was not drained"
    log = server.log()
    assert "serving on for 1 s (--shutdown-delay)" in log
    assert "after the 1 s shutdown delay" in log
    # The drain began no sooner than the delay allowed (the log line order says so).
    assert log.index("serving on for") < log.index("stopping (SIGTERM, after")


# The first worker to start is ready at once; the others wait in lifespan
# startup until the test creates the file "go" (bounded: 20 s).
STAGGERED_APP = """
import asyncio, os

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
        try:
            os.close(os.open("first", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            for _ in range(1000):
                if os.path.exists("go"):
                    break
                await asyncio.sleep(0.02)
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"app"})
"""


def test_health_path_says_starting_until_every_worker_is_ready(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path], tmp_path: Path
) -> None:
    write_app("staggered", STAGGERED_APP)
    server = start_server("staggered:app", "--workers", "2", "--health-path", "/healthz")
    server.wait_log("ready in")  # one worker serves, the other is still starting
    r = server.get("/healthz")
    assert (r.status_code, r.text) == (503, "starting\n")
    assert server.get("/").text == "app"  # the app itself is served meanwhile
    (tmp_path / "go").touch()
    server.wait_ready()
    wait_until(lambda: server.get("/healthz").status_code == 200, 5, what="health path 200 once all are ready")
