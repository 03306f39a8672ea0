"""The health path: the worker's half of leaving the load balancer before stopping.

:class:`HealthMiddleware` wraps the app and answers ``GET``/``HEAD`` on
``--health-path`` itself, before the app, with what the primary last told the
worker (``{"t": "health", "ok": bool, "status": text}`` on its channel, see
:func:`health_handler`): ``503 starting`` until every worker of the first
generation is ready, then ``200 ok``, then ``503 shutting down`` from the
moment the primary begins to stop. The primary's half, and why it matters, is
``primary/shutdown_delay.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from cluster_server._proc import close_all
from cluster_server.worker.spec import HEALTH_OK, HEALTH_SHUTTING_DOWN, HEALTH_STARTING

logger = logging.getLogger("cluster_server")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: what the health path says, and why
OK, STARTING, SHUTTING_DOWN = HEALTH_OK, HEALTH_STARTING, HEALTH_SHUTTING_DOWN


class HealthState:
    """The worker's copy of the cluster's health, set by the primary's messages."""

    def __init__(self) -> None:
        self.ok = False
        self.status = STARTING


class HealthMiddleware:
    """Answer ``GET``/``HEAD`` on ``path`` before the app; everything else goes to the app.

    The path is matched as the client sent it, without uvicorn's ``root_path``
    prefix and without the query string.
    """

    def __init__(self, app: ASGIApp, path: str, state: HealthState) -> None:
        self.app = app
        self.path = path
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") in ("GET", "HEAD") and self._requested(scope) == self.path:
            ok = self.state.ok
            body = f"{self.state.status}\n".encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200 if ok else 503,
                    "headers": [
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", str(len(body)).encode()),
                        (b"cache-control", b"no-store"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _requested(scope: Scope) -> str:
        path: str = scope.get("path", "")
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            return path[len(root) :]
        return path


def health_handler(state: HealthState) -> Callable[[dict[str, Any], list[int]], None]:
    """The worker's handler for ``{"t": "health", "ok": bool, "status": str}`` messages."""

    def handle(msg: dict[str, Any], fds: list[int]) -> None:
        close_all(fds)  # none expected; a handler owns what it is given
        ok, status = msg.get("ok"), msg.get("status")
        if isinstance(ok, bool):
            state.ok = ok
            state.status = status[:100] if isinstance(status, str) and status else (OK if ok else SHUTTING_DOWN)

    return handle
