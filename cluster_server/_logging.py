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
