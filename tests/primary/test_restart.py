"""Rolling restarts: the primary's decisions (fake launcher and clock), then real servers.

A roll replaces one slot at a time: the new worker must be ready before the old
one drains, so capacity never drops below N; a replacement that fails stops the
roll and the old workers keep serving.
"""

from __future__ import annotations

import logging
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from cluster_server.primary.state import WorkerState
from tests.conftest import HELLO_APP, Server, asgi_app, wait_until
from tests.fakes import KILLED, Harness
from tests.ops_helpers import LoadLoop

R = WorkerState.READY
D = WorkerState.DRAINING


# -- decisions (no processes) ----------------------------------------------------


def test_roll_is_replacement_first_one_slot_at_a_time() -> None:
    h = Harness(workers=3).start()
    old = h.slot_pids()
    assert h.primary.roll("test")
    for i, old_pid in enumerate(old):
        new_pid = h.launcher.spawned[-1]
        assert h.primary.slots[i + 1].replacement == new_pid
        # only one replacement at a time, the old worker untouched until it is ready
        assert len(h.by_state(WorkerState.BOOTING)) == 1
        assert h.serving == 3
        assert not h.launcher.got(old_pid)
        h.ready(new_pid)
        assert h.launcher.got(old_pid)  # drained only now
        assert h.worker(old_pid).state is D
        assert h.serving == 3
        h.exit(old_pid)
    assert h.primary.roll_state is None
    assert h.primary.generation == 2
    assert all(h.worker(p).generation == 2 for p in h.slot_pids() if p is not None)
    assert set(h.slot_pids()).isdisjoint(old)


def test_roll_asked_during_a_roll_is_queued_and_coalesced() -> None:
    h = Harness(workers=2).start()
    assert h.primary.roll("first")
    assert not h.primary.roll("second")
    assert not h.primary.roll("third")
    assert h.primary.roll_queue == [("third", None)]
    for _ in range(2):
        h.ready(h.launcher.spawned[-1])
    # the first roll is done, the queued one started at once
    assert h.primary.roll_state is not None
    assert h.primary.roll_state.reason == "third"
    assert h.primary.generation == 3
    for _ in range(2):
        h.ready(h.launcher.spawned[-1])
    assert h.primary.roll_state is None
    assert h.primary.roll_queue == []


