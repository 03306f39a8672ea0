"""Small process-level helpers: titles, parent-death signal, fork hygiene, exit statuses."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import random
import signal
import sys
from collections.abc import Iterable
from typing import NamedTuple

from setproctitle import setproctitle as _setproctitle

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

#: Signals the primary's loop handles itself (``Primary.handle_term``...).
LOOP_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGCHLD,
    signal.SIGTTIN,
    signal.SIGTTOU,
)
#: Signals the primary may handle (its components install the others: SIGUSR2
#: upgrades); a new worker puts them back to their defaults.
PRIMARY_SIGNALS = (*LOOP_SIGNALS, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)


def set_title(title: str) -> None:
    _setproctitle(title)


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    # find_library costs about a millisecond: once per process tree (forks inherit it)
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _prctl(option: int, arg: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    return bool(_libc().prctl(option, arg, 0, 0, 0) == 0)


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux)."""
    return _prctl(_PR_SET_PDEATHSIG, sig)


def set_child_subreaper() -> bool:
    """Become the reaper of orphaned descendants (Linux), e.g. double-forked workers."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


#: the signal mask before ``fork()`` blocked the primary's signals; a child puts it back
_mask_before_fork: Iterable[int] | None = None


def fork() -> int:
    """``os.fork()`` with the primary's signals blocked across it; the child's stay blocked.

    The child starts with the primary's handlers, which only queue a signal for
    the primary's loop (a loop the child never runs): a SIGTERM sent to a new
    worker before it has reset them (a drain right after a scale-up) would be
    swallowed, and the worker would serve on until SIGKILLed. Blocked, such a
    signal waits, pending, until ``after_fork_in_child`` has put the child's own
    dispositions in place and unblocks it. The parent's mask is restored at once
    (what arrived meanwhile is delivered then). Use it only for a child that
    calls ``after_fork_in_child`` (an ``exec`` would keep the mask).
    """
    global _mask_before_fork
    old = signal.pthread_sigmask(signal.SIG_BLOCK, PRIMARY_SIGNALS)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        raise
    if pid == 0:
        _mask_before_fork = old
    else:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return pid


def after_fork_in_child(close_fds: list[int]) -> None:
    """Fork hygiene for a new worker (docs/index.md, "The workers"): do this first thing.

    Ends by unblocking the signals ``fork()`` blocked: one already sent (a
    drain) is delivered now, to the child's own disposition.
    """
    global _mask_before_fork
    # The primary's wakeup fd is its self-pipe; a worker writing to it would wake
    # the primary with the worker's signals.
    signal.set_wakeup_fd(-1)
    for sig in PRIMARY_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    # Ctrl+C goes to the whole foreground process group: the primary decides how
    # workers stop (it sends SIGTERM), so a worker ignores the terminal's SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGHUP / SIGTTIN / SIGTTOU sent to the whole group (``kill -HUP -PGID``, a
    # terminal hang-up) are the primary's to act on (roll, scale); by default
    # they would kill or stop a worker mid-request.
    for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    close_all(close_fds)
    random.seed()
    if _mask_before_fork is not None:
        mask, _mask_before_fork = _mask_before_fork, None
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def close_all(fds: Iterable[int]) -> None:
    """Close every fd; one already closed (or never valid) is no error."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def flush_output() -> None:
    """Flush stdout and stderr before a fork or ``os._exit`` (either may be closed, or None)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass


class ExitStatus(NamedTuple):
    """A wait status (``os.waitpid``), decoded: the one place that reads one."""

    #: the exit code, if the process exited
    code: int | None
    #: the signal that killed it, if one did (a ``signal.Signals`` when Python knows its name)
    signal: int | None
    raw: int

    @classmethod
    def of(cls, status: int) -> ExitStatus:
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            try:
                return cls(None, signal.Signals(sig), status)
            except ValueError:
                return cls(None, sig, status)
        if os.WIFEXITED(status):
            return cls(os.WEXITSTATUS(status), None, status)
        return cls(None, None, status)

    def __str__(self) -> str:
        """In words: ``exit code 3``, ``killed by SIGKILL``."""
        if self.signal is not None:
            return f"killed by {self.signal.name if isinstance(self.signal, signal.Signals) else self.signal}"
        if self.code is not None:
            return f"exit code {self.code}"
        return f"status {self.raw}"


def describe_status(status: int) -> str:
    """A wait status in words: ``exit code 3``, ``killed by SIGKILL``."""
    return str(ExitStatus.of(status))


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


#: the lines of /proc/PID/smaps_rollup that add up to the unique set size
_PRIVATE = (b"Private_Clean:", b"Private_Dirty:", b"Private_Hugetlb:")


def uss_bytes(pid: int) -> int | None:
    """Memory that is ``pid``'s alone (unique set size, Linux ``/proc/PID/smaps_rollup``), in bytes.

    Unlike RSS it leaves out the pages a forked worker still shares with its parent
    (a ``--preload`` template's app, the interpreter): what the worker's exit would
    free. Falls back to RSS where the kernel has no smaps_rollup (before 4.14).
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return rss_bytes(pid) if os.path.exists(f"/proc/{pid}") else None
    except OSError:
        return None
    total = 0
    for line in lines:
        if line.startswith(_PRIVATE):
            total += int(line.split()[1]) * 1024  # kB
    return total


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` in bytes (Linux ``/proc/PID/statm``), None if unknown."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None
