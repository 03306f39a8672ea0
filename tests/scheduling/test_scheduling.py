"""Routing decisions of the hand-off scheduler, driven with a fake primary and a fake clock.

Connections are real fds (pipes, or real accepted sockets for the accept path), so
"the primary closed its copy" and "nothing leaked" are checked against the kernel.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trustme
from websockets.sync.client import connect as ws_connect

from cluster_server._config import Config
from cluster_server._errors import ConfigError
from cluster_server.primary.loop import Worker
from cluster_server.primary.state import WorkerState
from cluster_server.scheduling import protocol as _protocol
from cluster_server.scheduling import worker as _sched_worker
from cluster_server.scheduling.primary import HandOff, migrate_req_warning
from cluster_server.wire.channel import MAX_FDS

from ..conftest import ROOT, is_open, wait_until
from ..fakes import FakePrimary


def make_worker(i: int) -> Worker:
    w = Worker(id=i, generation=1, spawned_at=0.0, pid=1000 + i)
    w.channel = types.SimpleNamespace(closed=False, pending_fds=0)  # type: ignore[assignment]
    return w


def ready(sched: HandOff, w: Worker) -> None:
    w.move(WorkerState.READY)
    sched.worker_event("ready", w)


def setup(policy: str, n_workers: int, **kw: Any) -> tuple[HandOff, FakePrimary, list[Worker]]:
    primary = FakePrimary()
    kw.setdefault("run_delay", lambda pid: None)  # fake pids: no /proc to read (see the starved-worker tests)
    sched = HandOff(policy, **kw)
    sched.attach(primary)  # type: ignore[arg-type]
    workers = [make_worker(i) for i in range(1, n_workers + 1)]
    return sched, primary, workers


def offer(sched: HandOff, fds: list[int]) -> None:
    """What the accept path does with a batch of accepted fds."""
    sched.held.extend(fds)
    sched._pump()


def ack(sched: HandOff, w: Worker, **fields: Any) -> None:
    assert sched.worker_message(w, {"t": "ack", **fields}, [])


def test_round_robin_rotates_over_ready_workers_only(conns: Any) -> None:
    sched, primary, (w1, w2, w3) = setup("round-robin", 3)
    ready(sched, w1)
    ready(sched, w2)
    sched.worker_event("spawned", w3)  # booting: never routed to
    for fd in conns(6):
        offer(sched, [fd])
    assert [dest.id for dest, _, _ in primary.sent] == [1, 2, 1, 2, 1, 2]
    ready(sched, w3)
    for fd in conns(3):
        offer(sched, [fd])
    assert sorted(dest.id for dest, _, _ in primary.sent[6:]) == [1, 2, 3]


def test_a_batch_is_spread_and_grouped_one_message_per_worker(conns: Any) -> None:
    sched, primary, ws = setup("round-robin", 3)
    for w in ws:
        ready(sched, w)
    offer(sched, conns(9))
    assert len(primary.sent) == 3
    assert sorted(len(fds) for _, _, fds in primary.sent) == [3, 3, 3]


def test_more_than_253_fds_go_in_several_messages(conns: Any) -> None:
    sched, primary, (w1,) = setup("round-robin", 1, window=1000)
    ready(sched, w1)
    offer(sched, conns(300))
    assert [len(fds) for _, _, fds in primary.sent] == [MAX_FDS, 300 - MAX_FDS]


def test_draining_worker_gets_nothing_new(conns: Any) -> None:
    sched, primary, (w1, w2) = setup("round-robin", 2)
    ready(sched, w1)
    ready(sched, w2)
    w1.move(WorkerState.DRAINING)
    sched.worker_event("draining", w1)
    for fd in conns(4):
        offer(sched, [fd])
    assert {dest.id for dest, _, _ in primary.sent} == {2}


def test_ack_closes_the_primarys_copy(conns: Any) -> None:
    sched, primary, (w1,) = setup("round-robin", 1)
    ready(sched, w1)
    fds = conns(3)
    offer(sched, fds)
    assert all(is_open(fd) for fd in fds)  # kept until acknowledged
    (bid,) = primary.batches_for(w1)
    ack(sched, w1, b=[bid], k=3, o=3)
    assert not any(is_open(fd) for fd in fds)
    assert sched.peers[w1.pid].unacked == 0


def test_unacknowledged_connections_of_a_dead_worker_go_to_another(conns: Any) -> None:
    sched, primary, (w1, w2) = setup("round-robin", 2)
    ready(sched, w1)
    ready(sched, w2)
    fds = conns(4)
    offer(sched, fds)
    to_w1 = [fd for b in sched.peers[w1.pid].batches.values() for fd in b]
    assert len(to_w1) == 2
    primary.sent.clear()
    w1.move(WorkerState.EXITED)
    sched.worker_event("exited", w1)
    assert [dest for dest, _, _ in primary.sent] == [w2]
    assert sorted(fd for b in sched.peers[w2.pid].batches.values() for fd in b) == sorted(fds)
    assert all(is_open(fd) for fd in fds)


def test_held_when_no_worker_is_ready_then_handed_in_order(conns: Any) -> None:
    sched, primary, (w1,) = setup("round-robin", 1)
    fds = conns(5)
    offer(sched, fds)
    assert primary.sent == []
    assert list(sched.held) == fds
    ready(sched, w1)
    (sent,) = primary.sent
    assert sched.peers[w1.pid].batches[sent[1]["b"]] == fds


def test_backpressure_stops_accepting_when_the_hold_is_full(conns: Any) -> None:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen()
    try:
        primary = FakePrimary([types.SimpleNamespace(sock=lst)])
        sched = HandOff("round-robin", hold_max=4, window=2)
        sched.attach(primary)  # type: ignore[arg-type]
        assert lst in primary.readers  # room to hold: accepting
        offer(sched, conns(4))
        assert lst not in primary.readers  # hold full, nobody ready: leave them in the backlog
        w1 = make_worker(1)
        ready(sched, w1)  # takes 2 (its window), 2 stay held
        assert len(sched.held) == 2
        assert lst in primary.readers
        offer(sched, conns(2))
        assert lst not in primary.readers
        (bid,) = primary.batches_for(w1)
        ack(sched, w1, b=[bid])
        assert len(sched.held) == 2 and lst in primary.readers
    finally:
        lst.close()


def test_a_full_window_is_skipped(conns: Any) -> None:
    sched, primary, (w1, w2) = setup("round-robin", 2, window=2)
    ready(sched, w1)
    ready(sched, w2)
    offer(sched, conns(4))  # 2 each: both windows full
    offer(sched, conns(1))
    assert len(sched.held) == 1
    b1 = primary.batches_for(w1)[0]
    ack(sched, w1, b=[b1])
    assert primary.sent[-1][0] is w1 and not sched.held


def test_least_busy_picks_the_fewest_open_connections(conns: Any) -> None:
    sched, primary, (w1, w2, w3) = setup("least-busy", 3)
    for w in (w1, w2, w3):
        ready(sched, w)
    offer(sched, conns(3))  # one each (ties rotate)
    for w in (w1, w2, w3):
        ack(sched, w, b=primary.batches_for(w), k=1, o=1)
    ack(sched, w2, k=1, o=0)  # w2's connection closed
    primary.sent.clear()
    offer(sched, conns(1))
    assert primary.sent[0][0] is w2
    # what it was handed since its report counts: now all have 1 open
    offer(sched, conns(3))
    assert sorted(dest.id for dest, _, _ in primary.sent[1:]) == [1, 2, 3]


def test_least_busy_breaks_ties_by_connections_idle_ones_included(conns: Any) -> None:
    sched, primary, (w1, w2) = setup("least-busy", 2)
    ready(sched, w1)
    ready(sched, w2)
    offer(sched, conns(2))  # one each
    ack(sched, w1, b=primary.batches_for(w1), k=1, o=0, c=6)  # 6 idle keep-alive connections
    ack(sched, w2, b=primary.batches_for(w2), k=1, o=0, c=1)
    primary.sent.clear()
    offer(sched, conns(1))  # equally busy (0): w2 has fewer connections
    offer(sched, conns(1))  # busy first: w2 now has one busy connection, w1 none
    offer(sched, conns(1))  # one busy each: w2 has fewer connections (2 against 7)
    assert [dest.id for dest, _, _ in primary.sent] == [2, 1, 2]


def test_least_busy_avoids_a_worker_that_does_not_acknowledge(conns: Any) -> None:
    sched, primary, (w1, w2) = setup("least-busy", 2)
    ready(sched, w1)
    ready(sched, w2)
    for _ in range(10):
        offer(sched, conns(1))
        for b in primary.batches_for(w2):  # w2 serves and closes at once; w1 is blocked
            if b in sched.peers[w2.pid].batches:
                n = sched.peers[w2.pid].taken + 1
                ack(sched, w2, b=[b], k=n, o=0)
    assert len(primary.batches_for(w1)) == 1
    assert len(primary.batches_for(w2)) == 9


def test_least_busy_spreads_sequential_connections_evenly(conns: Any) -> None:
    sched, primary, ws = setup("least-busy", 4)
    for w in ws:
        ready(sched, w)
    for _ in range(40):
        offer(sched, conns(1))
        dest, msg, _ = primary.sent[-1]
        peer = sched.peers[dest.pid]
        ack(sched, dest, b=[msg["b"]], k=peer.taken + 1, o=0)  # served and closed
    counts = [len(primary.batches_for(w)) for w in ws]
    assert counts == [10, 10, 10, 10]


def test_refused_by_a_draining_worker_is_rerouted_and_it_is_retired(conns: Any) -> None:
    sched, primary, (w1, w2) = setup("round-robin", 2)
    ready(sched, w1)
    ready(sched, w2)
    fds = conns(2)
    offer(sched, fds)
    b1 = primary.batches_for(w1)[0]
    primary.sent.clear()
    ack(sched, w1, r=[b1])
    assert [dest for dest, _, _ in primary.sent] == [w2]
    offer(sched, conns(3))
    assert all(dest is w2 for dest, _, _ in primary.sent)
    assert all(is_open(fd) for fd in fds)


def test_fd_limit_refusal_reroutes_what_was_refused_and_backs_off(conns: Any) -> None:
    sched, primary, (w1, w2) = setup("round-robin", 2)
    ready(sched, w1)
    ready(sched, w2)
    fds = conns(6)
    offer(sched, fds)  # 3 each
    (b1,) = primary.batches_for(w1)
    given = list(sched.peers[w1.pid].batches[b1])
    primary.sent.clear()
    ack(sched, w1, f=[[b1, 1, 2]], k=1, o=1)  # took index 0, refused 1 and 2
    assert not is_open(given[0])
    assert is_open(given[1]) and is_open(given[2])
    assert [dest for dest, _, _ in primary.sent] == [w2]
    assert sched.next_deadline() == pytest.approx(primary.now + _protocol.RETRY_FIRST)
    offer(sched, conns(2))
    assert all(dest is w2 for dest, _, _ in primary.sent)  # w1 blocked
    primary.now += _protocol.RETRY_FIRST
    sched.tick()
    offer(sched, conns(2))
    assert primary.sent[-1][0] is w1 or primary.sent[-2][0] is w1
    # a whole batch refused (MSG_CTRUNC): "f": [[batch]]
    b = primary.batches_for(w1)[-1]
    before = sched.rerouted
    ack(sched, w1, f=[[b]])
    assert sched.rerouted == before + 1
    assert sched.peers[w1.pid].backoff == 2 * _protocol.RETRY_FIRST


def test_channel_gone_reroutes_at_once(conns: Any) -> None:
    sched, primary, (w1, w2) = setup("round-robin", 2)
    ready(sched, w1)
    ready(sched, w2)
    primary.broken.add(w1)
    fds = conns(1)
    offer(sched, fds)  # w1's turn, but its channel is gone: w2 gets it at once
    assert [dest for dest, _, _ in primary.sent] == [w2]
    assert is_open(fds[0]) and not sched.held
    offer(sched, conns(2))
    assert all(dest is w2 for dest, _, _ in primary.sent)


@pytest.mark.parametrize(
    "msg",
    [
        {"t": "ack", "b": "nope"},
        {"t": "ack", "b": [True]},
        {"t": "ack", "b": [12345]},
        {"t": "ack", "r": [None]},
        {"t": "ack", "f": [[]]},
        {"t": "ack", "f": "x"},
        {"t": "ack", "f": [["a", 1]]},
        {"t": "ack", "f": [[12345, "x"]]},
        {"t": "ack", "k": "many", "o": []},
    ],
)
def test_malformed_acks_are_logged_and_ignored(conns: Any, msg: dict[str, Any], caplog: Any) -> None:
    sched, _, (w1,) = setup("round-robin", 1)
    ready(sched, w1)
    fds = conns(2)
    offer(sched, fds)
    junk_fd = conns(1)[0]
    with caplog.at_level(logging.WARNING, logger="cluster_server"):
        assert sched.worker_message(w1, msg, [junk_fd])
    assert "ignored" in caplog.text
    assert not is_open(junk_fd)  # fds on an ack are junk: closed
    assert all(is_open(fd) for fd in fds)  # what the worker holds is untouched
    assert sched.peers[w1.pid].unacked == 2
    assert not sched.worker_message(w1, {"t": "something-else"}, [])


def test_accept_path_batches_real_connections() -> None:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(512)
    clients = []
    try:
        primary = FakePrimary([types.SimpleNamespace(sock=lst)])
        sched = HandOff("round-robin", window=1000)
        sched.attach(primary)  # type: ignore[arg-type]
        w1, w2 = make_worker(1), make_worker(2)
        ready(sched, w1)
        ready(sched, w2)
        for _ in range(300):
            clients.append(socket.create_connection(lst.getsockname()))
        primary.readers[lst](1)  # one wake-up
        assert sched.accepted == 300
        assert sorted(len(fds) for _, _, fds in primary.sent) == [150, 150]
        sched.close()
        assert not sched.held
    finally:
        for c in clients:
            c.close()
        lst.close()


def test_child_fds_and_close_cover_everything_held(conns: Any) -> None:
    sched, _, (w1,) = setup("round-robin", 1, window=2)
    ready(sched, w1)
    fds = conns(5)
    offer(sched, fds)
    assert sorted(sched.fds_to_close_in_child()) == sorted(fds)
    sched.close()
    assert not any(is_open(fd) for fd in fds)


def test_reuseport_warning(tmp_path: Any) -> None:
    p = tmp_path / "migrate"
    p.write_text("0\n")
    assert "tcp_migrate_req is 0" in (migrate_req_warning(str(p)) or "")
    p.write_text("1\n")
    assert migrate_req_warning(str(p)) is None
    assert "no net.ipv4.tcp_migrate_req" in (migrate_req_warning(str(tmp_path / "none")) or "")


def test_config_scheduling_choices() -> None:
    assert Config(app="a:b").scheduling == "shared"
    with pytest.raises(ConfigError, match="not one of"):
        Config(app="a:b", scheduling="random")
    with pytest.raises(ConfigError, match="reuseport needs --host"):
        Config(app="a:b", scheduling="reuseport", uds="/tmp/x.sock")


def test_channel_reports_truncated_fds_with_the_message() -> None:
    """At RLIMIT_NOFILE the kernel drops fds (MSG_CTRUNC): the receiver still gets the message."""
    code = textwrap.dedent(
        """
        import os, resource, socket
        from cluster_server.wire.channel import Channel, FdsTruncated
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sender, receiver = Channel(a), Channel(b)
        fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(6)]
        sender.send({"t": "conn", "b": 7}, fds)
        taken = {int(x) for x in os.listdir("/proc/self/fd")}
        limit = free = 0
        while free < 2:  # room for exactly 2 more fds below the limit
            free += limit not in taken
            limit += 1
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        ((msg, got),) = list(receiver.receive())
        assert isinstance(msg, FdsTruncated), msg
        assert msg.message == {"t": "conn", "b": 7}, msg.message
        assert 0 < len(got) < 6, got
        print("ok", len(got))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


