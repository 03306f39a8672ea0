"""What operators see: a snapshot of the worker table, and cluster-wide events.

Read by the control socket (``ctl status``), the metrics endpoint and the
systemd notifier. Nothing here changes the primary's state.

:class:`ClusterWatch` is a component that turns the primary's state into
events other components subscribe to (``all_ready``, ``roll_started``,
``roll_finished``, ``stopping``) and keeps the counters the primary does not:
worker exits by reason, unplanned restarts per slot, rolling restarts by
outcome. Rolls come from the primary's ``roll_started``/``roll_finished`` hooks
(a roll can start and end within one loop iteration: watching ``roll_state``
would miss it); ``all_ready`` and ``stopping``, states that stay, are looked at
after every iteration.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cluster_server._proc import rss_bytes
from cluster_server._version import __version__
from cluster_server.primary.component import Component, WorkerEvent, override
from cluster_server.primary.state import WorkerState

if TYPE_CHECKING:
    from cluster_server.primary.loop import Primary, Roll, Worker

logger = logging.getLogger("cluster_server")

#: exits that are not the primary's plan, counted as a slot's restarts
UNPLANNED = frozenset({"crash", "boot_failure", "timeout", "ready_timeout"})
#: every state a row of ``ctl status`` can show (``backoff``: an empty slot waiting to restart)
STATES = ("booting", "ready", "draining", "backoff")


def primary_modules() -> list[str]:
    """The top-level packages imported in this (primary) process, for ``ctl status --json``.

    The HTTP primary never imports the app, uvicorn or asyncio: those load in the
    workers, after the fork. A name here that should not be (the app's package,
    say) means something imported it into the primary.
    """
    return sorted({name.partition(".")[0] for name in list(sys.modules)})


def exit_reason(w: Worker) -> str:
    """Why a worker exited, as a metric label: the primary's reason, or crash / boot_failure."""
    if w.stop_reason:
        return w.stop_reason.replace(" ", "_")
    return "boot_failure" if w.state is WorkerState.FAILED else "crash"


class ClusterWatch(Component):
    """Counters and events over the primary's state (a primary component)."""

    def __init__(self) -> None:
        self.primary: Primary | None = None
        self.exits: collections.Counter[str] = collections.Counter()
        self.slot_restarts: collections.Counter[int] = collections.Counter()
        self.rolls: collections.Counter[str] = collections.Counter()
        self.started_at = time.time()
        self._listeners: dict[str, list[Callable[..., None]]] = collections.defaultdict(list)
        self._all_ready = False
        self._stopping = False

    def on(self, event: str, fn: Callable[..., None]) -> None:
        """Call ``fn`` on ``event``: all_ready(), roll_started(roll), roll_finished(roll, outcome), stopping()."""
        self._listeners[event].append(fn)

    def _emit(self, event: str, *args: Any) -> None:
        for fn in self._listeners[event]:
            try:
                fn(*args)
            except Exception:  # an observer's bug must not stop the primary
                logger.exception("error in a %s listener", event)

    @override
    def attach(self, primary: Primary) -> None:
        self.primary = primary

    @override
    def worker_event(self, event: WorkerEvent, w: Worker) -> None:
        if event != "exited":
            return
        reason = exit_reason(w)
        self.exits[reason] += 1
        p = self.primary
        if reason in UNPLANNED and p is not None and not p.stopping and w.id in p.slots:
            self.slot_restarts[w.id] += 1

    @override
    def roll_started(self, roll: Roll) -> None:
        self._emit("roll_started", roll)

    @override
    def roll_finished(self, roll: Roll, outcome: str) -> None:
        self.rolls[outcome] += 1
        self._emit("roll_finished", roll, outcome)

    @override
    def tick(self) -> None:
        p = self.primary
        if p is None:
            return
        if p.ever_ready and not self._all_ready:
            self._all_ready = True
            self._emit("all_ready")
        if p.stopping and not self._stopping:
            self._stopping = True
            self._emit("stopping")

    # -- the snapshot -------------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        """One row per live worker, plus one per empty slot waiting out its backoff."""
        p = self.primary
        assert p is not None
        now = p.clock()
        rows: list[dict[str, Any]] = []
        for w in p.workers.values():
            rows.append(
                {
                    "id": w.id,
                    "pid": w.pid,
                    "state": w.state.value,
                    "generation": w.generation,
                    "uptime": round(now - w.spawned_at, 3),
                    "requests": w.requests,
                    "connections": w.connections,
                    "rss": rss_bytes(w.pid),
                    "restarts": self.slot_restarts[w.id],
                    "heartbeat_age": (round(now - w.last_heartbeat, 3) if w.state is not WorkerState.BOOTING else None),
                    "slot": w.id in p.slots and w.pid in (p.slots[w.id].pid, p.slots[w.id].replacement),
                }
            )
        for slot in p.slots.values():
            if slot.pid is None and slot.replacement is None and not p.stopping:
                rows.append(
                    {
                        "id": slot.id,
                        "pid": None,
                        "state": "backoff",
                        "generation": slot.generation,
                        "uptime": None,
                        "requests": 0,
                        "connections": 0,
                        "rss": None,
                        "restarts": self.slot_restarts[slot.id],
                        "heartbeat_age": None,
                        "slot": True,
                        "restart_in": round(max(0.0, slot.respawn_at - now), 3),
                        "failures": slot.failures,
                    }
                )
        rows.sort(key=lambda r: (r["id"], r["generation"], r["pid"] or 0))
        return rows

    def snapshot(self) -> dict[str, Any]:
        """Everything ``ctl status`` shows, JSON-serialisable."""
        p = self.primary
        assert p is not None
        rows = self.rows()
        states = collections.Counter(r["state"] for r in rows)
        roll = p.roll_state
        return {
            "version": __version__,
            "pid": os.getpid(),
            "app": p.config.app_name,
            "listeners": [lst.display for lst in p.listeners],
            "started_at": self.started_at,
            "uptime": round(time.time() - self.started_at, 3),
            "generation": p.generation,
            "workers": len(p.slots),
            "states": {s: states.get(s, 0) for s in STATES},
            "stopping": p.stopping,
            "roll": (
                None
                if roll is None
                else {
                    "generation": roll.generation,
                    "reason": roll.reason,
                    "done": len(roll.done),
                    "pending": len(roll.pending) + (roll.current is not None),
                }
            ),
            "restarts": sum(self.slot_restarts.values()),
            "exits": dict(self.exits),
            "rolls": dict(self.rolls),
            "rows": rows,
            "modules": primary_modules(),
        }

    def summary(self) -> str:
        """One line, for systemd's STATUS= and logs: '3/4 workers ready, generation 2'."""
        p = self.primary
        assert p is not None
        ready = sum(1 for w in p.workers.values() if w.state is WorkerState.READY)
        line = f"{ready}/{len(p.slots)} workers ready, generation {p.generation}"
        if p.roll_state is not None:
            line += f", rolling to generation {p.roll_state.generation}"
        if p.stopping:
            line += ", stopping"
        return line
