"""Handles sent with messages: Node's ``worker.send(message, sendHandle)``, in Python.

``worker.send(data, handle=sock)`` in the primary and ``cluster.send(data,
handle=sock)`` in a worker pass a socket (connected, listening or datagram)
with the message: its fd travels over the channel (``SCM_RIGHTS``) and the
message says so (``"handle": "socket"``). The receiver gets a
``socket.socket`` of its own:

- a ``message`` listener that takes one more argument than the message
  (``fn(data, handle)`` on a worker, ``fn(worker, data, handle)`` on the
  cluster) gets it; listeners that do not take it get the message alone;
- a handle nobody took (no such listener, a malformed message, a worker
  already disconnected) is closed there and then, never leaked;
- ``recv(with_handle=True)`` / ``get_message(with_handle=True)`` return
  ``(data, handle)`` (``handle`` None when none came); without it, a handle
  that came is closed.

After a send, the sender's socket is closed if it is a connection (Node's
default for a ``net.Socket``), unless ``keep_open=True``; listening and
datagram sockets stay open (as Node keeps a ``net.Server`` or ``dgram.Socket``).
"""

from __future__ import annotations

import functools
import inspect
import logging
import socket
from collections.abc import Callable
from typing import Any, Final

from cluster_server._proc import close_all
from cluster_server.wire.channel import Message

logger = logging.getLogger("cluster_server.cluster")

#: the value of a message's ``handle`` field: what kind of handle its fd is
SOCKET: Final = "socket"


def fd_of(handle: Any) -> int:
    """The fd of a handle to send; TypeError/ValueError for anything that cannot be one."""
    if not isinstance(handle, socket.socket):
        raise TypeError(f"a handle is a socket.socket (connected, listening or datagram), not {type(handle).__name__}")
    fd = handle.fileno()
    if fd < 0:
        raise ValueError("the handle is closed: nothing to send")
    return fd


def close_after_send(handle: socket.socket, keep_open: bool) -> None:
    """Close a sent connection in the sender, unless ``keep_open`` (Node's ``keepOpen``)."""
    if keep_open or handle.type != socket.SOCK_STREAM:
        return
    try:
        listening = handle.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 0
    if not listening:
        handle.close()


def adopt(msg: Message, fds: list[int], who: str) -> socket.socket | None:
    """The handle that came with ``msg``, as a socket this process owns; None if none did.

    Any fd that cannot be one (more than one, not a socket, no ``handle`` field)
    is closed, with a warning.
    """
    if not fds:
        return None
    if msg.get("handle") != SOCKET:
        close_all(fds)
        logger.warning("%s: a message came with %d fd(s) it does not explain; closed", who, len(fds))
        return None
    close_all(fds[1:])
    try:
        return socket.socket(fileno=fds[0])
    except OSError as exc:
        close_all(fds[:1])
        logger.warning("%s: a handle that is not a socket (%s); closed", who, exc)
        return None


def takes(fn: Callable[..., Any], n: int) -> bool:
    """Whether ``fn`` accepts ``n`` positional arguments (the message's, plus the handle)."""
    try:
        return _takes(fn, n)
    except TypeError:  # not hashable: no cache
        return _takes.__wrapped__(fn, n)


@functools.lru_cache(maxsize=4096)
def _takes(fn: Callable[..., Any], n: int) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: call it as before
        return False
    positional = 0
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            return True
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional += 1
    return positional >= n


def call_args(fn: Callable[..., Any], args: tuple[Any, ...], handle: socket.socket | None) -> tuple[Any, ...]:
    """The arguments to call a message listener with: the handle appended if one came and it takes it."""
    if handle is not None and takes(fn, len(args) + 1):
        return (*args, handle)
    return args
