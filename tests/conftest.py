"""Shared helpers for real-process tests.

Every server a test starts runs in its own session (process group) and is
killed by group id when the test ends, whatever happened. Waits use
``wait_until`` with a deadline, never a bare sleep.
"""

from __future__ import annotations

import contextlib
import inspect
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


def children(pid: int) -> list[int]:
    """Live children of ``pid`` (a primary's workers), from ps."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return sorted(int(p) for p in out.stdout.split())


def titled(primary: int, word: str) -> list[int]:
    """Children of the primary whose process title has ``word`` (worker, template, reload watcher)."""
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(primary)], capture_output=True, text=True)
    return sorted(int(line.split()[0]) for line in out.stdout.splitlines() if f"cluster-server: {word}" in line)


def holds_connection(pids: list[int], client: socket.socket) -> bool:
    """Whether one of ``pids`` holds the server end of ``client``'s TCP connection (from
    /proc/net/tcp*: an accepted connection is a socket inode in that process's fds)."""
    mine, theirs = client.getsockname()[1], client.getpeername()[1]
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            for line in fh.readlines()[1:]:
                f = line.split()
                if int(f[1].rsplit(":", 1)[1], 16) == theirs and int(f[2].rsplit(":", 1)[1], 16) == mine:
                    inodes.add(f"socket:[{f[9]}]")
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                        return True
    return False


def alive(pid: int) -> bool:
    """Is ``pid`` a live process (not gone, not a zombie)?"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def is_open(fd: int) -> bool:
    """Is ``fd`` an open file descriptor of this process?"""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def read_response(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """One whole HTTP/1.1 response (content-length bodies only) from a raw socket, each read
    within ``timeout`` s: head, blank line and body. A close before its end is a ConnectionError."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {head + body!r}")
        body += chunk
    return head + b"\r\n\r\n" + body


def response_headers(response: bytes) -> dict[str, str]:
    """The headers of a raw response, names lowercased."""
    head = response.partition(b"\r\n\r\n")[0].decode()
    lines = head.split("\r\n")
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}


def run_in_session(
    argv: Sequence[str], cwd: Path | None, env: dict[str, str], timeout: float = 30
) -> tuple[int | None, str, str]:
    """Run ``argv`` to its end in its own session: (exit code, stdout, stderr).

    Whatever it started is killed by process group afterwards (a primary that
    exited may have left a worker behind); past ``timeout`` the test fails with
    what it printed.
    """
    proc = subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(
            f"{' '.join(argv)} did not finish in {timeout} s\n--- stdout\n{out}\n--- stderr\n{err}"
        ) from None
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, err


def run_cli(cwd: Path, *args: str, timeout: float = 30, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``cluster-server ARGS`` to its end in its own session; (exit code, stdout, stderr).

    ``env`` replaces the default environment (this one, with ``cwd`` importable
    and no WEB_CONCURRENCY).
    """
    if env is None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(cwd)])}
        env.pop("WEB_CONCURRENCY", None)
    code, out, err = run_in_session([sys.executable, "-m", "cluster_server", *args], cwd, env, timeout)
    assert code is not None
    return code, out, err


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
        """Live children of the primary (its workers)."""
        return children(self.pid)

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_accepted(self, client: socket.socket, timeout: float = 5.0) -> None:
        """Wait until one of the server's processes has accepted ``client``'s connection.

        The listening socket defers accept (``TCP_DEFER_ACCEPT``): a connection that
        has sent nothing reaches ``accept()`` after about a second, not at once."""
        wait_until(lambda: holds_connection([self.pid, *self.worker_pids()], client), timeout, what="accepted")

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


#: How every test app answers the lifespan protocol: the first statements of its ``app``.
LIFESPAN = """\
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
"""


def asgi_app(module: str, body: str) -> str:
    """The source of a test app: ``module`` (imports, constants), then ``async def
    app(scope, receive, send)`` that answers the lifespan protocol and runs ``body``
    (its statements, at any indentation) for every other scope."""
    return (
        f"{textwrap.dedent(module).strip()}\n\n"
        "async def app(scope, receive, send):\n"
        f"{LIFESPAN}{textwrap.indent(textwrap.dedent(body).strip(), '    ')}\n"
    )


#: answers every request with the worker's pid
HELLO_APP = asgi_app(
    "import os",
    """
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(os.getpid()).encode()})
    """,
)


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


@pytest.fixture
def conns() -> Iterator[Any]:
    """``conns(n)``: n fresh fds standing for accepted connections (closed at the end)."""
    made: list[int] = []

    def make(n: int) -> list[int]:
        fds = []
        for _ in range(n):
            r, w = os.pipe()
            made.append(w)
            fds.append(r)
        made.extend(fds)
        return fds

    yield make
    for fd in made:
        try:
            os.close(fd)
        except OSError:
            pass


#: fixtures that start a real server: a test that uses one (directly or through another
#: fixture) is a real-process test, marked ``slow``; ``pytest -m "not slow"`` runs the rest
PROCESS_FIXTURES = frozenset({"start_server"})
#: what a test's own code calls when it starts processes without those fixtures
PROCESS_CALLS = ("run_cli(", "run_program(", "subprocess.", "Popen(", "os.fork(", "_proc.fork(", "mkdocs")


def _starts_processes(item: pytest.Item) -> bool:
    if PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
        return True
    fn = getattr(item, "function", None)
    try:
        source = inspect.getsource(fn) if fn is not None else ""
    except (OSError, TypeError):
        return False
    return any(call in source for call in PROCESS_CALLS)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The two layers: real-process tests are ``slow``, whatever their file says."""
    for item in items:
        if _starts_processes(item):
            item.add_marker(pytest.mark.slow)
