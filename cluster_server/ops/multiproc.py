"""``PROMETHEUS_MULTIPROC_DIR``: the app's own prometheus-client metrics, from every worker.

prometheus-client's multiprocess mode has each process write its metrics to
files in that directory, and a ``MultiProcessCollector`` sums them at scrape
time. Two things only the process that starts and reaps the workers can do
(prometheus-client's documentation asks them of gunicorn's hooks):

- wipe the directory when the server starts (files left by a previous run
  would be summed in);
- call ``mark_process_dead(pid)`` for each worker that exited, so its
  live-mode gauges (``multiprocess_mode="livesum"`` and friends) stop counting.

:class:`MultiprocDir` does both, as a primary component, whenever the
variable is set (with or without ``--metrics-bind``). With ``--metrics-bind``,
the primary's ``/metrics`` also serves the sum over every worker
(``ops/metrics.py``), so the app needs no metrics route of its own. An upgrade's
new primary does not wipe the directory: the old primary's workers still
write to it while they drain. See examples/multiproc_app/ and
docs/operations.md.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
from typing import TYPE_CHECKING

from cluster_server._config import Config
from cluster_server._errors import ConfigError
from cluster_server.ops import privileges as _privileges
from cluster_server.primary.component import Component, WorkerEvent, override

if TYPE_CHECKING:
    from cluster_server.primary.loop import Worker

logger = logging.getLogger("cluster_server")

ENV = "PROMETHEUS_MULTIPROC_DIR"


def directory() -> str | None:
    """The multiprocess directory, if the variable is set (prometheus-client also reads its lower-case form)."""
    return os.environ.get(ENV) or os.environ.get(ENV.lower()) or None


def prepare_directory(path: str, config: Config, *, wipe: bool) -> None:
    """Create ``path`` if missing (for ``--user``'s workers to write in), wipe its files if asked.

    Only prometheus-client's own files (``*.db``) are removed. Raises ConfigError.
    """
    try:
        if not os.path.isdir(path):
            os.makedirs(path, mode=0o700)
            creds = _privileges.resolve(config.user, config.group)
            if creds is not None and os.geteuid() == 0:
                os.chown(path, creds.uid, creds.gid)
        if wipe:
            for name in glob.glob(os.path.join(glob.escape(path), "*.db")):
                os.unlink(name)
    except OSError as exc:
        raise ConfigError(
            f"{ENV}={path}: {exc.strerror or exc}; point it at a directory this user can write, or unset it"
        ) from None


class MultiprocDir(Component):
    """Primary component: ``mark_process_dead`` for every worker that exits."""

    def __init__(self, path: str, config: Config, *, wipe: bool = True) -> None:
        self.path = path
        prepare_directory(path, config, wipe=wipe)
        if wipe:
            logger.info("%s: %s wiped at start", ENV, path)

    @override
    def worker_event(self, event: WorkerEvent, w: Worker) -> None:
        if event != "exited":
            return
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(w.pid, self.path)  # type: ignore[no-untyped-call]
