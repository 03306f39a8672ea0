"""This process's part in a ``cluster_server.cluster`` program, kept in one place.

``cluster.is_primary``, ``cluster.is_worker``, ``cluster.worker`` (and
``workers``, ``settings``) are read from here by the facade
(``cluster/__init__.py``): it registers with :func:`on_change` and copies the
role into its own attributes each time it changes, so reading
``cluster.is_worker`` costs what any module attribute costs, and nothing below
the facade writes its attributes. The role changes only through the functions
below, called by the runtime that makes a process what it is:

- every process starts as the primary (a program run by hand, the HTTP primary);
- :func:`become_worker`: a worker linked to its primary, before the program's
  code runs (``cluster/worker.py``'s ``start_link`` for ``cluster.fork()``'s
  workers, forked or spawned; ``cluster/http.py``'s ``enter_worker`` for an
  HTTP worker of cluster-server);
- :func:`become_template`: a template process of cluster-server
  (``templates/process.py``): it imports the app so that the workers forked
  from it share it, but it is neither the primary nor a worker, so the app's
  ``if cluster.is_primary:`` code does not run there.

This module imports nothing of the cluster API at run time, so the runtimes
below the facade can depend on it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from cluster_server.cluster.primary import ClusterPrimary
    from cluster_server.cluster.worker import Endpoint

Name = Literal["primary", "worker", "template"]

#: what this process is
name: Name = "primary"
#: a worker's link to its primary; None elsewhere
endpoint: Endpoint | None = None
#: ``cluster.worker``: this worker (None in the primary and in a template)
worker: CurrentWorker | None = None
#: the primary's state (workers, events, shared handles): made by the facade when it is
#: first imported; a forked worker keeps its copy of the primary's, which it never uses
primary: ClusterPrimary | None = None


class CurrentWorker:
    """``cluster.worker`` in a worker: this worker's id and pid, and its link to the primary."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint

    @property
    def id(self) -> int:
        """Its id in the primary (in an HTTP worker of cluster-server: its slot, 1..N)."""
        return self._endpoint.id

    @property
    def pid(self) -> int:
        return self._endpoint.pid

    def send(self, data: Any, handle: Any = None, *, keep_open: bool = False) -> None:
        """Send ``data`` to the primary, with a socket if ``handle`` (see ``cluster.send``)."""
        self._endpoint.send(data, handle, keep_open)

    def disconnect(self) -> None:
        """Close this worker's servers and channel; the worker then exits when its code returns."""
        self._endpoint.disconnect()

    def is_connected(self) -> bool:
        return self._endpoint.connected

    def is_dead(self) -> bool:
        """False: this worker runs (Node's ``cluster.worker.isDead()`` in a worker)."""
        return False

    def on(self, event: str, fn: Callable[..., Any] | None = None) -> Any:
        """``message`` (``fn(data)``, or ``fn(data, handle)`` to get sockets sent with messages)
        or ``disconnect`` (``fn()``); without ``fn``, a decorator."""
        if fn is None:
            return lambda f: self.on(event, f)
        if event == "message":
            self._endpoint.on_message(fn)
        elif event == "disconnect":
            self._endpoint.on_disconnect(fn)
        else:
            raise ValueError(f"unknown worker event {event!r}; expected 'message' or 'disconnect'")
        return fn

    def __repr__(self) -> str:
        return f"<CurrentWorker id={self.id} pid={self.pid}>"


_readers: list[Callable[[], None]] = []


def on_change(reader: Callable[[], None]) -> None:
    """Call ``reader()`` now and after every change of the role."""
    _readers.append(reader)
    reader()


def _changed() -> None:
    for reader in _readers:
        reader()


def become_worker(link: Endpoint) -> None:
    """This process is a worker from now on, linked to its primary by ``link``."""
    global name, endpoint, worker
    name, endpoint, worker = "worker", link, CurrentWorker(link)
    _changed()


def become_template() -> None:
    """This process is a template of cluster-server: neither the primary nor a worker."""
    global name
    name = "template"
    _changed()


def adopt_primary(state: ClusterPrimary) -> None:
    """Keep the primary's state (the facade makes it once, when it is first imported)."""
    global primary
    primary = state
    _changed()
