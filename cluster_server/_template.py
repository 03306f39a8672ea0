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
"""

from __future__ import annotations

import gc
import importlib
import logging
import math
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from . import _channel, _privileges, _proc
from ._channel import Channel, Message, send_blocking
from ._config import Config
from ._errors import AppLoadError, ChannelError, ClusterServerError
from ._reload import Reloader, WatchRules, _stop_child, fresh_import_hook
from ._worker import EXIT_BOOT_FAILURE, WorkerSpec, load_app, uvicorn_config, worker_main

if TYPE_CHECKING:
    from ._primary import Primary, Worker

logger = logging.getLogger("cluster_server")

Kind = Literal["preload", "deps"]

#: how long the primary waits for a template to answer a spawn request
SPAWN_TIMEOUT = 5.0
#: seconds between checks of the files a dependency template imported
STALE_POLL = 1.0
#: a template that dies unexpectedly is rebuilt, but not more often than this
REBUILD_INTERVAL = 30.0
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
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
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
        _flush_output()
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
        # What a worker imports before it drops privileges, imported here before we do.
        from . import cluster

        # The app's import-time code runs here: in neither the primary nor a worker.
        cluster.is_primary = False
        try:  # the app's imports run as --user, as in a worker; before the parent-death signal
            _privileges.drop(self.config)  # (changing credentials clears it)
        except ClusterServerError as exc:
            send_blocking(self.channel, {"t": "error", "error": str(exc)})
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
                send_blocking(self.channel, {"t": "error", "error": str(exc)})
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
            send_blocking(self.channel, {"t": "error", "error": "importing the app started a thread", "threaded": True})
            return EXIT_THREADED
        gc.freeze()
        send_blocking(
            self.channel,
            {"t": "ready", "modules": count, "seconds": round(time.monotonic() - started, 3)},
        )
        return self.serve()

    # deps: what to import
    def discover(self) -> list[str]:
        """Import the app in a throwaway child; the names of the modules it loaded that
        are not the project's, in import order."""
        assert self.rules is not None
        r, w = os.pipe()
        _flush_output()
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
                    {"t": "error", "error": f"importing {name!r} started a thread", "threaded": True},
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
                    if isinstance(msg, ChannelError) or msg.get("t") != "spawn" or len(fds) != 1:
                        _close_fds(fds)
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
            send_blocking(self.channel, {"t": "stale", "files": changed[:20], "n": len(changed)})

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
            send_blocking(self.channel, {"t": "spawn_failed", "error": f"{type(exc).__name__}: {exc}"})
            return
        send_blocking(self.channel, {"t": "spawned", "pid": pid})

    def double_fork(self, spec: WorkerSpec, fd: int) -> int:
        """Fork a worker that the primary (a child subreaper) inherits; return its pid."""
        r, w = os.pipe()
        _flush_output()
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


# -- the primary's side --------------------------------------------------------


