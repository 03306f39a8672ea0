"""How the primary starts and signals workers: the ``Launcher`` it is given.

``ForkLauncher`` forks each worker straight from the primary; the worker then
imports uvicorn and the app itself (``worker/main.py``, imported in the child
only: the primary never loads it). ``templates/launcher.py`` forks them from a
template process instead (``--preload``, ``--reload``). Tests give the primary
a fake one.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from cluster_server import _proc
from cluster_server._config import Config
from cluster_server.primary.component import Component, override
from cluster_server.wire import channel as _channel
from cluster_server.wire.channel import Channel
from cluster_server.worker.spec import WorkerSpec

if TYPE_CHECKING:
    from cluster_server.primary.loop import Primary, Worker


class Launcher(Protocol):
    def spawn(self, worker: Worker) -> tuple[int, Channel | None]:
        """Start ``worker``: its pid and the primary's end of its channel. Raises OSError."""
        ...

    def kill(self, pid: int, sig: int) -> None: ...


class ForkLauncher(Component):
    """Forks workers for a primary (a component: it needs the primary's fds and sockets)."""

    primary: Primary  # set by attach

    def __init__(self, load: Callable[[Config], Any] | None = None) -> None:
        #: how a new worker gets the app; None: it imports ``config.app``
        self.load = load

    @override
    def attach(self, primary: Primary) -> None:
        self.primary = primary

    def spawn(self, worker: Worker) -> tuple[int, Channel | None]:
        """Fork ``worker``. Raises ``OSError`` (nothing left open) when the primary cannot."""
        ours, theirs = _channel.pair()
        try:
            return self._fork(worker, ours, theirs)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()

    def _fork(self, worker: Worker, ours: socket.socket, theirs: socket.socket) -> tuple[int, Channel]:
        primary = self.primary
        close = [*primary.fds_to_close_in_child(), ours.fileno()]
        spec = WorkerSpec(
            id=worker.id,
            generation=worker.generation,
            primary_pid=os.getpid(),
            listeners=tuple(lst.sock for lst in primary.listeners),
        )
        _proc.flush_output()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns from worker_main
            from cluster_server.worker.main import load_app, worker_main  # uvicorn: in the worker only

            worker_main(primary.config, spec, theirs, close, self.load or load_app)
        return pid, Channel(ours)

    def kill(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
