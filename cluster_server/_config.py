"""The one immutable configuration, and the declaration every option comes from.

Each option is declared once, as a field of :class:`Config` with
:func:`option` metadata (default, help, flag, environment variable, range).
The click CLI (``cli/main.py``) and the CLI reference in ``docs/`` are generated
from these fields, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import ssl
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from cluster_server._errors import AppStringError, ConfigError

ENV_PREFIX = "CLUSTER_SERVER_"
#: uvicorn reads its options from UVICORN_<NAME> (click's ``auto_envvar_prefix``); so do we, after ours
UVICORN_ENV_PREFIX = "UVICORN_"

LoopType = Literal["auto", "asyncio", "uvloop", "none", "zuvloop"]
HTTPType = Literal["auto", "h11", "httptools", "zttp"]
WSType = Literal["auto", "none", "websockets", "websockets-sansio", "wsproto"]
LifespanType = Literal["auto", "on", "off"]
InterfaceType = Literal["auto", "asgi3", "asgi2", "wsgi"]
LogLevelType = Literal["critical", "error", "warning", "info", "debug", "trace"]
LogFormatType = Literal["text", "json"]
AccessLogFormatType = Literal["uvicorn", "timed"]
SchedulingType = Literal["shared", "round-robin", "least-busy", "reuseport"]

#: --graceful-timeout under --reload unless given: a websocket or a stream must
#: not hold a reload up for long
RELOAD_GRACEFUL_TIMEOUT = 3.0


class DefaultValue(float):
    """A default the user did not choose, so ``__post_init__`` may adapt it to other options."""


@dataclass(frozen=True)
class OptionSpec:
    """How one :class:`Config` field appears on the command line and in the docs."""

    help: str
    group: str
    flag: str | None = None  # defaults to --field-name
    env: tuple[str, ...] = ()  # extra environment variables, after CLUSTER_SERVER_<NAME>
    min: float | None = None
    max: float | None = None
    metavar: str | None = None
    negatable: bool = False  # bool flags: --x/--no-x
    takes_value: bool = False  # bool options written `--x true` (uvicorn's --ws-per-message-deflate)
    cli: bool = True
    #: uvicorn's name for this option (its parameter name; "" when it is ours too), None
    #: when uvicorn has no such option. Where it differs, ``--<uvicorn name>`` is accepted
    #: too; UVICORN_<NAME> is read after CLUSTER_SERVER_<NAME>.
    uvicorn: str | None = None


def option(
    default: Any, help: str, *, group: str = "server", secret: bool = False, uvicorn: bool | str = False, **spec: Any
) -> Any:
    """Declare a Config field: its default plus everything the CLI and docs need.

    ``secret=True`` keeps the value out of ``repr(config)``. ``uvicorn=True``: uvicorn
    has this option under the same name; a string: uvicorn's name for it.
    """
    name = "" if uvicorn is True else (uvicorn or None)
    meta = {"option": OptionSpec(help=help, group=group, uvicorn=name, **spec)}
    if isinstance(default, list | dict | set):
        raise TypeError("mutable defaults are not allowed in Config; use a tuple")
    return field(default=default, metadata=meta, repr=not secret)


@dataclass(frozen=True)
class Config:
    """Everything the primary and its workers need to know, frozen.

    ``app`` is an import string (``"module:attribute"``) or, from Python, the
    application object itself (workers are forked, so it need not be importable).
    """

    app: Any = field(default=None, metadata={"positional": True})

    # -- where to listen --------------------------------------------------------
    host: str = option(
        "127.0.0.1",
        "Bind socket to this host; use '::' for IPv6, '0.0.0.0' for all IPv4.",
        group="socket",
        uvicorn=True,
    )
    port: int = option(
        8000, "Bind socket to this port; 0 picks a free port.", group="socket", min=0, max=65535, uvicorn=True
    )
    uds: str | None = option(
        None, "Bind to this Unix domain socket path instead of host/port.", group="socket", metavar="PATH", uvicorn=True
    )
    fd: int | None = option(
        None, "Serve on this already-open listening file descriptor (inherited).", group="socket", min=0, uvicorn=True
    )
    backlog: int = option(
        2048, "Listen backlog: connections the kernel queues before accept().", group="socket", min=1, uvicorn=True
    )
    ssl_keyfile: str | None = option(None, "TLS private key file.", group="socket", metavar="PATH", uvicorn=True)
    ssl_certfile: str | None = option(None, "TLS certificate file (PEM).", group="socket", metavar="PATH", uvicorn=True)
    ssl_keyfile_password: str | None = option(
        None,
        "Password of an encrypted --ssl-keyfile (prefer the environment variable).",
        group="socket",
        secret=True,
        uvicorn=True,
    )
    ssl_version: int = option(
        int(ssl.PROTOCOL_TLS_SERVER),
        "TLS protocol, as a number of Python's ssl.PROTOCOL_* constants (the default, "
        f"{int(ssl.PROTOCOL_TLS_SERVER)}, is PROTOCOL_TLS_SERVER: the highest version both sides speak).",
        group="socket",
        min=0,
        uvicorn=True,
    )
    ssl_ca_certs: str | None = option(
        None,
        "CA certificates file (PEM) to verify client certificates with.",
        group="socket",
        metavar="PATH",
        uvicorn=True,
    )
    ssl_cert_reqs: int = option(
        0,
        "Client certificates: 0 not asked for, 1 verified if sent, 2 required (needs --ssl-ca-certs).",
        group="socket",
        min=0,
        max=2,
        uvicorn=True,
    )
    ssl_ciphers: str | None = option(
        None,
        "TLS 1.2 ciphers, in OpenSSL's cipher-list format (default: OpenSSL's).",
        group="socket",
        uvicorn=True,
    )

    # -- processes --------------------------------------------------------------
    workers: int = option(
        1,
        "Number of worker processes.",
        group="processes",
        min=1,
        max=1024,
        env=("WEB_CONCURRENCY",),
        uvicorn=True,
    )
    graceful_timeout: float = option(
        DefaultValue(30.0),
        "Seconds a stopping worker gets to finish in-flight requests before SIGKILL "
        f"(default {RELOAD_GRACEFUL_TIMEOUT:g} under --reload).",
        group="processes",
        min=0,
        uvicorn="timeout_graceful_shutdown",
    )
    ready_timeout: float = option(
        60.0,
        "Seconds a new worker gets to import the app and finish lifespan startup.",
        group="processes",
        min=0.1,
    )
    worker_timeout: float = option(
        30.0,
        "Replace a worker whose event loop sent no heartbeat for this many seconds "
        "(its stack is dumped to the log first); 0 disables.",
        group="processes",
        min=0,
        uvicorn="timeout_worker_healthcheck",
    )
    heartbeat_interval: float = option(
        1.0, "Seconds between heartbeats a worker sends from its event loop.", group="processes", min=0.05
    )
    max_requests: int = option(
        0,
        "Recycle a worker after it served this many requests (a new worker is started and ready "
        "before the old one drains); 0 disables.",
        group="processes",
        min=0,
        uvicorn="limit_max_requests",
    )
    max_requests_jitter: int = option(
        0,
        "Add a random 0..N to --max-requests for each worker, so they do not recycle together.",
        group="processes",
        min=0,
        uvicorn="limit_max_requests_jitter",
    )
    max_worker_memory: float = option(
        0.0,
        "Recycle a worker whose own memory exceeds this many MiB (its unique set size, from "
        "/proc/PID/smaps_rollup, sampled every second: pages shared with --preload's template "
        "do not count); 0 disables.",
        group="processes",
        min=0,
        metavar="MIB",
    )
    max_worker_lifetime: float = option(
        0.0, "Recycle a worker after it served for this many seconds; 0 disables.", group="processes", min=0
    )
    max_worker_lifetime_jitter: float = option(
        0.0, "Add a random 0..N seconds to --max-worker-lifetime for each worker.", group="processes", min=0
    )
    shutdown_delay: float = option(
        0.0,
        "After SIGTERM, keep serving this many seconds, with --health-path answering 503, before draining: "
        "time for load balancers and Kubernetes to stop sending traffic.",
        group="processes",
        min=0,
    )

    scheduling: SchedulingType = option(
        "shared",
        "How connections reach workers: every worker accepts on the shared socket, once a "
        "connection's request has arrived, and the kernel picks among the workers whose event loop "
        "is free (shared); or the primary hands each one to the worker with the fewest busy "
        "connections (least-busy) or to the next worker in turn (round-robin); or each worker binds "
        "its own SO_REUSEPORT socket (reuseport). See docs/scheduling.md.",
        group="processes",
    )

    # -- the app ----------------------------------------------------------------
    interface: InterfaceType = option("auto", "Application interface.", group="app", uvicorn=True)
    factory: bool = option(
        False, "Treat APP as a factory: call it with no arguments to get the app.", group="app", uvicorn=True
    )
    preload: bool = option(
        False,
        "Import the app once in a template process and fork the workers from it (after gc.freeze(), "
        "so they share its memory); SIGHUP re-creates the template from the new source first.",
        group="app",
    )
    app_dir: str = option(
        ".", "Look for APP in this directory (prepended to sys.path).", group="app", metavar="DIR", uvicorn=True
    )
    env_file: str | None = option(
        None,
        "Load environment variables from this dotenv file in each worker (python-dotenv; a variable "
        "already set in the environment wins).",
        group="app",
        metavar="PATH",
        uvicorn=True,
    )
    root_path: str = option("", "ASGI root_path, for an app mounted below a path prefix.", group="app", uvicorn=True)
    lifespan: LifespanType = option("auto", "Run the ASGI lifespan protocol.", group="app", uvicorn=True)
    wsgi_threads: int = option(
        10,
        "Per worker: threads that run a WSGI app, so at most this many WSGI requests at once.",
        group="app",
        min=1,
        max=1024,
    )
    reset_contextvars: bool = option(
        False,
        "Run each request in a fresh contextvars.Context (context set in the lifespan is not seen).",
        group="app",
        uvicorn=True,
    )

    # -- HTTP -------------------------------------------------------------------
    loop: LoopType = option(
        "auto",
        "Event loop implementation ('none': asyncio's default policy; 'zuvloop' needs the zuvloop package).",
        group="http",
        uvicorn=True,
    )
    http: HTTPType = option(
        "auto",
        "HTTP protocol implementation ('zttp' needs the zttp package).",
        group="http",
        uvicorn=True,
    )
    http2: bool = option(
        False,
        "Also serve HTTP/2 (needs --http zttp): negotiated by ALPN over TLS, by prior knowledge (h2c) in clear text.",
        group="http",
        uvicorn=True,
    )
    ws: WSType = option("auto", "WebSocket protocol implementation.", group="http", uvicorn=True)
    ws_max_size: int = option(
        16777216, "Largest WebSocket message accepted, in bytes.", group="http", min=1, metavar="BYTES", uvicorn=True
    )
    ws_max_queue: int = option(
        32, "Most WebSocket messages queued for the app before reading pauses.", group="http", min=1, uvicorn=True
    )
    ws_ping_interval: float = option(20.0, "Seconds between WebSocket pings.", group="http", min=0, uvicorn=True)
    ws_ping_timeout: float = option(
        20.0, "Seconds to wait for a WebSocket pong before closing.", group="http", min=0, uvicorn=True
    )
    ws_per_message_deflate: bool = option(
        True, "WebSocket per-message-deflate compression (true or false).", group="http", takes_value=True, uvicorn=True
    )
    proxy_headers: bool = option(
        True,
        "Trust X-Forwarded-Proto/For from --forwarded-allow-ips.",
        group="http",
        negatable=True,
        uvicorn=True,
    )
    forwarded_allow_ips: str | None = option(
        None,
        "Comma-separated IPs/networks trusted for proxy headers ('*' for all; default: $FORWARDED_ALLOW_IPS "
        "or 127.0.0.1,::1).",
        group="http",
        uvicorn=True,
    )
    server_header: bool = option(True, "Send a 'Server: uvicorn' header.", group="http", negatable=True, uvicorn=True)
    date_header: bool = option(True, "Send a 'Date' header.", group="http", negatable=True, uvicorn=True)
    headers: tuple[str, ...] = option(
        (),
        "Add this header to every response (repeatable).",
        group="http",
        flag="--header",
        metavar="NAME:VALUE",
        uvicorn=True,
    )
    timeout_keep_alive: int = option(
        5,
        "Close idle keep-alive connections after this many seconds (behind a load balancer: longer than "
        "its idle timeout, see docs/deployment.md).",
        group="http",
        min=0,
        uvicorn=True,
    )
    limit_concurrency: int | None = option(
        None, "Per worker: answer 503 beyond this many concurrent connections/tasks.", group="http", min=1, uvicorn=True
    )
    h11_max_incomplete_event_size: int | None = option(
        None, "h11: largest request head in bytes (default: h11's 16 KiB).", group="http", min=1, uvicorn=True
    )
    health_path: str | None = option(
        None,
        "Answer GET/HEAD on this path in every worker, before the app: 200 'ok' while serving, "
        "503 once the server is shutting down (for readiness and liveness probes).",
        group="http",
        metavar="PATH",
    )
    timeout_request_header: float = option(
        20.0,
        "Close a connection that has not sent a complete request head this many seconds after "
        "it opened (or after the first byte of a keep-alive request); 0 disables.",
        group="http",
        min=0,
    )
    max_request_head_size: int = option(
        65536,
        "Answer 431 and close when a request line plus headers exceed this many bytes "
        "(httptools has no limit of its own; h11 also applies --h11-max-incomplete-event-size).",
        group="http",
        min=1024,
    )

    # -- reloading (development) ------------------------------------------------
    reload: bool = option(
        False,
        "Development: when a watched file changes, replace the workers with ones running the new code "
        "(the old ones serve until the new ones are ready).",
        group="reload",
        uvicorn=True,
    )
    reload_dirs: tuple[str, ...] = option(
        (),
        "Watch this directory for --reload (repeatable; default: the current directory).",
        group="reload",
        flag="--reload-dir",
        uvicorn=True,
        metavar="DIR",
    )
    reload_includes: tuple[str, ...] = option(
        (),
        "Also reload when a file matching this glob changes (repeatable; *.py always counts).",
        group="reload",
        flag="--reload-include",
        uvicorn=True,
        metavar="GLOB",
    )
    reload_excludes: tuple[str, ...] = option(
        (),
        "Ignore files and directories matching this glob (repeatable; .git, __pycache__, virtualenvs "
        "and editor swap files are always ignored).",
        group="reload",
        flag="--reload-exclude",
        uvicorn=True,
        metavar="GLOB",
    )
    reload_delay: float = option(
        0.01,
        "Seconds without further changes before a reload starts (debounce).",
        group="reload",
        min=0,
        max=10,
        metavar="SECONDS",
        uvicorn=True,
    )

    # -- operations (see docs/operations.md) ------------------------------------
    control_socket: str | None = option(
        None,
        "Unix socket (mode 0600) that `cluster-server ctl` talks to. Default: "
        "<runtime dir>/cluster-server/<address>.sock; '' disables it.",
        group="operations",
        metavar="PATH",
    )
    no_control_socket: bool = option(False, "Open no control socket.", group="operations")
    metrics_bind: str | None = option(
        None,
        "Serve Prometheus metrics at http://HOST:PORT/metrics from the primary.",
        group="operations",
        metavar="HOST:PORT",
    )
    user: str | None = option(
        None,
        "Workers switch to this user (name or uid) before loading the app; the primary keeps its own.",
        group="operations",
        metavar="NAME|UID",
    )
    group: str | None = option(
        None,
        "Workers switch to this group (name or gid); default: the --user's group.",
        group="operations",
        metavar="NAME|GID",
    )
    umask: str | None = option(
        None,
        "File mode creation mask, in octal (e.g. 022), for the primary and its workers.",
        group="operations",
        metavar="OCTAL",
    )
    pidfile: str | None = option(
        None, "Write the primary's pid to this file (removed at exit).", group="operations", metavar="PATH"
    )

    # -- logging ----------------------------------------------------------------
    log_level: LogLevelType | None = option(
        None, "Log level (default: info; with --log-config, the file's levels).", group="logging", uvicorn=True
    )
    log_config: str | None = option(
        None,
        "Configure logging from this file, as uvicorn does: .json or .yaml/.yml (needs PyYAML) for "
        "logging.config.dictConfig, anything else for logging.config.fileConfig (INI).",
        group="logging",
        metavar="PATH",
        uvicorn=True,
    )
    log_format: LogFormatType = option(
        "text",
        "'text': one line per event, with time, level and who logged it (primary, worker N); "
        "'json': one JSON object per line (time, level, role, worker, pid, message; access lines add "
        "client, method, path, status, duration_ms, bytes).",
        group="logging",
    )
    access_log: bool = option(True, "Log each request.", group="logging", negatable=True, uvicorn=True)
    access_log_format: AccessLogFormatType = option(
        "uvicorn",
        "'uvicorn': uvicorn's access line, written when the response starts; 'timed': the same line "
        "once the response is sent, with its size in bytes and its duration in ms.",
        group="logging",
    )
    use_colors: bool | None = option(
        None,
        "Colour the log level (default: when the output is a terminal).",
        group="logging",
        negatable=True,
        uvicorn=True,
    )

    def __post_init__(self) -> None:
        hints = _field_types()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if typing.get_origin(hints[f.name]) is tuple and isinstance(value, list):
                value = tuple(value)
                object.__setattr__(self, f.name, value)
            spec = f.metadata.get("option")
            if spec is not None:
                _check_field(f.name, spec, hints[f.name], value)
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ConfigError("--ssl-keyfile and --ssl-certfile go together; give both or neither")
        if self.ssl_certfile is None and (
            self.ssl_ca_certs is not None or self.ssl_cert_reqs or self.ssl_keyfile_password is not None
        ):
            raise ConfigError("--ssl-ca-certs, --ssl-cert-reqs and --ssl-keyfile-password need --ssl-certfile")
        if self.ssl_cert_reqs and self.ssl_ca_certs is None:
            raise ConfigError(
                f"--ssl-cert-reqs {self.ssl_cert_reqs} verifies client certificates: give --ssl-ca-certs too"
            )
        for name in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs", "env_file", "log_config"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"--{_flag(name)} {path}: no such file; check the path")
        if isinstance(self.app, str):
            module, sep, attr = self.app.partition(":")
            if not (module and sep and attr):
                raise AppStringError(f"APP must look like 'module:attribute' (e.g. main:app), not {self.app!r}")
        elif self.app is None:
            raise ConfigError("no APP given; pass 'module:attribute' (e.g. main:app)")
        if self.health_path is not None and not self.health_path.startswith("/"):
            raise ConfigError(f"--health-path must start with '/' (e.g. /healthz), not {self.health_path!r}")
        if self.uds is not None and self.fd is not None:
            raise ConfigError("--uds and --fd are alternatives; give one of them")
        if self.scheduling == "reuseport" and (self.uds is not None or self.fd is not None):
            raise ConfigError(
                "--scheduling reuseport needs --host/--port (each worker binds its own socket); "
                "with --uds or --fd use round-robin, least-busy or shared"
            )
        self._check_reload()
        self._check_uvicorn_extras()

    def _check_uvicorn_extras(self) -> None:
        """Options whose values need a package that may be missing, or a partner option."""
        for header in self.headers:
            name, sep, _ = header.partition(":")
            if not (sep and name.strip()):
                raise ConfigError(f"--header {header!r} must look like 'Name:Value' (e.g. 'X-Frame-Options:DENY')")
        if self.http2 and self.http != "zttp":
            raise ConfigError("--http2 needs --http zttp (uvicorn's HTTP/2 implementation); add --http zttp")
        needs = {"zttp": self.http == "zttp", "zuvloop": self.loop == "zuvloop"}
        if self.log_config is not None and self.log_config.endswith((".yaml", ".yml")):
            needs["yaml"] = True
        for module, wanted in needs.items():
            if wanted and importlib.util.find_spec(module) is None:
                raise ConfigError(_MISSING[module])

    def _check_reload(self) -> None:
        if not self.reload:
            return
        if self.preload:
            raise ConfigError(
                "--reload and --preload are alternatives: --reload already forks workers from a "
                "template that imported the dependencies; drop --preload"
            )
        if not isinstance(self.app, str):
            raise ConfigError("--reload needs APP as an import string ('module:attribute'), not an app object")
        for d in self.reload_dirs:
            if not os.path.isdir(d):
                raise ConfigError(f"--reload-dir {d}: no such directory; check the path")
        if type(self.graceful_timeout) is DefaultValue:
            object.__setattr__(self, "graceful_timeout", RELOAD_GRACEFUL_TIMEOUT)

    def replace(self, **changes: Any) -> Config:
        """A copy with some options changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def app_name(self) -> str:
        if isinstance(self.app, str):
            return self.app
        return f"{getattr(self.app, '__module__', '?')}:{getattr(self.app, '__qualname__', type(self.app).__name__)}"


