#!/usr/bin/env python3
"""Reproducible side-by-side benchmarks: cluster-server against its peers.

    python benchmarks/bench.py throughput                      # all servers, 2 workers
    python benchmarks/bench.py throughput --workers 1,2,4 --duration 10 --json out.json
    python benchmarks/bench.py throughput --servers uvicorn,granian

Servers compared (each skipped with a note when it is not installed):

- ``cluster-server``  ``python -m cluster_server APP --workers N``
- ``uvicorn``         ``uvicorn APP --workers N``  (the baseline of the ratio column)
- ``gunicorn``        ``gunicorn APP -k UvicornWorker -w N``
- ``granian``         ``granian --interface asgi APP --workers N``

Every server gets the same app, worker count, event loop and HTTP parser (uvloop and
httptools when installed), access log off, and a fresh free port on 127.0.0.1. It runs in
its own session; it is stopped by killing its process group, whatever happens.

Load comes from ``wrk`` when it is on PATH, otherwise from a bounded Python keep-alive
loop (much slower: the client becomes the bottleneck, and the output says so).

Scenarios are subcommands. To add one (``spread``, ``restart``, ``reload``...), write an
``add_<name>_args(parser)`` and a ``scenario_<name>(args) -> list[Row]`` that uses
``run_server``, ``run_load`` and ``probe_pids`` (or ``measure_under_load``, which does
all of one measurement), prints its table (``print_table``) and returns its rows;
register it in ``SCENARIOS``. ``main`` handles ``--json`` and the exit status (1 when
any row is an error).
Only the standard library and httpx are used.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import http.client
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
DEFAULT_APP = "benchmarks.hello:app"
BASELINE = "uvicorn"
PY = sys.executable


# --------------------------------------------------------------------------- errors


class Unavailable(Exception):
    """The server is not installed here: the row is skipped, not failed."""


class ServerFailed(Exception):
    """The server exited, or never answered within its deadline."""


class LoadFailed(Exception):
    """The load generator itself failed or overran its deadline."""


# --------------------------------------------------------------------------- servers


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("WEB_CONCURRENCY", None)  # uvicorn and gunicorn read it
    return env


@functools.cache
def importable(module: str) -> bool:
    """Whether the servers' interpreter can import ``module`` (checked in a subprocess)."""
    try:
        proc = subprocess.run(
            [PY, "-c", f"import {module}"],
            cwd=ROOT,
            env=server_env(),
            capture_output=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def require(module: str, hint: str) -> None:
    if not importable(module):
        raise Unavailable(f"cannot import {module} ({hint})")


def uvicorn_style_fast_flags() -> list[str]:
    flags = []
    if importable("uvloop"):
        flags += ["--loop", "uvloop"]
    if importable("httptools"):
        flags += ["--http", "httptools"]
    return flags


def cluster_server_cmd(app: str, port: int, workers: int, policy: str | None = None) -> list[str]:
    require("cluster_server", "pip install -e .")
    return [
        *(PY, "-m", "cluster_server", app),
        *("--workers", str(workers), "--host", HOST, "--port", str(port)),
        *(("--scheduling", policy) if policy else ()),
        *uvicorn_style_fast_flags(),
        *("--log-level", "warning", "--no-access-log"),
    ]


def uvicorn_cmd(app: str, port: int, workers: int) -> list[str]:
    require("uvicorn", "pip install uvicorn")
    return [
        *(PY, "-m", "uvicorn", app),
        *("--workers", str(workers), "--host", HOST, "--port", str(port)),
        *uvicorn_style_fast_flags(),
        *("--log-level", "warning", "--no-access-log"),
    ]


def gunicorn_worker_class() -> str:
    # uvicorn's own uvicorn.workers is deprecated in favour of the uvicorn-worker package.
    for module, cls in (("uvicorn_worker", "UvicornWorker"), ("uvicorn.workers", "UvicornWorker")):
        if importable(module):
            return f"{module}.{cls}"
    raise Unavailable("no UvicornWorker importable (pip install uvicorn-worker)")


def gunicorn_cmd(app: str, port: int, workers: int) -> list[str]:
    require("gunicorn", "pip install gunicorn")
    # UvicornWorker uses loop="auto", http="auto": uvloop and httptools when installed.
    # Gunicorn's access log is off unless --access-logfile is given. Its keep-alive
    # default is 2 s; use uvicorn's 5 s so keep-alive behaves the same everywhere.
    return [
        *(PY, "-m", "gunicorn", app, "-k", gunicorn_worker_class()),
        *("--workers", str(workers), "--bind", f"{HOST}:{port}"),
        *("--keep-alive", "5", "--log-level", "warning"),
    ]


def granian_cmd(app: str, port: int, workers: int) -> list[str]:
    require("granian", "pip install granian")
    loop = ["--loop", "uvloop"] if importable("uvloop") else []
    return [
        *(PY, "-m", "granian", "--interface", "asgi", "--http", "1"),
        *("--workers", str(workers), "--host", HOST, "--port", str(port)),
        *loop,
        *("--log-level", "warning", "--no-access-log", app),
    ]


@dataclass(frozen=True)
class ServerSpec:
    name: str
    command: Callable[[str, int, int], list[str]]  # (app, port, workers) -> argv


SERVERS: dict[str, ServerSpec] = {
    spec.name: spec
    for spec in (
        ServerSpec("cluster-server", cluster_server_cmd),
        ServerSpec("uvicorn", uvicorn_cmd),
        ServerSpec("gunicorn", gunicorn_cmd),
        ServerSpec("granian", granian_cmd),
    )
}


#: cluster-server's --scheduling policies; ``cluster-server:POLICY`` names one in --servers
POLICIES = ("shared", "round-robin", "least-busy", "reuseport")


def server_spec(name: str) -> ServerSpec:
    """``SERVERS[name]``, or ``cluster-server:POLICY`` for cluster-server with ``--scheduling POLICY``."""
    if name in SERVERS:
        return SERVERS[name]
    base, _, policy = name.partition(":")
    if base != "cluster-server" or policy not in POLICIES:
        raise KeyError(name)
    return ServerSpec(name, functools.partial(cluster_server_cmd, policy=policy))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class RunningServer:
    name: str
    workers: int
    port: int
    command: list[str]
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise ServerFailed(self.explain(f"exited with code {code} under load"))

    def explain(self, message: str) -> str:
        tail = self.log_tail()
        return f"{message}; output:\n{tail}" if tail else message


def wait_ready(server: RunningServer, timeout: float) -> None:
    """Poll ``/pid`` (a new connection each time) until it answers 200, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        if (code := server.proc.poll()) is not None:
            raise ServerFailed(f"exited with code {code} before answering")
        try:
            if httpx.get(server.url + "/pid", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() >= deadline:
            raise ServerFailed(f"did not answer within {timeout:g}s")
        time.sleep(0.05)


def _get_pid(url: str) -> str | None:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or HOST, parts.port, timeout=2)
    try:
        conn.request("GET", "/pid", headers={"x-pid": "1", "Connection": "close"})
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace").strip()
        return body if resp.status == 200 else None
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def probe_pids(url: str, expected: int, timeout: float, concurrency: int = 16) -> set[str]:
    """Send rounds of concurrent one-shot ``/pid`` requests until ``expected`` distinct pids
    answered or ``timeout`` passed; returns the pids seen (works for any app that serves
    ``/pid`` with the pid as its body, or as ``{"pid": ...}``)."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        while len(seen) < expected and time.monotonic() < deadline:
            for body in pool.map(_get_pid, [url] * concurrency):
                if body is None:
                    continue
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    body = str(json.loads(body).get("pid", body)) if body.startswith("{") else body
                seen.add(body)
    return seen


def stop_process_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the whole process group, wait up to ``grace`` s, then SIGKILL whatever is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    # Always: a leader that exited may have left workers behind in its group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


@contextlib.contextmanager
def run_server(
    spec: ServerSpec, app: str, workers: int, start_timeout: float, cwd: Path = ROOT
) -> Iterator[RunningServer]:
    """Start ``spec`` in its own session on a free port, yield once it answers, always stop it.

    Raises Unavailable (not installed) or ServerFailed (exited / no answer in time); the
    ServerFailed message carries the tail of the server's output.
    """
    port = free_port()
    command = spec.command(app, port, workers)
    fd, log_name = tempfile.mkstemp(prefix=f"bench-{spec.name}-", suffix=".log")
    log_path = Path(log_name)
    try:
        with os.fdopen(fd, "wb") as log:
            proc = subprocess.Popen(
                command,
                cwd=cwd,
                env=server_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = RunningServer(spec.name, workers, port, command, proc, log_path)
        try:
            try:
                wait_ready(server, start_timeout)
            except ServerFailed as exc:
                stop_process_group(proc, grace=2)
                raise ServerFailed(server.explain(str(exc))) from None
            yield server
        finally:
            stop_process_group(proc)
    finally:
        log_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- load


@dataclass
class LoadResult:
    tool: str  # "wrk" or "python"
    requests: int
    duration_s: float
    requests_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    non_2xx: int  # responses outside 2xx/3xx
    socket_errors: dict[str, int] = field(default_factory=dict)  # connect/read/write/timeout
    raw: str = ""
    p90_ms: float | None = None

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _to_ms(value: str, unit: str) -> float:
    return float(value) * _UNIT_MS[unit]


def parse_wrk(output: str) -> LoadResult:
    """Parse ``wrk --latency`` output."""
    percentiles = {
        int(m[1]): _to_ms(m[2], m[3]) for m in re.finditer(r"^\s*(\d+)%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.M)
    }
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not (total and rps):
        raise LoadFailed(f"cannot parse wrk output:\n{output}")
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return LoadResult(
        tool="wrk",
        requests=int(total[1]),
        duration_s=_to_ms(total[2], total[3]) / 1e3,
        requests_per_s=float(rps[1]),
        p50_ms=percentiles.get(50),
        p99_ms=percentiles.get(99),
        p90_ms=percentiles.get(90),
        non_2xx=int(non2xx[1]) if non2xx else 0,
        socket_errors=dict(
            zip(
                ("connect", "read", "write", "timeout"),
                map(int, sock.groups() if sock else (0, 0, 0, 0)),
                strict=True,
            )
        ),
        raw=output,
    )


def wrk_command(url: str, duration: int, connections: int, threads: int, *extra: str) -> list[str]:
    """``wrk --latency --timeout 5s`` on ``GET url/``; ``extra`` goes before the URL."""
    wrk = shutil.which("wrk")
    assert wrk is not None
    cmd = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "5s"]
    return [*cmd, *extra, url + "/"]


def wrk_result(returncode: int, stdout: str, stderr: str, tool: str = "wrk") -> LoadResult:
    if returncode != 0:
        raise LoadFailed(f"{tool} exited with {returncode}: {stderr.strip()}")
    return parse_wrk(stdout)


def run_wrk(cmd: list[str], duration: int, slack: int = 30) -> LoadResult:
    """Run wrk or wrk2 (``cmd``) for its ``duration`` s, ``slack`` s more at the most; its parsed output."""
    tool = Path(cmd[0]).name
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + slack)
    except subprocess.TimeoutExpired:
        raise LoadFailed(f"{tool} overran its {duration + slack}s deadline") from None
    return wrk_result(proc.returncode, proc.stdout, proc.stderr, tool)


def wrk_load(url: str, duration: int, connections: int, threads: int, *extra: str) -> LoadResult:
    return run_wrk(wrk_command(url, duration, connections, threads, *extra), duration)


def wrk2_load(wrk2: str, url: str, duration: int, connections: int, threads: int, rate: int, *extra: str) -> LoadResult:
    """wrk2 (open loop) offering ``rate`` requests/s to ``GET url/``; ``extra`` goes before the URL."""
    cmd = [wrk2, f"-t{threads}", f"-c{connections}", f"-d{duration}s", f"-R{rate}", *extra, url + "/"]
    return run_wrk(cmd, duration, slack=60)


def wrk2_path(explicit: str | None = None) -> str | None:
    """wrk2: ``explicit`` (--wrk2), ``$WRK2``, on PATH, or a ``shared/tools/wrk2`` next to the checkout or above it."""
    found = explicit or os.environ.get("WRK2") or shutil.which("wrk2")
    if found:
        return found
    for base in (ROOT.parent, ROOT.parent.parent):
        shared = base / "shared" / "tools" / "wrk2"
        if shared.exists():
            return str(shared)
    return None


def run_clients(client: Callable[[int], None], connections: int, stop_at: float) -> None:
    """Run ``client(0)`` .. ``client(connections - 1)`` in threads until they return (about ``stop_at``)."""
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:  # every request has a 5 s socket timeout: bounded
        t.join(timeout=max(0.0, stop_at - time.monotonic()) + 10)
    if any(t.is_alive() for t in threads):
        raise LoadFailed("python load threads did not finish in time")


def percentile_ms(sorted_latencies: list[float], p: float) -> float | None:
    """The ``p`` quantile (0..1) of latencies in seconds, in milliseconds; None when there are none."""
    if not sorted_latencies:
        return None
    return sorted_latencies[min(len(sorted_latencies) - 1, int(len(sorted_latencies) * p))] * 1e3


def python_load(url: str, duration: float, connections: int) -> LoadResult:
    """Fallback when wrk is missing: ``connections`` threads, each one keep-alive
    http.client connection, hammering ``GET /`` for ``duration`` seconds."""
    parts = urlsplit(url)
    host, port = parts.hostname or HOST, parts.port
    start = time.monotonic()
    stop_at = start + duration
    lock = threading.Lock()
    latencies: list[float] = []
    counts = {"ok": 0, "non_2xx": 0, "errors": 0}

    def client(_slot: int) -> None:
        conn: http.client.HTTPConnection | None = None
        mine: list[float] = []
        ok = bad = errors = 0
        while time.monotonic() < stop_at:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=5)
            t0 = time.perf_counter()
            try:
                conn.request("GET", "/")
                resp = conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException):
                errors += 1
                conn.close()
                conn = None
                time.sleep(0.01)  # do not spin on a dead server
                continue
            mine.append(time.perf_counter() - t0)
            if 200 <= resp.status < 400:
                ok += 1
            else:
                bad += 1
            if resp.will_close:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()
        with lock:
            latencies.extend(mine)
            counts["ok"] += ok
            counts["non_2xx"] += bad
            counts["errors"] += errors

    run_clients(client, connections, stop_at)
    elapsed = time.monotonic() - start
    latencies.sort()
    done = counts["ok"] + counts["non_2xx"]
    return LoadResult(
        tool="python",
        requests=done,
        duration_s=elapsed,
        requests_per_s=done / elapsed,
        p50_ms=percentile_ms(latencies, 0.50),
        p99_ms=percentile_ms(latencies, 0.99),
        non_2xx=counts["non_2xx"],
        socket_errors={"errors": counts["errors"]},
    )


