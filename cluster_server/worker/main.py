"""The worker: what a forked child does, from fork hygiene to exit.

On its channel it sends ``ready``, ``hb`` and ``boot_error`` (and, through the
hand-off and the messaging link, ``ack``, ``msg``, ``bcast``, ``req``); it
handles what the primary sends through ``server.handlers``, keyed by type:
``health`` (``worker/health.py``), ``conn`` (``scheduling/worker.py``), ``msg``
and ``res`` (``cluster/http.py``). Every message and its fields: the ``worker``
channel in ``wire/messages.py`` (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import faulthandler
import importlib
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, Literal

import uvicorn

from cluster_server import _logging, _proc
from cluster_server._config import Config
from cluster_server._errors import AppLoadError, BindError, ClusterServerError
from cluster_server.cluster.http import enter_worker
from cluster_server.ops import privileges as _privileges
from cluster_server.scheduling.protocol import HANDOFF
from cluster_server.scheduling.worker import WorkerHandOff, worker_sockets
from cluster_server.wire.channel import Channel, Message, receive_all, send_blocking
from cluster_server.wire.messages import BOOT_ERROR, HEALTH, HEARTBEAT, READY
from cluster_server.worker.access import TimedAccessLog
from cluster_server.worker.error_page import LifespanErrors, error_app
from cluster_server.worker.health import HealthMiddleware, HealthState, health_handler
from cluster_server.worker.interface import adapt_app
from cluster_server.worker.request_metrics import FRESH_INTERVAL, RequestStats
from cluster_server.worker.spec import DUMP_SIGNAL, EXIT_BOOT_FAILURE, WorkerSpec
from cluster_server.worker.uvicorn_glue import (
    WorkerServer,
    count_requests,
    guard_request_head,
    run_on_fresh_loop,
    wrap_loaded_app,
)

logger = logging.getLogger("cluster_server.worker")

#: what a ``boot_error`` says failed: binding its own socket (``--scheduling
#: reuseport``), switching to ``--user``/``--group``, loading the app, or its lifespan startup
BootStage = Literal["bind", "privileges", "load", "lifespan"]
#: how long a worker that cannot start waits for the primary to take its boot error
BOOT_ERROR_FLUSH = 2.0
#: longest boot error sent (a message must fit the channel's limit)
MAX_BOOT_ERROR = 8000

#: the signal the kernel sends a worker whose primary died (Linux)
ORPHAN_SIGNAL = signal.SIGUSR2
#: seconds an orphaned worker gets to finish before it is gone for good
ORPHAN_GRACE = 1.0
#: a worker forked by a template waits this long to be re-parented to the primary
REPARENT_TIMEOUT = 2.0


def load_app(config: Config) -> Any:
    """Import ``config.app`` (or take the object), call it if it is a factory.

    Raises AppLoadError with one line that says what is wrong and where.
    """
    app = config.app
    if isinstance(app, str):
        app = import_app(app, config.app_dir)
    if config.factory:
        try:
            app = app()
        except Exception as exc:
            raise AppLoadError(f"app factory {config.app_name} raised {_describe(exc)}") from exc
    return app


def import_app(target: str, app_dir: str = ".") -> Any:
    module_name, sep, attrs = target.partition(":")
    if not sep or not module_name or not attrs:
        raise AppLoadError(f"APP must look like 'module:attribute', not {target!r}")
    path = os.path.abspath(app_dir)
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise AppLoadError(
                f"cannot import {module_name!r}: no module named {exc.name!r}; check the APP path or --app-dir"
            ) from None
        raise AppLoadError(f"importing {module_name!r} raised {_describe(exc)}") from exc
    except SyntaxError as exc:
        where = f"{exc.filename}:{exc.lineno}" if exc.filename else module_name
        raise AppLoadError(f"syntax error in {where}: {exc.msg}") from None
    except Exception as exc:
        raise AppLoadError(f"importing {module_name!r} raised {_describe(exc)}") from exc
    obj: Any = module
    for attr in attrs.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise AppLoadError(
                f"module {module_name!r} has no attribute {attrs!r}; check the name after ':' in APP"
            ) from None
    return obj


def _describe(exc: BaseException) -> str:
    """``ValueError: boom (at app.py:12)``: the exception and where it was raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def uvicorn_config(config: Config, app: Any) -> uvicorn.Config:
    # Leave a little of the graceful timeout for lifespan shutdown before the
    # primary's SIGKILL.
    grace = max(config.graceful_timeout - min(1.0, config.graceful_timeout / 4), 0.0)
    app, detected = adapt_app(app, config)  # a WSGI app comes back wrapped in a2wsgi (ASGI 3)
    return uvicorn.Config(
        app,
        loop=config.loop,
        http=config.http,
        ws="none" if detected == "wsgi" else config.ws,
        lifespan=config.lifespan,
        interface="asgi3" if detected == "wsgi" else detected,
        root_path=config.root_path,
        proxy_headers=config.proxy_headers,
        forwarded_allow_ips=config.forwarded_allow_ips,
        log_config=None,  # the CLI configured logging in the primary; we inherit it
        log_level=config.log_level,
        # timed access lines come from TimedAccessLog, once the response is sent
        access_log=config.access_log and not _logging.timed_access(config),
        http2=config.http2,
        ws_max_size=config.ws_max_size,
        ws_max_queue=config.ws_max_queue,
        ws_ping_interval=config.ws_ping_interval,
        ws_ping_timeout=config.ws_ping_timeout,
        ws_per_message_deflate=config.ws_per_message_deflate,
        server_header=config.server_header,
        date_header=config.date_header,
        headers=[_header(h) for h in config.headers],
        reset_contextvars=config.reset_contextvars,
        ssl_version=config.ssl_version,
        timeout_keep_alive=config.timeout_keep_alive,
        limit_concurrency=config.limit_concurrency,
        backlog=config.backlog,
        ssl_keyfile=config.ssl_keyfile,
        ssl_certfile=config.ssl_certfile,
        ssl_keyfile_password=config.ssl_keyfile_password,
        ssl_ca_certs=config.ssl_ca_certs,
        ssl_cert_reqs=config.ssl_cert_reqs,
        ssl_ciphers=config.ssl_ciphers,
        timeout_graceful_shutdown=grace,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=config.h11_max_incomplete_event_size,
        workers=1,
    )


