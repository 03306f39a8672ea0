"""systemd: socket activation (LISTEN_FDS) and sd_notify (NOTIFY_SOCKET), as systemd would do them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from cluster_server.ops import systemd as _systemd
from cluster_server.primary import sockets as _sockets

from ..conftest import HELLO_APP, ROOT, Server, asgi_app

ENV_APP = asgi_app(
    "import json, os",
    """
    body = {k: os.environ.get(k) for k in ("LISTEN_FDS", "LISTEN_PID", "CLUSTER_SERVER_INHERIT")}
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})
    """,
)


class ActivatedServer(Server):
    """A server started the way systemd starts a socket-activated service:
    the listening socket at fd 3, LISTEN_FDS=1, LISTEN_PID = the server's own pid."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], log: Path, sock: socket.socket) -> None:
        self.args, self.cwd, self.log_path, self.port = args, cwd, log, sock.getsockname()[1]
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        fd = sock.fileno()
        # What systemd does between fork and exec: the socket to fd 3, then the variables.
        shim = (
            "import os, sys\n"
            f"os.dup2({fd}, 3)\n"
            f"os.close({fd})\n"
            "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()))\n"
            "os.execv(sys.executable, [sys.executable, '-m', 'cluster_server', *sys.argv[1:]])\n"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", shim, *args],
            cwd=cwd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=(fd,),
        )


def receive_until(notify: socket.socket, wanted: str, srv: Server, timeout: float = 20.0) -> list[str]:
    """Datagrams received until one has the line ``wanted``."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while wanted not in (line for msg in got for line in msg.split("\n")):
        notify.settimeout(0.2)
        try:
            got.append(notify.recv(4096).decode())
        except TimeoutError:
            if time.monotonic() > deadline or srv.proc.poll() is not None:
                raise AssertionError(f"no {wanted!r}; got {got}; log:\n{srv.log()}") from None
    return got


def test_socket_activation_and_notify(write_app: Callable[[str, str], Path], tmp_path: Path) -> None:
    write_app("envapp", ENV_APP)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = str(tmp_path / "notify")
    notify.bind(notify_path)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)]),
        "NOTIFY_SOCKET": notify_path,
    }
    env.pop("WEB_CONCURRENCY", None)
    # --port is ignored when systemd passes a socket: nothing is bound on port 1.
    args = ["envapp:app", "--workers", "2", "--port", "1", "--no-control-socket"]
    srv = ActivatedServer(args, tmp_path, env, tmp_path / "server.log", listener)
    try:
        listener.close()  # the server has its own copy at fd 3
        got = receive_until(notify, "READY=1", srv)
        assert any(line.startswith("STATUS=2/2 workers ready") for msg in got for line in msg.split("\n")), got
        assert f"serving fd 3 (http://127.0.0.1:{srv.port}, from systemd)" in srv.log()
        body = srv.get().json()
        assert body == {"LISTEN_FDS": None, "LISTEN_PID": None, "CLUSTER_SERVER_INHERIT": None}

        srv.signal(signal.SIGHUP)  # a rolling restart: RELOADING=1, then READY=1
        got = receive_until(notify, "READY=1", srv)
        reloading = [msg for msg in got if "RELOADING=1" in msg.split("\n")]
        assert reloading and "MONOTONIC_USEC=" in reloading[0], got
        assert srv.get().status_code == 200

        srv.signal(signal.SIGTERM)
        receive_until(notify, "STOPPING=1", srv)
        assert srv.wait_exit(20) == 0
    finally:
        srv.stop()
        notify.close()


def test_notify_to_an_abstract_socket(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path]
) -> None:
    write_app("hello", HELLO_APP)
    name = f"cs-test-{uuid.uuid4().hex}"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind("\0" + name)
    try:
        srv = start_server("hello:app", "--no-control-socket", env={"NOTIFY_SOCKET": "@" + name})
        receive_until(notify, "READY=1", srv)
        srv.wait_ready()
        assert httpx.get(srv.url, timeout=5).status_code == 200
    finally:
        notify.close()


def test_listen_fds_is_for_our_pid_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    assert _sockets.listen_fds() == []
    assert "LISTEN_FDS" not in os.environ and "LISTEN_PID" not in os.environ
    monkeypatch.setenv("LISTEN_FDS", "0")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    assert _sockets.listen_fds() == []


def test_notify_address() -> None:
    assert _systemd.notify_address("@abc") == "\0abc"
    assert _systemd.notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert _systemd.notify_address("") is None
    assert _systemd.notify_address("vsock:2:1234") is None
