"""The primary never dies of what a worker, a client or the kernel does.

Each test here reproduces a way the primary used to die or wedge (issue 13's
findings 1-3): a channel closed while it was being read, a burst of connections
at a low fd limit, and JSON nested deeper than the decoder goes.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster_server._errors import ChannelError
from cluster_server.wire.channel import Channel, decode, pair
from cluster_server.wire.spawn import fork_child

from ..conftest import HELLO_APP, asgi_app, children, wait_until
from ..scheduling.test_scheduling import ready
from ..scheduling.test_scheduling import setup as handoff_setup

# -- a channel closed while it is read (finding 1) ----------------------------------


def test_receive_ends_when_the_reader_closes_the_channel_meanwhile() -> None:
    """A failed send to a worker closes its channel while the primary is still in the
    loop reading that same channel: the next read must end the loop, not raise EBADF."""
    a, b = pair()
    ours, theirs = Channel(a), Channel(b)
    try:
        for i in range(3):
            theirs.send({"t": "n", "i": i})
        got = []
        for msg, _ in ours.receive():
            got.append(msg)
            ours.close()  # what _forget_channel does after a failed hand-off
        assert got == [{"t": "n", "i": 0}]
        assert list(ours.receive()) == []  # and a later read event of the same wake-up
    finally:
        ours.close()
        theirs.close()


def test_a_failed_socket_read_is_the_end_of_the_channel() -> None:
    a, b = pair()
    ours = Channel(a)
    b.close()
    os.close(a.fileno())  # the fd itself is gone (EBADF), not just the peer
    a.detach()
    with pytest.raises(EOFError):
        list(ours.receive())


# -- nested JSON (finding 3) -----------------------------------------------------


def test_a_fork_that_fails_leaves_nothing_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of processes or memory: ``fork_child`` raises, with both ends of the channel closed."""

    def no_fork() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    before = sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(BlockingIOError):
        fork_child(lambda sock, close: os._exit(0))
    assert sorted(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("depth", [1_000, 60_000, 200_000])
def test_deeply_nested_json_is_a_channel_error(depth: int) -> None:
    with pytest.raises(ChannelError, match=r"nested too deeply|undecodable"):
        decode(b"[" * depth)
    with pytest.raises(ChannelError):
        decode(b"[" * depth + b"]" * depth)  # valid JSON, but not an object (or too deep)


NESTING_APP = asgi_app(
    "import os\nfrom cluster_server import cluster",
    """
    if scope["path"] == "/nest":
        cluster._endpoint.channel.sock.send(b"[" * 60000)  # straight onto the channel, as hostile code could
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(os.getpid()).encode()})
    """,
)


def test_nested_json_from_a_worker_and_on_the_control_socket_is_refused(
    start_server: Any, write_app: Any, tmp_path: Path
) -> None:
    write_app("nestapp", NESTING_APP)
    ctl = tmp_path / "ctl.sock"
    srv = start_server("nestapp:app", "--workers", "2", "--control-socket", str(ctl)).wait_ready()
    assert srv.get("/nest").status_code == 200
    srv.wait_log("dropped a message: message nested too deeply")
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(ctl))
        s.settimeout(10)
        s.sendall(b"[" * 60_000 + b"\n")
        answer = s.makefile("rb").readline()
    assert json.loads(answer) == {"ok": False, "error": "request nested too deeply"}
    srv.wait_log("control socket: refused a request nested too deeply")
    assert srv.proc.poll() is None
    assert srv.get().status_code == 200
    assert "Traceback" not in srv.log()


# -- the fd limit (finding 2) ----------------------------------------------------


