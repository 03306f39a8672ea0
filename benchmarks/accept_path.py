#!/usr/bin/env python3
"""CPU cost of the primary's accept path under ``--scheduling round-robin``/``least-busy``.

    python benchmarks/accept_path.py            # batches of 1, 8, 64 connections per wake-up

Drives the real ``HandOff`` component in-process: a real listening socket, real
client connections, real worker channels (SEQPACKET socketpairs whose worker ends
nobody reads, so no worker is woken and preempts us). It times, in CPU time, one
accept wake-up: ``accept`` until EAGAIN, the routing decision, one ``os.dup`` per
connection and one ``sendmsg`` (SCM_RIGHTS) per worker and batch. Acks are
processed outside the timing. What it leaves out is the rest of the primary's
loop per wake-up (epoll, timers, ``waitpid``) and the acks: ``cluster-server``
logs the primary's whole CPU time per connection when it stops.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import time
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cluster_server.primary.loop import Worker
from cluster_server.primary.state import WorkerState
from cluster_server.scheduling.primary import HandOff
from cluster_server.wire.channel import Channel, pair
from cluster_server.wire.messages import ACK


class _Primary:
    """The little of ``Primary`` that ``HandOff`` uses."""

    def __init__(self, listener: socket.socket) -> None:
        self.listeners = [types.SimpleNamespace(sock=listener)]
        self.stopping = False
        self.readers: dict[Any, Any] = {}

    def clock(self) -> float:
        return time.monotonic()

    def add_reader(self, fileobj: Any, callback: Any) -> None:
        self.readers[fileobj] = callback

    def remove_reader(self, fileobj: Any) -> None:
        self.readers.pop(fileobj, None)

    def send(self, w: Worker, msg: dict[str, Any], fds: list[int] | None = None) -> bool:
        assert w.channel is not None
        w.channel.send(msg, fds or ())
        return True


def measure(policy: str, batch: int, connections: int, workers: int) -> float:
    """Mean CPU microseconds per connection of one accept wake-up handling ``batch`` connections."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    primary = _Primary(listener)
    handoff = HandOff(policy, window=10**6)
    handoff.attach(primary)  # type: ignore[arg-type]
    peers: list[tuple[Worker, Channel]] = []
    for i in range(workers):
        ours, theirs = pair()
        for s, opt in ((ours, socket.SO_SNDBUF), (theirs, socket.SO_RCVBUF)):
            s.setsockopt(socket.SOL_SOCKET, opt, 1 << 22)
        w = Worker(id=i + 1, generation=1, spawned_at=0.0, pid=100_000 + i)
        w.channel = Channel(ours)
        w.move(WorkerState.READY)
        handoff.worker_event("ready", w)
        peers.append((w, Channel(theirs)))
    spent = 0.0
    done = 0
    try:
        while done < connections:
            clients = [socket.create_connection(listener.getsockname()) for _ in range(batch)]
            t0 = time.process_time()
            primary.readers[listener](1)
            spent += time.process_time() - t0
            done += batch
            for w, worker_end in peers:  # play the workers: take and acknowledge
                for msg, fds in worker_end.receive():
                    for fd in fds:
                        os.close(fd)
                    assert isinstance(msg, dict)
                    handoff.worker_message(w, {"t": ACK, "b": [msg["b"]]}, [])
            for c in clients:
                c.close()
    finally:
        handoff.close()
        for w, worker_end in peers:
            assert w.channel is not None
            w.channel.close()
            worker_end.close()
        listener.close()
    return spent / done * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", choices=("round-robin", "least-busy"), default="round-robin")
    parser.add_argument("--batches", default="1,8,64", help="connections per wake-up (1,8,64)")
    parser.add_argument("--connections", type=int, default=4000, help="per batch size (4000)")
    parser.add_argument("--workers", type=int, default=4, help="worker channels (4)")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    print(f"{args.policy}, {args.workers} workers, python {sys.version.split()[0]}")
    for batch in (int(b) for b in args.batches.split(",")):
        us = measure(args.policy, batch, args.connections, args.workers)
        print(f"  {batch:4d} connection(s) per wake-up: {us:6.1f} us CPU per connection")


if __name__ == "__main__":
    main()
