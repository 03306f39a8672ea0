"""The worker state machine: every state and every legal move, in one table.

Like h11's ``_state.py``, everything that affects a worker's lifecycle lives
here. The primary reads this table for every decision (where to route a
connection, how much capacity is serving, whom to roll or recycle); a move the
table does not list raises :class:`IllegalTransition`, which is always a bug.

    booting ──ready──▶ ready ──drain──▶ draining ──exit──▶ exited
       │                 │                               ▲
       ├──exit before ready──▶ failed                    │
       └──drain (roll aborted / shutdown) ──▶ draining ──┘
"""

from __future__ import annotations

import enum

from cluster_server._errors import IllegalTransition


class WorkerState(enum.Enum):
    BOOTING = "booting"  # forked; importing the app, running lifespan startup
    READY = "ready"  # serving; counted as capacity
    DRAINING = "draining"  # told to stop: no new connections, finishing in-flight ones
    EXITED = "exited"  # gone after having been ready or draining
    FAILED = "failed"  # gone before it ever became ready

    @property
    def alive(self) -> bool:
        return self in (WorkerState.BOOTING, WorkerState.READY, WorkerState.DRAINING)

    @property
    def serving(self) -> bool:
        """May this worker be given new connections?"""
        return self is WorkerState.READY


_S = WorkerState

TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    _S.BOOTING: frozenset({_S.READY, _S.DRAINING, _S.FAILED}),
    _S.READY: frozenset({_S.DRAINING, _S.EXITED}),
    _S.DRAINING: frozenset({_S.EXITED}),
    _S.EXITED: frozenset(),
    _S.FAILED: frozenset(),
}


def check_transition(old: WorkerState, new: WorkerState) -> WorkerState:
    """Return ``new`` if the table allows ``old -> new``; raise otherwise."""
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"worker state {old.value} -> {new.value} is not allowed")
    return new


def exit_state(old: WorkerState) -> WorkerState:
    """The state a worker in ``old`` ends in when its process is reaped."""
    return _S.FAILED if old is _S.BOOTING else _S.EXITED
