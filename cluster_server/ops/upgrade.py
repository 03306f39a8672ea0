"""Upgrading cluster-server itself in place (SIGUSR2, or ``ctl upgrade``), without downtime.

``exec`` replaces a process, so the primary cannot simply re-execute itself:
its workers would become children of an image that knows nothing of them. So:

1. The old primary forks a child. The child clears ``FD_CLOEXEC`` on the
   listening sockets (``os.set_inheritable``; ``dup2(fd, fd)`` would not) and
   on its end of a channel to the old primary (a socket pair, used as a pipe:
   one byte goes over it), names them in ``CLUSTER_SERVER_INHERIT`` (JSON,
   with the pid it is meant for, like ``LISTEN_PID``), and ``execv``'s
   ``sys.executable`` with the original command line (``sys.orig_argv``): the
   new code, read from disk now.
2. The new primary serves on the inherited sockets (nothing is re-bound, so
   the listen queue is never closed), starts its workers and waits until all
   are ready. Then it takes over the control socket path (renamed over the
   old one), the metrics socket (inherited too) and the pidfile, and writes
   one byte on the pipe.
3. The old primary hears it, tells systemd ``MAINPID=<new pid>``, and stops
   gracefully: its workers drain (finishing in-flight requests) while the new
   workers accept from the same listening sockets. It exits 0.

If the new primary fails (cannot start, exits, closes the pipe, or is not
ready within ``--ready-timeout`` + 10 s), the old one logs why, stops the
child, and keeps serving; a later SIGUSR2 tries again.

The new primary is the old one's child until the old one exits; then it is
re-parented (to init, or to systemd). Under systemd, use ``NotifyAccess=main``
or ``all`` with ``Type=notify``: ``MAINPID=`` moves the main process along.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from cluster_server import _proc
from cluster_server.primary.component import Component, override
from cluster_server.primary.sockets import INHERIT_ENV, take_inherited

if TYPE_CHECKING:
    from cluster_server.ops.control import ControlServer
    from cluster_server.ops.metrics import MetricsServer
    from cluster_server.ops.status import ClusterWatch
    from cluster_server.ops.systemd import Notifier
    from cluster_server.primary.loop import Primary

logger = logging.getLogger("cluster_server")

#: the signal that asks the primary to upgrade itself
UPGRADE_SIGNAL = signal.SIGUSR2
#: extra seconds, beyond --ready-timeout, the new primary gets to say it is ready
EXTRA_READY_TIME = 10.0
#: a new primary that closed its pipe without saying it is ready gets this long to exit
PIPE_CLOSED_GRACE = 5.0


class PidFile(Component):
    """``--pidfile``: written by the primary (atomically), removed at exit if it still names us."""

    def __init__(self, path: str, *, defer: bool = False) -> None:
        self.path = path
        self.defer = defer
        self.written = False

    @override
    def attach(self, primary: Primary) -> None:
        if not self.defer:
            self.write()

    def write(self) -> None:
        from cluster_server._errors import ConfigError

        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="ascii") as fh:
                fh.write(f"{os.getpid()}\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            raise ConfigError(f"cannot write --pidfile {self.path}: {exc.strerror or exc}") from None
        self.written = True

    def release(self) -> None:
        """A successor owns the file now."""
        self.written = False

    @override
    def close(self) -> None:
        if not self.written:
            return
        try:
            with open(self.path, encoding="ascii") as fh:
                if fh.read().strip() != str(os.getpid()):
                    return
            os.unlink(self.path)
        except OSError:
            pass


class Upgrader(Component):
    """Both sides of an upgrade, as a primary component."""

    def __init__(
        self,
        watch: ClusterWatch,
        *,
        control: ControlServer | None = None,
        metrics: MetricsServer | None = None,
        notifier: Notifier | None = None,
        pidfile: PidFile | None = None,
    ) -> None:
        self.watch = watch
        self.control = control
        self.metrics = metrics
        self.notifier = notifier
        self.pidfile = pidfile
        self.primary: Primary | None = None
        # the old side: the child being started, the channel it answers on (one byte: "R")
        self.child_pid: int | None = None
        self.pipe: socket.socket | None = None
        self.deadline: float | None = None
        self.kill_at: float | None = None
        self.handed_over = False
        #: the child closed the pipe without a word: ``deadline`` is its grace to exit
        self._pipe_closed = False
        #: a failed new primary we asked to stop, SIGKILLed at ``kill_at`` if still there
        self._abandoned: int | None = None
        # the new side: the pipe to tell the predecessor on
        handed = take_inherited()
        self.ready_fd: int | None = int(handed["ready_fd"]) if handed and "ready_fd" in handed else None
        if self.ready_fd is not None:
            os.set_inheritable(self.ready_fd, False)
            watch.on("all_ready", self._announce)

    @property
    def successor(self) -> bool:
        """True in a new primary that has not yet told its predecessor it is ready."""
        return self.ready_fd is not None

    @override
    def attach(self, primary: Primary) -> None:
        self.primary = primary
        primary.on_signal(UPGRADE_SIGNAL, self, self.handle_usr2)
        if self.successor:
            logger.info("upgrade: new primary (pid %d) starting its workers", os.getpid())

    @override
    def close(self) -> None:
        self._close_pipe()
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None

    @override
    def fds_to_close_in_child(self) -> list[int]:
        return [fd for fd in (self.pipe.fileno() if self.pipe else None, self.ready_fd) if fd is not None]

    def handle_usr2(self) -> None:
        logger.info("SIGUSR2: %s", self.start())

    # -- the old primary ------------------------------------------------------

    def start(self) -> str:
        """Start an upgrade; returns what happened, in words."""
        p = self.primary
        assert p is not None
        if p.stopping:
            return "not upgrading: the server is stopping"
        if self.successor:
            return "not upgrading: this primary is itself an upgrade that is not ready yet"
        if self.child_pid is not None:
            return f"an upgrade is already in progress (new primary pid {self.child_pid})"
        if self.handed_over:
            return "not upgrading: this primary has already handed over to a new one"
        handed: dict[str, Any] = {
            "listeners": [
                {"fd": lst.sock.fileno(), "display": lst.display, "unlink": lst.unlink_path} for lst in p.listeners
            ],
            "generation": p.generation,
            # The new primary's counters go on from ours; our workers will exit "upgrade" once it is ready.
            "counters": self.watch.counters(upgrading=len(p.workers)),
        }
        if self.metrics is not None and self.metrics.sock:
            handed["metrics_fd"] = self.metrics.sock.fileno()
        # Every fd of ours is close-on-exec: the new primary keeps only those named in ``handed``.
        pid, pipe = p.start_child(functools.partial(_exec_successor, handed), self._child_exited, block_signals=False)
        pipe.setblocking(False)
        self.child_pid, self.pipe = pid, pipe
        self.deadline = p.clock() + p.config.ready_timeout + EXTRA_READY_TIME
        p.add_reader(pipe, self._on_pipe)
        logger.info("upgrade: started a new primary (pid %d) with the listening sockets; serving on meanwhile", pid)
        return f"upgrading: new primary is pid {pid}; this one (pid {os.getpid()}) leaves once it is ready"

    def _on_pipe(self, mask: int) -> None:
        assert self.pipe is not None
        try:
            data = self.pipe.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data.startswith(b"R"):
            self._succeeded()
            return
        # It closed the pipe without a word: it is exiting. Its exit status (and
        # its own error, logged before it) says more; wait a little for it.
        self._close_pipe()
        assert self.primary is not None
        self.deadline = self.primary.clock() + PIPE_CLOSED_GRACE
        self._pipe_closed = True

    def _child_exited(self, pid: int, status: int) -> None:
        if pid == self.child_pid:
            self._failed(f"exited ({_proc.describe_status(status)}) before it was ready", exited=True)
        else:
            logger.info("upgrade: abandoned new primary (pid %d) exited (%s)", pid, _proc.describe_status(status))

    def _succeeded(self) -> None:
        p = self.primary
        assert p is not None and self.child_pid is not None
        pid = self.child_pid
        self._close_pipe()
        self.child_pid = self.deadline = None
        self.handed_over = True
        p.forget_child(pid)
        logger.info(
            "upgrade: new primary (pid %d) has every worker ready; this primary (pid %d) drains its workers and exits",
            pid,
            os.getpid(),
        )
        p.release_socket_files()  # the new primary removes a Unix socket's file when it exits
        if self.control is not None:
            self.control.stop_listening()
        if self.metrics is not None:
            self.metrics.stop_listening()
        if self.pidfile is not None:
            self.pidfile.release()
        if self.notifier is not None:
            self.notifier.handed_over(pid)
        p.stop(graceful=True, why=f"upgraded: the primary is now pid {pid}", reason="upgrade")

    def _failed(self, why: str, exited: bool = False) -> None:
        p = self.primary
        assert p is not None
        pid = self.child_pid
        if pid is None:
            return
        self._close_pipe()
        self.child_pid = self.deadline = None
        self._pipe_closed = False
        logger.error("upgrade failed: the new primary (pid %d) %s; this primary keeps serving", pid, why)
        if exited:
            return
        try:
            os.kill(pid, signal.SIGTERM)  # if it is still there, it drains its workers and exits
        except ProcessLookupError:
            pass
        else:
            p.watch_child(pid, self._child_exited)
            self._abandoned, self.kill_at = pid, p.clock() + p.config.graceful_timeout + 5

    def _close_pipe(self) -> None:
        if self.pipe is not None:
            assert self.primary is not None  # (a pipe is made once attached)
            self.primary.close_reader(self.pipe)
            self.pipe = None

    @override
    def next_deadline(self) -> float | None:
        times = [t for t in (self.deadline, self.kill_at) if t is not None]
        return min(times) if times else None

    @override
    def tick(self) -> None:
        p = self.primary
        assert p is not None
        now = p.clock()
        if self.deadline is not None and now >= self.deadline:
            if self._pipe_closed:
                self._failed("closed its pipe before it was ready (see its log above)")
            else:
                self._failed(f"was not ready within {p.config.ready_timeout + EXTRA_READY_TIME:g} s")
        if self.kill_at is not None and now >= self.kill_at:
            self.kill_at = None
            if self._abandoned is not None and p.watches_child(self._abandoned):
                logger.warning("upgrade: abandoned new primary (pid %d) did not stop; SIGKILL", self._abandoned)
                try:
                    os.kill(self._abandoned, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # -- the new primary ------------------------------------------------------

    def _announce(self) -> None:
        """Every worker is ready: take over the control socket, metrics and pidfile, then tell the predecessor."""
        fd = self.ready_fd
        if fd is None:
            return
        self.ready_fd = None
        handed = take_inherited() or {}
        if self.primary is not None:  # ours to remove at exit now
            self.primary.adopt_socket_files(
                {item.get("fd"): item.get("unlink") for item in handed.get("listeners", [])}
            )
        if self.control is not None:
            try:
                self.control.activate(replace_live=True)
            except Exception as exc:  # serving matters more than the control socket
                logger.warning("upgrade: cannot take over the control socket: %s", exc)
        if self.metrics is not None:
            self.metrics.activate()
        if self.pidfile is not None:
            self.pidfile.write()
        try:
            os.write(fd, b"R")
        except OSError as exc:
            logger.warning("upgrade: could not tell the old primary we are ready (%s); it may be gone", exc)
        finally:
            os.close(fd)
        logger.info("upgrade: new primary (pid %d) ready; the old one drains and exits", os.getpid())


def _exec_successor(handed: dict[str, Any], sock: socket.socket, close: list[int]) -> NoReturn:
    """In the forked child: become the new primary, with the new code on disk. Never returns.

    The listening sockets, the metrics socket and our end of the channel (the
    new primary writes "R" on it once its workers are ready) survive the exec;
    every other fd is close-on-exec.
    """
    argv = [sys.executable, *sys.orig_argv[1:]]
    try:  # pragma: no cover - the child execs or exits
        signal.set_wakeup_fd(-1)
        for item in handed["listeners"]:
            os.set_inheritable(item["fd"], True)
        if handed.get("metrics_fd") is not None:
            os.set_inheritable(handed["metrics_fd"], True)
        os.set_inheritable(sock.fileno(), True)
        handed = {**handed, "pid": os.getpid(), "ready_fd": sock.fileno()}
        os.execve(argv[0], argv, {**os.environ, INHERIT_ENV: json.dumps(handed)})
    except BaseException as exc:
        try:
            os.write(2, f"cluster-server: upgrade: cannot execute {argv[0]}: {exc}\n".encode())
        except OSError:
            pass
    finally:
        os._exit(127)
