"""Logging setup, done by the CLI and ``run()`` (never by ``Config``), and the formatters.

Every line says when and who: ``2026-05-01 09:12:03.123 INFO     worker 2[4242]: ...``
(the role, ``primary``, ``worker N``, ``template`` or ``reload watcher``, then the
pid), or, with ``--log-format json``, one JSON object per line. The primary
configures logging once; the processes it forks inherit the configuration and
only name their role (:func:`set_role`). This module imports nothing of
uvicorn: the primary never does. uvicorn's access lines (``client - "GET / HTTP/1.1"
200 OK``) are rebuilt from the record's arguments as uvicorn's AccessFormatter
does; the ``timed`` access lines come from ``worker/access.py``, once the response
is sent, with its size and duration.

``--log-config`` applies a file on top of these defaults, as uvicorn reads it
(.json and .yaml through ``dictConfig``, anything else through ``fileConfig``);
a file that names uvicorn's formatter classes gets these instead, which accept
the same arguments and fields (``levelprefix``, ``client_addr``, ``request_line``,
``status_code``), so a uvicorn logging file works unchanged and the primary still
imports no uvicorn.
"""

from __future__ import annotations

import configparser
import copy
import http
import json
import logging
import logging.config
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster_server._config import Config

TRACE = 5

TEXT_FORMAT = "%(asctime)s %(levelname)-8s %(role)s[%(process)d]: %(message)s"
ACCESS_FORMAT = TEXT_FORMAT.replace("%(message)s", '%(client_addr)s - "%(request_line)s" %(status_code)s')

#: the logger of the ``timed`` access lines (uvicorn's own are ``uvicorn.access``)
ACCESS_LOGGER = "cluster_server.access"

#: uvicorn's formatter classes, and ours that stand in for them in a --log-config file
UVICORN_FORMATTERS = {
    "uvicorn.logging.DefaultFormatter": "cluster_server._logging.Formatter",
    "uvicorn.logging.ColourizedFormatter": "cluster_server._logging.Formatter",
    "uvicorn.logging.AccessFormatter": "cluster_server._logging.AccessFormatter",
}

#: ANSI colours of the level names and status classes, as uvicorn (click.style) shows them
_COLOURS = {TRACE: "34", logging.DEBUG: "36", logging.INFO: "32", logging.WARNING: "33", logging.ERROR: "31"}
_CRITICAL_COLOUR = "91"
_STATUS_COLOURS = {1: "97", 2: "32", 3: "33", 4: "31", 5: "91"}
_BOLD = "1"

_role = "primary"
_worker: int | None = None
_factory_installed = False


def set_role(role: str, worker: int | None = None) -> None:
    """Name the process every later line comes from (a forked child calls it first thing)."""
    global _role, _worker
    _role, _worker = role, worker
    _install_record_factory()


def _install_record_factory() -> None:
    """Give every record ``role`` and ``worker`` attributes (a --log-config format may use them)."""
    global _factory_installed
    if _factory_installed:
        return
    base = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        record.role = _role
        record.worker = _worker
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True


def _colour(text: str, code: str) -> str:
    return f"\x1b[{code}m{text}\x1b[0m"


