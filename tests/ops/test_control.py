"""The control socket and ``cluster-server ctl``, with real servers and real clients."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cluster_server import ControlError
from cluster_server._config import Config
from cluster_server.cli.ctl import format_status
from cluster_server.ops import control as _control
from cluster_server.ops.status import ClusterWatch
from cluster_server.primary.loop import Primary

from ..conftest import HELLO_APP, ROOT, Server, wait_until
from ..fakes import FakeLauncher
from ..ops_helpers import LoadLoop, ctl, ready_pids, status


@pytest.fixture
def server(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path], tmp_path: Path
) -> Iterator[tuple[Server, str]]:
    write_app("hello", HELLO_APP)
    path = str(tmp_path / "ctl.sock")
    srv = start_server("hello:app", "--workers", "2", "--control-socket", path).wait_ready()
    yield srv, path


def test_status_shows_the_live_table(server: tuple[Server, str]) -> None:
    srv, path = server
    for _ in range(5):
        assert srv.get().status_code == 200
    # requests reach the table with the next heartbeat (1 s)
    wait_until(lambda: sum(r["requests"] for r in status(path)["workers"]) == 5, 5, what="5 requests counted")

    out = ctl(path, "status").stdout
    lines = out.splitlines()
    assert lines[0].startswith("cluster-server ") and f"primary {srv.pid}" in lines[0], out
    header = next(line for line in lines if line.startswith("id"))
    assert header.split() == [
        "id",
        "pid",
        "state",
        "gen",
        "uptime",
        "requests",
        "conns",
        "rss",
        "restarts",
        "heartbeat",
    ]
    rows = [line.split() for line in lines[lines.index(header) + 1 :]]
    assert sorted(int(r[1]) for r in rows) == srv.worker_pids()
    assert {r[2] for r in rows} == {"ready"}
    assert sum(int(r[5]) for r in rows) == 5
    assert all(r[7].endswith("M") for r in rows), out  # RSS from /proc

    st = json.loads(ctl(path, "status", "--json").stdout)
    assert st["pid"] == srv.pid and st["workers_configured"] == 2 and st["states"]["ready"] == 2
    assert all(r["heartbeat_age_seconds"] is not None and r["heartbeat_age_seconds"] < 3 for r in st["workers"])


def test_the_primary_imports_no_app_uvicorn_or_asyncio(server: tuple[Server, str]) -> None:
    srv, path = server
    assert srv.get().status_code == 200  # a worker imported them all: not the primary
    modules = status(path)["modules"]
    assert "cluster_server" in modules and "click" in modules, modules
    for name in ("hello", "uvicorn", "asyncio", "h11", "httptools", "uvloop", "starlette"):
        assert name not in modules, f"the primary imported {name}"


def test_socket_is_private_to_the_primary_user(server: tuple[Server, str]) -> None:
    _, path = server
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()


def _nobody_python() -> str | None:
    """An interpreter the user nobody can run (the venv's may live under /root)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate):
            probe = subprocess.run([candidate, "-I", "-c", "pass"], user="nobody", capture_output=True)
            if probe.returncode == 0:
                return candidate
    return None


NOBODY_CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("connect: permission denied"); sys.exit(0)
try:
    s.sendall(b'{"cmd": "stop"}\\n')
except BrokenPipeError:
    pass  # refused before it asked; the refusal is there to read
print("answer:", s.recv(4096).decode().strip())
"""


def test_a_second_user_cannot_connect(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user")
    python = _nobody_python()
    if python is None:
        pytest.skip("no Python interpreter the user nobody can run")
    write_app("hello", HELLO_APP)
    # A directory others may enter, so only the socket's own mode keeps them out.
    directory = tempfile.mkdtemp(prefix="cs-ctl-")
    try:
        os.chmod(directory, 0o755)
        path = os.path.join(directory, "ctl.sock")
        srv = start_server("hello:app", "--control-socket", path).wait_ready()

        def as_nobody() -> str:
            out = subprocess.run(
                [python, "-I", "-c", NOBODY_CLIENT, path], user="nobody", capture_output=True, text=True, timeout=10
            )
            return out.stdout.strip() or out.stderr

        assert as_nobody() == "connect: permission denied"
        # Even with the file opened up, the primary checks the peer's credentials.
        os.chmod(path, 0o666)
        assert as_nobody() == 'answer: {"ok":false,"error":"permission denied: not the server\'s user or root"}'
        assert srv.proc.poll() is None and status(path)["stopping"] is False
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_scale_up_and_down_under_load_loses_nothing(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path], tmp_path: Path
) -> None:
    write_app("hello", HELLO_APP)
    path = str(tmp_path / "ctl.sock")
    srv = start_server("hello:app", "--workers", "1", "--control-socket", path).wait_ready()
    first = ready_pids(status(path))
    with LoadLoop(srv.url) as load:
        wait_until(lambda: load.count() > 50, 10, what="load running")
        assert "scaled from 1 to 3 workers" in ctl(path, "scale", "3").stdout
        wait_until(lambda: len(ready_pids(status(path))) == 3, 15, what="3 workers ready")
        three = ready_pids(status(path))
        n = load.count()
        wait_until(lambda: load.count() > n + 100, 10, what="load on 3 workers")
        assert "scaled from 3 to 1 workers" in ctl(path, "scale", "1").stdout
        wait_until(lambda: len(status(path)["workers"]) == 1, 15, what="back to 1 worker")
        n = load.count()
        wait_until(lambda: load.count() > n + 50, 10, what="load after scaling down")
    assert load.failures == [], load.failures[:5]
    assert ready_pids(status(path)) == first
    assert set(three) <= {int(p) for p in load.pids}, "every worker served"
    assert sorted(srv.worker_pids()) == first


def test_reload_rolls_every_worker(server: tuple[Server, str]) -> None:
    srv, path = server
    before = ready_pids(status(path))
    out = ctl(path, "reload").stdout
    assert "rolling restart to generation 2 started" in out

    def rolled() -> bool:
        st = status(path)
        return st["roll"] is None and [r["generation"] for r in st["workers"]] == [2, 2]

    wait_until(rolled, 20, what="generation 2 everywhere")
    after = ready_pids(status(path))
    assert set(after).isdisjoint(before)
    wait_until(lambda: srv.worker_pids() == after, 10, what="old workers gone")
    assert int(srv.get().text) in after


def test_restart_replaces_one_worker(server: tuple[Server, str]) -> None:
    _, path = server
    rows = {r["id"]: r["pid"] for r in status(path)["workers"]}
    assert "restarting worker 2" in ctl(path, "restart", "2").stdout
    wait_until(
        lambda: (
            {r["id"]: r["pid"] for r in status(path)["workers"] if r["state"] == "ready"}.get(2) not in (None, rows[2])
            and len(status(path)["workers"]) == 2
        ),
        15,
        what="worker 2 replaced",
    )
    now = {r["id"]: r["pid"] for r in status(path)["workers"]}
    assert now[1] == rows[1] and now[2] != rows[2]
    bad = ctl(path, "restart", "7", check=False)
    assert bad.returncode == 1 and bad.stderr.startswith("Error: no worker 7; the worker ids are [1, 2]")


def test_stop_is_graceful(server: tuple[Server, str]) -> None:
    srv, path = server
    assert ctl(path, "stop").stdout.strip() == "stopping"
    assert srv.wait_exit(20) == 0
    assert "stopping (ctl stop)" in srv.log()
    assert not os.path.exists(path), "the control socket is removed at exit"


def test_garbage_and_silent_clients_do_not_disturb_the_primary(
    server: tuple[Server, str], request: pytest.FixtureRequest
) -> None:
    srv, path = server
    silent: list[socket.socket] = []
    request.addfinalizer(lambda: [s.close() for s in silent])
    for _ in range(40):  # more than the 32 served at once: the oldest silent ones are pushed out
        s = socket.socket(socket.AF_UNIX)
        silent.append(s)
        s.connect(path)  # blocking: waits while the listen queue is full

    def send(data: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            s.settimeout(5)
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except BrokenPipeError:
                pass  # it stopped reading (a line too long); its answer is there to read
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out

    assert json.loads(send(b"\x00\xff garbage\n"))["ok"] is False
    assert json.loads(send(b"[1, 2]\n"))["error"] == "not a JSON object"
    assert "unknown command" in json.loads(send(b'{"cmd": "explode"}\n'))["error"]
    assert "scale takes a number" in json.loads(send(b'{"cmd": "scale", "workers": "many"}\n'))["error"]
    # A huge line with no newline is cut off at 64 KiB.
    huge = send(b"x" * (300 * 1024))
    assert json.loads(huge)["error"] == "request line over 65536 bytes"
    # Several requests on one connection, the last without its newline.
    answers = send(b'{"cmd": "status"}\n\n{"cmd": "status"}').splitlines()
    assert [json.loads(a)["ok"] for a in answers] == [True, True]

    t0 = time.monotonic()
    assert status(path)["states"]["ready"] == 2
    assert srv.get().status_code == 200
    assert time.monotonic() - t0 < 2

    # The silent clients are disconnected at their deadline (10 s).
    def closed(s: socket.socket) -> bool:
        s.settimeout(0.01)
        try:
            return s.recv(1) == b""
        except (TimeoutError, BlockingIOError):
            return False
        except OSError:
            return True

    wait_until(lambda: all(closed(s) for s in silent), _control.IDLE_TIMEOUT + 5, interval=0.2, what="silent ones cut")
    assert srv.proc.poll() is None
    assert "Traceback" not in srv.log()


def test_ctl_errors_say_what_to_do(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.sock")
    proc = ctl(missing, "status", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"Error: no cluster-server is running at {missing} (no such socket); "
        "`cluster-server ctl ls` lists the running ones"
    )
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # bound, never listening: connection refused
    proc = ctl(str(stale), "status", check=False)
    assert "connection refused" in proc.stderr and proc.stderr.count("\n") == 1


def test_default_socket_path_is_found_without_options(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path], request: pytest.FixtureRequest
) -> None:
    write_app("hello", HELLO_APP)
    runtime = Path(tempfile.mkdtemp(prefix="cs-run-"))  # short: a socket path has at most 107 bytes
    request.addfinalizer(lambda: shutil.rmtree(runtime, ignore_errors=True))
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    (runtime / "cluster-server").mkdir(mode=0o700)
    left = socket.socket(socket.AF_UNIX)
    left.bind(str(runtime / "cluster-server" / "127.0.0.1_2.sock"))  # left by a server that was killed
    left.close()
    srv = start_server("hello:app", env=env).wait_ready()
    expected = runtime / "cluster-server" / f"127.0.0.1_{srv.port}.sock"
    assert sorted(os.listdir(runtime / "cluster-server")) == [expected.name], "a new server cleans up"
    assert expected.exists()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(runtime / "cluster-server" / "127.0.0.1_1.sock"))  # a killed server's leftover
    stale.close()
    assert stat.S_IMODE(os.stat(runtime / "cluster-server").st_mode) == 0o700
    out = subprocess.run(
        [sys.executable, "-m", "cluster_server", "ctl", "status", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["pid"] == srv.pid
    assert sorted(os.listdir(runtime / "cluster-server")) == [expected.name], "the stale one is cleaned up"


# -- the primary's side, with a fake launcher and a fake clock --------------------


def _primary(workers: int = 2) -> tuple[Primary, ClusterWatch, _control.ControlServer, list[float]]:
    clock = [1000.0]
    p = Primary(Config(app="m:app", workers=workers), [], launcher=FakeLauncher(), clock=lambda: clock[0])
    watch = ClusterWatch()
    watch.attach(p)
    control = _control.ControlServer(None, watch)
    control.primary = p
    p.components += [watch]
    return p, watch, control, clock


def test_commands_drive_the_primary() -> None:
    p, watch, control, _ = _primary()
    p.manage_workers()
    for w in list(p.workers.values()):
        p.worker_ready(w)
    watch.tick()
    assert control.handle({"cmd": "status"})["states"]["ready"] == 2
    assert control.handle({"cmd": "scale", "workers": 3}) == {"workers": 3, "before": 2}
    assert len(p.workers) == 3
    r = control.handle({"cmd": "reload"})
    assert r == {"started": True, "queued": False, "generation": 2, "since_generation": 1}
    with pytest.raises(ControlError, match="rolling restart is in progress"):
        control.handle({"cmd": "restart", "id": 1})
    for cmd in ({"cmd": "scale", "workers": 0}, {"cmd": "scale", "workers": True}, {"cmd": "restart", "id": "1"}):
        answer = control.handle_line(json.dumps(cmd).encode())
        assert answer["ok"] is False, cmd
    assert control.handle({"cmd": "stop"}) == {"stopping": True}
    assert control.handle_line(b'{"cmd": "reload"}') == {"ok": False, "error": "the server is stopping"}


def test_backoff_is_a_visible_state() -> None:
    p, _, control, clock = _primary(workers=1)
    p.manage_workers()
    (w,) = p.workers.values()
    p.worker_ready(w)
    clock[0] += 1
    crash = 1 << 8  # exit code 1
    for wait in (0.0, 0.1, None):  # crash: restart at once; crash: 0.1 s backoff; crash: 0.2 s backoff
        (pid,) = p.workers
        p.child_exited(pid, crash)
        p.manage_workers()
        if wait is not None:
            assert bool(p.workers) == (wait == 0.0)
            clock[0] += wait
            p.manage_workers()
    rows = control.handle({"cmd": "status"})["workers"]
    assert [(r["id"], r["state"], r["pid"]) for r in rows] == [(1, "backoff", None)]
    assert rows[0]["restart_in_seconds"] == pytest.approx(0.2) and rows[0]["restarts"] == 3
    assert "backoff 0.2s" in format_status(control.handle({"cmd": "status"}))
    clock[0] += 0.25
    p.manage_workers()
    assert [r["state"] for r in control.handle({"cmd": "status"})["workers"]] == ["booting"]


def test_roll_outcomes_are_counted() -> None:
    p, watch, _, _ = _primary(workers=1)
    p.manage_workers()
    p.worker_ready(next(iter(p.workers.values())))
    events: list[str] = []
    watch.on("roll_started", lambda roll: events.append("started"))
    watch.on("roll_finished", lambda roll, outcome: events.append(outcome))
    p.roll("test")
    watch.tick()
    new = max(p.workers.values(), key=lambda w: w.pid)
    p.worker_ready(new)
    watch.tick()
    p.roll("test again")
    watch.tick()
    failing = max(p.workers.values(), key=lambda w: w.pid)
    p.child_exited(failing.pid, 1 << 8)
    watch.tick()
    assert events == ["started", "completed", "started", "failed"]
    assert dict(watch.rolls) == {"completed": 1, "failed": 1}


def test_socket_names_follow_the_address(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        assert _control.socket_name(s) == f"127.0.0.1_{s.getsockname()[1]}.sock"
    with socket.socket(socket.AF_UNIX) as u:
        u.bind(str(tmp_path / "app.sock"))
        name = _control.socket_name(u)
        assert name.startswith("unix_") and name.endswith(".sock") and "/" not in name