def load_tool(choice: str) -> tuple[str, str]:
    """The load generator to use, and why."""
    if choice == "auto":
        return ("wrk", "found on PATH") if shutil.which("wrk") else ("python", "wrk not found")
    if choice == "wrk" and not shutil.which("wrk"):
        sys.exit("bench: --load-tool wrk but wrk is not on PATH")
    return choice, f"--load-tool {choice}"


def run_load(url: str, tool: str, duration: int, connections: int, threads: int) -> LoadResult:
    if tool == "wrk":
        return wrk_load(url, duration, connections, threads)
    return python_load(url, duration, connections)


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    scenario: str
    server: str
    workers: int
    status: str = "ok"  # ok | error | skipped
    note: str = ""
    command: list[str] = field(default_factory=list)
    pids_seen: int | None = None
    load: LoadResult | None = None
    ratio: float | None = None  # req/s relative to BASELINE with the same worker count
    per_worker: list[int] | None = None  # spread: requests per worker, busiest first (charts.py)
    details: dict[str, Any] = field(default_factory=dict)  # scenario-specific results


def fill_ratios(rows: list[Row]) -> None:
    base = {
        r.workers: r.load.requests_per_s
        for r in rows
        if r.server == BASELINE and r.status == "ok" and r.load and r.load.requests_per_s
    }
    for r in rows:
        if r.status == "ok" and r.load and r.workers in base:
            r.ratio = r.load.requests_per_s / base[r.workers]


def print_columns(table: Sequence[Sequence[str]], left: int = 1) -> None:
    """Print rows as aligned columns: the first ``left`` left-aligned, the rest right-aligned."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for i, row in enumerate(table):
        cells = [c.ljust(w) if j < left else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths, strict=True))]
        print("  ".join(cells).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def print_notes(rows: list[Any], label: Callable[[Any], str] = lambda r: "") -> None:
    """After a table: one line per row that carries a note (why it failed, what it skipped)."""
    notes = [r for r in rows if r.note]
    if notes:
        print()
        for r in notes:
            print(f"{r.server} x{r.workers}{label(r)} [{r.status}]: {r.note}")


def print_table(rows: list[Row]) -> None:
    header = ("server", "workers", "req/s", "p99 ms", "errors", f"vs {BASELINE}")
    table = [header]
    for r in rows:
        if r.status != "ok" or r.load is None:
            table.append((r.server, str(r.workers), r.status, "-", "-", "-"))
            continue
        p99 = f"{r.load.p99_ms:.2f}" if r.load.p99_ms is not None else "-"
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        table.append(
            (
                r.server,
                str(r.workers),
                f"{r.load.requests_per_s:,.0f}",
                p99,
                str(r.load.errors),
                ratio,
            )
        )
    print_columns(table, left=1)
    print_notes(rows)


def version_of(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(tool: str) -> dict[str, Any]:
    wrk_version = None
    if tool == "wrk" and (wrk := shutil.which("wrk")):
        out = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=10)
        text = (out.stdout or out.stderr).strip()
        wrk_version = text.splitlines()[0] if text else None
    dists = (
        "cluster-server",
        "uvicorn",
        "uvicorn-worker",
        "gunicorn",
        "granian",
        "uvloop",
        "httptools",
    )
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_tool": tool,
        "wrk": wrk_version,
        "versions": {d: version_of(d) for d in dists},
    }


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def log_not_ok(row: Row) -> None:
    """Progress line for a row without a measurement: its status and the first line of its note."""
    log(f"bench:   {row.status}: {row.note.splitlines()[0] if row.note else ''}")


# --------------------------------------------------------------------------- scenarios


def add_throughput_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=positive_int, default=10, help="seconds of load (10)")
    p.add_argument("--connections", type=positive_int, default=64, help="open connections (64)")
    p.add_argument("--threads", type=positive_int, default=2, help="wrk threads (2)")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="seconds of discarded load first (1)")


@contextlib.contextmanager
def recorded(row: Row, failures: tuple[type[Exception], ...] = (ServerFailed, LoadFailed)) -> Iterator[None]:
    """Turn how one measurement ended into ``row.status`` and ``row.note``:
    Unavailable -> skipped, one of ``failures`` -> error (the ``with`` block stops there)."""
    try:
        yield
    except Unavailable as exc:
        row.status, row.note = "skipped", str(exc)
    except failures as exc:
        row.status, row.note = "error", str(exc)


def measure_under_load(
    row: Row, spec: ServerSpec, args: argparse.Namespace, load: Callable[[str], LoadResult], probe_timeout: float
) -> Row:
    """Start ``spec``, check that its workers answer /pid, warm up (keep-alive load), then
    ``row.load = load(url)``; a server that exits or a load that fails makes the row an error."""
    workers = row.workers
    with recorded(row):
        with run_server(spec, args.app, workers, args.start_timeout) as server:
            row.command = server.command
            row.pids_seen = len(probe_pids(server.url, workers, timeout=probe_timeout))
            try:
                if args.warmup > 0:
                    run_load(server.url, args.tool, args.warmup, args.connections, args.threads)
                row.load = load(server.url)
            finally:
                server.check_alive()  # a server that died under load explains a LoadFailed
        if row.pids_seen < workers:
            row.note = f"only {row.pids_seen}/{workers} worker pids answered /pid before load"
    return row


R = TypeVar("R", bound=Row)
K = TypeVar("K")


def measure_each(
    spec: ServerSpec,
    rows: list[R],
    args: argparse.Namespace,
    measure: Callable[[RunningServer, R], None],
    warmup: Callable[[str], object] | None = None,
) -> list[R]:
    """Start ``spec`` once (``rows[0].workers`` workers), ``warmup(url)``, then ``measure(server, row)``
    for each row in turn, each recorded on its own; a server that does not start (or is not
    installed) gives every row its status and note."""
    workers = rows[0].workers
    holder = Row(rows[0].scenario, spec.name, workers)
    with recorded(holder), run_server(spec, args.app, workers, args.start_timeout) as server:
        pids = len(probe_pids(server.url, workers, timeout=5))
        if warmup is not None:
            warmup(server.url)
        for row in rows:
            row.command, row.pids_seen = server.command, pids
            with recorded(row):
                measure(server, row)
    if holder.status != "ok":
        for row in rows:
            row.status, row.note = holder.status, holder.note
    return rows


def grouped(rows: list[R], key: Callable[[R], K]) -> dict[K, list[R]]:
    """``rows`` by ``key``, in the order the keys are first met."""
    out: dict[K, list[R]] = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out


def joined_notes(rows: list[R]) -> str:
    return "; ".join(sorted({r.note for r in rows if r.note}))


def display_name(server: str) -> str:
    """``cluster-server`` alone runs its default policy; ``cluster-server:POLICY`` names one."""
    return "cluster-server (default)" if server == "cluster-server" else server


def measure_throughput(spec: ServerSpec, workers: int, args: argparse.Namespace) -> Row:
    def load(url: str) -> LoadResult:
        return run_load(url, args.tool, args.duration, args.connections, args.threads)

    return measure_under_load(Row("throughput", spec.name, workers), spec, args, load, probe_timeout=3)


def scenario_throughput(args: argparse.Namespace) -> list[Row]:
    if args.tool == "python":
        log(
            f"bench: using the Python load loop ({args.tool_reason}): numbers are bounded by"
            " the client, compare servers only against each other"
        )
    if args.tool == "wrk" and args.threads > args.connections:
        sys.exit("bench: --threads must not exceed --connections")
    rows = []
    for workers in args.workers:
        for name in args.servers:
            log(f"bench: throughput {name} x{workers} ...")
            row = measure_throughput(server_spec(name), workers, args)
            if row.status == "ok" and row.load:
                log(f"bench:   {row.load.requests_per_s:,.0f} req/s")
            else:
                log(f"bench:   {row.status}")
            rows.append(row)
    fill_ratios(rows)
    print_table(rows)
    print(f"\nload: {describe_load(args)}")
    return rows


def describe_load(args: argparse.Namespace) -> str:
    if args.tool == "wrk":
        what = f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s --latency"
    else:
        what = (
            f"Python keep-alive loop, {args.connections} threads x 1 connection,"
            f" {args.duration}s ({args.tool_reason}; client-bound)"
        )
    warmup = f", after {args.warmup}s warm-up" if args.warmup > 0 else ""
    return f"{what}{warmup}; GET / of {args.app}"


# restart: load with rolling restarts in the middle ------------------------------------

#: wrk script: count responses per wall-clock second in each thread, print the sums at the end
PER_SECOND_LUA = """
counts = {}  -- a global: the main thread reads it with thread:get
local threads = {}
function setup(thread) table.insert(threads, thread) end
function response(status, headers, body)
  local s = os.time()
  counts[s] = (counts[s] or 0) + 1
