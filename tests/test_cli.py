"""The command line generated from the option declarations.

Most tests build the real click command with a callback that keeps the
``Config`` instead of serving, so they run in-process in milliseconds; the
real callback is used where it fails before anything is bound.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from cluster_server import Config, __version__
from cluster_server._config import options
from cluster_server.cli.main import build_command, cli

#: the uvicorn flags issue #2 promises, spelled as uvicorn spells them
UVICORN_FLAGS = [
    "--host",
    "--port",
    "--uds",
    "--fd",
    "--workers",
    "--loop",
    "--http",
    "--ws",
    "--lifespan",
    "--interface",
    "--factory",
    "--app-dir",
    "--env-file",
    "--root-path",
    "--proxy-headers",
    "--no-proxy-headers",
    "--forwarded-allow-ips",
    "--log-level",
    "--access-log",
    "--no-access-log",
    "--timeout-keep-alive",
    "--limit-concurrency",
    "--backlog",
    "--ssl-keyfile",
    "--ssl-certfile",
    "--version",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CLUSTER_SERVER_") or name == "WEB_CONCURRENCY":
            monkeypatch.delenv(name)


def parse(args: list[str], env: dict[str, str] | None = None) -> Config:
    """Run the generated command line; return the Config it would serve."""
    seen: list[Config] = []

    def keep(app: str, **values: Any) -> None:
        seen.append(Config(app=app, **values))

    result = CliRunner().invoke(build_command(keep), args, env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return seen[0]


def invoke(args: list[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, args, env=env)


def test_no_flags_gives_the_defaults() -> None:
    assert parse(["main:app"]) == Config(app="main:app")


def test_uvicorn_style_command_line() -> None:
    c = parse(
        [
            "main:app",
            "--host",
            "::1",
            "--port",
            "9000",
            "--workers",
            "4",
            "--loop",
            "asyncio",
            "--http",
            "h11",
            "--ws",
            "none",
            "--lifespan",
            "off",
            "--interface",
            "asgi3",
            "--factory",
            "--app-dir",
            "src",
            "--root-path",
            "/api",
            "--no-proxy-headers",
            "--forwarded-allow-ips",
            "10.0.0.1",
            "--log-level",
            "warning",
            "--no-access-log",
            "--timeout-keep-alive",
            "15",
            "--limit-concurrency",
            "100",
            "--backlog",
            "64",
            "--graceful-timeout",
            "2.5",
        ]
    )
    assert c == Config(
        app="main:app",
        host="::1",
        port=9000,
        workers=4,
        loop="asyncio",
        http="h11",
        ws="none",
        lifespan="off",
        interface="asgi3",
        factory=True,
        app_dir="src",
        root_path="/api",
        proxy_headers=False,
        forwarded_allow_ips="10.0.0.1",
        log_level="warning",
        access_log=False,
        timeout_keep_alive=15,
        limit_concurrency=100,
        backlog=64,
        graceful_timeout=2.5,
    )


def test_every_promised_uvicorn_flag_is_here_and_spelled_like_uvicorns() -> None:
    ours = {opt for p in cli.params for opt in (*p.opts, *getattr(p, "secondary_opts", []))}
    uvicorn_cli: click.Command = importlib.import_module("uvicorn.main").main
    theirs = {opt for p in uvicorn_cli.params for opt in (*p.opts, *getattr(p, "secondary_opts", []))}
    for flag in UVICORN_FLAGS:
        assert flag in ours, f"{flag} is missing"
        assert flag in theirs, f"{flag} is not uvicorn's spelling"
    assert "--graceful-timeout" in ours


def test_every_declared_option_is_a_flag_with_its_env_vars() -> None:
    params = {p.name: p for p in cli.params}
    for f, _ in options():
        param = params[f.name]
        assert isinstance(param, click.Option)
        assert param.envvar[0] == "CLUSTER_SERVER_" + f.name.upper()


def test_environment_variables() -> None:
    c = parse(
        [],
        env={
            "CLUSTER_SERVER_APP": "env:app",
            "CLUSTER_SERVER_PORT": "9001",
            "CLUSTER_SERVER_LOOP": "asyncio",
            "CLUSTER_SERVER_ACCESS_LOG": "false",
            "CLUSTER_SERVER_GRACEFUL_TIMEOUT": "7",
        },
    )
    assert (c.app, c.port, c.loop, c.access_log, c.graceful_timeout) == ("env:app", 9001, "asyncio", False, 7.0)


@pytest.mark.parametrize(
    ("args", "env", "workers"),
    [
        ([], {"WEB_CONCURRENCY": "3"}, 3),
        ([], {"WEB_CONCURRENCY": "3", "CLUSTER_SERVER_WORKERS": "2"}, 2),
        (["--workers", "4"], {"WEB_CONCURRENCY": "3", "CLUSTER_SERVER_WORKERS": "2"}, 4),
        ([], {}, 1),
    ],
)
def test_workers_precedence(args: list[str], env: dict[str, str], workers: int) -> None:
    assert parse(["main:app", *args], env=env).workers == workers


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--workers", "0"], {}, "Invalid value for '--workers'"),
        (["--port", "abc"], {}, "Invalid value for '--port'"),
        (["--port", "70000"], {}, "Invalid value for '--port'"),
        (["--loop", "trio"], {}, "Invalid value for '--loop'"),
        (["--graceful-timeout", "-1"], {}, "Invalid value for '--graceful-timeout'"),
        (["--no-such-flag"], {}, "No such option '--no-such-flag'"),
        ([], {"WEB_CONCURRENCY": "many"}, "WEB_CONCURRENCY"),
    ],
)
def test_invalid_flag_values_end_with_one_error_line(args: list[str], env: dict[str, str], says: str) -> None:
    result = invoke(["main:app", *args], env=env)
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and says in errors[0], result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["main"], "Error: APP must look like 'module:attribute' (e.g. main:app), not 'main'"),
        (["main:app", "--ssl-keyfile", "k.pem"], "Error: --ssl-keyfile and --ssl-certfile go together"),
        (["main:app", "--uds", "/tmp/s", "--fd", "3"], "Error: --uds and --fd are alternatives"),
    ],
)
def test_config_errors_end_with_one_error_line(args: list[str], says: str) -> None:
    result = invoke(args)
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(says), result.stderr
    assert result.stdout == ""


def test_missing_app() -> None:
    result = invoke([])
    assert result.exit_code == 2
    assert "Missing argument 'APP'" in result.stderr


def test_version_and_help() -> None:
    result = invoke(["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"cluster-server, version {__version__}\n"
    result = invoke(["--help"])
    assert result.exit_code == 0
    for f, spec in options():
        assert (spec.flag or "--" + f.name.replace("_", "-")) in result.stdout
    assert "WEB_CONCURRENCY" in result.stdout
    assert invoke(["-h"]).stdout == result.stdout


def test_python_dash_m_runs_the_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cluster_server", "--version"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0
    assert out.stdout.strip() == f"cluster-server, version {__version__}"
