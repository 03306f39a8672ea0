"""Template processes: import once, fork workers from there.

A template is a process the primary forks (the primary itself never imports the
app). It imports what the workers should share, freezes the garbage collector
(``gc.freeze()``, so the workers' collections do not write to the shared pages),
then forks a worker each time the primary asks. Two kinds:

- ``preload`` (``--preload``): the template imports the app itself. Workers
  share its pages copy-on-write. A rolling restart (SIGHUP) first builds a new
  template from the new source; if that import fails, the old generation keeps
  serving and the error is logged.
- ``deps`` (``--reload``): the template imports every module the app needs
  that is *not* the project's own (third-party packages, the standard library,
  uvicorn's protocol modules): the list comes from importing the app once in a
  throwaway child and reading its ``sys.modules``. A worker forked from it
  imports only the project's modules, which is what makes a reload take tens
  of milliseconds. The template polls the files it imported; when one changes
  (``pip install -U``), a new template is built and the workers reloaded.

Who owns the workers
--------------------

A worker forked by a template would be the template's child, not the
primary's. We make it the primary's: the primary is a *child subreaper*
(``PR_SET_CHILD_SUBREAPER``, Linux) and the template *double-forks*: its child
forks the worker and exits at once, so the worker is re-parented to the
primary. The primary therefore reaps every worker itself (``waitpid``), sees
every exit status first-hand, and stays the single owner of the worker table.
The other design, a template that reaps its workers and relays their exits,
was rejected: the template would then have to outlive every worker it forked
(their parent-death signal would point at it), so it could never be replaced
while old workers drain, and a crashed template would hide its workers' exits.

Each worker still has its own channel to the primary: the primary creates the
socketpair and sends the worker's end to the template with the spawn request
(SCM_RIGHTS); the template answers with the worker's pid. A worker sets its
parent-death signal only once the primary is its parent (``_worker._run``).

This module is the template's side; ``templates/launcher.py`` is the primary's.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, Literal, NoReturn

from cluster_server import _proc
from cluster_server._config import Config
from cluster_server._errors import AppLoadError, ChannelError, ClusterServerError
from cluster_server.ops import privileges as _privileges
from cluster_server.templates.reload import WatchRules, fresh_import_hook
from cluster_server.wire.channel import Channel, Message, send_blocking
from cluster_server.wire.messages import ERROR, READY, SPAWN, SPAWN_FAILED, SPAWNED, STALE
from cluster_server.worker.main import EXIT_BOOT_FAILURE, WorkerSpec, load_app, uvicorn_config, worker_main

logger = logging.getLogger("cluster_server")

Kind = Literal["preload", "deps"]

#: seconds between checks of the files a dependency template imported
STALE_POLL = 1.0
#: exit status of a template whose imports started a thread (forking it is unsafe)
EXIT_THREADED = 4
#: frames of a load error's traceback worth showing
TRACEBACK_FRAMES = 6


class TemplateError(ClusterServerError):
    """A template could not do what the primary asked (it died, or did not answer)."""


# -- load errors, shown short ------------------------------------------------


def short_traceback(exc: BaseException) -> str:
    """The project's frames of ``exc`` (not importlib's or ours) and its message.

    For a SyntaxError that is the file, line, the line itself and a caret.
    """
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not _machinery(f.filename)][-TRACEBACK_FRAMES:]
    lines = traceback.format_list(frames) + traceback.format_exception_only(type(exc), exc)
    return "".join(lines).rstrip("\n")


_MACHINERY_DIRS = (
    os.path.dirname(importlib.__file__) + os.sep,
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,  # cluster_server/
)


def _machinery(filename: str) -> bool:
    """Is this frame the import system's or cluster-server's, not the app's?"""
    return filename.startswith("<frozen") or filename.startswith(_MACHINERY_DIRS)


def load_with_traceback(config: Config, load: Callable[[Config], Any] = load_app) -> Any:
    """``load(config)``, with the original error's short traceback added to an AppLoadError."""
    try:
        return load(config)
    except AppLoadError as exc:
        original = exc.__cause__ or exc.__context__
        if original is None or isinstance(original, ModuleNotFoundError):
            raise
        raise AppLoadError(f"{exc}\n{short_traceback(original)}") from original


def load_project(rules: WatchRules, config: Config) -> Any:
    """A reload worker's loader: import the project afresh (never from a stale .pyc)."""
    fresh_import_hook(rules)
    return load_with_traceback(config)