def test_failed_replacement_stops_the_roll_and_old_workers_keep_serving(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(workers=2).start()
    old = h.slot_pids()
    h.primary.roll("SIGHUP")
    with caplog.at_level(logging.ERROR, logger="cluster_server"):
        h.boot_error(h.launcher.spawned[-1], "syntax error in /srv/app.py:3: invalid syntax")
    assert h.primary.roll_state is None
    assert h.slot_pids() == old
    assert h.serving == 2
    assert not any(sig for _, sig in h.launcher.signals)  # nobody was told to stop
    assert "rolling restart to generation 2 stopped: syntax error in /srv/app.py:3" in caplog.text
    # nothing is retried behind the user's back
    h.tick(60)
    assert len(h.launcher.spawned) == 3


def test_replacement_not_ready_in_time_stops_the_roll(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(workers=2, ready_timeout=5).start()
    old = h.slot_pids()
    h.primary.roll("SIGHUP")
    new = h.launcher.spawned[-1]
    h.tick(4.9)
    assert not h.launcher.got(new, signal.SIGKILL)
    with caplog.at_level(logging.ERROR, logger="cluster_server"):
        h.tick(0.2)
        assert h.launcher.got(new, signal.SIGKILL)
        h.exit(new, KILLED)
    assert "not ready within 5 s (--ready-timeout)" in caplog.text
    assert "rolling restart to generation 2 stopped" in caplog.text
    assert h.slot_pids() == old and h.serving == 2


def test_roll_queued_behind_a_failing_one_still_runs() -> None:
    """The code may have been fixed between the two SIGHUPs."""
    h = Harness(workers=2).start()
    h.primary.roll("broken")
    h.primary.roll("fixed")
    h.boot_error(h.launcher.spawned[-1], "boom")
    assert h.primary.roll_state is not None and h.primary.roll_state.reason == "fixed"
    for _ in range(2):
        h.ready(h.launcher.spawned[-1])
    assert h.primary.roll_state is None
    h.finish_drains()
    assert h.serving == 2


def test_old_worker_crashing_mid_roll() -> None:
    h = Harness(workers=3).start()
    s1, s2, s3 = h.slot_pids()
    h.primary.roll("SIGHUP")
    r1 = h.launcher.spawned[-1]
    # the old worker of the slot being rolled dies: its replacement is on the way, no respawn
    h.exit(s1, KILLED)
    h.tick(1)
    assert h.launcher.spawned[-1] == r1
    # the old worker of a slot not rolled yet dies: respawned at once, roll goes on
    h.exit(s3, KILLED)
    h.tick(0)
    respawned = h.launcher.spawned[-1]
    assert h.primary.slots[3].pid == respawned
    h.ready(respawned)
    h.ready(r1)
    assert h.primary.slots[1].pid == r1
    r2 = h.launcher.spawned[-1]
    h.ready(r2)
    assert h.launcher.got(s2)
    r3 = h.launcher.spawned[-1]
    h.ready(r3)
    assert h.launcher.got(respawned)
    assert h.primary.roll_state is None
    assert h.slot_pids() == [r1, r2, r3]


def test_scale_down_during_a_roll_does_not_stall_it() -> None:
    h = Harness(workers=3).start()
    h.primary.roll("SIGHUP")
    h.ready(h.launcher.spawned[-1])  # slot 1 done
    r2 = h.launcher.spawned[-1]  # slot 2 booting
    h.primary.scale(1)  # removes slots 3 and 2 (and drains 2's replacement)
    assert h.launcher.got(r2)
    assert sorted(h.primary.slots) == [1]
    assert h.primary.roll_state is None  # nothing left to roll
    h.finish_drains()
    assert h.serving == 1


def test_scale_up_and_down() -> None:
    h = Harness(workers=2).start()
    h.primary.handle_ttin()
    new = h.launcher.spawned[-1]
    assert h.primary.slots[3].pid == new
    h.ready(new)
    h.primary.handle_ttou()
    assert h.worker(new).state is D and h.launcher.got(new)
    h.primary.handle_ttou()
    h.primary.handle_ttou()  # never below one worker
    assert sorted(h.primary.slots) == [1]


def test_stop_during_a_roll_drops_it() -> None:
    h = Harness(workers=2).start()
    h.primary.roll("one")
    h.primary.roll("two")
    h.primary.stop(why="test")
    assert h.primary.roll_state is None and h.primary.roll_queue == []
    assert h.by_state(R) == []


# -- real servers ------------------------------------------------------------------

RESTART_APP = asgi_app(
    """
    import os
    import re
    VERSION = "v1"
    """,
    """
    body = f"{VERSION} {os.getpid()}".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
    """,
)


#: an app rewritten within the same second with the same size would be imported
#: from its stale .pyc: the tests that change the code write no bytecode
NO_PYC = {"PYTHONDONTWRITEBYTECODE": "1"}


def slow_startup_app(seconds: float) -> str:
    """RESTART_APP whose lifespan startup takes ``seconds`` once a file ``slow`` is in its cwd."""
    return RESTART_APP.replace(
        'await send({"type": "lifespan.startup.complete"})',
        'import asyncio, pathlib\n                if pathlib.Path("slow").exists(): '
        f"await asyncio.sleep({seconds})\n"
        '                await send({"type": "lifespan.startup.complete"})',
    )


def _generation_done(server: Server, generation: int, old: list[int] | None = None) -> None:
    """The roll is done, and (given the old pids) every old worker has exited."""
    server.wait_log(f"rolling restart to generation {generation} done", timeout=20)
    if old is not None:
        wait_until(lambda: set(server.worker_pids()).isdisjoint(old), 10, what="old workers gone")


def test_rolling_restart_under_load_loses_nothing(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path]
) -> None:
    write_app("myapp", RESTART_APP)
    server = start_server("myapp:app", "--workers", "2", "--no-access-log").wait_ready()
    before = set(server.worker_pids())
    with LoadLoop(server.url, threads=4, keep_alive=True) as load:
        wait_until(lambda: load.count() > 50, 10, what="load running")
        for generation in (2, 3):
            server.signal(signal.SIGHUP)
            _generation_done(server, generation)
            seen = load.count()
            wait_until(lambda seen=seen: load.count() > seen + 50, 10, what="load after the restart")
    wait_until(lambda: len(server.worker_pids()) == 2, 10, what="old workers gone")
    assert load.failures == [], load.failures[:5]
    assert load.ok > 200
    assert set(server.worker_pids()).isdisjoint(before)
    assert server.log().count("draining (rolled)") == 4


def test_sighup_to_the_whole_process_group_rolls_instead_of_killing_workers(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path]
) -> None:
    write_app("myapp", RESTART_APP)
    server = start_server("myapp:app", "--workers", "2", "--no-access-log").wait_ready()
    old = server.worker_pids()
    with LoadLoop(server.url, threads=2, keep_alive=True) as load:
        wait_until(lambda: load.count() > 20, 10, what="load running")
        os.killpg(server.pid, signal.SIGHUP)  # the primary started its own session: pgid == pid
        _generation_done(server, 2, old)
    assert load.failures == []
    assert "exited (exit code 0)" in server.log() and "killed by SIGHUP" not in server.log()


