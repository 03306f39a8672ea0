"""``ctl reload/scale/restart --wait``: follow a change until it ends, for deploy scripts.

ctl asks for the change, then reads ``status`` every ``POLL`` seconds until the
change has ended. Each check below reads one status (the schema is in
docs/operations.md) and returns None (not yet), or an :class:`Ended` that says
whether it succeeded and why not.

A rolling restart is recognised by its generation: the control socket answers
``reload`` and ``restart`` with ``since_generation``, the generation before the
request, and the roll that serves the request is the first one to a later
generation (a roll queued behind another, or merged with one asked for later,
included). The primary keeps the last rolls that ended in ``last_rolls``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: seconds between two looks at the status
POLL = 0.2


@dataclass(frozen=True)
class Ended:
    ok: bool
    message: str


def roll_ended(st: dict[str, Any], since: int, slot: int | None = None) -> Ended | None:
    """Has the rolling restart asked for at generation ``since`` ended (``slot``: one worker's)?"""
    for roll in st["last_rolls"]:
        if roll["recycle"] or roll["generation"] <= since or (slot is not None and slot not in roll["slots"]):
            continue
        what = f"rolling restart to generation {roll['generation']}"
        if roll["outcome"] == "completed":
            return Ended(
                True, f"{what} completed: {roll['done']} worker(s) replaced in {roll['duration_seconds']:.1f} s"
            )
        return Ended(False, f"{what} {roll['outcome']}: {roll['error'] or 'see the server log'}")
    if st["stopping"]:
        return Ended(False, "the server is stopping; the rolling restart will not happen")
    return None


def scale_ended(st: dict[str, Any], target: int, before: int) -> Ended | None:
    """Has scaling from ``before`` to ``target`` workers ended: each slot's worker ready, removed ones gone?"""
    if st["stopping"]:
        return Ended(False, "the server is stopping")
    if st["workers_configured"] != target:
        return Ended(False, f"scaled again meanwhile, to {st['workers_configured']} workers")
    for row in st["workers"]:
        if row["id"] > before and row["failures"] >= 2:
            why = row["last_exit"] or "see the server log"
            return Ended(False, f"worker {row['id']} cannot start ({row['failures']} failures in a row): {why}")
    rows = st["workers"]
    if len(rows) == target and all(r["state"] == "ready" and r["id"] <= target for r in rows):
        return Ended(True, f"{target} workers ready")
    return None


def wait(
    fetch: Callable[[], dict[str, Any]],
    check: Callable[[dict[str, Any]], Ended | None],
    timeout: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Ended:
    """Read the status until ``check`` says it ended, or ``timeout`` seconds passed."""
    deadline = clock() + timeout
    while True:
        ended = check(fetch())
        if ended is not None:
            return ended
        if clock() >= deadline:
            return Ended(False, f"still not done after {timeout:g} s (--wait-timeout); see `ctl status`")
        sleep(POLL)
