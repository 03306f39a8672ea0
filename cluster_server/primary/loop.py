"""The primary: one thread, no asyncio, never imports the app.

It owns the listening sockets and the worker table, and waits on one selector
over the signal self-pipe and the worker channels. Signal handlers only queue
the signal; the loop runs its handler (``handle_term``..., or one a component
asked for with ``on_signal``). Every wait has a deadline.

Decisions (spawn, reap, replace, back off, roll, drain, kill) are methods that
read the worker table; the fork/kill side effects go through a ``Launcher``,
so tests can drive the decisions with a fake launcher and a fake clock.
Components (``primary/component.py``) plug in through typed hooks.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from cluster_server import _proc
from cluster_server._config import Config
from cluster_server._errors import AppLoadError, BindError, ClusterServerError, ConfigError, WorkerBootError
from cluster_server._proc import ExitStatus, describe_status
from cluster_server._proc import close_all as _close_fds
from cluster_server.primary.component import MAX_FAILURES, Component, Sample, WorkerEvent
from cluster_server.primary.launcher import ForkLauncher, Launcher
from cluster_server.primary.sockets import Listener
from cluster_server.primary.state import WorkerState, check_transition, exit_state
from cluster_server.wire.channel import Channel, Message, receive_all
from cluster_server.wire.messages import BOOT_ERROR, HEARTBEAT, READY
from cluster_server.wire.spawn import ChildMain, fork_child
from cluster_server.worker.spec import DUMP_SIGNAL, EXIT_BOOT_FAILURE

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
#: the worker messages the primary handles itself; components get the others first
_OWN_MESSAGES = frozenset({HEARTBEAT, READY, BOOT_ERROR})
#: on exit, how long the primary waits for the workers it SIGKILLed, and how often it looks
SHUTDOWN_REAP = 5.0
REAP_POLL = 0.01
#: a roll whose reason starts with this was asked for by ``--reload`` (its old workers exit "reloaded")
RELOAD_PREFIX = "reload:"
#: finished rolls the primary remembers (``ctl status``, ``ctl reload --wait``)
ROLL_HISTORY = 32

_S = WorkerState
_P = ParamSpec("_P")
_T = TypeVar("_T")


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
    #: "bind", "privileges", "load" (import / factory / uvicorn config) or "lifespan", from the boot_error message
    boot_stage: str | None = None
    #: SIGKILL was sent: no further deadlines, just wait for the reap
    killed: bool = False
    #: draining: SIGKILL at this time; hung: SIGKILL after the stack dump
    kill_at: float | None = None
    #: why the primary is stopping it, as a metric label ("stopped", "hang", "rolled",
    #: "max_requests"...: ``ops/status.py`` lists them), None if it was not asked
    stop_reason: str | None = None
    exit_status: str = ""
    #: --reload: the app could not start, and the worker serves a 500 page saying why
    error_page: bool = False
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


class Primary:
    def __init__(
        self,
        config: Config,
        listeners: list[Listener],
        *,
        launcher: Launcher | None = None,
        components: Sequence[Component] = (),
        clock: Callable[[], float] = time.monotonic,
        generation: int = 1,
    ) -> None:
        """``components`` are attached in this order when ``run`` starts; a launcher that is a
        component (it needs the primary) is one of them, or is put first. ``generation``:
        the first one's number (an upgraded primary counts on from its predecessor's)."""
        self.config = config
        self.listeners = listeners
        self.clock = clock
        self.launcher: Launcher = launcher if launcher is not None else ForkLauncher()
        self.components: list[Component] = list(components)
        if isinstance(self.launcher, Component) and not any(c is self.launcher for c in self.components):
            self.components.insert(0, self.launcher)
        self.workers: dict[int, Worker] = {}  # pid -> live worker
        self.slots: dict[int, Slot] = {i: Slot(i, generation=generation) for i in range(1, config.workers + 1)}
        self.generation = generation
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
        self._child_exits: dict[int, Callable[[int, int], None]] = {}  # pid -> what to do when it is reaped
        self._failures: dict[int, int] = {}  # id(component) -> hooks of it that raised
        self._disabled: list[Component] = []  # essential components that failed: closed at exit
        self._signals: collections.deque[int] = collections.deque()
        #: what each signal does: the primary's own, and those components asked for (``on_signal``)
        self._signal_handlers: dict[int, tuple[Component | None, Callable[[], None]]] = {
            signal.SIGINT: (None, self.handle_int),
            signal.SIGTERM: (None, self.handle_term),
            signal.SIGQUIT: (None, self.handle_quit),
            signal.SIGHUP: (None, self.handle_hup),
            signal.SIGCHLD: (None, self.handle_chld),
            signal.SIGTTIN: (None, self.handle_ttin),
            signal.SIGTTOU: (None, self.handle_ttou),
        }
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
            for c in list(self.components):
                self._attach(c)
            logger.info(
                "primary listening on %s; starting %d worker%s",
                self.shown_listeners,
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

    @property
    def shown_listeners(self) -> str:
        """Where the cluster listens, as a user reads it (``http://127.0.0.1:8000``)."""
        return ", ".join(lst.display for lst in self.listeners)

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
            t = self._call(c, None, c.next_deadline)
            if t is not None:
                times.append(t)
        return min(times) if times else None

    def tick(self) -> None:
        """Act on every deadline that has passed."""
        self.murder_workers()
        self.manage_workers()
        self.advance_roll()
        for c in self.components:
            self._call(c, None, c.tick)

    def add_component(self, component: Component) -> None:
        """Plug ``component`` in (attached at once when the loop runs already)."""
        self.components.append(component)
        if self._selector is not None:
            self._attach(component)

    def emit(self, event: WorkerEvent, w: Worker) -> None:
        for c in self.components:
            self._call(c, None, c.worker_event, event, w)

    # -- components -----------------------------------------------------------

    def _attach(self, c: Component) -> None:
        try:
            c.attach(self)
        except ClusterServerError:
            raise  # a start-up error the user can fix (a --control-socket path in use...)
        except Exception:
            self._failed(c, c.attach, at_once=True)  # half attached, it would only fail on

    def _call(self, c: Component, default: _T, hook: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """``hook(*args)``, one of ``c``'s hooks; ``default`` if it raises (logged, counted)."""
        try:
            return hook(*args, **kwargs)
        except Exception:
            self._failed(c, hook)
            return default

    def _failed(self, c: Component, hook: Callable[..., Any], at_once: bool = False) -> None:
        """A hook of ``c`` raised (a bug): log it; disable ``c`` once it failed MAX_FAILURES times."""
        n = self._failures[id(c)] = self._failures.get(id(c), 0) + 1
        name = f"{type(c).__name__}.{getattr(hook, '__name__', '?')}"
        logger.exception("primary: %s raised (a bug; failure %d of %d before it is disabled)", name, n, MAX_FAILURES)
        if (at_once or n >= MAX_FAILURES) and any(x is c for x in self.components):
            self._disable(c, n)

    def _disable(self, c: Component, errors: int) -> None:
        """No more hooks for ``c``: it is closed, or, if the cluster cannot serve without it,
        kept until the exit while the workers drain."""
        self.components = [x for x in self.components if x is not c]
        name = type(c).__name__
        if not c.essential:
            logger.error("primary: %s disabled after %d error(s); serving on without it", name, errors)
            try:
                c.close()
            except Exception:
                logger.exception("primary: closing %s raised", name)
            return
        logger.critical("primary: %s failed (%d error(s)) and the cluster cannot serve without it", name, errors)
        self._disabled.append(c)
        self.exit_code = 1
        if not self.stopping:
            self.stop(graceful=True, why=f"{name} failed")

    def on_signal(self, sig: int, owner: Component, handler: Callable[[], None]) -> None:
        """Run ``handler`` (in the loop, not in the signal handler) when ``sig`` arrives."""
        self._signal_handlers[sig] = (owner, handler)
        if self._selector is not None:
            signal.signal(sig, self._queue_signal)

    def metrics_samples(self) -> list[Sample]:
        """Every component's extra metrics samples (``Component.metrics_samples``)."""
        samples: list[Sample] = []
        for c in self.components:
            samples += self._call(c, [], c.metrics_samples)
        return samples

    # -- what components may change ---------------------------------------------

    def start_child(
        self,
        main: ChildMain,
        on_exit: Callable[[int, int], None],
        close: Iterable[int] = (),
        *,
        block_signals: bool = True,
    ) -> tuple[int, socket.socket]:
        """Fork a component's child (a template, the reload watcher, an upgrade), joined by a
        channel: its pid and our end. It gets ``main(its end, fds to close)``: the primary's
        fds and ``close``. ``on_exit(pid, status)`` runs once it is reaped. Raises OSError.
        ``block_signals``: see ``fork_child`` (False for a child that ``exec``s)."""
        pid, ours = fork_child(main, [*self.fds_to_close_in_child(), *close], block_signals=block_signals)
        self.watch_child(pid, on_exit)
        return pid, ours

    def watch_child(self, pid: int, on_exit: Callable[[int, int], None]) -> None:
        """A child that is not a worker (a template, the watcher...): ``on_exit(pid, status)`` when reaped."""
        self._child_exits[pid] = on_exit

    def forget_child(self, pid: int) -> None:
        """Its owner reaps (or abandons) it now: no ``on_exit`` any more."""
        self._child_exits.pop(pid, None)

    def watches_child(self, pid: int) -> bool:
        return pid in self._child_exits

    def hold_slots(self) -> None:
        """The empty slots get no worker until ``release_slots`` (or a roll fills them)."""
        for slot in self.slots.values():
            if slot.pid is None and slot.replacement is None:
                slot.respawn_at = math.inf

    def release_slots(self) -> None:
        """The held slots fill now."""
        now = self.clock()
        for slot in self.slots.values():
            if slot.respawn_at == math.inf:
                slot.respawn_at = now
        self.manage_workers()

    def release_socket_files(self) -> None:
        """An upgrade's new primary removes the Unix socket files at its exit, not this one."""
        for lst in self.listeners:
            lst.unlink_path = None

    def adopt_socket_files(self, paths: dict[int, str | None]) -> None:
        """This (new) primary removes the Unix socket files at its exit: ``paths`` by listening fd."""
        for lst in self.listeners:
            lst.unlink_path = paths.get(lst.sock.fileno()) or lst.unlink_path

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

    def close_reader(self, fileobj: Channel | socket.socket) -> None:
        """Stop watching ``fileobj``, and close it."""
        self.remove_reader(fileobj)
        fileobj.close()

    # -- signals ------------------------------------------------------------

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in self._signal_handlers:
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
            owner, handler = self._signal_handlers[sig]
            if owner is None:
                handler()
            else:  # a signal a component asked for (SIGUSR2: upgrade)
                self._call(owner, None, handler)

    def handle_chld(self) -> None:
        pass  # reap_workers runs after every wake-up

    def handle_term(self) -> None:
        if not self.stopping and any(self._call(c, False, c.defer_stop, "SIGTERM") for c in self.components):
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
        self.stop(graceful=False, why="SIGQUIT")  # logs "stopping (SIGQUIT): killing N worker(s)"

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
        if pid in self._child_exits:
            self._child_exits.pop(pid)(pid, status)
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
            self.fail(boot_failure(w, status))  # the first generation cannot start: stop, and say why
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
        if mask & selectors.EVENT_READ and not receive_all(
            w.channel, functools.partial(self.handle_message, w), w.name
        ):
            self._forget_channel(w)

    def _watch(self, w: Worker) -> None:
        """Watch a worker's channel for writability only while it has queued messages."""
        if w.channel is not None and self._selector is not None and not w.channel.closed:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if w.channel.pending else 0)
            self.modify_reader(w.channel, events)

    def send(self, w: Worker, msg: Message, fds: list[int] | None = None) -> bool:
        """Send a message to a worker (fds are handed over). False if the worker is gone."""
        if w.channel is None:
            _close_fds(fds or [])
            return False
        try:
            if not w.channel.send(msg, fds or ()):
                self._watch(w)
        except OSError:  # gone, or closed already (the channel closed the fds)
            self._forget_channel(w)
            return False
        return True

    def _forget_channel(self, w: Worker) -> None:
        if w.channel is not None and not w.channel.closed:
            self.close_reader(w.channel)

    def handle_message(self, w: Worker, msg: Message, fds: list[int] | None = None) -> None:
        """React to one message from a worker; anything unexpected is logged and dropped."""
        kind = msg.get("t")
        if kind not in _OWN_MESSAGES:
            for comp in self.components:
                # A hook that raised may have closed the fds already: they count as taken.
                if self._call(comp, True, comp.worker_message, w, msg, fds or []):
                    return
        _close_fds(fds or [])
        if kind == HEARTBEAT:
            w.last_heartbeat = self.clock()
            r, c = msg.get("r"), msg.get("c")
            if isinstance(r, int) and isinstance(c, int):
                w.requests, w.connections = r, c
            w.report = msg.get("m")
        elif kind == READY:
            if w.state is _S.DRAINING:
                # Asked to stop while it booted (a scale-down, a stop): it stops all the same.
                logger.info("%s became ready after it was asked to stop (%s); it drains", w.name, w.stop_reason)
                return
            if w.state is not _S.BOOTING:
                logger.warning("%s said ready twice; ignored", w.name)
                return
            if w.exit_status:
                return  # read only after it was reaped (see child_exited): it serves nothing
            w.error_page = msg.get("error_page") is True
            self.worker_ready(w)
        elif kind == BOOT_ERROR:
            err = msg.get("error")
            w.boot_error = str(err)[:2000] if err is not None else "unknown error"
            stage = msg.get("stage")
            w.boot_stage = stage if isinstance(stage, str) else None
        else:
            logger.warning("%s sent an unknown message %.200r; ignored", w.name, msg)

    def worker_ready(self, w: Worker) -> None:
        slot = self.slots.get(w.id)
        if w.error_page and not self._error_page_wanted(slot, w):
            # The app serves in this slot: a broken change must not replace it. The worker
            # is stopped; its exit fails the roll with its boot_error, and the old one serves.
            w.stop_reason = "drain"
            self.launcher.kill(w.pid, signal.SIGTERM)
            return
        now = self.clock()
        w.move(_S.READY)
        w.ready_at = w.last_heartbeat = now
        if w.error_page:
            logger.debug("%s serves the error page", w.name)
        else:
            logger.info("%s ready in %.2f s", w.name, now - w.spawned_at)
        self.emit("ready", w)
        if slot is not None and slot.replacement == w.pid:
            self._roll_step_done(slot, w)
        if not self.ever_ready and all(
            s.pid is not None and self.workers[s.pid].state is _S.READY and not self.workers[s.pid].error_page
            for s in self.slots.values()
        ):
            self.ever_ready = True
            n, shown = len(self.slots), self.shown_listeners
            logger.info("all %d workers ready; serving %s (Press CTRL+C to quit)", n, shown)

    def _error_page_wanted(self, slot: Slot | None, w: Worker) -> bool:
        """May ``w``, serving the error page, take its slot? Only where the app serves in no
        worker of the slot: at the start, or in place of another error page."""
        if slot is None or slot.replacement != w.pid:
            return slot is not None and slot.pid == w.pid
        current = self.workers.get(slot.pid) if slot.pid is not None else None
        return current is None or current.error_page

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
            if not self._call(c, True, c.before_roll, reason, slots):
                return False
        self.generation += 1
        pending = sorted(self.slots) if slots is None else sorted(s for s in set(slots) if s in self.slots)
        kind = "reloaded" if reason.startswith(RELOAD_PREFIX) else "rolled"
        logger.info("rolling restart to generation %d (%s): %d worker(s)", self.generation, reason, len(pending))
        self._start_roll(Roll(self.generation, reason, pending, started_at=self.clock(), kind=kind, slots=pending[:]))
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
        logger.info("recycling worker %d (%s)", slot_id, reason)
        self._start_roll(
            Roll(slot.generation, reason, [slot_id], started_at=self.clock(), recycle=True, kind=kind, slots=[slot_id])
        )
        return True

    def _start_roll(self, roll: Roll) -> None:
        """Components hear of every roll (``roll_started``), even one over within this call."""
        self.roll_state = roll
        for c in self.components:
            self._call(c, None, c.roll_started, roll)
        self.advance_roll()

    def replace_now(self, slot_id: int, reason: str) -> bool:
        """Drain a slot's worker now and refill the slot at once, not replacement first.

        For a worker that must not wait for a roll or a recycle to run first (far
        over its memory limit): the slot serves nothing while its new worker
        boots. A replacement already booting for the slot (a roll's, a recycle's)
        is that new worker. False if the slot has no worker serving.
        """
        slot = self.slots.get(slot_id)
        w = self.workers.get(slot.pid) if slot is not None and slot.pid is not None else None
        if self.stopping or slot is None or w is None or w.state is not _S.READY:
            return False
        logger.warning("replacing %s at once: %s", w.name, reason)
        if slot.replacement is None:
            slot.pid = None
            slot.respawn_at = self.clock()
        self.drain_worker(w, "recycled")
        self.manage_workers()
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
        """The roll in progress is over: ``completed``, ``failed`` or ``aborted``. Remember how
        (``finished_rolls``), clear it, and tell the components (``roll_finished``)."""
        roll = self.roll_state
        if roll is None:
            return
        roll.outcome, roll.error, roll.ended_at = outcome, error, self.clock()
        self.finished_rolls.append(roll)
        self.rolls_ended += 1
        self.roll_state = None
        for c in self.components:
            self._call(c, None, c.roll_finished, roll, outcome)

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
        if not graceful:  # (also when a drain had begun: SIGQUIT during a SIGTERM drain)
            logger.warning("stopping (%s): killing %d worker(s)", why, len(self.workers))
        elif not self.stopping:
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
            if self._call(c, False, c.cannot_start, err):  # --reload waits for the fix instead
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
            self._reap_until(time.monotonic() + SHUTDOWN_REAP)
        for w in list(self.workers.values()):
            self._forget_channel(w)
        for c in [*self.components, *self._disabled]:
            self._call(c, None, c.close)
        signal.set_wakeup_fd(-1)
        for sig in self._signal_handlers:
            signal.signal(sig, signal.SIG_DFL)
        if self._selector is not None:
            self._selector.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        for lst in self.listeners:
            lst.close()

    def _reap_until(self, deadline: float) -> None:
        """Reap the SIGKILLed workers until none is left or ``deadline`` passed.

        Polled (WNOHANG): a blocking ``waitpid(-1)`` would wait for any child, and
        one that never exits (a worker stuck in uninterruptible sleep, a template
        or watcher still running) would keep the primary from ever exiting.
        """
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid:
                self.child_exited(pid, status)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                logger.error("%d worker(s) did not exit after SIGKILL; leaving them", len(self.workers))
                return
            time.sleep(min(REAP_POLL, left))

    def fds_to_close_in_child(self) -> list[int]:
        """The primary's own fds a new worker must not keep."""
        fds = [fd for fd in (self._wake_r, self._wake_w) if fd >= 0]
        if self._selector is not None and hasattr(self._selector, "fileno"):
            fds.append(self._selector.fileno())
        for w in self.workers.values():
            if w.channel and not w.channel.closed:  # its channel, and connections queued for it
                fds += [w.channel.fileno(), *w.channel.queued_fds()]
        for c in self.components:
            fds += self._call(c, [], c.fds_to_close_in_child)
        return fds


#: what a worker's boot error is, by the stage it failed at (worker/main.py BootStage)
_BOOT_ERRORS: dict[str | None, type[ClusterServerError]] = {
    "bind": BindError,  # its own SO_REUSEPORT socket: the machine's state (exit status 3, as uvicorn's)
    "privileges": ConfigError,  # --user/--group cannot be switched to (2)
    "lifespan": WorkerBootError,  # the app failed at start-up (3)
}


def boot_failure(w: Worker, status: int) -> ClusterServerError:
    """The error that stops a first generation whose worker ``w`` exited with ``status``."""
    if w.boot_error is None:
        return WorkerBootError(f"worker {w.id} exited ({w.exit_status}) before it was ready")
    if ExitStatus.of(status).code != EXIT_BOOT_FAILURE:
        return WorkerBootError(w.boot_error)  # it said why, then died of something else
    return _BOOT_ERRORS.get(w.boot_stage, AppLoadError)(w.boot_error)
