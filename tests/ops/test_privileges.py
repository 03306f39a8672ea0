"""``--user`` / ``--group`` / ``--umask`` / ``--pidfile``, with real processes."""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cluster_server import ConfigError
from cluster_server.ops.privileges import parse_umask, resolve

from ..conftest import HELLO_APP, Server, asgi_app

PRIV_APP = asgi_app(
    """
    import json, os

    SECRET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "secret")
    """,
    """
    try:
        with open(SECRET) as fh:
            secret = fh.read()
    except PermissionError:
        secret = None
    body = {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(), "secret": secret}
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})
    """,
)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory the user nobody may enter (pytest's tmp dirs are root-only)."""
    d = Path(tempfile.mkdtemp(prefix="cs-priv-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def free_low_port() -> int:
    ports = list(range(600, 1024))
    random.shuffle(ports)
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024")


def _uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise AssertionError("no Uid line")


def test_workers_drop_to_nobody_while_the_primary_binds_a_low_port(
    start_server: Callable[..., Server], public_dir: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    nobody = pwd.getpwnam("nobody")
    (public_dir / "privapp.py").write_text(PRIV_APP)
    secret = public_dir / "secret"
    secret.write_text("root only")
    os.chmod(secret, 0o600)
    pidfile = public_dir / "primary.pid"
    port = free_low_port()
    srv = start_server(
        "privapp:app",
        "--user",
        "nobody",
        "--port",
        str(port),
        "--workers",
        "2",
        "--app-dir",
        str(public_dir),
        "--pidfile",
        str(pidfile),
        "--no-control-socket",
        cwd=public_dir,
    ).wait_ready()
    body = srv.get().json()
    assert body["uid"] == body["euid"] == nobody.pw_uid
    assert body["gid"] == nobody.pw_gid
    assert set(body["groups"]) <= set(os.getgrouplist("nobody", nobody.pw_gid))
    assert 0 not in body["groups"]
    assert body["secret"] is None  # the root-only file is out of the app's reach
    assert _uid_of(srv.pid) == 0  # the primary stays root (it bound port < 1024)
    assert [_uid_of(p) for p in srv.worker_pids()] == [nobody.pw_uid] * 2
    assert pidfile.read_text().strip() == str(srv.pid)

    srv.signal(signal.SIGTERM)
    assert srv.wait_exit(20) == 0
    assert not pidfile.exists(), "the pidfile is removed at exit"


def test_umask_applies_to_the_files_the_server_creates(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path], tmp_path: Path
) -> None:
    write_app("hello", HELLO_APP)
    uds = tmp_path / "app.sock"
    srv = start_server("hello:app", "--uds", str(uds), "--umask", "077", "--no-control-socket").wait_ready()
    assert stat.S_IMODE(os.stat(uds).st_mode) == 0o700
    srv.stop()
    uds2 = tmp_path / "app2.sock"
    srv = start_server("hello:app", "--uds", str(uds2), "--umask", "002", "--no-control-socket").wait_ready()
    assert stat.S_IMODE(os.stat(uds2).st_mode) == 0o775


def test_bad_user_group_umask_are_one_line_errors(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path]
) -> None:
    write_app("hello", HELLO_APP)
    for args, message in (
        (
            ("--user", "no-such-user-here"),
            "Error: --user no-such-user-here: no such user; check the name or give a uid",
        ),
        (("--group", "no-such-group-here"), "Error: --group no-such-group-here: no such group"),
        (("--umask", "999"), "Error: --umask '999' is not an octal number (e.g. 022)"),
    ):
        srv = start_server("hello:app", *args)
        assert srv.wait_exit(20) == 2
        assert message in srv.log(), srv.log()


def test_parse_umask_and_resolve() -> None:
    assert parse_umask("022") == 0o022
    assert parse_umask("0o077") == 0o077
    assert parse_umask(None) is None
    with pytest.raises(ConfigError):
        parse_umask("1000")
    assert resolve(None, None) is None
    creds = resolve("nobody", None)
    assert creds is not None and creds.uid == pwd.getpwnam("nobody").pw_uid
    assert creds.gid in creds.groups
    numeric = resolve(str(creds.uid), "0")
    assert numeric is not None and numeric.gid == 0
