"""Which interface an app speaks (ASGI 3, ASGI 2 or WSGI), and the WSGI adapter.

uvicorn's ``interface="auto"`` never picks WSGI (it calls a Flask app an ASGI 2
app, which then fails on the first request), and its ``interface="wsgi"`` uses
its own deprecated adapter. Here ``auto`` reads the app's signature, and a WSGI
app is wrapped in ``a2wsgi.WSGIMiddleware`` with a bounded thread pool before
uvicorn sees it, so uvicorn only ever serves ASGI 3 or ASGI 2.

a2wsgi streams both ways: ``wsgi.input`` pulls the request body from uvicorn a
message at a time (and uvicorn stops reading the socket past 64 KiB buffered),
and each chunk a WSGI response yields goes through a short queue to the socket,
so neither a large upload nor a large download is held whole in memory.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Literal

from cluster_server._config import Config

logger = logging.getLogger("cluster_server.worker")

Interface = Literal["asgi3", "asgi2", "wsgi"]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def detect_interface(app: Any) -> Interface:
    """Guess the interface of ``app`` from what it is and how it is called.

    - a coroutine function, or an object whose ``__call__`` is one: ASGI 3
      (``async def app(scope, receive, send)``, Starlette, FastAPI, Django's ASGIHandler);
    - a class: ASGI 2 (instantiated with the scope), or ASGI 3 if it is awaitable;
    - a plain callable taking two positional arguments: WSGI
      (``def app(environ, start_response)``, Flask, Django's WSGIHandler);
    - three positional arguments: ASGI 3 (a sync callable returning an awaitable);
      one: ASGI 2.

    Anything else (``*args`` wrappers...) gets uvicorn's own rule; pass
    ``--interface`` to be explicit.
    """
    if inspect.isclass(app):
        return "asgi3" if hasattr(app, "__await__") else "asgi2"
    call = app if inspect.isroutine(app) or isinstance(app, functools.partial) else getattr(app, "__call__", None)  # noqa: B004
    if call is None:
        return "asgi3"  # not callable at all: uvicorn reports it
    if _is_coroutine_function(call):
        return "asgi3"
    try:
        params = list(inspect.signature(app).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return "asgi2"
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return "asgi2"  # uvicorn's rule for a callable that is not a coroutine function
    positional = [p for p in params if p.kind in _POSITIONAL]
    if len(positional) == 2:
        return "wsgi"
    if len(positional) == 3:
        return "asgi3"
    return "asgi2"


def _is_coroutine_function(func: Any) -> bool:
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func)


def adapt_app(app: Any, config: Config) -> tuple[Any, Interface]:
    """The app uvicorn should serve, and the interface the given app speaks.

    A WSGI app comes back wrapped in a2wsgi's adapter (an ASGI 3 app, which
    uvicorn must be told) with ``config.wsgi_threads`` threads.
    """
    interface: Interface = detect_interface(app) if config.interface == "auto" else config.interface
    if interface != "wsgi":
        return app, interface
    from a2wsgi import WSGIMiddleware

    logger.debug("serving %s as a WSGI app (a2wsgi, %d threads)", config.app_name, config.wsgi_threads)
    return WSGIMiddleware(app, workers=config.wsgi_threads), "wsgi"
