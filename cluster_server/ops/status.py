"""What operators see: a snapshot of the worker table, and cluster-wide events.

Read by the control socket (``ctl status``), the metrics endpoint and the
systemd notifier. Nothing here changes the primary's state.

:class:`ClusterWatch` is a component that turns the primary's state into
events other components subscribe to (``all_ready``, ``roll_started``,
``roll_finished``, ``stopping``) and keeps the counters the primary does not:
worker exits by reason, unplanned restarts per slot, rolling restarts and
recycles by outcome. Rolls come from the primary's ``roll_started`` /
``roll_finished`` hooks (a roll can start and end within one loop iteration:
watching ``roll_state`` would miss it); ``all_ready`` and ``stopping``, states
that stay, are looked at after every iteration.
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
    from cluster_server.primary.loop import Primary, Roll, Slot, Worker

logger = logging.getLogger("cluster_server")

#: exits after which the slot gets a new worker, by reason: unplanned ones (crash: exited
#: without being asked, boot_failure: before it was ready, hang: no heartbeat for
#: --worker-timeout, ready_timeout: not ready within --ready-timeout), recycling
#: (max_requests, max_memory, max_lifetime) and rolling restarts (rolled: SIGHUP, ctl
#: reload/restart; reloaded: --reload saw a change)
RESTART_REASONS = (
    "crash",
    "boot_failure",
    "hang",
    "ready_timeout",
    "max_requests",
    "max_memory",
    "max_lifetime",
    "rolled",
    "reloaded",
)
#: exits with no replacement: a slot removed (scaled_down), the server stopping
#: (stopped), or a new primary taking over (upgrade)
FINAL_REASONS = ("scaled_down", "stopped", "upgrade")
EXIT_REASONS = RESTART_REASONS + FINAL_REASONS
#: exits that are not the primary's plan, counted as a slot's restarts
UNPLANNED = frozenset({"crash", "boot_failure", "hang", "ready_timeout"})
#: how rolling restarts and recycles end
OUTCOMES = ("completed", "failed", "aborted")
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
        return w.stop_reason
    return "boot_failure" if w.state is WorkerState.FAILED else "crash"


class ClusterWatch(Component):
    """Counters and events over the primary's state (a primary component)."""

    def __init__(self) -> None:
        self.primary: Primary | None = None
        self.exits: collections.Counter[str] = collections.Counter()
        self.slot_restarts: collections.Counter[int] = collections.Counter()
        #: rolling restarts by outcome (SIGHUP, ctl reload/restart, --reload); recycles are apart
        self.rolls: collections.Counter[str] = collections.Counter()
        self.recycles: collections.Counter[str] = collections.Counter()
        #: per slot: how its last worker ended, in words (shown for a slot in backoff)
        self.last_exit: dict[int, str] = {}
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
        self.last_exit[w.id] = w.boot_error or f"{reason.replace('_', ' ')} ({w.exit_status})"
        p = self.primary
        if reason in UNPLANNED and p is not None and not p.stopping and w.id in p.slots:
            self.slot_restarts[w.id] += 1

    @override
    def roll_started(self, roll: Roll) -> None:
        self._emit("roll_started", roll)

    @override
    def roll_finished(self, roll: Roll, outcome: str) -> None:
        (self.recycles if roll.recycle else self.rolls)[outcome] += 1
        self._emit("roll_finished", roll, outcome)

    def restarts(self) -> dict[str, int]:
        """Exits that were followed by a new worker in the slot, by reason (every reason listed)."""
        return {reason: self.exits.get(reason, 0) for reason in RESTART_REASONS}

    # -- handing the counters to an upgrade's new primary --------------------------

    def counters(self, upgrading: int = 0) -> dict[str, dict[str, int]]:
        """The counters, for a new primary to go on from; ``upgrading`` workers will exit "upgrade"."""
        exits = collections.Counter(self.exits)
        exits["upgrade"] += upgrading
        return {"exits": dict(exits), "rolls": dict(self.rolls), "recycles": dict(self.recycles)}

    def restore(self, counters: Any) -> None:
        """Go on from a predecessor's ``counters()`` (anything malformed is ignored)."""
        if not isinstance(counters, dict):
            return
        for key, counter in (("exits", self.exits), ("rolls", self.rolls), ("recycles", self.recycles)):
            values = counters.get(key)
            if not isinstance(values, dict) or len(values) > 64:
                continue
            for name, n in values.items():
                if isinstance(name, str) and len(name) <= 64 and isinstance(n, int) and n >= 0:
                    counter[name] += n

    # -- events ---------------------------------------------------------------

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

    # -- the snapshot (``ctl status --json``; its schema is in docs/operations.md) ----------

    def rows(self) -> list[dict[str, Any]]:
        """One row per live worker, plus one per empty slot waiting out its backoff."""
        p = self.primary
        assert p is not None
        now = p.clock()
        rows = [self._worker_row(p, w, now) for w in p.workers.values()]
        for slot in p.slots.values():
            if slot.pid is None and slot.replacement is None and not p.stopping:
                rows.append(self._backoff_row(slot, now))
        rows.sort(key=lambda r: (r["id"], r["generation"], r["pid"] or 0))
        return rows

    def _worker_row(self, p: Primary, w: Worker, now: float) -> dict[str, Any]:
        slot = p.slots.get(w.id)
        return {
            "id": w.id,
            "pid": w.pid,
            "state": w.state.value,
            "generation": w.generation,
            "uptime_seconds": round(now - w.spawned_at, 3),
            "requests": w.requests,
            "connections": w.connections,
            "rss_bytes": rss_bytes(w.pid),
            "restarts": self.slot_restarts[w.id],
            "heartbeat_age_seconds": (round(now - w.last_heartbeat, 3) if w.state is not WorkerState.BOOTING else None),
            "holds_slot": slot is not None and w.pid in (slot.pid, slot.replacement),
            "stop_reason": w.stop_reason,
            "restart_in_seconds": None,
            "failures": slot.failures if slot is not None else 0,
            # a worker started after its slot's last one failed: how that one ended
            "last_exit": self.last_exit.get(w.id) if slot is not None and slot.failures else None,
        }

    def _backoff_row(self, slot: Slot, now: float) -> dict[str, Any]:
        return {
            "id": slot.id,
            "pid": None,
            "state": "backoff",
            "generation": slot.generation,
            "uptime_seconds": None,
            "requests": 0,
            "connections": 0,
            "rss_bytes": None,
            "restarts": self.slot_restarts[slot.id],
            "heartbeat_age_seconds": None,
            "holds_slot": True,
            "stop_reason": None,
            "restart_in_seconds": round(max(0.0, slot.respawn_at - now), 3),
            "failures": slot.failures,
            "last_exit": self.last_exit.get(slot.id),
        }

    def snapshot(self) -> dict[str, Any]:
        """Everything ``ctl status`` shows, JSON-serialisable."""
        p = self.primary
        assert p is not None
        rows = self.rows()
        states = collections.Counter(r["state"] for r in rows)
        return {
            "version": __version__,
            "pid": os.getpid(),
            "app": p.config.app_name,
            "listeners": [lst.display for lst in p.listeners],
            "started_at_unix_seconds": self.started_at,
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "generation": p.generation,
            "workers_configured": len(p.slots),
            "states": {s: states.get(s, 0) for s in STATES},
            "stopping": p.stopping,
            "roll": None if p.roll_state is None else _roll_info(p.roll_state, p.clock()),
            "restarts": sum(self.slot_restarts.values()),
            "exits": dict(self.exits),
            "rolls": {o: self.rolls.get(o, 0) for o in OUTCOMES},
            "recycles": {o: self.recycles.get(o, 0) for o in OUTCOMES},
            "last_rolls": [_roll_info(r, p.clock()) for r in p.finished_rolls],
            "workers": rows,
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


def _roll_info(roll: Roll, now: float) -> dict[str, Any]:
    """A roll or recycle, in progress (``outcome`` None) or ended."""
    return {
        "generation": roll.generation,
        "reason": roll.reason,
        "kind": roll.kind,
        "recycle": roll.recycle,
        "slots": list(roll.slots),
        "done": len(roll.done),
        "pending": len(roll.pending) + (roll.current is not None),
        "outcome": roll.outcome,
        "error": roll.error,
        "duration_seconds": round((roll.ended_at if roll.ended_at is not None else now) - roll.started_at, 3),
    }
