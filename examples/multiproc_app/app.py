"""An app with its own Prometheus metrics, counted in every worker.

prometheus-client's multiprocess mode: each worker writes its metrics to files
in ``PROMETHEUS_MULTIPROC_DIR``; cluster-server's primary wipes that directory
when it starts and calls ``mark_process_dead`` for every worker that exits. Run
it from the repository root:

    export PROMETHEUS_MULTIPROC_DIR=/tmp/shop-metrics
    cluster-server examples.multiproc_app.app:app --workers 4 --metrics-bind 127.0.0.1:8001

    curl -X POST localhost:8000/orders   # counted by whichever worker answers
    curl localhost:8001/metrics          # cluster-server's metrics and the app's, summed over the workers
    curl localhost:8000/metrics          # the app's own, from any worker (for setups without --metrics-bind)

The variable must be set before prometheus-client is imported (it picks its
storage then): set it in the environment the server starts with, not in the app.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    raise RuntimeError("set PROMETHEUS_MULTIPROC_DIR to a directory before starting this app (see its docstring)")

ORDERS = Counter("shop_orders", "Orders placed", ["kind"])
BASKET = Histogram("shop_basket_items", "Items per order", buckets=(1, 2, 5, 10, 20, 50))
#: one per live worker: "livesum" adds up the live processes only (mark_process_dead drops an exited one's)
WORKERS = Gauge("shop_workers", "Workers running the app", multiprocess_mode="livesum")
WORKERS.inc()


async def place_order(request: Request) -> JSONResponse:
    kind = request.query_params.get("kind", "standard")
    if kind not in ("standard", "express"):
        return JSONResponse({"error": "kind is standard or express"}, status_code=400)
    items = int(request.query_params.get("items", "1"))
    ORDERS.labels(kind=kind).inc()
    BASKET.observe(items)
    return JSONResponse({"ok": True, "pid": os.getpid()})


async def metrics(request: Request) -> Response:
    """The app's metrics summed over every worker, whichever worker answers."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


app = Starlette(routes=[Route("/orders", place_order, methods=["POST"]), Route("/metrics", metrics)])