#: what to say when an option's value needs a package that is not installed
_MISSING = {
    "zttp": "--http zttp needs the zttp package, which is not installed: pip install zttp",
    "zuvloop": "--loop zuvloop needs the zuvloop package, which is not installed; use --loop uvloop or asyncio",
    "yaml": "--log-config with a YAML file needs PyYAML, which is not installed: pip install pyyaml "
    "(or give a .json or .ini file)",
}


def _flag(name: str) -> str:
    return name.replace("_", "-")


def cli_flag(name: str, spec: OptionSpec) -> str:
    """The option's command-line flag: ``spec.flag``, else ``--field-name``."""
    return spec.flag or f"--{_flag(name)}"


@typing.no_type_check
def _field_types() -> dict[str, Any]:
    global _TYPES
    if _TYPES is None:
        _TYPES = typing.get_type_hints(Config)
    return _TYPES


_TYPES: dict[str, Any] | None = None


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``int | None`` -> (int, True); ``int`` -> (int, False)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _check_field(name: str, spec: OptionSpec, tp: Any, value: Any) -> None:
    base, optional = unwrap_optional(tp)
    flag = cli_flag(name, spec)
    if value is None:
        if optional:
            return
        raise ConfigError(f"{flag} needs a value")
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        if value not in choices:
            raise ConfigError(f"{flag} {value!r} is not one of {', '.join(map(str, choices))}")
        return
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{flag} takes true or false, not {value!r}")
        return
    if base in (int, float):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (base is int and not isinstance(value, int))
        ):
            raise ConfigError(f"{flag} takes a number, not {value!r}")
        if spec.min is not None and value < spec.min:
            raise ConfigError(f"{flag} {value} is below the minimum {spec.min:g}")
        if spec.max is not None and value > spec.max:
            raise ConfigError(f"{flag} {value} is above the maximum {spec.max:g}")
        return
    if base is str and not isinstance(value, str):
        raise ConfigError(f"{flag} takes text, not {value!r}")
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        if not isinstance(value, tuple) or not all(isinstance(v, item) for v in value):
            raise ConfigError(f"{flag} takes a list of {item.__name__} values, not {value!r}")


