"""Exit reasons, rolls and recycles as the operators' counters see them (fake primary, no processes).

Each way a worker can end has its own reason; rolling restarts and recycles
are counted apart; a roll is counted even when it starts and ends within one
turn of the loop; the counters go on across an upgrade.
"""

from __future__ import annotations

import random

from cluster_server.ops.status import ClusterWatch
from cluster_server.primary.loop import RELOAD_PREFIX
from cluster_server.primary.recycle import Recycler

from ..fakes import KILLED, Harness


def _watched(workers: int = 2, **options: object) -> tuple[Harness, ClusterWatch]:
    h = Harness(workers=workers, **options)
    watch = ClusterWatch()
    h.primary.add_component(watch)
    watch.attach(h.primary)
    h.start()
    return h, watch


def _roll_through(h: Harness) -> None:
    """Every replacement becomes ready, every old worker drains."""
    while h.primary.roll_state is not None:
        h.ready(h.launcher.spawned[-1])
        h.finish_drains()


def test_each_way_out_has_its_reason() -> None:
    h, watch = _watched(workers=2)
    a, b = h.slot_pids()
    assert a is not None and b is not None
    h.exit(a, KILLED)  # nobody asked: a crash
    h.tick()
    h.ready(h.launcher.spawned[-1])
    h.primary.roll("SIGHUP")
    _roll_through(h)
    h.primary.roll(f"{RELOAD_PREFIX} app.py changed")
    _roll_through(h)
    h.primary.scale(1)
    h.finish_drains()
    h.primary.stop(why="SIGTERM")
    h.finish_drains()
    watch.tick()
    assert dict(watch.exits) == {"crash": 1, "rolled": 2, "reloaded": 2, "scaled_down": 1, "stopped": 1}
    restarts = watch.restarts()
    assert restarts["crash"] == 1 and restarts["rolled"] == restarts["reloaded"] == 2
    assert "scaled_down" not in restarts and "stopped" not in restarts
    assert dict(watch.rolls) == {"completed": 2} and not watch.recycles


def test_recycles_are_counted_apart_from_rolls_with_their_limit() -> None:
    h, watch = _watched(workers=1, max_requests=10)
    recycler = Recycler(h.config, rng=random.Random(1))
    h.primary.add_component(recycler)
    recycler.attach(h.primary)
    for w in list(h.primary.workers.values()):
        recycler.worker_event("ready", w)
    (pid,) = h.slot_pids()
    assert pid is not None
    h.heartbeat(pid, requests=10)
    h.tick()
    assert h.primary.roll_state is not None and h.primary.roll_state.kind == "max_requests"
    _roll_through(h)
    watch.tick()
    assert dict(watch.exits) == {"max_requests": 1}
    assert dict(watch.recycles) == {"completed": 1} and not watch.rolls
    st = watch.snapshot()
    assert st["last_rolls"][-1]["recycle"] is True and st["last_rolls"][-1]["kind"] == "max_requests"


def test_a_roll_that_starts_and_ends_in_one_turn_is_counted() -> None:
    h, watch = _watched(workers=1)
    events: list[str] = []
    watch.on("roll_started", lambda roll: events.append("started"))
    watch.on("roll_finished", lambda roll, outcome: events.append(outcome))

    def cannot_fork(worker: object) -> tuple[int, None]:
        raise OSError(24, "Too many open files")

    h.launcher.spawn = cannot_fork  # type: ignore[method-assign]
    h.primary.roll("SIGHUP")  # cannot start its replacement: over before the watch looks
    assert h.primary.roll_state is None
    watch.tick()
    assert events == ["started", "failed"] and dict(watch.rolls) == {"failed": 1}
    (last,) = watch.snapshot()["last_rolls"]
    assert last["outcome"] == "failed" and "cannot start a worker" in last["error"]


def test_counters_go_on_across_an_upgrade() -> None:
    h, watch = _watched(workers=2)
    h.primary.roll("SIGHUP")
    _roll_through(h)
    watch.tick()
    handed = watch.counters(upgrading=len(h.primary.workers))
    successor = ClusterWatch()
    successor.restore(handed)
    assert dict(successor.exits) == {"rolled": 2, "upgrade": 2}
    assert dict(successor.rolls) == {"completed": 1}
    # What the old primary's workers will say when they go:
    h.primary.stop(why="upgraded", reason="upgrade")
    assert {w.stop_reason for w in h.primary.workers.values()} == {"upgrade"}
    # Garbage from the environment is ignored, not trusted.
    for bad in (
        None,
        [],
        {"exits": {"crash": -1}},
        {"exits": {"x" * 100: 1}},
        {"exits": {str(i): 1 for i in range(99)}},
    ):
        other = ClusterWatch()
        other.restore(bad)
        assert not other.exits