# -- the template process ------------------------------------------------------


def template_main(
    config: Config,
    kind: Kind,
    sock: socket.socket,
    close_fds: list[int],
    primary_pid: int,
    listeners: tuple[socket.socket, ...],
    rules: WatchRules | None,
) -> NoReturn:
    """Entry point of a forked template. Never returns."""
    code = 1
    try:
        _proc.after_fork_in_child(close_fds)
        code = _TemplateProcess(config, kind, Channel(sock), primary_pid, listeners, rules).run()
    except BaseException:
        logger.exception("the %s template crashed", kind)
    finally:
        logging.shutdown()
        _proc.flush_output()
        os._exit(code)


class _TemplateProcess:
    """The template's side: import, freeze, then fork workers on request."""

    def __init__(
        self,
        config: Config,
        kind: Kind,
        channel: Channel,
        primary_pid: int,
        listeners: tuple[socket.socket, ...],
        rules: WatchRules | None,
    ) -> None:
        self.config, self.kind, self.channel = config, kind, channel
        self.primary_pid, self.listeners, self.rules = primary_pid, listeners, rules
        self.load: Callable[[Config], Any] = load_app
        self.deps: dict[str, int] = {}  # file -> mtime_ns, for the staleness check
        self.stale = False

    def run(self) -> int:
        _proc.set_title(f"cluster-server: template [{self.config.app_name}]")
        # The app's import-time code runs here: in neither the primary nor a worker.
        # (Imported here, before privileges drop, as a worker imports it before it does.)
        from cluster_server.cluster import role

        role.become_template()
        try:  # the app's imports run as --user, as in a worker; before the parent-death signal
            _privileges.drop(self.config)  # (changing credentials clears it)
        except ClusterServerError as exc:
            send_blocking(self.channel, {"t": ERROR, "error": str(exc)})
            return EXIT_BOOT_FAILURE
        _proc.set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != self.primary_pid:
            return 1
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        started = time.monotonic()
        inherited = set(sys.modules)  # the primary's: a new template cannot refresh them
        gc.disable()  # no collections while importing: fewer holes in the pages the workers share
        if self.config.env_file is not None:
            _proc.load_env_file(self.config.env_file)
        if self.kind == "preload":
            try:
                app = load_with_traceback(self.config)
            except AppLoadError as exc:
                send_blocking(self.channel, {"t": ERROR, "error": str(exc)})
                return EXIT_BOOT_FAILURE
            _warm_uvicorn(self.config, app)
            self.load = lambda _config: app
            count = 1
        else:
            assert self.rules is not None
            rules = self.rules
            names = self.discover()
            if self.import_all(names) < 0:
                return EXIT_THREADED
            count = len(set(sys.modules) - inherited)
            self.load = lambda config: load_project(rules, config)
            self.deps = _dependency_files(rules, self.config, inherited)
            fresh_import_hook(rules)  # once here, so a worker has less to do
        if threading.active_count() > 1:
            send_blocking(self.channel, {"t": ERROR, "error": "importing the app started a thread", "threaded": True})
            return EXIT_THREADED
        gc.freeze()
        send_blocking(
            self.channel,
            {"t": READY, "modules": count, "seconds": round(time.monotonic() - started, 3)},
        )
        return self.serve()

    # deps: what to import
    def discover(self) -> list[str]:
        """Import the app in a throwaway child; the names of the modules it loaded that
        are not the project's, in import order."""
        assert self.rules is not None
        r, w = os.pipe()
        _proc.flush_output()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the throwaway child
            try:
                os.close(r)
                _proc.set_title("cluster-server: template (finding the dependencies)")
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)  # the workers will show the app's output and errors
                os.dup2(devnull, 2)
                try:
                    app = load_app(self.config)
                    _warm_uvicorn(self.config, app)
                except BaseException:
                    pass  # a broken app: what it imported before the error is still worth having
                names = [
                    name
                    for name, module in list(sys.modules.items())
                    if name not in ("__main__", "__mp_main__") and not self.rules.is_project_module(module)
                ]
                data = "\n".join(names).encode()
                while data:
                    data = data[os.write(w, data) :]
            finally:
                os._exit(0)
        os.close(w)
        chunks: list[bytes] = []
        deadline = time.monotonic() + self.config.ready_timeout
        try:
            while True:
                ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    logger.warning("finding the app's dependencies took over %g s; gave up", self.config.ready_timeout)
                    os.kill(pid, signal.SIGKILL)
                    chunks = []
                    break
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(r)
            os.waitpid(pid, 0)
        return [n for n in b"".join(chunks).decode().split("\n") if n]

    def import_all(self, names: list[str]) -> int:
        """Import the modules; the count imported, or -1 if one of them started a thread."""
        count = 0
        for name in names:
            if name in sys.modules:
                continue
            try:
                importlib.import_module(name)
            except BaseException:  # a module that cannot be imported alone is left to the workers
                continue
            count += 1
            if threading.active_count() > 1:
                send_blocking(
                    self.channel,
                    {"t": ERROR, "error": f"importing {name!r} started a thread", "threaded": True},
                )
                return -1
        return count

    # serving spawn requests
    def serve(self) -> int:
        # about 2,000 stat() calls a second at most, however many modules the app needs
        timeout = STALE_POLL * max(1.0, len(self.deps) / 2000) if self.deps else None
        while True:
            ready, _, _ = select.select([self.channel], [], [], timeout)
            if not ready:
                self.check_stale()
                continue
            try:
                for msg, fds in self.channel.receive():
                    if isinstance(msg, ChannelError) or msg.get("t") != SPAWN or len(fds) != 1:
                        _proc.close_all(fds)
                        continue
                    self.spawn(msg, fds[0])
            except EOFError:
                return 0  # the primary closed our channel: we are done

    def check_stale(self) -> None:
        if self.stale:
            return
        changed = []
        for path, mtime in self.deps.items():
            try:
                now = os.stat(path).st_mtime_ns
            except OSError:
                now = -1
            if now != mtime:
                changed.append(path)
        if changed:
            self.stale = True
            send_blocking(self.channel, {"t": STALE, "files": changed[:20], "n": len(changed)})

    def spawn(self, msg: Message, fd: int) -> None:
        try:
            spec = WorkerSpec(
                id=int(msg["id"]),
                generation=int(msg["generation"]),
                primary_pid=self.primary_pid,
                listeners=self.listeners,
            )
            pid = self.double_fork(spec, fd)
        except (OSError, KeyError, TypeError, ValueError) as exc:
            os.close(fd)
            send_blocking(self.channel, {"t": SPAWN_FAILED, "error": f"{type(exc).__name__}: {exc}"})
            return
        send_blocking(self.channel, {"t": SPAWNED, "pid": pid})

    def double_fork(self, spec: WorkerSpec, fd: int) -> int:
        """Fork a worker that the primary (a child subreaper) inherits; return its pid."""
        r, w = os.pipe()
        _proc.flush_output()
        try:
            middle = os.fork()
        except OSError:
            os.close(r)
            os.close(w)
            raise
        if middle == 0:  # pragma: no cover - the middle process lives for one fork
            try:
                os.close(r)
                pid = os.fork()
                if pid == 0:
                    os.close(w)
                    gc.enable()
                    worker_main(self.config, spec, socket.socket(fileno=fd), [self.channel.fileno()], self.load)
                os.write(w, str(pid).encode())
            finally:
                os._exit(0)
        os.close(w)
        os.close(fd)
        data = b""
        try:
            while chunk := os.read(r, 64):
                data += chunk
        finally:
            os.close(r)
            os.waitpid(middle, 0)
        if not data:
            raise OSError("the worker could not be forked")
        return int(data)


def _warm_uvicorn(config: Config, app: Any) -> None:
    """Import what uvicorn's Config.load() imports (protocols, loop), so the workers share it."""
    try:
        uvicorn_config(config, app).load()
    except BaseException:  # the workers will report it properly
        pass


def _dependency_files(rules: WatchRules, config: Config, inherited: set[str]) -> dict[str, int]:
    """The files whose change makes the dependency template stale: the modules it
    imported (not those it inherited from the primary), and the env file."""
    files: dict[str, int] = {}
    paths = [getattr(m, "__file__", None) for name, m in list(sys.modules.items()) if name not in inherited]
    env_file = os.path.abspath(config.env_file) if config.env_file is not None else None
    if env_file is not None:
        paths.append(env_file)
    for path in paths:
        if not isinstance(path, str) or path in files or not os.path.isabs(path):
            continue
        if path != env_file and rules.in_project(path):
            continue
        try:
            files[path] = os.stat(path).st_mtime_ns
        except OSError:
            pass
    return files