class Template:
    """One template process, as the primary sees it."""

    def __init__(self, launcher: TemplateLauncher, kind: Kind, generation: int) -> None:
        self.launcher = launcher
        self.kind = kind
        self.generation = generation  # preload: the first generation it forks; deps: 0
        self.state: Literal["building", "ready", "failed", "gone"] = "building"
        self.pid = 0
        self.channel: Channel | None = None
        self.started_at = launcher.primary.clock()
        self.error: str | None = None
        self.threaded = False
        self.stopping = False
        self.backlog: list[Message] = []  # messages that arrived while the primary awaited a pid

    @property
    def name(self) -> str:
        return f"{self.kind} template [pid {self.pid}]"

    def start(self) -> None:
        primary = self.launcher.primary
        ours, theirs = _channel.pair()
        close = [*primary.fds_to_close_in_child(), ours.fileno()]
        listeners = tuple(lst.sock for lst in primary.listeners)
        primary_pid = os.getpid()
        # The primary's own objects live as long as it does: freeze them so that its
        # collections do not copy the pages it shares with the template and workers.
        gc.freeze()
        _flush_output()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            template_main(primary.config, self.kind, theirs, close, primary_pid, listeners, self.launcher.rules)
        theirs.close()
        self.pid, self.channel = pid, Channel(ours)
        primary.on_child_exit[pid] = self._exited
        primary.add_reader(self.channel, self._on_channel)

    def fileno(self) -> int | None:
        return self.channel.fileno() if self.channel is not None and not self.channel.closed else None

    def _on_channel(self, mask: int) -> None:
        for msg in self._receive():
            self.launcher.template_message(self, msg)

    def _receive(self) -> list[Message]:
        if self.channel is None:
            return []
        out: list[Message] = []
        try:
            for msg, fds in self.channel.receive():
                _close_fds(fds)
                if isinstance(msg, ChannelError):
                    logger.warning("%s: dropped a message: %s", self.name, msg)
                else:
                    out.append(msg)
        except EOFError:
            self._close_channel()
        return out

    def _close_channel(self) -> None:
        if self.channel is not None:
            self.launcher.primary.remove_reader(self.channel)
            self.channel.close()
            self.channel = None

    def _exited(self, pid: int, status: int) -> None:
        self._close_channel()
        was = self.state
        self.state = "gone" if was == "ready" else "failed"
        self.launcher.template_exited(self, was, status)

    def spawn(self, worker: Worker) -> tuple[int, Channel]:
        """Have the template fork ``worker``; blocks until it answers (a few ms). Raises TemplateError."""
        if self.channel is None or self.state != "ready":
            raise TemplateError(f"{self.name} is not ready")
        ours, theirs = _channel.pair()
        request = {"t": "spawn", "id": worker.id, "generation": worker.generation}
        try:
            send_blocking(self.channel, request, [theirs.detach()], SPAWN_TIMEOUT)  # the channel owns the fd now
        except (OSError, TimeoutError) as exc:
            ours.close()
            raise TemplateError(f"{self.name} takes no requests: {exc}") from None
        deadline = time.monotonic() + SPAWN_TIMEOUT
        while True:
            for msg in self._receive():
                kind = msg.get("t")
                if kind == "spawned" and isinstance(msg.get("pid"), int) and msg["pid"] > 0:
                    return int(msg["pid"]), Channel(ours)
                if kind == "spawn_failed":
                    ours.close()
                    raise TemplateError(f"{self.name} could not fork a worker: {msg.get('error')}")
                self.backlog.append(msg)  # handled on the next tick
            remaining = deadline - time.monotonic()
            if self.channel is None or remaining <= 0:
                ours.close()
                why = "exited" if self.channel is None else f"did not answer within {SPAWN_TIMEOUT:g} s"
                raise TemplateError(f"{self.name} {why} while forking a worker")
            select.select([self.channel], [], [], remaining)

    def stop(self) -> None:
        """Ask it to exit; the primary reaps it (its workers are not affected)."""
        self.stopping = True
        self._close_channel()  # a template exits when its channel closes
        if self.pid and self.state in ("building", "ready"):
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


