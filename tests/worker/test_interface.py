"""Interface detection (``--interface auto``) and the WSGI adapter, without processes."""

from __future__ import annotations

import functools
from typing import Any

import pytest

from cluster_server._config import Config
from cluster_server.worker.interface import adapt_app, detect_interface


async def asgi3(scope: Any, receive: Any, send: Any) -> None: ...


def wsgi(environ: Any, start_response: Any) -> list[bytes]:
    return [b""]


def asgi2(scope: Any) -> Any:
    return asgi3


class ASGI2Class:
    def __init__(self, scope: Any) -> None: ...

    async def __call__(self, receive: Any, send: Any) -> None: ...


class AsyncCallable:
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None: ...


class WSGICallable:
    def __call__(self, environ: Any, start_response: Any) -> list[bytes]:
        return [b""]


def sync_returning_awaitable(scope: Any, receive: Any, send: Any) -> Any:
    return asgi3(scope, receive, send)


def star_args(*args: Any) -> Any: ...


@pytest.mark.parametrize(
    ("app", "expected"),
    [
        (asgi3, "asgi3"),
        (AsyncCallable(), "asgi3"),
        (functools.partial(asgi3), "asgi3"),
        (sync_returning_awaitable, "asgi3"),
        (wsgi, "wsgi"),
        (WSGICallable(), "wsgi"),
        (functools.partial(wsgi), "wsgi"),
        (asgi2, "asgi2"),
        (ASGI2Class, "asgi2"),
        (star_args, "asgi2"),  # ambiguous: uvicorn's rule (not a coroutine function -> ASGI 2)
    ],
)
def test_detect_interface(app: Any, expected: str) -> None:
    assert detect_interface(app) == expected


def test_detect_frameworks() -> None:
    flask = pytest.importorskip("flask")
    fastapi = pytest.importorskip("fastapi")
    from a2wsgi import WSGIMiddleware

    assert detect_interface(flask.Flask("x")) == "wsgi"
    assert detect_interface(fastapi.FastAPI()) == "asgi3"
    assert detect_interface(WSGIMiddleware(wsgi)) == "asgi3"


def test_detect_django() -> None:
    pytest.importorskip("django")
    from django.core.handlers.asgi import ASGIHandler
    from django.core.handlers.wsgi import WSGIHandler

    assert detect_interface(WSGIHandler) == "asgi2"  # the class itself; its instance is the app
    assert detect_interface(WSGIHandler.__new__(WSGIHandler)) == "wsgi"
    assert detect_interface(ASGIHandler.__new__(ASGIHandler)) == "asgi3"


def test_adapt_app_wraps_wsgi_with_bounded_threads() -> None:
    from a2wsgi import WSGIMiddleware

    app, detected = adapt_app(wsgi, Config(app="m:a", wsgi_threads=3))
    assert detected == "wsgi"
    assert isinstance(app, WSGIMiddleware) and app.executor._max_workers == 3
    # explicit --interface wins over detection
    assert adapt_app(star_args, Config(app="m:a", interface="wsgi"))[1] == "wsgi"
    assert adapt_app(wsgi, Config(app="m:a", interface="asgi2")) == (wsgi, "asgi2")
    assert adapt_app(asgi3, Config(app="m:a")) == (asgi3, "asgi3")
