"""Start the FastAPI example once per uvicorn flag, with that flag, and check that it serves.

    python benchmarks/uvicorn_flags.py                    # every flag, one run each (~1-2 min)
    python benchmarks/uvicorn_flags.py --only http2,header

The flags are read from uvicorn's own click command: every one of them must
have a run below (``RUNS``) or a reason it makes no sense for a served app
(``NOT_A_RUN``), or this script fails before starting anything. Each run
starts ``cluster-server examples.fastapi_app.main:app --port P <flag...>`` in
its own session, waits for ``GET /`` to answer 200 (over TLS, a Unix socket,
an inherited fd or HTTP/2 where the flag calls for it), checks what the flag
promises where a response shows it (a header, a path prefix, an HTTP version),
sends SIGTERM and expects exit status 0. Prints one line per run; exits 1 if
any run failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench import ROOT, free_port, stop_process_group

APP = "examples.fastapi_app.main:app"
#: how long one run may take to serve its first request
START_TIMEOUT = 30.0

Check = Callable[[httpx.Response], str | None]  # None: fine; else what is wrong


@dataclass
class Run:
    """One start of the example: extra arguments, how to reach it, what to check."""

    args: list[str]
    check: Check | None = None
    path: str = "/"
    tls: bool = False
    uds: bool = False
    fd: bool = False
    http2: bool = False
    env: dict[str, str] = field(default_factory=dict)


def header(name: str, value: str | None) -> Check:
    """The response has header ``name`` equal to ``value`` (None: has no such header)."""

    def check(r: httpx.Response) -> str | None:
        got = r.headers.get(name)
        return None if got == value else f"{name}: {got!r}, expected {value!r}"

    return check


def version(expected: str) -> Check:
    def check(r: httpx.Response) -> str | None:
        return None if r.http_version == expected else f"served over {r.http_version}, expected {expected}"

    return check


#: uvicorn flags that are not a way to serve the example (with why)
NOT_A_RUN = {
    "--help": "prints the help",
    "--version": "prints the versions (tests/cli/test_cli.py checks it)",
    "--factory": "the example exports an app, not a factory (tests/cli/test_cli.py parses the flag)",
    "--port": "every run gives it",
}


def runs(tmp: Path, tls: Any) -> dict[str, list[Run]]:
    """Every uvicorn flag -> the runs that exercise it (a choice flag: one run per useful value)."""
    env_file = tmp / "app.env"
    env_file.write_text("CS_FLAGS_SCRIPT=1\n")
    log_config = tmp / "logging.json"
    log_config.write_text(json.dumps({"version": 1, "disable_existing_loggers": False}))
    return {**_plain_runs(tmp, env_file, log_config), **_tls_runs(tls)}


def _tls_runs(tls: Any) -> dict[str, list[Run]]:
    ssl = tls.server_args()
    return {
        "--ssl-keyfile": [Run(ssl, tls=True)],
        "--ssl-certfile": [Run(ssl, tls=True)],
        "--ssl-keyfile-password": [Run([*ssl, "--ssl-keyfile-password", "unused"], tls=True)],
        "--ssl-version": [Run([*ssl, "--ssl-version", "17"], tls=True)],
        "--ssl-cert-reqs": [Run([*ssl, "--ssl-cert-reqs", "1", "--ssl-ca-certs", str(tls.ca_certs)], tls=True)],
        "--ssl-ca-certs": [Run([*ssl, "--ssl-ca-certs", str(tls.ca_certs)], tls=True)],
        "--ssl-ciphers": [Run([*ssl, "--ssl-ciphers", "ECDHE+AESGCM"], tls=True)],
    }


def _plain_runs(tmp: Path, env_file: Path, log_config: Path) -> dict[str, list[Run]]:
    return {
        "--host": [Run(["--host", "127.0.0.1"])],
        "--uds": [Run(["--uds", str(tmp / "s.sock")], uds=True)],
        "--fd": [Run([], fd=True)],
        "--reload": [Run(["--reload"])],
        "--reload-dir": [Run(["--reload", "--reload-dir", str(ROOT / "examples")])],
        "--reload-include": [Run(["--reload", "--reload-include", "*.html"])],
        "--reload-exclude": [Run(["--reload", "--reload-exclude", "benchmarks/*"])],
        "--reload-delay": [Run(["--reload", "--reload-delay", "0.25"])],
        "--workers": [Run(["--workers", "2"])],
        "--loop": [Run(["--loop", v]) for v in ("asyncio", "uvloop", "none")],
        "--http": [Run(["--http", v]) for v in ("h11", "httptools", "zttp")],
        "--http2": [Run(["--http", "zttp", "--http2"], http2=True, check=version("HTTP/2"))],
        "--ws": [Run(["--ws", v]) for v in ("websockets", "websockets-sansio", "wsproto", "none")],
        "--ws-max-size": [Run(["--ws-max-size", "65536"])],
        "--ws-max-queue": [Run(["--ws-max-queue", "8"])],
        "--ws-ping-interval": [Run(["--ws-ping-interval", "5"])],
        "--ws-ping-timeout": [Run(["--ws-ping-timeout", "5"])],
        "--ws-per-message-deflate": [Run(["--ws-per-message-deflate", "false"])],
        "--lifespan": [Run(["--lifespan", "on"])],
        "--interface": [Run(["--interface", "asgi3"])],
        "--env-file": [Run(["--env-file", str(env_file)])],
        "--log-config": [Run(["--log-config", str(log_config)])],
        "--log-level": [Run(["--log-level", "debug"])],
        "--access-log": [Run(["--access-log"])],
        "--no-access-log": [Run(["--no-access-log"])],
        "--use-colors": [Run(["--use-colors"])],
        "--no-use-colors": [Run(["--no-use-colors"])],
        "--proxy-headers": [Run(["--proxy-headers"])],
        "--no-proxy-headers": [Run(["--no-proxy-headers"])],
        "--server-header": [Run(["--server-header"], check=header("server", "uvicorn"))],
        "--no-server-header": [Run(["--no-server-header"], check=header("server", None))],
        "--date-header": [Run(["--date-header"])],
        "--no-date-header": [Run(["--no-date-header"], check=header("date", None))],
        "--forwarded-allow-ips": [Run(["--forwarded-allow-ips", "127.0.0.1"])],
        "--root-path": [Run(["--root-path", "/api"])],  # a proxy strips the prefix: the app is asked for /
        "--limit-concurrency": [Run(["--limit-concurrency", "50"])],
        "--backlog": [Run(["--backlog", "64"])],
        "--limit-max-requests": [Run(["--limit-max-requests", "1000"])],
        "--limit-max-requests-jitter": [Run(["--limit-max-requests", "1000", "--limit-max-requests-jitter", "10"])],
        "--timeout-keep-alive": [Run(["--timeout-keep-alive", "75"])],
        "--timeout-graceful-shutdown": [Run(["--timeout-graceful-shutdown", "5"])],
        "--timeout-worker-healthcheck": [Run(["--timeout-worker-healthcheck", "10"])],
        "--header": [Run(["--header", "X-Flags-Script: yes"], check=header("x-flags-script", "yes"))],
        "--app-dir": [Run(["--app-dir", str(ROOT)])],
        "--h11-max-incomplete-event-size": [Run(["--http", "h11", "--h11-max-incomplete-event-size", "32768"])],
        "--reset-contextvars": [Run(["--reset-contextvars"])],
    }


def uvicorn_flags() -> list[str]:
    from uvicorn.main import main

    return [f for p in main.params if p.param_type_name == "option" for f in (*p.opts, *p.secondary_opts)]


@contextlib.contextmanager
def started(run: Run, tmp: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, int]]:
    """The example with ``run.args``, in its own session; killed by process group afterwards."""
    port = free_port()
    args = [sys.executable, "-m", "cluster_server", APP, *run.args]
    pass_fds: tuple[int, ...] = ()
    listener = None
    if run.fd:
        listener = socket.create_server(("127.0.0.1", port))
        pass_fds = (listener.fileno(),)
        args += ["--fd", str(listener.fileno())]
    elif not run.uds:
        args += ["--port", str(port)]
    log = tmp / f"run-{port}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), **run.env}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, pass_fds=pass_fds
        )
    if listener is not None:
        listener.close()
    try:
        yield proc, str(log), port
    finally:
        stop_process_group(proc, grace=0)


def client(run: Run, tls: Any) -> httpx.Client:
    transport = None
    if run.uds:
        transport = httpx.HTTPTransport(uds=run.args[run.args.index("--uds") + 1])
    verify: Any = tls.client_context() if run.tls else True
    if run.http2:
        return httpx.Client(http1=False, http2=True, timeout=5, verify=verify)
    return httpx.Client(transport=transport, timeout=5, verify=verify)


def one(run: Run, tmp: Path, tls: Any) -> str | None:
    """Start, serve, check, stop: None if all went well, else what went wrong."""
    with started(run, tmp) as (proc, log, port), client(run, tls) as http:
        url = f"{'https' if run.tls else 'http'}://{'localhost' if run.tls else '127.0.0.1'}:{port}{run.path}"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                return f"exited with {proc.returncode}: {Path(log).read_text()[-600:]}"
            try:
                response = http.get(url)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    return f"no answer within {START_TIMEOUT:g} s"
                time.sleep(0.1)
        if response.status_code != 200:
            return f"GET {run.path} answered {response.status_code}"
        problem = run.check(response) if run.check is not None else None
        if problem is not None:
            return problem
        # (closed first: an idle TLS keep-alive connection holds a drain up to --graceful-timeout)
        http.close()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        return None if code == 0 else f"SIGTERM: exit status {code}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="only these uvicorn flags, without dashes: http2,header")
    opts = parser.parse_args(argv)
    only = None if opts.only is None else {"--" + f.strip().lstrip("-") for f in opts.only.split(",")}
    from tests.conftest import TLSFiles  # a throwaway CA (trustme, from the test extra) for the TLS runs

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        tls = TLSFiles(tmp)
        table = runs(tmp, tls)
        missing = [f for f in uvicorn_flags() if f not in table and f not in NOT_A_RUN]
        if missing:
            print(f"no run for uvicorn's {', '.join(missing)}: add one to RUNS or NOT_A_RUN", file=sys.stderr)
            return 1
        failed = 0
        for flag, flag_runs in table.items():
            if only is not None and flag not in only:
                continue
            for run in flag_runs:
                started_at = time.monotonic()
                problem = one(run, tmp, tls)
                took = time.monotonic() - started_at
                failed += problem is not None
                print(f"{'ok  ' if problem is None else 'FAIL'} {flag:32} {' '.join(run.args)[:60]:60} {took:5.1f} s")
                if problem is not None:
                    print(f"     {problem}")
        print(f"{failed} failed" if failed else "every flag served")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