end
function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for s, n in pairs(t:get("counts")) do total[s] = (total[s] or 0) + n end
  end
  local keys = {}
  for s in pairs(total) do table.insert(keys, s) end
  table.sort(keys)
  io.write("PER-SECOND")
  for _, s in ipairs(keys) do io.write(" ", s, ":", total[s]) end
  io.write("\\n")
end
"""

#: wrk options per load mode: keep-alive, or a new connection per request
LOAD_MODES: dict[str, tuple[str, ...]] = {"keep-alive": (), "close": ("-H", "Connection: close")}


@dataclass
class RestartRow(Row):
    mode: str = ""  # keep-alive, or close (a new connection per request)
    restarts: int = 0
    per_second: list[int] = field(default_factory=list)  # whole seconds only (first and last dropped)
    replaced: bool | None = None  # every worker pid seen before the load was gone after it

    @property
    def min_per_second(self) -> int | None:
        return min(self.per_second) if self.per_second else None


def add_restart_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=positive_int, default=10, help="seconds of load (10)")
    p.add_argument("--connections", type=positive_int, default=64, help="open connections (64)")
    p.add_argument("--threads", type=positive_int, default=2, help="wrk threads (2)")
    p.add_argument("--restarts", type=positive_int, default=2, help="SIGHUPs, spread evenly over the run (2)")
    add_modes_arg(p)


def add_modes_arg(p: argparse.ArgumentParser) -> None:
    """``--modes``: a comma-separated subset of LOAD_MODES (unknown names dropped; none left: all)."""
    p.add_argument(
        "--modes",
        type=lambda t: [m for m in t.split(",") if m in LOAD_MODES] or list(LOAD_MODES),
        default=list(LOAD_MODES),
        help="keep-alive, close (a new connection per request), or both (both)",
    )


def parse_per_second(output: str) -> list[int]:
    m = re.search(r"^PER-SECOND((?: \d+:\d+)*)\s*$", output, re.M)
    if not m:
        return []
    counts = [int(pair.split(":")[1]) for pair in m[1].split()]
    return counts[1:-1]  # the first and last seconds are partial


def measure_restart(spec: ServerSpec, workers: int, mode: str, args: argparse.Namespace) -> RestartRow:
    row = RestartRow("restart", spec.name, workers, mode=mode)
    with (
        recorded(row),
        run_server(spec, args.app, workers, args.start_timeout) as server,
        lua_file(PER_SECOND_LUA) as script,
    ):
        row.command = server.command
        before = probe_pids(server.url, workers, timeout=3)
        row.pids_seen = len(before)
        extra = ("-s", script, *LOAD_MODES[mode])
        cmd = wrk_command(server.url, args.duration, args.connections, args.threads, *extra)
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for i in range(1, args.restarts + 1):
                at = started + args.duration * i / (args.restarts + 1)
                time.sleep(max(0.0, at - time.monotonic()))
                server.check_alive()
                os.kill(server.proc.pid, signal.SIGHUP)
                row.restarts += 1
            out, err = proc.communicate(timeout=args.duration + 30)
        except subprocess.TimeoutExpired:
            raise LoadFailed(f"wrk overran its {args.duration + 30}s deadline") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        row.load = wrk_result(proc.returncode, out, err)
        row.per_second = parse_per_second(out)
        server.check_alive()
        # give the last restart time to finish, then see who answers now
        deadline = time.monotonic() + 15
        after: set[str] = set()
        while time.monotonic() < deadline:
            after = probe_pids(server.url, workers, timeout=2)
            if len(after) >= workers and after.isdisjoint(before):
                break
            time.sleep(0.2)
        row.replaced = bool(before) and after.isdisjoint(before)
        if not row.replaced:
            row.note = f"workers not all replaced: {len(before & after)} of {len(before)} pids still answer"
    return row


def print_restart_table(rows: list[RestartRow]) -> None:
    header = ("server", "workers", "mode", "requests", "errors", "non-2xx", "socket errors", "min 1s req/s", "req/s")
    table = [header]
    for r in rows:
        if r.status != "ok" or r.load is None:
            table.append((r.server, str(r.workers), r.mode, r.status, *("-",) * 5))
            continue
        sock = ", ".join(f"{k} {v}" for k, v in r.load.socket_errors.items() if v) or "0"
        low = r.min_per_second
        table.append(
            (
                r.server,
                str(r.workers),
                r.mode,
                f"{r.load.requests:,}",
                str(r.load.errors),
                str(r.load.non_2xx),
                sock,
                f"{low:,}" if low is not None else "-",
                f"{r.load.requests_per_s:,.0f}",
            )
        )
    print_columns(table, left=3)
    print_notes(rows, lambda r: f" {r.mode}")


def scenario_restart(args: argparse.Namespace) -> list[Row]:
    if args.tool != "wrk":
        sys.exit("bench: the restart scenario needs wrk (per-second counts come from a wrk script)")
    rows: list[RestartRow] = []
    for workers in args.workers:
        for mode in args.modes:
            for name in args.servers:
                log(f"bench: restart {name} x{workers} {mode} ...")
                row = measure_restart(server_spec(name), workers, mode, args)
                if row.status == "ok" and row.load:
                    low = row.min_per_second
                    log(f"bench:   {row.load.requests:,} requests, {row.load.errors} errors, min 1s {low}")
                else:
                    log_not_ok(row)
                rows.append(row)
    print_restart_table(rows)
    print(
        f"\nload: wrk -t{args.threads} -c{args.connections} -d{args.duration}s, GET / of {args.app};"
        f" {args.restarts} SIGHUP(s) to the server's main process, evenly spread; close = -H 'Connection: close'"
    )
    return list(rows)


# --------------------------------------------------------------------------- spread and mixed

#: servers the scheduling scenarios compare by default: every policy, and uvicorn --workers
SCHEDULING_SERVERS = [*(f"cluster-server:{p}" for p in POLICIES), "uvicorn"]

# wrk Lua: a new connection per request; count the answers by body (the worker's pid).
SPREAD_LUA = """
wrk.headers["Connection"] = "close"
wrk.path = "/pid"
counts = {}
threads = {}
function setup(thread) table.insert(threads, thread) end
function response(status, headers, body)
  if status == 200 then counts[body] = (counts[body] or 0) + 1 end
end
function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("counts")) do total[k] = (total[k] or 0) + v end
  end
  for k, v in pairs(total) do io.write(string.format("pid %s %d\\n", k, v)) end
end
"""

# wrk Lua: a new connection per request; every EVERY-th request of each connection slot
# blocks its worker's event loop for MS milliseconds (/block), the others are hello-world.
MIXED_LUA = """
wrk.headers["Connection"] = "close"
local n = 0
local fast, slow
function init(args)
  fast = wrk.format("GET", "/")
  slow = wrk.format("GET", "/block?ms={ms}")
  n = math.random({every}) -- threads start out of phase
end
function request()
  n = n + 1
  if n % {every} == 0 then return slow end
  return fast
end
"""


@contextlib.contextmanager
def lua_file(script: str) -> Iterator[str]:
    """``script`` in a temporary file, for wrk's ``-s``; removed afterwards."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="bench-") as fh:
        fh.write(script)
        fh.flush()
        yield fh.name


def wrk_script_load(url: str, duration: int, connections: int, threads: int, script: str) -> LoadResult:
    """wrk with a Lua script (its extra output stays in ``raw``)."""
    with lua_file(script) as path:
        return wrk_load(url, duration, connections, threads, "-s", path)