# --------------------------------------------------------------------------- real processes

APP = """
import asyncio, json, os, resource, socket, time

PIDFILE = os.environ.get("TEST_PIDFILE")


def lower_fd_limit(room):
    taken = {int(x) for x in os.listdir("/proc/self/fd")}
    limit = free = 0
    while free < room:  # room for exactly `room` more fds
        free += limit not in taken
        limit += 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def send_junk():
    for name in os.listdir("/proc/self/fd"):
        try:
            s = socket.socket(fileno=int(name))
        except OSError:
            continue
        try:
            if s.family == socket.AF_UNIX and s.type == socket.SOCK_SEQPACKET:
                for junk in (
                    b"\\xff\\xfe not json",
                    b"[1, 2, 3]",
                    b'{"no type": 1}',
                    b'{"t": "ack", "b": "nope"}',
                    b'{"t": "ack", "b": [999999]}',
                    b'{"t": "ack", "f": [[999999, 1]], "k": 1, "o": 1}',
                    b'{"t": "ack", "f": [[]]}',
                    b'{"t": "ack", "k": true, "o": "x"}',
                ):
                    s.send(junk)
                fd = os.open("/dev/null", os.O_RDONLY)
                fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, "little"))]
                s.sendmsg([b'{"t": "conn", "b": 1}'], fds)
                os.close(fd)
                return True
        finally:
            s.detach()
    return False


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if os.environ.get("TEST_FD_ROOM"):
                    lower_fd_limit(int(os.environ["TEST_FD_ROOM"]))
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": f"{os.getpid()}:{message.get('text')}"})
    path = scope["path"]
    body = str(os.getpid()).encode()
    if path == "/block":  # hold this worker's event loop
        with open(PIDFILE, "w") as fh:
            fh.write(str(os.getpid()))
        time.sleep(float(scope["query_string"] or 20))
    elif path == "/slow":
        await asyncio.sleep(0.3)
    elif path == "/junk":
        body = json.dumps(send_junk()).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})
"""

