"""The HTTP primary, assembled from the config: every part, in order, in one place.

``build_primary`` is the only place that decides what a primary is made of.
Parts are made first and handed to ``Primary``; nothing is replaced after it is
built. The components' order is the order their hooks are called in (see
``primary/component.py``): the cluster watch comes before those that listen
to its events.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Any

from cluster_server import _proc
from cluster_server._config import Config
from cluster_server.ops import multiproc as _multiproc
from cluster_server.ops import privileges as _privileges
from cluster_server.ops.control import ControlServer
from cluster_server.ops.multiproc import MultiprocDir
from cluster_server.ops.status import ClusterWatch
from cluster_server.ops.systemd import Notifier
from cluster_server.ops.upgrade import PidFile, Upgrader
from cluster_server.primary.component import Component
from cluster_server.primary.launcher import ForkLauncher
from cluster_server.primary.loop import Primary
from cluster_server.primary.messaging import Messaging
from cluster_server.primary.recycle import Recycler
from cluster_server.primary.shutdown_delay import ShutdownDelay
from cluster_server.primary.sockets import bind_listeners, take_inherited
from cluster_server.primary.tls import check_tls
from cluster_server.scheduling.primary import primary_components
from cluster_server.templates.launcher import TemplateLauncher
from cluster_server.templates.process import load_project
from cluster_server.templates.reload import Reloader

if TYPE_CHECKING:
    from cluster_server.ops.metrics import MetricsServer

logger = logging.getLogger("cluster_server")


def build_primary(config: Config) -> Primary:
    """Check the options, bind the sockets, make every part. Raises ``BindError`` or
    ``ConfigError`` when the cluster cannot start (then nothing is left open)."""
    check_tls(config)  # a bad key or certificate: one error now, not a crash loop in every worker
    _privileges.check(config)
    if config.metrics_bind:
        from cluster_server.ops.metrics import parse_bind

        parse_bind(config.metrics_bind)
    _privileges.apply_umask(config)
    handed = take_inherited()  # set when this primary is an upgrade of another
    listeners = bind_listeners(config)
    try:
        reloader = Reloader(config) if config.reload else None
        launcher = _launcher(config, reloader)
        watch = ClusterWatch()
        components: list[Component] = [
            Messaging(),  # cluster.send / broadcast / request from the apps
            watch,  # before the operations components: they listen to its events
            *_operations(config, watch, handed),
            launcher,  # it forks the workers: from a template with --preload / --reload
            *([reloader] if reloader is not None else []),  # --reload: the file watcher
            *primary_components(config),  # --scheduling
            *([ShutdownDelay(config)] if config.health_path is not None or config.shutdown_delay > 0 else []),
            *([Recycler(config)] if Recycler.wanted(config) else []),  # --max-requests...
        ]
        # An upgrade is a new generation of the code: count on from the predecessor's.
        generation = handed["generation"] + 1 if handed and isinstance(handed.get("generation"), int) else 1
        return Primary(config, listeners, launcher=launcher, components=components, generation=generation)
    except BaseException:
        for lst in listeners:
            lst.close()
        raise


def _operations(config: Config, watch: ClusterWatch, handed: dict[str, Any] | None) -> list[Component]:
    """What operators use: systemd notification, the control socket, metrics, the pidfile, upgrades."""
    successor = handed is not None and "ready_fd" in handed  # takes over once its workers are ready
    notifier = Notifier(watch)
    control = None
    if not config.no_control_socket and config.control_socket != "":
        control = ControlServer(
            config.control_socket,
            watch,
            explicit=config.control_socket is not None,
            defer=successor,
            upgrade=lambda: upgrader.start(),  # (made below: it hands this socket over)
        )
    metrics = _metrics_server(config, watch, handed, successor)
    pidfile = PidFile(config.pidfile, defer=successor) if config.pidfile else None
    upgrader = Upgrader(watch, control=control, metrics=metrics, notifier=notifier, pidfile=pidfile)
    if handed is not None:
        watch.restore(handed.get("counters"))  # counters go on across an upgrade
    multiproc = None
    if (multiproc_dir := _multiproc.directory()) is not None:
        # An upgrade's new primary leaves the files alone: the old workers still write there.
        multiproc = MultiprocDir(multiproc_dir, config, wipe=handed is None)
    return [notifier, *(c for c in (control, metrics, pidfile, multiproc) if c is not None), upgrader]


def _metrics_server(
    config: Config, watch: ClusterWatch, handed: dict[str, Any] | None, successor: bool
) -> MetricsServer | None:
    if not config.metrics_bind:
        return None
    from cluster_server.ops.metrics import MetricsServer  # prometheus-client: only when asked for

    inherited = None
    if handed is not None and handed.get("metrics_fd") is not None:
        inherited = socket.socket(fileno=int(handed["metrics_fd"]))
        inherited.set_inheritable(False)
    return MetricsServer(config.metrics_bind, watch, sock=inherited, defer=successor)


def _launcher(config: Config, reloader: Reloader | None) -> ForkLauncher | TemplateLauncher:
    """Fork the workers from a template (``--preload``, ``--reload``) where the system allows, else directly."""
    if not (config.preload or config.reload):
        return ForkLauncher()
    if _proc.set_child_subreaper():
        return TemplateLauncher(config, "deps" if config.reload else "preload", reloader)
    logger.warning(
        "this system cannot re-parent workers to the primary (no PR_SET_CHILD_SUBREAPER): "
        "workers are forked directly, without a template"
    )
    if reloader is None:
        return ForkLauncher()
    rules = reloader.rules
    return ForkLauncher(load=lambda c: load_project(rules, c))
