"""A primary driven by hand: fake launcher (no fork), fake clock, scripted worker events.

For unit tests of the primary's decisions (rolls, recycling, scaling). Nothing
here forks or sleeps; a test says what each "worker" does and checks what the
primary decided.
"""

from __future__ import annotations

import signal
from typing import Any

from cluster_server._config import Config
from cluster_server.primary.loop import Primary, Worker
from cluster_server.primary.state import WorkerState


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeLauncher:
    """Hands out pids; records every signal sent."""

    def __init__(self) -> None:
        self.next_pid = 100
        self.spawned: list[int] = []
        self.signals: list[tuple[int, int]] = []

    def spawn(self, worker: Worker) -> tuple[int, None]:
        self.next_pid += 1
        self.spawned.append(self.next_pid)
        return self.next_pid, None

    def kill(self, pid: int, sig: int) -> None:
        self.signals.append((pid, sig))

    def got(self, pid: int, sig: int = signal.SIGTERM) -> bool:
        return (pid, sig) in self.signals


EXIT_OK = 0
EXIT_BOOT_FAILURE = 3 << 8
KILLED = signal.SIGKILL  # a wait status: killed by SIGKILL


class Harness:
    """A Primary with N slots, and verbs for what its workers do."""

    def __init__(self, workers: int = 2, **options: Any) -> None:
        self.clock = FakeClock()
        self.launcher = FakeLauncher()
        self.config = Config(app="fake:app", workers=workers, **options)
        self.primary = Primary(self.config, [], launcher=self.launcher, clock=self.clock)

    def start(self) -> Harness:
        """Spawn every slot's worker and make them ready."""
        self.primary.manage_workers()
        for w in list(self.primary.workers.values()):
            self.ready(w.pid)
        return self

    def worker(self, pid: int) -> Worker:
        return self.primary.workers[pid]

    def ready(self, pid: int) -> None:
        self.primary.handle_message(self.worker(pid), {"t": "ready"})

    def heartbeat(self, pid: int, requests: int = 0, connections: int = 0) -> None:
        self.primary.handle_message(self.worker(pid), {"t": "hb", "r": requests, "c": connections})

    def boot_error(self, pid: int, error: str) -> None:
        self.primary.handle_message(self.worker(pid), {"t": "boot_error", "error": error})
        self.exit(pid, EXIT_BOOT_FAILURE)

    def exit(self, pid: int, status: int = EXIT_OK) -> None:
        self.primary.child_exited(pid, status)

    def tick(self, seconds: float = 0.0) -> None:
        self.clock.advance(seconds)
        self.primary.tick()

    def by_state(self, state: WorkerState) -> list[int]:
        return sorted(w.pid for w in self.primary.workers.values() if w.state is state)

    @property
    def serving(self) -> int:
        return len(self.by_state(WorkerState.READY))

    def slot_pids(self) -> list[int | None]:
        return [s.pid for _, s in sorted(self.primary.slots.items())]

    def finish_drains(self) -> None:
        """Every draining worker exits cleanly."""
        for pid in self.by_state(WorkerState.DRAINING):
            self.exit(pid)