POLICIES = ("shared", "round-robin", "least-busy", "reuseport")


def fetch(url: str, path: str = "/", timeout: float = 15, **kw: Any) -> httpx.Response:
    """One request on a new connection."""
    return httpx.get(url + path, timeout=timeout, headers={"connection": "close"}, **kw)


def fetch_many(url: str, n: int, path: str = "/", timeout: float = 15) -> list[httpx.Response | Exception]:
    def one(_: int) -> httpx.Response | Exception:
        try:
            return fetch(url, path, timeout)
        except Exception as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(n, 32)) as pool:
        return list(pool.map(one, range(n)))


def start(start_server: Any, write_app: Any, policy: str, workers: int, *extra: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    write_app("schedapp", APP)
    return start_server("schedapp:app", "--workers", str(workers), "--scheduling", policy, *extra, env=env).wait_ready()


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_serves_http_and_websocket(start_server: Any, write_app: Any, policy: str) -> None:
    server = start(start_server, write_app, policy, 2)
    assert server.log().count("Application startup complete") == 2  # lifespan runs under every policy
    assert fetch(server.url).status_code == 200
    with ws_connect(f"ws://127.0.0.1:{server.port}/ws", open_timeout=10) as ws:
        for i in range(3):
            ws.send(f"hello {i}")
            pid, _, text = str(ws.recv(timeout=10)).partition(":")
            assert text == f"hello {i}"
            assert int(pid) in server.worker_pids()
    if policy == "reuseport" and migrate_req_warning() is not None:
        assert "tcp_migrate_req" in server.log()


@pytest.mark.parametrize("policy", ["round-robin", "least-busy"])
def test_handed_over_connections_spread_evenly(start_server: Any, write_app: Any, policy: str) -> None:
    server = start(start_server, write_app, policy, 4)
    pids = [int(fetch(server.url).text) for _ in range(40)]  # one at a time, a new connection each
    counts = collections.Counter(pids)
    assert set(counts) == set(server.worker_pids())
    assert max(counts.values()) - min(counts.values()) <= 1, counts


def test_reuseport_connections_reach_every_worker(start_server: Any, write_app: Any) -> None:
    server = start(start_server, write_app, "reuseport", 4)
    seen: set[int] = set()

    def all_seen() -> bool:
        seen.update(int(fetch(server.url).text) for _ in range(10))
        return seen == set(server.worker_pids())

    wait_until(all_seen, timeout=20, what="every worker answering")  # the kernel hashes by address:port


@pytest.mark.parametrize("policy", ["round-robin", "least-busy"])
def test_hand_off_serves_tls(start_server: Any, write_app: Any, tmp_path: Any, policy: str) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    tls = ("--ssl-keyfile", str(tmp_path / "key.pem"), "--ssl-certfile", str(tmp_path / "cert.pem"))
    server = start(start_server, write_app, policy, 2, *tls)
    ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    url = f"https://127.0.0.1:{server.port}"
    pids = {httpx.get(url + "/", verify=ctx, timeout=10, headers={"connection": "close"}).text for _ in range(4)}
    assert {int(p) for p in pids} == set(server.worker_pids())


def test_sigkilled_worker_loses_none_of_the_connections_queued_for_it(
    start_server: Any, write_app: Any, tmp_path: Any
) -> None:
    pidfile = tmp_path / "blocked.pid"
    server = start(start_server, write_app, "round-robin", 2, env={"TEST_PIDFILE": str(pidfile)})
    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        blocker = pool.submit(fetch, server.url, "/block", 30)  # freezes one worker's loop: it acks nothing
        wait_until(pidfile.exists, timeout=10, what="a worker blocked")
        wait_until(lambda: pidfile.read_text(), timeout=5)
        blocked = int(pidfile.read_text())
        futures = [pool.submit(fetch, server.url, "/", 20) for _ in range(10)]
        # Round-robin alternates: the other worker answers its 5, the blocked one holds 5.
        wait_until(lambda: sum(f.done() for f in futures) >= 5, timeout=15, what="the free worker's share")
        time.sleep(0.2)  # let the last connections reach the blocked worker's channel
        assert sum(f.done() for f in futures) == 5
        os.kill(blocked, signal.SIGKILL)
        answers = [f.result(timeout=25) for f in futures]
        with pytest.raises(httpx.HTTPError):
            blocker.result(timeout=25)  # that request was in the worker when it died: lost, as anywhere
    assert [r.status_code for r in answers] == [200] * 10
    assert all(int(r.text) != blocked for r in answers)
    assert "re-routed" in server.log()


def test_worker_at_its_fd_limit_does_not_drop_connections(start_server: Any, write_app: Any) -> None:
    # (room for 3 more fds: with deferred accept a connection reaches a worker only once its
    # request arrived, so 32 concurrent clients fill a worker more slowly than their connects did)
    server = start(start_server, write_app, "round-robin", 2, env={"TEST_FD_ROOM": "3"})
    answers = fetch_many(server.url, 40, "/slow", timeout=30)
    statuses = [a.status_code if isinstance(a, httpx.Response) else repr(a) for a in answers]
    assert statuses == [200] * 40
    assert "file-descriptor limit" in server.log()


def test_garbage_on_a_channel_is_logged_and_ignored(start_server: Any, write_app: Any) -> None:
    server = start(start_server, write_app, "round-robin", 2)
    assert fetch(server.url, "/junk").text == "true"
    expected = ("malformed ack", "does not hold; ignored", "dropped a message", "unknown message")
    # (wait for every line: the primary logs them one by one as it reads the junk)
    wait_until(lambda: all(line in server.log() for line in expected), timeout=10, what="the junk logged")
    log = server.log()
    for line in expected:
        assert line in log
    pids = collections.Counter(int(fetch(server.url).text) for _ in range(10))
    assert set(pids) == set(server.worker_pids()) and len(pids) == 2
    assert server.proc.poll() is None


@pytest.mark.parametrize("policy", ["round-robin", "least-busy"])
def test_rolling_restart_loses_no_request(start_server: Any, write_app: Any, policy: str) -> None:
    server = start(start_server, write_app, policy, 2)
    old = set(server.worker_pids())
    failures: list[str] = []
    done = 0
    stop = threading.Event()

    def load() -> None:
        nonlocal done
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                r = fetch(server.url, "/", 10)
                if r.status_code != 200:
                    failures.append(str(r.status_code))
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
            done += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: done >= 20, timeout=10)
        server.signal(signal.SIGHUP)
        server.wait_log("rolling restart to generation 2 done", timeout=30)
        wait_until(lambda: not (set(server.worker_pids()) & old), timeout=15, what="old workers gone")
        mark = done
        wait_until(lambda: done >= mark + 20, timeout=10)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert failures == []


