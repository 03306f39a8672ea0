"""What the primary and an HTTP worker agree on, importable without the worker's code.

The primary imports this module, never ``worker/main.py``: that one imports
uvicorn, asyncio and the app, and runs only in a forked worker (or a template).
"""

from __future__ import annotations

import signal
import socket
from dataclasses import dataclass

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
