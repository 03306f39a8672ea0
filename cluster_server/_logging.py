"""Logging setup, done by the CLI and ``run()``: never by ``Config``."""

from __future__ import annotations

import logging
import logging.config
from typing import Any

TRACE = 5


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
                "()": "uvicorn.logging.DefaultFormatter",
                "fmt": "%(levelprefix)s [%(process)d] %(message)s",
                "use_colors": use_colors,
            },
            "access": {
                "()": "uvicorn.logging.AccessFormatter",
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
