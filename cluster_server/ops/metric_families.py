"""What ``/metrics`` shows: metric families built from the primary's state at scrape time.

Naming follows Prometheus' conventions: a ``cluster_server_`` prefix, base
units in the name (``_seconds``, ``_bytes``), ``_total`` on counters; the table
is in docs/operations.md and tests/test_metrics.py checks every name and type.

Labels are stable: per-worker series carry only ``worker``, the slot number,
which survives replacements (pid and generation are in
``cluster_server_worker_info``, whose series change when the worker does).
While a slot is being replaced two processes serve it: its counters and
connection counts add both up; memory, heartbeat age and uptime are those of
the worker holding the slot (the old one while its replacement boots).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from cluster_server._proc import rss_bytes
from cluster_server._version import __version__
from cluster_server.ops.request_totals import SlotTotals, Totals
from cluster_server.ops.status import EXIT_REASONS, OUTCOMES, STATES
from cluster_server.primary.state import WorkerState
from cluster_server.worker.request_metrics import BUCKETS

if TYPE_CHECKING:
    from cluster_server.ops.status import ClusterWatch
    from cluster_server.primary.component import Sample
    from cluster_server.primary.loop import Primary, Worker

PREFIX = "cluster_server_"
MIB = 1024 * 1024


def cluster_families(p: Primary, watch: ClusterWatch) -> Iterator[Metric]:
    """The cluster as a whole: configuration, generation, workers by state."""
    info = GaugeMetricFamily(PREFIX + "info", "cluster-server's version and app", labels=["version", "app"])
    info.add_metric([__version__, p.config.app_name], 1)
    yield info
    yield GaugeMetricFamily(PREFIX + "workers_configured", "Worker slots (--workers, ctl scale)", len(p.slots))
    yield GaugeMetricFamily(PREFIX + "generation", "Current code generation (+1 per rolling restart)", p.generation)
    by_state = GaugeMetricFamily(
        PREFIX + "workers", "Workers by state (backoff: an empty slot waiting to restart)", labels=["state"]
    )
    states = {state: 0 for state in STATES}
    for row in watch.rows():
        states[row["state"]] += 1
    for state, n in states.items():
        by_state.add_metric([state], n)
    yield by_state
    if p.config.max_worker_memory:
        yield GaugeMetricFamily(
            PREFIX + "worker_memory_limit_bytes",
            "--max-worker-memory: a worker over it is recycled",
            p.config.max_worker_memory * MIB,
        )


def lifecycle_families(p: Primary, watch: ClusterWatch) -> Iterator[Metric]:
    """Exits and restarts by reason; rolling restarts and recycles by outcome."""
    exits = CounterMetricFamily(
        PREFIX + "worker_exits", "Workers that exited, by reason (every exit)", labels=["reason"]
    )
    for reason in [*EXIT_REASONS, *sorted(set(watch.exits) - set(EXIT_REASONS))]:
        exits.add_metric([reason], watch.exits.get(reason, 0))
    yield exits
    restarts = CounterMetricFamily(
        PREFIX + "worker_restarts",
        "Workers replaced by a new one in their slot, by reason (crash, hang, max_requests, rolled...)",
        labels=["reason"],
    )
    for reason, n in watch.restarts().items():
        restarts.add_metric([reason], n)
    yield restarts
    rolls = CounterMetricFamily(
        PREFIX + "rolling_restarts",
        "Rolling restarts (SIGHUP, ctl reload/restart, --reload), by outcome",
        labels=["outcome"],
    )
    recycles = CounterMetricFamily(
        PREFIX + "recycles",
        "Recycles (--max-requests, --max-worker-memory, --max-worker-lifetime), by outcome",
        labels=["outcome"],
    )
    for outcome in OUTCOMES:
        rolls.add_metric([outcome], watch.rolls.get(outcome, 0))
        recycles.add_metric([outcome], watch.recycles.get(outcome, 0))
    yield rolls
    yield recycles
    roll = p.roll_state
    rolling = roll is not None and not roll.recycle
    yield GaugeMetricFamily(PREFIX + "rolling_restart_in_progress", "1 while a rolling restart runs", int(rolling))


def worker_families(p: Primary, totals: SlotTotals) -> Iterator[Metric]:
    """Per slot (label ``worker``): its process now, and the requests it served."""
    label = ["worker"]
    info = GaugeMetricFamily(
        PREFIX + "worker_info", "The pid and generation of a slot's worker", labels=[*label, "pid", "generation"]
    )
    conns = GaugeMetricFamily(PREFIX + "worker_open_connections", "Open connections of a slot's workers", labels=label)
    hb = GaugeMetricFamily(
        PREFIX + "worker_heartbeat_age_seconds", "Seconds since the slot's worker last sent a heartbeat", labels=label
    )
    rss = GaugeMetricFamily(PREFIX + "worker_rss_bytes", "Resident memory of the slot's worker", labels=label)
    up = GaugeMetricFamily(PREFIX + "worker_uptime_seconds", "Seconds since the slot's worker started", labels=label)
    now = p.clock()
    connections: dict[int, int] = {}
    for w in p.workers.values():
        connections[w.id] = connections.get(w.id, 0) + w.connections
    for slot_id, w in sorted(_holders(p).items()):
        lv = [str(slot_id)]
        info.add_metric([str(slot_id), str(w.pid), str(w.generation)], 1)
        up.add_metric(lv, round(now - w.spawned_at, 3))
        if w.state is not WorkerState.BOOTING:
            hb.add_metric(lv, round(now - w.last_heartbeat, 3))
        if (rss_now := rss_bytes(w.pid)) is not None:
            rss.add_metric(lv, rss_now)
    for slot_id, n in sorted(connections.items()):
        conns.add_metric([str(slot_id)], n)
    requests = CounterMetricFamily(
        PREFIX + "worker_requests", "Requests a slot's workers served (uvicorn's count, from heartbeats)", labels=label
    )
    for slot_id, n in totals.requests_per_slot(p).items():
        requests.add_metric([str(slot_id)], n)
    yield from (info, requests, conns, hb, rss, up)


def _holders(p: Primary) -> dict[int, Worker]:
    """Each slot's worker: the one serving it, else its replacement booting."""
    out: dict[int, Worker] = {}
    for slot in p.slots.values():
        pid = slot.pid if slot.pid is not None else slot.replacement
        if pid is not None and pid in p.workers:
            out[slot.id] = p.workers[pid]
    return out


