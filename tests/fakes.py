"""The one set of fakes for the unit tests: a clock, a launcher, a primary driven by hand.

For unit tests of the primary's decisions (rolls, recycling, scaling) and of
its components. Nothing here forks or sleeps; a test says what each "worker"
does and checks what the primary decided. ``FakePrimary`` stands in for the
whole primary where a component (the connection hand-off) is tested alone.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

from cluster_server._config import Config
from cluster_server.primary.loop import Primary, Worker
from cluster_server.primary.state import WorkerState
from cluster_server.wire.channel import Channel, pair


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeLauncher:
    """Forks nothing: hands out pids and records every spawn and signal.

    With ``channels=True`` each worker gets a real channel: the primary holds one
    end, the test the other (``peers[pid]``, a plain blocking socket;
    ``received(pid)`` reads what the primary sent there).
    """

    def __init__(self, channels: bool = False) -> None:
        self.next_pid = 100
        self.spawned: list[int] = []  # pids, in spawn order
        self.workers: list[Worker] = []  # the same, as the primary's rows
        self.kills: list[tuple[int, int]] = []  # (pid, signal), in order
        self.events: list[tuple[str, Any, Any]] = []  # ("spawn", id, generation) and ("kill", pid, sig)
        self.channels = channels
        self.peers: dict[int, socket.socket] = {}  # pid -> the worker's end of its channel
        self._ours: list[Channel] = []
        self._far: dict[int, Channel] = {}

    @property
    def signals(self) -> list[tuple[int, int]]:
        return self.kills

    def attach(self, primary: Any) -> None:
        pass

    def spawn(self, worker: Worker) -> tuple[int, Channel | None]:
        self.next_pid += 1
        self.spawned.append(self.next_pid)
        self.workers.append(worker)
        self.events.append(("spawn", worker.id, worker.generation))
        if not self.channels:
            return self.next_pid, None
        ours, theirs = pair()
        self.peers[self.next_pid] = theirs
        self._ours.append(Channel(ours))
        return self.next_pid, self._ours[-1]

    def kill(self, pid: int, sig: int) -> None:
        self.kills.append((pid, sig))
        self.events.append(("kill", pid, sig))

    def got(self, pid: int, sig: int = signal.SIGTERM) -> bool:
        return (pid, sig) in self.kills

    def signals_to(self, pid: int) -> list[int]:
        return [s for p, s in self.kills if p == pid]

    def received(self, pid: int) -> list[dict[str, Any]]:
        """What the primary sent worker ``pid`` since the last call (its valid messages)."""
        far = self._far.get(pid)
        if far is None:
            far = self._far[pid] = Channel(self.peers[pid])
        return [m for m, _ in far.receive() if isinstance(m, dict)]

    def close(self) -> None:
        for sock in self.peers.values():
            sock.close()
        for ch in self._ours:
            ch.close()


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


class FakePrimary:
    """Stands in for the primary where one component is tested alone: records what is sent
    and which fds are watched; ``broken`` workers' channels are gone."""

    def __init__(self, listeners: list[Any] | None = None) -> None:
        self.now = 100.0
        self.stopping = False
        self.listeners = listeners or []
        self.slots: dict[int, Any] = {}
        self.readers: dict[Any, Any] = {}
        self.sent: list[tuple[Worker, dict[str, Any], list[int]]] = []
        self.broken: set[Worker] = set()  # workers whose channel is gone

    def clock(self) -> float:
        return self.now

    def add_reader(self, fileobj: Any, callback: Any) -> None:
        assert fileobj not in self.readers
        self.readers[fileobj] = callback

    def remove_reader(self, fileobj: Any) -> None:
        self.readers.pop(fileobj, None)

    def send(self, w: Worker, msg: dict[str, Any], fds: list[int] | None = None) -> bool:
        # The real channel transfers the fds and closes its copies once sent.
        for fd in fds or []:
            os.close(fd)
        if w in self.broken:
            return False
        self.sent.append((w, msg, list(fds or [])))
        return True

    def batches_for(self, w: Worker) -> list[int]:
        return [m["b"] for dest, m, _ in self.sent if dest is w]
