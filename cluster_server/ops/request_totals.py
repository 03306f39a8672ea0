"""Request metrics in the primary: each worker's last report, summed per slot.

Workers count their requests (``worker/request_metrics.py``) and send the
counts so far with every heartbeat; the primary keeps the last report on the
``Worker`` (``Worker.report``). A slot's totals are what its exited workers
reported last plus what its live workers report now, so a slot's counters
only grow across crashes, recycles and rolling restarts: the ``worker`` label
(the slot) is a stable series, and replacing a worker is no counter reset.

A report comes from a process the primary does not trust (the app runs in
it): :func:`parse` accepts only the documented shape, with bounded sizes, and
drops anything else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeGuard

from cluster_server.worker.request_metrics import BUCKETS, METHODS, OTHER

if TYPE_CHECKING:
    from cluster_server.primary.loop import Primary, Worker

#: status classes a report may name (1: 1xx ... 5: 5xx)
CLASSES = (1, 2, 3, 4, 5)
_MAX_KEYS = (len(METHODS) + 1) * len(CLASSES)
_CLASS_DIGITS = frozenset(str(c) for c in CLASSES)


@dataclass
class Totals:
    """Request counts of one worker, or summed over several."""

    #: (method, status class label "2xx") -> requests
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    #: requests per bucket of BUCKETS, then the slower ones (not cumulative)
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    seconds: float = 0.0
    in_flight: int = 0

    def add(self, other: Totals) -> None:
        for key, n in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + n
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]
        self.seconds += other.seconds
        self.in_flight += other.in_flight

    @property
    def requests(self) -> int:
        return sum(self.buckets)


def parse(report: Any) -> Totals | None:
    """A worker's ``"m"`` report as Totals; None if it is missing or malformed."""
    if not isinstance(report, dict):
        return None
    q, h, s, i = report.get("q"), report.get("h"), report.get("s"), report.get("i")
    if not (isinstance(q, dict) and len(q) <= _MAX_KEYS and isinstance(h, list) and len(h) == len(BUCKETS) + 1):
        return None
    if not all(_count(n) for n in h) or not _count(i) or not isinstance(s, int | float) or not 0 <= s < 1e15:
        return None
    counts: dict[tuple[str, str], int] = {}
    for key, n in q.items():
        method, _, cls = str(key).partition(" ")
        if (method not in METHODS and method != OTHER) or cls not in _CLASS_DIGITS:
            return None
        if not _count(n):
            return None
        counts[(method, f"{cls}xx")] = n
    return Totals(counts, list(h), float(s), i)


def _count(n: Any) -> TypeGuard[int]:
    return isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**53


class SlotTotals:
    """Per-slot request totals: exited workers' last reports plus live workers' current ones."""

    def __init__(self) -> None:
        #: slot -> what its exited workers reported last (in flight: 0)
        self.retired: dict[int, Totals] = {}
        #: slot -> requests its exited workers served (uvicorn's count, from the heartbeat's "r")
        self.retired_requests: dict[int, int] = {}

    def worker_exited(self, w: Worker) -> None:
        """Keep what ``w`` reported last in its slot's totals."""
        self.retired_requests[w.id] = self.retired_requests.get(w.id, 0) + w.requests
        last = parse(w.report)
        if last is None:
            return
        last.in_flight = 0
        self.retired.setdefault(w.id, Totals()).add(last)

    def per_slot(self, p: Primary) -> dict[int, Totals]:
        """Every slot that has served a request or has a worker now, with its totals."""
        out: dict[int, Totals] = {}
        for slot_id, retired in self.retired.items():
            out.setdefault(slot_id, Totals()).add(retired)
        for slot_id in p.slots:
            out.setdefault(slot_id, Totals())
        for w in p.workers.values():
            live = parse(w.report)
            if live is not None:
                out.setdefault(w.id, Totals()).add(live)
        return dict(sorted(out.items()))

    def requests_per_slot(self, p: Primary) -> dict[int, int]:
        """Requests served per slot (uvicorn's count), exited workers included."""
        out = dict(self.retired_requests)
        for slot_id in p.slots:
            out.setdefault(slot_id, 0)
        for w in p.workers.values():
            out[w.id] = out.get(w.id, 0) + w.requests
        return dict(sorted(out.items()))
