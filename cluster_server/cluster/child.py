"""How a worker's process is set up: ``setup_primary``'s ``cwd``, ``silent``, ``stdio``, ``uid``, ``gid``.

Node's meanings:

- ``cwd``: the worker's working directory (default: the primary's);
- ``silent``: the worker's stdin, stdout and stderr are pipes to the primary
  (``worker.stdin``/``stdout``/``stderr``) instead of the primary's own;
- ``stdio``: one entry per stream (stdin, stdout, stderr), overriding
  ``silent``: ``"inherit"`` (the primary's), ``"pipe"``, ``"ignore"``
  (``/dev/null``), an fd, or a file object with ``fileno()``. Node's list also
  names the IPC channel (``"ipc"``); here the channel is a socket of its own, so
  a fourth entry ``"ipc"`` is accepted and means nothing more;
- ``uid``, ``gid``: the worker's user and group (``setgid`` then ``setuid``; as
  root, supplementary groups are dropped first). The worker re-reads the
  program as that user, so it must be able to read it.

A spawned worker gets them from ``subprocess.Popen``. A forked one applies them
in the child, right after ``fork()`` and before it links to the primary (so its
parent-death signal, which ``setuid`` resets, is set afterwards); what fails
there is printed and the worker exits with status 1. What can be checked first
is checked in the primary, so ``fork()`` raises: a ``cwd`` that is not a
directory, a ``uid``/``gid`` this process may not switch to (``PermissionError``,
Node's ``EPERM``), a bad ``stdio`` entry.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

#: one stdio entry: "inherit", "pipe", "ignore", an fd, or a file object
Stdio = Any
_WORDS = ("inherit", "pipe", "ignore")


def stdio_plan(silent: bool, stdio: Sequence[Stdio] | None) -> tuple[Stdio, Stdio, Stdio]:
    """The three entries a worker starts with (``stdio`` overrides ``silent``); ValueError if invalid."""
    if stdio is None:
        return ("pipe", "pipe", "pipe") if silent else ("inherit", "inherit", "inherit")
    entries = list(stdio)
    if len(entries) == 4 and entries[3] == "ipc":
        entries = entries[:3]
    if len(entries) != 3:
        raise ValueError(f"stdio has {len(entries)} entries: give stdin, stdout and stderr (and 'ipc' if you like)")
    for i, entry in enumerate(entries):
        if entry is None:
            entries[i] = "inherit"
        elif (isinstance(entry, str) and entry not in _WORDS) or (
            not isinstance(entry, str | int) and not hasattr(entry, "fileno")
        ):
            raise ValueError(f"stdio[{i}] = {entry!r}: expected 'inherit', 'pipe', 'ignore', an fd or a file")
    return (entries[0], entries[1], entries[2])


def check(cwd: str | None, uid: int | None, gid: int | None) -> None:
    """What ``fork()`` can refuse before starting anything (raises OSError as the OS would)."""
    if cwd is not None and not os.path.isdir(cwd):
        raise FileNotFoundError(errno.ENOENT, "cwd is not a directory", cwd)
    root = os.geteuid() == 0
    if uid is not None and not root and uid not in (os.getuid(), os.geteuid()):
        raise PermissionError(errno.EPERM, f"only root may start a worker as uid {uid}")
    if gid is not None and not root and gid not in (os.getgid(), os.getegid()):
        raise PermissionError(errno.EPERM, f"only root may start a worker as gid {gid}")


@dataclass
class ForkedStdio:
    """The pipes of a forked worker: the child's ends (``dup2``-ed in the child) and the primary's."""

    child: list[int | None] = field(default_factory=lambda: [None, None, None])
    parent: list[int | None] = field(default_factory=lambda: [None, None, None])
    opened: list[int] = field(default_factory=list)  # fds to close in the primary once forked

    def files(self) -> tuple[IO[bytes] | None, ...]:
        """The primary's ends as files: stdin is written, stdout and stderr are read."""
        return tuple(
            None if fd is None else os.fdopen(fd, "wb" if i == 0 else "rb") for i, fd in enumerate(self.parent)
        )


def open_for_fork(plan: tuple[Stdio, Stdio, Stdio]) -> ForkedStdio:
    """Make the pipes and open ``/dev/null`` for a worker about to be forked."""
    out = ForkedStdio()
    try:
        for i, entry in enumerate(plan):
            if entry == "pipe":
                r, w = os.pipe()
                out.child[i], out.parent[i] = (r, w) if i == 0 else (w, r)
                out.opened.append(out.child[i])  # type: ignore[arg-type]
            elif entry == "ignore":
                out.child[i] = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                out.opened.append(out.child[i])  # type: ignore[arg-type]
            elif entry != "inherit":
                out.child[i] = entry if isinstance(entry, int) else entry.fileno()
    except BaseException:
        close_in_primary(out, failed=True)
        raise
    return out


def close_in_primary(stdio: ForkedStdio, failed: bool = False) -> None:
    """After the fork: the child's ends are the child's (and all of it when the fork failed)."""
    for fd in stdio.opened + ([fd for fd in stdio.parent if fd is not None] if failed else []):
        os.close(fd)


def apply_in_child(stdio: ForkedStdio, cwd: str | None, uid: int | None, gid: int | None) -> None:
    """In the forked worker, before it links to the primary. Exits with status 1 on failure."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        for i, fd in enumerate(stdio.child):
            if fd is not None:
                os.dup2(fd, i)  # (dup2 leaves the new fd inheritable, as stdio should be)
        for fd in stdio.opened + [fd for fd in stdio.parent if fd is not None]:
            os.close(fd)
        if cwd is not None:
            os.chdir(cwd)
        if gid is not None:
            if os.geteuid() == 0:
                os.setgroups([])
            os.setgid(gid)
        if uid is not None:
            if os.geteuid() == 0 and gid is None:
                os.setgroups([])
            os.setuid(uid)
    except OSError as exc:
        os.write(2, f"cluster worker [pid {os.getpid()}]: cannot start: {exc}\n".encode())
        os._exit(1)


def popen_options(
    plan: tuple[Stdio, Stdio, Stdio], cwd: str | None, uid: int | None, gid: int | None
) -> dict[str, Any]:
    """The same settings for a spawned worker, as ``subprocess.Popen`` takes them."""
    streams = [
        None if e == "inherit" else subprocess.PIPE if e == "pipe" else subprocess.DEVNULL if e == "ignore" else e
        for e in plan
    ]
    options: dict[str, Any] = {"stdin": streams[0], "stdout": streams[1], "stderr": streams[2], "cwd": cwd}
    if uid is not None:
        options["user"] = uid
    if gid is not None:
        options["group"] = gid
    if (uid is not None or gid is not None) and os.geteuid() == 0:
        options["extra_groups"] = []
    return options