@contextlib.contextmanager
def fds_left(n: int) -> Iterator[None]:
    """Lower this process's fd limit so that exactly ``n`` more fds can be opened."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fill: list[int] = []
    limit = max(os.listdir("/proc/self/fd"), key=int)
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(limit) + 64, hard))
    try:
        while True:
            try:
                fill.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        for _ in range(n):
            os.close(fill.pop())
        yield
    finally:
        for fd in fill:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_hand_off_that_cannot_dup_every_fd_leaks_none(conns: Any) -> None:
    sched, primary, (w1,) = handoff_setup("round-robin", 1)
    ready(sched, w1)
    fds = conns(5)
    with fds_left(2):
        sched.held.extend(fds)
        sched._pump()  # dups 2 of 5, then EMFILE
        assert primary.sent == [] and list(sched.held) == fds  # all held again, in order
        # The two copies made before the failure were closed: both slots are free again.
        probes = [os.dup(0), os.dup(0)]
        for fd in probes:
            os.close(fd)
    sched._paused_until = 0.0
    sched._pump()
    assert [m["b"] for _, m, _ in primary.sent] == [1]


def test_admission_counts_two_fds_per_connection_until_sent(conns: Any) -> None:
    sched, _, (w1,) = handoff_setup("round-robin", 1, window=1000, hold_max=1000)
    sched.fd_budget = 40
    assert sched._room() == 20  # nothing held: each new one costs its fd and its copy
    sched.held.extend(conns(10))
    assert sched._room() == 15
    ready(sched, w1)  # handed over: one fd each (ours, until acknowledged)
    assert sched.fds_in_use() == 10 and sched._room() == 15


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _burst(port: int, n: int, hold: float) -> None:
    """Open ``n`` connections at once, each sends a request; close them all after ``hold`` s."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            socks.append(s)
        time.sleep(0.2)
        for s in socks:
            with contextlib.suppress(OSError):
                s.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(hold)
    finally:
        for s in socks:
            s.close()


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("workers", "policy"), [(1, "least-busy"), (2, "least-busy"), (4, "least-busy"), (4, "round-robin")]
)
def test_a_burst_at_a_low_fd_limit_recovers(start_server: Any, write_app: Any, workers: int, policy: str) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4096:
        pytest.skip("the test opens 400 connections and needs RLIMIT_NOFILE of 4096")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    write_app("hello", HELLO_APP)
    srv = start_server(
        "hello:app",
        "--workers",
        str(workers),
        "--scheduling",
        policy,
        wrapper=["sh", "-c", 'ulimit -n 256 && exec "$@"', "sh"],
    ).wait_ready()
    assert srv.get().status_code == 200
    wait_until(lambda: len(children(srv.pid)) == workers, 10)
    baseline = _fd_count(srv.pid)
    _burst(srv.port, 400, hold=2.0)
    ended = time.monotonic()

    def serves() -> bool:
        try:
            return httpx.get(srv.url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(serves, 5, what="served within 5 s of the burst's end")
    wait_until(lambda: _fd_count(srv.pid) <= baseline, 5, what=f"the primary's fds back to {baseline}")
    assert time.monotonic() - ended < 6
    # A control request and a roll at the limit do not hurt it either.
    srv.signal(signal.SIGHUP)
    srv.wait_log("done in")
    assert srv.proc.poll() is None and serves()
    log = srv.log()
    assert "Traceback" not in log
    assert log.count("cannot dup a connection") <= 3, "a repeated failure is rate-limited"


# -- a worker's abrupt death under load (finding 1, end to end) ---------------------


class Load:
    """Threads sending requests, a new connection each, until stopped; counts failures."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url, self.ok, self.failed = url, 0, 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                httpx.get(self.url, timeout=5, headers={"connection": "close"})
                self.ok += 1
            except httpx.HTTPError:
                self.failed += 1

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("policy", ["least-busy", "round-robin"])
def test_sigkilled_workers_under_load_never_take_the_primary(start_server: Any, write_app: Any, policy: str) -> None:
    """20 SIGKILLs of a worker while connections are being handed over."""
    write_app("hello", HELLO_APP)
    srv = start_server("hello:app", "--workers", "4", "--scheduling", policy).wait_ready()
    load = Load(srv.url)
    try:
        for _ in range(20):
            wait_until(lambda: len(children(srv.pid)) == 4, 10, what="4 workers")
            victim = children(srv.pid)[0]
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda v=victim: v not in children(srv.pid), 10)  # type: ignore[misc]
            assert srv.proc.poll() is None, srv.log()
    finally:
        load.stop()
    assert srv.proc.poll() is None
    assert load.ok > 0
    assert "Bad file descriptor" not in srv.log() and "Traceback" not in srv.log()