def test_least_busy_skips_a_stalled_worker_even_when_it_has_fewer_connections(conns: Any) -> None:
    sched, primary, (w1, w2) = setup("least-busy", 2)
    ready(sched, w2)
    offer(sched, conns(5))
    ack(sched, w2, b=primary.batches_for(w2), k=5, o=5)  # w2: 5 open
    ready(sched, w1)
    offer(sched, conns(1))
    assert primary.sent[-1][0] is w1  # 0 open: it gets one, and acknowledges nothing
    primary.now += _protocol.STALL * 2  # its event loop is blocked
    assert sched.peers[w1.pid].load < sched.peers[w2.pid].load
    primary.sent.clear()
    offer(sched, conns(3))
    assert {dest for dest, _, _ in primary.sent} == {w2}
    ack(sched, w1, b=primary.batches_for(w1) or list(sched.peers[w1.pid].batches), k=1, o=1)  # awake again
    primary.sent.clear()
    offer(sched, conns(1))
    assert primary.sent[0][0] is w1


def test_least_busy_queues_in_the_primary_once_a_loop_was_seen_blocked(conns: Any, caplog: Any) -> None:
    sched, primary, (w1, w2) = setup("least-busy", 2)
    ready(sched, w1)
    ready(sched, w2)
    offer(sched, conns(6))  # 3 each
    for w in (w1, w2):
        ack(sched, w, b=primary.batches_for(w), k=3, o=3)
    # No loop seen blocked yet: no cap, a worker with 3 busy connections gets a 4th at once.
    primary.sent.clear()
    offer(sched, conns(1))
    ((slow, msg, _),) = primary.sent
    assert "q" not in msg
    other = w1 if slow is w2 else w2
    # It sends no ack for BLOCKED: a request is blocking its event loop.
    primary.now += _protocol.BLOCKED
    with caplog.at_level(logging.INFO, logger="cluster_server"):
        ack(sched, slow, b=[msg["b"]], k=4, o=4)
    assert "event loop was blocked for 30 ms" in caplog.text
    samples = {name: value for name, _, _, _, value in sched.metrics_samples()}
    assert samples["cluster_server_handoff_queueing"] == 1
    # Both are at BUSY_MAX or over: new connections wait in the primary, in order.
    primary.sent.clear()
    fds = conns(3)
    offer(sched, fds)
    assert primary.sent == [] and list(sched.held) == fds
    assert sched.next_deadline() == pytest.approx(primary.now + _protocol.HOLD_WAIT)
    # The first worker to drop below BUSY_MAX gets them, up to BUSY_MAX.
    ack(sched, other, k=3, o=0)
    assert [dest for dest, _, _ in primary.sent] == [other]
    assert primary.sent[0][1]["q"] == 1  # so it reports its next drop at once
    assert sched.peers[other.pid].unacked == _protocol.BUSY_MAX
    assert list(sched.held) == fds[_protocol.BUSY_MAX :]
    # Nobody frees up for HOLD_WAIT (long-lived requests): the rest go anyway.
    primary.now += _protocol.HOLD_WAIT
    sched.tick()
    assert not sched.held
    # QUEUE_FOR with no blocked loop seen: no cap again.
    for w in (w1, w2):
        peer = sched.peers[w.pid]
        ack(sched, w, b=list(peer.batches), k=peer.handed, o=5)
    primary.now += _protocol.QUEUE_FOR
    primary.sent.clear()
    offer(sched, conns(1))
    assert len(primary.sent) == 1 and "q" not in primary.sent[0][1]