def test_restart_serves_changed_code(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path]
) -> None:
    write_app("myapp", RESTART_APP)
    server = start_server("myapp:app", "--workers", "2", env=NO_PYC).wait_ready()
    assert server.get().text.startswith("v1 ")
    old = server.worker_pids()
    write_app("myapp", RESTART_APP.replace('"v1"', '"v2"'))
    server.signal(signal.SIGHUP)
    _generation_done(server, 2, old)
    for _ in range(10):  # whichever worker answers
        assert server.get(headers={"connection": "close"}).text.startswith("v2 ")


def test_syntax_error_at_restart_keeps_old_workers_then_fixed_code_rolls(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path]
) -> None:
    write_app("myapp", RESTART_APP)
    server = start_server("myapp:app", "--workers", "2", env=NO_PYC).wait_ready()
    old = server.worker_pids()
    write_app("myapp", RESTART_APP.replace('VERSION = "v1"', 'VERSION = "v2" +'))
    server.signal(signal.SIGHUP)
    server.wait_log("rolling restart to generation 2 stopped")
    log = server.log()
    assert "syntax error in" in log and "myapp.py:" in log
    wait_until(lambda: server.worker_pids() == old, 5, what="the failed replacement reaped")
    assert server.get().text.startswith("v1 ")  # the old generation serves
    write_app("myapp", RESTART_APP.replace('"v1"', '"v3"'))
    server.signal(signal.SIGHUP)
    _generation_done(server, 3, old)
    for _ in range(10):
        assert server.get(headers={"connection": "close"}).text.startswith("v3 ")


def test_replacement_that_is_not_ready_in_time_stops_the_roll(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path], tmp_path: Path
) -> None:
    write_app("myapp", slow_startup_app(30))
    server = start_server("myapp:app", "--workers", "1", "--ready-timeout", "1").wait_ready()
    old = server.worker_pids()
    (tmp_path / "slow").touch()
    server.signal(signal.SIGHUP)
    server.wait_log("rolling restart to generation 2 stopped")
    assert "not ready within 1 s (--ready-timeout)" in server.log()
    wait_until(lambda: server.worker_pids() == old, 5, what="the slow replacement killed")
    assert server.get().status_code == 200


def test_old_worker_killed_mid_roll(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path], tmp_path: Path
) -> None:
    write_app("myapp", slow_startup_app(0.5))
    server = start_server("myapp:app", "--workers", "2", "--no-access-log").wait_ready()
    old = server.worker_pids()
    slot2 = int(re.findall(r"worker 2 \[pid (\d+)\] ready", server.log())[0])
    (tmp_path / "slow").touch()
    server.signal(signal.SIGHUP)
    server.wait_log("rolling restart to generation 2")
    os.kill(slot2, signal.SIGKILL)  # slot 2 is not rolled yet: slot 1's replacement is booting
    server.wait_log("killed by SIGKILL")
    _generation_done(server, 2, old)
    assert "stopped" not in server.log()
    wait_until(lambda: len(server.worker_pids()) == 2, 10, what="two workers")
    assert len({server.get(headers={"connection": "close"}).text for _ in range(20)}) == 2


def test_sigttin_adds_and_sigttou_drains_a_worker(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path]
) -> None:
    write_app("myapp", HELLO_APP)
    server = start_server("myapp:app", "--workers", "2", "--no-access-log").wait_ready()
    wait_until(lambda: len(server.worker_pids()) == 2, 5)
    server.signal(signal.SIGTTIN)
    server.wait_log("scaling from 2 to 3 workers")
    wait_until(lambda: len(server.worker_pids()) == 3, 10, what="a third worker")
    server.wait_log("ready in", count=3)
    with LoadLoop(server.url.rstrip("/"), threads=2, keep_alive=True) as load:
        wait_until(lambda: load.count() > 20, 10)
        server.signal(signal.SIGTTOU)
        server.wait_log("draining (scaled down)")
        wait_until(lambda: len(server.worker_pids()) == 2, 10, what="the third worker gone")
        seen = load.count()
        wait_until(lambda: load.count() > seen + 20, 10)
    assert load.failures == []
    assert "exited (exit code 0)" in server.log()
