"""Helpers shared by the operations tests (control socket, metrics, upgrade...)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import Any

import httpx

from cluster_server.ops import control as _control

from .conftest import ROOT


def ctl(path: str, *args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run ``cluster-server ctl --control-socket PATH ARGS`` as a user would."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "cluster_server", "ctl", "--control-socket", path, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"ctl {' '.join(args)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
    return proc


def status(path: str) -> dict[str, Any]:
    result: dict[str, Any] = _control.request(path, {"cmd": "status"}, timeout=5)
    return result


def ready_pids(st: dict[str, Any]) -> list[int]:
    return sorted(r["pid"] for r in st["workers"] if r["state"] == "ready")


class LoadLoop:
    """Requests in background threads until stopped.

    Each thread opens a new connection per request, or, with ``keep_alive``,
    every other thread keeps one connection for all its requests.
    Bounded: at most ``max_requests`` per thread and ``max_seconds`` in all.
    Every failure (an exception or a status other than 200) is recorded; ``pids``
    holds the last word of every answer (the worker's pid, in the test apps).
    """

    def __init__(
        self,
        url: str,
        threads: int = 2,
        max_requests: int = 20000,
        max_seconds: float = 40.0,
        path: str = "/",
        keep_alive: bool = False,
    ) -> None:
        self.url = url + path
        self.max_requests = max_requests
        self.deadline = time.monotonic() + max_seconds
        self.ok = 0
        self.failures: list[str] = []
        self.pids: set[str] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(keep_alive and i % 2 == 0,), daemon=True) for i in range(threads)
        ]

    def __enter__(self) -> LoadLoop:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _run(self, keep_alive: bool) -> None:
        limits = httpx.Limits(max_keepalive_connections=1 if keep_alive else 0)
        with httpx.Client(timeout=10, limits=limits) as client:
            for _ in range(self.max_requests):
                if self._stop.is_set() or time.monotonic() > self.deadline:
                    return
                try:
                    r = client.get(self.url)
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                with self._lock:
                    if r.status_code == 200:
                        self.ok += 1
                        self.pids.add(r.text.strip().rpartition(" ")[2])
                    else:
                        self.failures.append(f"status {r.status_code}")

    def count(self) -> int:
        with self._lock:
            return self.ok

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)