def test_queueing_never_gives_a_stalled_worker_more_when_all_are(conns: Any) -> None:
    sched, primary, (w1, w2) = setup("least-busy", 2)
    ready(sched, w1)
    ready(sched, w2)
    sched._queue_until = primary.now + _protocol.QUEUE_FOR  # a loop was seen blocked before
    offer(sched, conns(2 * _protocol.BUSY_MAX))  # both at BUSY_MAX, neither acknowledges: blocked
    primary.sent.clear()
    fds = conns(2)
    offer(sched, fds)
    primary.now += _protocol.HOLD_WAIT * 10
    sched.tick()
    assert primary.sent == [] and list(sched.held) == fds  # waiting for the first to wake up
    assert sched.next_deadline() is None  # for an ack, not a timer: no busy loop
    peer = sched.peers[w2.pid]
    ack(sched, w2, b=list(peer.batches), k=peer.handed, o=0)  # w2's loop runs again
    assert [dest for dest, _, _ in primary.sent] == [w2] and not sched.held


def test_a_short_scheduling_delay_does_not_start_queueing(conns: Any, caplog: Any) -> None:
    sched, primary, (w1,) = setup("least-busy", 1)
    ready(sched, w1)
    offer(sched, conns(3))
    primary.now += _protocol.STALL  # a busy machine: late, but not blocked by a request
    with caplog.at_level(logging.INFO, logger="cluster_server"):
        ack(sched, w1, b=primary.batches_for(w1), k=3, o=3)
    offer(sched, conns(1))
    assert "blocked" not in caplog.text
    assert sched.peers[w1.pid].load == 4 and not sched.held


