"""Request metrics, counted in a worker and sent with its heartbeat.

With ``--metrics-bind``, each worker wraps its app in :class:`RequestMetrics`
(outermost: the health path's answers count too). It counts HTTP requests by
method and status class, sorts their durations into histogram buckets, and
knows how many are in flight. Nothing is sent per request: the worker's
heartbeat carries the counts so far (``WorkerServer`` sends it every
``--heartbeat-interval``, and sooner, ``FRESH_INTERVAL`` after the last one,
while requests complete), as ``"m"``::

    {"t": "hb", "r": ..., "c": ...,
     "m": {"q": {"GET 2": 981, "POST 5": 19},   requests by "METHOD CLASS" (2: 2xx ...)
           "h": [n, n, ...],                     per bucket of BUCKETS, then over the last
           "s": 12.5,                            seconds, summed
           "i": 3}}                              in flight now

The counts are cumulative since the worker started, so a lost heartbeat loses
nothing; the primary (``ops/request_totals.py``) keeps each worker's last
report and adds it to its slot's totals when the worker exits. A draining
worker sends a last heartbeat once its requests are done.

What is measured: from the moment uvicorn hands the request to the app (its
head parsed) until the app returns, which for an ordinary response is when the
last body chunk was written; the status is the one the app started its
response with. A request the app failed before answering counts as ``5xx``
(uvicorn answers it 500). Requests uvicorn answers itself without calling the
app (a malformed head: 400; over ``--limit-concurrency``: 503) are not counted.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Awaitable, Callable, MutableMapping
from time import perf_counter
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: histogram bucket bounds, in seconds: from a fast in-memory answer to a slow upload
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: methods counted by name; any other is "OTHER" (a client's made-up method must not add series)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})
OTHER = "OTHER"
#: while requests complete, a heartbeat goes out this long after the previous one
#: (instead of waiting the whole --heartbeat-interval): a scrape 1 s after a burst is exact
FRESH_INTERVAL = 0.25


class RequestMetrics:
    """ASGI middleware: count the app's HTTP requests (see the module docstring)."""

    __slots__ = ("app", "buckets", "counts", "in_flight", "seconds")

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        #: (method, status // 100) -> requests
        self.counts: dict[tuple[str, int], int] = {}
        #: requests per bucket of BUCKETS, and one more for the slower ones
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.seconds = 0.0
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # if the app never starts a response, uvicorn answers 500

        async def send_status(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.in_flight += 1
        start = perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            elapsed = perf_counter() - start
            self.in_flight -= 1
            method = scope["method"]
            key = (method if method in METHODS else OTHER, status // 100)
            counts = self.counts
            counts[key] = counts.get(key, 0) + 1
            self.buckets[bisect_left(BUCKETS, elapsed)] += 1
            self.seconds += elapsed

    def report(self) -> dict[str, Any]:
        """What the heartbeat carries (``"m"``): the counts so far."""
        return {
            "q": {f"{method} {cls}": n for (method, cls), n in self.counts.items()},
            "h": list(self.buckets),
            "s": round(self.seconds, 6),
            "i": self.in_flight,
        }
