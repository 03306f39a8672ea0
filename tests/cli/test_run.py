"""The library entry point, ``cluster_server.run(app, **options)``, like ``uvicorn.run``."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cluster_server import BindError, ConfigError, run

from ..conftest import ROOT, free_port, wait_until


def test_bad_option_raises_before_anything_starts() -> None:
    with pytest.raises(ConfigError, match="--workers 0 is below the minimum 1"):
        run("main:app", workers=0, configure_logging=False)
    with pytest.raises(TypeError):
        run("main:app", no_such_option=1, configure_logging=False)


def test_port_in_use_raises_bind_error_before_any_fork() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BindError, match=f"port {port} on 127.0.0.1 is in use"):
            run("main:app", port=port, configure_logging=False)


SCRIPT = """
import os
import cluster_server

async def app(scope, receive, send):  # not importable by name: workers are forked
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = message["type"].rsplit(".", 1)[1]
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(os.getpid()).encode()})

if __name__ == "__main__":
    raise SystemExit(cluster_server.run(app, workers=2, port=int(os.environ["PORT"])))
"""


@contextlib.contextmanager
def python_script(path: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``path`` in its own session; the whole group is killed at the end."""
    log = open(path.with_suffix(".log"), "wb")  # noqa: SIM115 - closed below
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, str(path)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
        log.close()


def test_run_serves_an_app_object(tmp_path: Path) -> None:
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent(SCRIPT))
    port = free_port()
    with python_script(script, port) as proc:
        log = script.with_suffix(".log")
        wait_until(lambda: "all 2 workers ready" in log.read_text(), timeout=20, what="workers ready")
        seen = set()
        for _ in range(100):
            seen.add(int(httpx.get(f"http://127.0.0.1:{port}/", headers={"connection": "close"}, timeout=10).text))
            if len(seen) == 2:
                break
        assert len(seen) == 2 and proc.pid not in seen
        assert "workers ready; serving http://127.0.0.1:" in log.read_text()
        title = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        assert title.startswith("cluster-server: primary [__main__:app]")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(15) == 0


@pytest.mark.parametrize("use_colors", [True, False])
def test_log_lines_look_like_uvicorns(use_colors: bool) -> None:
    """Our formatters (the primary never imports uvicorn's) print what uvicorn's print."""
    import logging

    import uvicorn.logging

    from cluster_server import _logging

    fmt = "%(levelprefix)s [%(process)d] %(message)s"
    ours, theirs = (
        _logging.Formatter(fmt, use_colors=use_colors),
        uvicorn.logging.DefaultFormatter(fmt, use_colors=use_colors),
    )
    for level in (_logging.TRACE, logging.DEBUG, logging.INFO, 25, logging.WARNING, logging.ERROR, logging.CRITICAL):
        record = logging.LogRecord("cluster_server", level, __file__, 1, "worker %d ready", (3,), None)
        record.levelname = "TRACE" if level == _logging.TRACE else logging.getLevelName(level)
        record.color_message = "worker %d is ready"
        assert ours.format(record) == theirs.format(record)
    fmt = '%(levelprefix)s [%(process)d] %(client_addr)s - "%(request_line)s" %(status_code)s'
    ours, theirs = (
        _logging.AccessFormatter(fmt, use_colors=use_colors),
        uvicorn.logging.AccessFormatter(fmt, use_colors=use_colors),
    )
    for status in (101, 200, 304, 404, 503, 999):
        args = ("127.0.0.1:5000", "GET", "/a?b=1", "1.1", status)
        record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', args, None)
        assert ours.format(record) == theirs.format(record)
