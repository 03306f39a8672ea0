"""The library entry points: ``run`` (like ``uvicorn.run``) and ``serve``."""

from __future__ import annotations

from typing import Any

from cluster_server import _logging
from cluster_server._config import Config
from cluster_server.primary.assemble import build_primary


def serve(config: Config) -> int:
    """Bind, fork the workers and supervise them until stopped; returns the exit code.

    Raises ``BindError``, ``AppLoadError`` or ``WorkerBootError`` when the
    cluster cannot start. Does not touch logging configuration.
    """
    return build_primary(config).run()


def run(app: Any, *, configure_logging: bool = True, **options: Any) -> int:
    """Serve ``app`` (an import string or the app object) with a cluster of workers.

    Takes the same options as the CLI (``workers=4``, ``port=8000``...). Raises
    ``ConfigError`` for a bad option before anything starts.
    """
    config = Config(app=app, **options)
    if configure_logging:
        _logging.configure_for(config)
    return serve(config)
