"""Shared helpers for real-process tests.

Every server a test starts runs in its own session (process group) and is
killed by group id when the test ends, whatever happened. Waits use
``wait_until`` with a deadline, never a bare sleep.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = predicate()
        except Exception:  # a connection refused while starting, say
            result = None
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A cluster-server process started by a test."""

    def __init__(
        self,
        args: list[str],
        cwd: Path,
        env: dict[str, str],
        log: Path,
        port: int | None,
        wrapper: Sequence[str] = (),
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.args, self.cwd, self.log_path, self.port = args, cwd, log, port
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "cluster_server", *args],
            cwd=cwd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=pass_fds,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 15.0, count: int = 1) -> None:
        wait_until(lambda: self.log().count(text) >= count, timeout, what=f"{text!r} x{count} in the log")

    def wait_ready(self, timeout: float = 20.0) -> Server:
        """Wait until every worker is ready (the primary's log says so)."""

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            return "workers ready" in self.log()

        wait_until(ready, timeout, what="workers ready")
        return self

    def get(self, path: str = "/", **kw: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=kw.pop("timeout", 10), **kw)

    def worker_pids(self) -> list[int]:
        """Live children of the primary (its workers), from /proc."""
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.pid)], capture_output=True, text=True)
        return sorted(int(p) for p in out.stdout.split())

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._log.close()


@pytest.fixture
def write_app(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write a module into the test's app dir: ``write_app("myapp", source)``."""

    def write(name: str, source: str) -> Path:
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        return path

    return write


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start ``cluster-server ARGS`` (cwd and --app-dir: the test's tmp dir); killed at the end.

    A free ``--port`` is added unless the args name ``--port``, ``--uds`` or ``--fd``;
    ``pass_fds`` are inherited by the server (for ``--fd``); ``wrapper`` is a
    command to run it under (``["unshare", "--pid", "--fork"]``).
    """
    servers: list[Server] = []

    def start(
        *args: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        wrapper: Sequence[str] = (),
        pass_fds: tuple[int, ...] = (),
    ) -> Server:
        argv = list(args)
        port = None
        if not any(a in argv for a in ("--port", "--uds", "--fd")):
            port = free_port()
            argv += ["--port", str(port)]
        elif "--port" in argv:
            port = int(argv[argv.index("--port") + 1])
        full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)]), **(env or {})}
        if "WEB_CONCURRENCY" not in (env or {}):
            full_env.pop("WEB_CONCURRENCY", None)
        log = tmp_path / f"server-{len(servers)}.log"
        server = Server(argv, cwd or tmp_path, full_env, log, port, wrapper, pass_fds)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


HELLO_APP = """
import os

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(os.getpid()).encode()})
"""


class TLSFiles:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost, as PEM files."""

    def __init__(self, tmp: Path) -> None:
        trustme = pytest.importorskip("trustme", reason="the TLS tests need trustme (pip install -e '.[test]')")
        self.ca = trustme.CA()
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.certfile, self.keyfile, self.ca_certs = tmp / "server.pem", tmp / "server.key", tmp / "ca.pem"
        server.cert_chain_pems[0].write_to_path(str(self.certfile))
        for pem in server.cert_chain_pems[1:]:
            pem.write_to_path(str(self.certfile), append=True)
        server.private_key_pem.write_to_path(str(self.keyfile))
        self.ca.cert_pem.write_to_path(str(self.ca_certs))

    def server_args(self) -> list[str]:
        return ["--ssl-certfile", str(self.certfile), "--ssl-keyfile", str(self.keyfile)]

    def client_context(self) -> Any:
        import ssl

        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


@pytest.fixture
def tls_files(tmp_path: Path) -> TLSFiles:
    """Certificates for a TLS server (skips when trustme is not installed)."""
    return TLSFiles(tmp_path)


def scheduling_policies() -> list[str]:
    """Every value of ``--scheduling`` this build has (just the shared socket where there is no such option)."""
    import typing

    from cluster_server._config import Config, unwrap_optional

    hint = typing.get_type_hints(Config).get("scheduling")
    if hint is None:
        return ["shared"]
    return [str(v) for v in typing.get_args(unwrap_optional(hint)[0]) if v != "auto"]


def scheduling_args(policy: str) -> list[str]:
    """The CLI arguments that select ``policy`` (none where there is no --scheduling option)."""
    return [] if scheduling_policies() == ["shared"] and policy == "shared" else ["--scheduling", policy]
