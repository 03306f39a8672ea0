"""The shutdown delay: the primary's half of leaving the load balancer before stopping.

A component of the primary's loop. It tells the workers what ``--health-path``
answers (``{"t": "health", ...}``; the worker's half is ``worker/health.py``):
"ok" once the cluster first had all its workers ready (and to every worker
spawned later, while that holds). On SIGTERM it tells every worker to answer
503, keeps the cluster serving normally for ``--shutdown-delay`` seconds, then
stops it (drains every worker). A second SIGTERM drains at once.

Why: an orchestrator sends SIGTERM and removes the replica from its load
balancers *at the same time*, and the removal takes a while to reach every
node (Kubernetes: endpoints -> kube-proxy/ingress, typically 1-5 s). A server
that stops accepting at SIGTERM refuses the requests still routed to it during
that window. Serving on for a few seconds while failing the health check closes
the window. See docs/deployment.md.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from cluster_server._config import Config
from cluster_server.primary.component import Component, WorkerEvent, override
from cluster_server.wire.messages import HEALTH
from cluster_server.worker.spec import HEALTH_OK as OK
from cluster_server.worker.spec import HEALTH_SHUTTING_DOWN as SHUTTING_DOWN
from cluster_server.worker.spec import HEALTH_STARTING as STARTING

if TYPE_CHECKING:
    from cluster_server.primary.loop import Primary, Worker

logger = logging.getLogger("cluster_server")


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
