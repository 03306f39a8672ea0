"""The primary under faults, part two (issue 13's findings 4-7).

A drain sent right after a fork, a keep-alive connection whose response was
already under way when a roll began, the primary's own waits (its shutdown, a
template's spawn, probing a Unix socket), a boot error that must reach the
primary, and a worker far over its memory limit.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from cluster_server import _proc
from cluster_server._errors import BindError
from cluster_server.ops.status import ClusterWatch
from cluster_server.primary import loop as _loop
from cluster_server.primary import sockets as _sockets

from ..conftest import (
    HELLO_APP,
    ROOT,
    Server,
    free_port,
    read_response,
    response_headers,
    run_in_session,
    titled,
    wait_until,
)
from ..fakes import Harness
from ..ops_helpers import LoadLoop

# -- a drain sent within ms of a fork (finding 4) ---------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_drain_right_after_the_fork_is_never_lost(start_server: Any, write_app: Any) -> None:
    """SIGTTIN then SIGTTOU at once: the new worker is drained within microseconds of
    its fork, before it has put its own signal handlers in place. It must stop as
    asked, not serve on until the primary SIGKILLs it at --graceful-timeout."""
    write_app("hello", HELLO_APP)
    srv = start_server("hello:app", "--workers", "2", "--graceful-timeout", "5", "--no-access-log").wait_ready()
    pairs = 30
    for i in range(1, pairs + 1):
        srv.signal(signal.SIGTTIN)
        srv.signal(signal.SIGTTOU)
        srv.wait_log("draining (scaled down)", count=i)
    scaled = [int(p) for p in re.findall(r"worker 3 \[pid (\d+)\] draining \(scaled down\)", srv.log())]
    assert len(scaled) == pairs

    def all_exited() -> bool:
        log = srv.log()
        return all(f"worker 3 [pid {pid}] exited" in log for pid in scaled)

    wait_until(all_exited, 30, what="every scaled-down worker exited")
    log = srv.log()
    assert "did not stop in time" not in log
    assert "killed by SIGKILL" not in log
    assert "said ready twice" not in log
    assert srv.get().status_code == 200


def test_a_signal_sent_before_the_child_reset_its_handlers_reaches_its_own_disposition() -> None:
    """The mechanism behind the test above, without a primary: the parent's handler
    only records the signal; a child that gets SIGTERM before it reset its handlers
    must still be terminated by it, once ``after_fork_in_child`` ran."""
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: seen.append(sig))
    r, w = os.pipe()
    try:
        pid = _proc.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.close(r)
                os.write(w, b"x")
                # the parent's SIGTERM arrives now, with the parent's handler still set: blocked, it waits
                wait_until(lambda: signal.SIGTERM in signal.sigpending(), 10, what="the SIGTERM pending")
                _proc.after_fork_in_child([w])
                time.sleep(5)
            finally:
                os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"x"
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        assert seen == []  # and the parent's own mask is as it was
        assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        os.close(r)
        signal.signal(signal.SIGTERM, previous)


def test_ready_after_a_drain_is_logged_as_what_happened(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(workers=1).start()
    h.primary.scale(2)
    new = h.launcher.spawned[-1]
    h.primary.scale(1)  # drained while it boots
    with caplog.at_level(logging.INFO, logger="cluster_server"):
        h.ready(new)
    assert "became ready after it was asked to stop (scaled_down); it drains" in caplog.text
    assert "twice" not in caplog.text


# -- keep-alive requests across a roll (finding 5) ---------------------------------

#: a WSGI app whose responses are slow to finish: the head and first byte go out,
#: the rest 20 ms later (a Django view streaming a template, say)
SLOW_FINISH_WSGI = """
import os, time

PID = str(os.getpid()).encode()

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(PID)))])
    def body():
        yield PID[:1]
        time.sleep(0.02)
        yield PID[1:]
    return body()
