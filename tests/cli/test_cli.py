"""The command line generated from the option declarations.

Most tests build the real click command with a callback that keeps the
``Config`` instead of serving, so they run in-process in milliseconds; the
real callback is used where it fails before anything is bound.
"""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
import sys
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from cluster_server import Config, __version__
from cluster_server._config import options
from cluster_server.cli import uvicorn_compat
from cluster_server.cli.main import GROUP_TITLES, build_command, cli

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
        if name.startswith(("CLUSTER_SERVER_", "UVICORN_")) or name in ("WEB_CONCURRENCY", "FORWARDED_ALLOW_IPS"):
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
    ("args", "says", "code"),
    [
        # uvicorn exits 3 (STARTUP_FAILURE) for an APP that is not an import string
        (["main"], "Error: APP must look like 'module:attribute' (e.g. main:app), not 'main'", 3),
        (["main:app", "--ssl-keyfile", "k.pem"], "Error: --ssl-keyfile and --ssl-certfile go together", 2),
        (["main:app", "--uds", "/tmp/s", "--fd", "3"], "Error: --uds and --fd are alternatives", 2),
        (["main:app", "--http2"], "Error: --http2 needs --http zttp", 2),
        (["main:app", "--header", "no-colon"], "Error: --header 'no-colon' must look like 'Name:Value'", 2),
    ],
)
def test_config_errors_end_with_one_error_line(args: list[str], says: str, code: int) -> None:
    result = invoke(args)
    assert result.exit_code == code
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
    uvicorn_version = importlib.import_module("uvicorn").__version__
    assert result.stdout == (
        f"cluster-server {__version__} with uvicorn {uvicorn_version}, "
        f"{platform.python_implementation()} {platform.python_version()} on {platform.system()}\n"
    )
    result = invoke(["--help"])
    assert result.exit_code == 0
    for f, spec in options():
        assert (spec.flag or "--" + f.name.replace("_", "-")) in result.stdout
    assert "WEB_CONCURRENCY" in result.stdout
    assert invoke(["-h"]).stdout == result.stdout


def test_help_lists_the_options_by_group() -> None:
    out = invoke(["--help"]).stdout
    titles = [f"{title} options:" for title in GROUP_TITLES.values()]
    where = [out.index(t) for t in titles]
    assert where == sorted(where), "sections in GROUP_TITLES order"
    for f, spec in options():
        flag = spec.flag or "--" + f.name.replace("_", "-")
        section = titles[list(GROUP_TITLES).index(spec.group)]
        following = [w for w in where if w > out.index(section)]
        end = min(following) if following else len(out)
        assert flag in out[out.index(section) : end], f"{flag} is not under {section}"


def test_python_dash_m_runs_the_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "cluster_server", "--version"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0
    assert out.stdout.startswith(f"cluster-server {__version__} with uvicorn ")


# -- uvicorn's command line, flag by flag ---------------------------------------


def _flags(command: click.Command) -> set[str]:
    return {flag for p in command.params for flag in uvicorn_compat.flags_of(p)}


def test_every_uvicorn_flag_is_accepted_or_refused_with_a_reason() -> None:
    """Read uvicorn's own click command: each of its flags must be one of ours, or refused with a reason."""
    theirs = _flags(uvicorn_compat.uvicorn_command()) - {"--help"}
    assert len(theirs) > 50, theirs  # uvicorn 0.54 has 57
    ours = _flags(cli)
    unknown = sorted(f for f in theirs if f not in ours and f not in uvicorn_compat.REFUSED)
    assert unknown == [], f"uvicorn flags neither accepted nor in uvicorn_compat.REFUSED: {unknown}"
    refused = set(uvicorn_compat.REFUSED)
    assert refused <= theirs, "REFUSED names a flag uvicorn does not have"
    assert not refused & _flags(build_command(refused={})), "a flag is both accepted and refused"


def test_a_refused_uvicorn_flag_ends_with_one_line_naming_the_equivalent() -> None:
    command = build_command(refused={"--frobnicate": "--frobnicate: use --x instead (cluster-server does y)"})
    result = CliRunner().invoke(command, ["main:app", "--frobnicate", "3"])
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == ["Error: --frobnicate: use --x instead (cluster-server does y)"]


@pytest.mark.parametrize(
    ("args", "field", "value"),
    [
        (["--limit-max-requests", "7"], "max_requests", 7),
        (["--max-requests", "7"], "max_requests", 7),
        (["--limit-max-requests-jitter", "3"], "max_requests_jitter", 3),
        (["--timeout-graceful-shutdown", "4"], "graceful_timeout", 4.0),
        (["--graceful-timeout", "4"], "graceful_timeout", 4.0),
        (["--timeout-worker-healthcheck", "6"], "worker_timeout", 6.0),
        (["--ws-per-message-deflate", "false"], "ws_per_message_deflate", False),
        (["--ws-max-size", "1024", "--ws-max-size", "2048"], "ws_max_size", 2048),
        (["--no-server-header"], "server_header", False),
        (["--no-date-header"], "date_header", False),
        (["--header", "X-A:1", "--header", "X-B: two"], "headers", ("X-A:1", "X-B: two")),
        (["--ssl-version", "2"], "ssl_version", 2),
        (["--reset-contextvars"], "reset_contextvars", True),
        (["--no-use-colors"], "use_colors", False),
        (["--loop", "none"], "loop", "none"),
    ],
)
def test_uvicorn_flags_set_the_option_they_name(args: list[str], field: str, value: Any) -> None:
    assert getattr(parse(["main:app", *args]), field) == value


@pytest.mark.parametrize(
    ("env", "field", "value"),
    [
        ({"UVICORN_HOST": "0.0.0.0"}, "host", "0.0.0.0"),
        ({"UVICORN_HOST": "0.0.0.0", "CLUSTER_SERVER_HOST": "::1"}, "host", "::1"),  # ours wins
        ({"UVICORN_WORKERS": "3", "WEB_CONCURRENCY": "2"}, "workers", 3),  # as in uvicorn
        ({"UVICORN_LIMIT_MAX_REQUESTS": "9"}, "max_requests", 9),
        ({"UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN": "2"}, "graceful_timeout", 2.0),
        ({"UVICORN_PROXY_HEADERS": "false"}, "proxy_headers", False),
        ({"UVICORN_RELOAD_DIRS": "a b"}, "reload_dirs", ("a", "b")),
    ],
)
def test_uvicorn_environment_variables(env: dict[str, str], field: str, value: Any) -> None:
    seen: list[dict[str, Any]] = []
    command = build_command(lambda app, **values: seen.append(values))
    result = CliRunner().invoke(command, ["main:app"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert seen[0][field] == value


def test_uvicorn_app_variable() -> None:
    assert parse([], env={"UVICORN_APP": "env:app"}).app == "env:app"
    assert parse([], env={"UVICORN_APP": "env:app", "CLUSTER_SERVER_APP": "ours:app"}).app == "ours:app"
