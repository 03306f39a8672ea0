#!/usr/bin/env python3
"""Fault injection: what an operator's bad day does to cluster-server, uvicorn and gunicorn.

    python benchmarks/chaos.py                          # every scenario, every server (~15 min)
    python benchmarks/chaos.py --quick                  # fewer kills and rolls, a 60 s soak
    python benchmarks/chaos.py --scenarios kill,sighup --servers cluster-server
    python benchmarks/chaos.py --soak 300 --json chaos.json

Each scenario starts a server in its own session, puts load on it (bounded Python
clients: keep-alive ones that send their next request as soon as a response is in,
as wrk does, and short ones with a new connection per request), injects a fault,
and reports one row: failed/total requests, the recovery time (what it measures is
in the scenario's docstring and the row's note), and the leftovers, processes of
the server's session still alive after the primary was asked to stop (SIGTERM to
it alone, 20 s) or, for ``kill-primary``, after it was SIGKILLed.

Scenarios (``--scenarios``, default all):

- ``kill``: SIGKILL a worker every 2 s (``--kills``), keep-alive and short load;
- ``sigstop``: SIGSTOP a worker for good, keep-alive load;
- ``kill-primary``: SIGKILL the primary; are its workers gone, does the port still answer?
- ``sighup``: SIGHUP every 3 s (``--rolls``), keep-alive and short load;
- ``slow-wsgi``: two SIGHUPs, a WSGI app whose responses are slow to finish, keep-alive load;
- ``crash-loop``: one slot's new workers fail at import while the others serve;
- ``scale``: SIGTTIN + SIGTTOU pairs (``--pairs``) sent at once, under load;
- ``fd-burst``: ``ulimit -n 256``, 1, 2 and 4 workers, 400 connections at once;
- ``memory``: an app leaking 64 KiB a request, ``--max-worker-memory 100``;
- ``slowloris``: 100 connections sending a request head a byte a second;
- ``garbage``: garbage and nested JSON on the control socket and on an app's channel;
- ``soak``: ``--soak`` seconds (300) of mixed load with recycling (``--max-requests``).

Where a scenario has no counterpart in a peer (cluster-server's control socket, its
channel, its memory limit, the primary's fd budget), only cluster-server runs it.
Only the standard library and httpx are used (bench.py's helpers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench

HOST = bench.HOST
PEERS = ("cluster-server", "uvicorn", "gunicorn")

# -- apps ---------------------------------------------------------------------------------

APPS = {
    # the hello app, plus /leak (keeps 64 KiB per request) and a worker that fails at import
    # while a file named "crash" is in its working directory
    "chaosapp": """
        import os, pathlib
        if pathlib.Path("crash").exists():
            raise RuntimeError("crash loop: the file 'crash' is here")
        HELD = []

        async def app(scope, receive, send):
            if scope["type"] == "lifespan":
                while True:
                    message = await receive()
                    if message["type"] == "lifespan.startup":
                        await send({"type": "lifespan.startup.complete"})
                    else:
                        await send({"type": "lifespan.shutdown.complete"})
                        return
            if scope["type"] != "http":
                return
            if scope["path"].startswith("/leak"):
                HELD.append(bytearray(64 * 1024))
            body = str(os.getpid()).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
    """,
    # WSGI: the head and the first byte go out, the rest 20 ms later
    "slowwsgi": """
        import os, time
        PID = str(os.getpid()).encode()

        def app(environ, start_response):
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(PID)))])
            def body():
                yield PID[:1]
                time.sleep(0.02)
                yield PID[1:]
            return body()
    """,
    # writes a request's body as is onto its channel to the primary (cluster-server only)
    "channelapp": """
        import os
        from cluster_server import cluster

        async def app(scope, receive, send):
            if scope["type"] != "http":
                return
            body = (await receive()).get("body", b"")
            if body:
                try:
                    cluster._endpoint.channel.sock.send(body)
                except OSError:
                    pass
            pid = str(os.getpid()).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", str(len(pid)).encode())]})
            await send({"type": "http.response.body", "body": pid})
    """,
}


def write_apps(directory: Path) -> None:
    for name, source in APPS.items():
        (directory / f"{name}.py").write_text(textwrap.dedent(source).lstrip())


# -- servers ------------------------------------------------------------------------------


def command(server: str, app: str, port: int, workers: int, extra: dict[str, list[str]] | None = None) -> list[str]:
    """The argv of ``server`` serving ``app``; ``extra[server]`` is appended (a peer's own flags)."""
    wsgi = app.startswith("slowwsgi")
    if server == "cluster-server":
        argv = bench.cluster_server_cmd(app, port, workers)
    elif server == "uvicorn":
        argv = bench.uvicorn_cmd(app, port, workers) + (["--interface", "wsgi"] if wsgi else [])
    else:
        argv = bench.gunicorn_cmd(app, port, workers)
        if wsgi:  # gunicorn serves WSGI itself; its gthread worker keeps connections alive
            argv = [*argv[:5], "gthread", "--threads", "4", *argv[6:]]
    return argv + (extra or {}).get(server, [])


@dataclass
class Running:
    server: str
    workers: int
    port: int
    argv: list[str]
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def worker_pids(self) -> list[int]:
        """The server's workers: the primary's children that serve (not a template or watcher)."""
        out = []
        for pid in bench.live_pids(1, self.pid):  # its children (fields[1] is the parent's pid)
            title = bench.process_title(pid)
            if self.server == "cluster-server" and "cluster-server: worker" not in title:
                continue
            if self.server == "uvicorn" and "spawn_main" not in title:
                continue
            out.append(pid)
        return out


def rss_kib(pid: int) -> int:
    try:
        return bench.smaps_rollup(pid).get("Rss", 0)
    except OSError:
        return 0


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


@contextlib.contextmanager
def serve(
    server: str,
    app: str,
    workers: int,
    cwd: Path,
    extra: dict[str, list[str]] | None = None,
    wrapper: tuple[str, ...] = (),
) -> Iterator[Running]:
    """Start ``server`` in its own session, wait until its workers answer; always stop it."""
    port = bench.free_port()
    argv = [*wrapper, *command(server, app, port, workers, extra)]
    log_path = cwd / f"{server}-{port}.log"
    env = bench.server_env()
    env["PYTHONPATH"] = os.pathsep.join([str(cwd), env["PYTHONPATH"]])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = Running(server, workers, port, argv, proc, log_path)
    try:
        if not wait_for(lambda: answers(port) and len(running.worker_pids()) >= workers, 40):
            raise bench.ServerFailed(f"{server} did not start: {running.log()[-800:]}")
        yield running
    finally:
        bench.stop_process_group(proc, grace=2)


def answers(port: int, path: str = "/", timeout: float = 2.0) -> bool:
    try:
        return httpx.get(f"http://{HOST}:{port}{path}", timeout=timeout, headers={"connection": "close"}).is_success
    except httpx.HTTPError:
        return False


def wait_for(predicate: Callable[..., Any], timeout: float, interval: float = 0.05) -> float | None:
    """Seconds until ``predicate()`` was true, or None if it was not within ``timeout``."""
    began = time.monotonic()
    while True:
        with contextlib.suppress(Exception):
            if predicate():
                return time.monotonic() - began
        if time.monotonic() - began >= timeout:
            return None
        time.sleep(interval)


def leftovers(running: Running, grace: float = 20.0) -> int:
    """SIGTERM the primary alone; processes of its session alive ``grace`` s later."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(running.pid, signal.SIGTERM)
    wait_for(lambda: not bench.session_pids(running.pid), grace, interval=0.1)
    with contextlib.suppress(Exception):
        running.proc.wait(0.1)
    return len(bench.session_pids(running.pid))


# -- load ----------------------------------------------------------------------------------


class Load:
    """Bounded client threads: ``keep`` ones keep a connection (next request at once, a new
    connection only after ``Connection: close`` or a failure), ``short`` ones open one per
    request. Any exception, timeout or non-2xx answer is a failed request."""

    def __init__(self, port: int, keep: int = 4, short: int = 0, path: str = "/", max_seconds: float = 900) -> None:
        self.port, self.path = port, path.encode()
        self.ok = self.failed = 0
        self.errors: list[str] = []
        self.deadline = time.monotonic() + max_seconds
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(True,), daemon=True) for _ in range(keep)]
        self._threads += [threading.Thread(target=self._run, args=(False,), daemon=True) for _ in range(short)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    @property
    def total(self) -> int:
        return self.ok + self.failed

    def _run(self, keep: bool) -> None:
        sock: socket.socket | None = None
        request = (
            b"GET "
            + self.path
            + b" HTTP/1.1\r\nHost: chaos\r\n"
            + (b"" if keep else b"Connection: close\r\n")
            + b"\r\n"
        )
        while not self._stop.is_set() and time.monotonic() < self.deadline:
            try:
                if sock is None:
                    sock = socket.create_connection((HOST, self.port), timeout=5)
                sock.sendall(request)
                close = read_response(sock)
                self._count(True)
                if close or not keep:
                    sock.close()
                    sock = None
            except (OSError, ValueError) as exc:
                self._count(False, f"{type(exc).__name__}: {exc}")
                if sock is not None:
                    sock.close()
                sock = None
                time.sleep(0.01)  # a refused connect does not spin
        if sock is not None:
            sock.close()

    def _count(self, ok: bool, error: str = "") -> None:
        with self._lock:
            if ok:
                self.ok += 1
            else:
                self.failed += 1
                if len(self.errors) < 20:
                    self.errors.append(error)

    def wait_requests(self, n: int, timeout: float = 20) -> None:
        seen = self.ok
        wait_for(lambda: self.ok >= seen + n, timeout)


def read_response(sock: socket.socket) -> bool:
    """One response with a Content-Length body; True if it said ``Connection: close``.
    Raises ConnectionError (closed early) or ValueError (not a 2xx)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} bytes")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    status = lines[0].split(b" ")
    if len(status) < 2 or not status[1].startswith(b"2"):
        raise ValueError(lines[0][:80].decode(errors="replace"))
    length = next((int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in a body")
        body += chunk
    return b"connection: close" in lines


# -- results -------------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    server: str
    failed: int | None = None
    total: int | None = None
    recovery_s: float | None = None
    leftovers: int | None = None
    primary_alive: bool | None = None
    note: str = ""
    command: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def cells(self) -> tuple[str, ...]:
        failed = "-" if self.total is None else f"{self.failed}/{self.total}"
        recovery = "-" if self.recovery_s is None else f"{self.recovery_s:.2f} s"
        alive = {None: "-", True: "yes", False: "NO"}[self.primary_alive]
        left = "-" if self.leftovers is None else str(self.leftovers)
        return (self.scenario, self.server, failed, recovery, alive, left, self.note)


def with_load(row: Row, load: Load) -> Row:
    row.failed, row.total, row.errors = load.failed, load.total, load.errors[:5]
    return row


# -- scenarios -----------------------------------------------------------------------------


@dataclass
class Context:
    """What every scenario gets: the options, a directory with the apps, the servers to run."""

    args: argparse.Namespace
    cwd: Path
    servers: list[str]

    def peers(self, *only: str) -> list[str]:
        return [s for s in self.servers if not only or s in only]


def variants(server: str) -> list[tuple[str, dict[str, list[str]]]]:
    """cluster-server under its default policy and round-robin; a peer as it is."""
    if server != "cluster-server":
        return [(server, {})]
    return [("cluster-server", {}), ("cluster-server rr", {"cluster-server": ["--scheduling", "round-robin"]})]


def load_for(port: int, mode: str, threads: int = 4) -> Load:
    return Load(port, keep=threads, short=0) if mode == "keep-alive" else Load(port, keep=0, short=threads)


def finish(row: Row, s: Running) -> Row:
    row.primary_alive = s.alive()
    row.leftovers = leftovers(s)
    row.command = s.argv
    return row


def run_kill(ctx: Context) -> list[Row]:
    """SIGKILL a random worker every ``--kill-interval`` s, ``--kills`` times. Recovery: from
    the last kill until every slot has a worker again and a request succeeds."""
    rows = []
    w = ctx.args.workers
    for mode in ("keep-alive", "short"):
        for server in ctx.peers():
            for name, extra in variants(server):
                row = Row(f"kill x{ctx.args.kills} ({mode})", name)
                with serve(server, "chaosapp:app", w, ctx.cwd, extra) as s:
                    with load_for(s.port, mode) as load:
                        load.wait_requests(50)
                        for i in range(ctx.args.kills):
                            with contextlib.suppress(IndexError, ProcessLookupError):
                                os.kill(random.choice(s.worker_pids()), signal.SIGKILL)
                            if i == ctx.args.kills - 1 or not s.alive():
                                break
                            time.sleep(ctx.args.kill_interval)
                        row.recovery_s = wait_for(lambda s=s: len(s.worker_pids()) >= w and answers(s.port), 30)
                        load.wait_requests(50, timeout=5)
                    rows.append(finish(with_load(row, load), s))
    return rows


def run_sigstop(ctx: Context) -> list[Row]:
    """SIGSTOP one worker for good. Recovery: until it is gone and replaced. Each server
    gets a 5 s hang detection: cluster-server --worker-timeout 5, gunicorn --timeout 5,
    uvicorn its default worker health check (5 s)."""
    rows = []
    extra = {"cluster-server": ["--worker-timeout", "5"], "gunicorn": ["--timeout", "5"]}
    w = ctx.args.workers
    for server in ctx.peers():
        row = Row("sigstop a worker", server)
        with serve(server, "chaosapp:app", w, ctx.cwd, extra) as s:
            with load_for(s.port, "keep-alive") as load:
                load.wait_requests(50)
                victim = s.worker_pids()[0]
                os.kill(victim, signal.SIGSTOP)
                row.recovery_s = wait_for(
                    lambda s=s, v=victim: v not in s.worker_pids() and len(s.worker_pids()) >= w, 45
                )
                if row.recovery_s is None:
                    row.note = "the stopped worker was never replaced (45 s)"
                load.wait_requests(50, timeout=5)
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGCONT)
            rows.append(finish(with_load(row, load), s))
    return rows


def run_kill_primary(ctx: Context) -> list[Row]:
    """SIGKILL the primary under load. Recovery: until its workers are gone (None: some
    still run after ``--orphan-wait`` s); leftovers: its session's processes then."""
    rows = []
    for server in ctx.peers():
        row = Row("kill the primary", server)
        with serve(server, "chaosapp:app", ctx.args.workers, ctx.cwd) as s:
            workers = s.worker_pids()
            with load_for(s.port, "keep-alive", 2) as load:
                load.wait_requests(50)
                os.kill(s.pid, signal.SIGKILL)
                row.recovery_s = wait_for(
                    lambda w=workers: not any(Path(f"/proc/{p}").exists() for p in w), ctx.args.orphan_wait
                )
            row.leftovers = len(bench.session_pids(s.pid))
            row.primary_alive = False
            serving = answers(s.port)
            row.note = "orphans still serve the port" if serving else "port closed"
            row.command = s.argv
        rows.append(row)
    return rows


def new_generation(s: Running, before: set[int], w: int) -> bool:
    now = set(s.worker_pids())
    return len(now) >= w and not now & before


def run_sighup(ctx: Context) -> list[Row]:
    """SIGHUP every 3 s, ``--rolls`` times. Recovery: from the last SIGHUP until every
    worker is a new one."""
    rows = []
    w = ctx.args.workers
    for mode in ("keep-alive", "short"):
        for server in ctx.peers():
            row = Row(f"sighup x{ctx.args.rolls} ({mode})", server)
            with serve(server, "chaosapp:app", w, ctx.cwd) as s:
                with load_for(s.port, mode) as load:
                    load.wait_requests(50)
                    for i in range(ctx.args.rolls):
                        before = set(s.worker_pids())
                        os.kill(s.pid, signal.SIGHUP)
                        if i < ctx.args.rolls - 1:
                            time.sleep(3)
                    row.recovery_s = wait_for(lambda s=s, b=before: new_generation(s, b, w), 60)
                    load.wait_requests(50, timeout=5)
                rows.append(finish(with_load(row, load), s))
    return rows


def run_slow_wsgi(ctx: Context) -> list[Row]:
    """Two SIGHUPs, one after the other is done, with a WSGI app whose responses are slow to
    finish, under keep-alive load. Recovery: the second restart's."""
    rows = []
    w = ctx.args.workers
    for server in ctx.peers():
        row = Row("2 sighups, slow WSGI", server)
        with serve(server, "slowwsgi:app", w, ctx.cwd) as s:
            with Load(s.port, keep=6) as load:
                load.wait_requests(100)
                for _ in range(2):
                    before = set(s.worker_pids())
                    os.kill(s.pid, signal.SIGHUP)
                    row.recovery_s = wait_for(lambda s=s, b=before: new_generation(s, b, w), 60)
                    load.wait_requests(100, timeout=10)
            rows.append(finish(with_load(row, load), s))
    return rows


def run_crash_loop(ctx: Context) -> list[Row]:
    """New workers fail at import (the file ``crash``) after one worker is SIGKILLed; the
    others serve on. Then the file goes. Recovery: from then until every slot serves."""
    rows = []
    w = ctx.args.workers
    crash = ctx.cwd / "crash"
    for server in ctx.peers():
        row = Row("crash loop", server)
        with serve(server, "chaosapp:app", w, ctx.cwd) as s:
            with load_for(s.port, "keep-alive") as load:
                load.wait_requests(50)
                crash.touch()
                try:
                    os.kill(s.worker_pids()[0], signal.SIGKILL)
                    time.sleep(ctx.args.crash_seconds)
                finally:
                    crash.unlink()
                row.recovery_s = wait_for(lambda s=s: s.alive() and len(s.worker_pids()) >= w and answers(s.port), 30)
                load.wait_requests(20, timeout=5)
            restarts = len(re.findall(r"crash loop: the file 'crash' is here", s.log()))
            row.note = f"{restarts} failed imports in {ctx.args.crash_seconds:g} s"
            if not s.alive():
                row.note += f"; exited with {s.proc.returncode}"
            rows.append(finish(with_load(row, load), s))
    return rows


def run_scale(ctx: Context) -> list[Row]:
    """``--pairs`` SIGTTIN + SIGTTOU pairs, each sent at once, 0.2 s apart, under keep-alive
    load. Recovery: from the last pair until the worker count is back."""
    rows = []
    w = 2
    for server in ctx.peers():
        row = Row(f"scale storm x{ctx.args.pairs}", server)
        with serve(server, "chaosapp:app", w, ctx.cwd, {"cluster-server": ["--graceful-timeout", "10"]}) as s:
            with load_for(s.port, "keep-alive") as load:
                load.wait_requests(50)
                for _ in range(ctx.args.pairs):
                    os.kill(s.pid, signal.SIGTTIN)
                    os.kill(s.pid, signal.SIGTTOU)
                    time.sleep(0.2)
                row.recovery_s = wait_for(lambda s=s: len(s.worker_pids()) == w and answers(s.port), 30)
                load.wait_requests(20, timeout=5)
            if server == "cluster-server":
                row.note = f"{s.log().count('did not stop in time')} worker(s) SIGKILLed"
            rows.append(finish(with_load(row, load), s))
    return rows


def burst(port: int, n: int, hold: float) -> int:
    """``n`` connections at once, each sends a request; all closed after ``hold`` s.
    Returns how many got an answer by then."""
    socks: list[socket.socket] = []
    answered = 0
    try:
        for _ in range(n):
            c = socket.socket()
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect((HOST, port))
            socks.append(c)
        time.sleep(0.2)
        for c in socks:
            with contextlib.suppress(OSError):
                c.send(b"GET / HTTP/1.1\r\nHost: chaos\r\n\r\n")
        time.sleep(hold)
        for c in socks:
            with contextlib.suppress(OSError):
                answered += c.recv(16).startswith(b"HTTP/1.1 200")
    finally:
        for c in socks:
            c.close()
    return answered


def run_fd_burst(ctx: Context) -> list[Row]:
    """``ulimit -n 256``, 400 connections at once held 2 s. Recovery: from their close until a
    request succeeds; the note says whether the primary's fds came back to their baseline."""
    rows = []
    wrapper = ("sh", "-c", 'ulimit -n 256 && exec "$@"', "sh")
    for w in (1, 2, 4):
        row = Row(f"burst at ulimit 256, {w}w", "cluster-server")
        with serve("cluster-server", "chaosapp:app", w, ctx.cwd, wrapper=wrapper) as s:
            baseline = fd_count(s.pid)
            answered = burst(s.port, 400, hold=2.0)
            row.recovery_s = wait_for(lambda s=s: answers(s.port, timeout=1), 15)
            back = wait_for(lambda s=s, b=baseline: fd_count(s.pid) <= b, 15)
            row.note = f"{answered}/400 answered in the burst; fds {baseline} -> {fd_count(s.pid)}"
            row.note += " (baseline)" if back is not None else " (NOT back to baseline)"
            rows.append(finish(row, s))
    return rows


def run_memory(ctx: Context) -> list[Row]:
    """A leak of 64 KiB per request, 4 workers, ``--max-worker-memory 100``, load on it for
    ``--memory-seconds``: wrk (-t2 -c16) when it is installed (the faster the leak, the
    harder the test), else the Python keep-alive clients. The note: the largest worker
    seen (sampled every 0.1 s), and how many workers were replaced."""
    limit = 100
    row = Row(f"leak, --max-worker-memory {limit}", "cluster-server")
    extra = {"cluster-server": ["--max-worker-memory", str(limit)]}
    peak = 0
    with serve("cluster-server", "chaosapp:app", 4, ctx.cwd, extra) as s:
        seen = set(s.worker_pids())
        load = MemoryLoad(s.port, ctx.args.memory_seconds)
        while load.running():
            pids = s.worker_pids()
            seen.update(pids)
            peak = max([peak, *(rss_kib(pid) for pid in pids)])
            time.sleep(0.1)
        row.failed, row.total = load.result()
        row.note = f"largest worker {peak / 1024:.0f} MiB; {len(seen) - 4} recycles; load: {load.tool}"
        rows = [finish(row, s)]
    return rows


class MemoryLoad:
    """Load on ``/leak`` for ``seconds``, from wrk in a thread (or the Python clients)."""

    def __init__(self, port: int, seconds: float) -> None:
        self.tool = "wrk -t2 -c16" if shutil.which("wrk") else "python"
        self.end = time.monotonic() + seconds
        self._wrk: bench.LoadResult | None = None
        self._python: Load | None = None
        if self.tool == "python":
            self._python = Load(port, keep=4, path="/leak", max_seconds=seconds).__enter__()
            self._thread = None
        else:
            url = f"http://{HOST}:{port}/leak"
            self._thread = threading.Thread(target=self._run_wrk, args=(url, max(1, round(seconds))), daemon=True)
            self._thread.start()

    def _run_wrk(self, url: str, seconds: int) -> None:
        self._wrk = bench.wrk_load(url, seconds, 16, 2)

    def running(self) -> bool:
        if self._thread is not None:
            return self._thread.is_alive()
        return time.monotonic() < self.end

    def result(self) -> tuple[int | None, int | None]:
        if self._python is not None:
            self._python.__exit__()
            return self._python.failed, self._python.total
        if self._thread is not None:
            self._thread.join(60)
        return (self._wrk.errors, self._wrk.requests) if self._wrk is not None else (None, None)


def slowloris(port: int, n: int, seconds: float) -> tuple[int, int]:
    """``n`` connections sending a request head a byte a second for ``seconds``:
    (still open at the end, answered 408 meanwhile)."""
    socks: list[socket.socket] = []
    answered = 0
    for _ in range(n):
        with contextlib.suppress(OSError):
            c = socket.create_connection((HOST, port), timeout=5)
            c.sendall(b"GET / HTTP/1.1\r\nHost: chaos\r\n")
            c.setblocking(False)
            socks.append(c)
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end and socks:
            time.sleep(1)
            for c in list(socks):
                try:
                    data = c.recv(64)
                except BlockingIOError:
                    data = None
                except OSError:
                    data = b""
                if data is not None:  # an answer (408) or a close: the server let it go
                    answered += data.startswith(b"HTTP/1.1 408")
                    socks.remove(c)
                    c.close()
                    continue
                with contextlib.suppress(OSError):
                    c.send(b"x")
        return len(socks), answered
    finally:
        for c in socks:
            c.close()


def run_slowloris(ctx: Context) -> list[Row]:
    """100 slowloris connections for ``--slowloris-seconds`` (25) while keep-alive load runs.
    The note: how many still hold a connection at the end."""
    rows = []
    for server in ctx.peers():
        row = Row("slowloris x100", server)
        with serve(server, "chaosapp:app", 2, ctx.cwd) as s:
            with load_for(s.port, "keep-alive", 2) as load:
                load.wait_requests(20)
                still, got_408 = slowloris(s.port, 100, ctx.args.slowloris_seconds)
            row.note = f"{still}/100 still held after {ctx.args.slowloris_seconds:g} s; {got_408} answered 408"
            rows.append(finish(with_load(row, load), s))
    return rows


def garbage_lines(rng: random.Random) -> list[bytes]:
    lines = [b"[" * 60_000, b"{" * 100_000, b"\xff\xfe" * 40, b'{"cmd": "scale", "workers": -1}', b"[]", b"null"]
    lines += [rng.randbytes(rng.randint(1, 200)).replace(b"\n", b"") for _ in range(50)]
    return lines


def run_garbage(ctx: Context) -> list[Row]:
    """Garbage and nested JSON on the control socket and on an app's channel, under keep-alive
    load. The note: what the primary logged as refused or dropped."""
    from cluster_server.ops import control

    rng = random.Random(13)
    path = str(ctx.cwd / "ctl.sock")
    row = Row("garbage + nested JSON", "cluster-server")
    with serve("cluster-server", "channelapp:app", 2, ctx.cwd, {"cluster-server": ["--control-socket", path]}) as s:
        with load_for(s.port, "keep-alive", 2) as load:
            load.wait_requests(20)
            lines = garbage_lines(rng)
            with httpx.Client(timeout=10) as client:
                for line in lines:  # onto a worker's channel
                    client.post(f"http://{HOST}:{s.port}/", content=line)
            for line in lines:  # the control socket
                with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as c:
                    c.settimeout(5)
                    c.connect(path)
                    c.sendall(line + b"\n")
                    c.recv(4096)
            ok = control.request(path, {"cmd": "status"}, timeout=5)["states"]["ready"] == 2
            load.wait_requests(20, timeout=5)
        text = s.log()
        row.note = (
            f"{text.count('dropped a message')} channel messages dropped, "
            f"{text.count('refused a request nested too deeply')} nested control requests refused; "
            f"status {'answers' if ok else 'FAILED'}"
        )
        rows = [finish(with_load(row, load), s)]
    return rows


def soak_extra(max_requests: int) -> dict[str, list[str]]:
    n, jitter = str(max_requests), str(max_requests // 10)
    return {
        "cluster-server": ["--max-requests", n, "--max-requests-jitter", jitter],
        "gunicorn": ["--max-requests", n, "--max-requests-jitter", jitter],
        "uvicorn": ["--limit-max-requests", n],
    }


def run_soak(ctx: Context) -> list[Row]:
    """``--soak`` seconds of keep-alive and short load, workers recycled every
    ``--max-requests`` (cluster-server and gunicorn with 10% jitter, uvicorn's
    --limit-max-requests). The note: worker replacements seen, the primary's RSS and fds."""
    rows = []
    w = ctx.args.workers
    for server in ctx.peers():
        row = Row(f"soak {ctx.args.soak:g} s, recycling", server)
        with serve(server, "chaosapp:app", w, ctx.cwd, soak_extra(ctx.args.max_requests)) as s:
            seen: set[int] = set(s.worker_pids())
            rss0, fds0 = rss_kib(s.pid), fd_count(s.pid)
            with Load(s.port, keep=4, short=2) as load:
                end = time.monotonic() + ctx.args.soak
                while time.monotonic() < end and s.alive():
                    seen.update(s.worker_pids())
                    time.sleep(0.2)
            row.note = (
                f"{len(seen) - w} workers replaced; primary RSS {rss0 / 1024:.0f} -> {rss_kib(s.pid) / 1024:.0f} MiB, "
                f"fds {fds0} -> {fd_count(s.pid)}"
            )
            rows.append(finish(with_load(row, load), s))
    return rows


SCENARIOS: dict[str, Callable[[Context], list[Row]]] = {
    "kill": run_kill,
    "sigstop": run_sigstop,
    "kill-primary": run_kill_primary,
    "sighup": run_sighup,
    "slow-wsgi": run_slow_wsgi,
    "crash-loop": run_crash_loop,
    "scale": run_scale,
    "fd-burst": run_fd_burst,
    "memory": run_memory,
    "slowloris": run_slowloris,
    "garbage": run_garbage,
    "soak": run_soak,
}


# -- the command line ------------------------------------------------------------------------


def names(choices: list[str] | tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        picked = [x.strip() for x in text.split(",") if x.strip()]
        unknown = [x for x in picked if x not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; pick from {', '.join(choices)}")
        return picked

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--scenarios", type=names(list(SCENARIOS)), default=list(SCENARIOS), help="comma-separated (all)")
    p.add_argument("--servers", type=names(PEERS), default=list(PEERS), help="comma-separated (all)")
    p.add_argument("--quick", action="store_true", help="10 kills, 4 rolls, 10 scale pairs, a 60 s soak")
    p.add_argument("--workers", type=int, default=4, help="workers per server (4)")
    p.add_argument("--kills", type=int, default=50, help="worker SIGKILLs per run (50)")
    p.add_argument("--kill-interval", type=float, default=2.0, help="seconds between kills (2)")
    p.add_argument("--rolls", type=int, default=9, help="SIGHUPs, 3 s apart (9)")
    p.add_argument("--pairs", type=int, default=30, help="SIGTTIN+SIGTTOU pairs (30)")
    p.add_argument("--crash-seconds", type=float, default=15.0, help="how long the crash loop lasts (15)")
    p.add_argument("--orphan-wait", type=float, default=15.0, help="how long to watch for orphans (15)")
    p.add_argument("--memory-seconds", type=float, default=30.0, help="how long the leak runs (30)")
    p.add_argument("--slowloris-seconds", type=float, default=25.0, help="how long slowloris runs (25)")
    p.add_argument("--soak", type=float, default=300.0, help="soak length in seconds (300)")
    p.add_argument("--max-requests", type=int, default=2000, help="recycle after this many requests in the soak")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the rows here")
    return p


def print_rows(rows: list[Row]) -> None:
    header = ("scenario", "server", "failed/total", "recovery", "primary alive", "leftovers", "note")
    bench.print_columns([header, *(r.cells() for r in rows)], left=2)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.kills, args.rolls, args.pairs = min(args.kills, 10), min(args.rolls, 4), min(args.pairs, 10)
        args.soak = min(args.soak, 60.0)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, bench._exit_on_signal)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        cwd = Path(tmp)
        os.chmod(cwd, 0o755)
        write_apps(cwd)
        ctx = Context(args, cwd, args.servers)
        for name in args.scenarios:
            bench.log(f"chaos: {name} ...")
            began = time.monotonic()
            try:
                got = SCENARIOS[name](ctx)
            except (bench.ServerFailed, bench.Unavailable) as exc:
                got = [Row(name, "?", note=f"error: {exc}"[:300])]
            for r in got:
                bench.log(f"  {' | '.join(r.cells())}")
            bench.log(f"chaos: {name} took {time.monotonic() - began:.0f} s")
            rows += got
    print_rows(rows)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0 if all(r.primary_alive is not False or r.scenario == "kill the primary" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
