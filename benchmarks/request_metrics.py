#!/usr/bin/env python3
"""CPU cost per request of the workers' request metrics, in uvicorn's real request path.

    python benchmarks/request_metrics.py                # 15 rounds of 20,000 requests each way

What ``--metrics-bind`` adds to each request in a worker is ``count_requests``
(``cluster_server/worker/uvicorn_glue.py``): uvicorn's request objects note
when the app starts and count the request when its response starts. This drives uvicorn's own HTTP protocol
(httptools and uvloop when installed, as the workers run it; with the request
head guard the workers always have) in-process with an in-memory transport:
keep-alive ``GET /`` requests to the benchmark's hello-world app, one after the
other, timing each round in CPU time, in interleaved rounds (order rotating):

- ``off``: as without ``--metrics-bind``;
- ``on``: with ``count_requests``, the heartbeat's report (which folds the
  counts) every ``--report-every`` requests, as the worker does a few times a
  second;
- ``middleware``: for reference, the same counts from a plain ASGI middleware
  (a coroutine around the app, a wrapper around ``send``), the obvious way.

No network, no kernel: the differences are the instrumentation's cost alone;
its share of a whole request comes from ``bench.py metrics-cost`` (CPU per
request of the whole server). Prints the median CPU microseconds per request
of each variant and its difference to ``off``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import statistics
import sys
import time
from bisect import bisect_left
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvicorn
from uvicorn._compat import asyncio_run
from uvicorn.server import ServerState

from benchmarks.hello import app as hello_app
from cluster_server.worker.request_metrics import BUCKETS, RequestStats
from cluster_server.worker.uvicorn_glue import count_requests, guard_request_head

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
#: seconds one round may take (a request that never completes fails the run, not spins for good)
ROUND_TIMEOUT = 120.0


class ReferenceMiddleware:
    """The obvious way to count the same things, for comparison: an ASGI middleware
    (a coroutine around the app, a coroutine around ``send``)."""

    def __init__(self, app: Any, stats: RequestStats) -> None:
        self.app = app
        self.stats = stats

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        start = time.perf_counter()

        async def send_status(message: Any) -> None:
            if message["type"] == "http.response.start":
                seconds = time.perf_counter() - start
                status = message["status"]
                by_status = self.stats.by_method.setdefault(scope["method"], {})
                by_status[status] = by_status.get(status, 0) + 1
                self.stats.buckets[bisect_left(BUCKETS, seconds)] += 1
                self.stats.seconds += seconds
            await send(message)

        await self.app(scope, receive, send_status)


class MemoryTransport(asyncio.Transport):
    """What uvicorn's protocol writes to: nothing leaves, nothing blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0

    def write(self, data: Any) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


def config(loop: str, http: str, guard: bool = True) -> uvicorn.Config:
    """The hello app's config; ``guard``: with the request head guard, as every worker has it, metrics or not."""
    cfg = uvicorn.Config(hello_app, loop=loop, http=http, access_log=False, log_level="warning", lifespan="off")
    cfg.load()
    if guard:
        guard_request_head(cfg, 10.0, 64 * 1024)  # what worker/main.py does for every worker
    return cfg


def rotated(names: list[str], r: int) -> list[str]:
    """``names`` starting at the ``r``-th (round ``r``'s order)."""
    return names[r % len(names) :] + names[: r % len(names)]


class Variants:
    """Switches uvicorn's request class between the plain one and the counting one."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.plain = module.RequestResponseCycle
        self.stats = RequestStats()
        count_requests(self.stats)
        self.counting = module.RequestResponseCycle

    def use(self, variant: str) -> tuple[Any, RequestStats | None]:
        """(the app to serve, the stats to report) for ``variant``."""
        self.module.RequestResponseCycle = self.counting if variant == "on" else self.plain
        if variant == "middleware":
            return ReferenceMiddleware(hello_app, self.stats), self.stats
        return hello_app, self.stats if variant == "on" else None


async def serve(cfg: uvicorn.Config, app: Any, stats: RequestStats | None, requests: int, report_every: int) -> float:
    """CPU seconds for ``requests`` keep-alive requests through uvicorn's protocol and ``app``."""
    cfg.loaded_app = app
    state = ServerState()
    protocol = cfg.http_protocol_class(config=cfg, server_state=state, app_state={})  # type: ignore[call-arg]
    protocol.connection_made(MemoryTransport())
    start = time.process_time()
    async with asyncio.timeout(ROUND_TIMEOUT):
        for i in range(1, requests + 1):
            protocol.data_received(REQUEST)
            while state.total_requests < i:
                await asyncio.sleep(0)
            if stats is not None and i % report_every == 0:
                stats.report(0)
    used = time.process_time() - start
    protocol.connection_lost(None)
    return used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--requests", type=int, default=20000, help="requests per round and variant")
    parser.add_argument("--report-every", type=int, default=1000, help="requests between two reports (1000)")
    args = parser.parse_args()
    loop, http = fast_path()
    cfg = config(loop, http)
    variants = Variants(importlib.import_module(f"uvicorn.protocols.http.{http}_impl"))
    names = ["off", "on", "middleware"]
    results: dict[str, list[float]] = {name: [] for name in names}

    async def rounds() -> None:
        app, stats = variants.use("on")
        await serve(cfg, app, stats, args.requests // 4, args.report_every)  # warm up
        for r in range(args.rounds):
            for variant in rotated(names, r):
                app, stats = variants.use(variant)
                used = await serve(cfg, app, stats, args.requests, args.report_every)
                results[variant].append(used / args.requests * 1e6)

    asyncio_run(rounds(), loop_factory=cfg.get_loop_factory())
    off = statistics.median(results["off"])
    print(f"uvicorn {uvicorn.__version__}, {loop} + {http}, {args.rounds} rounds of {args.requests} requests")
    for variant in names:
        median = statistics.median(results[variant])
        values = " ".join(f"{v:.2f}" for v in results[variant])
        print(f"{variant:>10}: median {median:.2f} us CPU/request, {median - off:+.2f} vs off  ({values})")


def fast_path() -> tuple[str, str]:
    """(loop, http) as the workers run them: uvloop and httptools when both import."""
    fast = all(_importable(m) for m in ("uvloop", "httptools"))
    return ("uvloop", "httptools") if fast else ("asyncio", "h11")


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
