#!/usr/bin/env python3
"""Round-trip latency of cluster messages, and what round-robin costs per connection.

    python benchmarks/messaging.py                      # 10,000 round trips, fork; 5,000 connections
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

Then the hand-off (``--connections``, 0 to skip), once per scheduling policy,
each in a primary of its own: ``--workers`` workers accept through
``cluster.listen`` (one byte in, one byte out, close) while a client process
makes the connections one after the other. Reported per connection: the
client's time from ``connect`` to the server closing (median, p99), and the
primary's own CPU time (``time.process_time`` over the run, divided by the
connections): under ``SCHED_NONE`` the primary takes no part, so the
difference between the two policies is what the round-robin hand-off costs.
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


# -- the round-robin hand-off --------------------------------------------------------------


def serve_connections() -> None:
    """A worker's server for the hand-off run: one byte in, one byte out, close; until disconnected."""
    import threading

    sock = cluster.listen(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:  # under SCHED_RR, shut when the worker disconnects
                return
            with conn:
                conn.recv(1)
                conn.sendall(b"!")

    threading.Thread(target=serve, daemon=True).start()
    cluster.wait_disconnect()


def client(address: str, count: int, warmup: int) -> None:
    """The client process: ``count`` connections one after the other; prints their times (ns)."""
    import socket

    host, port = address.rsplit(":", 1)
    perf = time.perf_counter_ns
    samples = []
    for i in range(warmup + count):
        t0 = perf()
        with socket.create_connection((host, int(port)), timeout=5) as c:
            c.sendall(b"?")
            c.recv(1)
        if i >= warmup:
            samples.append(perf() - t0)
    print(json.dumps(samples))


async def measure_handoff(args: argparse.Namespace) -> dict[str, Any]:
    listening: asyncio.Queue[Any] = asyncio.Queue()
    cluster.on("listening", lambda w, addr: listening.put_nowait(addr))
    for _ in range(args.workers):
        cluster.fork(env={"BENCH_SERVE": "1"})
    addresses = [await asyncio.wait_for(listening.get(), 30) for _ in range(args.workers)]
    host, port = addresses[0][:2]
    cpu0 = time.process_time()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--client", f"{host}:{port}", "--connections", str(args.connections),
        "--warmup", str(min(args.warmup, args.connections)), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    cpu = time.process_time() - cpu0
    result = summary(policy_label(), json.loads(out))
    result["primary_cpu_us"] = cpu * 1e6 / args.connections
    cluster.disconnect()
    await cluster.wait()
    return result


def policy_label() -> str:
    return "rr" if cluster.scheduling_policy == cluster.SCHED_RR else "none"


def handoff_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One primary per policy (the policy is fixed for a primary's life), its results as JSON.
    Each runs in a session of its own, killed with its workers and client afterwards (600 s at most)."""
    import subprocess

    from benchmarks.bench import stop_process_group

    results = []
    for policy in ("rr", "none"):
        argv = [sys.executable, __file__, "--handoff-only", "--connections", str(args.connections)]
        argv += ["--workers", str(args.workers), "--warmup", str(args.warmup), "--start-method", args.start_method]
        env = {**os.environ, "CLUSTER_SERVER_SCHED_POLICY": policy}
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=600)
        finally:
            stop_process_group(proc, grace=5)
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, argv, out, err)
        results.append(json.loads(out))
    return results


def print_handoff(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\nconnections through cluster.listen, {args.workers} worker(s), one at a time")
    print(f"{'policy':<8} {'count':>7} {'median us':>10} {'p99 us':>9} {'primary CPU us/conn':>20}")
    for r in results:
        print(
            f"{r['kind']:<8} {r['count']:>7} {r['median_us']:>10.1f} {r['p99_us']:>9.1f} {r['primary_cpu_us']:>20.1f}"
        )
    by = {r["kind"]: r for r in results}
    if "rr" in by and "none" in by:
        extra = by["rr"]["median_us"] - by["none"]["median_us"]
        cpu = by["rr"]["primary_cpu_us"] - by["none"]["primary_cpu_us"]
        print(f"round-robin hand-off: +{extra:.1f} us per connection (median), {cpu:.1f} us of the primary's CPU")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10_000, help="timed round trips of each kind (10000)")
    parser.add_argument("--warmup", type=int, default=500, help="untimed round trips (and connections) first (500)")
    parser.add_argument("--start-method", choices=cluster.START_METHODS, default="fork")
    parser.add_argument("--budget-us", type=float, default=100.0, help="fail when the request median is over this")
    parser.add_argument("--connections", type=int, default=5000, help="timed connections per policy (5000; 0: none)")
    parser.add_argument("--workers", type=int, default=2, help="workers accepting them (2)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--handoff-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", metavar="HOST:PORT", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.client:
        client(args.client, args.connections, args.warmup)
        return 0
    cluster.setup_primary(start_method=args.start_method, args=[])
    if args.handoff_only:
        print(json.dumps(cluster.run(lambda: measure_handoff(args))))
        return 0
    results = cluster.run(lambda: measure(args))
    print(f"cluster round trips, primary -> worker -> primary ({args.start_method}, {os.cpu_count()} CPUs)")
    print(f"{'kind':<8} {'count':>7} {'median us':>10} {'p99 us':>9} {'mean us':>9} {'max us':>9}")
    for r in results:
        print(
            f"{r['kind']:<8} {r['count']:>7} {r['median_us']:>10.1f} {r['p99_us']:>9.1f} "
            f"{r['mean_us']:>9.1f} {r['max_us']:>9.1f}"
        )
    handoff = handoff_runs(args) if args.connections > 0 else []
    if handoff:
        print_handoff(handoff, args)
    if args.json:
        env = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
        data = {"env": env, "start_method": args.start_method, "results": results, "handoff": handoff}
        Path(args.json).write_text(json.dumps(data))
    return 0 if results[0]["median_us"] < args.budget_us else 1


if cluster.is_worker and os.environ.get("BENCH_SERVE"):
    serve_connections()
elif cluster.is_worker:
    cluster.on_request(lambda data: data)
    cluster.on_message(lambda data: cluster.send(data))
    cluster.wait_disconnect()
elif __name__ == "__main__":
    sys.exit(main())
