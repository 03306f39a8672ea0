"""Liveness from the event loop, and crash-loop protection, with real workers."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from ..conftest import Server, wait_until
from ..ops_helpers import status

HANG_APP = """
import os, time

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if os.path.exists(os.environ["CRASH_FLAG"]):
                    os._exit(1)  # a worker that cannot start (after the first generation did)
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["path"] == "/block":
        blocking_the_event_loop()
    if scope["path"] == "/crash":
        os._exit(1)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(os.getpid()).encode()})

def blocking_the_event_loop():
    time.sleep(60)  # a handler that blocks its event loop
"""


def test_a_blocked_event_loop_is_dumped_and_replaced(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path], tmp_path: Path
) -> None:
    write_app("hangapp", HANG_APP)
    path = str(tmp_path / "ctl.sock")
    timeout = 2.0
    srv = start_server(
        "hangapp:app",
        "--worker-timeout",
        str(timeout),
        "--control-socket",
        path,
        env={"CRASH_FLAG": str(tmp_path / "crash")},
    ).wait_ready()
    (old,) = srv.worker_pids()
    outcome: list[str] = []

    def block() -> None:
        try:
            outcome.append(httpx.get(srv.url + "/block", timeout=30).text)
        except httpx.HTTPError as exc:
            outcome.append(type(exc).__name__)

    t0 = time.monotonic()
    thread = threading.Thread(target=block)
    thread.start()

    def replaced() -> bool:
        st = status(path)
        return [(r["state"], r["pid"] != old) for r in st["workers"]] == [("ready", True)]

    wait_until(replaced, timeout + 5, interval=0.05, what="a new ready worker")
    elapsed = time.monotonic() - t0
    assert elapsed <= timeout + 2, f"replaced after {elapsed:.2f} s"
    thread.join(10)
    assert outcome == ["RemoteProtocolError"]  # the blocked request dies with its worker
    assert int(srv.get().text) != old

    log = srv.log()
    assert f"worker 1 [pid {old}] sent no heartbeat for" in log
    # faulthandler's dump of the hung worker names the frame that blocks
    dump = log[log.index("sent no heartbeat") :]
    assert "Current thread" in dump or "Thread 0x" in dump
    assert re.search(r'File ".*hangapp\.py", line \d+ in blocking_the_event_loop', dump), dump[:3000]
    assert log.count("sent no heartbeat") == 1, "dumped and killed once"
    assert status(path)["exits"] == {"hang": 1}


def test_a_crash_loop_backs_off_visibly_and_recovers(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path], tmp_path: Path
) -> None:
    write_app("hangapp", HANG_APP)
    path = str(tmp_path / "ctl.sock")
    flag = tmp_path / "crash"
    srv = start_server(
        "hangapp:app", "--workers", "2", "--control-socket", path, env={"CRASH_FLAG": str(flag)}
    ).wait_ready()
    flag.touch()  # from now on a new worker dies in its lifespan startup
    with pytest.raises(httpx.HTTPError):  # the worker exits without an answer
        httpx.get(srv.url + "/crash", timeout=5)

    def in_backoff() -> dict[str, object] | None:
        for row in status(path)["workers"]:
            if row["state"] == "backoff" and row["restarts"] >= 3:
                return dict(row)
        return None

    row = wait_until(in_backoff, 15, interval=0.02, what="a slot in backoff")
    assert row["pid"] is None and 0 < float(row["restart_in_seconds"]) <= 10  # type: ignore[arg-type]
    # The other worker keeps serving meanwhile; the cluster is not halted.
    assert srv.get().status_code == 200
    assert srv.proc.poll() is None
    assert re.search(r"worker \d failed \d+ times in a row; restarting it in \d+\.\d\d s", srv.log())

    flag.unlink()
    wait_until(lambda: [r["state"] for r in status(path)["workers"]] == ["ready", "ready"], 20, what="recovered")
