"""A real FastAPI app for cluster-server: lifespan state, JSON, a websocket, SSE.

Run it from the repository root:

    cluster-server examples.fastapi_app.main:app --workers 2

Every response that matters carries the worker's pid, so you can see which
worker answered and watch a rolling restart replace them.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from cluster_server import cluster

MAX_SLOW_SECONDS = 30.0


class ItemIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    price: float = Field(ge=0)


class Item(ItemIn):
    id: int


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Runs once per worker, after the fork: each worker has its own state.
    app.state.started_at = time.time()
    app.state.items = {1: Item(id=1, name="widget", price=2.5)}
    app.state.next_id = 2
    # A per-worker cache that every worker drops when any worker takes a POST.
    app.state.cache = {}
    # cluster_server.cluster: in a cluster-server worker, messages to and from the
    # primary and the other workers (under plain uvicorn, is_worker is False).
    app.state.cluster = cluster
    if cluster.is_worker:
        cluster.on_message(lambda msg: on_cluster_message(app, msg))
    yield
    app.state.items.clear()


try:
    # Serve Swagger UI and ReDoc (/docs, /redoc) from a package instead of a CDN, so the
    # docs pages work offline; without fastapi-offline, FastAPI's CDN pages are used.
    from fastapi_offline import FastAPIOffline as _make_app
except ImportError:  # pragma: no cover - optional
    _make_app = FastAPI

app: FastAPI = _make_app(title="cluster-server example", lifespan=lifespan)


def on_cluster_message(app: FastAPI, msg: Any) -> None:
    """Another worker changed something: drop what we cached (runs on this worker's loop)."""
    if isinstance(msg, dict) and msg.get("drop") == "report":
        app.state.cache.pop("report", None)


def drop_report_everywhere(app: FastAPI) -> None:
    app.state.cache.pop("report", None)
    if cluster.is_worker:
        cluster.broadcast({"drop": "report"})  # to every other worker, through the primary


@app.get("/")
async def root(request: Request) -> dict[str, Any]:
    return {
        "message": "Hello from cluster-server",
        "pid": os.getpid(),
        "uptime": round(time.time() - request.app.state.started_at, 3),
    }


@app.get("/pid")
async def pid() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.get("/items/{item_id}")
async def get_item(item_id: int, request: Request) -> Item:
    item: Item | None = request.app.state.items.get(item_id)
    if item is None:
        raise HTTPException(status_code=404, detail="item not found")
    return item


@app.post("/items", status_code=201)
async def create_item(payload: ItemIn, request: Request) -> Item:
    # Items live in this worker's memory only: another worker will not see them.
    state = request.app.state
    item = Item(id=state.next_id, **payload.model_dump())
    state.items[item.id] = item
    state.next_id += 1
    drop_report_everywhere(request.app)
    return item


@app.get("/report")
async def report(request: Request) -> dict[str, Any]:
    """Something "expensive", cached per worker until any worker takes a POST."""
    cache = request.app.state.cache
    cached = "report" in cache
    if not cached:
        items = request.app.state.items.values()
        cache["report"] = {"count": len(items), "total": sum(i.price for i in items), "computed_at": time.time()}
    return {"pid": os.getpid(), "cached": cached, **cache["report"]}


@app.get("/hits")
async def hits() -> dict[str, Any]:
    """A cluster-wide counter, kept by the primary (a built-in request of cluster-server)."""
    if not cluster.is_worker:
        raise HTTPException(status_code=503, detail="not running under cluster-server")
    total = await cluster.request({"op": "incr", "key": "hits"})
    return {"pid": os.getpid(), "hits": total}


@app.get("/cluster")
async def cluster_info() -> dict[str, Any]:
    """This worker's id and the primary's view of every worker."""
    if not cluster.is_worker:
        raise HTTPException(status_code=503, detail="not running under cluster-server")
    assert cluster.worker is not None
    return {"worker": cluster.worker.id, "pid": os.getpid(), "workers": await cluster.request({"op": "workers"})}


@app.get("/slow")
async def slow(seconds: float = Query(1.0, ge=0)) -> dict[str, float | int]:
    """Hold the request open for a while: handy to watch a drain finish it."""
    seconds = min(seconds, MAX_SLOW_SECONDS)
    await asyncio.sleep(seconds)
    return {"pid": os.getpid(), "slept": seconds}


@app.websocket("/ws")
async def websocket_echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass


@app.get("/stream")
async def stream(count: int = Query(5, ge=1, le=1000), interval: float = Query(0.5, ge=0, le=10)) -> StreamingResponse:
    """Server-sent events: `count` events, `interval` seconds apart."""

    async def events() -> AsyncIterator[str]:
        for i in range(count):
            if i:
                await asyncio.sleep(interval)
            data = json.dumps({"n": i, "pid": os.getpid()})
            yield f"id: {i}\ndata: {data}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
