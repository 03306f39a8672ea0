"""The primary side of ``cluster_server.cluster``: forks workers, dispatches their events.

Events are dispatched by an asyncio event loop in the primary, the one that is
running when the primary uses the API (``cluster.run()`` starts one). Before a
loop runs, nothing is lost: workers' messages wait in their channels, and the
events due (``fork``...) are queued until the loop is attached, as Node emits
them on the next tick. Each worker has:

- its channel (``_channel.Channel``, non-blocking; the loop watches it);
- a pidfd (``os.pidfd_open``, Linux 5.3+) the loop watches for its exit, so no
  SIGCHLD handler is installed and no other child of the program is reaped; a
  timer polls ``waitpid(pid, WNOHANG)`` where pidfds are missing.

Nothing here is thread-safe: use the primary API from the loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import inspect
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, NoReturn

from cluster_server import _proc
from cluster_server._errors import ChannelError, DisconnectedError, IllegalTransition, RequestError
from cluster_server.cluster import child, handles
from cluster_server.cluster.rr import (
    POLICY_ENV,
    SCHED_RR,
    RoundRobinHandles,
    check_policy,
    default_policy,
    policy_name,
)
from cluster_server.cluster.state import ClusterWorkerState, check_transition
from cluster_server.cluster.worker import CHANNEL_FD_ENV, WORKER_ID_ENV, MainTarget, main_target, run_forked
from cluster_server.wire import advanced, messages
from cluster_server.wire import channel as _channel
from cluster_server.wire.channel import Channel, Message, receive_all
from cluster_server.wire.request import Answer, Pending, Replier
from cluster_server.wire.spawn import fork_child

logger = logging.getLogger("cluster_server.cluster")

START_METHODS = ("fork", "spawn")
#: what a spawned worker's interpreter runs first (``-c``; its arguments: where this
#: cluster_server was imported from, then the program and its arguments): import
#: cluster-server from the same place as the primary did, and hand over to
#: ``cluster/worker.py``'s ``spawned_main``, which links to the primary, then runs the program
SPAWN_BOOTSTRAP = (
    "import sys; r = sys.argv.pop(1); sys.path.insert(0, r); "
    "from cluster_server.cluster.worker import spawned_main; sys.path.remove(r); spawned_main()"
)
#: the directory cluster_server was imported from
_IMPORTED_FROM = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: the worker's message encoding ("json" or "advanced"), set by the primary for each worker
SERIALIZATION_ENV = advanced.ENV
#: the default start method, so one script runs unchanged under both
START_METHOD_ENV = "CLUSTER_SERVER_START_METHOD"
#: bytes queued for one worker that does not read (stopped, hung) before new messages
#: to it are dropped: the primary's memory stays bounded whatever a worker does
MAX_QUEUED_BYTES = 16 * 1024 * 1024
#: how often a worker's exit is polled for where pidfds are not available
POLL_EXIT = 0.05


@dataclass(frozen=True)
class Settings:
    """``cluster.settings``: how ``fork()`` starts a worker (see ``setup_primary``)."""

    #: the worker's script; None: re-run this program's own main (script or ``-m`` module)
    exec: str | None = None
    #: the worker's ``sys.argv[1:]``
    args: tuple[str, ...] = field(default_factory=lambda: tuple(sys.argv[1:]))
    #: interpreter options for a spawned worker (``-X dev``, ``-W error``...); default: the primary's
    exec_argv: tuple[str, ...] = field(default_factory=lambda: tuple(_interpreter_flags()))
    #: "fork" (default) or "spawn" (a fresh interpreter), like Node
    start_method: str = "fork"
    #: the worker's working directory; None: the primary's (``cluster/child.py``)
    cwd: str | None = None
    #: stdin, stdout and stderr are pipes to the primary (``worker.stdout``...), not the primary's
    silent: bool = False
    #: (stdin, stdout, stderr): "inherit", "pipe", "ignore", an fd or a file; overrides ``silent``
    stdio: tuple[Any, ...] | None = None
    #: the worker's user and group ids; None: the primary's
    uid: int | None = None
    gid: int | None = None
    #: "json" (default) or "advanced" (``wire/advanced.py``: bytes, sets, tuples, dates, Decimal...)
    serialization: str = "json"


def _interpreter_flags() -> list[str]:
    try:
        flags: list[str] = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
    except Exception:
        flags = []
    return flags


def default_start_method() -> str:
    method = os.environ.get(START_METHOD_ENV, "fork")
    if method not in START_METHODS:
        raise ValueError(f"{START_METHOD_ENV}={method!r}: expected one of {', '.join(START_METHODS)}")
    return method


class Emitter:
    """Node-style events: ``on(event, fn)``, ``once``, ``off``; async listeners become tasks."""

    EVENTS: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._listeners: dict[str, list[tuple[Callable[..., Any], bool]]] = {}

    def on(self, event: str, fn: Callable[..., Any] | None = None) -> Any:
        """Call ``fn`` on every ``event``; without ``fn``, a decorator."""
        return self._add(event, fn, once=False)

    def once(self, event: str, fn: Callable[..., Any] | None = None) -> Any:
        return self._add(event, fn, once=True)

    def off(self, event: str, fn: Callable[..., Any]) -> None:
        self._listeners[event] = [(f, o) for f, o in self._listeners.get(event, []) if f is not fn]

    def _add(self, event: str, fn: Callable[..., Any] | None, once: bool) -> Any:
        if event not in self.EVENTS:
            raise ValueError(f"unknown event {event!r}; expected one of {', '.join(self.EVENTS)}")
        if fn is None:
            return lambda f: self._add(event, f, once)
        if not callable(fn):
            raise TypeError(f"expected a function, got {fn!r}")
        self._listeners.setdefault(event, []).append((fn, once))
        return fn

    def emit(self, event: str, *args: Any, handle: socket.socket | None = None) -> bool:
        """Call the listeners; ``handle`` (a message's) goes to those that take one more
        argument (``cluster/handles.py``). True when one of them got it."""
        listeners = self._listeners.get(event)
        if not listeners:
            return False
        took = False
        for fn, once in list(listeners):
            if once:
                self.off(event, fn)
            call = handles.call_args(fn, args, handle)
            took = took or len(call) > len(args)
            try:
                result = fn(*call)
            except Exception:
                logger.exception("%r listener %r raised", event, fn)
                continue
            if inspect.isawaitable(result):
                _spawn(result, f"{event!r} listener {fn!r}")
        return took


_tasks: set[asyncio.Future[Any]] = set()


def _spawn(aw: Awaitable[Any], what: str) -> None:
    task = asyncio.ensure_future(aw)
    _tasks.add(task)

    def done(t: asyncio.Future[Any]) -> None:
        _tasks.discard(t)
        if not t.cancelled() and (exc := t.exception()) is not None:
            logger.error("%s raised", what, exc_info=exc)

    task.add_done_callback(done)


class Worker(Emitter):
    """A worker, as the primary sees it (Node's ``Worker``)."""

    EVENTS = ("online", "listening", "message", "disconnect", "exit")

    def __init__(
        self,
        primary: ClusterPrimary,
        worker_id: int,
        pid: int,
        channel: Channel,
        process: subprocess.Popen[bytes] | None,
    ) -> None:
        super().__init__()
        #: unique in this primary, from 1, never reused (Node's ``worker.id``)
        self.id = worker_id
        self.pid = pid
        #: the ``subprocess.Popen`` of a spawned worker; None for a forked one
        self.process = process
        #: the primary's ends of its stdio pipes (``silent``, ``stdio``): write to stdin, read
        #: stdout and stderr to the end, then close them; None where the stream is not a pipe
        self.stdin: IO[bytes] | None = None
        self.stdout: IO[bytes] | None = None
        self.stderr: IO[bytes] | None = None
        #: how its messages are encoded: "json" or "advanced" (``settings.serialization`` at its fork)
        self.serialization = "json"
        #: True once ``disconnect()`` or ``kill()`` was called (or the worker disconnected itself)
        self.exited_after_disconnect = False
        #: Node's states, "none", "online", "listening", "disconnected", "dead" (``cluster/state.py``)
        self.state = ClusterWorkerState.NONE
        #: after the exit: its exit code (None if killed by a signal) and the signal
        self.exit_code: int | None = None
        self.signal_code: signal.Signals | None = None
        self._primary = primary
        self._channel: Channel | None = channel
        self._pidfd = -1
        self._dead = False
        #: the primary's requests to this worker, waiting for their answers
        self._requests: Pending[asyncio.Future[Answer]] = Pending()
        self._replier = Replier(functools.partial(primary.send, self), "the primary")
        self._queue_full_warned = False
        self._poll: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<Worker id={self.id} pid={self.pid} state={self.state}>"

    def send(self, data: Any, handle: socket.socket | None = None, *, keep_open: bool = False) -> bool:
        """Send a message (JSON-compatible data). False if the worker is disconnected: dropped.

        ``handle``: a socket sent along (Node's ``sendHandle``, ``cluster/handles.py``); once
        sent, a connection is closed here unless ``keep_open``.
        """
        if handle is None:
            return self._primary.send(self, {"t": messages.MSG, "data": data})
        fd = os.dup(handles.fd_of(handle))
        sent = self._primary.send(self, {"t": messages.MSG, "data": data, "handle": handles.SOCKET}, [fd])
        if sent:
            handles.close_after_send(handle, keep_open)
        return sent

    async def request(self, data: Any, timeout: float | None = 5.0) -> Any:
        """Send a request; return the worker's ``on_request`` handler's answer."""
        return await self._primary.request(self, data, timeout)

    def disconnect(self) -> None:
        """Ask the worker to close its servers and its channel, then exit (graceful)."""
        self.exited_after_disconnect = True
        self._primary.send(self, {"t": messages.DISCONNECT})

    def kill(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to the worker and close its channel."""
        self.exited_after_disconnect = True
        if not self._dead:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
        self._primary.call_soon(self._primary.close_channel, self)

    def is_connected(self) -> bool:
        return self._channel is not None and not self._channel.closed

    def _move(self, new: ClusterWorkerState) -> None:
        self.state = check_transition(self.state, new)

    def is_dead(self) -> bool:
        return self._dead


class ClusterPrimary(Emitter):
    """``cluster`` in the primary: the worker table, fork, events, shared handles."""

    EVENTS = ("fork", "online", "listening", "message", "disconnect", "exit", "setup")

    def __init__(self) -> None:
        super().__init__()
        self.settings = Settings(start_method=default_start_method())
        self.workers: dict[int, Worker] = {}
        self._live: dict[int, Worker] = {}  # not yet exited, by id
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._soon: list[Callable[[], object]] = []
        self._changed: asyncio.Event | None = None
        self._handles: dict[tuple[Any, ...], socket.socket] = {}
        self._unlink: list[str] = []
        self._request_handler: Callable[[Worker, Any], Any] | None = None
        #: Node's cluster.schedulingPolicy, frozen by the first fork() or setup_primary()
        self.policy: int | None = None
        self._policy_warned = False
        self._rr = RoundRobinHandles(self.send, self.workers)

    # -- the loop -------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop | None = None) -> asyncio.AbstractEventLoop:
        """Dispatch on ``loop`` (default: the running one) from now on."""
        loop = loop or asyncio.get_running_loop()
        if self._loop is loop:
            return loop
        old, self._loop = self._loop, loop
        self._changed = asyncio.Event()
        for w in self._live.values():
            if old is not None and not old.is_closed():
                self._unwatch(w, old)
            self._watch(w)
        soon, self._soon = self._soon, []
        for cb in soon:
            loop.call_soon(cb)
        return loop

    def _running_loop(self) -> asyncio.AbstractEventLoop | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        return self.attach(loop)

    def call_soon(self, cb: Callable[..., object], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon(cb, *args)
        else:
            self._soon.append(functools.partial(cb, *args))

    def _watch(self, w: Worker) -> None:
        loop = self._loop
        if loop is None:
            return
        ch = w._channel
        if ch is not None and not ch.closed:
            loop.add_reader(ch.fileno(), self._on_readable, w)
            if ch.pending:
                loop.add_writer(ch.fileno(), self._flush, w)
        if w._pidfd >= 0:
            loop.add_reader(w._pidfd, self._check_exit, w)
        else:
            w._poll = loop.call_later(POLL_EXIT, self._poll_exit, w)
        loop.call_soon(self._check_exit, w)  # it may have exited before the loop ran

    def _unwatch(self, w: Worker, loop: asyncio.AbstractEventLoop) -> None:
        ch = w._channel
        if ch is not None and not ch.closed:
            loop.remove_reader(ch.fileno())
            loop.remove_writer(ch.fileno())
        if w._pidfd >= 0:
            loop.remove_reader(w._pidfd)
        if w._poll is not None:
            w._poll.cancel()
            w._poll = None

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def wait(self) -> None:
        """Until every worker has exited."""
        self.attach()
        while self._live:
            assert self._changed is not None
            self._changed.clear()
            await self._changed.wait()

    async def serve(self, main: Callable[[], Awaitable[Any]] | Awaitable[Any] | None, grace: float) -> Any:
        """``cluster.run()``: run ``main``, then serve until every worker exited.

        The first SIGINT or SIGTERM stops it gracefully (``stop``); a second one
        SIGKILLs the workers at once.
        """
        loop = self.attach()
        stop = asyncio.Event()

        def on_signal() -> None:
            if stop.is_set():
                logger.warning("second signal: killing every worker")
                for w in list(self._live.values()):
                    w.kill(signal.SIGKILL)
            stop.set()

        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, on_signal)
                installed.append(sig)
            except (ValueError, RuntimeError):  # not the main thread
                pass
        result: Any = None
        try:
            if main is not None:
                main_task = asyncio.ensure_future(main() if callable(main) else main)
                await _first(main_task, stop.wait())
                if main_task.done():
                    result = main_task.result()
                else:
                    main_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await main_task
            await _first(self.wait(), stop.wait())
            await self.stop(grace)
        finally:
            if self._live:  # main raised, or we were cancelled
                for w in list(self._live.values()):
                    w.kill(signal.SIGKILL)
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(self.wait(), 5.0)
            for sig in installed:
                loop.remove_signal_handler(sig)
            self.close_handles()
        return result

    async def stop(self, grace: float) -> None:
        """Disconnect every live worker; SIGKILL the ones still there after ``grace`` s."""
        if not self._live:
            return
        logger.info("stopping %d worker(s)", len(self._live))
        for w in list(self._live.values()):
            if w.is_connected():
                w.disconnect()
            else:
                w.kill(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.wait(), grace)
        except TimeoutError:
            for w in list(self._live.values()):
                logger.warning("worker %d [pid %d] did not exit within %g s; sending SIGKILL", w.id, w.pid, grace)
                w.kill(signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wait(), 5.0)

    # -- forking ----------------------------------------------------------------------

    def freeze_policy(self, policy: Any) -> int:
        """Node freezes ``cluster.schedulingPolicy`` at the first ``fork()`` or ``setupPrimary()``."""
        if self.policy is None:
            self.policy = check_policy(policy)
        elif policy != self.policy and not self._policy_warned:
            self._policy_warned = True
            logger.warning(
                "cluster.scheduling_policy changed to %r after the first fork() or setup_primary(): "
                "ignored, as in Node (it stays %s)",
                policy,
                policy_name(self.policy).upper(),
            )
        return self.policy

    def frozen_policy(self) -> int:
        return self.policy if self.policy is not None else default_policy()

    def setup(self, settings: Settings) -> None:
        if settings.start_method not in START_METHODS:
            raise ValueError(f"start_method={settings.start_method!r}: expected one of {', '.join(START_METHODS)}")
        if settings.serialization not in advanced.MODES:
            raise ValueError(f"serialization={settings.serialization!r}: expected 'json' or 'advanced'")
        child.stdio_plan(settings.silent, settings.stdio)  # ValueError now, not at fork()
        self.settings = settings
        self.call_soon(self.emit, "setup", settings)

    def fork(self, env: dict[str, str] | None = None) -> Worker:
        self._running_loop()
        settings = self.settings
        child.check(settings.cwd, settings.uid, settings.gid)
        plan = child.stdio_plan(settings.silent, settings.stdio)
        policy = policy_name(self.freeze_policy(self.frozen_policy()))
        env = {**(env or {}), POLICY_ENV: policy, SERIALIZATION_ENV: settings.serialization}
        target: MainTarget = ("path", os.path.abspath(settings.exec)) if settings.exec else main_target()
        worker_id = next(self._ids)
        process: subprocess.Popen[bytes] | None = None
        if settings.start_method == "fork":
            stdio = child.open_for_fork(plan)
            main = functools.partial(self._forked, worker_id, os.getpid(), env, target, settings, stdio)
            try:
                pid, ours = fork_child(main)
            except BaseException:
                child.close_in_primary(stdio, failed=True)
                raise
            child.close_in_primary(stdio)
            files = stdio.files()
        else:
            ours, theirs = _channel.pair()
            try:
                process = self._spawn(worker_id, theirs, env, target, settings, plan)
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            pid = process.pid
            files = (process.stdin, process.stdout, process.stderr)
        w = Worker(self, worker_id, pid, Channel(ours), process)
        w.stdin, w.stdout, w.stderr = files
        w.serialization = settings.serialization
        try:
            w._pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            w._pidfd = -1
        self.workers[worker_id] = w
        self._live[worker_id] = w
        self._watch(w)
        self.call_soon(self.emit, "fork", w)
        return w

    def _forked(
        self,
        worker_id: int,
        primary_pid: int,
        env: dict[str, str],
        target: MainTarget,
        settings: Settings,
        stdio: child.ForkedStdio,
        sock: socket.socket,
        close: list[int],
    ) -> NoReturn:  # pragma: no cover - in the forked worker
        try:
            _proc.close_all(close)  # our end of its channel
            self.close_in_child()
            child.apply_in_child(stdio, settings.cwd, settings.uid, settings.gid)
        finally:
            run_forked(worker_id, sock, primary_pid, env, target, settings.args)

    def _spawn(
        self,
        worker_id: int,
        theirs: socket.socket,
        env: dict[str, str],
        target: MainTarget,
        settings: Settings,
        plan: tuple[Any, Any, Any],
    ) -> subprocess.Popen[bytes]:
        kind, name = target
        argv = [sys.executable, *settings.exec_argv, "-c", SPAWN_BOOTSTRAP, _IMPORTED_FROM, kind, name, *settings.args]
        fd = theirs.fileno()
        child_env = {**os.environ, **env, WORKER_ID_ENV: str(worker_id), CHANNEL_FD_ENV: str(fd)}
        options = child.popen_options(plan, settings.cwd, settings.uid, settings.gid)
        return subprocess.Popen(argv, env=child_env, pass_fds=(fd,), **options)

    def close_in_child(self) -> None:
        """In a freshly forked worker: drop every fd of the primary (never its loop)."""
        for w in self.workers.values():
            _detach_stdio(w)
            if w._channel is not None:
                w._channel.close()
            if w._pidfd >= 0:
                with contextlib.suppress(OSError):
                    os.close(w._pidfd)
                w._pidfd = -1
            if w.process is not None:
                w.process.returncode = 0  # not ours to wait for
        for sock in self._handles.values():
            sock.close()
        self._handles.clear()
        self._unlink.clear()
        # connections the round-robin handles hold (never their loop's readers: the parent's)
        _proc.close_all(self._rr.fds_to_close_in_child())
        self._rr = RoundRobinHandles(self.send, self.workers)

    # -- exits and disconnects ------------------------------------------------------------

    def _poll_exit(self, w: Worker) -> None:
        w._poll = None
        self._check_exit(w)
        if not w._dead and self._loop is not None:
            w._poll = self._loop.call_later(POLL_EXIT, self._poll_exit, w)

    def _check_exit(self, w: Worker) -> None:
        if w._dead:
            return
        try:
            pid, status = os.waitpid(w.pid, os.WNOHANG)
        except ChildProcessError:  # reaped by someone else: its status is lost
            pid, status = w.pid, -1
        if pid == 0:
            return
        self._exited(w, status)

    def _exited(self, w: Worker, status: int) -> None:
        w._dead = True
        loop = self._loop
        if w._pidfd >= 0:
            if loop is not None:
                loop.remove_reader(w._pidfd)
            os.close(w._pidfd)
            w._pidfd = -1
        if w._poll is not None:
            w._poll.cancel()
            w._poll = None
        # What it said before it died comes first, then 'disconnect', then 'exit'.
        if w.is_connected():
            self._on_readable(w)
            self.close_channel(w)
        st = _proc.ExitStatus.of(status) if status != -1 else None  # -1: its status is lost
        code = st.code if st is not None else None
        # (a signal Python has no name for is reported as none, as Node does)
        sig = st.signal if st is not None and isinstance(st.signal, signal.Signals) else None
        w.exit_code, w.signal_code = code, sig
        if w.process is not None:
            w.process.returncode = code if sig is None else -int(sig)
        w._move(ClusterWorkerState.DEAD)
        self._live.pop(w.id, None)
        self._rr.exited(w)
        w.emit("exit", code, sig)
        self.emit("exit", w, code, sig)
        self._forget(w)
        self._notify()

    def close_channel(self, w: Worker) -> None:
        ch = w._channel
        if ch is None or ch.closed:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(ch.fileno())
            self._loop.remove_writer(ch.fileno())
        ch.close()
        if w.state is not ClusterWorkerState.DEAD:  # (Node: 'disconnected' in the listeners, even if it died)
            w._move(ClusterWorkerState.DISCONNECTED)
        w._requests.close(lambda: DisconnectedError(f"worker {w.id} disconnected before it answered"))
        self._rr.disconnected(w)
        w.emit("disconnect")
        self.emit("disconnect", w)
        self._forget(w)

    def disconnect_all(self, callback: Callable[[], Any] | None = None) -> None:
        """``cluster.disconnect([callback])``: disconnect every worker; ``callback`` once all are
        (on the next tick when none is connected), as Node's."""
        connected = [w for w in self.workers.values() if w.is_connected()]
        for w in connected:
            w.disconnect()
        if callback is None:
            return
        left = {w.id for w in connected}

        def gone(w: Worker) -> None:
            left.discard(w.id)
            if not left:
                self.off("disconnect", gone)
                result = callback()
                if inspect.isawaitable(result):
                    _spawn(result, f"cluster.disconnect() callback {callback!r}")

        if left:
            self.on("disconnect", gone)
        else:
            self.call_soon(callback)

    def _forget(self, w: Worker) -> None:
        """Node removes a worker from ``cluster.workers`` once it has disconnected and exited."""
        if w._dead and not w.is_connected():
            self.workers.pop(w.id, None)

    # -- messages -------------------------------------------------------------------------

    def send(self, w: Worker, msg: Message, fds: Sequence[int] = ()) -> bool:
        """Send to a worker (fds are handed over). False if it is disconnected or not reading."""
        ch = w._channel
        if ch is None or ch.closed:
            _proc.close_all(fds)
            return False
        if ch.pending_bytes >= MAX_QUEUED_BYTES:
            _proc.close_all(fds)
            if not w._queue_full_warned:
                w._queue_full_warned = True
                logger.warning(
                    "worker %d [pid %d] reads no messages: %d bytes queued for it; dropping new ones until it reads",
                    w.id,
                    w.pid,
                    ch.pending_bytes,
                )
            return False
        try:
            payload = advanced.pack(msg) if w.serialization == "advanced" else msg
        except (TypeError, ValueError, ChannelError):
            _proc.close_all(fds)  # could not be encoded: nothing was taken
            raise
        try:
            sent = ch.send(payload, fds)  # (the channel closes the fds if it raises)
        except OSError:
            # Gone (mid-broadcast, say): it reads as a disconnect, on the next tick.
            self.call_soon(self.close_channel, w)
            return False
        if not sent and self._loop is not None:
            self._loop.add_writer(ch.fileno(), self._flush, w)
        return True

    def _flush(self, w: Worker) -> None:
        ch = w._channel
        if ch is None or ch.closed:
            return
        try:
            done = ch.flush()
        except OSError:
            self.close_channel(w)
            return
        if done and self._loop is not None:
            self._loop.remove_writer(ch.fileno())
            w._queue_full_warned = False

    def broadcast(self, data: Any, exclude: Worker | None = None) -> int:
        """Send to every connected worker; returns how many it was sent to."""
        msg = {"t": messages.MSG, "data": data}
        targets = [w for w in list(self.workers.values()) if w is not exclude]
        for mode in {w.serialization for w in targets}:  # fail here, once, if it cannot be sent
            _channel.encode(advanced.pack(msg) if mode == "advanced" else msg)
        return sum(self.send(w, msg) for w in targets)

    def _on_readable(self, w: Worker) -> None:
        ch = w._channel
        if ch is None or ch.closed:
            return
        if not receive_all(ch, functools.partial(self._dispatch, w), f"worker {w.id} [pid {w.pid}]"):
            self.close_channel(w)

    def _dispatch(self, w: Worker, msg: Message, fds: list[int]) -> None:
        try:
            try:
                msg = advanced.unpack(msg)
            except ValueError as exc:
                _proc.close_all(fds)
                logger.warning("worker %d [pid %d]: dropped a message: %s", w.id, w.pid, exc)
                return
            self._handle(w, msg, fds)
        except Exception:  # a listener's bug: the next message is still read
            logger.exception("worker %d [pid %d]: handling %.200r raised", w.id, w.pid, msg)

    def _handle(self, w: Worker, msg: Message, fds: list[int]) -> None:
        kind = msg.get("t")
        if kind == messages.ACK:
            self._rr.ack(w, msg, fds)
            return
        if kind == messages.MSG:
            self._message(w, msg, fds)
            return
        _proc.close_all(fds)  # a worker's other messages carry no fds
        if kind == messages.RES:
            if not w._requests.resolve(msg, []):
                logger.debug("worker %d: an answer nobody waits for (late?) %.200r", w.id, msg)
        elif kind == messages.ONLINE:
            if self._worker_moves(w, ClusterWorkerState.ONLINE):
                w.emit("online")
                self.emit("online", w)
        elif kind == messages.LISTEN:
            self._listen(w, msg)
        elif kind == messages.LISTENING:
            addr = _address(msg.get("addr"))
            if self._worker_moves(w, ClusterWorkerState.LISTENING):
                w.emit("listening", addr)
                self.emit("listening", w, addr)
        elif kind == messages.REQ:
            self._answer(w, msg)
        elif kind == messages.BCAST:
            data = msg.get("data")
            self.broadcast(data, exclude=None if msg.get("self") else w)
        elif kind == messages.DISCONNECTING:
            w.exited_after_disconnect = True
        else:
            logger.warning("worker %d [pid %d] sent an unknown message %.200r; ignored", w.id, w.pid, msg)

    def _message(self, w: Worker, msg: Message, fds: list[int]) -> None:
        """The ``message`` events; a handle that came with it goes to the listeners that take it."""
        data = msg.get("data")
        handle = handles.adopt(msg, fds, f"worker {w.id} [pid {w.pid}]")
        took = w.emit("message", data, handle=handle)
        took = self.emit("message", w, data, handle=handle) or took
        if handle is not None and not took:
            handle.close()  # nobody takes it: never leaked

    def _worker_moves(self, w: Worker, new: ClusterWorkerState) -> bool:
        """A worker's message moves it to ``new``: False (logged, ignored) where the table has no such move."""
        try:
            w._move(new)
        except IllegalTransition:
            logger.warning("worker %d [pid %d] said %s while %s; ignored", w.id, w.pid, new.value, w.state.value)
            return False
        return True

    # -- requests -------------------------------------------------------------------------

    async def request(self, w: Worker, data: Any, timeout: float | None) -> Any:
        loop = self.attach()
        fut: asyncio.Future[Answer] = loop.create_future()
        rid = w._requests.add(fut)
        if rid is None:
            raise DisconnectedError(f"worker {w.id} is disconnected")
        try:
            if not self.send(w, {"t": messages.REQ, "id": rid, "data": data}):
                if w.is_connected():
                    raise RequestError(f"worker {w.id} reads no messages (its queue is full); request not sent")
                raise DisconnectedError(f"worker {w.id} is disconnected")
            value, _fds = await asyncio.wait_for(fut, timeout)  # (a worker's answers carry no fds)
            return value
        except TimeoutError:
            raise TimeoutError(f"worker {w.id} did not answer within {timeout} s") from None
        finally:
            w._requests.discard(rid)

    def on_request(self, fn: Callable[[Worker, Any], Any] | None) -> None:
        if fn is not None and not callable(fn):
            raise TypeError(f"expected a function, got {fn!r}")
        self._request_handler = fn

    def _answer(self, w: Worker, msg: Message) -> None:
        rid = msg.get("id")
        if not isinstance(rid, int):
            logger.warning("worker %d sent a request without an id %.200r; ignored", w.id, msg)
            return
        handler = self._request_handler
        if handler is None:
            w._replier.refuse(rid, "the primary has no request handler (cluster.on_request)")
            return
        w._replier.call(rid, functools.partial(handler, w), msg.get("data"), _run_answer)

    # -- shared handles ---------------------------------------------------------------------

    def handle_for(self, addr: Any, backlog: int = 511, index: int = 0, dgram: bool = False) -> socket.socket:
        """The listening socket at ``addr``, bound the first time it is asked for.

        ``index``: for port 0, a worker's second ``listen`` of the same host gets
        another socket (another random port), shared with every other worker's
        second one, as Node's ``index`` in its handle key. ``dgram``: a UDP (or
        Unix datagram) socket, always shared, as Node shares its dgram sockets.
        """
        key = _handle_key(addr, index, dgram)
        sock = self._handles.get(key)
        if sock is not None:
            return sock
        sock = _bind(key, backlog)
        if key[0] in ("unix", "unixdgram"):
            self._unlink.append(key[1])
        else:  # a later listen on the port it got (port 0: random) is a listen on the same socket
            self._handles.setdefault((key[0], key[1], sock.getsockname()[1]), sock)
        self._handles[key] = sock
        return sock

    def _listen(self, w: Worker, msg: Message) -> None:
        """A worker's ``cluster.listen()``: bind once; share the socket (SCHED_NONE), or add the
        worker to the address's round-robin handle (SCHED_RR, ``cluster/rr.py``)."""
        rid = msg.get("id")
        if not isinstance(rid, int):
            logger.warning("worker %d sent a listen request without an id %.200r; ignored", w.id, msg)
            return
        addr, backlog, index = msg.get("addr"), msg.get("backlog"), msg.get("index", 0)
        dgram = msg.get("type") == "dgram"
        try:
            backlog = backlog if isinstance(backlog, int) and backlog > 0 else 511
            sock = self.handle_for(addr, backlog, index if isinstance(index, int) else 0, dgram)
        except (OSError, ValueError) as exc:
            code = errno.errorcode.get(getattr(exc, "errno", None) or 0)  # EADDRINUSE, as Node's err.code
            why = f"{code} {exc}" if code else str(exc)
            w._replier.refuse(rid, f"the primary cannot listen on {addr!r}: {why}", kind="bind")
            return
        name = sock.getsockname()
        name = list(name) if isinstance(name, tuple) else name
        lid = msg.get("h")
        if self.frozen_policy() == SCHED_RR and not dgram and isinstance(lid, int) and not isinstance(lid, bool):
            try:
                self._rr.add(w, sock, lid)
            except ValueError as exc:
                w._replier.refuse(rid, f"the primary cannot listen on {addr!r}: {exc}", kind="bind")
                return
            w._replier.answer(rid, {"addr": name, "rr": True})
            return
        w._replier.answer(rid, name, [os.dup(sock.fileno())])

    def close_handles(self) -> None:
        self._rr.close()
        for sock in set(self._handles.values()):
            sock.close()
        self._handles.clear()
        for path in self._unlink:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._unlink.clear()


def _detach_stdio(w: Worker) -> None:
    """In a forked worker, another worker's stdio pipes (the primary's ends) point at
    /dev/null instead: its stdin must see EOF when the primary closes it, and the file
    objects, never used here, may still close their fd (a buffered one writes nowhere)."""
    for f in (w.stdin, w.stdout, w.stderr):
        if f is not None and not f.closed:
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, f.fileno(), inheritable=False)
            os.close(null)


def _handle_key(addr: Any, index: int = 0, dgram: bool = False) -> tuple[Any, ...]:
    """``("unix", path)`` or ``("tcp", host, port[, index])`` (``unixdgram``, ``udp`` for
    datagram sockets): one listening socket per key."""
    if isinstance(addr, str):
        return ("unixdgram" if dgram else "unix", addr)
    if isinstance(addr, list | tuple) and len(addr) == 2 and isinstance(addr[1], int):
        kind = "udp" if dgram else "tcp"
        if addr[1] == 0 and index:
            return (kind, str(addr[0]), 0, index)
        return (kind, str(addr[0]), addr[1])
    raise ValueError(f"not an address: {addr!r}; expected (host, port) or a Unix socket path")


def _bind(key: tuple[Any, ...], backlog: int) -> socket.socket:
    """A socket bound (and listening, for a stream) as ``key`` says."""
    if key[0] == "tcp":
        family = socket.AF_INET6 if ":" in key[1] else socket.AF_INET
        return socket.create_server((key[1], key[2]), family=family, backlog=backlog)
    if key[0] == "udp":
        sock = socket.socket(socket.AF_INET6 if ":" in key[1] else socket.AF_INET, socket.SOCK_DGRAM)
        address: Any = (key[1], key[2])
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM if key[0] == "unixdgram" else socket.SOCK_STREAM)
        address = key[1]
    try:
        sock.bind(address)
        if key[0] == "unix":
            sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


async def _first(*aws: Awaitable[Any]) -> None:
    """Wait until the first of ``aws`` is done; cancel the others."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()


def _address(addr: Any) -> Any:
    """A listening address as Python shows it: ``(host, port)``, or a Unix socket path."""
    if isinstance(addr, list):
        return tuple(addr)
    return addr


def _run_answer(aw: Awaitable[Any]) -> asyncio.Future[Any]:
    """Run an async request handler's answer as a task (kept referenced until it is done)."""
    task = asyncio.ensure_future(aw)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return task
