"""The library entry points: ``run`` (like ``uvicorn.run``) and ``serve``."""

from __future__ import annotations

from typing import Any

from cluster_server import _logging
from cluster_server._config import Config
from cluster_server.cluster.http import Messaging
from cluster_server.ops import install as _operations
from cluster_server.primary.loop import Primary
from cluster_server.primary.recycle import Recycler
from cluster_server.primary.sockets import bind_listeners
from cluster_server.primary.tls import check_tls
from cluster_server.scheduling.primary import primary_components
from cluster_server.templates import launcher as _launcher
from cluster_server.worker.health import ShutdownDelay


def serve(config: Config) -> int:
    """Bind, fork the workers and supervise them until stopped; returns the exit code.

    Raises ``BindError``, ``AppLoadError`` or ``WorkerBootError`` when the
    cluster cannot start. Does not touch logging configuration.
    """
    check_tls(config)  # a bad key or certificate: one error now, not a crash loop in every worker
    _operations.prepare(config)
    listeners = bind_listeners(config)
    try:
        primary = Primary(config, listeners)
        primary.add_component(Messaging())  # cluster.send/broadcast/request from apps
        _operations.install(primary)
        _launcher.install(primary)  # --preload / --reload
        for component in primary_components(config):
            primary.add_component(component)
    except BaseException:
        for lst in listeners:
            lst.close()
        raise
    if config.health_path is not None or config.shutdown_delay > 0:
        primary.add_component(ShutdownDelay(config))
    if Recycler.wanted(config):
        primary.add_component(Recycler(config))
    return primary.run()


def run(app: Any, *, configure_logging: bool = True, **options: Any) -> int:
    """Serve ``app`` (an import string or the app object) with a cluster of workers.

    Takes the same options as the CLI (``workers=4``, ``port=8000``...). Raises
    ``ConfigError`` for a bad option before anything starts.
    """
    config = Config(app=app, **options)
    if configure_logging:
        _logging.configure_for(config)
    return serve(config)
