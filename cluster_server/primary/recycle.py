"""Worker recycling: replace a worker that served enough, grew too big or lived too long.

A component of the primary (see ``primary/component.py``). It only
decides; the replacement is a rolling restart of one slot (``Primary.recycle``):
the new worker is started and must be ready before the old one drains, so
capacity never drops, and never two slots at once (nothing starts while any
roll runs).

- ``--max-requests`` (+ ``--max-requests-jitter``): the request count comes
  from the worker's heartbeats;
- ``--max-worker-memory`` (MiB): the worker's unique set size (the pages that are
  its alone, not those it shares with the primary or a ``--preload`` template),
  read by the primary from ``/proc/PID/smaps_rollup`` every ``MEMORY_SAMPLE_INTERVAL`` seconds;
- ``--max-worker-lifetime`` (+ ``--max-worker-lifetime-jitter``): seconds since
  the worker became ready.

A worker far over ``--max-worker-memory`` (``URGENT_FACTOR`` times it: a fast
leak) does not wait for its turn behind a roll or another recycle: it drains
at once and its slot is refilled at once (``Primary.replace_now``); its slot
serves nothing while the new worker boots, which costs less than a worker
growing on until the kernel's OOM killer ends it mid-request.

Each worker draws its own jitter when it becomes ready, so workers started
together do not all recycle together. If a recycle fails (the replacement
cannot boot, e.g. the code on disk is broken), the old worker keeps serving and
the recycler tries it again after ``RETRY_DELAY`` seconds, doubling each time.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster_server._config import Config
from cluster_server._proc import uss_bytes
from cluster_server.primary.component import Component, WorkerEvent, override
from cluster_server.primary.state import WorkerState

if TYPE_CHECKING:
    from cluster_server.primary.loop import Primary, Worker

logger = logging.getLogger("cluster_server")

#: seconds between two samples of every worker's resident memory (a read of
#: /proc/PID/statm each, a few microseconds: often enough to catch a fast leak)
MEMORY_SAMPLE_INTERVAL = 0.25
#: a worker over this many times --max-worker-memory is replaced at once, not in turn
URGENT_FACTOR = 1.5
#: first wait before recycling a worker again after a failed recycle (doubles, up to RETRY_CAP)
RETRY_DELAY = 10.0
RETRY_CAP = 600.0

MIB = 1024 * 1024


@dataclass
class _Limits:
    """One worker's own limits (jitter drawn once) and what the recycler knows of it."""

    max_requests: int | None
    die_at: float | None  # monotonic time its lifetime ends
    rss: int | None = None
    attempts: int = 0
    retry_at: float = 0.0


class Recycler(Component):
    """Decides when a worker is recycled; the primary does the replacing."""

    def __init__(
        self,
        config: Config,
        *,
        rng: random.Random | None = None,
        rss: Callable[[int], int | None] = uss_bytes,  # (named for what it was: the worker's memory)
    ) -> None:
        self.config = config
        self.rng = rng or random.Random()
        self.read_rss = rss
        self.limits: dict[int, _Limits] = {}  # pid -> limits of a ready worker
        self.next_sample = 0.0
        self.primary: Primary | None = None

    @staticmethod
    def wanted(config: Config) -> bool:
        return bool(config.max_requests or config.max_worker_memory or config.max_worker_lifetime)

    # -- the component interface --------------------------------------------

    @override
    def attach(self, primary: Primary) -> None:
        self.primary = primary

    @override
    def worker_event(self, event: WorkerEvent, w: Worker) -> None:
        if event == "ready":
            cfg = self.config
            max_requests = None
            if cfg.max_requests:
                max_requests = cfg.max_requests + self.rng.randint(0, cfg.max_requests_jitter)
            die_at = None
            if cfg.max_worker_lifetime:
                lifetime = cfg.max_worker_lifetime + self.rng.uniform(0, cfg.max_worker_lifetime_jitter)
                die_at = (w.ready_at or 0.0) + lifetime
            self.limits[w.pid] = _Limits(max_requests, die_at)
        elif event in ("draining", "exited"):
            self.limits.pop(w.pid, None)

    @override
    def next_deadline(self) -> float | None:
        p = self.primary
        times: list[float] = []
        if self.config.max_worker_memory and self.limits:
            times.append(self.next_sample)
        if p is not None and p.roll_state is None:  # a roll's end wakes the primary anyway
            times += [max(lim.die_at, lim.retry_at) for lim in self.limits.values() if lim.die_at is not None]
            times += [lim.retry_at for lim in self.limits.values() if lim.attempts]
        return min(times) if times else None

    @override
    def tick(self) -> None:
        p = self.primary
        if p is None or p.stopping:
            return
        now = p.clock()
        if self.config.max_worker_memory and now >= self.next_sample:
            self.next_sample = now + MEMORY_SAMPLE_INTERVAL
            for pid, sampled in self.limits.items():
                sampled.rss = self.read_rss(pid)
            self.replace_runaways(p)
        if p.roll_state is not None:
            return  # one slot at a time; a roll running now replaces workers anyway
        for slot in sorted(p.slots.values(), key=lambda s: s.id):
            w = p.workers.get(slot.pid) if slot.pid is not None else None
            if w is None or w.state is not WorkerState.READY or slot.replacement is not None:
                continue
            lim = self.limits.get(w.pid)
            if lim is None or now < lim.retry_at:
                continue
            found = self.reason(w, lim, now)
            if found is None:
                continue
            kind, why = found
            if not p.recycle(slot.id, why, kind):
                lim.retry_at = now + 1.0  # the slot is busy; look again soon, without spinning
                continue
            # If this worker is still here when the recycle ended, the replacement
            # failed: try again later, less and less often.
            lim.retry_at = now + min(RETRY_DELAY * 2**lim.attempts, RETRY_CAP)
            lim.attempts += 1
            return

    def replace_runaways(self, p: Primary) -> None:
        """Replace at once every worker far over --max-worker-memory, whatever runs."""
        urgent = self.config.max_worker_memory * URGENT_FACTOR * MIB
        for slot in sorted(p.slots.values(), key=lambda s: s.id):
            if slot.pid is None:
                continue
            lim, w = self.limits.get(slot.pid), p.workers.get(slot.pid)
            if lim is None or w is None or lim.rss is None or lim.rss <= urgent:
                continue
            why = (
                f"{w.name} uses {lim.rss / MIB:.0f} MiB, over {URGENT_FACTOR:g} x "
                f"--max-worker-memory {self.config.max_worker_memory:g}"
            )
            p.replace_now(slot.id, why)

    def reason(self, w: Worker, lim: _Limits, now: float) -> tuple[str, str] | None:
        """Why ``w`` should be recycled now: (its exit reason, in words), or None."""
        cfg = self.config
        if lim.max_requests is not None and w.requests >= lim.max_requests:
            limit = f"--max-requests {cfg.max_requests}"
            if lim.max_requests != cfg.max_requests:
                limit += f" + jitter = {lim.max_requests}"
            return "max_requests", f"{w.name} served {w.requests} requests ({limit})"
        if cfg.max_worker_memory and lim.rss is not None and lim.rss > cfg.max_worker_memory * MIB:
            limit = f"--max-worker-memory {cfg.max_worker_memory:g}"
            return "max_memory", f"{w.name} uses {lim.rss / MIB:.0f} MiB of its own ({limit})"
        if lim.die_at is not None and now >= lim.die_at:
            age = now - (w.ready_at or now)
            limit = f"--max-worker-lifetime {cfg.max_worker_lifetime:g}"
            return "max_lifetime", f"{w.name} served for {age:.0f} s ({limit})"
        return None
