"""The whole cluster, with real processes, real sockets and a real HTTP client.

Every server is started with the ``start_server`` fixture (its own session,
killed by process group at the end); every wait is ``wait_until`` with a
deadline; every request loop is bounded in count and time.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from ..conftest import HELLO_APP, Server, alive, asgi_app, free_port, run_cli, wait_until

StartServer = Callable[..., Server]
WriteApp = Callable[[str, str], Path]

#: "/" answers the worker's pid; "/slow?S" notes the request in ./started, sleeps S s,
#: then answers "done <pid>". Run with the test's tmp dir as cwd.
SLOW_APP = asgi_app(
    """
    import asyncio
    import os
    """,
    """
    body = str(os.getpid())
    if scope["path"] == "/slow":
        with open("started", "a") as f:
            f.write(body + "\\n")
        await asyncio.sleep(float(scope["query_string"].decode() or "1"))
        body = "done " + body
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body.encode()})
    """,
)

#: HELLO_APP, unless ./crash exists when a worker imports it
CRASHY_APP = """
import contextlib
import os

if os.path.exists("crash"):
    raise RuntimeError("the crash marker is there")

from hello import app
"""

LIFESPAN_FAILS = """
async def app(scope, receive, send):
    assert scope["type"] == "lifespan"
    await receive()
    await send({"type": "lifespan.startup.failed", "message": "database is down"})
"""

LIFESPAN_RAISES = """
async def app(scope, receive, send):
    await receive()
    raise RuntimeError("database is down")
"""


def title(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def pid_answering(url: str) -> int:
    """One request on a new connection; the worker's pid it answered with."""
    return int(httpx.get(url, timeout=10, headers={"connection": "close"}).text)


def pids_answering(url: str, want: set[int], tries: int = 200, seconds: float = 15.0) -> set[int]:
    """Send requests (new connection each) until every pid in ``want`` answered; bounded."""
    seen: set[int] = set()
    deadline = time.monotonic() + seconds
    for _ in range(tries):
        seen.add(pid_answering(url))
        if want <= seen or time.monotonic() > deadline:
            break
    return seen


