"""systemd integration: ``sd_notify`` from the primary (socket activation is in ``_sockets``).

With ``Type=notify`` (or ``notify-reload``) systemd hands the service a
datagram socket in ``NOTIFY_SOCKET`` (a path, or an abstract name starting
with ``@``). The primary tells it:

- ``READY=1`` once every worker of the first generation is ready;
- ``RELOADING=1`` (with ``MONOTONIC_USEC=``) when a rolling restart starts, and
  ``READY=1`` again when it ends;
- ``STOPPING=1`` when it starts stopping;
- ``STATUS=3/4 workers ready, generation 2`` whenever that line changes;
- ``MAINPID=`` of its successor, when an upgrade (SIGUSR2) hands over to it.

Workers say nothing: systemd only listens to the main process by default
(``NotifyAccess=main``).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from cluster_server.primary.component import Component, override

if TYPE_CHECKING:
    from cluster_server.ops.status import ClusterWatch
    from cluster_server.primary.loop import Primary

logger = logging.getLogger("cluster_server")


def notify_address(value: str | None = None) -> str | None:
    """``NOTIFY_SOCKET`` as an address for ``sendto`` (``@name`` is abstract: ``\\0name``)."""
    addr = os.environ.get("NOTIFY_SOCKET") if value is None else value
    if not addr:
        return None
    if addr[0] == "@":
        return "\0" + addr[1:]
    if addr[0] != "/":
        return None  # vsock and other forms are not supported
    return addr


class Notifier(Component):
    """Sends state changes to systemd, as a primary component."""

    def __init__(self, watch: ClusterWatch, address: str | None = None) -> None:
        self.watch = watch
        self.address = notify_address(address)
        self.sock: socket.socket | None = None
        self.primary: Primary | None = None
        #: once an upgrade handed over to a successor, this primary says nothing more
        self.silent = False
        self._status = ""
        self._ready = False
        if self.address is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.sock.setblocking(False)
            watch.on("all_ready", self._all_ready)
            watch.on("roll_started", self._roll_started)
            watch.on("roll_finished", self._roll_finished)
            watch.on("stopping", self._stopping)

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram; False if it could not be sent."""
        if self.sock is None or self.address is None or self.silent:
            return False
        try:
            self.sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            logger.debug("sd_notify to %r failed: %s", self.address, exc)
            return False
        return True

    @override
    def attach(self, primary: Primary) -> None:
        self.primary = primary

    @override
    def tick(self) -> None:
        if self.sock is None or self.primary is None:
            return
        line = self.watch.summary()
        if line != self._status:
            self._status = line
            self.notify(f"STATUS={line}")

    def _all_ready(self) -> None:
        self._ready = True
        self.notify("READY=1", f"STATUS={self.watch.summary()}")

    def _roll_started(self, roll: Any) -> None:
        if self._ready:
            self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def _roll_finished(self, roll: Any, outcome: str) -> None:
        if self._ready and outcome != "aborted":
            self.notify("READY=1", f"STATUS={self.watch.summary()}")

    def _stopping(self) -> None:
        self.notify("STOPPING=1")

    def handed_over(self, pid: int) -> None:
        """An upgrade's new primary is ready: it is systemd's main process from now on."""
        self.notify(f"MAINPID={pid}", "READY=1", f"STATUS=upgraded: primary is now pid {pid}")
        self.silent = True

    @override
    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    @override
    def fds_to_close_in_child(self) -> list[int]:
        return [self.sock.fileno()] if self.sock is not None else []
