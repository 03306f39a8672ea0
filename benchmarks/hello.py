"""Minimal raw ASGI app used by the benchmarks: no framework, so the server is what we measure.

- ``GET /``            -> ``Hello, world!``
- ``GET /pid``         -> the pid of the worker that answered (as text)
- any path with an ``x-pid`` request header -> the worker pid as well
- ``GET /block?ms=N``  -> ``Hello, world!`` after blocking the worker's event loop
  for N ms (default 50): a slow request that holds its loop (``bench.py mixed``)
- ``GET /cpu?ms=N``    -> ``Hello, world!`` after N ms (default 5) of CPU work on the
  event loop (``bench.py openloop --variant cpu``)

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
    path = scope["path"]
    if path == "/block":  # a slow request: holds its worker's event loop (a blocking call, say)
        time.sleep(_ms(scope, 50) / 1000)
    elif path == "/cpu":  # CPU work on the event loop
        until = time.thread_time() + _ms(scope, 5) / 1000
        while time.thread_time() < until:
            pass
    wants_pid = path == "/pid" or any(k == b"x-pid" for k, _ in scope["headers"])
    body = str(os.getpid()).encode() if wants_pid else HELLO
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [*HEADERS, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _ms(scope: dict[str, Any], default: int) -> int:
    ms = scope["query_string"].partition(b"ms=")[2].partition(b"&")[0]
    return int(ms or default)
