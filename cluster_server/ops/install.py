"""Plugs what operators use into a primary: status, control socket, metrics,
systemd notification, upgrades, pidfile (each a component in its own module).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster_server._config import Config
from cluster_server.ops import multiproc as _multiproc
from cluster_server.ops import privileges as _privileges
from cluster_server.ops.control import ControlServer
from cluster_server.ops.multiproc import MultiprocDir
from cluster_server.ops.status import ClusterWatch
from cluster_server.ops.systemd import Notifier
from cluster_server.ops.upgrade import PidFile, Upgrader
from cluster_server.primary.sockets import take_inherited

if TYPE_CHECKING:
    from cluster_server.ops.metrics import MetricsServer
    from cluster_server.primary.loop import Primary


@dataclass
class Operations:
    watch: ClusterWatch
    notifier: Notifier
    upgrader: Upgrader
    control: ControlServer | None = None
    metrics: MetricsServer | None = None
    pidfile: PidFile | None = None


def prepare(config: Config) -> None:
    """In the primary, before binding: check the options, set the umask. Raises ConfigError."""
    _privileges.check(config)
    if config.metrics_bind:
        from cluster_server.ops.metrics import parse_bind

        parse_bind(config.metrics_bind)
    _privileges.apply_umask(config)


def install(primary: Primary) -> Operations:
    """Add every operations component to ``primary`` (before ``run``)."""
    config = primary.config
    handed = take_inherited()  # set when this primary is an upgrade of another
    successor = handed is not None and "ready_fd" in handed
    if handed is not None and isinstance(handed.get("generation"), int):
        # An upgrade is a new generation of the code: count on from the predecessor's.
        primary.generation = handed["generation"] + 1
        for slot in primary.slots.values():
            slot.generation = primary.generation
    watch = ClusterWatch()
    if handed is not None:
        watch.restore(handed.get("counters"))  # counters go on across an upgrade
    primary.add_component(watch)  # first: the others listen to its events
    notifier = Notifier(watch)
    primary.add_component(notifier)

    control = None
    if not config.no_control_socket and config.control_socket != "":
        control = ControlServer(
            config.control_socket, watch, explicit=config.control_socket is not None, defer=successor
        )
    metrics = None
    if config.metrics_bind:
        from cluster_server.ops.metrics import MetricsServer

        inherited = None
        if handed is not None and handed.get("metrics_fd") is not None:
            inherited = socket.socket(fileno=int(handed["metrics_fd"]))
            inherited.set_inheritable(False)
        metrics = MetricsServer(config.metrics_bind, watch, sock=inherited, defer=successor)
    pidfile = PidFile(config.pidfile, defer=successor) if config.pidfile else None
    if (multiproc_dir := _multiproc.directory()) is not None:
        # An upgrade's new primary leaves the files alone: the old workers still write there.
        primary.add_component(MultiprocDir(multiproc_dir, config, wipe=handed is None))
    upgrader = Upgrader(watch, control=control, metrics=metrics, notifier=notifier, pidfile=pidfile)
    if control is not None:
        control.upgrade = upgrader.start
    for component in (control, metrics, pidfile, upgrader):
        if component is not None:
            primary.add_component(component)
    return Operations(watch, notifier, upgrader, control, metrics, pidfile)