"""


class KeepAliveLoad(LoadLoop):
    """Keep-alive clients that behave as wrk does: the next request goes out on the
    same connection as soon as a response is in, unless it said ``Connection: close``.

    A reused connection that is closed or reset before a whole response came back is
    a failed request (httpx would notice a close that arrived before it sent, and
    reconnect; a close that crosses the request on the wire, no client can).
    Bounded: ``max_seconds``.
    """

    def __init__(self, port: int, threads: int = 4, max_seconds: float = 60.0) -> None:
        super().__init__(f"http://127.0.0.1:{port}", threads=threads, max_seconds=max_seconds)
        self.port = port

    def _run(self, keep_alive: bool) -> None:  # (every connection is kept alive here)
        sock: socket.socket | None = None
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
                close = response_headers(read_response(sock, timeout=10)).get("connection") == "close"
                with self._lock:
                    self.ok += 1
                if close:
                    sock.close()
                    sock = None
            except OSError as exc:
                with self._lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                if sock is not None:
                    sock.close()
                sock = None
        if sock is not None:
            sock.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_no_keep_alive_request_lost_across_two_rolls_of_a_slow_to_finish_wsgi_app(
    start_server: Any, write_app: Any
) -> None:
    write_app("slowwsgi", SLOW_FINISH_WSGI)
    srv: Server = start_server("slowwsgi:app", "--workers", "2", "--no-access-log").wait_ready()
    with KeepAliveLoad(srv.port or 0, threads=6) as load:
        wait_until(lambda: load.count() > 100, 15, what="load running")
        for generation in (2, 3):
            srv.signal(signal.SIGHUP)
            srv.wait_log(f"rolling restart to generation {generation} done", timeout=30)
            seen = load.count()
            wait_until(lambda seen=seen: load.count() > seen + 100, 15, what="load after the roll")
    assert load.failures == [], load.failures[:5]
    assert srv.log().count("draining (rolled)") == 4


# -- the primary's own waits are bounded (finding 6) --------------------------------


@pytest.mark.timeout(10)
def test_shutdown_gives_up_on_a_worker_that_does_not_die(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker the SIGKILL does not end (uninterruptible sleep; here the fake
    launcher's kill does nothing to a real child): the primary still exits, soon
    after its deadline, instead of blocking in waitpid for good."""
    h = Harness(workers=1)
    handlers = {sig: signal.getsignal(sig) for sig in _proc.LOOP_SIGNALS}
    monkeypatch.setattr(_loop, "SHUTDOWN_REAP", 0.5)
    pid = os.fork()  # nothing between the fork and the try: the finally always ends it
    if pid == 0:  # pragma: no cover - the stuck worker
        try:
            time.sleep(30)
        finally:
            os._exit(0)
    try:
        h.primary.workers[pid] = _loop.Worker(id=1, generation=1, spawned_at=0.0, pid=pid)
        began = time.monotonic()
        h.primary._shutdown()
        assert time.monotonic() - began < 3
        assert pid in h.primary.workers  # given up on, not reaped
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_wedged_template_holds_the_primary_up_for_a_moment_only(start_server: Any, write_app: Any) -> None:
    """The primary waits for a template's answer without serving anything else
    (under least-busy it accepts nothing meanwhile): a stopped template must cost
    a request about a second (SPAWN_TIMEOUT), not the old five."""
    write_app("hello", HELLO_APP)
    srv = start_server("hello:app", "--preload", "--workers", "1", "--no-access-log").wait_ready()
    (template,) = titled(srv.pid, "template")
    os.kill(template, signal.SIGSTOP)
    srv.signal(signal.SIGTTIN)
    srv.wait_log("scaling from 1 to 2 workers")
    began = time.monotonic()
    assert srv.get(headers={"connection": "close"}).status_code == 200
    took = time.monotonic() - began
    srv.wait_log("did not answer within")
    assert took < 3.0, took
    wait_until(lambda: len(titled(srv.pid, "worker")) == 2, 15, what="the second worker, forked directly")
    srv.wait_log("ready in", count=2)
    assert srv.proc.poll() is None


