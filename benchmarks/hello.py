"""Minimal raw ASGI app used by the benchmarks: no framework, so the server is what we measure.

- ``GET /``            -> ``Hello, world!``
- ``GET /pid``         -> the pid of the worker that answered (as text)
- any path with an ``x-pid`` request header -> the worker pid as well
- ``GET /block?ms=N``  -> ``Hello, world!`` after blocking the worker's event loop
  for N ms (default 50): a slow, CPU-bound request (``bench.py mixed``)

Serve it with ``benchmarks.hello:app`` from the repository root.
"""

from __future__ import annotations

import os
import time
from typing import Any

HELLO = b"Hello, world!"
HEADERS = [(b"content-type", b"text/plain; charset=utf-8")]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["path"] == "/block":  # a slow request: holds its worker's event loop (CPU-bound work, say)
        ms = scope["query_string"].partition(b"ms=")[2].partition(b"&")[0]
        time.sleep(int(ms or b"50") / 1000)
    wants_pid = scope["path"] == "/pid" or any(k == b"x-pid" for k, _ in scope["headers"])
    body = str(os.getpid()).encode() if wants_pid else HELLO
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [*HEADERS, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
