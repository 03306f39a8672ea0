"""The primary under faults, part two (issue 13's findings 4-7).

A drain sent right after a fork, a keep-alive connection whose response was
already under way when a roll began, the primary's own waits (its shutdown, a
template's spawn, probing a Unix socket), a boot error that must reach the
primary, and a worker far over its memory limit.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from typing import Any

import pytest

from cluster_server import _proc

from .conftest import HELLO_APP, wait_until
from .fake_primary import Harness

# -- a drain sent within ms of a fork (finding 4) ---------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_drain_right_after_the_fork_is_never_lost(start_server: Any, write_app: Any) -> None:
    """SIGTTIN then SIGTTOU at once: the new worker is drained within microseconds of
    its fork, before it has put its own signal handlers in place. It must stop as
    asked, not serve on until the primary SIGKILLs it at --graceful-timeout."""
    write_app("hello", HELLO_APP)
    srv = start_server("hello:app", "--workers", "2", "--graceful-timeout", "5", "--no-access-log").wait_ready()
    pairs = 30
    for i in range(1, pairs + 1):
        srv.signal(signal.SIGTTIN)
        srv.signal(signal.SIGTTOU)
        srv.wait_log("draining (scaled down)", count=i)
    scaled = [int(p) for p in re.findall(r"worker 3 \[pid (\d+)\] draining \(scaled down\)", srv.log())]
    assert len(scaled) == pairs

    def all_exited() -> bool:
        log = srv.log()
        return all(f"worker 3 [pid {pid}] exited" in log for pid in scaled)

    wait_until(all_exited, 30, what="every scaled-down worker exited")
    log = srv.log()
    assert "did not stop in time" not in log
    assert "killed by SIGKILL" not in log
    assert "said ready twice" not in log
    assert srv.get().status_code == 200


def test_a_signal_sent_before_the_child_reset_its_handlers_reaches_its_own_disposition() -> None:
    """The mechanism behind the test above, without a primary: the parent's handler
    only records the signal; a child that gets SIGTERM before it reset its handlers
    must still be terminated by it, once ``after_fork_in_child`` ran."""
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: seen.append(sig))
    r, w = os.pipe()
    try:
        pid = _proc.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.close(r)
                os.write(w, b"x")
                time.sleep(0.5)  # the parent's SIGTERM arrives now, with the parent's handler still set
                _proc.after_fork_in_child([w])
                time.sleep(5)
            finally:
                os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"x"
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        assert seen == []  # and the parent's own mask is as it was
        assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        os.close(r)
        signal.signal(signal.SIGTERM, previous)


def test_ready_after_a_drain_is_logged_as_what_happened(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(workers=1).start()
    h.primary.scale(2)
    new = h.launcher.spawned[-1]
    h.primary.scale(1)  # drained while it boots
    with caplog.at_level(logging.INFO, logger="cluster_server"):
        h.ready(new)
    assert "became ready after it was asked to stop (scaled down); it drains" in caplog.text
    assert "twice" not in caplog.text
