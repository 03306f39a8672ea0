"""The worker: what a forked child does, from fork hygiene to exit.

Messages a worker sends on its channel (JSON objects, key ``t`` is the type):

- ``{"t": "ready"}`` once lifespan startup finished and the sockets are served;
- ``{"t": "hb", "r": requests, "c": open_connections}`` every heartbeat interval,
  from the event loop;
- ``{"t": "boot_error", "error": "...", "stage": "load" | "lifespan"}`` when the
  app cannot be loaded or its lifespan startup fails (then the worker exits
  with status 3);
- ``{"t": "ack", ...}`` under ``--scheduling round-robin/least-busy``: which handed-over
  connections it took or refused, and its load (see ``scheduling/``).

Messages it handles (``server.handlers``): ``{"t": "health", "ok": bool}``
(``--health-path`` answers 503 once ``ok`` is false; see ``worker/health.py``);
``{"t": "conn", "b": batch}`` with connection fds (``scheduling/worker.py``).
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
from dataclasses import dataclass
from typing import Any, NoReturn

import uvicorn

from cluster_server import _proc
from cluster_server._config import Config
from cluster_server._errors import AppLoadError, BindError, ChannelError, ClusterServerError
from cluster_server.cluster.http import enter_worker
from cluster_server.ops import privileges as _privileges
from cluster_server.scheduling.protocol import HANDOFF
from cluster_server.scheduling.worker import WorkerHandOff, worker_sockets
from cluster_server.wire.channel import Channel, FdsTruncated
from cluster_server.worker.health import HealthMiddleware, HealthState, health_handler
from cluster_server.worker.interface import adapt_app
from cluster_server.worker.uvicorn_glue import WorkerServer, guard_request_head, run_on_fresh_loop, wrap_loaded_app

logger = logging.getLogger("cluster_server.worker")

#: exit status of a worker that could not load the app or start it
EXIT_BOOT_FAILURE = 3
#: the signal the kernel sends a worker whose primary died (Linux)
ORPHAN_SIGNAL = signal.SIGUSR2
#: seconds an orphaned worker gets to finish before it is gone for good
ORPHAN_GRACE = 1.0
#: the signal that makes a worker dump every thread's stack to stderr
DUMP_SIGNAL = signal.SIGUSR1
#: a worker forked by a template waits this long to be re-parented to the primary
REPARENT_TIMEOUT = 2.0


@dataclass(frozen=True)
class WorkerSpec:
    """What the primary tells a new worker, frozen at fork time."""

    id: int
    generation: int
    primary_pid: int
    listeners: tuple[socket.socket, ...]


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
        access_log=config.access_log,
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


def worker_main(
    config: Config,
    spec: WorkerSpec,
    channel_sock: socket.socket,
    close_fds: list[int],
    load: Callable[[Config], Any] = load_app,
) -> NoReturn:
    """Entry point of a forked worker. Never returns: always ``os._exit``.

    ``load`` returns the app (a template passes the app it preloaded, or an
    importer that reloads the project's modules).
    """
    code = 1
    try:
        _proc.after_fork_in_child(close_fds)
        code = _run(config, spec, Channel(channel_sock), load)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        logger.exception("worker %d crashed", spec.id)
        code = 1
    finally:
        logging.shutdown()
        _proc.flush_output()  # tolerates a closed or None stream: nothing may stop os._exit
        os._exit(code)


def _await_parent(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` is our parent: a worker double-forked by a template is
    re-parented to the primary (a child subreaper) once the middle process exits."""
    deadline = time.monotonic() + timeout
    while os.getppid() != pid:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.0005)
    return True


