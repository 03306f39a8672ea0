"""The primary's side of template processes: a ``Launcher`` that forks workers
through a template, and the component that builds, replaces and retires templates.

See ``templates/process.py`` for what a template is and why its workers are the
primary's children (a child subreaper and a double fork).
"""

from __future__ import annotations

import functools
import gc
import logging
import math
import os
import select
import signal
import time
from typing import TYPE_CHECKING, Literal

from cluster_server import _proc
from cluster_server._config import Config
from cluster_server._errors import AppLoadError, ConfigError
from cluster_server.primary.component import Component, WorkerEvent, override
from cluster_server.primary.launcher import ForkLauncher
from cluster_server.templates.process import (
    Kind,
    TemplateError,
    load_project,
    load_with_traceback,
    template_main,
)
from cluster_server.templates.reload import Reloader, WatchRules, _stop_child
from cluster_server.wire import channel as _channel
from cluster_server.wire.channel import Channel, Message, receive_all, send_blocking
from cluster_server.wire.messages import ERROR, READY, SPAWN, SPAWN_FAILED, SPAWNED, STALE

if TYPE_CHECKING:
    from cluster_server.primary.loop import Primary, Worker

logger = logging.getLogger("cluster_server")

#: how long the primary waits for a template to answer a spawn request. The primary
#: does nothing else meanwhile (under least-busy and round-robin it accepts no
#: connection): a template answers in milliseconds (two forks), so one that takes a
#: second is wedged (stopped, swapping) and is replaced; the worker is forked directly
SPAWN_TIMEOUT = 1.0
#: a template that dies unexpectedly is rebuilt, but not more often than this
REBUILD_INTERVAL = 30.0


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
        self.privileges = False  # its error: --user/--group could not be switched to
        self.stopping = False
        self.backlog: list[Message] = []  # messages that arrived while the primary awaited a pid

    @property
    def name(self) -> str:
        return f"{self.kind} template [pid {self.pid}]"

    def start(self) -> None:
        primary = self.launcher.primary
        main = functools.partial(
            template_main,
            primary.config,
            self.kind,
            primary_pid=os.getpid(),
            listeners=tuple(lst.sock for lst in primary.listeners),
            rules=self.launcher.rules,
        )
        # The primary's own objects live as long as it does: freeze them so that its
        # collections do not copy the pages it shares with the template and workers.
        gc.freeze()
        self.pid, ours = primary.start_child(main, self._exited)
        self.channel = Channel(ours)
        primary.add_reader(self.channel, self._on_channel)

    def fileno(self) -> int | None:
        return self.channel.fileno() if self.channel is not None and not self.channel.closed else None

    def _on_channel(self, mask: int) -> None:
        for msg in self._receive():
            self.launcher.template_message(self, msg)

    def _receive(self) -> list[Message]:
        out: list[Message] = []

        def keep(msg: Message, fds: list[int]) -> None:
            _proc.close_all(fds)  # a template sends none
            out.append(msg)

        if self.channel is not None and not receive_all(self.channel, keep, self.name):
            self._close_channel()
        return out

    def _close_channel(self) -> None:
        if self.channel is not None:
            self.launcher.primary.close_reader(self.channel)
            self.channel = None

    def _exited(self, pid: int, status: int) -> None:
        self._close_channel()
        was = self.state
        self.state = "gone" if was == "ready" else "failed"
        self.launcher.template_exited(self, was, status)

    def spawn(self, worker: Worker) -> tuple[int, Channel]:
        """Have the template fork ``worker``; blocks until it answers (a few ms), at most
        SPAWN_TIMEOUT. Raises TemplateError.

        A template that answers after the timeout has forked a worker the primary
        does not know: that worker finds its channel closed and exits, and the
        primary reaps it as a stranger.
        """
        if self.channel is None or self.state != "ready":
            raise TemplateError(f"{self.name} is not ready")
        ours, theirs = _channel.pair()
        request = {"t": SPAWN, "id": worker.id, "generation": worker.generation}
        try:
            send_blocking(self.channel, request, [theirs.detach()], SPAWN_TIMEOUT)  # the channel owns the fd now
        except (OSError, TimeoutError) as exc:
            ours.close()
            raise TemplateError(f"{self.name} takes no requests: {exc}") from None
        deadline = time.monotonic() + SPAWN_TIMEOUT
        while True:
            for msg in self._receive():
                kind = msg.get("t")
                if kind == SPAWNED and isinstance(msg.get("pid"), int) and msg["pid"] > 0:
                    return int(msg["pid"]), Channel(ours)
                if kind == SPAWN_FAILED:
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
            self.launcher.kill(self.pid, signal.SIGTERM)


