"""A Flask (WSGI) app for cluster-server: JSON, a form POST, a streamed download, a streamed upload.

Run it from the repository root:

    cluster-server examples.flask_app.app:app --workers 2

cluster-server sees that ``app`` is a WSGI app (it takes ``environ,
start_response``) and serves it through a2wsgi, on ``--wsgi-threads`` threads
per worker. Every JSON answer carries the worker's pid.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, request, stream_with_context

app = Flask(__name__)

MAX_CHUNKS = 10_000
CHUNK_SIZE = 64 * 1024

FORM = """<!doctype html>
<title>cluster-server + Flask</title>
<form method="post" action="/form">
  <label>Name <input name="name"></label>
  <label>Message <input name="message"></label>
  <button>Send</button>
</form>
"""


@app.get("/")
def index() -> dict[str, Any]:
    return {"message": "Hello from Flask on cluster-server", "pid": os.getpid()}


@app.get("/pid")
def pid() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.get("/form")
def form_page() -> str:
    return FORM


@app.post("/form")
def form_post() -> tuple[dict[str, Any], int] | dict[str, Any]:
    name = request.form.get("name", "").strip()
    if not name:
        return {"error": "name is required"}, 400
    return {"greeting": f"Hello, {name}!", "message": request.form.get("message", ""), "pid": os.getpid()}


@app.get("/download")
def download() -> Response:
    """``chunks`` pieces of ``size`` bytes, generated as they are sent (never built whole)."""
    chunks = min(request.args.get("chunks", 16, type=int), MAX_CHUNKS)
    size = min(request.args.get("size", CHUNK_SIZE, type=int), CHUNK_SIZE)
    delay = min(request.args.get("delay", 0.0, type=float), 1.0)

    def generate() -> Iterator[bytes]:
        for i in range(chunks):
            if i and delay:
                time.sleep(delay)
            yield (b"%08d" % i + b"." * size)[:size]

    headers = {"Content-Disposition": "attachment; filename=data.bin", "Content-Length": str(chunks * size)}
    return Response(stream_with_context(generate()), mimetype="application/octet-stream", headers=headers)


@app.post("/upload")
def upload() -> dict[str, Any]:
    """Read the body a chunk at a time: a large upload is never held whole."""
    digest = hashlib.sha256()
    total = 0
    reads = 0
    while chunk := request.stream.read(CHUNK_SIZE):
        digest.update(chunk)
        total += len(chunk)
        reads += 1
    return {"bytes": total, "reads": reads, "sha256": digest.hexdigest(), "pid": os.getpid()}
