"""The one immutable config: defaults, validation, and the option declarations."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from cluster_server import Config, ConfigError
from cluster_server._config import ENV_PREFIX, env_vars, option, options
from cluster_server.cli.main import GROUP_TITLES


def test_defaults() -> None:
    c = Config(app="main:app")
    assert (c.host, c.port, c.workers, c.graceful_timeout) == ("127.0.0.1", 8000, 1, 30.0)
    assert c.app_name == "main:app"


@pytest.mark.parametrize(
    "name",
    [
        "host",
        "port",
        "uds",
        "fd",
        "backlog",
        "ssl_keyfile",
        "ssl_certfile",
        "loop",
        "http",
        "ws",
        "lifespan",
        "interface",
        "factory",
        "root_path",
        "proxy_headers",
        "timeout_keep_alive",
        "limit_concurrency",
        "access_log",
        "h11_max_incomplete_event_size",
        "http2",
        "ws_max_size",
        "ws_max_queue",
        "ws_ping_interval",
        "ws_ping_timeout",
        "ws_per_message_deflate",
        "server_header",
        "date_header",
        "ssl_version",
        "ssl_cert_reqs",
        "ssl_ciphers",
        "reset_contextvars",
        "use_colors",
        "log_level",
    ],
)
def test_defaults_match_uvicorn(name: str) -> None:
    """A flag that means the same as uvicorn's has uvicorn's default."""
    assert getattr(Config(app="main:app"), name) == getattr(uvicorn.Config("main:app"), name)


def test_config_is_frozen() -> None:
    c = Config(app="main:app")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.workers = 4  # type: ignore[misc]


def test_replace_makes_a_validated_copy() -> None:
    c = Config(app="main:app")
    d = c.replace(workers=4)
    assert (c.workers, d.workers) == (1, 4)
    with pytest.raises(ConfigError, match="--workers 0 is below the minimum 1"):
        c.replace(workers=0)


def test_app_may_be_an_object() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    c = Config(app=app)
    assert c.app is app
    assert c.app_name.endswith(":test_app_may_be_an_object.<locals>.app")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"app": None}, "no APP given"),
        ({"app": "main"}, "APP must look like 'module:attribute'"),
        ({"app": "main:"}, "APP must look like 'module:attribute'"),
        ({"app": ":app"}, "APP must look like 'module:attribute'"),
        ({"workers": 0}, "--workers 0 is below the minimum 1"),
        ({"workers": 2000}, "--workers 2000 is above the maximum 1024"),
        ({"workers": "4"}, "--workers takes a number, not '4'"),
        ({"workers": 2.5}, "--workers takes a number, not 2.5"),
        ({"workers": True}, "--workers takes a number, not True"),
        ({"port": 70000}, "--port 70000 is above the maximum 65535"),
        ({"port": -1}, "--port -1 is below the minimum 0"),
        ({"port": None}, "--port needs a value"),
        ({"graceful_timeout": -1}, "--graceful-timeout -1 is below the minimum 0"),
        ({"ready_timeout": 0}, "--ready-timeout 0 is below the minimum 0.1"),
        ({"loop": "trio"}, "--loop 'trio' is not one of auto, asyncio, uvloop"),
        ({"log_level": "loud"}, "--log-level 'loud' is not one of critical, error"),
        ({"access_log": "yes"}, "--access-log takes true or false, not 'yes'"),
        ({"host": 127}, "--host takes text, not 127"),
        ({"ssl_keyfile": "key.pem"}, "--ssl-keyfile and --ssl-certfile go together"),
        ({"uds": "/tmp/x.sock", "fd": 3}, "--uds and --fd are alternatives"),
        ({"env_file": "/nonexistent/.env"}, "--env-file /nonexistent/.env: no such file"),
    ],
)
def test_bad_values_raise_config_error(options: dict[str, Any], message: str) -> None:
    kwargs = {"app": "main:app", **options}
    with pytest.raises(ConfigError) as info:
        Config(**kwargs)
    assert message in str(info.value)
    # uvicorn exits 3 for an APP that is not an import string, 2 for a bad option
    assert info.value.exit_code == (3 if message.startswith("APP must") else 2)


def test_tls_files_must_exist(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match=r"--ssl-keyfile .*key\.pem: no such file"):
        Config(app="main:app", ssl_certfile=str(cert), ssl_keyfile=str(tmp_path / "key.pem"))
    key = tmp_path / "key.pem"
    key.write_text("x")
    assert Config(app="main:app", ssl_certfile=str(cert), ssl_keyfile=str(key)).ssl_keyfile == str(key)


def test_every_field_but_app_is_a_declared_option() -> None:
    declared = {f.name for f, _ in options()}
    assert declared == {f.name for f in dataclasses.fields(Config)} - {"app"}
    for f, spec in options():
        assert spec.help.endswith("."), f"help of {f.name} should be a sentence"
        assert spec.group in GROUP_TITLES, f"{f.name}: unknown group {spec.group}"


def test_env_vars() -> None:
    specs = dict((f.name, spec) for f, spec in options())
    assert env_vars("workers", specs["workers"]) == [ENV_PREFIX + "WORKERS", "UVICORN_WORKERS", "WEB_CONCURRENCY"]
    assert env_vars("port", specs["port"]) == ["CLUSTER_SERVER_PORT", "UVICORN_PORT"]
    assert env_vars("max_requests", specs["max_requests"]) == [
        "CLUSTER_SERVER_MAX_REQUESTS",
        "UVICORN_LIMIT_MAX_REQUESTS",
    ]
    assert env_vars("scheduling", specs["scheduling"]) == ["CLUSTER_SERVER_SCHEDULING"]


def test_mutable_defaults_are_refused() -> None:
    with pytest.raises(TypeError, match="mutable defaults"):
        option([], "A list.")
