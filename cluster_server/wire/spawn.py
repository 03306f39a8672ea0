"""Forking a child joined by a channel, and the life of that child: declared once.

Every process cluster-server forks (an HTTP worker, a template, the reload
watcher, an upgrade's new primary, a worker of the cluster API) is started by
:func:`fork_child` and, except the upgrade (it ``exec``s), lives inside
:func:`child_main`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable
from typing import NoReturn

from cluster_server import _proc
from cluster_server.wire.channel import pair

logger = logging.getLogger("cluster_server")

#: what a forked child runs: given its end of the channel and the fds it must close
ChildMain = Callable[[socket.socket, list[int]], NoReturn]


def fork_child(
    main: ChildMain, close_in_child: Iterable[int] = (), *, block_signals: bool = False
) -> tuple[int, socket.socket]:
    """Fork a child joined to this process by a new channel; its pid and our end.

    The child runs ``main(its end, fds)`` and never returns; ``fds`` are
    ``close_in_child`` (the parent's fds it must not keep) and our end. Raises
    ``OSError`` when there is no socket pair or process to be had (out of fds,
    processes or memory): then nothing is left open.

    ``block_signals``: the primary's signals stay blocked in the child until it
    has set its own dispositions (``_proc.fork``; the child must call
    ``_proc.after_fork_in_child``, which unblocks them), so a signal sent right
    after the fork (a drain) is not swallowed by the primary's handlers.
    """
    ours, theirs = pair()
    try:
        close = [*close_in_child, ours.fileno()]
        _proc.flush_output()  # or the child would print what the parent had buffered
        pid = _proc.fork() if block_signals else os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            main(theirs, close)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return pid, ours


def child_main(body: Callable[[], int], crashed: str) -> NoReturn:
    """Run ``body`` in a forked child, then exit with the status it returns. Never returns.

    ``SystemExit`` gives its code (an int; else 1); any other exception is logged
    with its traceback (``crashed`` says whose) and exits 1. The child never
    unwinds into its parent's code: ``os._exit``, after the logs and output are flushed.
    """
    code = 1
    try:
        code = body()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        logger.exception("%s", crashed)
    finally:
        logging.shutdown()
        _proc.flush_output()  # tolerates a closed or None stream: nothing may stop os._exit
        os._exit(code)
