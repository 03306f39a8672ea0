"""Logging setup, done by the CLI and ``run()``: never by ``Config``.

The formatters are ours, not uvicorn's: naming ``uvicorn.logging`` in the
config would import uvicorn (and asyncio) into the primary, which never runs
it. They print what uvicorn 0.54's ``DefaultFormatter`` and ``AccessFormatter``
print, colours included.
"""

from __future__ import annotations

import copy
import http
import logging
import logging.config
import sys
from typing import Any

TRACE = 5

#: ANSI colours of the level names and status codes, as uvicorn shows them
_COLOURS = {"blue": 34, "cyan": 36, "green": 32, "yellow": 33, "red": 31, "bright_red": 91, "bright_white": 97}
_LEVEL_COLOURS = {
    TRACE: "blue",
    logging.DEBUG: "cyan",
    logging.INFO: "green",
    logging.WARNING: "yellow",
    logging.ERROR: "red",
    logging.CRITICAL: "bright_red",
}
_STATUS_COLOURS = {1: "bright_white", 2: "green", 3: "yellow", 4: "red", 5: "bright_red"}


def _style(text: str, colour: str | None = None, bold: bool = False) -> str:
    prefix = (f"\033[{_COLOURS[colour]}m" if colour else "") + ("\033[1m" if bold else "")
    return f"{prefix}{text}\033[0m"


class LevelPrefixFormatter(logging.Formatter):
    """``%(levelprefix)s`` is the level name, a colon and padding (``INFO:     ``), coloured
    with ``use_colors`` (default: when stdout is a terminal). A record's
    ``color_message`` extra replaces its message when colours are on."""

    def __init__(self, fmt: str | None = None, datefmt: str | None = None, use_colors: bool | None = None) -> None:
        self.use_colors = use_colors if use_colors is not None else sys.stdout.isatty()
        super().__init__(fmt=fmt, datefmt=datefmt)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record = copy.copy(record)
        name = record.levelname
        padding = " " * (8 - len(name))
        if self.use_colors:
            colour = _LEVEL_COLOURS.get(record.levelno)
            name = _style(name, colour) if colour else name
            if "color_message" in record.__dict__:
                record.msg = record.__dict__["color_message"]
                record.__dict__["message"] = record.getMessage()
        record.__dict__["levelprefix"] = f"{name}:{padding}"
        return super().formatMessage(record)


class AccessFormatter(LevelPrefixFormatter):
    """uvicorn's access lines: its record's args are (client, method, path, HTTP version, status)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record = copy.copy(record)
        args: Any = record.args
        client_addr, method, full_path, http_version, status_code = args
        try:
            phrase = http.HTTPStatus(int(status_code)).phrase
        except ValueError:
            phrase = ""
        status = f"{status_code} {phrase}"
        request_line = f"{method} {full_path} HTTP/{http_version}"
        if self.use_colors:
            colour = _STATUS_COLOURS.get(int(status_code) // 100)
            status = _style(status, colour) if colour else status
            request_line = _style(request_line, bold=True)
        record.__dict__.update({"client_addr": client_addr, "request_line": request_line, "status_code": status})
        return super().formatMessage(record)


def configure(level: str = "info", access_log: bool = True, use_colors: bool | None = None) -> None:
    """One line per event; workers inherit this through fork.

    Lines carry the process id, so a worker's lines and the primary's can be told
    apart; uvicorn's access log keeps its own format.
    """
    logging.addLevelName(TRACE, "TRACE")
    lvl = TRACE if level == "trace" else logging.getLevelName(level.upper())
    config: dict[str, Any] = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "default": {
                "()": LevelPrefixFormatter,
                "fmt": "%(levelprefix)s [%(process)d] %(message)s",
                "use_colors": use_colors,
            },
            "access": {
                "()": AccessFormatter,
                "fmt": '%(levelprefix)s [%(process)d] %(client_addr)s - "%(request_line)s" %(status_code)s',
                "use_colors": use_colors,
            },
        },
        "handlers": {
            "default": {"formatter": "default", "class": "logging.StreamHandler", "stream": "ext://sys.stderr"},
            "access": {"formatter": "access", "class": "logging.StreamHandler", "stream": "ext://sys.stdout"},
        },
        "loggers": {
            "cluster_server": {"handlers": ["default"], "level": lvl, "propagate": False},
            "uvicorn": {"handlers": ["default"], "level": lvl, "propagate": False},
            "uvicorn.error": {"level": lvl},
            "uvicorn.access": {
                "handlers": ["access"] if access_log else [],
                "level": lvl,
                "propagate": False,
            },
        },
    }
    logging.config.dictConfig(config)


class Throttle:
    """Log a failure that repeats (EMFILE on every wake-up, say) at most once per ``interval``.

    ``log`` returns True when it logged; the lines skipped meanwhile are counted
    and the next line that is logged says how many there were.
    """

    def __init__(self, logger: logging.Logger, interval: float = 5.0, clock: Any = None) -> None:
        import time

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
