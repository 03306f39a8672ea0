"""Upgrading the primary in place (SIGUSR2 / ``ctl upgrade``): real processes, real sockets."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import httpx

from ..conftest import HELLO_APP, Server, free_port, wait_until
from ..ops_helpers import LoadLoop, ctl, ready_pids, status


def _pid_in(pidfile: Path) -> int:
    return int(pidfile.read_text())


def _start(start_server: Callable[..., Server], tmp_path: Path, *extra: str) -> tuple[Server, str, Path]:
    path = str(tmp_path / "ctl.sock")
    pidfile = tmp_path / "primary.pid"
    srv = start_server(
        "hello:app", "--workers", "2", "--control-socket", path, "--pidfile", str(pidfile), *extra
    ).wait_ready()
    return srv, path, pidfile


def _upgraded(srv: Server, pidfile: Path, old_workers: list[int], path: str) -> int:
    """Wait for the handover; returns the new primary's pid."""
    wait_until(lambda: pidfile.exists() and _pid_in(pidfile) != srv.pid, 20, what="the new primary's pidfile")
    new = _pid_in(pidfile)
    assert srv.wait_exit(20) == 0, "the old primary drains and exits 0"
    st = status(path)
    assert st["pid"] == new and st["generation"] == 2
    assert set(ready_pids(st)).isdisjoint(old_workers) and len(ready_pids(st)) == 2
    for pid in ready_pids(st):
        with open(f"/proc/{pid}/stat") as fh:
            assert int(fh.read().rsplit(")", 1)[1].split()[1]) == new, "new workers are the new primary's children"
    return new


def test_ctl_upgrade_hands_everything_over(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path], tmp_path: Path
) -> None:
    write_app("hello", HELLO_APP)
    mport = free_port()
    srv, path, pidfile = _start(start_server, tmp_path, "--metrics-bind", f"127.0.0.1:{mport}")
    old_workers = ready_pids(status(path))
    out = ctl(path, "upgrade").stdout
    assert out.startswith("upgrading: new primary is pid ")
    again = ctl(path, "upgrade").stdout
    assert again.startswith("an upgrade is already in progress") or again.startswith("not upgrading: the server is")
    new = _upgraded(srv, pidfile, old_workers, path)
    assert int(srv.get().text) in ready_pids(status(path))
    metrics = httpx.get(f"http://127.0.0.1:{mport}/metrics", timeout=5).text
    assert 'cluster_server_workers{state="ready"} 2.0' in metrics
    log = srv.log()
    assert f"upgrade: new primary (pid {new}) has every worker ready" in log
    assert "Traceback" not in log
    os.kill(new, signal.SIGTERM)
    wait_until(lambda: not pidfile.exists() and not os.path.exists(path), 20, what="the new primary cleaned up")


def test_sigusr2_under_load_loses_nothing(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path], tmp_path: Path
) -> None:
    write_app("hello", HELLO_APP)
    srv, path, pidfile = _start(start_server, tmp_path)
    old_workers = ready_pids(status(path))
    with LoadLoop(srv.url) as load:
        wait_until(lambda: load.count() > 100, 10, what="load running")
        # To the whole process group, as `systemctl kill -s USR2` does: the workers ignore it.
        os.killpg(srv.pid, signal.SIGUSR2)
        _upgraded(srv, pidfile, old_workers, path)
        n = load.count()
        wait_until(lambda: load.count() > n + 100, 10, what="load served by the new workers")
    assert load.failures == [], load.failures[:5]
    served = {int(p) for p in load.pids}
    assert set(old_workers) <= served and set(ready_pids(status(path))) <= served
    log = srv.log()
    handover = log.index("has every worker ready")
    assert "Shutting down" not in log[:handover], "no old worker stopped before the new ones were ready"


def test_a_failed_upgrade_keeps_the_old_primary_serving(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path], tmp_path: Path
) -> None:
    app = write_app("hello", HELLO_APP)
    uds = tmp_path / "app.sock"
    srv, path, pidfile = _start(start_server, tmp_path, "--uds", str(uds))
    client = httpx.Client(transport=httpx.HTTPTransport(uds=str(uds)), timeout=5)

    def served_by() -> int:
        return int(client.get("http://app/").text)

    workers = ready_pids(status(path))
    app.write_text("this is not python(\n")  # the new primary's workers cannot import it
    srv.signal(signal.SIGUSR2)
    srv.wait_log("upgrade failed: the new primary", timeout=30)
    log = srv.log()
    # the successor's own error first, then the old primary's verdict with its exit status
    assert log.index("Error: syntax error in") < log.index("upgrade failed: the new primary")
    assert re.search(r"upgrade failed: the new primary \(pid \d+\) exited \(exit code 3\) before it was ready", log)
    assert srv.proc.poll() is None
    assert _pid_in(pidfile) == srv.pid
    st = status(path)
    assert st["pid"] == srv.pid and ready_pids(st) == workers
    assert uds.exists(), "the failed successor left the Unix socket's file alone"
    assert served_by() in workers

    # Fixed, the next attempt succeeds; the successor owns the socket file now.
    write_app("hello", HELLO_APP)
    srv.signal(signal.SIGUSR2)
    new = _upgraded(srv, pidfile, workers, path)
    assert uds.exists() and served_by() in ready_pids(status(path))
    os.kill(new, signal.SIGTERM)
    wait_until(lambda: not uds.exists(), 20, what="the successor removed the socket file at exit")
    client.close()