def python_close_load(
    url: str, duration: float, connections: int, slow_every: int = 0, slow_path: str = ""
) -> tuple[LoadResult, dict[str, int]]:
    """Fallback without wrk: ``connections`` threads, a new connection per request to
    ``/pid`` (every ``slow_every``-th to ``slow_path``); counts answers by body."""
    parts = urlsplit(url)
    host, port = parts.hostname or HOST, parts.port
    start = time.monotonic()
    stop_at = start + duration
    lock = threading.Lock()
    latencies: list[float] = []
    bodies: dict[str, int] = {}
    failures = {"non_2xx": 0, "errors": 0}

    def client(offset: int) -> None:
        mine: list[float] = []
        seen: dict[str, int] = {}
        bad = errors = 0
        n = offset
        while time.monotonic() < stop_at:
            n += 1
            path = slow_path if slow_every and n % slow_every == 0 else "/pid"
            conn = http.client.HTTPConnection(host, port, timeout=5)
            t0 = time.perf_counter()
            try:
                conn.request("GET", path, headers={"Connection": "close"})
                resp = conn.getresponse()
                body = resp.read().decode(errors="replace")
            except (OSError, http.client.HTTPException):
                errors += 1
                time.sleep(0.01)
                continue
            finally:
                conn.close()
            mine.append(time.perf_counter() - t0)
            if resp.status == 200:
                if path == "/pid":
                    seen[body] = seen.get(body, 0) + 1
            else:
                bad += 1
        with lock:
            latencies.extend(mine)
            for k, v in seen.items():
                bodies[k] = bodies.get(k, 0) + v
            failures["non_2xx"] += bad
            failures["errors"] += errors

    run_clients(client, connections, stop_at)
    elapsed = time.monotonic() - start
    latencies.sort()
    result = LoadResult(
        tool="python",
        requests=len(latencies),
        duration_s=elapsed,
        requests_per_s=len(latencies) / elapsed,
        p50_ms=percentile_ms(latencies, 0.50),
        p99_ms=percentile_ms(latencies, 0.99),
        p90_ms=percentile_ms(latencies, 0.90),
        non_2xx=failures["non_2xx"],
        socket_errors={"errors": failures["errors"]},
    )
    return result, bodies


def add_scheduling_args(p: argparse.ArgumentParser) -> None:
    # Defaults here: every cluster-server policy and uvicorn, at 2 and 4 workers.
    p.set_defaults(servers=list(SCHEDULING_SERVERS), workers=[2, 4])
    p.add_argument("--duration", type=positive_int, default=5, help="seconds of load per run (5)")
    p.add_argument("--connections", type=positive_int, default=32, help="concurrent connections (32)")
    p.add_argument("--threads", type=positive_int, default=2, help="wrk threads (2)")
    p.add_argument("--repeat", type=positive_int, default=3, help="runs per server, interleaved; medians (3)")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="seconds of discarded load first (1)")


def add_spread_args(p: argparse.ArgumentParser) -> None:
    add_scheduling_args(p)


def add_mixed_args(p: argparse.ArgumentParser) -> None:
    add_scheduling_args(p)
    p.add_argument("--slow-ms", type=positive_int, default=50, help="how long a slow request blocks its worker (50)")
    # 1 in 1000 x 50 ms keeps the workers blocked ~12%% of the time at ~10k req/s: placement
    # decides who waits. At 1 in 200 they are blocked ~60%% of the time, and p99 is the
    # blocked time itself whatever the policy (docs/scheduling.md has both).
    p.add_argument(
        "--slow-every", type=positive_int, default=1000, help="one request in this many is slow (1000, i.e. 0.1%%)"
    )


def parse_pid_counts(raw: str) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"^pid (\S+) (\d+)$", raw, re.M)}


def spread_of(counts: dict[str, int], workers: int) -> float | None:
    """Busiest worker's requests over the least busy one's (a worker that got none: infinite)."""
    if not counts:
        return None
    values = sorted(counts.values())
    if len(values) < workers or values[0] == 0:
        return float("inf")
    return values[-1] / values[0]


def measure_scheduling(kind: str, spec: ServerSpec, workers: int, args: argparse.Namespace) -> Row:
    """One run of ``spread`` or ``mixed``: a new connection per request."""
    row = Row(kind, spec.name, workers)

    def spread(url: str) -> LoadResult:
        if args.tool == "wrk":
            load = wrk_script_load(url, args.duration, args.connections, args.threads, SPREAD_LUA)
            counts = parse_pid_counts(load.raw)
        else:
            load, counts = python_close_load(url, args.duration, args.connections)
        row.details["per_worker"] = sorted(counts.values(), reverse=True)
        row.details["spread"] = spread_of(counts, workers)
        return load

    def mixed(url: str) -> LoadResult:
        if args.tool == "wrk":
            script = MIXED_LUA.replace("{ms}", str(args.slow_ms)).replace("{every}", str(args.slow_every))
            return wrk_script_load(url, args.duration, args.connections, args.threads, script)
        slow_path = f"/block?ms={args.slow_ms}"
        return python_close_load(url, args.duration, args.connections, args.slow_every, slow_path)[0]

    return measure_under_load(row, spec, args, spread if kind == "spread" else mixed, probe_timeout=5)


def median_or_none(values: list[float | None]) -> float | None:
    """Median of the values measured; None when the first run did not measure it (a tool without p90)."""
    return statistics.median(v for v in values if v is not None) if values[0] is not None else None


def combine_runs(kind: str, runs: list[Row]) -> Row:
    """Medians over repeated runs of one server; every run stays in ``details["runs"]``."""
    ok = [r for r in runs if r.status == "ok" and r.load is not None]
    if not ok:
        return runs[-1]
    best = ok[0]
    row = Row(kind, best.server, best.workers, command=best.command, pids_seen=min(r.pids_seen or 0 for r in ok))
    row.note = joined_notes(runs)
    assert best.load is not None
    loads = [r.load for r in ok if r.load is not None]
    row.load = LoadResult(
        tool=best.load.tool,
        requests=sum(x.requests for x in loads),
        duration_s=sum(x.duration_s for x in loads),
        requests_per_s=statistics.median(x.requests_per_s for x in loads),
        p50_ms=median_or_none([x.p50_ms for x in loads]),
        p99_ms=median_or_none([x.p99_ms for x in loads]),
        p90_ms=median_or_none([x.p90_ms for x in loads]),
        non_2xx=sum(x.non_2xx for x in loads),
        socket_errors={k: sum(x.socket_errors.get(k, 0) for x in loads) for k in loads[0].socket_errors},
    )
    row.details["runs"] = [
        {"requests_per_s": x.requests_per_s, "p50_ms": x.p50_ms, "p90_ms": x.p90_ms, "p99_ms": x.p99_ms, **r.details}
        for r, x in zip(ok, loads, strict=True)
    ]
    if kind == "spread":
        spreads = [r.details["spread"] for r in ok if r.details.get("spread") is not None]
        row.details["spread"] = statistics.median(spreads) if spreads else None
        row.details["per_worker"] = row.per_worker = ok[-1].details.get("per_worker")
    if len(ok) < len(runs):
        failed = [r for r in runs if r not in ok]
        row.note = (row.note + "; " if row.note else "") + f"{len(failed)} run(s) failed: {failed[0].note}"
    return row


def run_scheduling(kind: str, args: argparse.Namespace) -> list[Row]:
    if args.tool == "python":
        log(f"bench: using the Python load loop ({args.tool_reason}): client-bound, compare servers only")
    rows: list[Row] = []
    for workers in args.workers:
        runs: dict[str, list[Row]] = {name: [] for name in args.servers}
        for i in range(args.repeat):  # interleaved, so a noisy neighbour hits every server alike
            for name in args.servers:
                log(f"bench: {kind} {name} x{workers} run {i + 1}/{args.repeat} ...")
                row = measure_scheduling(kind, server_spec(name), workers, args)
                if row.status == "ok" and row.load:
                    extra = f", spread {row.details['spread']:.2f}" if row.details.get("spread") else ""
                    log(f"bench:   {row.load.requests_per_s:,.0f} req/s, p99 {row.load.p99_ms} ms{extra}")
                else:
                    log_not_ok(row)
                runs[name].append(row)
                if row.status == "skipped":
                    break
        rows.extend(combine_runs(kind, runs[name]) for name in args.servers)
    fill_ratios(rows)
    print_scheduling_table(kind, rows)
    what = (
        "a new connection per request to /pid"
        if kind == "spread"
        else f"a new connection per request; 1 in {args.slow_every} blocks its worker for {args.slow_ms} ms"
    )
    load = f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s" if args.tool == "wrk" else "Python loop"
    print(f"\nload: {load}, {what}; median of {args.repeat} interleaved run(s); {args.app}")
    return rows


def print_scheduling_table(kind: str, rows: list[Row]) -> None:
    if kind == "spread":
        header: tuple[str, ...] = ("server", "workers", "req/s", "max/min", "per worker (last run)", "errors")
    else:
        header = ("server", "workers", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors")
    table = [header]
    for r in rows:
        if r.status != "ok" or r.load is None:
            table.append((r.server, str(r.workers), r.status, *("-",) * (len(header) - 3)))
            continue
        if kind == "spread":
            spread = r.details.get("spread")
            shown = "-" if spread is None else ("inf" if spread == float("inf") else f"{spread:.2f}")
            per = "/".join(str(c) for c in r.details.get("per_worker") or [])
            cells: tuple[str, ...] = (f"{r.load.requests_per_s:,.0f}", shown, per, str(r.load.errors))
        else:
            p50, p90, p99 = ("-" if v is None else f"{v:.2f}" for v in (r.load.p50_ms, r.load.p90_ms, r.load.p99_ms))
            cells = (f"{r.load.requests_per_s:,.0f}", p50, p90, p99, str(r.load.errors))
        table.append((r.server, str(r.workers), *cells))
    print_columns(table, left=1)
    print_notes(rows)


def scenario_spread(args: argparse.Namespace) -> list[Row]:
    return run_scheduling("spread", args)


def scenario_mixed(args: argparse.Namespace) -> list[Row]:
    return run_scheduling("mixed", args)


class Scenario(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], list[Row]]


SCENARIOS: dict[str, Scenario] = {
    "throughput": Scenario(
        "requests/s and p99 latency of a hello-world app under keep-alive load",
        add_throughput_args,
        scenario_throughput,
    ),
    "restart": Scenario(
        "requests lost, and the lowest 1-second throughput, under load with rolling restarts (SIGHUP)",
        add_restart_args,
        scenario_restart,
    ),
    "spread": Scenario(
        "how evenly workers share new connections (one per request): requests per worker, max/min",
        add_spread_args,
        scenario_spread,
    ),
    "mixed": Scenario(
        "p50/p99 latency when a few requests block their worker, a new connection per request",
        add_mixed_args,
        scenario_mixed,
    ),
}


