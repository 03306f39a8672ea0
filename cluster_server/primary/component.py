"""The primary's extension points: the hooks a component may implement, declared once.

A component plugs into the primary's loop: the connection scheduler, the
control socket, the metrics endpoint, the template launcher, the reloader...
It subclasses :class:`Component` and overrides the hooks it needs; the others
keep their no-op defaults. Every override is marked ``@override``, and mypy
checks it (``explicit-override`` in pyproject.toml): a hook whose name is
misspelled, or whose signature does not match the one declared here, fails
``mypy --strict``, where it would otherwise never be called.

The primary calls each hook through a guard (``Primary._call``): a hook that
raises is logged with its traceback and counts as returning its default, and
the other components still get their call. A component that fails
``MAX_FAILURES`` times is disabled (closed, no more calls); an ``essential``
one (the cluster cannot serve without it) stops the cluster instead, with a
graceful drain. Callbacks a component registers itself (``add_reader``,
``watch_child``) run inside the loop's own guard: an error there drains the
cluster gracefully (``Primary._internal_error``).

A component changes the primary's state only through the primary's methods
(``roll``, ``recycle``, ``scale``, ``stop``, ``send``, ``hold_slots``,
``release_slots``, ``watch_child``, ``on_signal``...), never by writing its
fields.
"""

from __future__ import annotations

import difflib
import sys
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from cluster_server._errors import ClusterServerError
from cluster_server.wire.channel import Message

if TYPE_CHECKING:
    from typing_extensions import override  # mypy knows it from typeshed; no runtime dependency

    from cluster_server.primary.loop import Primary, Roll, Worker
elif sys.version_info >= (3, 12):
    from typing import override
else:

    def override(method):  # type: ignore[no-untyped-def]  # typing.override is 3.12+
        """Mark a method as overriding its base class's (a no-op before Python 3.12)."""
        method.__override__ = True
        return method


__all__ = ["MAX_FAILURES", "Component", "Sample", "WorkerEvent", "override"]

#: what happened to a worker: hook ``worker_event``
WorkerEvent = Literal["spawned", "ready", "draining", "exited"]
#: an extra metrics sample: (name, help, "gauge" or "counter", labels, value)
Sample = tuple[str, str, str, dict[str, str], float]
#: hook failures after which a component is disabled
MAX_FAILURES = 10


class Component:
    """Something that plugs into the primary's loop. Every hook is optional (a no-op here)."""

    #: the cluster cannot serve without it: disabling it stops the cluster (gracefully)
    essential: ClassVar[bool] = False

    @override
    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse a public method named almost like a hook (``worker_events``): a typo that
        would never be called. mypy catches it too, where the method says ``@override``."""
        super().__init_subclass__(**kwargs)
        for name, value in vars(cls).items():
            if callable(value) and not name.startswith("_") and name not in _HOOKS:
                near = difflib.get_close_matches(name, _HOOKS, n=1, cutoff=0.85)
                if near:
                    raise TypeError(f"{cls.__qualname__}.{name} is not a hook: is it {near[0]} misspelled?")

    def attach(self, primary: Primary) -> None:
        """Once, in order, when the loop is set up and before the first worker starts.

        A ``ClusterServerError`` raised here is a start-up error (a control socket
        path already in use...): ``Primary.run`` raises it.
        """

    def next_deadline(self) -> float | None:
        """The earliest time (the primary's clock) ``tick`` must run, or None."""
        return None

    def tick(self) -> None:
        """After every wake-up of the loop: act on the deadlines that passed."""

    def worker_event(self, event: WorkerEvent, worker: Worker) -> None:
        """A worker was spawned, became ready, started draining, or exited (and was reaped)."""

    def worker_message(self, worker: Worker, msg: Message, fds: list[int]) -> bool:
        """A worker's message of a type the primary does not handle itself.

        True: handled, and the fds are the component's now (it closes them).
        False: not ours; the next component is asked.
        """
        return False

    def cannot_start(self, error: ClusterServerError) -> bool:
        """The first generation cannot start. True: handled (the primary keeps running)."""
        return False

    def before_roll(self, reason: str, slots: list[int] | None) -> bool:
        """A rolling restart is about to start. False: not yet (the component calls ``roll`` again)."""
        return True

    def roll_started(self, roll: Roll) -> None:
        """A rolling restart or a recycle started (every one, even one over within the same call)."""

    def roll_finished(self, roll: Roll, outcome: str) -> None:
        """A rolling restart or a recycle ended: ``completed``, ``failed`` or ``aborted``."""

    def defer_stop(self, why: str) -> bool:
        """SIGTERM. True: the component stops the cluster later itself (``--shutdown-delay``)."""
        return False

    def fds_to_close_in_child(self) -> list[int]:
        """This component's fds, which a newly forked child must not keep."""
        return []

    def metrics_samples(self) -> list[Sample]:
        """Extra samples for the metrics endpoint, asked on every scrape."""
        return []

    def close(self) -> None:
        """The primary exits (or disabled this component): release what it holds."""


_HOOKS = [name for name, value in vars(Component).items() if callable(value) and not name.startswith("_")]