def late_ack_with(
    worker_waits: Callable[[float], float], conns: Any, caplog: Any, primary_waits: float = 0.0
) -> HandOff:
    """One least-busy worker acks 60 ms late (BLOCKED x 2). ``worker_waits(t)`` is how long it
    has waited for a CPU by fake time ``t`` (what /proc/PID/schedstat says, run_delay), and
    the primary waits ``primary_waits`` of those 60 ms itself."""
    clock: list[float] = []
    start = 100.0

    def run_delay(pid: int) -> float:
        t = clock[0]
        if pid == os.getpid():
            return primary_waits * (t - start) / (_protocol.BLOCKED * 2)
        return worker_waits(t - start)

    sched, primary, (w1,) = setup("least-busy", 1, run_delay=run_delay)
    clock.append(primary.now)
    ready(sched, w1)
    offer(sched, conns(3))  # it starts holding: the baseline readings
    primary.now += _protocol.BLOCKED * 2
    clock[0] = primary.now
    with caplog.at_level(logging.INFO, logger="cluster_server"):
        ack(sched, w1, b=primary.batches_for(w1), k=3, o=3)  # late
    return sched


def queueing(sched: HandOff) -> float:
    samples = {name: value for name, _, _, _, value in sched.metrics_samples()}
    return samples["cluster_server_handoff_queueing"]


def test_a_starved_worker_is_not_taken_for_a_blocked_one(conns: Any, caplog: Any) -> None:
    """A loaded machine (issue 13, finding 8): the ack is late because the worker waited for
    a CPU the whole time (its run_delay grew as much), not because its app blocked it."""
    sched = late_ack_with(lambda t: 1.0 + t, conns, caplog)
    assert "blocked" not in caplog.text and queueing(sched) == 0


def test_a_late_ack_the_primary_was_slow_to_read_is_not_a_blocked_loop(conns: Any, caplog: Any) -> None:
    sched = late_ack_with(lambda t: 1.0 + t / 2, conns, caplog, primary_waits=0.03)  # 30 + 30 ms of 60
    assert "blocked" not in caplog.text and queueing(sched) == 0


def test_run_delay_reads_a_real_process() -> None:
    """The reader behind those two tests: a process that waits for a CPU shows it in
    /proc/PID/schedstat (here: this one, after a short burst of work on a shared machine)."""
    from cluster_server.scheduling.primary import _run_delay

    first = _run_delay(os.getpid())
    if first is None:
        pytest.skip("no /proc/PID/schedstat here")
    sum(range(200_000))
    with open(f"/proc/{os.getpid()}/schedstat") as fh:  # the kernel's own count (ns), read in between
        kernel = int(fh.read().split()[1]) / 1e9
    second = _run_delay(os.getpid())
    assert second is not None and second >= kernel >= first >= 0  # that count, in seconds (not 0, not ns)
    assert _run_delay(2**22 + 1) is None  # (no such pid: pid_max is at most 2**22)


def test_a_worker_that_had_the_cpu_and_no_ack_is_blocked(conns: Any, caplog: Any) -> None:
    sched = late_ack_with(lambda t: 1.0 + min(t, 0.005), conns, caplog)  # waited 5 ms of the 60
    assert "blocked for 55 ms or more (not counting 5 ms waiting for a CPU)" in caplog.text
    assert queueing(sched) == 1


def test_least_busy_keeps_new_connections_away_from_a_blocked_worker(
    start_server: Any, write_app: Any, tmp_path: Any
) -> None:
    """End to end, with real processes: a blocked worker's late ack turns queueing on (the
    log says so), and of 12 fast requests sent while one worker is blocked for 1.5 s, at
    most one waits for it (it had 1 busy connection, under BUSY_MAX, so it could be given
    one before it was seen stalled)."""
    pidfile = tmp_path / "blocked.pid"
    server = start(start_server, write_app, "least-busy", 2, env={"TEST_PIDFILE": str(pidfile)})

    def timed_fetch() -> float:
        t0 = time.monotonic()
        assert fetch(server.url, "/", 30).status_code == 200
        return time.monotonic() - t0

    def one_round() -> list[float]:
        pidfile.unlink(missing_ok=True)
        with concurrent.futures.ThreadPoolExecutor(max_workers=13) as pool:
            blocker = pool.submit(fetch, server.url, "/block?1.5", 30)
            wait_until(lambda: pidfile.exists() and pidfile.read_text(), timeout=10, what="a worker blocked")
            times = list(pool.map(lambda _: timed_fetch(), range(12)))
            assert blocker.result(timeout=30).status_code == 200
        return times

    for _ in range(3):  # connections handed to the blocked worker show the primary it was blocked
        one_round()
        if "event loop was blocked" in server.log():
            break
    assert "event loop was blocked" in server.log()
    times = one_round()
    assert sum(t >= 1.0 for t in times) <= 1, sorted(times)


# --------------------------------------------------------------------------- worker side, in-process


class FakeServer:
    """What WorkerHandOff needs of the uvicorn server: serve_accepted fails for chosen fds."""

    def __init__(self, fail: dict[int, int] | None = None) -> None:
        self.handlers: dict[str, Any] = {}
        self.should_exit = False
        self.served: list[socket.socket] = []
        self.fail = fail or {}  # n-th connection (0-based) -> errno its first step raises
        self.n = 0

    tracking_busy = False

    @property
    def open_connections(self) -> int:
        return len(self.served)

    @property
    def busy_connections(self) -> int:
        return len(self.served) - self.idle

    def watch_busy(self, callback: Any) -> None:
        self.tracking_busy = True
        self.idle = 0
        self.on_not_busy = callback

    async def serve_accepted(self, sock: socket.socket) -> None:
        n, self.n = self.n, self.n + 1
        if n in self.fail:
            raise OSError(self.fail[n], os.strerror(self.fail[n]))
        self.served.append(sock)


