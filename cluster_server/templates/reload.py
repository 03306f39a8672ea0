"""``--reload``: watch the project's files and roll to a new generation when they change.

Three pieces:

- :class:`WatchRules`, pure path logic shared by everyone: which files trigger
  a reload, and which modules belong to the project (imported afresh by every
  generation) rather than to its dependencies (imported once, by the template).
- :func:`watcher_main`, the watcher process. It runs watchfiles, which starts
  threads, so it is a process of its own, forked before it imports watchfiles:
  the primary stays single-threaded and safe to fork. It sends the primary
  ``{"t": "watching"}`` once it watches, then ``{"t": "changes", "files": [...]}``
  per debounced batch.
- :class:`Reloader`, the primary's component: it starts (and restarts) the
  watcher, logs one line per reload naming the changed files, and asks the
  primary for a rolling restart. The workers of the new generation are forked
  by the dependency template (``templates/process.py``), so a reload only imports the
  project's own modules.

Workers of a reload import the project with :func:`fresh_import_hook`, which
never trusts a ``.pyc`` older than its source: a ``.pyc`` records its source's
mtime in whole seconds, so two saves within one second with the same size would
otherwise serve the old code.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from cluster_server import _logging, _proc
from cluster_server._config import Config
from cluster_server._errors import ClusterServerError
from cluster_server.primary.component import Component, WorkerEvent, override
from cluster_server.primary.loop import RELOAD_PREFIX
from cluster_server.wire.channel import Channel, Message, receive_all, send_blocking
from cluster_server.wire.messages import CHANGES, ERROR, WATCHING
from cluster_server.wire.spawn import child_main

if TYPE_CHECKING:
    from cluster_server.primary.loop import Primary, Worker

logger = logging.getLogger("cluster_server")

#: directories never watched, and never part of the project (their modules are dependencies)
IGNORED_DIRS = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        "__pycache__",
        ".venv",
        "venv",
        ".tox",
        ".nox",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".hypothesis",
        ".idea",
        ".vscode",
        ".eggs",
        "node_modules",
        "site-packages",
        "dist-packages",
    }
)
#: files never watched: bytecode, and vim / emacs / JetBrains / macOS temporary files
IGNORED_FILES = (
    "*.py[cod]",
    ".*.sw?",
    "*.sw?",
    "*~",
    ".#*",
    "#*#",
    "4913",
    "*___jb_*___",
    ".DS_Store",
    "flycheck_*",
)
#: files that always trigger a reload (--reload-include adds to these)
DEFAULT_INCLUDES = ("*.py",)
#: the most file names one "changes" message carries (the rest are counted)
MAX_NAMES = 100
#: a watcher that died is restarted after this long
WATCHER_RESTART_DELAY = 1.0


@dataclass(frozen=True)
class WatchRules:
    """Which paths are the project's, and which changes trigger a reload."""

    roots: tuple[str, ...]  # absolute, symlinks resolved
    includes: tuple[str, ...] = DEFAULT_INCLUDES
    excludes: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: Config) -> WatchRules:
        dirs = config.reload_dirs or (os.getcwd(),)
        roots = tuple(dict.fromkeys(os.path.realpath(d) for d in dirs))
        includes = tuple(dict.fromkeys((*DEFAULT_INCLUDES, *config.reload_includes)))
        return cls(roots, includes, tuple(config.reload_excludes))

    def _relative(self, path: str) -> str | None:
        """``path`` relative to the root it is under, or None when it is under none."""
        real = _realpath(path)
        for root in self.roots:
            if real == root:
                return ""
            if real.startswith(root + os.sep):
                return real[len(root) + 1 :]
        return None

    def _ignored_dir(self, parts: list[str], root_path: str) -> bool:
        prefix = root_path
        for part in parts:
            if part in IGNORED_DIRS or any(fnmatch.fnmatch(part, g) for g in self.excludes):
                return True
            prefix = os.path.join(prefix, part)
            if _is_virtualenv(prefix):
                return True
        return False

    def in_project(self, path: str) -> bool:
        """Is ``path`` (a file or a directory) under a watched root, outside ignored directories?"""
        real = _realpath(path)
        for root in self.roots:
            if real == root:
                return True
            if real.startswith(root + os.sep):
                parts = real[len(root) + 1 :].split(os.sep)
                return not self._ignored_dir(parts if os.path.isdir(real) else parts[:-1], root)
        return False

    def triggers(self, path: str) -> bool:
        """Does a change to the file ``path`` call for a reload?"""
        rel = self._relative(path)
        if rel is None or not rel:
            return False
        name = os.path.basename(rel)
        if any(fnmatch.fnmatch(name, g) for g in IGNORED_FILES):
            return False
        if any(fnmatch.fnmatch(name, g) or fnmatch.fnmatch(rel, g) for g in self.excludes):
            return False
        if not any(fnmatch.fnmatch(name, g) or fnmatch.fnmatch(rel, g) for g in self.includes):
            return False
        return self.in_project(path)

    def is_project_module(self, module: Any) -> bool:
        """Does this module come from the project (rather than from a dependency)?"""
        file = getattr(module, "__file__", None)
        if file:
            return self.in_project(file)
        paths = getattr(module, "__path__", None)  # a namespace package
        try:
            return any(self.in_project(p) for p in paths or ())
        except TypeError:
            return False

    def show(self, path: str) -> str:
        """``path`` as a user wants to read it: relative to its watched root."""
        rel = self._relative(path)
        return rel if rel else path


