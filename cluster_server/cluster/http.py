"""Messaging for apps served by cluster-server: the HTTP worker's link.

An ASGI app in an HTTP worker uses ``cluster_server.cluster`` as any worker
does (``send``, ``broadcast``, ``on_message``, ``recv``, ``messages``,
``request``). Two pieces make that work here:

- ``Messaging`` (``primary/messaging.py``), a component of the HTTP primary:
  it relays broadcasts and answers requests.
- :class:`LoopLink`, the worker's ``Endpoint``: the uvicorn event loop already
  reads the channel (``server.handlers``), so messages are dispatched there, on
  the loop, with no thread. Sends from other threads (a sync endpoint runs in a
  thread pool) are handed to the loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import Any

from cluster_server._errors import ClusterRoleError, DisconnectedError
from cluster_server.cluster import role as _role
from cluster_server.cluster.worker import Endpoint
from cluster_server.wire import channel as _channel
from cluster_server.wire.channel import Channel, Message
from cluster_server.wire.messages import MSG, RES

logger = logging.getLogger("cluster_server")


class LoopLink(Endpoint):
    """An HTTP worker's link: dispatch on the uvicorn loop, through the existing channel."""

    def __init__(self, worker_id: int, channel: Channel) -> None:
        super().__init__(worker_id)
        self.channel = channel
        self.loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    def serve(self, server: Any, loop: asyncio.AbstractEventLoop) -> None:
        """Called on the worker's loop before it serves: take our message types."""
        self.loop = loop
        self._loop_thread = threading.get_ident()
        for kind in (MSG, RES):
            server.handlers[kind] = self.dispatch
        if self.channel.pending:  # queued while the app was imported, before there was a loop
            flush_when_writable(loop, self.channel)

    def default_loop(self) -> asyncio.AbstractEventLoop | None:
        return self.loop

    def _on_loop(self) -> bool:
        return self._loop_thread is None or threading.get_ident() == self._loop_thread

    def _check_may_block(self, what: str) -> None:
        if self._loop_thread is not None and threading.get_ident() == self._loop_thread:
            raise RuntimeError(f"{what} would block the event loop it waits on; use the async form")

    def _send(self, msg: Message, fds: Sequence[int] = ()) -> None:
        if not self.connected:
            raise DisconnectedError(f"worker {self.id} is disconnected from its primary")
        if self._on_loop():
            self._send_now(msg, fds)
            return
        _channel.encode(msg)  # raise in the caller's thread if it cannot be sent
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._send_later, msg, list(fds))

    def _send_now(self, msg: Message, fds: Sequence[int]) -> None:
        try:
            sent = self.channel.send(msg, fds)
        except OSError as exc:
            raise DisconnectedError(f"worker {self.id}'s channel to the primary is closed ({exc})") from None
        if not sent and self.loop is not None:
            flush_when_writable(self.loop, self.channel)

    def _send_later(self, msg: Message, fds: list[int]) -> None:
        try:
            self._send_now(msg, fds)
        except DisconnectedError as exc:
            logger.debug("%s", exc)

    def disconnect(self, asked: bool = False) -> None:
        raise ClusterRoleError(
            "cluster-server manages its HTTP workers: stop or restart them with signals (SIGTERM, SIGHUP)"
        )

    def listen(self, address: tuple[str, int] | str, backlog: int = 511, type: int = 0) -> Any:
        raise ClusterRoleError("cluster-server's HTTP workers already serve the sockets it bound: no cluster.listen")

    def _close_transport(self) -> None:
        pass  # the worker (worker/main.py) owns the channel


def flush_when_writable(loop: asyncio.AbstractEventLoop, channel: Channel) -> None:
    """Send what ``channel`` queued once the primary reads again.

    One writer per channel, whoever queued (the link, the hand-off's acks): it
    sends everything queued, so a later ``add_writer`` replacing it loses nothing.
    """
    loop.add_writer(channel.fileno(), _flush, loop, channel)


def _flush(loop: asyncio.AbstractEventLoop, channel: Channel) -> None:
    try:
        done = channel.flush()
    except OSError:
        done = True
    if done:
        loop.remove_writer(channel.fileno())


def enter_worker(worker_id: int, channel: Channel) -> LoopLink:
    """In a new HTTP worker, before the app is imported: make ``cluster.is_worker`` true."""
    link = LoopLink(worker_id, channel)
    _role.become_worker(link)
    return link
