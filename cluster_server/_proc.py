"""Small process-level helpers: titles, parent-death signal, fork hygiene."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import random
import signal
import sys

from setproctitle import setproctitle as _setproctitle

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

#: Signals the primary handles; a new worker puts them back to their defaults.
PRIMARY_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGCHLD,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)


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


def after_fork_in_child(close_fds: list[int]) -> None:
    """Fork hygiene for a new worker (see DESIGN.md): do this first thing."""
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
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    random.seed()


def load_env_file(path: str) -> None:
    """Set variables from a dotenv-style file (KEY=VALUE, # comments, optional quotes)."""
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            line = raw.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            if line.startswith("export "):
                line = line[len("export ") :]
            key, _, value = line.partition("=")
            key, value = key.strip(), value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            os.environ[key] = value