# --------------------------------------------------------------------------- reload

#: the FastAPI example, copied to a scratch project for each server so the repository is never edited
EXAMPLE_DIR = ROOT / "examples" / "fastapi_app"
RELOAD_APP = "fastapi_app.main:app"
RELOAD_MARKER = "Hello from cluster-server"


def reload_cmd(name: str, port: int, workers: int) -> list[str]:
    """``NAME --reload`` on the copied example, with the server's own reload defaults."""
    quiet = ("--log-level", "warning", "--no-access-log")
    if name == "cluster-server":
        require("cluster_server", "pip install -e .")
        return [
            PY,
            "-m",
            "cluster_server",
            RELOAD_APP,
            "--reload",
            "--workers",
            str(workers),
            "--host",
            HOST,
            "--port",
            str(port),
            *uvicorn_style_fast_flags(),
            *quiet,
        ]
    if name == "uvicorn":
        require("uvicorn", "pip install uvicorn")
        if workers != 1:
            raise Unavailable("uvicorn --reload runs a single worker (it refuses --workers with --reload)")
        return [
            PY,
            "-m",
            "uvicorn",
            RELOAD_APP,
            "--reload",
            "--host",
            HOST,
            "--port",
            str(port),
            *uvicorn_style_fast_flags(),
            *quiet,
        ]
    if name == "granian":
        require("granian", "pip install granian")
        require("watchfiles", "pip install 'granian[reload]'")
        loop = ["--loop", "uvloop"] if importable("uvloop") else []
        return [
            PY,
            "-m",
            "granian",
            "--interface",
            "asgi",
            "--http",
            "1",
            "--reload",
            "--workers",
            str(workers),
            "--host",
            HOST,
            "--port",
            str(port),
            *loop,
            "--log-level",
            "warning",
            "--no-access-log",
            RELOAD_APP,
        ]
    raise Unavailable(f"no reload mode for {name}")


@dataclass
class ReloadRow(Row):
    saves: int = 0
    latencies_ms: list[float] = field(default_factory=list)  # save -> first response with the new code
    requests: int = 0  # answered by the poller's client during the run
    failed: int = 0  # errors, timeouts, non-200 answers
    failures: list[str] = field(default_factory=list)
    longest_request_ms: float = 0.0  # the longest a single request waited (a stall shows here)

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.latencies_ms) if self.latencies_ms else None


