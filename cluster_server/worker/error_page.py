"""Under ``--reload`` only: a worker whose app cannot start serves a 500 page saying why.

Without it, a developer who starts ``--reload`` with a syntax error (or saves
one before the first generation ever served) gets a browser that waits with
no answer. Instead the worker that failed (import error, syntax error,
factory error, lifespan startup failure) stays up and answers every request
with a 500: the short traceback, as HTML for a browser (``Accept: text/html``)
and as plain text otherwise. The primary accepts such a worker only where no
worker runs the app (see ``Primary.worker_ready``): once the app serves, a
broken save keeps the old code serving, as before; the next save that works
replaces the error page. Never under production flags: the worker exits with
status 3 there and the primary stops with the error.

Starlette renders the responses (it is a dependency for this page), imported
only when a page is needed: a worker whose app starts never imports it.
"""

from __future__ import annotations

import html
from typing import Any

TITLE = "The app cannot start"
HINT = "cluster-server --reload shows this page until a saved change lets the app start."

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>500 · {title}</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; margin: 2rem; color: #222; }}
h1 {{ color: #b00020; font-size: 1.4rem; }}
pre {{ background: #f6f6f6; border-left: 4px solid #b00020; padding: 1rem; overflow-x: auto; }}
</style></head>
<body><h1>{title}</h1><pre>{error}</pre><p>{hint}</p></body></html>
"""


def error_app(error: str) -> Any:
    """An ASGI app answering every HTTP request with a 500 that shows ``error`` (WebSockets: closed, 1011)."""
    from starlette.responses import HTMLResponse, PlainTextResponse  # only when an app cannot start

    text = f"{TITLE}\n\n{error}\n\n{HINT}\n"
    page = PAGE.format(title=TITLE, error=html.escape(error), hint=HINT)
    headers = {"cache-control": "no-store"}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1011, "reason": TITLE})
            return
        if scope["type"] != "http":
            return
        accept = dict(scope.get("headers") or []).get(b"accept", b"")
        if b"text/html" in accept:
            await HTMLResponse(page, status_code=500, headers=headers)(scope, receive, send)
        else:
            await PlainTextResponse(text, status_code=500, headers=headers)(scope, receive, send)

    return app


class LifespanErrors:
    """ASGI middleware that keeps why lifespan startup failed: the app's exception, or the
    message of its ``lifespan.startup.failed`` (Starlette puts the traceback there)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.error: str | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def watched_send(message: dict[str, Any]) -> None:
            if message.get("type") == "lifespan.startup.failed" and self.error is None:
                self.error = str(message.get("message") or "lifespan startup failed").rstrip()
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except BaseException as exc:
            if self.error is None:
                from cluster_server.templates.process import short_traceback

                self.error = f"lifespan startup raised {type(exc).__name__}\n{short_traceback(exc)}"
            raise