class Request(threading.Thread):
    """A request running in the background; ``.response`` or ``.error`` once joined."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.response = httpx.get(self.url, timeout=30)
        except BaseException as exc:
            self.error = exc


def started_requests(tmp_path: Path) -> int:
    path = tmp_path / "started"
    return len(path.read_text().split()) if path.exists() else 0


# -- serving ----------------------------------------------------------------------------


def test_two_workers_serve_and_requests_reach_both(start_server: StartServer, write_app: WriteApp) -> None:
    write_app("hello", HELLO_APP)
    server = start_server("hello:app", "--workers", "2").wait_ready()
    workers = server.worker_pids()
    assert len(workers) == 2
    assert pids_answering(server.url, set(workers)) == set(workers)
    log = server.log()
    assert f"all 2 workers ready; serving http://127.0.0.1:{server.port}" in log
    for slot in (1, 2):
        assert re.search(rf"worker {slot} \[pid \d+\] spawned \(generation 1\)", log)
        assert re.search(rf"worker {slot} \[pid \d+\] ready in \d+\.\d\d s", log)
    server.wait_log('"GET / HTTP/1.1" 200')  # uvicorn's access-log format


def test_process_titles(start_server: StartServer, write_app: WriteApp) -> None:
    write_app("hello", HELLO_APP)
    server = start_server("hello:app", "--workers", "2").wait_ready()
    assert title(server.pid).startswith("cluster-server: primary")
    titles = sorted(title(pid) for pid in server.worker_pids())
    assert titles[0].startswith("cluster-server: worker 1")
    assert titles[1].startswith("cluster-server: worker 2")


def test_web_concurrency(start_server: StartServer, write_app: WriteApp) -> None:
    write_app("hello", HELLO_APP)
    server = start_server("hello:app", env={"WEB_CONCURRENCY": "3"}).wait_ready()
    assert "all 3 workers ready" in server.log()
    assert len(server.worker_pids()) == 3


def test_cluster_server_env_vars(start_server: StartServer, write_app: WriteApp) -> None:
    write_app("hello", HELLO_APP)
    env = {"WEB_CONCURRENCY": "3", "CLUSTER_SERVER_WORKERS": "2", "CLUSTER_SERVER_ACCESS_LOG": "false"}
    server = start_server("hello:app", env=env).wait_ready()
    assert "all 2 workers ready" in server.log(), "CLUSTER_SERVER_WORKERS wins over WEB_CONCURRENCY"
    assert len(server.worker_pids()) == 2
    for _ in range(3):
        assert server.get().status_code == 200
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert "GET /" not in server.log(), "CLUSTER_SERVER_ACCESS_LOG=false turns the access log off"


# -- supervision --------------------------------------------------------------------------


def test_killed_worker_is_replaced_and_the_replacement_serves(start_server: StartServer, write_app: WriteApp) -> None:
    write_app("hello", HELLO_APP)
    server = start_server("hello:app", "--workers", "2").wait_ready()
    victim, survivor = server.worker_pids()
    os.kill(victim, signal.SIGKILL)
    server.wait_log(f"[pid {victim}] exited (killed by SIGKILL)")
    server.wait_log("ready in", count=3)
    new = wait_until(lambda: set(server.worker_pids()) - {victim, survivor}, what="a replacement")
    assert len(new) == 1 and len(server.worker_pids()) == 2
    assert not alive(victim)
    assert new <= pids_answering(server.url, new), "the replacement serves requests"


def test_crash_loop_backs_off_with_growing_delays(start_server: StartServer, write_app: WriteApp) -> None:
    write_app("hello", HELLO_APP)
    write_app("crashy", CRASHY_APP)
    server = start_server("crashy:app").wait_ready()
    [first] = server.worker_pids()
    (server.cwd / "crash").touch()
    os.kill(first, signal.SIGKILL)
    server.wait_log("restarting it in", count=3)
    log = server.log()
    assert "worker 1 could not start: importing 'crashy' raised RuntimeError: the crash marker is there" in log
    delays = [float(d) for d in re.findall(r"failed \d+ times in a row; restarting it in ([\d.]+) s", log)]
    assert delays[:3] == [0.1, 0.2, 0.4], log
    assert "Traceback" not in log
    (server.cwd / "crash").unlink()
    pid = wait_until(lambda: pid_answering(server.url), timeout=10, what="the slot to recover")
    assert pid != first
    assert server.proc.poll() is None, "a crash loop after start-up never stops the cluster"


# -- stopping -----------------------------------------------------------------------------


def test_sigterm_drains_a_slow_request_then_exits_0(
    start_server: StartServer, write_app: WriteApp, tmp_path: Path
) -> None:
    write_app("slow", SLOW_APP)
    server = start_server("slow:app", "--workers", "2", "--graceful-timeout", "10").wait_ready()
    request = Request(server.url + "/slow?1.5")
    wait_until(lambda: started_requests(tmp_path) == 1, what="the slow request to start")
    server.signal(signal.SIGTERM)
    server.wait_log("stopping (SIGTERM)")
    request.join(15)
    assert request.error is None, request.error
    assert request.response is not None and request.response.status_code == 200
    assert request.response.text.startswith("done ")
    assert server.wait_exit() == 0
    log = server.log()
    assert "did not stop in time" not in log
    assert log.count("exited (exit code 0)") == 2


def test_second_sigint_exits_at_once(start_server: StartServer, write_app: WriteApp, tmp_path: Path) -> None:
    write_app("slow", SLOW_APP)
    server = start_server("slow:app", "--workers", "2", "--graceful-timeout", "30").wait_ready()
    workers = server.worker_pids()
    request = Request(server.url + "/slow?30")
    wait_until(lambda: started_requests(tmp_path) == 1, what="the slow request to start")
    server.signal(signal.SIGINT)
    server.wait_log("stopping (SIGINT")
    assert server.proc.poll() is None, "the drain has begun and would take 30 s"
    t0 = time.monotonic()
    server.signal(signal.SIGINT)
    assert server.wait_exit(5) == 130  # interrupted, as a shell reports it; a single SIGINT drains and exits 0
    assert time.monotonic() - t0 < 2.0
    assert "second SIGINT: stopping at once" in server.log()
    wait_until(lambda: not any(alive(pid) for pid in workers), timeout=2, what="the workers to be gone")
    request.join(5)
    assert request.response is None, "the request was cut off, not answered"


def test_primary_sigkill_takes_every_worker_down_within_2s(
    start_server: StartServer, write_app: WriteApp, tmp_path: Path
) -> None:
    write_app("slow", SLOW_APP)
    server = start_server("slow:app", "--workers", "2").wait_ready()
    workers = server.worker_pids()
    Request(server.url + "/slow?30")  # one worker is busy with a request it cannot finish
    wait_until(lambda: started_requests(tmp_path) == 1, what="the slow request to start")
    t0 = time.monotonic()
    server.signal(signal.SIGKILL)
    wait_until(lambda: not any(alive(pid) for pid in workers), timeout=5, interval=0.01, what="orphans to exit")
    elapsed = time.monotonic() - t0
    assert elapsed < 2.0, f"workers outlived the primary by {elapsed:.2f} s"
    with socket.socket() as sock:  # nobody keeps the port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", server.port or 0))
        sock.listen()


# -- bad input: one line, no traceback, non-zero exit -------------------------------------------


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


@pytest.mark.parametrize(
    ("app", "error"),
    [
        ("nosuch:app", "Error: cannot import 'nosuch': no module named 'nosuch'; check the APP path or --app-dir"),
        ("hello:nope", "Error: module 'hello' has no attribute 'nope'; check the name after ':' in APP"),
        ("broken:app", "Error: syntax error in {tmp}/broken.py:2: "),
    ],
    ids=["missing-module", "missing-attribute", "syntax-error"],
)
def test_app_that_cannot_load(write_app: WriteApp, tmp_path: Path, app: str, error: str) -> None:
    write_app("hello", HELLO_APP)
    write_app("broken", "x = 1\ndef f(:\n    pass\n")
    code, out, err = run_cli(tmp_path, app, "--workers", "2", "--port", str(free_port()))
    assert code == 3, err
    [line] = error_lines(err)
    assert line.startswith(error.format(tmp=tmp_path)), err
    assert "Traceback" not in err + out


def test_port_in_use(write_app: WriteApp, tmp_path: Path) -> None:
    write_app("hello", HELLO_APP)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run_cli(tmp_path, "hello:app", "--port", str(port), "--workers", "2")
    assert code == 3  # uvicorn's STARTUP_FAILURE, as `uvicorn --port <taken>` exits
    assert err.splitlines() == [
        f"Error: port {port} on 127.0.0.1 is in use by another process; pick another --port or stop that process"
    ]
    assert out == ""


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--workers", "0"], "'--workers'"),
        (["--port", "eighty"], "'--port'"),
        (["--loop", "trio"], "'--loop'"),
        (["--graceful-timeout", "-1"], "'--graceful-timeout'"),
    ],
)
def test_invalid_flag_value(write_app: WriteApp, tmp_path: Path, args: list[str], says: str) -> None:
    write_app("hello", HELLO_APP)
    code, out, err = run_cli(tmp_path, "hello:app", *args)
    assert code == 2
    [line] = error_lines(err)
    assert says in line
    assert "Traceback" not in err + out


def test_lifespan_startup_failure(write_app: WriteApp, tmp_path: Path) -> None:
    write_app("lsfail", LIFESPAN_FAILS)
    code, out, err = run_cli(tmp_path, "lsfail:app", "--workers", "2", "--port", str(free_port()))
    assert code == 3
    assert error_lines(err) == ["Error: lifespan startup of lsfail:app failed; see the log above"]
    assert "database is down" in err, "uvicorn logs the app's reason above the error"
    assert "Traceback" not in err + out


def test_lifespan_startup_exception_with_lifespan_on(write_app: WriteApp, tmp_path: Path) -> None:
    write_app("lsraise", LIFESPAN_RAISES)
    code, _, err = run_cli(tmp_path, "lsraise:app", "--lifespan", "on", "--port", str(free_port()))
    assert code == 3
    assert error_lines(err) == ["Error: lifespan startup of lsraise:app failed; see the log above"]
    assert "RuntimeError: database is down" in err, "the app's own traceback is logged for its author"
