"""Request metrics, counted in a worker and sent with its heartbeat.

With ``--metrics-bind``, each worker counts its HTTP requests by method and
status class, sorts their durations into histogram buckets, and knows how many
are in flight. Nothing is sent per request: the worker's heartbeat carries the
counts so far (``WorkerServer`` sends it every ``--heartbeat-interval``, and
sooner, ``FRESH_INTERVAL`` after the last one, while requests complete), as
``"m"``::

    {"t": "hb", "r": ..., "c": ...,
     "m": {"q": {"GET 2": 981, "POST 5": 19},   requests by "METHOD CLASS" (2: 2xx ...)
           "h": [n, n, ...],                     per bucket of BUCKETS, then over the last
           "s": 12.5,                            seconds, summed
           "i": 3}}                              in flight now

The counts are cumulative since the worker started, so a lost heartbeat loses
nothing; the primary (``ops/request_totals.py``) keeps each worker's last
report and adds it to its slot's totals when the worker exits. A draining
worker sends a last heartbeat once its requests are done.

Every request pays for this, so the work per request is as small as it gets:
uvicorn's own request objects note when the app starts and, when the response
starts, add the request to the counts (``count_requests`` in
``worker/uvicorn_glue.py``), without a coroutine of their own and without
allocating anything the garbage collector tracks. An ASGI middleware, the
obvious way, costs more than twice as much (benchmarks/request_metrics.py;
docs/benchmarks.md has the numbers).

What is measured: the time to first byte, from the moment uvicorn starts the
app on a request (its head parsed) until the app starts its response (status
line and headers written). That is the server's latency: for an ordinary
response the body follows at once, and a stream (server-sent events, a large
download at a slow client's pace) counts when it starts, not when the client
has it all. Every response uvicorn sends through the app's channel counts, its
own too: ``500`` for an app that failed before answering, ``503`` over
``--limit-concurrency``. Requests refused before they reach that point (a
malformed head: 400) do not, nor do WebSockets.
"""

from __future__ import annotations

from typing import Any

#: histogram bucket bounds, in seconds: from a fast in-memory answer to a slow upload
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: methods counted by name; any other is "OTHER" (a client's made-up method must not add series)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})
OTHER = "OTHER"
#: while requests complete, a heartbeat goes out this long after the previous one
#: (instead of waiting the whole --heartbeat-interval): a scrape 1 s after a burst is exact
FRESH_INTERVAL = 0.25


class RequestStats:
    """A worker's request counts, kept up to date by ``count_requests`` (``worker/uvicorn_glue.py``)."""

    __slots__ = ("buckets", "by_method", "seconds")

    def __init__(self) -> None:
        #: method -> status -> requests (methods outside METHODS under OTHER)
        self.by_method: dict[str, dict[int, int]] = {}
        #: requests per bucket of BUCKETS, and one more for the slower ones
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.seconds = 0.0

    def report(self, in_flight: int) -> dict[str, Any]:
        """What the heartbeat carries (``"m"``): the counts so far."""
        classes: dict[str, int] = {}
        for method, counts in self.by_method.items():
            for status, n in counts.items():
                cls = status // 100 if 100 <= status < 600 else 5  # h11 lets an app send 999
                key = f"{method} {cls}"
                classes[key] = classes.get(key, 0) + n
        return {"q": classes, "h": list(self.buckets), "s": round(self.seconds, 6), "i": in_flight}
