"""The health path and the shutdown delay: leaving the load balancer before stopping.

Two halves, one per process role:

- worker side: :class:`HealthMiddleware` wraps the app and answers ``GET``/``HEAD``
  on ``--health-path`` itself, before the app, with what the primary last told
  the worker (``{"t": "health", "ok": bool, "status": text}`` on its channel,
  see :func:`health_handler`): ``503 starting`` until every worker of the first
  generation is ready, then ``200 ok``, then ``503 shutting down`` from the
  moment the primary begins to stop.
- primary side: :class:`ShutdownDelay`, a component of the primary's loop. It
  says "ok" once the cluster first had all its workers ready (and to every
  worker spawned later, while that holds). On SIGTERM it tells every worker to
  answer 503, keeps the cluster serving normally for ``--shutdown-delay``
  seconds, then stops it (drains every worker). A second SIGTERM drains at once.

Why: an orchestrator sends SIGTERM and removes the replica from its load
balancers *at the same time*, and the removal takes a while to reach every
node (Kubernetes: endpoints -> kube-proxy/ingress, typically 1-5 s). A server
that stops accepting at SIGTERM refuses the requests still routed to it during
that window. Serving on for a few seconds while failing the health check closes
the window. See docs/deployment.md.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from cluster_server._config import Config
from cluster_server._proc import close_all
from cluster_server.primary.component import Component, WorkerEvent, override
from cluster_server.wire.messages import HEALTH

if TYPE_CHECKING:
    from cluster_server.primary.loop import Primary, Worker

logger = logging.getLogger("cluster_server")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: what the health path says, and why
OK, STARTING, SHUTTING_DOWN = "ok", "starting", "shutting down"


class HealthState:
    """The worker's copy of the cluster's health, set by the primary's messages."""

    def __init__(self) -> None:
        self.ok = False
        self.status = STARTING


class HealthMiddleware:
    """Answer ``GET``/``HEAD`` on ``path`` before the app; everything else goes to the app.

    The path is matched as the client sent it, without uvicorn's ``root_path``
    prefix and without the query string.
    """

    def __init__(self, app: ASGIApp, path: str, state: HealthState) -> None:
        self.app = app
        self.path = path
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") in ("GET", "HEAD") and self._requested(scope) == self.path:
            ok = self.state.ok
            body = f"{self.state.status}\n".encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200 if ok else 503,
                    "headers": [
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", str(len(body)).encode()),
                        (b"cache-control", b"no-store"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _requested(scope: Scope) -> str:
        path: str = scope.get("path", "")
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            return path[len(root) :]
        return path


def health_handler(state: HealthState) -> Callable[[dict[str, Any], list[int]], None]:
    """The worker's handler for ``{"t": "health", "ok": bool, "status": str}`` messages."""

    def handle(msg: dict[str, Any], fds: list[int]) -> None:
        close_all(fds)  # none expected; a handler owns what it is given
        ok, status = msg.get("ok"), msg.get("status")
        if isinstance(ok, bool):
            state.ok = ok
            state.status = status[:100] if isinstance(status, str) and status else (OK if ok else SHUTTING_DOWN)

    return handle


class ShutdownDelay(Component):
    """Primary component: health "ok" once all workers were ready; on SIGTERM, fail it, serve on, then drain.

    Hooks (see ``primary/component.py``): ``defer_stop(why)`` is asked by
    ``Primary.handle_term`` and returns True when it stops the cluster later
    itself; ``worker_event`` keeps late workers informed and marks the cluster
    unhealthy when it stops without a delay (SIGINT, a second SIGTERM...).
    """

    def __init__(self, config: Config) -> None:
        self.delay = config.shutdown_delay
        #: workers only handle health messages when they serve a health path
        self.tell = config.health_path is not None
        #: what the workers are told: STARTING until the cluster first had all its workers ready
        self.status = STARTING
        #: when the delay ends and the drain starts (primary clock); None: not shutting down
        self.stop_at: float | None = None

    primary: Primary  # set by attach

    @override
    def attach(self, primary: Primary) -> None:
        self.primary = primary

    @override
    def defer_stop(self, why: str) -> bool:
        if self.stop_at is not None:
            logger.info("%s again: draining now instead of waiting out --shutdown-delay", why)
            return False
        self.mark_unhealthy()
        if self.delay <= 0:
            return False
        self.stop_at = self.primary.clock() + self.delay
        logger.info(
            "%s: health path answers 503 now; serving on for %g s (--shutdown-delay), then draining",
            why,
            self.delay,
        )
        return True

    @override
    def next_deadline(self) -> float | None:
        if self.stop_at is None or self.primary.stopping:
            return None
        return self.stop_at

    @override
    def tick(self) -> None:
        if self.status == STARTING and self.primary.ever_ready and not self.primary.stopping:
            self._tell_all(OK)
        if self.stop_at is not None and not self.primary.stopping and self.primary.clock() >= self.stop_at:
            self.primary.stop(graceful=True, why=f"SIGTERM, after the {self.delay:g} s shutdown delay")

    @override
    def worker_event(self, event: WorkerEvent, worker: Worker) -> None:
        if event == "spawned" and self.status != STARTING and self.tell:
            self.primary.send(worker, self._message())
        elif event == "draining" and self.primary.stopping:
            # Stopping without a delay: still tell every worker before it drains.
            self.mark_unhealthy()

    def mark_unhealthy(self) -> None:
        if self.status != SHUTTING_DOWN:
            self._tell_all(SHUTTING_DOWN)

    def _tell_all(self, status: str) -> None:
        self.status = status
        if not self.tell:
            return
        for w in list(self.primary.workers.values()):
            self.primary.send(w, self._message())

    def _message(self) -> dict[str, Any]:
        return {"t": HEALTH, "ok": self.status == OK, "status": self.status}