class Poller:
    """One client polling ``GET /`` back to back, a new connection per request (so every
    request lands on whichever worker is accepting now), until stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: dict[str, float] = {}  # marker -> when the first response carrying it ended
        self.requests = 0
        self.failures: list[str] = []
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        pattern = re.compile(re.escape(RELOAD_MARKER) + r"( r\d+)?")
        while not self._stop.is_set():
            started = time.perf_counter()
            conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
            try:
                conn.request("GET", "/", headers={"Connection": "close"})
                resp = conn.getresponse()
                body = resp.read().decode(errors="replace")
                if resp.status != 200:
                    raise http.client.HTTPException(f"status {resp.status}")
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(f"{time.perf_counter():.3f} {exc!r}")
                time.sleep(0.005)
                continue
            finally:
                conn.close()
            ended = time.perf_counter()
            self.requests += 1
            self.longest = max(self.longest, ended - started)
            m = pattern.search(body)
            if m:
                self.seen.setdefault(m[1] or "", ended)


def measure_reload(name: str, workers: int, args: argparse.Namespace) -> ReloadRow:
    row = ReloadRow("reload", name, workers)
    with recorded(row, (ServerFailed,)), tempfile.TemporaryDirectory(prefix="bench-reload-") as tmp:
        project = Path(tmp, "fastapi_app")
        project.mkdir()
        (project / "__init__.py").write_text("")
        source = (EXAMPLE_DIR / "main.py").read_text()
        if RELOAD_MARKER not in source:
            raise ServerFailed(f"{EXAMPLE_DIR / 'main.py'} no longer says {RELOAD_MARKER!r}")
        main = project / "main.py"
        main.write_text(source)
        spec = ServerSpec(name, lambda _app, port, n: reload_cmd(name, port, n))
        with run_server(spec, RELOAD_APP, workers, args.start_timeout, cwd=Path(tmp)) as server:
            row.command = server.command
            time.sleep(args.settle)  # the watcher starts after the server answers
            with Poller(server.port) as poller:
                for i in range(1, args.saves + 1):
                    marker = f" r{i}"
                    saved = time.perf_counter()
                    main.write_text(source.replace(RELOAD_MARKER, RELOAD_MARKER + marker))
                    deadline = saved + args.reload_timeout
                    while marker not in poller.seen and time.perf_counter() < deadline:
                        time.sleep(0.001)
                    server.check_alive()
                    if marker not in poller.seen:
                        why = f"no response with the new code within {args.reload_timeout:g}s"
                        raise ServerFailed(f"save {i}: {why}")
                    row.latencies_ms.append((poller.seen[marker] - saved) * 1e3)
                    row.saves += 1
                    time.sleep(args.interval)  # let the old generation drain before the next save
            row.requests, row.failures = poller.requests, poller.failures
            row.failed = len(poller.failures)
            row.longest_request_ms = poller.longest * 1e3
    if row.failures:
        row.note = (row.note + "; " if row.note else "") + "first failures: " + "; ".join(row.failures[:3])
    return row


def add_reload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--saves", type=positive_int, default=7, help="file saves per server (7)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between a reload and the next save (2)")
    p.add_argument("--settle", type=float, default=2.0, help="seconds after start-up before the first save (2)")
    p.add_argument("--reload-timeout", type=float, default=30.0, help="seconds a reload may take (30)")
    p.set_defaults(workers=[1])  # uvicorn --reload runs one worker


def scenario_reload(args: argparse.Namespace) -> list[Row]:
    servers = [s for s in args.servers if s in ("cluster-server", "uvicorn", "granian")]
    rows: list[ReloadRow] = []
    for workers in args.workers:
        for name in servers:
            log(f"bench: reload {name} x{workers} ...")
            row = measure_reload(name, workers, args)
            if row.status == "ok":
                log(f"bench:   median {row.median_ms:.0f} ms, max {max(row.latencies_ms):.0f} ms, {row.failed} failed")
            else:
                log_not_ok(row)
            rows.append(row)
    base = {r.workers: r.median_ms for r in rows if r.server == BASELINE and r.status == "ok"}
    if 1 in base:  # uvicorn reloads one worker whatever --workers says: compare everyone with it
        base = {w: base.get(w, base[1]) for w in args.workers}
    for r in rows:
        if r.status == "ok" and r.median_ms and (b := base.get(r.workers)):
            r.ratio = r.median_ms / b
    header = ("server", "workers", "saves", "median ms", "max ms", "failed", "requests", "longest ms", "vs uvicorn")
    table = [header]
    for r in rows:
        if r.status != "ok":
            table.append((r.server, str(r.workers), r.status, *("-",) * 6))
            continue
        table.append(
            (
                r.server,
                str(r.workers),
                str(r.saves),
                f"{r.median_ms:.0f}",
                f"{max(r.latencies_ms):.0f}",
                str(r.failed),
                f"{r.requests:,}",
                f"{r.longest_request_ms:.0f}",
                f"{r.ratio:.2f}x" if r.ratio is not None else "-",
            )
        )
    print_columns(table, left=1)
    print_notes(rows)
    print(
        f"\n{args.saves} saves of {EXAMPLE_DIR.relative_to(ROOT)}/main.py (a copy), {args.interval:g}s apart; "
        "latency = save to the end of the first response with the new code, one client polling GET / "
        "back to back with a new connection per request; each server with its own reload defaults"
    )
    return list(rows)


# --------------------------------------------------------------------------- memory

MEMORY_APP = "examples.fastapi_app.main:app"


def memory_variants() -> dict[str, Callable[[str, int, int], list[str]]]:
    def preloaded(command: Callable[[str, int, int], list[str]]) -> Callable[[str, int, int], list[str]]:
        def cmd(app: str, port: int, workers: int) -> list[str]:
            return [*command(app, port, workers), "--preload"]

        return cmd

    return {
        "cluster-server --preload": preloaded(cluster_server_cmd),
        "cluster-server": cluster_server_cmd,
        "uvicorn": uvicorn_cmd,
        "gunicorn --preload": preloaded(gunicorn_cmd),
        "gunicorn": gunicorn_cmd,
    }


@dataclass
class MemoryRow(Row):
    processes: int = 0
    pss_mib: float = 0.0  # sum of Pss over every process of the server
    private_mib: float = 0.0  # sum of Private_Clean + Private_Dirty
    rss_mib: float = 0.0  # sum of Rss (counts shared pages once per process)
    per_process: list[dict[str, Any]] = field(default_factory=list)


def proc_stat(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (``[0]`` is field 3, the state);
    None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def live_pids(index: int, value: int) -> list[int]:
    """Every process not a zombie whose ``proc_stat(pid)[index]`` is ``value``, sorted."""
    pids = []
    for entry in os.listdir("/proc"):
        fields = proc_stat(entry) if entry.isdigit() else None
        if fields and int(fields[index]) == value and fields[0] != "Z":
            pids.append(int(entry))
    return sorted(pids)


def session_pids(sid: int) -> list[int]:
    """Every process in session ``sid`` (a server started with start_new_session)."""
    return live_pids(3, sid)  # fields[3] is the session id (field 6)


def smaps_rollup(pid: int) -> dict[str, int]:
    """kB values of /proc/PID/smaps_rollup (Rss, Pss, Private_Clean, ...)."""
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                values[parts[0].rstrip(":")] = int(parts[1])
    return values


def process_title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:80]
    except OSError:
        return "?"


def measure_memory(
    name: str, command: Callable[[str, int, int], list[str]], workers: int, args: argparse.Namespace
) -> MemoryRow:
    row = MemoryRow("memory", name, workers)
    with recorded(row, (ServerFailed, OSError)):
        with run_server(ServerSpec(name, command), args.app, workers, args.start_timeout) as server:
            row.command = server.command
            row.pids_seen = len(probe_pids(server.url, workers, timeout=10))
            # The same small warm-up for everyone: every route once per worker or so.
            for path in ("/", "/pid", "/items/1") * (4 * workers):
                with contextlib.suppress(httpx.HTTPError):
                    httpx.get(server.url + path, headers={"Connection": "close"}, timeout=5)
            time.sleep(args.settle)
            server.check_alive()
            for pid in session_pids(server.proc.pid):
                try:
                    m = smaps_rollup(pid)
                except OSError:
                    continue
                row.per_process.append({"pid": pid, "title": process_title(pid), **m})
            row.processes = len(row.per_process)
            row.pss_mib = sum(p.get("Pss", 0) for p in row.per_process) / 1024
            row.rss_mib = sum(p.get("Rss", 0) for p in row.per_process) / 1024
            row.private_mib = sum(p.get("Private_Clean", 0) + p.get("Private_Dirty", 0) for p in row.per_process) / 1024
        if row.pids_seen < workers:
            row.note = f"only {row.pids_seen}/{workers} worker pids answered /pid"
    return row


def add_memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--settle", type=float, default=1.0, help="seconds after the warm-up before measuring (1)")
    p.add_argument(
        "--variants",
        type=lambda t: [v.strip() for v in t.split(",") if v.strip()],
        default=None,
        help="comma-separated subset of: " + ", ".join(memory_variants()),
    )
    p.set_defaults(workers=[4], app=MEMORY_APP)


def scenario_memory(args: argparse.Namespace) -> list[Row]:
    if not Path("/proc/self/smaps_rollup").exists():
        sys.exit("bench: the memory scenario reads /proc/PID/smaps_rollup (Linux 4.14+)")
    variants = memory_variants()
    chosen = args.variants or list(variants)
    unknown = [v for v in chosen if v not in variants]
    if unknown:
        sys.exit(f"bench: unknown memory variant(s) {', '.join(unknown)}; choose from {', '.join(variants)}")
    rows: list[MemoryRow] = []
    for workers in args.workers:
        for name in chosen:
            log(f"bench: memory {name} x{workers} ...")
            row = measure_memory(name, variants[name], workers, args)
            log(f"bench:   {row.pss_mib:.1f} MiB PSS" if row.status == "ok" else f"bench:   {row.status}")
            rows.append(row)
    base = {r.workers: r.pss_mib for r in rows if r.server == BASELINE and r.status == "ok"}
    table = [("server", "workers", "processes", "PSS MiB", "private MiB", "RSS MiB", f"vs {BASELINE}")]
    for r in rows:
        if r.status != "ok":
            table.append((r.server, str(r.workers), r.status, *("-",) * 4))
            continue
        ratio = f"{r.pss_mib / base[r.workers]:.2f}x" if base.get(r.workers) else "-"
        table.append(
            (
                r.server,
                str(r.workers),
                str(r.processes),
                f"{r.pss_mib:.1f}",
                f"{r.private_mib:.1f}",
                f"{r.rss_mib:.1f}",
                ratio,
            )
        )
    print_columns(table, left=1)
    print_notes(rows)
    print(
        f"\nPSS = sum of Pss in /proc/PID/smaps_rollup over every process of the server (primary or arbiter, "
        f"template, workers), after {args.settle:g}s idle following a warm-up of a few requests per worker; "
        f"app {args.app}"
    )
    return list(rows)


SCENARIOS["reload"] = Scenario(
    "save-to-first-new-response latency and failed requests of --reload, on the FastAPI example",
    add_reload_args,
    scenario_reload,
)
SCENARIOS["memory"] = Scenario(
    "total PSS of N workers of the FastAPI example: --preload against uvicorn and gunicorn --preload",
    add_memory_args,
    scenario_memory,
)


# --------------------------------------------------------------------------- metrics-cost


@dataclass
class CostRound:
    variant: str  # "off" or "on"
    requests: int
    cpu_s: float  # CPU time of the server's whole process tree during the load
    errors: int

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s / self.requests * 1e6 if self.requests else float("inf")


def tree_cpu_seconds(sid: int) -> float:
    """CPU time so far of every thread of every process in session ``sid``, in seconds.

    From ``/proc/PID/task/TID/schedstat`` (nanoseconds on the CPU): finer than
    ``/proc/PID/stat``'s clock ticks, so short rounds still measure well.
    """
    total = 0
    for pid in session_pids(sid):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
    return total / 1e9


def cost_load(url: str, args: argparse.Namespace) -> LoadResult:
    """Keep-alive load on ``GET /``: wrk2 at ``--rate`` requests/s, or wrk as fast as it goes."""
    if args.rate:
        wrk2 = wrk2_path()
        if wrk2 is None:
            sys.exit("bench: --rate needs wrk2 ($WRK2, on PATH, or shared/tools/wrk2 next to the checkout)")
        return wrk2_load(wrk2, url, args.duration, args.connections, 1, args.rate, "--latency")
    return run_load(url, args.tool, args.duration, args.connections, args.threads)


def cost_round(server: RunningServer, variant: str, args: argparse.Namespace) -> CostRound:
    server.check_alive()
    before = tree_cpu_seconds(server.proc.pid)
    load = cost_load(server.url, args)
    used = tree_cpu_seconds(server.proc.pid) - before
    server.check_alive()
    return CostRound(variant, load.requests, used, load.errors)


def metrics_cost_cmd(metrics: bool) -> Callable[[str, int, int], list[str]]:
    def command(app: str, port: int, workers: int) -> list[str]:
        cmd = cluster_server_cmd(app, port, workers)
        return [*cmd, "--metrics-bind", f"{HOST}:{free_port()}"] if metrics else cmd

    return command


def run_cost_rounds(workers: int, args: argparse.Namespace) -> tuple[list[CostRound], dict[str, list[str]]]:
    """``--rounds`` rounds, each loading a fresh server of each variant, one after the other
    (the order alternates). Fresh processes each round: two processes of the same server differ
    by a few percent (memory layout, hash seeds), a difference rounds on the same pair would keep."""
    rounds: list[CostRound] = []
    commands: dict[str, list[str]] = {}
    for i in range(args.rounds):
        for variant in ("off", "on") if i % 2 == 0 else ("on", "off"):
            spec = ServerSpec(variant, metrics_cost_cmd(variant == "on" and not args.control))
            with run_server(spec, args.app, workers, args.start_timeout) as server:
                commands[variant] = server.command
                with contextlib.suppress(LoadFailed):
                    run_load(server.url, args.tool, 1, args.connections, args.threads)  # warm-up
                r = cost_round(server, variant, args)
            log(f"bench:   round {i + 1} {variant:>3}: {r.requests} requests, {r.cpu_us_per_request:.1f} us CPU each")
            rounds.append(r)
    return rounds, commands


def cost_rows(rounds: list[CostRound], commands: dict[str, list[str]], workers: int) -> list[Row]:
    rows = []
    for variant in ("off", "on"):
        mine = [r for r in rounds if r.variant == variant]
        per_request = [r.cpu_us_per_request for r in mine]
        row = Row("metrics-cost", f"cluster-server (metrics {variant})", workers, command=commands[variant])
        row.details = {
            "cpu_us_per_request_median": statistics.median(per_request),
            "cpu_us_per_request": per_request,
            "requests": [r.requests for r in mine],
            "errors": sum(r.errors for r in mine),
        }
        rows.append(row)
    off, on = (r.details["cpu_us_per_request_median"] for r in rows)
    rows[1].ratio = on / off
    # Each round loads both back to back: the ratio within a round is the least noisy measure.
    paired = [b / a for a, b in zip(*(row.details["cpu_us_per_request"] for row in rows), strict=True)]
    rows[1].details["paired_ratios"] = paired
    rows[1].details["paired_ratio_median"] = statistics.median(paired)
    return rows


def add_metrics_cost_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=positive_int, default=7, help="interleaved rounds (7)")
    p.add_argument("--duration", type=positive_int, default=5, help="seconds of load per round and variant (5)")
    p.add_argument("--connections", type=positive_int, default=32, help="keep-alive connections (32)")
    p.add_argument("--threads", type=positive_int, default=2, help="wrk threads (2)")
    p.add_argument("--rate", type=non_negative_int, default=0, help="requests/s with wrk2 (open loop); 0: wrk (0)")
    p.add_argument(
        "--control",
        action="store_true",
        help="an A/A run: 'on' without --metrics-bind too, to see what the method reads for no difference",
    )


def scenario_metrics_cost(args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    for workers in args.workers:
        log(f"bench: metrics-cost x{workers}: {args.rounds} rounds of {args.duration}s per variant ...")
        rounds, commands = run_cost_rounds(workers, args)
        rows += cost_rows(rounds, commands, workers)
    print_cost_table(rows, args)
    return rows


def print_cost_table(rows: list[Row], args: argparse.Namespace) -> None:
    table = [("server", "workers", "CPU us/request (median)", "rounds", "requests/round (median)", "vs off")]
    for r in rows:
        d = r.details
        ratio = f"{(r.ratio - 1) * 100:+.1f}%" if r.ratio is not None else "-"
        rounds = " ".join(f"{v:.1f}" for v in d["cpu_us_per_request"])
        table.append(
            (
                r.server,
                str(r.workers),
                f"{d['cpu_us_per_request_median']:.1f}",
                rounds,
                f"{statistics.median(d['requests']):.0f}",
                ratio,
            )
        )
    print_columns(table, left=1)
    if args.control:
        print("\n--control: both sides ran WITHOUT --metrics-bind; any difference is the method's noise")
    for r in rows:
        if "paired_ratio_median" in r.details:
            print(
                f"\n{r.server} x{r.workers}: median of the per-round ratios on/off "
                f"{(r.details['paired_ratio_median'] - 1) * 100:+.1f}%"
            )
    load = f"wrk2 -R{args.rate}" if args.rate else f"{args.tool}, as fast as it goes"
    print(
        f"\nCPU = time on CPU of every thread of every process of the server (from /proc/*/task/*/schedstat) "
        f"during each round's load, divided by the requests it answered; keep-alive GET / of {args.app}, "
        f"{args.connections} connections, {load}; fresh servers each round, rounds interleaved (off/on, then on/off)."
    )


SCENARIOS["metrics-cost"] = Scenario(
    "CPU per request with request metrics on (--metrics-bind) and off, in interleaved rounds",
    add_metrics_cost_args,
    scenario_metrics_cost,
)


# --------------------------------------------------------------------------- efficiency

#: servers ``efficiency`` compares by default: the baseline, gunicorn's uvicorn worker,
#: every cluster-server policy, and cluster-server with no --scheduling (its default)
EFFICIENCY_SERVERS = ["uvicorn", "gunicorn", *(f"cluster-server:{p}" for p in POLICIES), "cluster-server"]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) ``pid`` has used so far; 0 when it is gone."""
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS if fields else 0.0  # utime, stime (fields 14, 15)


