"""The primary: one thread, no asyncio, never imports the app.

It owns the listening sockets and the worker table, and waits on one selector
over the signal self-pipe and the worker channels. Signal handlers only queue
the signal; the loop dispatches ``handle_<signal>``. Every wait has a deadline.

Decisions (spawn, reap, replace, back off, roll, drain, kill) are methods that
read the worker table; the fork/kill side effects go through a ``Launcher``,
so tests can drive the decisions with a fake launcher and a fake clock.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cluster_server import _proc
from cluster_server._config import Config
from cluster_server._errors import AppLoadError, ChannelError, ClusterServerError, WorkerBootError
from cluster_server._proc import close_all as _close_fds
from cluster_server._proc import describe_status
from cluster_server._proc import flush_output as _flush_output
from cluster_server.primary.sockets import Listener
from cluster_server.primary.state import WorkerState, check_transition, exit_state
from cluster_server.wire import channel as _channel
from cluster_server.wire.channel import Channel, Message
from cluster_server.worker.main import DUMP_SIGNAL, EXIT_BOOT_FAILURE, WorkerSpec, load_app, worker_main

logger = logging.getLogger("cluster_server")

#: a worker ready for this long before it crashed starts its slot's backoff afresh
STABLE_AFTER = 10.0
#: longest wait between restarts of a crash-looping slot
BACKOFF_CAP = 10.0
#: a hung worker gets this long to dump its stack before SIGKILL
DUMP_GRACE = 0.5
#: the selector never waits longer than this, whatever the deadlines say
MAX_WAIT = 1.0
#: a slot whose worker could not be forked (no fds, processes or memory) tries again after this
SPAWN_RETRY = 1.0
#: unexpected exceptions the loop survives (draining) before it kills the workers and exits
MAX_LOOP_ERRORS = 100
#: a roll whose reason starts with this was asked for by ``--reload`` (its old workers exit "reloaded")
RELOAD_PREFIX = "reload:"
#: finished rolls the primary remembers (``ctl status``, ``ctl reload --wait``)
ROLL_HISTORY = 32

_S = WorkerState


def backoff_delay(failures: int) -> float:
    """Seconds to wait before restarting a slot after ``failures`` crashes in a row.

    The first crash restarts at once; then 0.1 s, 0.2 s, 0.4 s ... up to BACKOFF_CAP.
    """
    if failures <= 1:
        return 0.0
    return float(min(0.1 * 2 ** (failures - 2), BACKOFF_CAP))


@dataclass(eq=False)
class Worker:
    """One worker process, as the primary sees it (a row of the worker table)."""

    id: int  # the slot it serves; stable across replacements
    generation: int
    spawned_at: float
    pid: int = 0
    state: WorkerState = _S.BOOTING
    channel: Channel | None = None
    ready_at: float | None = None
    last_heartbeat: float = 0.0
    requests: int = 0
    connections: int = 0
    boot_error: str | None = None
    #: "load" (import / factory / uvicorn config) or "lifespan", from the boot_error message
    boot_stage: str | None = None
    #: SIGKILL was sent: no further deadlines, just wait for the reap
    killed: bool = False
    #: draining: SIGKILL at this time; hung: SIGKILL after the stack dump
    kill_at: float | None = None
    #: why the primary is stopping it, as a metric label ("stopped", "hang", "rolled",
    #: "max_requests"...: ``ops/status.py`` lists them), None if it was not asked
    stop_reason: str | None = None
    exit_status: str = ""
    #: the request metrics of its last heartbeat, as sent (``worker/request_metrics.py``);
    #: read by the metrics endpoint, which checks them
    report: Any = None

    def move(self, new: WorkerState) -> None:
        self.state = check_transition(self.state, new)

    @property
    def name(self) -> str:
        return f"worker {self.id} [pid {self.pid}]"


@dataclass
class Slot:
    """A place for one worker; ``--workers N`` means N slots."""

    id: int
    pid: int | None = None  # the worker holding the slot (booting or ready)
    replacement: int | None = None  # a rolling restart's new worker, booting
    generation: int = 1
    failures: int = 0
    respawn_at: float = 0.0


@dataclass
class Roll:
    """A rolling restart in progress: one slot at a time, replacement first.

    A recycle (max requests, memory, lifetime) is a roll of one slot that keeps
    the slot's generation.
    """

    generation: int
    reason: str
    pending: list[int]
    started_at: float
    current: int | None = None  # slot being rolled
    done: list[int] = field(default_factory=list)
    recycle: bool = False
    #: the exit reason of the workers it replaces: rolled, reloaded, max_requests, max_memory, max_lifetime
    kind: str = "rolled"
    #: the slots it was asked to replace (``pending`` empties as it goes)
    slots: list[int] = field(default_factory=list)
    #: once it ended: completed, failed (a replacement could not start) or aborted (the server stopped)
    outcome: str | None = None
    #: why it failed, in words
    error: str | None = None
    ended_at: float | None = None


class Launcher(Protocol):
    def spawn(self, worker: Worker) -> tuple[int, Channel | None]: ...

    def kill(self, pid: int, sig: int) -> None: ...


class Component(Protocol):
    """Something that plugs into the primary's loop (a scheduler, the control socket...).

    Every method is optional; the primary calls the ones a component defines:
    ``attach(primary)`` once the loop is set up; ``next_deadline() -> float | None``
    and ``tick()`` for its timers; ``worker_event(event, worker)`` with event in
    ``spawned ready draining exited``; ``worker_message(worker, msg, fds) -> bool``
    for message types the primary does not know (True: handled, fds taken);
    ``cannot_start(error) -> bool`` when the first generation cannot start (True:
    handled, the primary keeps running); ``before_roll(reason, slots) -> bool``
    before a rolling restart starts (False: not yet, the component calls
    ``roll`` again when ready); ``handle_<signal>()`` for a signal the component
    installed with the primary's ``_queue_signal``; ``fds_to_close_in_child() ->
    list[int]``, its fds a new worker must not keep; ``defer_stop(why) -> bool``
    on SIGTERM (True: the component stops the cluster later itself, e.g. after
    --shutdown-delay); ``close()`` when the primary exits.
    """


class Primary:
    def __init__(
        self,
        config: Config,
        listeners: list[Listener],
        *,
        launcher: Launcher | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.listeners = listeners
        self.clock = clock
        self.launcher: Launcher = launcher or ForkLauncher(self)
        self.workers: dict[int, Worker] = {}  # pid -> live worker
        self.slots: dict[int, Slot] = {i: Slot(i) for i in range(1, config.workers + 1)}
        self.generation = 1
        self.roll_state: Roll | None = None
        #: rolls asked for while one ran: (reason, slots or None for all), run in order
        self.roll_queue: list[tuple[str, list[int] | None]] = []
        #: the last rolls and recycles that ended (outcome set), oldest first; ``rolls_ended`` counts them all
        self.finished_rolls: collections.deque[Roll] = collections.deque(maxlen=ROLL_HISTORY)
        self.rolls_ended = 0
        self.ever_ready = False
        self.stopping = False
        self.fatal: ClusterServerError | None = None
        self.exit_code = 0
        self.on_child_exit: dict[int, Callable[[int, int], None]] = {}
        self.components: list[Any] = []
        self._signals: collections.deque[int] = collections.deque()
        self._selector: selectors.BaseSelector | None = None
        self._wake_r = self._wake_w = -1
        self._errors = 0  # unexpected exceptions met by the loop

    # -- the loop -----------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped. Returns the exit code; raises the start-up error."""
        _proc.set_title(f"cluster-server: primary [{self.config.app_name}]")
        self._selector = selectors.DefaultSelector()
        self._install_signals()
        try:
            for c in self.components:
                _call(c, "attach", self)
            shown = ", ".join(lst.display for lst in self.listeners)
            logger.info(
                "primary serving %s with %d worker%s (Press CTRL+C to quit)",
                shown,
                len(self.slots),
                "" if len(self.slots) == 1 else "s",
            )
            self.manage_workers()
            while not (self.stopping and not self.workers):
                try:
                    self._wait(self.next_deadline())
                    self._handle_signals()
                    self.reap_workers()
                    self.tick()
                except Exception:
                    if self._internal_error():
                        break
        finally:
            self._shutdown()
        if self.fatal is not None:
            raise self.fatal
        return self.exit_code

    def _internal_error(self) -> bool:
        """An exception reached the loop (a bug): drain the workers and exit non-zero.

        The workers finish what they serve, as for SIGTERM; only when errors go on
        while draining does the primary give up (True: leave the loop, and
        ``_shutdown`` kills what is left).
        """
        self._errors += 1
        logger.exception("primary: unexpected error (a bug); draining the workers and exiting")
        self.exit_code = 1
        if self._errors > MAX_LOOP_ERRORS:
            logger.critical("primary: %d unexpected errors; stopping the workers at once", self._errors)
            return True
        if not self.stopping:
            self.stop(graceful=True, why="unexpected error")
        return False

    def _wait(self, deadline: float | None) -> None:
        assert self._selector is not None
        timeout = MAX_WAIT if deadline is None else max(0.0, min(MAX_WAIT, deadline - self.clock()))
        for key, mask in self._selector.select(timeout):
            key.data(mask)

    def next_deadline(self) -> float | None:
        """The earliest time the primary must act without being woken."""
        times: list[float] = []
        for slot in self.slots.values():
            if slot.pid is None and slot.replacement is None and not self.stopping:
                times.append(slot.respawn_at)
        for w in self.workers.values():
            if w.killed:
                continue
            if w.kill_at is not None:
                times.append(w.kill_at)
            elif w.state is _S.BOOTING:
                times.append(w.spawned_at + self.config.ready_timeout)
            elif w.state is _S.READY and self.config.worker_timeout:
                times.append(w.last_heartbeat + self.config.worker_timeout)
        for c in self.components:
            t = _call(c, "next_deadline")
            if t is not None:
                times.append(t)
        return min(times) if times else None

    def tick(self) -> None:
        """Act on every deadline that has passed."""
        self.murder_workers()
        self.manage_workers()
        self.advance_roll()
        for c in self.components:
            _call(c, "tick")

    def add_component(self, component: Any) -> None:
        self.components.append(component)
        if self._selector is not None:
            _call(component, "attach", self)

    def emit(self, event: str, w: Worker) -> None:
        for c in self.components:
            _call(c, "worker_event", event, w)

    def add_reader(self, fileobj: Any, callback: Callable[[int], None], events: int = selectors.EVENT_READ) -> None:
        """Watch ``fileobj`` in the primary's selector; ``callback(mask)`` runs on events."""
        assert self._selector is not None
        self._selector.register(fileobj, events, callback)

    def modify_reader(self, fileobj: Any, events: int) -> None:
        assert self._selector is not None
        self._selector.modify(fileobj, events, self._selector.get_key(fileobj).data)

    def remove_reader(self, fileobj: Any) -> None:
        if self._selector is not None:
            try:
                self._selector.unregister(fileobj)
            except (KeyError, ValueError):
                pass

    # -- signals ------------------------------------------------------------

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in _proc.LOOP_SIGNALS:
            signal.signal(sig, self._queue_signal)
        assert self._selector is not None
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wakeup)

    def _queue_signal(self, sig: int, frame: Any) -> None:
        self._signals.append(sig)

    def _drain_wakeup(self, mask: int) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _handle_signals(self) -> None:
        while self._signals:
            sig = self._signals.popleft()
            name = f"handle_{signal.Signals(sig).name[3:].lower()}"
            handler = getattr(self, name, None)
            if handler is not None:
                handler()
            else:  # a signal a component installed (SIGUSR2: upgrade)
                for c in self.components:
                    _call(c, name)

    def handle_chld(self) -> None:
        pass  # reap_workers runs after every wake-up

    def handle_term(self) -> None:
        if not self.stopping and any(_call(c, "defer_stop", "SIGTERM") for c in self.components):
            return
        self.stop(graceful=True, why="SIGTERM")

    def handle_int(self) -> None:
        if self.stopping:
            logger.warning("second SIGINT: stopping at once")
            self.exit_code = 128 + signal.SIGINT  # interrupted, as a shell reports it (130)
            self.kill_all()
        else:
            self.stop(graceful=True, why="SIGINT (press CTRL+C again to stop at once)")

    def handle_quit(self) -> None:
        logger.warning("SIGQUIT: stopping at once")
        self.stop(graceful=False, why="SIGQUIT")

    def handle_hup(self) -> None:
        self.roll("SIGHUP")

    def handle_ttin(self) -> None:
        self.scale(len(self.slots) + 1)

    def handle_ttou(self) -> None:
        if len(self.slots) > 1:
            self.scale(len(self.slots) - 1)

    # -- spawning and reaping -----------------------------------------------

    def manage_workers(self) -> None:
        """Fill every empty slot whose backoff has passed."""
        if self.stopping:
            return
        now = self.clock()
        for slot in self.slots.values():
            if slot.pid is None and slot.replacement is None and now >= slot.respawn_at:
                w = self.spawn_worker(slot, slot.generation)
                if w is None:
                    slot.respawn_at = now + SPAWN_RETRY
                else:
                    slot.pid = w.pid

    def spawn_worker(self, slot: Slot, generation: int) -> Worker | None:
        """Start a worker for ``slot``; None (logged) when the primary cannot fork now.

        Out of fds (``socketpair``: EMFILE), processes or memory (``fork``:
        EAGAIN, ENOMEM): the cluster keeps serving with the workers it has.
        """
        w = Worker(id=slot.id, generation=generation, spawned_at=self.clock())
        try:
            w.pid, w.channel = self.launcher.spawn(w)
        except OSError as exc:
            logger.error("cannot start worker %d: %s; retrying in %g s", slot.id, exc, SPAWN_RETRY)
            return None
        self.workers[w.pid] = w
        if w.channel is not None and self._selector is not None:
            self.add_reader(w.channel, functools.partial(self._on_channel, w))
        logger.info("%s spawned (generation %d)", w.name, generation)
        self.emit("spawned", w)
        return w

    def reap_workers(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.child_exited(pid, status)

    def child_exited(self, pid: int, status: int) -> None:
        if pid in self.on_child_exit:
            self.on_child_exit.pop(pid)(pid, status)
            return
        w = self.workers.pop(pid, None)
        if w is None:
            return
        w.exit_status = describe_status(status)
        if w.channel is not None and not w.channel.closed:
            # Its last messages (a boot_error, say) may still be unread when the
            # exit is reaped first: read them before closing the channel.
            self._on_channel(w, selectors.EVENT_READ)
        w.move(exit_state(w.state))
        self._forget_channel(w)
        planned = w.stop_reason is not None and w.stop_reason not in ("hang", "ready_timeout")
        level = logging.INFO if planned else logging.WARNING
        logger.log(level, "%s exited (%s)", w.name, w.exit_status)
        self.emit("exited", w)
        self.worker_gone(w, status)

    def worker_gone(self, w: Worker, status: int) -> None:
        """Decide what a worker's exit means for its slot and the cluster."""
        slot = self.slots.get(w.id)
        now = self.clock()
        if slot is not None and slot.replacement == w.pid:
            slot.replacement = None
            self._roll_failed(w)
            return
        if slot is None or slot.pid != w.pid:
            return  # an old generation's worker, or a removed slot: nothing to refill
        slot.pid = None
        if self.stopping:
            return
        if w.state is _S.FAILED and not self.ever_ready:
            # The first generation cannot start: stop the cluster and say why.
            if w.boot_error is not None:
                err: ClusterServerError = (
                    AppLoadError(w.boot_error)
                    if _exit_code(status) == EXIT_BOOT_FAILURE and w.boot_stage != "lifespan"
                    else WorkerBootError(w.boot_error)
                )
            else:
                err = WorkerBootError(f"worker {w.id} exited ({w.exit_status}) before it was ready")
            self.fail(err)
            return
        if w.ready_at is not None and now - w.ready_at >= STABLE_AFTER:
            slot.failures = 0
        slot.failures += 1
        slot.respawn_at = now + backoff_delay(slot.failures)
        if w.boot_error:
            logger.error("worker %d could not start: %s", w.id, w.boot_error)
        delay = slot.respawn_at - now
        if delay > 0:
            logger.warning("worker %d failed %d times in a row; restarting it in %.2f s", w.id, slot.failures, delay)

    def murder_workers(self) -> None:
        """Kill workers past their deadline: hung, never ready, or draining too long."""
        now = self.clock()
        cfg = self.config
        for w in list(self.workers.values()):
            if w.killed:
                continue
            if w.kill_at is not None:
                if now >= w.kill_at:
                    logger.warning("%s did not stop in time; sending SIGKILL", w.name)
                    self.launcher.kill(w.pid, signal.SIGKILL)
                    w.kill_at, w.killed = None, True
            elif w.state is _S.BOOTING and now - w.spawned_at >= cfg.ready_timeout:
                w.boot_error = f"worker {w.id} was not ready within {cfg.ready_timeout:g} s (--ready-timeout)"
                logger.error("%s was not ready within %g s; killing it", w.name, cfg.ready_timeout)
                w.stop_reason = "ready_timeout"
                self.launcher.kill(w.pid, signal.SIGKILL)
                w.killed = True
            elif w.state is _S.READY and cfg.worker_timeout and now - w.last_heartbeat >= cfg.worker_timeout:
                logger.error(
                    "%s sent no heartbeat for %.1f s (--worker-timeout %g): its event loop is blocked; "
                    "dumping its stack and replacing it",
                    w.name,
                    now - w.last_heartbeat,
                    cfg.worker_timeout,
                )
                w.stop_reason = "hang"
                self.launcher.kill(w.pid, DUMP_SIGNAL)  # faulthandler dumps every thread
                w.kill_at = now + DUMP_GRACE

    # -- messages -----------------------------------------------------------

    def _on_channel(self, w: Worker, mask: int) -> None:
        # Closed already in this wake-up (a failed send while handling another event):
        # the selector's list of ready fds was made before that.
        if w.channel is None or w.channel.closed:
            return
        if mask & selectors.EVENT_WRITE:
            try:
                if w.channel.flush():
                    self._watch(w)
            except OSError:
                self._forget_channel(w)
                return
        if not mask & selectors.EVENT_READ:
            return
        try:
            for msg, fds in w.channel.receive():
                if isinstance(msg, ChannelError):
                    _close_fds(fds)
                    logger.warning("%s: dropped a message: %s", w.name, msg)
                    continue
                self.handle_message(w, msg, fds)
        except EOFError:
            self._forget_channel(w)

    def _watch(self, w: Worker) -> None:
        """Watch a worker's channel for writability only while it has queued messages."""
        if w.channel is not None and self._selector is not None and not w.channel.closed:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if w.channel.pending else 0)
            self.modify_reader(w.channel, events)

    def send(self, w: Worker, msg: Message, fds: list[int] | None = None) -> bool:
        """Send a message to a worker (fds are handed over). False if the worker is gone."""
        if w.channel is None or w.channel.closed:
            _close_fds(fds or [])
            return False
        try:
            if not w.channel.send(msg, fds or ()):
                self._watch(w)
        except OSError:
            self._forget_channel(w)
            _close_fds(fds or [])  # not sent, not queued: still ours
            return False
        return True

    def _forget_channel(self, w: Worker) -> None:
        if w.channel is None or w.channel.closed:
            return
        self.remove_reader(w.channel)
        w.channel.close()

    def handle_message(self, w: Worker, msg: Message, fds: list[int] | None = None) -> None:
        """React to one message from a worker; anything unexpected is logged and dropped."""
        kind = msg.get("t")
        if kind not in ("hb", "ready", "boot_error"):
            for c in self.components:
                if _call(c, "worker_message", w, msg, fds or []):
                    return
        _close_fds(fds or [])
        if kind == "hb":
            w.last_heartbeat = self.clock()
            r, c = msg.get("r"), msg.get("c")
            if isinstance(r, int) and isinstance(c, int):
                w.requests, w.connections = r, c
            w.report = msg.get("m")
        elif kind == "ready":
            if w.state is not _S.BOOTING:
                logger.warning("%s said ready twice; ignored", w.name)
                return
            if w.exit_status:
                return  # read only after it was reaped (see child_exited): it serves nothing
            self.worker_ready(w)
        elif kind == "boot_error":
            err = msg.get("error")
            w.boot_error = str(err)[:2000] if err is not None else "unknown error"
            stage = msg.get("stage")
            w.boot_stage = stage if isinstance(stage, str) else None
        else:
            logger.warning("%s sent an unknown message %.200r; ignored", w.name, msg)

    def worker_ready(self, w: Worker) -> None:
        now = self.clock()
        w.move(_S.READY)
        w.ready_at = w.last_heartbeat = now
        logger.info("%s ready in %.2f s", w.name, now - w.spawned_at)
        self.emit("ready", w)
        slot = self.slots.get(w.id)
        if slot is not None and slot.replacement == w.pid:
            self._roll_step_done(slot, w)
        if not self.ever_ready and all(
            s.pid is not None and self.workers[s.pid].state is _S.READY for s in self.slots.values()
        ):
            self.ever_ready = True
            logger.info("all %d workers ready", len(self.slots))

    # -- rolling restarts, scaling, stopping ----------------------------------

    def roll(self, reason: str, slots: list[int] | None = None) -> bool:
        """Start a rolling restart: each slot gets a new worker, ready before the old one drains.

        ``slots`` limits it to those slots (default: all). Returns False if one is
        already running: this one is queued and starts when that one ends, whether
        it succeeded or stopped (the code may have been fixed meanwhile). Queued
        requests for every slot coalesce into one.
        """
        if self.stopping:
            return False
        if self.roll_state is not None:
            if slots is None:
                # A full roll covers everything queued so far.
                self.roll_queue = [(reason, None)]
            elif not any(q is None for _, q in self.roll_queue):
                self.roll_queue.append((reason, list(slots)))
            logger.info("rolling restart (%s) queued after the one in progress", reason)
            return False
        for c in self.components:
            # A component that must prepare first (a preload template re-importing
            # the new code) answers False and calls roll() again when it is done.
            if _call(c, "before_roll", reason, slots) is False:
                return False
        self.generation += 1
        pending = sorted(self.slots) if slots is None else sorted(s for s in set(slots) if s in self.slots)
        kind = "reloaded" if reason.startswith(RELOAD_PREFIX) else "rolled"
        self.roll_state = Roll(self.generation, reason, pending, started_at=self.clock(), kind=kind, slots=pending[:])
        logger.info("rolling restart to generation %d (%s): %d worker(s)", self.generation, reason, len(pending))
        self.advance_roll()
        return True

    def recycle(self, slot_id: int, reason: str, kind: str = "max_requests") -> bool:
        """Replace one slot's worker (replacement first), keeping its generation.

        ``kind`` is the old worker's exit reason (max_requests, max_memory,
        max_lifetime). False (and nothing queued) if a roll is running or the
        slot is busy; the caller asks again later.
        """
        slot = self.slots.get(slot_id)
        if self.stopping or self.roll_state is not None or slot is None or slot.replacement is not None:
            return False
        self.roll_state = Roll(
            slot.generation, reason, [slot_id], started_at=self.clock(), recycle=True, kind=kind, slots=[slot_id]
        )
        logger.info("recycling worker %d (%s)", slot_id, reason)
        self.advance_roll()
        return True

    def advance_roll(self) -> None:
        roll = self.roll_state
        if roll is None or roll.current is not None or self.stopping:
            return
        while roll.pending:
            slot = self.slots.get(roll.pending.pop(0))
            if slot is None:
                continue
            w = self.spawn_worker(slot, roll.generation)
            if w is None:
                self._end_roll("failed", "cannot start a worker (see the log)")
                kind = "recycling" if roll.recycle else f"rolling restart to generation {roll.generation}"
                logger.error("%s stopped: cannot start a worker; the running workers keep serving", kind)
                self._next_roll()
                return
            roll.current = slot.id
            slot.replacement = w.pid
            return
        took = self.clock() - roll.started_at
        if roll.recycle:
            logger.info("recycled worker %s in %.2f s", ", ".join(map(str, roll.done)), took)
        else:
            logger.info("rolling restart to generation %d done in %.2f s", roll.generation, took)
        self._end_roll("completed")
        self._next_roll()

    def _end_roll(self, outcome: str, error: str | None = None) -> None:
        """The roll in progress ended: remember how (``finished_rolls``), and clear it."""
        roll = self.roll_state
        if roll is None:
            return
        roll.outcome, roll.error, roll.ended_at = outcome, error, self.clock()
        self.finished_rolls.append(roll)
        self.rolls_ended += 1
        self.roll_state = None

    def _next_roll(self) -> None:
        while self.roll_queue and self.roll_state is None and not self.stopping:
            reason, slots = self.roll_queue.pop(0)
            self.roll(reason, slots)

    def _roll_step_done(self, slot: Slot, new: Worker) -> None:
        old_pid, slot.pid, slot.replacement = slot.pid, new.pid, None
        slot.generation, slot.failures = new.generation, 0
        if old_pid is not None and old_pid in self.workers:
            roll = self.roll_state
            self.drain_worker(self.workers[old_pid], roll.kind if roll is not None else "rolled")
        if self.roll_state is not None and self.roll_state.current == slot.id:
            self.roll_state.done.append(slot.id)
            self.roll_state.current = None
            self.advance_roll()

    def _roll_failed(self, w: Worker) -> None:
        """A replacement died or timed out before it was ready: stop, keep what serves."""
        roll = self.roll_state
        why = w.boot_error or f"worker {w.id} exited ({w.exit_status}) before it was ready"
        if roll is None or self.stopping:
            return  # stopped meanwhile: nothing to keep going
        self._end_roll("failed", why)
        slot = self.slots.get(w.id)
        old = self.workers.get(slot.pid) if slot is not None and slot.pid is not None else None
        keeps = f"{old.name} keeps serving" if old is not None else f"worker {w.id} will be restarted"
        if roll.recycle:
            logger.error("recycling worker %d stopped: %s; %s", w.id, why, keeps)
        else:
            logger.error(
                "rolling restart to generation %d stopped: %s; %d of %d worker(s) were replaced, "
                "the others keep serving their generation",
                roll.generation,
                why,
                len(roll.done),
                len(roll.done) + len(roll.pending) + 1,
            )
        self._next_roll()

    def scale(self, n: int) -> None:
        """Change the number of slots; removed slots' workers drain."""
        if self.stopping or n < 1:
            return
        current = len(self.slots)
        logger.info("scaling from %d to %d workers", current, n)
        for i in range(current + 1, n + 1):
            self.slots[i] = Slot(i, generation=self.generation)
        roll = self.roll_state
        for i in range(current, n, -1):
            slot = self.slots.pop(i)
            for pid in (slot.pid, slot.replacement):
                if pid is not None and pid in self.workers:
                    self.drain_worker(self.workers[pid], "scaled_down")
            if roll is not None and roll.current == i:
                roll.current = None  # its replacement drains; go on with the next slot
        self.manage_workers()
        self.advance_roll()

    def drain_worker(self, w: Worker, reason: str = "stopped") -> None:
        """Ask a worker to stop gracefully; SIGKILL it after --graceful-timeout.

        ``reason`` is its exit reason, a metric label (``ops/status.py``).
        """
        if w.state is _S.DRAINING:
            return
        w.move(_S.DRAINING)
        w.stop_reason = reason
        logger.info("%s draining (%s)", w.name, reason.replace("_", " "))
        self.emit("draining", w)
        w.kill_at = self.clock() + self.config.graceful_timeout
        self.launcher.kill(w.pid, signal.SIGTERM)

    def stop(self, graceful: bool = True, why: str = "stop", reason: str = "stopped") -> None:
        """Stop the cluster; ``reason`` is the workers' exit reason ("upgrade" when a new primary took over)."""
        if not self.stopping:
            logger.info("stopping (%s): draining %d worker(s)", why, len(self.workers))
        self.stopping = True
        self._end_roll("aborted", f"the server is stopping ({why})")
        self.roll_queue.clear()
        if graceful:
            for w in list(self.workers.values()):
                self.drain_worker(w, reason)
        else:
            self.kill_all()

    def fail(self, err: ClusterServerError) -> None:
        """Stop the cluster because it cannot run; ``run`` raises ``err``."""
        for c in self.components:
            if _call(c, "cannot_start", err):  # --reload waits for the fix instead
                return
        if self.fatal is None:
            self.fatal = err
        self.stop(graceful=True, why="start-up failed")

    def kill_all(self) -> None:
        self.stopping = True
        for w in self.workers.values():
            w.stop_reason = w.stop_reason or "stopped"
            self.launcher.kill(w.pid, signal.SIGKILL)
            w.killed = True

    def _shutdown(self) -> None:
        """Leave nothing behind: no worker, no socket file, no signal handler."""
        if self.workers:
            self.kill_all()
            deadline = time.monotonic() + 5
            while self.workers and time.monotonic() < deadline:
                try:
                    pid, status = os.waitpid(-1, 0)
                except ChildProcessError:
                    break
                self.child_exited(pid, status)
        for w in list(self.workers.values()):
            self._forget_channel(w)
        for c in self.components:
            _call(c, "close")
        signal.set_wakeup_fd(-1)
        for sig in _proc.LOOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        if self._selector is not None:
            self._selector.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        for lst in self.listeners:
            lst.close()

    def fds_to_close_in_child(self) -> list[int]:
        """The primary's own fds a new worker must not keep."""
        fds = [fd for fd in (self._wake_r, self._wake_w) if fd >= 0]
        if self._selector is not None and hasattr(self._selector, "fileno"):
            fds.append(self._selector.fileno())
        for w in self.workers.values():
            if w.channel and not w.channel.closed:  # its channel, and connections queued for it
                fds += [w.channel.fileno(), *w.channel.queued_fds()]
        for c in self.components:
            fds.extend(_call(c, "fds_to_close_in_child") or ())
        return fds


class ForkLauncher:
    """Forks workers for a primary."""

    def __init__(self, primary: Primary, load: Callable[[Config], Any] = load_app) -> None:
        self.primary = primary
        self.load = load  # how a new worker gets the app

    def spawn(self, worker: Worker) -> tuple[int, Channel | None]:
        """Fork ``worker``. Raises ``OSError`` (nothing left open) when the primary cannot."""
        ours, theirs = _channel.pair()
        try:
            return self._fork(worker, ours, theirs)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()

    def _fork(self, worker: Worker, ours: socket.socket, theirs: socket.socket) -> tuple[int, Channel]:
        close = [*self.primary.fds_to_close_in_child(), ours.fileno()]
        spec = WorkerSpec(
            id=worker.id,
            generation=worker.generation,
            primary_pid=os.getpid(),
            listeners=tuple(lst.sock for lst in self.primary.listeners),
        )
        _flush_output()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns from worker_main
            worker_main(self.primary.config, spec, theirs, close, self.load)
        return pid, Channel(ours)

    def kill(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _call(component: Any, method: str, *args: Any) -> Any:
    fn = getattr(component, method, None)
    return fn(*args) if fn is not None else None


def _exit_code(status: int) -> int | None:
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else None