@pytest.mark.timeout(10)
def test_uds_probe_of_a_live_socket_with_a_full_queue_does_not_hang(tmp_path: Path) -> None:
    """A live server whose listen queue is full never accepts the probe's connect: an
    unbounded blocking connect would hang the primary's start for good."""
    path = str(tmp_path / "busy.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(0)
    queued: list[socket.socket] = []
    try:
        while True:  # fill the queue (nobody accepts)
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            queued.append(c)
            try:
                c.connect(path)
            except BlockingIOError:
                break
        with pytest.raises(BindError, match="in use by another process"):
            _sockets._bind_unix(path, 16)
        assert os.path.exists(path)
    finally:
        for c in queued:
            c.close()
        server.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to the user nobody")
def test_uds_that_cannot_be_probed_is_not_taken_for_stale() -> None:
    """EACCES on the probe's connect proves nothing about the socket: it must not be
    unlinked as stale (nor the error crash the start): a clear BindError instead."""
    directory = tempfile.mkdtemp(prefix="cs-probe-")  # searchable by nobody (tmp_path is not)
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "private.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o600)  # connecting needs write permission on the socket
    server.listen(1)
    r, w = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the unprivileged child
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                _sockets._bind_unix(path, 16)
                os.write(w, b"bound")
            except BindError as exc:
                os.write(w, str(exc).encode())
                code = 0
            except BaseException as exc:
                os.write(w, repr(exc).encode())
            finally:
                os._exit(code)
        os.close(w)
        w = -1
        said = os.read(r, 4096).decode()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, said
        assert "cannot be checked" in said
        assert os.path.exists(path)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        server.close()
        shutil.rmtree(directory, ignore_errors=True)


# -- a worker that cannot start says why, and the primary says it right (finding 6) --

#: an app that floods its channel at import (more than the kernel buffers), then fails
FLOOD_THEN_FAIL = """
from cluster_server import cluster

for i in range(60):
    cluster.send("x" * 60000)
raise RuntimeError("boom at import")
"""


def _cli(tmp_path: Path, *args: str, wrapper: tuple[str, ...] = ()) -> tuple[int | None, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    env.pop("WEB_CONCURRENCY", None)
    argv = [*wrapper, sys.executable, "-m", "cluster_server", *args, "--port", str(free_port())]
    code, out, err = run_in_session([*argv, "--no-control-socket"], tmp_path, env, timeout=40)
    return code, out + err


@pytest.mark.timeout(60)
def test_a_boot_error_behind_messages_queued_at_import_still_reaches_the_primary(
    write_app: Any, tmp_path: Path
) -> None:
    """What the app sent at import is queued in the channel (the primary reads it no
    faster than the app writes); the boot error goes behind it, and must not be lost
    with the queue when the worker exits."""
    write_app("floodapp", FLOOD_THEN_FAIL)
    code, output = _cli(tmp_path, "floodapp:app", "--workers", "1")
    assert code == 3, output
    assert "Error: importing 'floodapp' raised RuntimeError: boom at import" in output


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (--user)")
@pytest.mark.parametrize("preload", [False, True])
def test_a_worker_that_cannot_switch_user_is_a_config_error_not_an_import_error(
    write_app: Any, tmp_path: Path, preload: bool
) -> None:
    """Root without CAP_SETUID/CAP_SETGID (a container's bounding set): the primary's
    check passes (it is root), the worker's (or template's) setuid fails."""
    write_app("hello", HELLO_APP)
    wrapper = ("setpriv", "--bounding-set", "-setuid,-setgid", "--")
    extra = ("--preload",) if preload else ()
    code, output = _cli(tmp_path, "hello:app", "--user", "nobody", *extra, wrapper=wrapper)
    assert code == 2, output
    assert "Error: worker cannot switch to user nobody" in output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("stage", "error"),
    [("bind", "BindError"), ("privileges", "ConfigError"), ("load", "AppLoadError"), ("lifespan", "WorkerBootError")],
)
def test_a_first_generation_boot_error_is_typed_by_its_stage(stage: str, error: str) -> None:
    h = Harness(workers=1)
    h.primary.manage_workers()
    (pid,) = h.primary.workers
    h.primary.handle_message(h.worker(pid), {"t": "boot_error", "error": "it failed", "stage": stage})
    h.exit(pid, 3 << 8)
    assert type(h.primary.fatal).__name__ == error
    assert str(h.primary.fatal) == "it failed"


def test_a_roll_that_starts_and_ends_within_one_iteration_is_seen() -> None:
    """A recycle whose replacement cannot be forked ends in the call that started it:
    the systemd notifier and the roll counters must hear of it all the same."""
    h = Harness(workers=1).start()
    watch = ClusterWatch()
    h.primary.add_component(watch)
    watch.attach(h.primary)
    events: list[str] = []
    watch.on("roll_started", lambda roll: events.append("started"))
    watch.on("roll_finished", lambda roll, outcome: events.append(outcome))

    def no_fork(worker: Any) -> Any:
        raise OSError(11, "Resource temporarily unavailable")

    h.launcher.spawn = no_fork  # type: ignore[method-assign]
    assert h.primary.recycle(1, "test")
    assert h.primary.roll_state is None  # over already
    watch.tick()
    assert events == ["started", "failed"]
    assert dict(watch.recycles) == {"failed": 1}  # a recycle, counted apart from rolls