def run_worker_side(server: FakeServer, batches: list[tuple[dict[str, Any], int]]) -> list[dict[str, Any]]:
    """Feed ``conn`` messages (with n fresh socket fds each) to a WorkerHandOff; return its acks."""
    import asyncio

    from cluster_server.wire.channel import Channel, pair

    ours, theirs = pair()
    primary_end, worker_end = Channel(ours), Channel(theirs)
    spare: list[socket.socket] = []

    async def main() -> list[dict[str, Any]]:
        handoff = _sched_worker.WorkerHandOff(server, worker_end, least_busy=False)  # type: ignore[arg-type]
        handoff.install(asyncio.get_running_loop())
        for msg, n in batches:
            fds = []
            for _ in range(n):
                a, b = socket.socketpair()
                spare.append(b)
                fds.append(a.detach())
            server.handlers["conn"](msg, fds)
        acks: list[dict[str, Any]] = []
        for _ in range(100):
            await asyncio.sleep(0.005)
            acks.extend(m for m, _ in primary_end.receive() if isinstance(m, dict))
        return acks

    try:
        return asyncio.run(main())
    finally:
        for s in [*spare, *server.served]:
            s.close()
        primary_end.close()
        worker_end.close()


def test_worker_acks_what_it_took_in_one_message() -> None:
    server = FakeServer()
    acks = run_worker_side(server, [({"t": "conn", "b": 1}, 2), ({"t": "conn", "b": 2}, 3)])
    assert acks[0]["b"] == [1, 2] and acks[0]["k"] == 5
    assert len(server.served) == 5


def test_a_draining_worker_refuses_what_it_is_still_handed() -> None:
    server = FakeServer()
    server.should_exit = True
    acks = run_worker_side(server, [({"t": "conn", "b": 7}, 2)])
    assert acks == [{"t": "ack", "r": [7], "k": 0, "o": 0}]
    assert server.served == []


def test_a_worker_out_of_fds_refuses_those_it_could_not_take() -> None:
    import errno

    server = FakeServer(fail={1: errno.EMFILE, 2: errno.EMFILE})  # uvloop's dup failed for these
    acks = run_worker_side(server, [({"t": "conn", "b": 3}, 4), ({"t": "conn", "b": 4, "ctrunc": True}, 1)])
    (ack_msg,) = acks
    assert ack_msg["f"] == [[4], [3, 1, 2]]  # batch 4: all (fds truncated); batch 3: indexes 1 and 2
    assert ack_msg["k"] == 2 and "b" not in ack_msg
    assert len(server.served) == 2


@pytest.mark.parametrize("queueing", [True, False])
def test_a_queueing_worker_reports_a_drop_below_busy_max_at_once(monkeypatch: Any, queueing: bool) -> None:
    import asyncio

    from cluster_server.wire.channel import Channel, pair

    monkeypatch.setattr(_sched_worker, "REPORT_INTERVAL", 60.0)  # no timed report in this test
    server = FakeServer()
    ours, theirs = pair()
    primary_end, worker_end = Channel(ours), Channel(theirs)
    spare: list[socket.socket] = []

    async def received() -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        for _ in range(20):
            await asyncio.sleep(0.005)
            got.extend(m for m, _ in primary_end.receive() if isinstance(m, dict))
        return got

    async def main() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        handoff = _sched_worker.WorkerHandOff(server, worker_end, least_busy=True)  # type: ignore[arg-type]
        handoff.install(asyncio.get_running_loop())
        fds = []
        for _ in range(_protocol.BUSY_MAX):
            a, b = socket.socketpair()
            spare.append(b)
            fds.append(a.detach())
        server.handlers["conn"]({"t": "conn", "b": 1, **({"q": 1} if queueing else {})}, fds)
        acks = await received()
        server.idle += 1  # a response completed: one connection is idle now
        server.on_not_busy()
        return acks, await received()

    try:
        acks, reports = asyncio.run(main())
    finally:
        for s in [*spare, *server.served]:
            s.close()
        primary_end.close()
        worker_end.close()
    n = _protocol.BUSY_MAX
    assert acks == [{"t": "ack", "b": [1], "k": n, "o": n, "c": n}]
    if queueing:  # the primary may be holding connections for this worker: tell it now
        assert reports == [{"t": "ack", "k": n, "o": n - 1, "c": n}]  # still open, no longer busy
    else:  # nothing waits on it: the next timed report will do
        assert reports == []


