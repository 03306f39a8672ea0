"""Recycling: the recycler's decisions (fake primary), then real servers.

A recycle is a one-slot rolling restart: the replacement is ready before the
old worker drains, and never two slots at once.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster_server.primary.recycle import MIB, RETRY_DELAY, Recycler
from cluster_server.primary.state import WorkerState
from tests.conftest import Server, wait_until
from tests.fakes import Harness
from tests.ops_helpers import LoadLoop
from tests.primary.test_restart import RESTART_APP

# -- decisions (no processes) ----------------------------------------------------


def _harness(workers: int = 2, rss: dict[int, int] | None = None, **options: Any) -> tuple[Harness, Recycler]:
    h = Harness(workers=workers, **options)
    sizes = rss if rss is not None else {}
    recycler = Recycler(h.config, rng=random.Random(1), rss=lambda pid: sizes.get(pid))
    h.primary.add_component(recycler)
    recycler.attach(h.primary)
    h.start()
    return h, recycler


def test_max_requests_recycles_one_slot_replacement_first() -> None:
    h, _ = _harness(max_requests=100)
    a, b = h.slot_pids()
    assert a is not None and b is not None
    h.heartbeat(a, requests=99)
    h.tick()
    assert h.primary.roll_state is None
    h.heartbeat(a, requests=100)
    h.heartbeat(b, requests=500)  # both over the limit: one slot at a time
    h.tick()
    roll = h.primary.roll_state
    assert roll is not None and roll.recycle and roll.current == 1
    assert roll.generation == 1  # a recycle keeps the generation
    new_a = h.launcher.spawned[-1]
    assert not h.launcher.got(a)
    assert len(h.launcher.spawned) == 3
    h.tick()
    assert len(h.launcher.spawned) == 3  # slot 2 waits
    h.ready(new_a)
    assert h.launcher.got(a) and h.serving == 2
    h.tick()  # now slot 2
    new_b = h.launcher.spawned[-1]
    assert h.primary.slots[2].replacement == new_b
    h.ready(new_b)
    assert h.launcher.got(b)
    assert h.slot_pids() == [new_a, new_b]


def test_max_requests_jitter_is_drawn_per_worker() -> None:
    h, recycler = _harness(workers=4, max_requests=1000, max_requests_jitter=500)
    limits = {recycler.limits[pid].max_requests for pid in h.slot_pids() if pid is not None}
    assert all(lim is not None and 1000 <= lim <= 1500 for lim in limits)
    assert len(limits) > 1


def test_no_recycle_while_a_rolling_restart_runs() -> None:
    h, _ = _harness(max_requests=10)
    a = h.slot_pids()[0]
    assert a is not None
    h.primary.roll("SIGHUP")
    h.heartbeat(a, requests=50)
    h.tick()
    roll = h.primary.roll_state
    assert roll is not None and not roll.recycle  # the roll replaces it anyway


def test_max_worker_memory() -> None:
    rss: dict[int, int] = {}
    h, _ = _harness(rss=rss, max_worker_memory=100)
    a, b = h.slot_pids()
    assert a is not None and b is not None
    rss[a], rss[b] = 90 * MIB, 99 * MIB
    h.tick(1.1)
    assert h.primary.roll_state is None
    rss[b] = 101 * MIB
    h.tick(0.1)  # sampled every MEMORY_SAMPLE_INTERVAL (0.25 s)
    assert h.primary.roll_state is None
    h.tick(0.2)
    roll = h.primary.roll_state
    assert roll is not None and roll.current == 2
    assert "uses 101 MiB of its own (--max-worker-memory 100)" in roll.reason


def test_a_worker_far_over_the_memory_limit_does_not_wait_its_turn() -> None:
    """Recycles run one at a time, replacement first: under a fast leak the last in
    line grew to 5x the limit (issue 13, finding 7). Far over it, a worker is drained
    at once and its slot refilled, whatever roll or recycle is running."""
    rss: dict[int, int] = {}
    h, _ = _harness(workers=3, rss=rss, max_worker_memory=100)
    a, b, c = h.slot_pids()
    assert a is not None and b is not None and c is not None
    rss[a], rss[b], rss[c] = 120 * MIB, 110 * MIB, 90 * MIB
    h.tick(1.1)
    roll = h.primary.roll_state
    assert roll is not None and roll.current == 1  # over: a's recycle, replacement first
    new_a = h.launcher.spawned[-1]
    rss[b], rss[c] = 400 * MIB, 155 * MIB  # meanwhile b and c leak fast
    h.tick(1.1)
    assert h.launcher.got(b) and h.launcher.got(c)  # not behind a's recycle
    assert h.worker(b).state is h.worker(c).state is WorkerState.DRAINING
    assert not h.launcher.got(a)  # a's replacement is booting: a keeps serving until it is ready
    assert h.primary.slots[2].pid not in (None, b) and h.primary.slots[3].pid not in (None, c)
    assert h.primary.roll_state is roll
    rss[a] = 300 * MIB  # a leaks fast too, while its replacement boots: it drains now
    h.tick(1.1)
    assert h.launcher.got(a) and h.worker(a).state is WorkerState.DRAINING
    assert h.primary.slots[1].replacement == new_a  # the replacement it had is its slot's new worker
    h.ready(new_a)
    assert h.primary.slots[1].pid == new_a and h.primary.roll_state is None


def test_max_worker_lifetime_with_jitter() -> None:
    h, recycler = _harness(workers=1, max_worker_lifetime=60, max_worker_lifetime_jitter=10, worker_timeout=0)
    a = h.slot_pids()[0]
    assert a is not None
    deadline = recycler.limits[a].die_at
    assert deadline is not None and 60 <= deadline - h.clock.now <= 70
    assert h.primary.next_deadline() == deadline
    h.tick(deadline - h.clock.now - 0.01)
    assert h.primary.roll_state is None
    h.tick(0.02)
    assert h.primary.roll_state is not None


def test_failed_recycle_keeps_the_worker_and_retries_later() -> None:
    h, _ = _harness(workers=1, max_requests=10)
    a = h.slot_pids()[0]
    assert a is not None
    h.heartbeat(a, requests=10)
    h.tick()
    h.boot_error(h.launcher.spawned[-1], "syntax error in app.py:1")
    assert h.primary.roll_state is None and h.slot_pids() == [a]
    assert h.worker(a).state is WorkerState.READY
    h.tick(RETRY_DELAY - 1)
    assert h.primary.roll_state is None
    h.tick(1.1)
    assert h.primary.roll_state is not None  # tried again
    h.boot_error(h.launcher.spawned[-1], "still broken")
    h.tick(RETRY_DELAY + 1)
    assert h.primary.roll_state is None  # backing off: twice as long now
    h.tick(RETRY_DELAY)
    assert h.primary.roll_state is not None


# -- real servers ------------------------------------------------------------------


def test_max_requests_recycles_without_losing_a_request(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path]
) -> None:
    write_app("myapp", RESTART_APP)
    server = start_server(
        "myapp:app", "--workers", "2", "--no-access-log", "--max-requests", "150", "--heartbeat-interval", "0.2"
    ).wait_ready()
    first = set(server.worker_pids())
    with LoadLoop(server.url, threads=4, max_requests=1000, keep_alive=True) as load:
        server.wait_log("recycled worker", count=3, timeout=30)
    assert load.failures == [], load.failures[:5]
    log = server.log()
    assert "served" in log and "(--max-requests 150)" in log
    assert "stopped" not in log
    wait_until(lambda: len(server.worker_pids()) == 2, 10)
    assert set(server.worker_pids()).isdisjoint(first)
    # replacement first: every old worker drained only after its replacement was ready
    lines = [line for line in log.splitlines() if " ready in " in line or "draining (max requests)" in line]
    assert lines and all("ready in" in prev for prev, line in itertools.pairwise(lines) if "draining" in line), lines


def test_max_worker_lifetime_recycles(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path]
) -> None:
    write_app("myapp", RESTART_APP)
    server = start_server("myapp:app", "--workers", "1", "--max-worker-lifetime", "1").wait_ready()
    first = server.worker_pids()
    server.wait_log("recycled worker 1", timeout=10)
    assert "(--max-worker-lifetime 1)" in server.log()
    wait_until(lambda: server.worker_pids() != first and len(server.worker_pids()) == 1, 10)
    assert server.get().status_code == 200


def test_max_worker_memory_recycles(start_server: Callable[..., Server], write_app: Callable[[str, str], Path]) -> None:
    grower = RESTART_APP.replace(
        "    body = f", "    if scope['path'] == '/grow': HOLD.append(bytearray(60 << 20))\n    body = f"
    )
    write_app("myapp", "HOLD = []\n" + grower)
    server = start_server("myapp:app", "--workers", "1", "--max-worker-memory", "100", "--no-access-log").wait_ready()
    first = server.worker_pids()
    assert server.get("/grow").status_code == 200
    assert "recycl" not in server.log()  # 60 MiB and what the worker has of its own: not yet
    assert server.get("/grow").status_code == 200
    server.wait_log("recycled worker 1", timeout=10)
    assert "(--max-worker-memory 100)" in server.log()
    wait_until(lambda: server.worker_pids() != first and len(server.worker_pids()) == 1, 10)
    server.signal(signal.SIGTERM)
    assert server.wait_exit() == 0


def test_worker_memory_is_its_own_not_what_it_shares_with_its_parent() -> None:
    """--max-worker-memory reads the unique set size: pages a forked child shares with its
    parent (a --preload template's app) do not count, as they do in RSS."""
    from cluster_server._proc import rss_bytes, uss_bytes

    shared = bytearray(os.urandom(1 << 20) * 64)  # 64 MiB, touched, before the fork
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child waits until the parent measured it
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    try:
        rss, uss = rss_bytes(pid), uss_bytes(pid)
        assert rss is not None and uss is not None
        assert rss > 64 * MIB and uss < 16 * MIB, (rss / MIB, uss / MIB)
    finally:
        os.write(w, b"x")
        os.close(w)
        os.waitpid(pid, 0)
    assert len(shared) == 64 * MIB