class Formatter(logging.Formatter):
    """Text lines with the time (milliseconds), level and role; or JSON with ``json=True``.

    Takes uvicorn's ``DefaultFormatter`` arguments (``fmt``, ``datefmt``, ``style``,
    ``use_colors``) and offers its ``levelprefix`` field, so it can stand in for it.
    """

    default_msec_format = "%s.%03d"

    def __init__(
        self,
        fmt: str | None = None,
        datefmt: str | None = None,
        style: Any = "%",
        validate: bool = True,
        *,
        use_colors: bool | None = None,
        json: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(fmt or TEXT_FORMAT, datefmt, style, validate, **kwargs)
        self.use_colors = self.stream_is_tty() if use_colors is None else use_colors
        self.json = json

    def stream_is_tty(self) -> bool:
        return sys.stderr.isatty()

    def formatMessage(self, record: logging.LogRecord) -> str:
        shown = copy.copy(record)  # other handlers may format the same record differently
        fields = shown.__dict__
        fields.setdefault("role", _role)
        fields.setdefault("worker", _worker)
        name = record.levelname
        padding = " " * (8 - len(name))
        fields["levelprefix"] = f"{name}:{padding}"
        code = _CRITICAL_COLOUR if record.levelno == logging.CRITICAL else _COLOURS.get(record.levelno)
        if self.use_colors and code is not None:
            fields["levelprefix"] = f"{_colour(name, code)}:{padding}"
            fields["levelname"] = _colour(name, code) + padding
        if self.use_colors and "color_message" in fields:  # uvicorn's coloured variant of a message
            shown.msg = fields["color_message"]
            fields["message"] = shown.getMessage()
        fields.update(access_fields(record, self.use_colors))
        return super().formatMessage(shown)

    def format(self, record: logging.LogRecord) -> str:
        if not self.json:
            return super().format(record)
        return json.dumps(json_fields(record, self.formatException), ensure_ascii=False, default=str)


class AccessFormatter(Formatter):
    """uvicorn's access line (``client - "GET / HTTP/1.1" 200 OK``), timed and attributed."""

    def __init__(self, fmt: str | None = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(fmt or ACCESS_FORMAT, *args, **kwargs)

    def stream_is_tty(self) -> bool:
        return sys.stdout.isatty()


def access_fields(record: logging.LogRecord, colours: bool = False) -> dict[str, Any]:
    """``client_addr``, ``request_line`` and ``status_code`` of an access record, as uvicorn names them.

    uvicorn logs ``(client, method, path, http_version, status)`` as the record's
    arguments; the ``timed`` lines carry them as attributes.
    """
    fields = getattr(record, "access", None)
    if fields is None:
        args = record.args
        if record.name != "uvicorn.access" or not isinstance(args, tuple) or len(args) != 5:
            return {}
        client, method, path, version, status = args
        fields = {"client": client, "method": method, "path": path, "http_version": version, "status": status}
    try:
        phrase = http.HTTPStatus(int(fields["status"])).phrase
    except (ValueError, TypeError):
        phrase = ""
    status_code = f"{fields['status']} {phrase}"
    request_line = f"{fields['method']} {fields['path']} HTTP/{fields['http_version']}"
    if colours:
        code = _STATUS_COLOURS.get(int(fields["status"]) // 100)
        status_code = _colour(status_code, code) if code else status_code
        request_line = _colour(request_line, _BOLD)
    return {"client_addr": fields["client"], "request_line": request_line, "status_code": status_code}


def json_fields(record: logging.LogRecord, format_exception: Any = None) -> dict[str, Any]:
    """The JSON object of one line: time, level, role, worker, pid, logger, message (+ access fields)."""
    created = time.localtime(record.created)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", created) + f".{int(record.msecs):03d}" + time.strftime("%z", created)
    out: dict[str, Any] = {
        "time": stamp[:-2] + ":" + stamp[-2:],
        "level": record.levelname,
        "role": getattr(record, "role", _role),
        "worker": getattr(record, "worker", _worker),
        "pid": record.process,
        "logger": record.name,
        "message": record.getMessage(),
    }
    access = getattr(record, "access", None)
    if access is None and access_fields(record):
        client, method, path, version, status = record.args  # type: ignore[misc]
        access = {"client": client, "method": method, "path": path, "http_version": version, "status": status}
    if access is not None:
        out.update(access)
    if record.exc_info and format_exception is not None:
        out["exception"] = format_exception(record.exc_info)
    return out


class Demote(logging.Filter):
    """Log some INFO messages at DEBUG (uvicorn's "Started server process [pid]", which
    the primary said already), then drop what falls below the handler's threshold."""

    def __init__(self, messages: frozenset[str], threshold: int) -> None:
        super().__init__()
        self.messages, self.threshold = messages, threshold

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and isinstance(record.msg, str) and record.msg in self.messages:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return record.levelno >= self.threshold


#: uvicorn's per-process lines whose news the primary gives already (spawned, exited), pid and all
REPEATED = frozenset({"Started server process [%d]", "Finished server process [%d]"})
#: under --reload, the steps of each reload, at DEBUG: a save logs what changed and when the
#: new code serves (``reload: app.py changed ...``, ``rolling restart ... done``), no more
RELOAD_STEPS = frozenset(
    {
        "rolling restart to generation %d (%s): %d worker(s)",
        "%s spawned (generation %d)",
        "%s ready in %.2f s",
        "%s draining (%s)",
        "%s exited (%s)",
        "worker draining: %d connection(s), %d with a request in flight; idle ones get %.1f s for one more request",
        "Waiting for application startup.",
        "Application startup complete.",
        "Shutting down",
        "Waiting for application shutdown.",
        "Application shutdown complete.",
    }
)


def level_number(level: str) -> int:
    logging.addLevelName(TRACE, "TRACE")
    return TRACE if level == "trace" else int(logging.getLevelName(level.upper()))


def configure(
    level: str = "info",
    access_log: bool = True,
    use_colors: bool | None = None,
    *,
    log_format: str = "text",
    timed_access: bool = False,
    log_config: str | None = None,
    level_given: bool = True,
    reload: bool = False,
) -> None:
    """Configure logging for the primary and, through fork, for every process it starts.

    ``timed_access``: access lines come from ``cluster_server.access`` once the
    response is sent (the workers then turn uvicorn's own access log off).
    ``reload``: the steps of each reload are logged at DEBUG (``RELOAD_STEPS``).
    """
    _install_record_factory()
    lvl = level_number(level)
    logging.config.dictConfig(_defaults(lvl, access_log, use_colors, log_format == "json", timed_access, reload))
    if log_config is not None:
        apply_file(log_config)
        _over_file(lvl if level_given else None, access_log, reload)


def _defaults(
    lvl: int, access_log: bool, use_colors: bool | None, as_json: bool, timed_access: bool, reload: bool
) -> dict[str, Any]:
    """cluster-server's logging configuration, for ``logging.config.dictConfig``."""
    formatter = {"use_colors": use_colors, "json": as_json}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "default": {"()": "cluster_server._logging.Formatter", **formatter},
            "access": {"()": "cluster_server._logging.AccessFormatter", **formatter},
            "timed": {"()": "cluster_server._logging.Formatter", **formatter, "use_colors": False},
        },
        "filters": {
            "repeated": {
                "()": Demote,
                "messages": REPEATED | (RELOAD_STEPS if reload else frozenset()),
                "threshold": lvl,
            }
        },
        "handlers": {
            "default": {
                "formatter": "default",
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "filters": ["repeated"],
            },
            "access": {"formatter": "access", "class": "logging.StreamHandler", "stream": "ext://sys.stdout"},
            "timed": {"formatter": "timed", "class": "logging.StreamHandler", "stream": "ext://sys.stdout"},
        },
        "loggers": {
            "cluster_server": {"handlers": ["default"], "level": lvl, "propagate": False},
            ACCESS_LOGGER: {
                "handlers": ["timed"] if access_log and timed_access else [],
                "level": lvl,
                "propagate": False,
            },
            "uvicorn": {"handlers": ["default"], "level": lvl, "propagate": False},
            "uvicorn.error": {"level": lvl},
            "uvicorn.access": {
                "handlers": ["access"] if access_log and not timed_access else [],
                "level": lvl,
                "propagate": False,
            },
        },
    }


def _over_file(lvl: int | None, access_log: bool, reload: bool) -> None:
    """After a --log-config file, as uvicorn does: --log-level and --no-access-log still apply."""
    if lvl is not None:
        for name in ("cluster_server", ACCESS_LOGGER, "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
            logging.getLogger(name).setLevel(lvl)
    if not access_log:
        for name in (ACCESS_LOGGER, "uvicorn.access"):
            logging.getLogger(name).handlers = []
            logging.getLogger(name).propagate = False
    if reload:
        for name in ("cluster_server", "uvicorn", "uvicorn.error"):
            logger = logging.getLogger(name)
            for handler in logger.handlers:
                handler.addFilter(Demote(RELOAD_STEPS, max(handler.level, logger.getEffectiveLevel())))


def configure_for(config: Config) -> None:
    """:func:`configure` with every logging option of ``config``."""
    configure(
        config.log_level or "info",
        config.access_log,
        config.use_colors,
        log_format=config.log_format,
        timed_access=timed_access(config),
        log_config=config.log_config,
        level_given=config.log_level is not None,
        reload=config.reload,
    )


def timed_access(config: Config) -> bool:
    """Do the workers log each request once it is sent (size, duration), instead of uvicorn's line?"""
    return config.access_log and (config.access_log_format == "timed" or config.log_format == "json")


def apply_file(path: str) -> None:
    """Apply a --log-config file as uvicorn does: .json / .yaml / .yml to dictConfig, else fileConfig."""
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as fh:
            logging.config.dictConfig(_ours(json.load(fh)))
    elif path.endswith((".yaml", ".yml")):
        import yaml  # optional, as in uvicorn: Config checked it is installed

        with open(path, encoding="utf-8") as fh:
            logging.config.dictConfig(_ours(yaml.safe_load(fh)))
    else:
        parser = configparser.ConfigParser()  # as fileConfig reads a file
        with open(path, encoding="utf-8") as fh:
            parser.read_file(fh)
        for section in parser.sections():
            if section.startswith("formatter_") and parser.get(section, "class", fallback="") in UVICORN_FORMATTERS:
                parser.set(section, "class", UVICORN_FORMATTERS[parser.get(section, "class")])
        logging.config.fileConfig(parser, disable_existing_loggers=False)


def _ours(config: Any) -> Any:
    """A dictConfig whose formatters name uvicorn's classes, naming ours instead."""
    formatters = config.get("formatters") if isinstance(config, dict) else None
    for spec in (formatters or {}).values():
        if isinstance(spec, dict):
            for key in ("()", "class"):
                if spec.get(key) in UVICORN_FORMATTERS:
                    spec[key] = UVICORN_FORMATTERS[spec[key]]
    return config


class Throttle:
    """Log a failure that repeats (EMFILE on every wake-up, say) at most once per ``interval``.

    ``log`` returns True when it logged; the lines skipped meanwhile are counted
    and the next line that is logged says how many there were.
    """

    def __init__(self, logger: logging.Logger, interval: float = 5.0, clock: Any = None) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock or time.monotonic
        self._next = -float("inf")
        self._skipped = 0

    def log(self, level: int, msg: str, *args: Any) -> bool:
        now = self.clock()
        if now < self._next:
            self._skipped += 1
            return False
        if self._skipped:
            msg += f" ({self._skipped} more like it in the last {self.interval:g} s)"
        self.logger.log(level, msg, *args)
        self._next = now + self.interval
        self._skipped = 0
        return True
