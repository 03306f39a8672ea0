"""A ``cluster.fork()`` worker's states, as its primary sees them: every state and every legal move.

The same shape as the HTTP primary's table (``primary/state.py``), with Node's
states, not the HTTP worker's: ``worker.state`` is Node's ``worker.state``, so
the values are Node's strings (and compare equal to them)::

    none ──online──▶ online ──listening──▶ listening ⟲ (one per listening socket)
      │                │                       │
      └────────────────┴──── channel closed ───┴──▶ disconnected ──exit──▶ dead
      (any state but dead) ──────────────── exit ────────────────────────▶ dead

Moves the primary makes itself (``disconnected``, ``dead``) are always in the
table: one that is not raises :class:`IllegalTransition` (a bug). Moves a
worker's messages ask for (``online``, ``listening``) are checked the same way,
and a worker that asks for one the table does not list is told off in the log
and ignored.
"""

from __future__ import annotations

import enum

from cluster_server._errors import IllegalTransition


class ClusterWorkerState(enum.StrEnum):
    NONE = "none"  # forked; its runtime has not said it is online yet
    ONLINE = "online"  # linked to the primary, running the program
    LISTENING = "listening"  # serving on at least one listening socket from the primary
    DISCONNECTED = "disconnected"  # its channel is closed; the process may still run
    DEAD = "dead"  # exited (and reaped)


_S = ClusterWorkerState

TRANSITIONS: dict[ClusterWorkerState, frozenset[ClusterWorkerState]] = {
    _S.NONE: frozenset({_S.ONLINE, _S.DISCONNECTED, _S.DEAD}),
    _S.ONLINE: frozenset({_S.LISTENING, _S.DISCONNECTED, _S.DEAD}),
    _S.LISTENING: frozenset({_S.LISTENING, _S.DISCONNECTED, _S.DEAD}),
    _S.DISCONNECTED: frozenset({_S.DEAD}),
    _S.DEAD: frozenset(),
}


def check_transition(old: ClusterWorkerState, new: ClusterWorkerState) -> ClusterWorkerState:
    """Return ``new`` if the table allows ``old -> new``; raise otherwise."""
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"cluster worker state {old.value} -> {new.value} is not allowed")
    return new
