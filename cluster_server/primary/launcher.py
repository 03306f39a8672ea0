"""How the primary starts and signals workers: the ``Launcher`` it is given.

``ForkLauncher`` forks each worker straight from the primary; the worker then
imports uvicorn and the app itself (``worker/main.py``, imported in the child
only: the primary never loads it). ``templates/launcher.py`` forks them from a
template process instead (``--preload``, ``--reload``). Tests give the primary
a fake one.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from cluster_server._config import Config
from cluster_server.primary.component import Component, override
from cluster_server.wire.channel import Channel
from cluster_server.wire.spawn import fork_child
from cluster_server.worker.spec import WorkerSpec, worker_main

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
        primary = self.primary
        spec = WorkerSpec(
            id=worker.id,
            generation=worker.generation,
            primary_pid=os.getpid(),
            listeners=tuple(lst.sock for lst in primary.listeners),
        )
        main = functools.partial(worker_main, primary.config, spec, load=self.load)
        pid, ours = fork_child(main, primary.fds_to_close_in_child(), block_signals=True)
        return pid, Channel(ours)

    def kill(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