class TemplateLauncher(Component):
    """Forks the workers through a template: a ``Launcher`` and a component of the primary.

    Falls back to forking a worker directly (it then imports the app itself) when
    no template is ready: while the dependency template is still being built, or
    when a template died or cannot be used.
    """

    essential = True  # it forks the workers

    primary: Primary  # set by attach

    def __init__(self, config: Config, kind: Kind, reloader: Reloader | None = None) -> None:
        self.kind = kind
        self.reloader = reloader
        rules = None
        if kind == "deps":
            rules = reloader.rules if reloader is not None else WatchRules.from_config(config)
        self.rules = rules
        self.direct = ForkLauncher(
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

    @override
    def attach(self, primary: Primary) -> None:
        self.primary = primary
        self.direct.attach(primary)
        if self.kind == "preload":
            self.holding = True  # workers wait for the template: that is the point of --preload
            primary.hold_slots()
        self.build(primary.generation if self.kind == "preload" else 0)

    @override
    def next_deadline(self) -> float | None:
        return self.primary.clock() if any(t.backlog for t in self.templates) else None

    @override
    def tick(self) -> None:
        for t in list(self.templates):
            while t.backlog:
                self.template_message(t, t.backlog.pop(0))

    @override
    def before_roll(self, reason: str, slots: list[int] | None) -> bool:
        if self.kind != "preload" or self.disabled:
            return True
        if self.approved:
            self.approved = False
            return True
        if self.roll_wanted is not None:  # asked for again before the template was ready: merge
            wanted = self.roll_wanted[1]
            # a full roll covers a partial one asked for meanwhile
            slots = None if slots is None or wanted is None else sorted({*wanted, *slots})
        self.roll_wanted = (reason, slots, self.primary.clock())
        if self.building is None:
            logger.info("%s: importing the new code in a new preload template before the rolling restart", reason)
            self.build(self.primary.generation + 1)
        return False

    @override
    def worker_event(self, event: WorkerEvent, worker: Worker) -> None:
        if event in ("ready", "exited"):
            self.retire()

    def _everyone(self) -> list[Template]:
        """The ready templates and the one being built."""
        return [*self.templates, *([self.building] if self.building else [])]

    @override
    def fds_to_close_in_child(self) -> list[int]:
        return [fd for t in self._everyone() if (fd := t.fileno()) is not None]

    @override
    def close(self) -> None:
        everyone = self._everyone()
        self.templates, self.building = [], None
        for t in everyone:
            t.stopping = True
            t._close_channel()
            if t.pid and t.state in ("building", "ready"):
                self.primary.forget_child(t.pid)
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
        if kind == READY and t.state == "building":
            t.state = "ready"
            logger.info(
                "%s ready: %s in %.2f s",
                t.name,
                "imported the app" if t.kind == "preload" else f"imported {msg.get('modules')} dependency modules",
                self.primary.clock() - t.started_at,
            )
            self.template_ready(t)
        elif kind == ERROR:
            t.error = str(msg.get("error"))[:4000]
            t.threaded = bool(msg.get("threaded"))
            t.privileges = msg.get("stage") == "privileges"
        elif kind == STALE:
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
            self._add(t)
            self._release_slots()
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
        if t is self.building:
            self.building = None
        if t in self.templates:
            self.templates.remove(t)
        if t.stopping or self.primary.stopping:
            return
        how = _proc.describe_status(status)
        if was == "building":
            error = t.error or f"it exited ({how}) before it was ready"
            if t.threaded:
                self.disabled = f"the {t.kind} template cannot be used ({error}; forking it would be unsafe)"
                logger.warning("%s: workers are forked directly instead", self.disabled)
                self._release_slots()
            elif self.kind == "preload" and self.holding:
                self.holding = False
                self.primary.fail(ConfigError(error) if t.privileges else AppLoadError(error))
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
        """The slots held for the first template may fill now."""
        if self.holding:
            self.holding = False
            self.primary.release_slots()

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