def _header(header: str) -> tuple[str, str]:
    """``"Name: value"`` (from --header) as uvicorn wants it: (name, value)."""
    name, _, value = header.partition(":")
    return name.strip(), value.strip()


def load_env_file(path: str) -> None:
    """Set the variables of a dotenv file, as uvicorn does (python-dotenv; the environment wins)."""
    from dotenv import load_dotenv

    load_dotenv(dotenv_path=path, override=False)


def app_config(config: Config, load: Callable[[Config], Any]) -> uvicorn.Config:
    """The app, loaded and wrapped, in uvicorn's loaded config. Raises AppLoadError (or uvicorn's SystemExit)."""
    if config.env_file is not None:
        load_env_file(config.env_file)
    uconfig = uvicorn_config(config, load(config))
    uconfig.load()
    if config.http != "zttp":  # zttp's protocols (HTTP/2 too) keep no request cycle to watch
        guard_request_head(uconfig, config.timeout_request_header, config.max_request_head_size)
    if _logging.timed_access(config):
        wrap_loaded_app(uconfig, TimedAccessLog)
    return uconfig


def run_worker(
    config: Config, spec: WorkerSpec, channel_sock: socket.socket, load: Callable[[Config], Any] | None = None
) -> int:
    """A forked worker's life, after the fork hygiene (``worker_main`` in ``worker/spec.py``):
    its exit status. ``load`` returns the app (default: import ``config.app``)."""
    return _WorkerProcess(config, spec, Channel(channel_sock), load or load_app).run()


