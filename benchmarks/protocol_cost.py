#!/usr/bin/env python3
"""CPU per request of the worker's HTTP protocol class against uvicorn's own, in-process.

    python benchmarks/protocol_cost.py                 # 15 rounds of 20,000 requests, each variant and mode

A worker serves with uvicorn's HTTP protocol class (httptools, or h11) wrapped
by ``cluster_server/worker/uvicorn_glue.py``: the request-head guard
(``guard_request_head``: a ``data_received`` that counts the bytes of a head
still incomplete) and the drain (``draining_protocol``). Every request pays for
what those wrappers run on its path. This drives both classes in-process with
an in-memory transport (no network, no kernel, so what differs is the wrappers
alone), in interleaved rounds (order rotating), timing each round in CPU time:

- ``uvicorn``: uvicorn's class as ``uvicorn --workers`` serves with it;
- ``worker``: the class a cluster-server worker serves with (``--scheduling
  shared``, the default: no busy tracking);
- ``least-busy``: the same, with the busy tracking the hand-off policies add.

and two modes: ``keep-alive`` (one connection, ``GET /`` after ``GET /``) and
``close`` (a new connection per request: ``connection_made``, the request with
``Connection: close``, the response, ``connection_lost``). Prints the median CPU
microseconds per request of each and its difference to ``uvicorn``.
``bench.py efficiency`` measures the same thing end to end, where the kernel
and the load generator's noise are many times larger than these differences.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvicorn
from uvicorn._compat import asyncio_run
from uvicorn.server import ServerState

from benchmarks.hello import app as hello_app
from benchmarks.request_metrics import ROUND_TIMEOUT, MemoryTransport, config, fast_path, rotated, serve
from cluster_server.worker.uvicorn_glue import (
    WorkerServer,
    busy_tracking_protocol,
    draining_protocol,
)

CLOSE = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: bench\r\nAccept: */*\r\nConnection: close\r\n\r\n"


class ClosingTransport(MemoryTransport):
    """Like ``MemoryTransport``; ``close`` calls ``connection_lost`` as a real transport does, soon."""

    def __init__(self, protocol: Any) -> None:
        super().__init__()
        self.protocol = protocol
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)


def protocol_classes(http: str, loop: str) -> dict[str, tuple[uvicorn.Config, Any]]:
    """(config, protocol class) of each variant, built the way each server builds them."""
    out: dict[str, tuple[uvicorn.Config, Any]] = {}
    for name in ("uvicorn", "worker", "least-busy"):
        cfg = config(loop, http, guard=name != "uvicorn")
        if name == "uvicorn":
            out[name] = (cfg, cfg.http_protocol_class)
            continue
        server = WorkerServer(cfg, on_ready=lambda: None, on_heartbeat=lambda s: None, heartbeat_interval=1.0)
        cls = draining_protocol(cfg.http_protocol_class, server)  # what WorkerServer.startup does
        if name == "least-busy":
            server.watch_busy(lambda: None)
            cls = busy_tracking_protocol(cls, server)
        out[name] = (cfg, cls)
    return out


async def keep_alive(cfg: uvicorn.Config, cls: Any, requests: int) -> float:
    cfg.http_protocol_class = cls  # (each variant has a config of its own)
    return await serve(cfg, hello_app, None, requests, requests)


async def close(cfg: uvicorn.Config, cls: Any, requests: int) -> float:
    state = ServerState()
    start = time.process_time()
    async with asyncio.timeout(ROUND_TIMEOUT):
        for _ in range(requests):
            protocol = cls(config=cfg, server_state=state, app_state={})
            transport = ClosingTransport(protocol)
            protocol.connection_made(transport)
            protocol.data_received(CLOSE)
            while protocol in state.connections:
                await asyncio.sleep(0)
    return time.process_time() - start


MODES: dict[str, Callable[[uvicorn.Config, Any, int], Any]] = {"keep-alive": keep_alive, "close": close}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--requests", type=int, default=20000, help="requests per round, variant and mode")
    args = parser.parse_args()
    loop, http = fast_path()
    classes = protocol_classes(http, loop)
    names = list(classes)
    results: dict[tuple[str, str], list[float]] = {(n, m): [] for n in names for m in MODES}

    async def rounds() -> None:
        for run in MODES.values():
            for cfg, cls in classes.values():
                await run(cfg, cls, args.requests // 4)  # warm up
        for r in range(args.rounds):
            for mode, run in MODES.items():
                for name in rotated(names, r):
                    cfg, cls = classes[name]
                    used = await run(cfg, cls, args.requests)
                    results[name, mode].append(used / args.requests * 1e6)

    asyncio_run(rounds(), loop_factory=classes["uvicorn"][0].get_loop_factory())
    print(f"uvicorn {uvicorn.__version__}, {loop} + {http}, {args.rounds} rounds of {args.requests} requests")
    for mode in MODES:
        base = statistics.median(results["uvicorn", mode])
        for name in names:
            values = results[name, mode]
            median = statistics.median(values)
            ratios = [v / u for v, u in zip(values, results["uvicorn", mode], strict=True)]
            print(
                f"{mode:>10} {name:>10}: median {median:.2f} us CPU/request, {median - base:+.2f} us "
                f"({100 * (statistics.median(ratios) - 1):+.1f}% median of per-round ratios)"
            )


if __name__ == "__main__":
    main()
