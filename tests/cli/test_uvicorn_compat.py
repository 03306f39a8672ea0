"""A uvicorn user's first hour, with real processes: the environment, --env-file, logs, HTTP/2.

The flag-by-flag check against uvicorn's click command is in test_cli.py; here
each behaviour a uvicorn user relies on is checked on a running server.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from ..conftest import HELLO_APP, ROOT, Server, asgi_app, wait_until
from ..primary.test_sockets import has_ipv6_loopback

StartServer = Callable[..., Server]
WriteApp = Callable[[str, str], Path]

#: answers the environment variables whose names the query string lists, as JSON
ENV_APP = asgi_app(
    "import json, os",
    """
    names = scope["query_string"].decode().split(",")
    body = json.dumps({n: os.environ.get(n) for n in names}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
    """,
)

#: every line of a text log: time, level, who (role and pid), message
LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (TRACE|DEBUG|INFO|WARNING|ERROR|CRITICAL) +"
    r"(primary|worker \d+|template|reload watcher)\[\d+\]: \S"
)


def test_uvicorn_host_variable_is_read(start_server: StartServer, write_app: WriteApp) -> None:
    """An image built for uvicorn (UVICORN_HOST) listens where it says."""
    if not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    write_app("hello", HELLO_APP)
    server = start_server("hello:app", env={"UVICORN_HOST": "::1"}).wait_ready()
    assert httpx.get(f"http://[::1]:{server.port}/", timeout=10).status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{server.port}/", timeout=10)


#: python-dotenv's own cases (its README): a comment after a value, escapes in double
#: quotes only, ${VAR} expansion, `export`, an empty value; and the environment wins
DOTENV = r"""
# a comment line
PLAIN=plain # a comment after the value
DOUBLE="l1\nl2"
SINGLE='raw\n'
EXPANDED=${CS_TEST_BASE}/sub
export EXPORTED=yes
PRESET=from-the-file
EMPTY=
"""


def test_env_file_is_read_as_python_dotenv_reads_it(
    start_server: StartServer, write_app: WriteApp, tmp_path: Path
) -> None:
    dotenv = pytest.importorskip("dotenv")
    write_app("envapp", ENV_APP)
    env_file = tmp_path / "app.env"
    env_file.write_text(DOTENV)
    env = {"PRESET": "from-the-environment", "CS_TEST_BASE": "/base"}
    server = start_server("envapp:app", "--env-file", str(env_file), env=env).wait_ready()
    names = ["PLAIN", "DOUBLE", "SINGLE", "EXPANDED", "EXPORTED", "PRESET", "EMPTY"]
    seen = server.get("/?" + ",".join(names)).json()
    assert seen == {
        "PLAIN": "plain",
        "DOUBLE": "l1\nl2",
        "SINGLE": "raw\\n",
        "EXPANDED": "/base/sub",
        "EXPORTED": "yes",
        "PRESET": "from-the-environment",  # uvicorn's rule: the environment wins over the file
        "EMPTY": "",
    }
    # ... which is what python-dotenv itself makes of the file
    parsed = dotenv.dotenv_values(env_file)
    assert {n: seen[n] for n in names if n not in ("PRESET", "EXPANDED")} == {
        n: parsed[n] for n in names if n not in ("PRESET", "EXPANDED")
    }


def _stop(server: Server) -> None:
    server.signal(signal.SIGTERM)
    assert server.wait_exit(15) == 0


def test_text_lines_are_timestamped_and_attributed(start_server: StartServer, write_app: WriteApp) -> None:
    write_app("hello", HELLO_APP)
    server = start_server("hello:app", "--workers", "2", "--access-log-format", "timed").wait_ready()
    assert server.get("/x?y=1").status_code == 200
    server.wait_log('"GET /x?y=1 HTTP/1.1" 200 OK')
    _stop(server)
    lines = server.log().splitlines()
    assert [line for line in lines if not LINE.match(line)] == []
    assert any(" primary[" in line for line in lines) and any(" worker 2[" in line for line in lines)
    access = [line for line in lines if '"GET /x?y=1 HTTP/1.1"' in line]
    timed = r'\]: 127\.0\.0\.1:\d+ - "GET /x\?y=1 HTTP/1\.1" 200 OK \d+ B \d+\.\d ms$'
    assert len(access) == 1 and re.search(timed, access[0]), access
    assert "Started server process" not in server.log(), "the pid once: the primary says which worker started"


def test_json_lines(start_server: StartServer, write_app: WriteApp) -> None:
    write_app("hello", HELLO_APP)
    server = start_server("hello:app", "--log-format", "json").wait_ready()
    pid = server.get("/j").text
    server.wait_log('"path": "/j"')
    _stop(server)
    records = [json.loads(line) for line in server.log().splitlines()]
    for r in records:
        assert {"time", "level", "role", "worker", "pid", "logger", "message"} <= r.keys(), r
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$", r["time"])
    assert {r["role"] for r in records} == {"primary", "worker 1"}
    (access,) = [r for r in records if r.get("path") == "/j"]
    assert access["worker"] == 1 and access["pid"] == int(pid) and access["method"] == "GET"
    assert access["status"] == 200 and access["bytes"] == len(pid) and access["duration_ms"] >= 0
    assert access["client"].startswith("127.0.0.1:")


LOG_CONFIGS = {
    "json": json.dumps(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {
                "plain": {"()": "uvicorn.logging.DefaultFormatter", "fmt": "CUSTOM %(levelprefix)s %(message)s"},
                "access": {
                    "()": "uvicorn.logging.AccessFormatter",
                    "fmt": 'CUSTOM-ACCESS %(client_addr)s "%(request_line)s" %(status_code)s',
                },
            },
            "handlers": {
                "plain": {"class": "logging.FileHandler", "filename": "LOGFILE", "formatter": "plain"},
                "access": {"class": "logging.FileHandler", "filename": "LOGFILE", "formatter": "access"},
            },
            "loggers": {
                "uvicorn.error": {"handlers": ["plain"], "level": "INFO", "propagate": False},
                "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
                "cluster_server": {"handlers": ["plain"], "level": "INFO", "propagate": False},
            },
        }
    ),
    "yaml": """
        version: 1
        disable_existing_loggers: false
        formatters:
          plain: {"()": uvicorn.logging.DefaultFormatter, fmt: "CUSTOM %(levelprefix)s %(message)s"}
          access:
            "()": uvicorn.logging.AccessFormatter
            fmt: 'CUSTOM-ACCESS %(client_addr)s "%(request_line)s" %(status_code)s'
        handlers:
          plain: {class: logging.FileHandler, filename: LOGFILE, formatter: plain}
          access: {class: logging.FileHandler, filename: LOGFILE, formatter: access}
        loggers:
          uvicorn.error: {handlers: [plain], level: INFO, propagate: false}
          uvicorn.access: {handlers: [access], level: INFO, propagate: false}
          cluster_server: {handlers: [plain], level: INFO, propagate: false}
    """,
    "ini": """
        [loggers]
        keys=root,error,access,cs

        [handlers]
        keys=plain,access

        [formatters]
        keys=plain,access

        [logger_root]
        handlers=

        [logger_error]
        qualname=uvicorn.error
        handlers=plain
        level=INFO
        propagate=0

        [logger_access]
        qualname=uvicorn.access
        handlers=access
        level=INFO
        propagate=0

        [logger_cs]
        qualname=cluster_server
        handlers=plain
        level=INFO
        propagate=0

        [handler_plain]
        class=FileHandler
        args=('LOGFILE',)
        formatter=plain

        [handler_access]
        class=FileHandler
        args=('LOGFILE',)
        formatter=access

        [formatter_plain]
        class=uvicorn.logging.DefaultFormatter
        format=CUSTOM %(levelprefix)s %(message)s

        [formatter_access]
        class=uvicorn.logging.AccessFormatter
        format=CUSTOM-ACCESS %(client_addr)s "%(request_line)s" %(status_code)s
    """,
}


@pytest.mark.parametrize("kind", sorted(LOG_CONFIGS))
def test_log_config_as_uvicorn_reads_it(
    start_server: StartServer, write_app: WriteApp, tmp_path: Path, kind: str
) -> None:
    """A uvicorn logging file (naming uvicorn's formatter classes) works unchanged."""
    if kind == "yaml":
        pytest.importorskip("yaml")
    write_app("hello", HELLO_APP)
    logfile = tmp_path / "custom.log"
    config = tmp_path / f"logging.{kind}"
    config.write_text(textwrap.dedent(LOG_CONFIGS[kind]).replace("LOGFILE", str(logfile)))
    server = start_server("hello:app", "--log-config", str(config))
    wait_until(lambda: "workers ready" in logfile.read_text(), 20, what="workers ready, in the file")
    assert server.get("/c").status_code == 200
    wait_until(lambda: "CUSTOM-ACCESS" in logfile.read_text(), what="an access line")
    text = logfile.read_text()
    assert re.search(r'^CUSTOM-ACCESS 127\.0\.0\.1:\d+ "GET /c HTTP/1\.1" 200 OK$', text, re.M), text
    assert "CUSTOM INFO:     all 1 workers ready" in text  # the primary's lines
    assert "CUSTOM INFO:     Application startup complete." in text  # a worker's
    assert "workers ready" not in server.log(), "the file's handlers replaced the default ones"


#: load cluster_server._logging alone (not the package's __init__), with uvicorn and
#: asyncio made unimportable, apply a --log-config file, log an access line
NO_UVICORN = """
import logging, sys, types
for name in ("uvicorn", "asyncio"):
    sys.modules[name] = None  # importing it now raises ImportError
package = types.ModuleType("cluster_server")
package.__path__ = [{package!r}]
sys.modules["cluster_server"] = package
from cluster_server import _logging
_logging.configure(log_config={config!r})
logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "c:1", "GET", "/", "1.1", 404)
logging.getLogger("cluster_server").info("hello")
"""


@pytest.mark.parametrize("kind", ["json", "ini"])
def test_a_uvicorn_log_config_does_not_import_uvicorn(tmp_path: Path, kind: str) -> None:
    """The primary applies --log-config, and must still import neither uvicorn nor asyncio."""
    config = tmp_path / f"logging.{kind}"
    config.write_text(textwrap.dedent(LOG_CONFIGS[kind]).replace("LOGFILE", str(tmp_path / "x.log")))
    script = NO_UVICORN.format(package=str(ROOT / "cluster_server"), config=str(config))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = (tmp_path / "x.log").read_text().splitlines()
    assert lines == ['CUSTOM-ACCESS c:1 "GET / HTTP/1.1" 404 Not Found', "CUSTOM INFO:     hello"]


@pytest.mark.parametrize("policy", ["least-busy", "shared"])
def test_http2_through_zttp(start_server: StartServer, write_app: WriteApp, policy: str) -> None:
    """`--http zttp --http2`: a real HTTP/2 client (prior knowledge, h2c) and an HTTP/1.1 one, on one port."""
    pytest.importorskip("zttp")
    pytest.importorskip("h2")
    write_app("hello", HELLO_APP)
    server = start_server(
        "hello:app", "--workers", "2", "--http", "zttp", "--http2", "--scheduling", policy
    ).wait_ready()
    with httpx.Client(http1=False, http2=True, timeout=10) as h2:
        answers = [h2.get(f"{server.url}/") for _ in range(5)]
    assert {r.http_version for r in answers} == {"HTTP/2"}
    assert all(r.status_code == 200 and int(r.text) in server.worker_pids() for r in answers)
    h1 = httpx.get(f"{server.url}/", timeout=10)
    assert h1.http_version == "HTTP/1.1" and h1.status_code == 200
    server.wait_log('"GET / HTTP/2" 200 OK')
