"""The worker state table: every legal move, and every other move raising."""

from __future__ import annotations

import itertools

import pytest

from cluster_server import IllegalTransition
from cluster_server.cluster.state import ClusterWorkerState
from cluster_server.cluster.state import check_transition as check_cluster_transition
from cluster_server.primary.state import TRANSITIONS, WorkerState, check_transition, exit_state

S = WorkerState

LEGAL = {
    (S.BOOTING, S.READY),
    (S.BOOTING, S.DRAINING),
    (S.BOOTING, S.FAILED),
    (S.READY, S.DRAINING),
    (S.READY, S.EXITED),
    (S.DRAINING, S.EXITED),
}


@pytest.mark.parametrize(("old", "new"), sorted(LEGAL, key=str))
def test_legal_moves(old: WorkerState, new: WorkerState) -> None:
    assert check_transition(old, new) is new


@pytest.mark.parametrize(("old", "new"), [p for p in itertools.product(S, S) if p not in LEGAL], ids=lambda s: s.value)
def test_every_other_move_raises(old: WorkerState, new: WorkerState) -> None:
    with pytest.raises(IllegalTransition, match=f"{old.value} -> {new.value}"):
        check_transition(old, new)


def test_the_table_is_exactly_the_documented_moves() -> None:
    assert {(old, new) for old, news in TRANSITIONS.items() for new in news} == LEGAL
    assert set(TRANSITIONS) == set(S)


def test_exit_state() -> None:
    assert exit_state(S.BOOTING) is S.FAILED
    assert exit_state(S.READY) is S.EXITED
    assert exit_state(S.DRAINING) is S.EXITED
    # The state a reaped worker ends in is always reachable from where it was.
    for old in (S.BOOTING, S.READY, S.DRAINING):
        check_transition(old, exit_state(old))


def test_alive_and_serving() -> None:
    assert {s for s in S if s.alive} == {S.BOOTING, S.READY, S.DRAINING}
    assert {s for s in S if s.serving} == {S.READY}
    assert not any(TRANSITIONS[s] for s in S if not s.alive), "the end states are final"


# -- the cluster API's worker states (cluster/state.py): Node's, in a table of the same shape ----------

C = ClusterWorkerState

CLUSTER_LEGAL = {
    (C.NONE, C.ONLINE),
    (C.NONE, C.DISCONNECTED),
    (C.NONE, C.DEAD),
    (C.ONLINE, C.LISTENING),
    (C.ONLINE, C.DISCONNECTED),
    (C.ONLINE, C.DEAD),
    (C.LISTENING, C.LISTENING),
    (C.LISTENING, C.DISCONNECTED),
    (C.LISTENING, C.DEAD),
    (C.DISCONNECTED, C.DEAD),
}


def test_cluster_worker_states_are_nodes() -> None:
    assert [s.value for s in C] == ["none", "online", "listening", "disconnected", "dead"]
    assert C.DEAD == "dead" and f"{C.ONLINE}" == "online"  # compares and prints as Node's string


@pytest.mark.parametrize(("old", "new"), list(itertools.product(C, C)), ids=lambda s: s.value)
def test_cluster_worker_moves(old: ClusterWorkerState, new: ClusterWorkerState) -> None:
    if (old, new) in CLUSTER_LEGAL:
        assert check_cluster_transition(old, new) is new
    else:
        with pytest.raises(IllegalTransition):
            check_cluster_transition(old, new)
