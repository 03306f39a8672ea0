"""The primary's side of connection scheduling: accept, route, hold, re-route.

The policies and the hand-off protocol are described in ``protocol.py``; the
worker's side is ``worker.py``.

:class:`HandOff` runs in two hosts, through the small interface
:class:`HandOffHost` names: the HTTP primary's selector loop
(``primary/loop.py``, one HandOff for all its listeners), and each
round-robin handle of the cluster API (``cluster/rr.py``, one HandOff per
address the workers listen on, on the primary's asyncio loop). A "worker" here
is anything with a ``pid`` (its key), a ``name`` (for logs) and a ``channel``.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import resource
import socket
import time
from collections.abc import Callable, Sequence, Sized
from typing import TYPE_CHECKING, Any, Protocol

from cluster_server._logging import Throttle
from cluster_server._proc import close_all
from cluster_server.primary.component import Component, Sample, WorkerEvent, override
from cluster_server.scheduling.protocol import (
    _GONE_ERRNOS,
    _RESOURCE_ERRNOS,
    ACCEPT_MAX,
    ACCEPT_PAUSE,
    BLOCKED,
    BUSY_MAX,
    FD_RESERVE,
    HANDOFF,
    HOLD_MAX,
    HOLD_WAIT,
    MIGRATE_REQ,
    QUEUE_FOR,
    RETRY_CAP,
    RETRY_FIRST,
    STALL,
    WAITED_EVERY,
    WINDOW,
)
from cluster_server.wire.channel import MAX_FDS, Channel, Message
from cluster_server.wire.messages import ACK, CONN

if TYPE_CHECKING:
    from cluster_server._config import Config

logger = logging.getLogger("cluster_server")


class Worker(Protocol):
    """What the hand-off reads of a worker (the HTTP primary's ``Worker``, a cluster-API listener)."""

    @property
    def pid(self) -> int: ...  # its key among the peers: unique while it may hold connections

    @property
    def name(self) -> str: ...

    @property
    def channel(self) -> Channel | None: ...


class Listening(Protocol):
    @property
    def sock(self) -> socket.socket: ...


class HandOffHost(Protocol):
    """What :class:`HandOff` needs of the loop it runs in (``Primary`` in ``primary/loop.py``,
    ``RoundRobinHandle`` in ``cluster/rr.py``).

    ``add_reader(sock, callback)`` calls ``callback(mask)`` when ``sock`` is
    readable; ``send(worker, msg, fds)`` owns ``fds`` from then on and returns
    False when the worker's channel is gone; ``slots`` counts the workers the
    host may run (for the fd budget); ``stopping`` is true once the host stops
    (held connections then go to any worker still connected).
    """

    @property
    def listeners(self) -> Sequence[Listening]: ...

    @property
    def slots(self) -> Sized: ...

    @property
    def stopping(self) -> bool: ...

    def clock(self) -> float: ...

    def add_reader(self, fileobj: Any, callback: Callable[[int], None]) -> None: ...

    def remove_reader(self, fileobj: Any) -> None: ...

    def send(self, w: Any, msg: Message, fds: list[int] | None = None) -> bool: ...


def primary_components(config: Config) -> list[Component]:
    """The primary-side components the configured policy needs."""
    if config.scheduling in HANDOFF:
        return [HandOff(config.scheduling)]
    if config.scheduling == "reuseport":
        return [ReusePortCheck()]
    return []


# --------------------------------------------------------------------------- primary side


class _Peer:
    """The hand-off state of one worker, as the primary sees it."""

    __slots__ = (
        "backoff",
        "batches",
        "blocked_until",
        "closing",
        "conns",
        "handed",
        "limit",
        "open",
        "progress_at",
        "taken",
        "unacked",
        "waited",
        "waited_at",
        "worker",
    )

    def __init__(self, worker: Worker, window: int) -> None:
        self.worker = worker
        #: most unacknowledged fds it may have: the window, smaller after it hit its fd limit
        self.limit = window
        self.batches: dict[int, list[int]] = {}  # batch id -> our copies of its fds, until acked
        self.unacked = 0  # fds in ``batches``
        self.handed = 0  # fds handed over in total, less those refused
        self.taken = 0  # fds the worker had taken at its last report ("k")
        self.open = 0  # connections open in the worker at its last report ("o"; least-busy: busy ones)
        self.conns = 0  # least-busy: connections open, idle or not, at its last report ("c")
        self.blocked_until = 0.0  # at its fd limit: no connections before this
        self.backoff = 0.0
        self.closing = False  # draining, refusing, or its channel broke: never route again
        #: last sign of life: its last ack, or when it last got a batch while holding none
        self.progress_at = 0.0
        #: least-busy: seconds its main thread had waited for a CPU (run_delay) at waited_at,
        #: read at a progress_at no older than WAITED_EVERY; None: unknown
        self.waited: float | None = None
        self.waited_at = -1.0

    @property
    def load(self) -> int:
        """Open (least-busy: busy) connections now: those at its last report plus those handed since."""
        return self.open + self.handed - self.taken

    @property
    def connections(self) -> int:
        """least-busy's tie-break: open connections, idle ones included, counted the same way."""
        return self.conns + self.handed - self.taken


class HandOff(Component):
    """Primary component for ``round-robin`` and ``least-busy``: accept, route, hold, re-route."""

    essential = True  # it routes every connection

    def __init__(
        self,
        policy: str,
        *,
        window: int = WINDOW,
        hold_max: int = HOLD_MAX,
        run_delay: Callable[[int], float | None] | None = None,
    ) -> None:
        if policy not in HANDOFF:
            raise ValueError(f"HandOff does not do {policy!r}")
        #: seconds a process (by pid) has waited for a CPU so far; None when unknown
        self.run_delay = run_delay or _run_delay
        self._own_waited = 0.0  # the primary's run_delay, read at _own_waited_at
        self._own_waited_at = -1.0
        self.policy = policy
        self.least_busy = policy == "least-busy"
        self.window = window
        self.hold_max = hold_max
        self.primary: HandOffHost | None = None
        self.peers: dict[int, _Peer] = {}  # pid -> state, from ready until reaped
        self.ring: list[_Peer] = []  # READY peers that may be routed to, in readiness order
        self._next = 0  # where the rotation starts
        self._next_forced = 0
        self._queue_until = 0.0  # least-busy: BUSY_MAX applies until then (a loop was seen blocked)
        self._full_since = 0.0  # least-busy: since when every worker is at BUSY_MAX (0: not)
        self.held: collections.deque[int] = collections.deque()  # fds no worker could take yet
        self._batch = 0
        self._accepting = False
        self._paused_until = 0.0
        #: most connection fds the primary may hold at once: held, unacknowledged, and
        #: their copies queued in a channel (``_fd_budget``; set at attach)
        self.fd_budget = hold_max
        self._fd_trouble = Throttle(logger)
        self._listeners: list[tuple[socket.socket, Callable[[int], None]]] = []
        # statistics, logged at close: how cheap is the accept path?
        self.accepted = 0
        self.rerouted = 0
        self.messages = 0
        self.wakeups = 0
        self.accept_ns = 0
        self._cpu_start = 0.0

    # -- Component hooks ------------------------------------------------------

    @override
    def attach(self, primary: HandOffHost) -> None:
        self.primary = primary
        for lst in primary.listeners:
            lst.sock.setblocking(False)
            accept = lst.sock._accept  # type: ignore[attr-defined]  # (fd, addr): no socket object
            self._listeners.append((lst.sock, functools.partial(self._on_accept, accept)))
        self._cpu_start = time.process_time()
        self.fd_budget = _fd_budget(len(primary.slots))
        if self.fd_budget < self.hold_max:
            logger.info(
                "holding at most %d connection fds in the primary (RLIMIT_NOFILE, less a reserve)", self.fd_budget
            )
            self.hold_max = self.fd_budget
        logger.info("scheduling: %s (the primary accepts and hands connections to workers)", self.policy)
        self._update_accepting()

    @override
    def worker_event(self, event: WorkerEvent, w: Worker) -> None:
        if event == "ready":
            self.peers[w.pid] = _Peer(w, self.window)
            self.ring.append(self.peers[w.pid])
        elif event == "draining":
            if w.pid in self.peers:
                self._retire(self.peers[w.pid])
        elif event == "exited":
            peer = self.peers.pop(w.pid, None)
            if peer is not None:
                self._retire(peer)
                n = peer.unacked
                for bid in sorted(peer.batches):
                    self._reroute(peer, peer.batches.pop(bid))
                if n:
                    logger.warning("%s exited holding %d unacknowledged connection(s): re-routed", w.name, n)
        else:
            return
        self._pump()

    @override
    def worker_message(self, w: Worker, msg: Message, fds: list[int]) -> bool:
        if msg.get("t") != ACK:
            return False
        close_all(fds)  # an ack carries no fds; anything attached is junk
        peer = self.peers.get(w.pid)
        if peer is None:
            logger.warning("%s sent an ack but was never handed connections; ignored", w.name)
            return True
        try:
            self._on_ack(peer, msg)
        except (TypeError, ValueError) as exc:
            logger.warning("%s sent a malformed ack (%s): %.200r; ignored", w.name, exc, msg)
        if self.held or not self._accepting:  # an ack only frees room
            self._pump()
        return True

    @override
    def next_deadline(self) -> float | None:
        assert self.primary is not None
        now = self.primary.clock()
        times = [p.blocked_until for p in self.ring if p.blocked_until > now]
        if self._paused_until > now:
            times.append(self._paused_until)
        if self.held and self._full_since and self._full_since + HOLD_WAIT > now:
            times.append(self._full_since + HOLD_WAIT)  # (after it, only an ack frees a stalled worker)
        return min(times) if times else None

    @override
    def tick(self) -> None:
        # Runs after every wake-up of the primary: only work when a timer may have expired.
        if self.held or not self._accepting:
            self._pump()

    @override
    def metrics_samples(self) -> list[Sample]:
        """For the metrics endpoint (``--metrics``): what the hand-off is doing."""
        unacked = sum(p.unacked for p in self.peers.values())
        assert self.primary is not None
        queueing = self.primary.clock() < self._queue_until
        return [
            (
                "cluster_server_handoff_queueing",
                "1 while least-busy holds new connections in the primary rather than in busy workers "
                "(a worker's event loop was seen blocked in the last 10 s)",
                "gauge",
                {},
                int(queueing),
            ),
            (
                "cluster_server_accept_backlog",
                "Connections the primary accepted and has not handed to a worker yet",
                "gauge",
                {},
                len(self.held),
            ),
            (
                "cluster_server_handoff_unacknowledged",
                "Connections handed to workers, not acknowledged yet",
                "gauge",
                {},
                unacked,
            ),
            (
                "cluster_server_connections_accepted_total",
                "Connections the primary accepted",
                "counter",
                {},
                self.accepted,
            ),
            (
                "cluster_server_connections_rerouted_total",
                "Connections given to another worker (refused, or their worker died before taking them)",
                "counter",
                {},
                self.rerouted,
            ),
        ]

    @override
    def fds_to_close_in_child(self) -> list[int]:
        """Connection fds a newly forked worker must close (they are the primary's)."""
        fds = list(self.held)
        for peer in self.peers.values():
            for batch in peer.batches.values():
                fds.extend(batch)
        return fds

    @override
    def close(self) -> None:
        dropped = len(self.held) + sum(p.unacked for p in self.peers.values())
        close_all(self.fds_to_close_in_child())
        self.held.clear()
        for peer in self.peers.values():
            peer.batches.clear()
        for sock, _ in self._listeners:
            if self.primary is not None:
                self.primary.remove_reader(sock)
        if dropped:
            logger.warning("closed %d connection(s) no worker took before the primary stopped", dropped)
        if self.accepted:
            cpu = time.process_time() - self._cpu_start
            logger.debug(
                "%s: accepted %d connection(s) in %d wake-ups, handed them over in %d message(s) "
                "(%d re-routed); the accept path took %.1f us per connection; the primary's CPU "
                "time since it started, idle time included, was %.1f us per connection",
                self.policy,
                self.accepted,
                self.wakeups,
                self.messages,
                self.rerouted,
                self.accept_ns / 1e3 / self.accepted,
                cpu * 1e6 / self.accepted,
            )

    # -- accepting ------------------------------------------------------------

    def _on_accept(self, accept: Callable[[], tuple[int, Any]], mask: int) -> None:
        if not self._accepting:
            return  # stopped in this same wake-up (an event handled before ours), e.g. the cluster stopping
        t0 = time.perf_counter_ns()
        room = min(ACCEPT_MAX, self._room())
        fds: list[int] = []
        while len(fds) < room:
            try:
                fd, _ = accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in _GONE_ERRNOS:
                    continue  # that connection is gone (reset, refused by a firewall): take the next
                assert self.primary is not None
                self._paused_until = self.primary.clock() + ACCEPT_PAUSE
                level = logging.WARNING if exc.errno in _RESOURCE_ERRNOS else logging.ERROR
                self._fd_trouble.log(level, "primary cannot accept (%s); pausing accept for %g s", exc, ACCEPT_PAUSE)
                break
            fds.append(fd)
        self.wakeups += 1
        if fds:
            self.accepted += len(fds)
            self.held.extend(fds)
            self._pump(update=False)
        self._update_accepting()
        self.accept_ns += time.perf_counter_ns() - t0

    def _room(self) -> int:
        """How many more connections the primary can place: worker windows plus hold space,
        and no more than its fd budget allows (a connection costs two fds until it is sent:
        ours, and the copy queued in the channel)."""
        assert self.primary is not None
        now = self.primary.clock()
        room = self.hold_max - len(self.held)
        for p in self.ring:
            if p.blocked_until <= now and _channel_open(p.worker):
                room += p.limit - p.unacked
        return min(room, (self.fd_budget - self.fds_in_use()) // 2)

    def fds_in_use(self) -> int:
        """Connection fds the primary holds now: held, handed and not acknowledged, queued copies."""
        n = len(self.held)
        for p in self.peers.values():
            n += p.unacked
            ch = p.worker.channel
            if ch is not None and not ch.closed:
                n += ch.pending_fds
        return n

    def _update_accepting(self) -> None:
        assert self.primary is not None
        now = self.primary.clock()
        want = not self.primary.stopping and now >= self._paused_until and self._room() > 0
        if want == self._accepting:
            return
        self._accepting = want
        for sock, callback in self._listeners:
            if want:
                self.primary.add_reader(sock, callback)
            else:
                self.primary.remove_reader(sock)

    # -- routing --------------------------------------------------------------

    def pick(self, now: float) -> _Peer | None:
        """The peer the next connection goes to, or None when nobody can take one."""
        ring = self.ring
        n = len(ring)
        start = self._next
        if not self.least_busy:
            for i in range(n):
                j = (start + i) % n
                p = ring[j]
                if p.unacked < p.limit and p.blocked_until <= now and _channel_open(p.worker):
                    self._next = j + 1
                    return p
            return None
        best: _Peer | None = None
        best_load = best_conns = best_j = 0
        stalled_after = now - STALL
        for i in range(n):
            j = (start + i) % n
            p = ring[j]
            if p.unacked < p.limit and p.blocked_until <= now and _channel_open(p.worker):
                load = p.load
                if p.unacked and p.progress_at < stalled_after:
                    load += 1 << 30  # stalled: last resort (whether it blocks: its late ack says)
                # Equally busy: fewer connections in all (idle keep-alive ones too) first.
                if best is None or load <= best_load:
                    conns = p.connections
                    if best is None or load < best_load or conns < best_conns:
                        best, best_load, best_conns, best_j = p, load, conns, j
        if best is None:
            return None
        if best_load >= BUSY_MAX and now < self._queue_until:
            # Every worker is busy or stalled: hold it for the first one that frees up. After
            # HOLD_WAIT with none under BUSY_MAX (long-lived requests keep them busy), a busy
            # one that still runs its loop takes it; one that does not never does.
            if not self._full_since:
                self._full_since = now
            if now < self._full_since + HOLD_WAIT or best_load >= 1 << 30:  # (next_deadline's sum)
                return None
        else:
            self._full_since = 0.0
        self._next = best_j + 1
        return best

    def _pump(self, update: bool = True) -> None:
        """Hand held connections to workers, oldest first, as far as their windows allow."""
        while self.held and self.ring and self._pump_once():
            pass  # a send failed and its connections came back: place them again
        if self.held and not self.ring and self.primary is not None and self.primary.stopping:
            self._last_resort()
        if update:
            self._update_accepting()

    def _last_resort(self) -> None:
        """The cluster is stopping (or upgraded) and no worker is READY: rather than close
        what we hold, make a draining worker serve it (``force``: it does not refuse; its
        drain answers the request with ``Connection: close``)."""
        while self.held:
            alive = [p for p in self.peers.values() if _channel_open(p.worker)]
            if not alive:
                return  # nobody left: close() drops them, as the kernel would its backlog
            self._next_forced = (self._next_forced + 1) % len(alive)
            peer = alive[self._next_forced]
            fds = [self.held.popleft() for _ in range(min(MAX_FDS, len(self.held)))]
            left = len(self.held)
            if self._send(peer, fds, force=True) and len(self.held) > left:
                return  # the primary is out of fds (dup failed): try again after the pause

    def _pump_once(self) -> bool:
        """One pass of ``_pump``; True when a send failed and its connections came back."""
        assert self.primary is not None
        now = self.primary.clock()
        held = self.held
        groups: dict[_Peer, list[int]] = {}
        while held:
            peer = self.pick(now)
            if peer is None:
                break
            fd = held.popleft()
            if not peer.unacked:
                self._progress(peer, now)  # holding nothing until now: not stalled
            peer.unacked += 1  # so that pick() sees it
            peer.handed += 1
            group = groups.get(peer)
            if group is None:
                groups[peer] = [fd]
            else:
                group.append(fd)
        failed = False
        for peer, fds in groups.items():
            peer.unacked -= len(fds)  # _send counts them again, batch by batch
            peer.handed -= len(fds)
            for i in range(0, len(fds), MAX_FDS):
                if not self._send(peer, fds[i : i + MAX_FDS]):
                    failed = True
        return failed

    def _send(self, peer: _Peer, fds: list[int], force: bool = False) -> bool:
        """Hand ``fds`` to ``peer`` in one message; False when its channel is gone (they are held again)."""
        assert self.primary is not None
        dups: list[int] = []  # the channel closes what it sends; we keep ours
        try:
            for fd in fds:
                dups.append(os.dup(fd))
        except OSError as exc:
            close_all(dups)  # the copies made before the failure: ours, and nobody else's
            self._fd_trouble.log(
                logging.WARNING, "primary cannot dup a connection (%s); holding it and pausing accept", exc
            )
            self._paused_until = self.primary.clock() + ACCEPT_PAUSE
            self.held.extendleft(reversed(fds))
            return True  # held again; nothing to retry before the pause is over
        self._batch += 1
        self.messages += 1
        bid = self._batch
        if not peer.unacked:
            self._progress(peer, self.primary.clock())
        peer.batches[bid] = fds
        peer.unacked += len(fds)
        peer.handed += len(fds)
        msg: Message = {"t": CONN, "b": bid, "force": True} if force else {"t": CONN, "b": bid}
        if self.primary.clock() < self._queue_until:
            msg["q"] = 1
        if not self.primary.send(peer.worker, msg, dups):
            # Not delivered (the channel is gone): nobody else has these, re-route now.
            logger.warning("%s: channel closed; re-routing its connections", peer.worker.name)
            self._retire(peer)
            self._reroute(peer, peer.batches.pop(bid))
            return False
        return True

    def _progress(self, peer: _Peer, now: float) -> None:
        """``peer`` showed its loop runs (an ack), or starts holding connections: the stall
        clock restarts. least-busy also notes how long it and the primary have waited for a
        CPU so far (at most every WAITED_EVERY: two /proc reads), so that a late ack can tell
        a blocked loop from a starved one."""
        peer.progress_at = now
        if self.least_busy and now - peer.waited_at >= WAITED_EVERY:
            peer.waited, peer.waited_at = self._waited(peer, fresh=False), now

    def _waited(self, peer: _Peer, fresh: bool) -> float | None:
        """Seconds ``peer``'s loop and the primary have waited for a CPU so far, or None.

        The ack's delay as the primary sees it is both: the worker waiting to run, and the
        primary waiting to read it. The primary's own reading is cached for WAITED_EVERY
        unless ``fresh``: an older baseline only overstates the waiting."""
        worker = self.run_delay(peer.worker.pid)
        if worker is None:
            return None
        assert self.primary is not None
        now = self.primary.clock()
        if fresh or now - self._own_waited_at >= WAITED_EVERY:
            self._own_waited, self._own_waited_at = self.run_delay(os.getpid()) or 0.0, now
        return worker + self._own_waited

    def _saw_blocked(self, peer: _Peer, now: float) -> None:
        """``peer`` acknowledged BLOCKED late. If it (or the primary) was not waiting for a CPU
        most of that time (a busy machine delays every loop), its app has requests that block
        its event loop: queue connections in the primary (BUSY_MAX) for a while."""
        stalled = now - peer.progress_at
        waiting = 0.0
        if peer.waited is not None:
            waited = self._waited(peer, fresh=True)
            if waited is not None:
                # (the baseline is at most WAITED_EVERY older than progress_at: this can only
                # overstate the waiting, never call a starved loop blocked)
                waiting = max(0.0, waited - peer.waited)
        if stalled - waiting < BLOCKED:
            return  # starved of CPU, not blocked by its app
        if now >= self._queue_until:
            logger.info(
                "%s's event loop was blocked for %.0f ms or more (not counting %.0f ms waiting for a CPU): for the "
                "next %g s, a worker with %d busy connections gets no more while the primary can hold them "
                "(--scheduling least-busy)",
                peer.worker.name,
                (stalled - waiting) * 1e3,
                waiting * 1e3,
                QUEUE_FOR,
                BUSY_MAX,
            )
        self._queue_until = now + QUEUE_FOR

    def _retire(self, peer: _Peer) -> None:
        """Never route to ``peer`` again (its unacknowledged batches stay until it answers or is reaped)."""
        peer.closing = True
        if peer in self.ring:
            i = self.ring.index(peer)
            del self.ring[i]
            if self._next > i:
                self._next -= 1

    def _reroute(self, peer: _Peer, fds: list[int]) -> None:
        peer.unacked -= len(fds)
        peer.handed -= len(fds)
        self.rerouted += len(fds)
        self.held.extendleft(reversed(fds))

    def _on_ack(self, peer: _Peer, msg: Message) -> None:
        """Apply one ack. Raises TypeError on a malformed field (then nothing is applied)."""
        assert self.primary is not None
        now = self.primary.clock()
        if self.least_busy and peer.unacked and now - peer.progress_at >= BLOCKED:
            self._saw_blocked(peer, now)
        self._progress(peer, now)
        taken = _ints(msg.get("b", []), "b")
        draining = _ints(msg.get("r", []), "r")
        partial = msg.get("f", [])
        if not isinstance(partial, list) or not all(isinstance(x, list) and x for x in partial):
            raise TypeError("'f' is not a list of [batch, index...] lists")
        parsed = [(_int(x[0], "f"), _ints(x[1:], "f")) for x in partial]
        counts = None
        if "k" in msg or "o" in msg:
            counts = _int(msg.get("k"), "k"), _int(msg.get("o"), "o")
        conns = _int(msg["c"], "c") if "c" in msg else None
        for bid in taken:
            self._taken(peer, bid)
        for bid in draining:
            self._refused_draining(peer, bid)
        for bid, indexes in parsed:
            self._refused_at_fd_limit(peer, bid, indexes)
        if counts is not None:
            peer.taken, peer.open = counts
            peer.conns = counts[1] if conns is None else conns

    def _taken(self, peer: _Peer, bid: int) -> None:
        """The worker took every fd of batch ``bid``: ours are closed, its window grows back."""
        fds = peer.batches.pop(bid, None)
        if fds is None:
            logger.warning("%s acknowledged batch %r, which it does not hold; ignored", peer.worker.name, bid)
            return
        peer.unacked -= len(fds)
        close_all(fds)
        peer.backoff = 0.0
        if peer.limit < self.window:
            peer.limit = min(self.window, peer.limit * 2)

    def _refused_draining(self, peer: _Peer, bid: int) -> None:
        """The worker is stopping and refused batch ``bid``: route it elsewhere, and no more to it."""
        fds = peer.batches.pop(bid, None)
        if fds is None:
            logger.warning("%s refused batch %r, which it does not hold; ignored", peer.worker.name, bid)
            return
        if not peer.closing:
            logger.info("%s is stopping and refused %d connection(s): re-routing them", peer.worker.name, len(fds))
        self._retire(peer)
        self._reroute(peer, fds)

    def _refused_at_fd_limit(self, peer: _Peer, bid: int, indexes: list[int]) -> None:
        """The worker is at its fd limit and refused fds ``indexes`` of batch ``bid`` (all if none)."""
        w = peer.worker
        fds = peer.batches.pop(bid, None)
        if fds is None:
            logger.warning("%s refused batch %r, which it does not hold; ignored", w.name, bid)
            return
        refused = sorted({i for i in indexes if 0 <= i < len(fds)}) if indexes else range(len(fds))
        back = [fds[i] for i in refused]
        keep = set(refused)
        close_all([fd for i, fd in enumerate(fds) if i not in keep])
        peer.unacked -= len(fds) - len(back)
        self._reroute(peer, back)
        # Send it no more than it could take: a batch larger than its free fds
        # would be refused whole (MSG_CTRUNC) again and again.
        peer.limit = max(1, min(peer.limit, len(fds)) // 2, len(fds) - len(back))
        assert self.primary is not None
        first = peer.backoff == 0.0  # warn once per episode, not for every retry
        peer.backoff = min(max(RETRY_FIRST, peer.backoff * 2), RETRY_CAP)
        peer.blocked_until = self.primary.clock() + peer.backoff
        logger.log(
            logging.WARNING if first else logging.DEBUG,
            "%s is at its file-descriptor limit and refused %d connection(s): re-routing them; "
            "it gets none for %.2f s (raise its RLIMIT_NOFILE / ulimit -n)",
            w.name,
            len(back),
            peer.backoff,
        )


def _int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{key!r} holds {value!r}, not an integer")
    return value


def _ints(values: Any, key: str) -> list[int]:
    if not isinstance(values, list):
        raise TypeError(f"{key!r} is not a list")
    return [_int(v, key) for v in values]


def _run_delay(pid: int) -> float | None:
    """Seconds ``pid``'s main thread (a worker's event loop) has spent runnable but waiting
    for a CPU (``/proc/PID/schedstat``, second field); None when the kernel does not say."""
    try:
        with open(f"/proc/{pid}/schedstat", "rb") as fh:
            return int(fh.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def _channel_open(w: Worker) -> bool:
    return w.channel is not None and not w.channel.closed


def _fd_budget(workers: int) -> int:
    """How many connection fds the primary may hold without nearing its own fd limit.

    Its limit, less the fds open now, less a reserve for what else it opens while
    it runs: a channel per worker (room for twice as many as now, for a scale-up or
    a roll), control and metrics clients, a template, the reload watcher.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return HOLD_MAX * 4
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = 64
    reserve = FD_RESERVE + 2 * workers
    return max(16, soft - open_now - reserve)


class ReusePortCheck(Component):
    """Primary component for ``reuseport``: warn when restarts can reset queued connections."""

    @override
    def attach(self, primary: Any) -> None:
        logger.info("scheduling: reuseport (each worker binds its own SO_REUSEPORT socket)")
        warning = migrate_req_warning()
        if warning:
            logger.warning("%s", warning)


def migrate_req_warning(path: str = MIGRATE_REQ) -> str | None:
    """Why restarts can lose connections under reuseport, or None when the kernel migrates them."""
    try:
        with open(path) as fh:
            value = fh.read().strip()
    except OSError:
        return (
            "--scheduling reuseport: this kernel has no net.ipv4.tcp_migrate_req (Linux 5.14+): "
            "connections queued on a stopping worker's socket are reset during restarts"
        )
    if value == "0":
        return (
            "--scheduling reuseport: net.ipv4.tcp_migrate_req is 0, so connections queued on a "
            "stopping worker's socket are reset during restarts; set it to 1 "
            "(sysctl -w net.ipv4.tcp_migrate_req=1) or use --scheduling round-robin"
        )
    return None
