#!/usr/bin/env python3
"""Round-trip latency of cluster messages: primary -> worker -> primary.

    python benchmarks/messaging.py                      # 10,000 round trips, fork
    python benchmarks/messaging.py --count 50000 --start-method spawn --json out.json

The primary forks one worker (``cluster_server.cluster``) and times, one after
the other, ``--count`` round trips of each kind:

- ``request``: ``await worker.request(i)``, answered by the worker's sync
  ``on_request`` handler (ids matched, timeout armed): what an app would use;
- ``message``: ``worker.send(i)``, echoed by the worker's sync ``on_message``
  callback with ``cluster.send(i)``, awaited in the primary's ``message`` event.

Each round trip is timed alone (``time.perf_counter_ns``), after ``--warmup``
untimed ones. Prints median, p99, mean and max in microseconds; exits 1 when the
median of ``request`` is over ``--budget-us`` (100 by default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster_server import cluster


def percentile(sorted_values: list[int], p: float) -> float:
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return float(sorted_values[k])


def summary(name: str, samples_ns: list[int]) -> dict[str, Any]:
    s = sorted(samples_ns)
    return {
        "kind": name,
        "count": len(s),
        "median_us": statistics.median(s) / 1000,
        "p99_us": percentile(s, 99) / 1000,
        "mean_us": statistics.fmean(s) / 1000,
        "max_us": s[-1] / 1000,
    }


async def timed(round_trip: Callable[[int], Awaitable[Any]], warmup: int, count: int) -> list[int]:
    """``warmup`` untimed round trips, then ``count`` timed one at a time (ns each)."""
    for i in range(warmup):
        await round_trip(i)
    perf = time.perf_counter_ns
    samples = []
    for i in range(count):
        t0 = perf()
        await round_trip(i)
        samples.append(perf() - t0)
    return samples


async def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    w = cluster.fork()
    online = asyncio.get_running_loop().create_future()
    w.once("online", lambda: online.set_result(None))
    await asyncio.wait_for(online, 30)

    # request/response (5 s is also request's default timeout)
    results = [summary("request", await timed(lambda i: w.request(i, timeout=5), args.warmup, args.count))]

    # plain messages, echoed
    loop = asyncio.get_running_loop()
    box: list[asyncio.Future[Any]] = []
    w.on("message", lambda data: box[0].set_result(data))

    async def echo(i: int) -> None:
        box[:] = [loop.create_future()]
        w.send(i)
        await box[0]

    results.append(summary("message", await timed(echo, args.warmup, args.count)))

    w.disconnect()
    await cluster.wait()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10_000, help="timed round trips of each kind (10000)")
    parser.add_argument("--warmup", type=int, default=500, help="untimed round trips first (500)")
    parser.add_argument("--start-method", choices=cluster.START_METHODS, default="fork")
    parser.add_argument("--budget-us", type=float, default=100.0, help="fail when the request median is over this")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    cluster.setup_primary(start_method=args.start_method, args=[])
    results = cluster.run(lambda: measure(args))
    print(f"cluster round trips, primary -> worker -> primary ({args.start_method}, {os.cpu_count()} CPUs)")
    print(f"{'kind':<8} {'count':>7} {'median us':>10} {'p99 us':>9} {'mean us':>9} {'max us':>9}")
    for r in results:
        print(
            f"{r['kind']:<8} {r['count']:>7} {r['median_us']:>10.1f} {r['p99_us']:>9.1f} "
            f"{r['mean_us']:>9.1f} {r['max_us']:>9.1f}"
        )
    if args.json:
        env = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
        Path(args.json).write_text(json.dumps({"env": env, "start_method": args.start_method, "results": results}))
    return 0 if results[0]["median_us"] < args.budget_us else 1


if cluster.is_worker:
    cluster.on_request(lambda data: data)
    cluster.on_message(lambda data: cluster.send(data))
    cluster.wait_disconnect()
elif __name__ == "__main__":
    sys.exit(main())