class TemplateLauncher:
    """Forks the workers through a template: a ``Launcher`` and a component of the primary.

    Falls back to forking a worker directly (it then imports the app itself) when
    no template is ready: while the dependency template is still being built, or
    when a template died or cannot be used.
    """

    def __init__(self, primary: Primary, kind: Kind, reloader: Reloader | None = None) -> None:
        from ._primary import ForkLauncher

        self.primary = primary
        self.kind = kind
        self.reloader = reloader
        rules = None
        if kind == "deps":
            rules = reloader.rules if reloader is not None else WatchRules.from_config(primary.config)
        self.rules = rules
        self.direct = ForkLauncher(
            primary,
            load=(lambda config: load_project(rules, config)) if rules is not None else load_with_traceback,
        )
        self.templates: list[Template] = []  # ready, by generation
        self.building: Template | None = None
        self.holding = False  # --preload start-up: the slots wait for the first template
        #: a roll waiting for a new template: (reason, slots or None for all, when it was asked for)
        self.roll_wanted: tuple[str, list[int] | None, float] | None = None
        self.approved = False  # the next roll() may start: its template is ready
        self.stale_files: list[str] = []
        self.disabled: str | None = None  # why no template is used any more
        self.last_crash = -math.inf
        self.warned_direct = False

    # -- Launcher -----------------------------------------------------------

    def spawn(self, worker: Worker) -> tuple[int, Channel | None]:
        template = self.template_for(worker.generation)
        if template is not None:
            try:
                return template.spawn(worker)
            except TemplateError as exc:
                logger.error("%s; forking worker %d directly and building a new template", exc, worker.id)
                self._drop(template)
                self.build(template.generation)
        elif self.kind == "preload" and not self.warned_direct:
            self.warned_direct = True
            why = self.disabled or "no preloaded template is ready"
            logger.warning("%s: forking worker %d directly (it imports the app itself)", why, worker.id)
        return self.direct.spawn(worker)

    def kill(self, pid: int, sig: int) -> None:
        self.direct.kill(pid, sig)

    def template_for(self, generation: int) -> Template | None:
        """The newest ready template made for ``generation`` or before (else the newest)."""
        ready = [t for t in self.templates if t.state == "ready" and t.channel is not None]
        fit = [t for t in ready if t.generation <= generation]
        return fit[-1] if fit else (ready[-1] if ready else None)

    # -- component hooks ------------------------------------------------------

    def attach(self, primary: Primary) -> None:
        if self.kind == "preload":
            self.holding = True  # workers wait for the template: that is the point of --preload
            for slot in primary.slots.values():
                slot.respawn_at = math.inf
        self.build(primary.generation if self.kind == "preload" else 0)

    def next_deadline(self) -> float | None:
        return self.primary.clock() if any(t.backlog for t in self.templates) else None

    def tick(self) -> None:
        for t in list(self.templates):
            while t.backlog:
                self.template_message(t, t.backlog.pop(0))

    def before_roll(self, reason: str, slots: list[int] | None = None) -> bool:
        if self.kind != "preload" or self.disabled:
            return True
        if self.approved:
            self.approved = False
            return True
        if self.roll_wanted is not None and (slots is None or self.roll_wanted[1] is None):
            slots = None  # a full roll covers a partial one asked for meanwhile
        elif self.roll_wanted is not None and self.roll_wanted[1] is not None:
            slots = sorted({*self.roll_wanted[1], *(slots or [])})
        self.roll_wanted = (reason, slots, self.primary.clock())
        if self.building is None:
            logger.info("%s: importing the new code in a new preload template before the rolling restart", reason)
            self.build(self.primary.generation + 1)
        return False

    def worker_event(self, event: str, worker: Worker) -> None:
        if event in ("ready", "exited"):
            self.retire()

    def fds_to_close_in_child(self) -> list[int]:
        everyone = [*self.templates, *([self.building] if self.building else [])]
        return [fd for t in everyone if (fd := t.fileno()) is not None]

    def close(self) -> None:
        everyone = [*self.templates, *([self.building] if self.building else [])]
        self.templates, self.building = [], None
        for t in everyone:
            t.stopping = True
            t._close_channel()
            if t.pid and t.state in ("building", "ready"):
                self.primary.on_child_exit.pop(t.pid, None)
                _stop_child(t.pid)

    # -- templates --------------------------------------------------------------

    def build(self, generation: int) -> None:
        """Start a new template (replacing one being built)."""
        if self.disabled or self.primary.stopping:
            return
        if self.building is not None:
            self.building.stop()
        self.building = Template(self, self.kind, generation)
        self.building.start()

    def _drop(self, template: Template) -> None:
        if template in self.templates:
            self.templates.remove(template)
        template.stop()

    def template_message(self, t: Template, msg: Message) -> None:
        kind = msg.get("t")
        if kind == "ready" and t.state == "building":
            t.state = "ready"
            logger.info(
                "%s ready: %s in %.2f s",
                t.name,
                "imported the app" if t.kind == "preload" else f"imported {msg.get('modules')} dependency modules",
                self.primary.clock() - t.started_at,
            )
            self.template_ready(t)
        elif kind == "error":
            t.error = str(msg.get("error"))[:4000]
            t.threaded = bool(msg.get("threaded"))
        elif kind == "stale":
            if t is not (self.templates[-1] if self.templates else None) or self.building is not None:
                return
            self.stale_files = [str(f) for f in msg.get("files") or ()]
            shown = ", ".join(self.stale_files[:3]) + (" ..." if len(self.stale_files) > 3 else "")
            logger.info("reload: dependencies changed (%s); building a new dependency template", shown)
            self.build(0)
        else:
            logger.warning("%s sent an unexpected message %.200r; ignored", t.name, msg)

    def template_ready(self, t: Template) -> None:
        if t is self.building:
            self.building = None
        if t.stopping:
            return
        if self.kind == "deps":
            old, self.templates = self.templates, [t]
            for o in old:
                o.stop()  # the workers it forked live on: they are the primary's
            if self.stale_files and self.reloader is not None:
                files, self.stale_files = self.stale_files, []
                self.reloader.reload(files, why="changed (a dependency)")
            return
        if self.holding:
            self.holding = False
            self._add(t)
            now = self.primary.clock()
            for slot in self.primary.slots.values():
                if slot.respawn_at == math.inf:
                    slot.respawn_at = now
            self.primary.manage_workers()
        elif self.roll_wanted is not None and t.started_at >= self.roll_wanted[2]:
            reason, slots, _ = self.roll_wanted
            self.roll_wanted = None
            t.generation = self.primary.generation + 1
            self._add(t)
            self.approved = True
            try:
                self.primary.roll(reason, slots)
            finally:
                self.approved = False
            self.retire()
            return
        else:
            self._add(t)  # a rebuild after a crash
        if self.roll_wanted is not None:  # asked for after this build began: build again
            self.build(self.primary.generation + 1)

    def _add(self, t: Template) -> None:
        self.templates.append(t)
        self.templates.sort(key=lambda x: (x.generation, x.started_at))

    def template_exited(self, t: Template, was: str, status: int) -> None:
        from ._primary import describe_status

        if t is self.building:
            self.building = None
        if t in self.templates:
            self.templates.remove(t)
        if t.stopping or self.primary.stopping:
            return
        how = describe_status(status)
        if was == "building":
            error = t.error or f"it exited ({how}) before it was ready"
            if t.threaded:
                self.disabled = f"the {t.kind} template cannot be used ({error}; forking it would be unsafe)"
                logger.warning("%s: workers are forked directly instead", self.disabled)
                self._release_slots()
            elif self.kind == "preload" and self.holding:
                self.holding = False
                self.primary.fail(AppLoadError(error))
            elif self.kind == "preload":
                reason = self.roll_wanted[0] if self.roll_wanted else "rolling restart"
                self.roll_wanted = None
                logger.error(
                    "%s: not rolling: the new code failed to import in the preload template; "
                    "the previous generation keeps serving:\n%s",
                    reason,
                    error,
                )
            else:
                logger.error("reload: the dependency template failed: %s; forking workers directly", error)
            return
        # A ready template died (OOM killer, a stray signal): its workers live on.
        now = self.primary.clock()
        if now - self.last_crash < REBUILD_INTERVAL:
            self.disabled = f"the {t.kind} template keeps dying ({how})"
            logger.error("%s: workers are forked directly from now on", self.disabled)
        else:
            logger.warning("%s exited (%s); building a new one", t.name, how)
            self.build(t.generation)
        self.last_crash = now

    def _release_slots(self) -> None:
        if self.holding:
            self.holding = False
            for slot in self.primary.slots.values():
                if slot.respawn_at == math.inf:
                    slot.respawn_at = self.primary.clock()
            self.primary.manage_workers()

    def retire(self) -> None:
        """Stop the preload templates no slot will fork from again (their workers live on)."""
        if self.kind != "preload" or len(self.templates) < 2:
            return
        gens = {s.generation for s in self.primary.slots.values()}
        roll = self.primary.roll_state
        if roll is not None:
            gens.add(roll.generation)
        needed = {id(self.template_for(g)) for g in gens}
        for t in self.templates[:-1]:
            if id(t) not in needed:
                self.templates.remove(t)
                t.stop()


def install(primary: Primary) -> None:
    """Set up ``--preload`` or ``--reload`` on a primary (a launcher and components)."""
    from ._primary import ForkLauncher

    config = primary.config
    if not (config.preload or config.reload):
        return
    reloader = Reloader(config) if config.reload else None
    if _proc.set_child_subreaper():
        launcher = TemplateLauncher(primary, "deps" if config.reload else "preload", reloader)
        primary.launcher = launcher
        primary.add_component(launcher)
    else:
        logger.warning(
            "this system cannot re-parent workers to the primary (no PR_SET_CHILD_SUBREAPER): "
            "workers are forked directly, without a template"
        )
        if reloader is not None:
            rules = reloader.rules
            primary.launcher = ForkLauncher(primary, load=lambda c: load_project(rules, c))
    if reloader is not None:
        primary.add_component(reloader)


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
