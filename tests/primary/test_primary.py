"""The primary's decisions, driven with a fake launcher and a fake clock.

Nothing here forks: ``FakeLauncher`` hands out pids and records every signal,
the clock only moves when a test says so, and worker exits are fed in with
``child_exited(pid, status)`` as ``reap_workers`` would. The real loop
(selector, signals, fork) is covered by test_serving.py.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
from typing import Any

import pytest

from cluster_server import AppLoadError, Config, WorkerBootError
from cluster_server.primary.component import MAX_FAILURES, Component, WorkerEvent, override
from cluster_server.primary.loop import (
    BACKOFF_CAP,
    DUMP_GRACE,
    SPAWN_RETRY,
    STABLE_AFTER,
    Primary,
    Worker,
    backoff_delay,
    describe_status,
)
from cluster_server.primary.state import WorkerState
from cluster_server.wire.channel import Channel, encode
from cluster_server.worker.main import DUMP_SIGNAL, EXIT_BOOT_FAILURE

from ..fakes import FakeClock, FakeLauncher

TERM, KILL = signal.SIGTERM, signal.SIGKILL


def exited(code: int) -> int:
    """A wait status for a process that exited with ``code``."""
    return code << 8


def killed(sig: int) -> int:
    """A wait status for a process killed by ``sig``."""
    return int(sig)


class Cluster:
    """A Primary with fakes, plus shorthands for what workers do."""

    def __init__(self, workers: int = 2, channels: bool = False, **options: Any) -> None:
        self.clock = FakeClock()
        self.launcher = FakeLauncher(channels)
        self.p = Primary(
            Config(app="fake:app", workers=workers, **options), [], launcher=self.launcher, clock=self.clock
        )

    def start(self, ready: bool = True) -> Cluster:
        self.p.manage_workers()
        if ready:
            for w in list(self.p.workers.values()):
                self.ready(w)
        return self

    def worker(self, slot: int) -> Worker:
        pid = self.p.slots[slot].pid
        assert pid is not None, f"slot {slot} is empty"
        return self.p.workers[pid]

    def replacement(self, slot: int) -> Worker:
        pid = self.p.slots[slot].replacement
        assert pid is not None, f"slot {slot} has no replacement"
        return self.p.workers[pid]

    def ready(self, w: Worker) -> None:
        self.p.handle_message(w, {"t": "ready"})

    def exit(self, w: Worker, status: int = exited(1)) -> None:
        self.p.child_exited(w.pid, status)

    def serving(self) -> int:
        return sum(1 for w in self.p.workers.values() if w.state is WorkerState.READY)

    def tick(self, advance: float = 0.0) -> None:
        self.clock.advance(advance)
        self.p.tick()


@pytest.fixture
def caplog_info(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="cluster_server")
    return caplog


# -- spawning ---------------------------------------------------------------------


def test_spawns_one_worker_per_slot(caplog_info: pytest.LogCaptureFixture) -> None:
    c = Cluster(workers=3).start(ready=False)
    assert [(w.id, w.generation) for w in c.launcher.workers] == [(1, 1), (2, 1), (3, 1)]
    assert all(w.state is WorkerState.BOOTING for w in c.p.workers.values())
    assert not c.p.ever_ready
    for slot in (1, 2):
        c.ready(c.worker(slot))
    assert not c.p.ever_ready
    c.ready(c.worker(3))
    assert c.p.ever_ready
    assert "all 3 workers ready" in caplog_info.text
    assert "worker 1 [pid 101] spawned (generation 1)" in caplog_info.text
    # Nothing more to do: a tick spawns nothing and kills nothing.
    c.tick(1.0)
    assert len(c.launcher.workers) == 3
    assert c.launcher.kills == []


def test_backoff_delay_doubles_up_to_the_cap() -> None:
    assert backoff_delay(1) == 0.0
    assert [backoff_delay(n) for n in range(2, 6)] == [0.1, 0.2, 0.4, 0.8]
    assert backoff_delay(50) == BACKOFF_CAP
    assert all(backoff_delay(n) <= backoff_delay(n + 1) for n in range(1, 30))


# -- crashes ------------------------------------------------------------------------


def test_crash_is_replaced_at_once_then_with_growing_backoff(caplog_info: pytest.LogCaptureFixture) -> None:
    c = Cluster(workers=2).start()
    first = c.worker(1)
    c.exit(first, killed(signal.SIGKILL))
    assert first.state is WorkerState.EXITED
    assert "worker 1 [pid 101] exited (killed by SIGKILL)" in caplog_info.text
    assert c.p.slots[1].pid is None
    c.tick()  # first crash: restarted at once
    assert len(c.launcher.workers) == 3 and c.launcher.workers[-1].id == 1

    delays = []
    for _ in range(4):  # the new worker keeps dying before it is ready
        w = c.worker(1)
        c.exit(w, exited(1))
        assert w.state is WorkerState.FAILED
        assert not c.p.fatal, "a crash after the cluster was up is never fatal"
        delay = c.p.slots[1].respawn_at - c.clock.now
        delays.append(round(delay, 3))
        assert c.p.next_deadline() == pytest.approx(c.p.slots[1].respawn_at)
        spawned = len(c.launcher.workers)
        c.tick(delay * 0.9)
        assert len(c.launcher.workers) == spawned, "respawned before its backoff passed"
        c.tick(delay * 0.1 + 1e-6)
        assert len(c.launcher.workers) == spawned + 1
    assert delays == [0.1, 0.2, 0.4, 0.8]
    assert "worker 1 failed 5 times in a row; restarting it in 0.80 s" in caplog_info.text
    # The other slot was never touched.
    assert c.worker(2).pid == 102 and c.launcher.kills == []


def test_a_worker_that_was_stable_restarts_its_backoff() -> None:
    c = Cluster(workers=1).start()
    for _ in range(3):
        c.exit(c.worker(1))
        c.tick(BACKOFF_CAP)
    assert c.p.slots[1].failures == 3
    c.ready(c.worker(1))
    c.clock.advance(STABLE_AFTER)
    c.exit(c.worker(1))
    assert c.p.slots[1].failures == 1
    assert c.p.slots[1].respawn_at == c.clock.now  # at once again


def test_exit_of_unknown_pid_is_ignored() -> None:
    c = Cluster(workers=1).start()
    c.p.child_exited(99999, exited(0))
    assert c.worker(1).state is WorkerState.READY


def test_a_worker_that_cannot_be_forked_is_retried(caplog_info: pytest.LogCaptureFixture) -> None:
    c = Cluster(workers=2)
    real_spawn = c.launcher.spawn
    failing = [True]

    def spawn(worker: Worker) -> tuple[int, Channel | None]:
        if failing[0] and worker.id == 2:
            raise OSError(24, "Too many open files")
        return real_spawn(worker)

    c.launcher.spawn = spawn  # type: ignore[method-assign]
    c.start()
    assert c.p.slots[2].pid is None and c.serving() == 1, "the others serve on"
    assert "cannot start worker 2: [Errno 24] Too many open files; retrying in" in caplog_info.text
    assert c.p.next_deadline() == pytest.approx(c.clock.now + SPAWN_RETRY)
    failing[0] = False
    c.tick(SPAWN_RETRY)
    assert c.p.slots[2].pid is not None and not c.p.stopping


def test_watch_child_takes_the_pid() -> None:
    c = Cluster(workers=1).start()
    seen: list[tuple[int, int]] = []
    c.p.watch_child(4242, lambda pid, status: seen.append((pid, status)))
    c.p.child_exited(4242, exited(0))
    assert seen == [(4242, 0)]
    assert not c.p.watches_child(4242)


# -- start-up failures ----------------------------------------------------------------


def test_boot_error_at_startup_stops_the_cluster_with_app_load_error() -> None:
    c = Cluster(workers=2).start(ready=False)
    w1, w2 = c.worker(1), c.worker(2)
    msg = "cannot import 'nosuch': no module named 'nosuch'; check the APP path or --app-dir"
    c.p.handle_message(w1, {"t": "boot_error", "error": msg, "stage": "load"})
    c.exit(w1, exited(EXIT_BOOT_FAILURE))
    assert isinstance(c.p.fatal, AppLoadError)
    assert str(c.p.fatal) == msg
    assert c.p.stopping
    assert c.launcher.signals_to(w2.pid) == [TERM], "the other worker is drained"
    assert w2.state is WorkerState.DRAINING
    c.exit(w2, killed(TERM))
    c.tick(100)
    assert len(c.launcher.workers) == 2, "nothing is respawned after a fatal start-up error"
    assert not c.p.workers


def test_lifespan_failure_at_startup_is_worker_boot_error() -> None:
    c = Cluster(workers=1).start(ready=False)
    w = c.worker(1)
    c.p.handle_message(w, {"t": "boot_error", "error": "lifespan startup of x failed", "stage": "lifespan"})
    c.exit(w, exited(EXIT_BOOT_FAILURE))
    assert type(c.p.fatal) is WorkerBootError
    assert "lifespan startup" in str(c.p.fatal)


def test_app_named_lifespan_still_gets_app_load_error() -> None:
    c = Cluster(workers=1).start(ready=False)
    w = c.worker(1)
    c.p.handle_message(w, {"t": "boot_error", "error": "cannot import 'lifespan_app'", "stage": "load"})
    c.exit(w, exited(EXIT_BOOT_FAILURE))
    assert type(c.p.fatal) is AppLoadError


def test_first_worker_dying_without_a_word_is_worker_boot_error() -> None:
    c = Cluster(workers=1).start(ready=False)
    c.exit(c.worker(1), killed(signal.SIGSEGV))
    assert type(c.p.fatal) is WorkerBootError
    assert str(c.p.fatal) == "worker 1 exited (killed by SIGSEGV) before it was ready"


def test_boot_error_after_the_cluster_was_up_backs_off_instead(caplog_info: pytest.LogCaptureFixture) -> None:
    c = Cluster(workers=1).start()
    c.exit(c.worker(1))
    c.tick()
    w = c.worker(1)
    c.p.handle_message(w, {"t": "boot_error", "error": "syntax error in app.py:3", "stage": "load"})
    c.exit(w, exited(EXIT_BOOT_FAILURE))
    assert c.p.fatal is None and not c.p.stopping
    assert "worker 1 could not start: syntax error in app.py:3" in caplog_info.text
    assert c.p.slots[1].respawn_at > c.clock.now


def test_ready_timeout_kills_once_and_is_fatal_at_startup(caplog_info: pytest.LogCaptureFixture) -> None:
    c = Cluster(workers=1, ready_timeout=5).start(ready=False)
    w = c.worker(1)
    assert c.p.next_deadline() == pytest.approx(w.spawned_at + 5)
    c.tick(4.9)
    assert c.launcher.kills == []
    c.tick(0.1)
    assert c.launcher.kills == [(w.pid, KILL)]
    assert "was not ready within 5 s" in caplog_info.text
    # Until it is reaped: no second SIGKILL, and no deadline in the past (no busy loop).
    c.tick(1.0)
    assert c.launcher.kills == [(w.pid, KILL)]
    assert c.p.next_deadline() is None
    c.exit(w, killed(KILL))
    assert type(c.p.fatal) is WorkerBootError
    assert "--ready-timeout" in str(c.p.fatal)


# -- hung workers ---------------------------------------------------------------------


def test_heartbeat_timeout_dumps_the_stack_then_kills(caplog_info: pytest.LogCaptureFixture) -> None:
    c = Cluster(workers=2, worker_timeout=5).start()
    w, other = c.worker(1), c.worker(2)
    for _ in range(3):  # heartbeats keep both alive
        c.tick(3)
        c.p.handle_message(w, {"t": "hb", "r": 7, "c": 2})
        c.p.handle_message(other, {"t": "hb", "r": 0, "c": 0})
    assert c.launcher.kills == []
    assert (w.requests, w.connections) == (7, 2)
    c.tick(4.9)
    assert c.launcher.kills == []
    c.p.handle_message(other, {"t": "hb"})  # the other one is fine
    c.tick(0.1)
    assert c.launcher.kills == [(w.pid, DUMP_SIGNAL)]
    assert "sent no heartbeat for 5.0 s" in caplog_info.text
    assert c.p.next_deadline() == pytest.approx(c.clock.now + DUMP_GRACE)
    c.tick(DUMP_GRACE)
    assert c.launcher.kills == [(w.pid, DUMP_SIGNAL), (w.pid, KILL)]
    c.tick(1.0)
    assert len(c.launcher.kills) == 2, "no second dump or kill while waiting for the reap"
    c.exit(w, killed(KILL))
    c.tick()
    assert c.worker(1).pid != w.pid and c.worker(1).state is WorkerState.BOOTING
    assert c.launcher.signals_to(other.pid) == []


def test_worker_timeout_zero_disables_the_watchdog() -> None:
    c = Cluster(workers=1, worker_timeout=0).start()
    c.tick(3600)
    assert c.launcher.kills == []


# -- stopping -----------------------------------------------------------------------


def test_drain_deadline_then_sigkill() -> None:
    c = Cluster(workers=2, graceful_timeout=10).start()
    w1, w2 = c.worker(1), c.worker(2)
    c.p.handle_term()
    assert c.p.stopping
    assert c.launcher.kills == [(w1.pid, TERM), (w2.pid, TERM)]
    assert {w1.state, w2.state} == {WorkerState.DRAINING}
    c.exit(w1, exited(0))  # drained in time
    c.tick(9.9)
    assert len(c.launcher.kills) == 2
    assert c.p.next_deadline() == pytest.approx(c.clock.now + 0.1)
    c.tick(0.1)
    assert c.launcher.kills[-1] == (w2.pid, KILL)
    c.exit(w2, killed(KILL))
    c.tick(100)
    assert not c.p.workers and len(c.launcher.workers) == 2, "nothing respawns while stopping"
    assert c.p.exit_code == 0


def test_stop_drains_booting_workers_too() -> None:
    c = Cluster(workers=2).start(ready=False)
    c.ready(c.worker(1))
    c.p.handle_term()
    assert all(w.state is WorkerState.DRAINING for w in c.p.workers.values())
    assert sorted(s for _, s in c.launcher.kills) == [TERM, TERM]


def test_second_sigint_kills_at_once() -> None:
    c = Cluster(workers=2).start()
    pids = sorted(c.p.workers)
    c.p._queue_signal(signal.SIGINT, None)
    c.p._handle_signals()
    assert c.launcher.kills == [(pids[0], TERM), (pids[1], TERM)]
    c.p._queue_signal(signal.SIGINT, None)
    c.p._handle_signals()
    assert c.launcher.kills[2:] == [(pids[0], KILL), (pids[1], KILL)]
    c.tick(100)
    assert len(c.launcher.kills) == 4, "the drain deadline does not SIGKILL again"
    assert c.p.exit_code == 130  # interrupted, not a clean stop


def test_sigquit_kills_at_once() -> None:
    c = Cluster(workers=2).start()
    c.p.handle_quit()
    assert sorted(s for _, s in c.launcher.kills) == [KILL, KILL]
    assert c.p.stopping


# -- rolling restarts -------------------------------------------------------------------


def test_rolling_restart_replaces_one_slot_at_a_time_replacement_first() -> None:
    c = Cluster(workers=3).start()
    old = {slot: c.worker(slot).pid for slot in (1, 2, 3)}
    c.launcher.events.clear()
    c.p._queue_signal(signal.SIGHUP, None)
    c.p._handle_signals()
    assert c.p.roll_state is not None and c.p.generation == 2
    for slot in (1, 2, 3):
        new = c.replacement(slot)
        assert new.generation == 2
        assert c.serving() == 3, "capacity never drops below N"
        c.ready(new)
        assert c.worker(slot) is new
        assert c.p.workers[old[slot]].state is WorkerState.DRAINING
        c.exit(c.p.workers[old[slot]], exited(0))
        assert c.serving() == 3
    assert c.launcher.events == [
        ("spawn", 1, 2),
        ("kill", old[1], TERM),
        ("spawn", 2, 2),
        ("kill", old[2], TERM),
        ("spawn", 3, 2),
        ("kill", old[3], TERM),
    ]
    assert c.p.roll_state is None
    assert {s.generation for s in c.p.slots.values()} == {2}
    c.tick(100)
    assert len(c.launcher.workers) == 6, "drained old workers are not respawned"


def test_rolling_restart_stops_when_a_replacement_fails(caplog_info: pytest.LogCaptureFixture) -> None:
    c = Cluster(workers=3).start()
    old = sorted(c.p.workers)
    assert c.p.roll("test")
    c.ready(c.replacement(1))
    failing = c.replacement(2)
    c.p.handle_message(failing, {"t": "boot_error", "error": "syntax error in app.py:1", "stage": "load"})
    c.exit(failing, exited(EXIT_BOOT_FAILURE))
    assert c.p.roll_state is None
    assert c.p.fatal is None and not c.p.stopping
    assert "rolling restart to generation 2 stopped: syntax error in app.py:1" in caplog_info.text
    # Slot 1 was rolled; slots 2 and 3 keep their old workers, untouched.
    assert c.worker(1).generation == 2
    assert [c.worker(s).pid for s in (2, 3)] == old[1:]
    assert c.launcher.signals_to(old[1]) == [] and c.launcher.signals_to(old[2]) == []
    c.tick(100)
    assert c.p.slots[2].replacement is None and c.p.slots[3].replacement is None
    # A later roll starts from scratch with a new generation.
    assert c.p.roll("again")
    assert c.replacement(1).generation == 3


def test_rolling_restart_stops_when_a_replacement_never_gets_ready() -> None:
    c = Cluster(workers=2, ready_timeout=5).start()
    old = sorted(c.p.workers)
    c.p.roll("test")
    new = c.replacement(1)
    c.tick(5)
    assert c.launcher.kills == [(new.pid, KILL)]
    c.exit(new, killed(KILL))
    assert c.p.roll_state is None and c.p.fatal is None
    assert sorted(c.p.workers) == old


def test_a_second_roll_waits_for_the_first() -> None:
    c = Cluster(workers=1).start()
    assert c.p.roll("first")
    assert not c.p.roll("second")
    c.ready(c.replacement(1))
    assert c.p.roll_state is not None and c.p.roll_state.reason == "second"
    assert c.replacement(1).generation == 3


def test_old_worker_crashing_during_its_roll_is_not_respawned_twice() -> None:
    c = Cluster(workers=1).start()
    old = c.worker(1)
    c.p.roll("test")
    new = c.replacement(1)
    c.exit(old)
    c.tick(1)
    assert len(c.launcher.workers) == 2, "the replacement already fills the slot"
    c.ready(new)
    assert c.worker(1) is new and c.p.roll_state is None


# -- scaling ------------------------------------------------------------------------------


def test_ttin_adds_a_worker_and_ttou_drains_one() -> None:
    c = Cluster(workers=2).start()
    c.p.handle_ttin()
    assert sorted(c.p.slots) == [1, 2, 3]
    third = c.worker(3)
    assert third.state is WorkerState.BOOTING
    c.ready(third)
    c.p.handle_ttou()
    assert sorted(c.p.slots) == [1, 2]
    assert c.launcher.kills == [(third.pid, TERM)]
    assert third.stop_reason == "scaled_down"
    c.exit(third, exited(0))
    c.tick(100)
    assert len(c.launcher.workers) == 3, "a scaled-down worker is not replaced"


def test_ttou_never_goes_below_one_worker() -> None:
    c = Cluster(workers=1).start()
    c.p.handle_ttou()
    assert sorted(c.p.slots) == [1] and c.launcher.kills == []


def test_scaling_away_the_slot_being_rolled_ends_that_step() -> None:
    c = Cluster(workers=2).start()
    old2 = c.worker(2)
    assert c.p.roll("test", slots=[2])
    new2 = c.replacement(2)
    c.p.handle_ttou()  # slot 2 goes away while its replacement boots
    assert sorted(c.launcher.signals_to(old2.pid) + c.launcher.signals_to(new2.pid)) == [TERM, TERM]
    assert c.p.roll_state is None, "the roll must not wait forever for a removed slot"
    assert c.p.roll("again"), "a new roll starts instead of being queued behind a stuck one"


# -- messages -----------------------------------------------------------------------------


def test_unexpected_messages_are_logged_and_dropped(caplog_info: pytest.LogCaptureFixture) -> None:
    c = Cluster(workers=1).start(ready=False)
    w = c.worker(1)
    for msg in ({}, {"t": "nope"}, {"t": 5}, {"t": None, "x": [1, 2]}):
        c.p.handle_message(w, msg)
    assert caplog_info.text.count("sent an unknown message") == 4
    c.p.handle_message(w, {"t": "hb", "r": "many", "c": None})  # bad counters: ignored
    assert (w.requests, w.connections) == (0, 0)
    c.p.handle_message(w, {"t": "boot_error"})
    assert w.boot_error == "unknown error"
    c.ready(w)
    c.ready(w)
    assert "said ready twice" in caplog_info.text
    assert w.state is WorkerState.READY and c.launcher.kills == []


def test_garbage_on_a_real_channel_is_dropped(caplog_info: pytest.LogCaptureFixture) -> None:
    c = Cluster(workers=1, channels=True).start(ready=False)
    w = c.worker(1)
    peer = c.launcher.peers[w.pid]
    fds_before = len(os.listdir("/proc/self/fd"))
    r, wr = os.pipe()
    peer.sendmsg([b"\xff\xfe not json"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, r.to_bytes(4, "little"))])
    os.close(r)
    os.close(wr)
    peer.send(b"[1, 2, 3]")
    peer.send(b'{"t": "ready"')
    peer.send(b"x" * 70_000)
    peer.send(encode({"t": "ready"}))
    c.p._on_channel(w, selectors.EVENT_READ)
    assert caplog_info.text.count("dropped a message") == 4
    assert w.state is WorkerState.READY
    assert len(os.listdir("/proc/self/fd")) == fds_before, "the fd sent with garbage was closed"
    for sock in c.launcher.peers.values():
        sock.close()
    c.p._on_channel(w, selectors.EVENT_READ)  # EOF: the channel is closed, nothing raised
    assert w.channel is not None and w.channel.closed


def test_boot_error_still_unread_when_the_exit_is_reaped() -> None:
    c = Cluster(workers=1, channels=True).start(ready=False)
    w = c.worker(1)
    peer = c.launcher.peers[w.pid]
    peer.send(encode({"t": "boot_error", "error": "module 'app' has no attribute 'nope'", "stage": "load"}))
    peer.close()
    c.exit(w, exited(EXIT_BOOT_FAILURE))  # reaped before the selector saw the channel
    assert type(c.p.fatal) is AppLoadError
    assert str(c.p.fatal) == "module 'app' has no attribute 'nope'"
    c.launcher.close()


def test_components_see_events_and_unknown_messages() -> None:
    seen: list[tuple[str, int]] = []

    class Recorder(Component):
        @override
        def worker_event(self, event: WorkerEvent, w: Worker) -> None:
            seen.append((event, w.id))

        @override
        def worker_message(self, w: Worker, msg: dict[str, Any], fds: list[int]) -> bool:
            seen.append(("msg:" + str(msg.get("t")), w.id))
            return msg.get("t") == "mine"

    c = Cluster(workers=1)
    c.p.add_component(Recorder())
    c.start()
    c.p.handle_message(c.worker(1), {"t": "mine"})
    c.p.handle_term()
    c.exit(c.worker(1), exited(0))
    assert seen == [("spawned", 1), ("ready", 1), ("msg:mine", 1), ("draining", 1), ("exited", 1)]


class _Broken(Component):
    """A component whose tick always raises."""

    closed = False

    @override
    def tick(self) -> None:
        raise RuntimeError("boom")

    @override
    def close(self) -> None:
        self.closed = True


class _Ticks(Component):
    ticks = 0

    @override
    def tick(self) -> None:
        self.ticks += 1


def test_a_component_that_raises_is_logged_isolated_then_disabled(caplog_info: pytest.LogCaptureFixture) -> None:
    broken, other = _Broken(), _Ticks()
    c = Cluster(workers=1)
    c.p.add_component(broken)
    c.p.add_component(other)
    c.start()
    c.tick()
    assert other.ticks == 1, "the next component still gets its call"
    assert "_Broken.tick raised" in caplog_info.text and "RuntimeError: boom" in caplog_info.text  # the traceback
    for _ in range(MAX_FAILURES - 1):
        c.tick()
    assert broken not in c.p.components and broken.closed, "disabled, and closed"
    assert "_Broken disabled after" in caplog_info.text
    c.tick()
    assert other.ticks == MAX_FAILURES + 1
    assert not c.p.stopping and c.serving() == 1 and c.launcher.kills == [], "the cluster serves on"


def test_a_component_whose_attach_raises_is_disabled_at_once(caplog_info: pytest.LogCaptureFixture) -> None:
    class HalfAttached(_Broken):
        @override
        def attach(self, primary: Primary) -> None:
            raise RuntimeError("cannot attach")

    half = HalfAttached()
    c = Cluster(workers=1)
    c.p.components.append(half)
    c.p._attach(half)  # what run() does for each component
    assert half not in c.p.components and half.closed
    assert "HalfAttached.attach raised" in caplog_info.text and "RuntimeError: cannot attach" in caplog_info.text
    c.start()
    c.tick()
    assert c.serving() == 1 and not c.p.stopping


def test_an_essential_component_that_keeps_failing_drains_the_cluster(caplog_info: pytest.LogCaptureFixture) -> None:
    class Router(_Broken):
        essential = True

    router = Router()
    c = Cluster(workers=2)
    c.p.add_component(router)
    c.start()
    for _ in range(MAX_FAILURES):
        c.tick()
    assert c.p.stopping and c.p.exit_code == 1
    assert sorted(s for _, s in c.launcher.kills) == [TERM, TERM], "a graceful drain, not a kill"
    assert not router.closed, "closed only when the primary exits"
    assert "cannot serve without it" in caplog_info.text


def test_describe_status() -> None:
    assert describe_status(exited(0)) == "exit code 0"
    assert describe_status(exited(3)) == "exit code 3"
    assert describe_status(killed(signal.SIGKILL)) == "killed by SIGKILL"
    assert describe_status(killed(signal.SIGTERM)) == "killed by SIGTERM"


def test_ready_read_after_the_worker_was_reaped_does_not_count() -> None:
    c = Cluster(workers=2, channels=True).start()
    old = sorted(c.p.workers)
    c.p.roll("test")
    new = c.replacement(1)
    c.launcher.peers[new.pid].send(encode({"t": "ready"}))  # then it dies at once
    c.exit(new, killed(signal.SIGSEGV))
    assert new.state is WorkerState.FAILED
    assert c.p.roll_state is None, "the roll stops: its replacement never served"
    assert sorted(c.p.workers) == old and c.launcher.kills == [], "the old workers keep serving"
    c.launcher.close()