def boot_failure(channel: Channel, error: str, stage: BootStage) -> int:
    """Tell the primary why this worker cannot start; the exit status to use.

    Waits (at most BOOT_ERROR_FLUSH) until the kernel took the message and
    everything queued before it (what the app sent at import): ``os._exit``
    follows, and a message still queued in the channel would be lost with it.
    """
    msg = {"t": BOOT_ERROR, "error": error[:MAX_BOOT_ERROR], "stage": stage}
    try:
        send_blocking(channel, msg, timeout=BOOT_ERROR_FLUSH)
    except (OSError, TimeoutError):
        pass  # the primary is gone, or reads nothing: it reports the exit status
    return EXIT_BOOT_FAILURE


def _await_parent(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` is our parent: a worker double-forked by a template is
    re-parented to the primary (a child subreaper) once the middle process exits."""
    deadline = time.monotonic() + timeout
    while os.getppid() != pid:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.0005)
    return True


def _heartbeat(config: Config, report: Callable[[dict[str, Any]], None]) -> Callable[[WorkerServer], None]:
    """The heartbeat: requests and connections so far, and with --metrics-bind the request metrics."""
    stats = RequestStats() if config.metrics_bind else None
    if stats is not None:
        count_requests(stats)

    def heartbeat(s: WorkerServer) -> None:
        msg: dict[str, Any] = {"t": HEARTBEAT, "r": s.total_requests, "c": s.open_connections}
        if stats is not None:
            msg["m"] = stats.report(s.requests_in_flight)
        report(msg)

    return heartbeat


class _WorkerProcess:
    """One HTTP worker's life, after the fork hygiene: returns its exit status."""

    def __init__(self, config: Config, spec: WorkerSpec, channel: Channel, load: Callable[[Config], Any]) -> None:
        self.config, self.spec, self.channel, self.load = config, spec, channel, load
        self.sockets: list[socket.socket] | None = None
        self.server: WorkerServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def run(self) -> int:
        config = self.config
        _proc.set_title(f"cluster-server: worker {self.spec.id} [{config.app_name}]")
        # (before dropping privileges: cluster-server's own imports do not depend on --user's rights)
        self.link = enter_worker(self.spec.id, self.channel)  # cluster.is_worker, before the app is imported
        failed = self._settle()
        if failed is not None:
            return failed
        try:
            uconfig = app_config(config, self.load)
        except AppLoadError as exc:
            return self._cannot_start(str(exc), "load")
        except SystemExit:  # uvicorn's Config.load exits on what it cannot load
            return self._cannot_start(f"uvicorn could not load {config.app_name}; see the log above", "load")
        lifespan = LifespanErrors(uconfig.loaded_app) if config.reload else None
        if lifespan is not None:
            wrap_loaded_app(uconfig, lambda _: lifespan)
        code = self._run_server(uconfig)
        if code is None:  # lifespan startup failed; uvicorn logged why
            why = f": {lifespan.error}" if lifespan is not None and lifespan.error else "; see the log above"
            return self._cannot_start(f"lifespan startup of {config.app_name} failed{why}", "lifespan")
        return code

    def _run_server(self, uconfig: uvicorn.Config, error_page: bool = False) -> int | None:
        """Serve until told to stop: the exit status, or None if lifespan startup failed."""
        server = self.server = self._make_server(uconfig, error_page)
        signal.signal(ORPHAN_SIGNAL, self._orphan_signal)
        # A hung worker: the primary sends DUMP_SIGNAL, we print every thread's stack
        # (from C, so it works while the event loop is blocked), then it kills us.
        faulthandler.register(DUMP_SIGNAL, all_threads=True, chain=False)
        try:
            run_on_fresh_loop(self._serve(), uconfig)
        except SystemExit as exc:
            if not server.started:
                return None
            return exc.code if isinstance(exc.code, int) else 1
        return 0

    def _cannot_start(self, error: str, stage: BootStage) -> int:
        """Tell the primary; under --reload, then serve the error page (see ``worker/error_page.py``)."""
        if not self.config.reload:
            return boot_failure(self.channel, error, stage)
        self.report({"t": BOOT_ERROR, "error": error[:MAX_BOOT_ERROR], "stage": stage})
        uconfig = uvicorn_config(self.config, error_app(error))
        uconfig.lifespan = "off"
        uconfig.load()
        code = self._run_server(uconfig, error_page=True)
        return EXIT_BOOT_FAILURE if code is None else code

    def _settle(self) -> int | None:
        """Bind this worker's own sockets, drop privileges, become the primary's child and
        ask to be told when it dies. An exit status when the worker cannot."""
        config, spec = self.config, self.spec
        try:  # this worker's own sockets (reuseport), bound before --user drops the right to low ports
            self.sockets = worker_sockets(config, spec.listeners)
        except BindError as exc:
            return boot_failure(self.channel, str(exc), "bind")
        try:  # --user/--group, before the parent-death signal: changing credentials clears it
            _privileges.drop(config)
        except ClusterServerError as exc:
            return boot_failure(self.channel, str(exc), "privileges")
        # The parent-death signal fires when the *current* parent dies: set it only
        # once the primary is our parent, or a template's middle process would fire it.
        if not _await_parent(spec.primary_pid, REPARENT_TIMEOUT):
            return 1
        _proc.set_parent_death_signal(ORPHAN_SIGNAL)
        if os.getppid() != spec.primary_pid:
            return 1  # the primary died before we could ask to be told
        signal.signal(ORPHAN_SIGNAL, signal.SIG_DFL)  # until the server installs its handler
        return None

    def _make_server(self, uconfig: uvicorn.Config, error_page: bool = False) -> WorkerServer:
        ready: Message = {"t": READY, "error_page": True} if error_page else {"t": READY}
        server = WorkerServer(
            uconfig,
            on_ready=lambda: self.report(ready),
            on_heartbeat=_heartbeat(self.config, self.report),
            heartbeat_interval=self.config.heartbeat_interval,
            fresh_interval=FRESH_INTERVAL,
            # the request-head guard's clock, swept from the server's tick (see guard_request_head)
            head_guard=getattr(uconfig.http_protocol_class, "_cs_guard", None),
        )
        if (health_path := self.config.health_path) is not None and not error_page:
            health = HealthState()
            wrap_loaded_app(uconfig, lambda app: HealthMiddleware(app, health_path, health))
            server.handlers[HEALTH] = health_handler(health)
        return server

    def report(self, msg: Message) -> None:
        try:
            self.channel.send(msg)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the primary is gone; the orphan path ends us

    def _orphaned(self) -> None:
        # The primary is gone: finish quickly, and never outlive it by more than ~2 s.
        assert self.server is not None
        signal.alarm(int(ORPHAN_GRACE) + 1)
        self.server.drain(ORPHAN_GRACE)

    def _orphan_signal(self, *_: Any) -> None:
        # Only if the primary is really gone: the same signal sent to the whole process
        # group (`systemctl kill -s USR2`, meant for the primary's upgrade) is ignored.
        if os.getppid() != self.spec.primary_pid:
            self._orphaned()

    async def _serve(self) -> None:
        server, channel, config = self.server, self.channel, self.config
        assert server is not None
        loop = self.loop = asyncio.get_running_loop()
        self.link.serve(server, loop)
        if config.scheduling in HANDOFF:
            family = self.spec.listeners[0].family if self.spec.listeners else socket.AF_INET
            handoff = WorkerHandOff(server, channel, least_busy=config.scheduling == "least-busy", family=family)
            handoff.install(loop)
        loop.add_reader(channel.fileno(), self._on_channel)
        await server.serve(sockets=self.sockets)

    def _on_channel(self) -> None:
        # (a message that lost fds is handed on marked "ctrunc": its handler refuses what it lost)
        if not receive_all(self.channel, self._dispatch, f"worker {self.spec.id}", truncated=True):
            assert self.loop is not None
            self.loop.remove_reader(self.channel.fileno())
            self._orphaned()

    def _dispatch(self, msg: Message, fds: list[int]) -> None:
        assert self.server is not None
        handler = self.server.handlers.get(str(msg.get("t")))
        if handler is None:
            _proc.close_all(fds)
            logger.warning("worker %d: dropped a message from the primary: %.200s", self.spec.id, msg)
            return
        handler(msg, fds)
