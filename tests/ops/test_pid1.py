"""cluster-server as PID 1 of a fresh PID namespace, as in a container without an init.

The primary must reap every process re-parented to it (an app's grandchild,
orphaned), keep its worker table intact while doing so, stop cleanly on
SIGTERM, and exit with its own status (``unshare --fork`` passes it through).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import HELLO_APP, Server, wait_until

UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc"]

ORPHAN_APP = (
    HELLO_APP
    + """
import subprocess

_hello = app

async def app(scope, receive, send):
    if scope["type"] == "http" and scope["path"] == "/orphan":
        # sh starts `sleep` in the background and exits at once: the sleep is
        # orphaned and re-parented to PID 1 of the namespace, the primary.
        out = subprocess.run(
            ["sh", "-c", "sleep 0.5 >/dev/null 2>&1 & echo $!"], capture_output=True, check=True, timeout=5
        )
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": out.stdout.strip()})
        return
    await _hello(scope, receive, send)
"""
)


def _unshare_works() -> str | None:
    try:
        proc = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare cannot run here: {exc}"
    if proc.returncode != 0:
        return f"unshare --pid --fork --mount-proc failed (needs root or user namespaces): {proc.stderr.strip()}"
    return None


pytestmark = pytest.mark.skipif(bool(_unshare_works()), reason=_unshare_works() or "")


def _children(pid: int) -> dict[int, tuple[str, str]]:
    """pid -> (state, command name) of every child of ``pid``, from /proc."""
    out = subprocess.run(["ps", "-o", "pid=,stat=,comm=", "--ppid", str(pid)], capture_output=True, text=True)
    children = {}
    for line in out.stdout.splitlines():
        pid_s, stat, comm = line.split(None, 2)
        children[int(pid_s)] = (stat, comm)
    return children


def _ns_pids(pid: int) -> list[int]:
    """The pid of ``pid`` in each PID namespace it belongs to, outermost first (NSpid)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(p) for p in line.split()[1:]]
    raise AssertionError("no NSpid line in /proc/PID/status")


def test_primary_as_pid1_reaps_orphans_and_stops_cleanly(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path]
) -> None:
    write_app("orphans", ORPHAN_APP)
    server = start_server("orphans:app", "--workers", "2", wrapper=UNSHARE).wait_ready()
    # server.pid is unshare's; its only child is the primary, PID 1 inside.
    (primary,) = wait_until(lambda: list(_children(server.pid)), 5, what="the primary under unshare")
    assert _ns_pids(primary)[-1] == 1
    workers = set(_children(primary))
    assert len(workers) == 2

    with httpx.Client(headers={"connection": "close"}, timeout=10) as client:
        inner_pids = {int(client.get(server.url + "/orphan").text) for _ in range(12)}
    assert len(inner_pids) == 12

    # The orphans were re-parented to the primary (not to some init outside) ...
    def orphans_adopted() -> bool:
        return any(comm == "sleep" for _, comm in _children(primary).values())

    wait_until(orphans_adopted, 5, what="sleep processes re-parented to the primary")
    # ... and once they exit the primary reaps them all: only its workers remain, no zombie.
    wait_until(lambda: set(_children(primary)) == workers, 10, what="the orphans reaped, workers kept")
    assert not [c for c in _children(primary).values() if c[0].startswith("Z")]

    # The worker table was not disturbed: the same two workers, nothing replaced.
    log = server.log()
    assert log.count(" spawned (generation") == 2, log
    assert " exited (" not in log, log
    assert server.get("/").status_code == 200

    # SIGTERM to PID 1 works (the primary has a handler; the kernel drops
    # default-action signals to a namespace's init) and it exits 0.
    os.kill(primary, signal.SIGTERM)
    assert server.wait_exit(15) == 0
    assert "stopping (SIGTERM)" in server.log()
