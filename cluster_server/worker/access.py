"""The ``timed`` access log: one line per request once its response is sent, with size and duration.

uvicorn writes its access line when the response *starts*, so it cannot know
how long the response took or how large it was. This ASGI middleware wraps the
app (outside uvicorn's proxy-headers middleware, which rewrites the scope's
client in place, so the line shows the client it found) and logs to
``cluster_server.access`` when the last body chunk has been handed to the
server, or when the app fails (uvicorn then answers 500, if nothing was sent).
The workers turn uvicorn's own access log off meanwhile (``_logging.timed_access``).
"""

from __future__ import annotations

import http
import logging
import time
import urllib.parse
from typing import Any

from cluster_server._logging import ACCESS_LOGGER

Scope = dict[str, Any]
Message = dict[str, Any]


class TimedAccessLog:
    """ASGI middleware: log each HTTP request with its status, bytes sent and duration in ms."""

    def __init__(self, app: Any, logger: logging.Logger | None = None) -> None:
        self.app = app
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.logger.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        sent = {"status": 0, "bytes": 0, "logged": False}

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            elif message["type"] == "http.response.body":
                sent["bytes"] += len(message.get("body", b""))
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                sent["logged"] = True
                self.log(scope, sent["status"], sent["bytes"], start)

        try:
            await self.app(scope, receive, timed_send)
        except BaseException:
            if not sent["logged"]:  # uvicorn answers 500 if nothing was sent, else closes the connection
                self.log(scope, sent["status"] or 500, sent["bytes"], start)
            raise
        if not sent["logged"] and sent["status"]:  # the app returned mid-response
            self.log(scope, sent["status"], sent["bytes"], start)

    def log(self, scope: Scope, status: int, size: int, start: float) -> None:
        ms = (time.perf_counter() - start) * 1000
        client = scope.get("client")
        client_addr = f"{client[0]}:{client[1]}" if client else "-"
        path = urllib.parse.quote(scope.get("path", ""))  # as uvicorn's line shows it (root_path included)
        if scope.get("query_string"):
            path += "?" + scope["query_string"].decode("latin-1")
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        access = {
            "client": client_addr,
            "method": scope.get("method", ""),
            "path": path,
            "http_version": scope.get("http_version", "1.1"),
            "status": status,
            "bytes": size,
            "duration_ms": round(ms, 3),
        }
        self.logger.info(
            '%s - "%s %s HTTP/%s" %d %s %d B %.1f ms',
            client_addr,
            access["method"],
            path,
            access["http_version"],
            status,
            phrase,
            size,
            ms,
            extra={"access": access},
        )