def tree_cpu(sid: int) -> dict[int, float]:
    """CPU seconds used so far by every process of session ``sid`` (a server's whole tree)."""
    return {pid: process_cpu(pid) for pid in session_pids(sid)}


@dataclass
class EfficiencyRow(Row):
    mode: str = ""  # keep-alive, or close (a new connection per request)
    round: int = 0
    cpu_s: float = 0.0  # CPU seconds of the server's whole process tree during the load
    main_cpu_s: float = 0.0  # of which its main process (primary, arbiter, supervisor)
    loadavg: float = 0.0  # 1-minute load average just before the run

    @property
    def per_cpu_s(self) -> float | None:
        """Requests per CPU-second of the server's process tree."""
        return self.load.requests / self.cpu_s if self.load and self.cpu_s > 0 else None


def add_efficiency_args(p: argparse.ArgumentParser) -> None:
    p.set_defaults(servers=list(EFFICIENCY_SERVERS), workers=[2])
    p.add_argument("--duration", type=positive_int, default=5, help="seconds of load per run (5)")
    p.add_argument("--connections", type=positive_int, default=64, help="open connections (64)")
    p.add_argument("--threads", type=positive_int, default=2, help="wrk threads (2)")
    p.add_argument("--repeat", type=positive_int, default=3, help="interleaved rounds; medians (3)")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="seconds of discarded load first (1)")
    add_modes_arg(p)
    p.add_argument(
        "--rate",
        type=positive_int,
        help="offer this many requests/s with wrk2 (open loop) instead of saturating with wrk",
    )
    p.add_argument("--wrk2", help="path of wrk2, for --rate (default: $WRK2, wrk2 on PATH, or shared/tools/wrk2)")


def efficiency_load(url: str, seconds: int, args: argparse.Namespace, extra: tuple[str, ...]) -> LoadResult:
    """wrk at saturation, or wrk2 at ``--rate`` (a steadier per-request cost: the same work
    offered to every server, whatever the neighbours leave of the machine)."""
    if not args.rate:
        return wrk_load(url, seconds, args.connections, args.threads, *extra)
    return wrk2_load(args.wrk2, url, seconds, args.connections, args.threads, args.rate, *extra)


def measure_cpu_under_load(server: RunningServer, row: EfficiencyRow, args: argparse.Namespace) -> None:
    """One measured wrk run on a running server; the CPU its tree used meanwhile goes in ``row``."""
    extra = LOAD_MODES[row.mode]
    if args.warmup > 0:
        efficiency_load(server.url, args.warmup, args, extra)
    row.loadavg = os.getloadavg()[0]
    sid = server.proc.pid
    before = tree_cpu(sid)
    row.load = efficiency_load(server.url, args.duration, args, extra)
    after = tree_cpu(sid)
    server.check_alive()
    row.cpu_s = sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())
    row.main_cpu_s = after.get(sid, 0.0) - before.get(sid, 0.0)


def measure_efficiency(spec: ServerSpec, workers: int, rnd: int, args: argparse.Namespace) -> list[EfficiencyRow]:
    """Start ``spec`` once and measure each load mode on it, in turn."""
    rows = [EfficiencyRow("efficiency", spec.name, workers, mode=m, round=rnd) for m in args.modes]
    return measure_each(spec, rows, args, lambda server, row: measure_cpu_under_load(server, row, args))


def run_efficiency_rounds(args: argparse.Namespace) -> list[EfficiencyRow]:
    """Every server, ``--repeat`` rounds, interleaved (A B C A B C ...)."""
    runs: list[EfficiencyRow] = []
    skipped: set[str] = set()
    for workers in args.workers:
        for rnd in range(1, args.repeat + 1):
            for name in args.servers:
                if name in skipped:
                    continue
                log(
                    f"bench: efficiency {name} x{workers} round {rnd}/{args.repeat} (load avg {os.getloadavg()[0]:.1f})"
                )
                rows = measure_efficiency(server_spec(name), workers, rnd, args)
                for row in rows:
                    if row.status == "ok" and row.per_cpu_s is not None and row.load is not None:
                        log(
                            f"bench:   {row.mode}: {row.load.requests_per_s:,.0f} req/s, "
                            f"{row.per_cpu_s:,.0f} req/CPU-s, main process {row.main_cpu_s / row.cpu_s:.1%}"
                        )
                    else:
                        log_not_ok(row)
                if all(r.status == "skipped" for r in rows):
                    skipped.add(name)
                runs.extend(rows)
    return runs


def summarize_efficiency(runs: list[EfficiencyRow]) -> list[EfficiencyRow]:
    """One row per (workers, mode, server): medians over rounds; ``ratio`` is the median of
    each round's requests per CPU-second over uvicorn's in the same round and mode."""
    base = {(r.workers, r.mode, r.round): r.per_cpu_s for r in runs if r.server == BASELINE and r.per_cpu_s}
    out = []
    for (workers, mode, server), mine in grouped(runs, lambda r: (r.workers, r.mode, r.server)).items():
        ok = [r for r in mine if r.status == "ok" and r.per_cpu_s and r.load]
        if not ok:
            out.append(mine[-1])
            continue
        row = EfficiencyRow("efficiency", server, workers, mode=mode, command=ok[0].command)
        row.note = joined_notes(mine)
        ratios = [p / b for r in ok if (p := r.per_cpu_s) and (b := base.get((workers, mode, r.round)))]
        row.ratio = statistics.median(ratios) if ratios else None
        row.details = {
            "requests_per_s": statistics.median(r.load.requests_per_s for r in ok if r.load),
            "per_cpu_s": statistics.median(r.per_cpu_s for r in ok if r.per_cpu_s),
            "main_share": statistics.median(r.main_cpu_s / r.cpu_s for r in ok),
            "errors": sum(r.load.errors for r in ok if r.load),
            "rounds": len(ok),
            "runs": [
                {
                    "round": r.round,
                    "requests_per_s": r.load.requests_per_s if r.load else None,
                    "cpu_s": r.cpu_s,
                    "main_cpu_s": r.main_cpu_s,
                    "per_cpu_s": r.per_cpu_s,
                    "loadavg": r.loadavg,
                    "status": r.status,
                }
                for r in mine
            ],
        }
        out.append(row)
    return out


def print_efficiency_table(rows: list[EfficiencyRow]) -> None:
    header = ("server", "workers", "mode", "req/s", "req/CPU-s", f"vs {BASELINE}", "main CPU", "errors", "rounds")
    table = [header]
    for r in rows:
        name = display_name(r.server)
        if r.status != "ok" or not r.details:
            table.append((name, str(r.workers), r.mode, r.status, *("-",) * 5))
            continue
        d = r.details
        table.append(
            (
                name,
                str(r.workers),
                r.mode,
                f"{d['requests_per_s']:,.0f}",
                f"{d['per_cpu_s']:,.0f}",
                f"{r.ratio:.2f}x" if r.ratio is not None else "-",
                f"{d['main_share']:.1%}",
                str(d["errors"]),
                str(d["rounds"]),
            )
        )
    print_columns(table, left=3)
    print_notes(rows, lambda r: f" {r.mode}")


def scenario_efficiency(args: argparse.Namespace) -> list[Row]:
    if args.tool != "wrk":
        sys.exit("bench: the efficiency scenario needs wrk")
    if not Path("/proc/self/stat").exists():
        sys.exit("bench: the efficiency scenario reads /proc/PID/stat (Linux)")
    if args.rate:
        args.wrk2 = wrk2_path(args.wrk2)
        if not args.wrk2 or not os.access(args.wrk2, os.X_OK):
            log("bench: efficiency --rate needs wrk2 (--wrk2 PATH, $WRK2, or wrk2 on PATH); skipped")
            return []
    runs = run_efficiency_rounds(args)
    rows = summarize_efficiency(runs)
    print_efficiency_table(rows)
    tool = f"wrk2 -R{args.rate}" if args.rate else "wrk"
    print(
        f"\nload: {tool} -t{args.threads} -c{args.connections} -d{args.duration}s per run,"
        f" after {args.warmup}s warm-up,"
        f" GET / of {args.app}; close = -H 'Connection: close'; req/CPU-s = requests over the CPU time (user +"
        f" system, /proc/PID/stat) of every process in the server's session during the run; vs {BASELINE} ="
        f" median over {args.repeat} interleaved round(s) of that ratio against {BASELINE} in the same round;"
        " main CPU = the main process's share (primary, arbiter, supervisor)"
    )
    return list(rows)


SCENARIOS["efficiency"] = Scenario(
    "requests per CPU-second of each server's whole process tree, keep-alive and a new connection per request",
    add_efficiency_args,
    scenario_efficiency,
)


# --------------------------------------------------------------------------- open loop

#: servers ``openloop`` compares by default: the peers, cluster-server's default, the other policies
OPENLOOP_SERVERS = [
    "uvicorn",
    "gunicorn",
    "cluster-server",
    *(f"cluster-server:{p}" for p in POLICIES if p != "shared"),
]
#: the slow requests of each variant: (path, milliseconds, one request in how many)
OPENLOOP_VARIANTS: dict[str, tuple[str, int, int]] = {"block": ("/block", 20, 1000), "cpu": ("/cpu", 5, 10)}
#: percentiles reported (wrk2's corrected histogram)
OPENLOOP_PERCENTILES = (50.0, 99.0, 99.9)


@dataclass
class OpenLoopRow(Row):
    variant: str = ""  # block or cpu
    percent: int = 0  # offered rate, % of the baseline's closed-loop capacity
    rate: int = 0  # offered rate, requests per second
    round: int = 0
    percentiles: dict[str, float] = field(default_factory=dict)  # "99.9" -> ms
    loadavg: float = 0.0


def add_openloop_args(p: argparse.ArgumentParser) -> None:
    p.set_defaults(servers=list(OPENLOOP_SERVERS), workers=[2])
    p.add_argument("--wrk2", help="path of wrk2 (default: $WRK2, wrk2 on PATH, or shared/tools/wrk2; else skipped)")
    p.add_argument("--duration", type=positive_int, default=10, help="seconds per measured run (10)")
    p.add_argument("--connections", type=positive_int, default=64, help="wrk2 connections (64)")
    p.add_argument("--threads", type=positive_int, default=2, help="wrk2 threads (2)")
    p.add_argument("--repeat", type=positive_int, default=3, help="interleaved rounds; medians (3)")
    p.add_argument("--loads", type=int_list, default=[40, 70], help="offered rates, %% of capacity (40,70)")
    p.add_argument(
        "--variants",
        type=lambda t: [v for v in t.split(",") if v in OPENLOOP_VARIANTS] or list(OPENLOOP_VARIANTS),
        default=list(OPENLOOP_VARIANTS),
        help="block (1 in 1000 blocks its loop 20 ms), cpu (1 in 10 burns 5 ms of CPU), or both (both)",
    )
    p.add_argument(
        "--capacity",
        type=positive_int,
        help=f"{BASELINE}'s closed-loop req/s per variant (default: measured at the start of each round)",
    )