def request_families(p: Primary, totals: SlotTotals) -> Iterator[Metric]:
    """HTTP requests by method and status class, their durations, in flight: per slot, and summed."""
    per_slot = totals.per_slot(p)
    summed = Totals()
    for t in per_slot.values():
        summed.add(t)
    yield from _request_metrics("http_", summed, [], [])
    per_worker = [_request_metrics("worker_http_", t, ["worker"], [str(s)]) for s, t in per_slot.items()]
    for families in zip(*per_worker, strict=True):
        merged = families[0]
        for other in families[1:]:
            merged.samples.extend(other.samples)
        yield merged


def _request_metrics(kind: str, t: Totals, labels: list[str], values: list[str]) -> tuple[Metric, Metric, Metric]:
    where = "a slot's workers" if labels else "every worker"
    requests = CounterMetricFamily(
        PREFIX + kind + "requests",
        f"HTTP requests {where} answered, by method and status class (1xx..5xx)",
        labels=[*labels, "method", "status_class"],
    )
    for (method, cls), n in sorted(t.counts.items()):
        requests.add_metric([*values, method, cls], n)
    duration = HistogramMetricFamily(
        PREFIX + kind + "time_to_first_byte_seconds",
        f"Seconds from a request's head to its response's first byte, in {where}",
        labels=labels,
    )
    cumulative, running = [], 0
    for bound, n in zip([*map(_le, BUCKETS), "+Inf"], t.buckets, strict=True):
        running += n
        cumulative.append((bound, running))
    duration.add_metric(values, cumulative, t.seconds)
    in_flight = GaugeMetricFamily(
        PREFIX + kind + "requests_in_flight",
        f"HTTP requests {where} are answering (as of their last heartbeat)",
        labels=labels,
    )
    in_flight.add_metric(values, t.in_flight)
    return requests, duration, in_flight


def _le(bound: float) -> str:
    return repr(float(bound))


def component_families(samples: Iterable[Sample]) -> Iterator[Metric]:
    """Samples other components offer (the scheduler's accept backlog...), through
    their typed ``metrics_samples()`` hook (``Primary.metrics_samples`` asks each,
    guarded: a component that raises is logged there and adds nothing)."""
    extra: dict[str, Metric] = {}
    for name, help_text, kind, sample_labels, value in samples:
        family = extra.get(name)
        if family is None:
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = extra[name] = cls(name, help_text, labels=sorted(sample_labels))
        family.add_metric([str(sample_labels[k]) for k in sorted(sample_labels)], value)  # type: ignore[attr-defined]
    yield from extra.values()


class Collector:
    """prometheus-client's collector interface over the primary's state (read at every scrape)."""

    def __init__(self, primary: Primary, watch: ClusterWatch, totals: SlotTotals, log: Any) -> None:
        self.primary = primary
        self.watch = watch
        self.totals = totals
        self.log = log

    def collect(self) -> Iterator[Metric]:
        p = self.primary
        yield from cluster_families(p, self.watch)
        yield from lifecycle_families(p, self.watch)
        yield from worker_families(p, self.totals)
        yield from request_families(p, self.totals)
        yield from component_families(p.metrics_samples())