BUSY_APP = """
import asyncio

async def app(scope, receive, send):
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        while (await receive())["type"] != "websocket.disconnect":
            pass
        return
    if scope["path"] == "/wait":
        await asyncio.sleep(0.5)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
"""


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_busy_connections_leave_out_idle_keep_alive_and_websockets(tmp_path: Any, http: str) -> None:
    """A real uvicorn server: what least-busy counts as a worker's load."""
    import asyncio

    import uvicorn

    from cluster_server.worker.uvicorn_glue import WorkerServer

    namespace: dict[str, Any] = {}
    exec(BUSY_APP, namespace)
    config = uvicorn.Config(namespace["app"], http=http, ws="websockets-sansio", lifespan="off", log_level="warning")
    server = WorkerServer(config, on_ready=lambda: None, on_heartbeat=lambda s: None, heartbeat_interval=1.0)
    drops: list[int] = []
    server.watch_busy(lambda: drops.append(1))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    seen: dict[str, tuple[int, int]] = {}
    errors: list[BaseException] = []

    def counts() -> tuple[int, int]:
        return server.busy_connections, len(server.server_state.connections)

    def client() -> None:
        try:
            wait_until(lambda: server.started, timeout=10, what="server started")
            with httpx.Client(timeout=10) as keep_alive, httpx.Client(timeout=10) as other:
                assert keep_alive.get(url + "/").status_code == 200
                wait_until(lambda: counts() == (0, 1), timeout=5, what="idle keep-alive connection not busy")
                seen["idle"] = counts()
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    waiting = pool.submit(other.get, url + "/wait")
                    wait_until(lambda: counts() == (1, 2), timeout=5, what="a request in progress is busy")
                    seen["waiting"] = counts()
                    assert waiting.result(10).status_code == 200
                wait_until(lambda: counts() == (0, 2), timeout=5, what="both idle again")
                with ws_connect(url.replace("http", "ws") + "/ws", open_timeout=10):
                    wait_until(lambda: counts() == (0, 3), timeout=5, what="an open websocket not busy")
                    seen["websocket"] = counts()
            wait_until(lambda: counts() == (0, 0), timeout=5, what="all closed")
            seen["closed"] = (server.idle_connections, len(server.websockets))
        except BaseException as exc:
            errors.append(exc)
        finally:
            server.should_exit = True

    thread = threading.Thread(target=client)
    thread.start()
    try:
        asyncio.run(server.serve(sockets=[sock]))  # the main thread: uvicorn installs signal handlers
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
    if errors:
        raise errors[0]
    assert seen == {"idle": (0, 1), "waiting": (1, 2), "websocket": (0, 3), "closed": (0, 0)}
    assert len(drops) >= 3  # each response completing, and each close, told the scheduler


def test_round_robin_over_a_unix_socket(start_server: Any, write_app: Any, tmp_path: Any) -> None:
    write_app("schedapp", APP)
    path = str(tmp_path / "app.sock")
    server = start_server("schedapp:app", "--workers", "2", "--scheduling", "round-robin", "--uds", path)
    server.wait_ready()
    transport = httpx.HTTPTransport(uds=path)
    with httpx.Client(transport=transport, base_url="http://localhost", timeout=10) as client:
        pids = {client.get("/", headers={"connection": "close"}).text for _ in range(4)}
    assert {int(p) for p in pids} == set(server.worker_pids())


def test_accept_errors_pause_accepting_instead_of_spinning(caplog: Any) -> None:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))  # bound, never listening: accept() fails with EINVAL every time
    try:
        primary = FakePrimary([types.SimpleNamespace(sock=lst)])
        sched = HandOff("round-robin")
        sched.attach(primary)  # type: ignore[arg-type]
        with caplog.at_level(logging.WARNING, logger="cluster_server"):
            primary.readers[lst](1)
        assert "cannot accept" in caplog.text
        assert lst not in primary.readers  # paused
        assert sched.next_deadline() == pytest.approx(primary.now + _protocol.ACCEPT_PAUSE)
        primary.now += _protocol.ACCEPT_PAUSE
        sched.tick()
        assert lst in primary.readers  # tries again after the pause
    finally:
        lst.close()


def test_metrics_samples_report_the_backlog_and_counters(conns: Any) -> None:
    sched, _, (w1,) = setup("round-robin", 1, window=2)
    ready(sched, w1)
    offer(sched, conns(5))  # 2 handed, 3 held
    sched.accepted = 5
    w1.move(WorkerState.EXITED)
    sched.worker_event("exited", w1)  # its 2 come back: 5 held, 2 re-routed
    samples = {name: (kind, value) for name, _, kind, _, value in sched.metrics_samples()}
    assert samples["cluster_server_accept_backlog"] == ("gauge", 5)
    assert samples["cluster_server_handoff_unacknowledged"] == ("gauge", 0)
    assert samples["cluster_server_connections_accepted_total"] == ("counter", 5)
    assert samples["cluster_server_connections_rerouted_total"] == ("counter", 2)
    assert samples["cluster_server_handoff_queueing"] == ("gauge", 0)


def test_the_metrics_endpoint_shows_the_hand_off(start_server: Any, write_app: Any) -> None:
    from ..conftest import free_port

    mport = free_port()
    server = start(start_server, write_app, "least-busy", 2, "--metrics-bind", f"127.0.0.1:{mport}")
    for _ in range(6):
        fetch(server.url)
    text = httpx.get(f"http://127.0.0.1:{mport}/metrics", timeout=10).text
    values = {
        line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("cluster_server_")
    }
    assert values["cluster_server_accept_backlog"] == 0
    assert values["cluster_server_connections_accepted_total"] >= 6
    assert values["cluster_server_connections_rerouted_total"] == 0


def test_a_stopping_primary_gives_what_it_holds_to_a_draining_worker(conns: Any) -> None:
    sched, primary, (w1, w2) = setup("least-busy", 2)
    ready(sched, w1)
    ready(sched, w2)
    fds = conns(4)
    offer(sched, fds)
    primary.stopping = True  # stop or upgrade: every worker drains
    for w in (w1, w2):
        w.move(WorkerState.DRAINING)
        sched.worker_event("draining", w)
    primary.sent.clear()
    b1 = list(sched.peers[w1.pid].batches)
    ack(sched, w1, r=b1)  # w1 refuses what reached it after SIGTERM: no READY worker is left
    _, msg, sent = primary.sent[0]
    assert msg.get("force") is True and len(sent) == 2  # served by a draining worker, not closed
    w2.move(WorkerState.EXITED)
    sched.worker_event("exited", w2)
    assert all(m.get("force") for _, m, _ in primary.sent[1:]) and all(d is w1 for d, _, _ in primary.sent[1:])
    assert all(is_open(fd) for fd in fds)


def test_a_forced_connection_is_served_by_a_draining_worker() -> None:
    server = FakeServer()
    server.should_exit = True
    acks = run_worker_side(server, [({"t": "conn", "b": 9, "force": True}, 1)])
    assert acks[0]["b"] == [9] and len(server.served) == 1