def _run(config: Config, spec: WorkerSpec, channel: Channel, load: Callable[[Config], Any] = load_app) -> int:
    _proc.set_title(f"cluster-server: worker {spec.id} [{config.app_name}]")
    # (before dropping privileges: cluster-server's own imports do not depend on --user's rights)
    link = enter_worker(spec.id, channel)  # cluster.is_worker, before the app is imported
    family = spec.listeners[0].family if spec.listeners else socket.AF_INET
    try:  # this worker's own sockets (reuseport), bound before --user drops the right to low ports
        sockets = worker_sockets(config, spec.listeners)
    except BindError as exc:
        channel.send({"t": "boot_error", "error": str(exc)})
        return 1
    try:  # --user/--group, before the parent-death signal: changing credentials clears it
        _privileges.drop(config)
    except ClusterServerError as exc:
        channel.send({"t": "boot_error", "error": str(exc)})
        return EXIT_BOOT_FAILURE
    # The parent-death signal fires when the *current* parent dies: set it only
    # once the primary is our parent, or a template's middle process would fire it.
    if not _await_parent(spec.primary_pid, REPARENT_TIMEOUT):
        return 1
    _proc.set_parent_death_signal(ORPHAN_SIGNAL)
    if os.getppid() != spec.primary_pid:
        return 1  # the primary died before we could ask to be told
    signal.signal(ORPHAN_SIGNAL, signal.SIG_DFL)  # until the server installs its handler

    def report(msg: dict[str, Any]) -> None:
        try:
            channel.send(msg)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the primary is gone; the orphan path ends us

    try:
        if config.env_file is not None:
            _proc.load_env_file(config.env_file)
        app = load(config)
        uconfig = uvicorn_config(config, app)
        uconfig.load()
        head_guard = guard_request_head(uconfig, config.timeout_request_header, config.max_request_head_size)
    except AppLoadError as exc:
        report({"t": "boot_error", "error": str(exc), "stage": "load"})
        return EXIT_BOOT_FAILURE
    except SystemExit:  # uvicorn's Config.load exits on what it cannot load
        error = f"uvicorn could not load {config.app_name}; see the log above"
        report({"t": "boot_error", "error": error, "stage": "load"})
        return EXIT_BOOT_FAILURE

    server = WorkerServer(
        uconfig,
        on_ready=lambda: report({"t": "ready"}),
        on_heartbeat=lambda s: report({"t": "hb", "r": s.total_requests, "c": s.open_connections}),
        heartbeat_interval=config.heartbeat_interval,
        head_guard=head_guard,
    )
    if (health_path := config.health_path) is not None:
        health = HealthState()
        wrap_loaded_app(uconfig, lambda app: HealthMiddleware(app, health_path, health))
        server.handlers["health"] = health_handler(health)

    def orphaned(*_: Any) -> None:
        # The primary is gone: finish quickly, and never outlive it by more than ~2 s.
        signal.alarm(int(ORPHAN_GRACE) + 1)
        server.drain(ORPHAN_GRACE)

    def orphan_signal(*_: Any) -> None:
        # Only if the primary is really gone: the same signal sent to the whole process
        # group (`systemctl kill -s USR2`, meant for the primary's upgrade) is ignored.
        if os.getppid() != spec.primary_pid:
            orphaned()

    signal.signal(ORPHAN_SIGNAL, orphan_signal)
    # A hung worker: the primary sends DUMP_SIGNAL, we print every thread's stack
    # (from C, so it works while the event loop is blocked), then it kills us.
    faulthandler.register(DUMP_SIGNAL, all_threads=True, chain=False)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        link.serve(server, loop)

        def on_channel() -> None:
            try:
                for msg, fds in channel.receive():
                    if isinstance(msg, FdsTruncated) and msg.message is not None:
                        msg = {**msg.message, "ctrunc": True}  # the handler refuses what it lost
                    handler = None if isinstance(msg, ChannelError) else server.handlers.get(str(msg.get("t")))
                    if handler is None:
                        _proc.close_all(fds)
                        logger.warning("worker %d: dropped a message from the primary: %.200s", spec.id, msg)
                        continue
                    assert not isinstance(msg, ChannelError)
                    handler(msg, fds)
            except EOFError:
                loop.remove_reader(channel.fileno())
                orphaned()

        if config.scheduling in HANDOFF:
            handoff = WorkerHandOff(server, channel, least_busy=config.scheduling == "least-busy", family=family)
            handoff.install(loop)
        loop.add_reader(channel.fileno(), on_channel)
        await server.serve(sockets=sockets)

    try:
        run_on_fresh_loop(serve(), uconfig)
    except SystemExit as exc:
        if not server.started:  # lifespan startup failed; uvicorn logged why
            error = f"lifespan startup of {config.app_name} failed; see the log above"
            report({"t": "boot_error", "error": error, "stage": "lifespan"})
            return EXIT_BOOT_FAILURE
        return exc.code if isinstance(exc.code, int) else 1
    return 0