@functools.lru_cache(maxsize=4096)
def _realpath(path: str) -> str:
    return os.path.realpath(path)


@functools.lru_cache(maxsize=1024)
def _is_virtualenv(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, "pyvenv.cfg"))


# -- fresh imports in a worker -------------------------------------------------


class _FreshSourceLoader(importlib.machinery.SourceFileLoader):
    """A source loader that drops a ``.pyc`` not written after its source's last change."""

    @override
    def get_code(self, fullname: str) -> Any:
        if sys.implementation.cache_tag is not None:  # None: this Python writes no .pyc at all
            try:
                source_mtime = os.stat(self.path).st_mtime_ns
                cached = importlib.util.cache_from_source(self.path)
                if os.stat(cached).st_mtime_ns <= source_mtime:
                    os.unlink(cached)  # stale or ambiguous: compile from source, write a new one
            except (OSError, ValueError):
                pass  # no source or no .pyc (yet): nothing stale to drop
        return super().get_code(fullname)


_hooked: list[WatchRules] = []  # the rules fresh_import_hook was installed with, in this process


def fresh_import_hook(rules: WatchRules) -> None:
    """Import the project's modules through :class:`_FreshSourceLoader` from now on,
    and forget what the import system cached about the project's directories.

    Installs the hook once per process (a template installs it, so its workers
    only forget the caches).
    """
    if rules not in _hooked:
        file_finder_hook = importlib.machinery.FileFinder.path_hook(
            (_FreshSourceLoader, importlib.machinery.SOURCE_SUFFIXES),
            (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
            (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES),
        )

        def hook(path: str) -> Any:
            if not rules.in_project(path or os.getcwd()):
                raise ImportError("not a project directory")
            return file_finder_hook(path)

        sys.path_hooks.insert(0, hook)
        _hooked.append(rules)
    for entry in list(sys.path_importer_cache):
        if rules.in_project(entry or os.getcwd()):
            del sys.path_importer_cache[entry]
    importlib.invalidate_caches()


# -- the watcher process -------------------------------------------------------


def watcher_main(
    rules: WatchRules, delay: float, sock: socket.socket, close_fds: list[int], primary_pid: int
) -> NoReturn:
    """Entry point of the forked watcher process. Never returns."""

    def body() -> int:
        _proc.after_fork_in_child(close_fds)
        _logging.set_role("reload watcher")
        return _watch(rules, delay, Channel(sock), primary_pid)

    child_main(body, "the reload watcher crashed")


def _watch(rules: WatchRules, delay: float, channel: Channel, primary_pid: int) -> int:
    _proc.set_title("cluster-server: reload watcher")
    _proc.set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != primary_pid:
        return 1
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    import watchfiles  # starts threads once it watches: only ever in this process

    step_ms = max(5, int(delay * 1000))
    announced = False
    try:
        for changes in watchfiles.watch(
            *rules.roots,
            watch_filter=lambda _change, path: rules.triggers(path),
            step=step_ms,
            debounce=max(1000, 4 * step_ms),
            rust_timeout=200,
            yield_on_timeout=True,
            raise_interrupt=False,
        ):
            if not announced:  # the first yield: the watches are in place
                send_blocking(channel, {"t": WATCHING})
                announced = True
            if changes:
                files = sorted({path for _, path in changes})
                send_blocking(channel, {"t": CHANGES, "files": files[:MAX_NAMES], "n": len(files)})
    except (BrokenPipeError, ConnectionResetError):
        return 0  # the primary is gone
    except Exception as exc:
        send_blocking(channel, {"t": ERROR, "error": f"{type(exc).__name__}: {exc}"})
        return 2
    return 0


# -- the primary's component ---------------------------------------------------


class Reloader(Component):
    """Runs the watcher and turns its reports into rolling restarts."""

    def __init__(self, config: Config, rules: WatchRules | None = None) -> None:
        self.config = config
        self.rules = rules or WatchRules.from_config(config)
        self.primary: Primary | None = None
        self.pid: int | None = None
        self.channel: Channel | None = None
        self.restart_at: float | None = None
        self.reloads = 0
        self.waiting_for_fix = False
        self.error_shown = 0  # the last generation whose error page was announced

    # component hooks
    @override
    def attach(self, primary: Primary) -> None:
        self.primary = primary
        self.start_watcher()

    @override
    def next_deadline(self) -> float | None:
        return self.restart_at

    @override
    def tick(self) -> None:
        assert self.primary is not None
        if self.restart_at is not None and self.primary.clock() >= self.restart_at:
            self.restart_at = None
            self.start_watcher()

    @override
    def fds_to_close_in_child(self) -> list[int]:
        return [self.channel.fileno()] if self.channel is not None and not self.channel.closed else []

    @override
    def worker_event(self, event: WorkerEvent, worker: Worker) -> None:
        """Say once per generation that the app cannot start, and that its workers show why."""
        if event == "ready" and worker.error_page and worker.generation != self.error_shown:
            self.error_shown = worker.generation
            logger.error(
                "the app cannot start; every request gets a 500 page saying why until a change fixes it:\n%s",
                worker.boot_error,
            )

    @override
    def cannot_start(self, error: ClusterServerError) -> bool:
        """The first generation cannot start (broken code): wait for a fix instead of exiting."""
        primary = self.primary
        assert primary is not None
        if primary.ever_ready or primary.stopping:
            return False
        primary.hold_slots()  # the next reload's rolling restart fills them
        if not self.waiting_for_fix and not self.reloads:  # (a later one is the old code's, late)
            self.waiting_for_fix = True
            logger.error("the app cannot start; waiting for a change to try again:\n%s", error)
        return True

    @override
    def close(self) -> None:
        self._close_channel()
        if self.pid is not None:
            pid, self.pid = self.pid, None
            _stop_child(pid)

    # the watcher process
    def start_watcher(self) -> None:
        primary = self.primary
        assert primary is not None
        if primary.stopping:
            return
        main = functools.partial(watcher_main, self.rules, self.config.reload_delay, primary_pid=os.getpid())
        # The watcher serves nothing: it does not keep the listening sockets either.
        serving = [lst.sock.fileno() for lst in primary.listeners]
        pid, ours = primary.start_child(main, self._watcher_exited, close=serving)
        self.pid, self.channel = pid, Channel(ours)
        primary.add_reader(self.channel, self._on_channel)

    def _close_channel(self) -> None:
        if self.channel is not None:
            assert self.primary is not None  # (a channel is made once attached)
            self.primary.close_reader(self.channel)
            self.channel = None

    def _watcher_exited(self, pid: int, status: int) -> None:
        if pid != self.pid:
            return
        self.pid = None
        self._close_channel()
        assert self.primary is not None
        if not self.primary.stopping:
            logger.error(
                "reload: the file watcher exited (%s); restarting it in %g s",
                _proc.describe_status(status),
                WATCHER_RESTART_DELAY,
            )
            self.restart_at = self.primary.clock() + WATCHER_RESTART_DELAY

    def _on_channel(self, mask: int) -> None:
        assert self.channel is not None
        if not receive_all(self.channel, self.handle, "reload watcher"):
            self._close_channel()

    def handle(self, msg: Message, fds: list[int]) -> None:
        _proc.close_all(fds)  # the watcher sends none
        kind = msg.get("t")
        if kind == WATCHING:
            logger.info("reload: watching %s for changes", ", ".join(self.rules.roots))
        elif kind == CHANGES:
            files = [str(f) for f in msg.get("files") or ()]
            n = msg.get("n")
            self.reload(files, n if isinstance(n, int) else len(files))
        elif kind == ERROR:
            logger.error("reload: the file watcher failed: %s", msg.get("error"))
        else:
            logger.warning("reload watcher sent an unknown message %.200r; ignored", msg)

    def reload(self, files: Iterable[str], count: int | None = None, why: str = "changed") -> None:
        """Log one line naming the files, and roll to a new generation."""
        primary = self.primary
        assert primary is not None
        names = [self.rules.show(f) for f in files]
        count = max(count or 0, len(names))
        shown = ", ".join(names[:5]) + (f" and {count - 5} more" if count > 5 else "")
        self.reloads += 1
        self.waiting_for_fix = False
        logger.info("reload: %s %s; rolling to a new generation", shown, why)
        primary.roll(f"{RELOAD_PREFIX} {shown} {why}")  # the prefix makes the old workers' exit "reloaded"


def _stop_child(pid: int, grace: float = 1.0) -> None:
    """SIGTERM, a bounded wait, then SIGKILL: always reaped."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    logger.warning("process %d did not stop in %g s; sending SIGKILL", pid, grace)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
