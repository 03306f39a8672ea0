"""What the primary and an HTTP worker agree on, and where a forked worker starts.

The primary imports this module, never ``worker/main.py``: that one imports
uvicorn, asyncio and the app, and is imported by a worker (or a template) only,
after the fork (``worker_main``).
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from cluster_server import _logging, _proc
from cluster_server.wire.spawn import child_main

if TYPE_CHECKING:
    from cluster_server._config import Config

#: exit status of a worker that could not load the app or start it
EXIT_BOOT_FAILURE = 3
#: the signal that makes a worker dump every thread's stack to stderr
DUMP_SIGNAL = signal.SIGUSR1


@dataclass(frozen=True)
class WorkerSpec:
    """What the primary tells a new worker, frozen at fork time."""

    id: int
    generation: int
    primary_pid: int
    listeners: tuple[socket.socket, ...]


def worker_main(
    config: Config,
    spec: WorkerSpec,
    channel_sock: socket.socket,
    close_fds: list[int],
    load: Callable[[Config], Any] | None = None,
) -> NoReturn:
    """Entry point of a forked worker. Never returns: always ``os._exit``.

    ``load`` returns the app (a template passes the app it preloaded, or an
    importer that reloads the project's modules; default: import ``config.app``).
    """

    def body() -> int:
        # First: until then the primary's signal handlers and fds are this process's.
        _proc.after_fork_in_child(close_fds)
        _logging.set_role(f"worker {spec.id}", spec.id)
        from cluster_server.worker.main import run_worker  # uvicorn and the app: after the fork only

        return run_worker(config, spec, channel_sock, load)

    child_main(body, f"worker {spec.id} crashed")


#: the values of a health message's "status" (what --health-path answers)
HEALTH_OK, HEALTH_STARTING, HEALTH_SHUTTING_DOWN = "ok", "starting", "shutting down"