def options() -> list[tuple[dataclasses.Field[Any], OptionSpec]]:
    """Every declared option, in declaration order."""
    return [(f, f.metadata["option"]) for f in dataclasses.fields(Config) if "option" in f.metadata]


def uvicorn_name(name: str, spec: OptionSpec) -> str | None:
    """uvicorn's parameter name for the option ``name``, or None if uvicorn has no such option."""
    return None if spec.uvicorn is None else (spec.uvicorn or name)


def cli_flags(name: str, spec: OptionSpec) -> list[str]:
    """Every flag that sets the option: ours first, then uvicorn's spelling where it differs."""
    flags = [cli_flag(name, spec)]
    theirs = uvicorn_name(name, spec)
    if theirs is not None and theirs != name:
        flags.append("--" + _flag(theirs))
    return flags


def env_vars(name: str, spec: OptionSpec) -> list[str]:
    """The environment variables that set the option, the first set one winning:
    CLUSTER_SERVER_<NAME>, then uvicorn's UVICORN_<NAME>, then any other (WEB_CONCURRENCY)."""
    theirs = uvicorn_name(name, spec)
    uvicorn = [] if theirs is None else [UVICORN_ENV_PREFIX + theirs.upper()]
    return [ENV_PREFIX + name.upper(), *uvicorn, *spec.env]