def openloop_script(variant: str) -> str:
    path, ms, every = OPENLOOP_VARIANTS[variant]
    return MIXED_LUA.replace("/block?ms={ms}", f"{path}?ms={ms}").replace("{every}", str(every))


def wrk2_percentiles(output: str) -> dict[str, float]:
    """The corrected percentiles (ms) of wrk2 ``--latency`` output, by name ("99.9")."""
    found: dict[str, float] = {}
    for m in re.finditer(r"^\s*(\d+\.\d+)%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.M):
        found.setdefault(f"{float(m[1]):g}", _to_ms(m[2], m[3]))
    return found


def wrk2_run(
    wrk2: str, url: str, rate: int, args: argparse.Namespace, variant: str
) -> tuple[LoadResult, dict[str, float]]:
    with lua_file(openloop_script(variant)) as script:
        extra = ("--latency", "--timeout", "5s", "-s", script)
        load = wrk2_load(wrk2, url, args.duration, args.connections, args.threads, rate, *extra)
    return load, wrk2_percentiles(load.raw)


def measure_capacity(variant: str, args: argparse.Namespace) -> int:
    """The baseline's closed-loop req/s on the variant's load (wrk -c64, median of two 3 s runs)."""
    rates = []
    with run_server(server_spec(BASELINE), args.app, args.workers[0], args.start_timeout) as server:
        for _ in range(2):
            load = wrk_script_load(server.url, 3, 64, 2, openloop_script(variant))
            rates.append(load.requests_per_s)
    return int(statistics.median(rates))


def measure_openloop(
    spec: ServerSpec, rnd: int, rates: dict[tuple[str, int], int], wrk2: str, args: argparse.Namespace
) -> list[OpenLoopRow]:
    """Start ``spec`` once; one wrk2 run per (variant, load) on it."""
    rows = [
        OpenLoopRow("openloop", spec.name, args.workers[0], variant=v, percent=p, rate=rates[v, p], round=rnd)
        for v in args.variants
        for p in args.loads
    ]

    def warmup(url: str) -> None:
        wrk_script_load(url, 1, args.connections, args.threads, openloop_script(args.variants[0]))

    def measure(server: RunningServer, row: OpenLoopRow) -> None:
        row.loadavg = os.getloadavg()[0]
        row.load, row.percentiles = wrk2_run(wrk2, server.url, row.rate, args, row.variant)
        server.check_alive()

    return measure_each(spec, rows, args, measure, warmup)


def openloop_rates(args: argparse.Namespace) -> dict[tuple[str, int], int]:
    """Offered rates per (variant, load): measured again each round, so that a machine that
    other work shares (its capacity drifts) gets the same fraction of what it has now."""
    rates = {}
    for variant in args.variants:
        capacity = args.capacity or measure_capacity(variant, args)
        log(
            f"bench: {BASELINE} closed-loop capacity on '{variant}': {capacity:,} req/s"
            f" (load avg {os.getloadavg()[0]:.1f})"
        )
        for percent in args.loads:
            rates[variant, percent] = max(1, capacity * percent // 100)
    return rates


def summarize_openloop(runs: list[OpenLoopRow]) -> list[OpenLoopRow]:
    """One row per (variant, load, server): the median of each percentile over the rounds."""
    groups = grouped(runs, lambda r: (r.variant, r.percent, r.server))
    out = []
    for (variant, percent, server), mine in sorted(groups.items(), key=lambda kv: kv[0][:2]):
        ok = [r for r in mine if r.status == "ok" and r.load is not None]
        if not ok:
            out.append(mine[-1])
            continue
        rate = int(statistics.median(r.rate for r in ok))
        row = OpenLoopRow("openloop", server, ok[0].workers, variant=variant, percent=percent, rate=rate)
        row.command, row.note = ok[0].command, joined_notes(mine)
        names = [f"{p:g}" for p in OPENLOOP_PERCENTILES]
        row.percentiles = {n: statistics.median(r.percentiles[n] for r in ok if n in r.percentiles) for n in names}
        row.details = {
            "requests_per_s": statistics.median(r.load.requests_per_s for r in ok if r.load),
            "errors": sum(r.load.errors for r in ok if r.load),
            "rounds": len(ok),
            "runs": [
                {
                    "round": r.round,
                    "rate": r.rate,
                    "percentiles": r.percentiles,
                    "loadavg": r.loadavg,
                    "status": r.status,
                    "requests_per_s": r.load.requests_per_s if r.load else None,
                }
                for r in mine
            ],
        }
        out.append(row)
    return out


def print_openloop_table(rows: list[OpenLoopRow]) -> None:
    header = ("variant", "load", "server", "offered", "achieved", "p50 ms", "p99 ms", "p99.9 ms", "errors", "rounds")
    table: list[tuple[str, ...]] = [header]
    for r in rows:
        name = display_name(r.server)
        lead = (r.variant, f"{r.percent}%", name, f"{r.rate:,}")
        if r.status != "ok" or not r.details:
            table.append((*lead, r.status, *("-",) * 5))
            continue
        pct = [f"{r.percentiles.get(f'{p:g}', float('nan')):.2f}" for p in OPENLOOP_PERCENTILES]
        table.append(
            (*lead, f"{r.details['requests_per_s']:,.0f}", *pct, str(r.details["errors"]), str(r.details["rounds"]))
        )
    print_columns(table, left=3)
    print_notes(rows, lambda r: f" {r.variant} {r.percent}%")


def scenario_openloop(args: argparse.Namespace) -> list[Row]:
    wrk2 = wrk2_path(args.wrk2)
    if not wrk2 or not os.access(wrk2, os.X_OK):
        log("bench: openloop needs wrk2 (--wrk2 PATH, $WRK2, or wrk2 on PATH); skipped")
        return []
    if not shutil.which("wrk"):
        sys.exit("bench: openloop measures capacity and warms up with wrk; wrk is not on PATH")
    runs: list[OpenLoopRow] = []
    skipped: set[str] = set()
    for rnd in range(1, args.repeat + 1):
        rates = openloop_rates(args)
        for name in args.servers:
            if name in skipped:
                continue
            log(f"bench: openloop {name} round {rnd}/{args.repeat} (load avg {os.getloadavg()[0]:.1f})")
            rows = measure_openloop(server_spec(name), rnd, rates, wrk2, args)
            for row in rows:
                if row.status == "ok":
                    shown = ", ".join(f"p{k} {v:.2f}" for k, v in row.percentiles.items() if k in ("50", "99", "99.9"))
                    log(f"bench:   {row.variant} {row.percent}% ({row.rate:,} req/s): {shown} ms")
                else:
                    log_not_ok(row)
            if all(r.status == "skipped" for r in rows):
                skipped.add(name)
            runs.extend(rows)
    rows = summarize_openloop(runs)
    print_openloop_table(rows)
    print(
        f"\nload: wrk2 -t{args.threads} -c{args.connections} -d{args.duration}s -R RATE --latency, a new connection"
        f" per request; block = 1 in 1000 requests blocks its loop 20 ms, cpu = 1 in 10 burns 5 ms of CPU;"
        f" RATE = LOAD% of {BASELINE}'s closed-loop capacity on the same load, measured each round (offered: median);"
        f" latency from each request's intended"
        f" send time (no coordinated omission); medians of {args.repeat} interleaved round(s);"
        f" {args.workers[0]} workers"
    )
    return list(rows)


SCENARIOS["openloop"] = Scenario(
    "open-loop latency (wrk2 -R) of a mixed app at fixed offered rates, a new connection per request",
    add_openloop_args,
    scenario_openloop,
)


# --------------------------------------------------------------------------- CLI


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text}")
    return value


def int_list(text: str) -> list[int]:
    try:
        values = [positive_int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected a list like 1,2,4: {text}")
    return values


def server_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = []
    for n in names:
        try:
            server_spec(n)
        except KeyError:
            unknown.append(n)
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown server(s) {', '.join(unknown)}; choose from {', '.join(SERVERS)},"
            f" or cluster-server:POLICY with POLICY one of {', '.join(POLICIES)}"
        )
    return names


def common_options() -> argparse.ArgumentParser:
    """The options every scenario takes (a fresh parser each: a scenario may change its defaults)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--servers",
        type=server_list,
        default=list(SERVERS),
        help=f"comma-separated subset of {','.join(SERVERS)} (all)",
    )
    common.add_argument(
        "--workers", type=int_list, default=[2], help="worker counts, e.g. 1,2,4 (default: %(default)s)"
    )
    common.add_argument("--app", default=DEFAULT_APP, help="ASGI app to serve (default: %(default)s)")
    common.add_argument("--start-timeout", type=float, default=30.0, help="seconds a server has to answer (30)")
    common.add_argument(
        "--load-tool",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator; auto = wrk when on PATH, else a Python keep-alive loop",
    )
    common.add_argument("--json", type=Path, metavar="PATH", help="write raw results here")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="scenario", required=True)
    for name, scenario in SCENARIOS.items():
        scenario.add_arguments(
            sub.add_parser(name, parents=[common_options()], help=scenario.help, description=scenario.help)
        )
    return parser


def _exit_on_signal(signum: int, _frame: object) -> None:
    # Servers run in their own sessions: turn SIGTERM/SIGHUP into SystemExit so the
    # ``finally`` blocks stop them instead of leaving them orphaned.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    args.tool, args.tool_reason = load_tool(args.load_tool)
    env = environment(args.tool)
    log(f"bench: {args.scenario} on {env['cpu_count']} CPUs, python {env['python']}, load tool {args.tool}")
    started = time.time()
    rows = SCENARIOS[args.scenario].run(args)
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ("json",)}
        payload = {
            "scenario": args.scenario,
            "started_at": started,
            "environment": env,
            "config": json.loads(json.dumps(config, default=str)),
            "results": [asdict(r) for r in rows],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        log(f"bench: wrote {args.json}")
    return 1 if any(r.status == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
