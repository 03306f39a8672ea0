"""A worker's channel to the primary: framed JSON messages, with fds alongside.

One ``AF_UNIX``/``SOCK_SEQPACKET`` socketpair per worker. SEQPACKET keeps
message boundaries, so each ``sendmsg`` is exactly one message together with
the file descriptors it carries (``SCM_RIGHTS``): no framing bytes, and no way
for fds to drift onto the wrong message, as they can on a byte stream.

A message is a JSON object (UTF-8). The primary never unpickles anything from a
worker: a worker may run with fewer privileges than the primary. Anything that
is not a JSON object is a :class:`ChannelError` the caller logs and drops.

A message larger than one datagram may be (:data:`MAX_MESSAGE`, 64 KiB: a
SEQPACKET message must fit the socket buffer whole) travels in a sealed
``memfd`` sent with a small envelope, ``{"t": "large", "n": size}``, on the
same socket: so it keeps its place among the others (the same ordering) and
the fds it carries, and small messages pay one length check for it. Up to
:data:`MAX_LARGE_MESSAGE` (256 MiB) encoded. The receiver checks the memfd is a
regular file of exactly that size before it reads it, and reads no more.

Both ends are non-blocking. ``send`` queues what the kernel will not take yet;
the owner of the channel calls ``flush`` when the socket becomes writable.
Queued fds stay open (owned by the channel) until they are sent or the channel
is closed, so nothing accepted is lost while a worker's buffer is full.
"""

from __future__ import annotations

import array
import collections
import errno
import fcntl
import json
import logging
import os
import select
import socket
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from cluster_server._errors import ChannelError
from cluster_server._proc import close_all as _close_all
from cluster_server.wire.messages import LARGE

#: Largest message sent as one datagram. SEQPACKET messages must fit the socket buffer whole.
MAX_MESSAGE = 64 * 1024
#: Largest encoded message at all: past MAX_MESSAGE it travels in a memfd (see above)
MAX_LARGE_MESSAGE = 256 * 1024 * 1024
#: Linux refuses more than 253 fds in one message (SCM_MAX_FD).
MAX_FDS = 253
_FD_SIZE = array.array("i").itemsize
_ANCBUF = socket.CMSG_SPACE(MAX_FDS * _FD_SIZE)
_CMSG_CLOEXEC: int = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL

Message = dict[str, Any]

logger = logging.getLogger("cluster_server")

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def encode(msg: Message) -> bytes:
    data = _encoder.encode(msg).encode()
    if len(data) > MAX_LARGE_MESSAGE:
        raise ChannelError(f"message of {len(data)} bytes is over the {MAX_LARGE_MESSAGE}-byte limit")
    return data


def frame(data: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
    """What goes on the wire for an encoded message: itself, or past MAX_MESSAGE an
    envelope, with a sealed memfd holding the message after its own fds (the caller
    owns that memfd, as it owns ``fds``)."""
    if len(data) <= MAX_MESSAGE:
        return data, fds
    try:
        memfd = os.memfd_create("cluster-server-message", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as exc:  # out of fds or memory: the sender's problem, not the channel's
        raise ChannelError(f"no memfd for a message of {len(data)} bytes: {exc}") from None
    try:
        view = memoryview(data)
        written = 0
        while written < len(data):
            written += os.write(memfd, view[written:])
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, _SEALS)
    except OSError as exc:
        os.close(memfd)
        raise ChannelError(f"cannot write a message of {len(data)} bytes to a memfd: {exc}") from None
    return _encoder.encode({"t": LARGE, "n": len(data)}).encode(), [*fds, memfd]


def unframe(msg: Message, fds: list[int]) -> tuple[Message, list[int]]:
    """The message a received one stands for: itself, or what the memfd of a ``large``
    envelope holds (the memfd is closed; the other fds are the message's). ChannelError
    (every fd closed) for a malformed one."""
    if msg.get("t") != LARGE:
        return msg, fds
    size = msg.get("n")
    if not fds or isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_LARGE_MESSAGE:
        _close_all(fds)
        raise ChannelError(f"a large message without its memfd, or of a bad size ({size!r:.20})")
    memfd, fds = fds[-1], fds[:-1]
    try:
        inner = decode(_read_memfd(memfd, size))
        if inner.get("t") == LARGE:
            raise ChannelError("a large message inside a large message")
    except OSError as exc:
        _close_all(fds)
        raise ChannelError(f"a large message's memfd cannot be read: {exc}") from None
    except BaseException:
        _close_all(fds)
        raise
    finally:
        os.close(memfd)
    return inner, fds


def _read_memfd(fd: int, size: int) -> bytearray:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        raise ChannelError(f"a large message's memfd is not a file of {size} bytes")
    buf = bytearray(size)
    view = memoryview(buf)
    done = 0
    while done < size:
        n = os.preadv(fd, [view[done:]], done)
        if n <= 0:
            raise ChannelError(f"a large message's memfd ended after {done} of {size} bytes")
        done += n
    return buf


def decode(data: bytes | bytearray) -> Message:
    """One message from bytes a peer sent: a JSON object, or ``ChannelError``.

    Never raises anything else: the size is bounded (``MAX_LARGE_MESSAGE``) and a
    nesting too deep for the decoder (``[`` x 60,000, say) is refused, not
    allowed to raise ``RecursionError`` into the primary's loop.
    """
    try:
        msg = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ChannelError(f"undecodable message ({len(data)} bytes): {exc}") from None
    except RecursionError:
        raise ChannelError(f"message nested too deeply ({len(data)} bytes)") from None
    if not isinstance(msg, dict):
        raise ChannelError(f"message is a JSON {type(msg).__name__}, not an object")
    return msg


class FdsTruncated(ChannelError):
    """A message arrived without all its fds (``MSG_CTRUNC``): the receiver is at its fd limit.

    ``message`` is the decoded message (None if it was not valid), so the
    receiver can refuse what it was sent; the fds that did arrive come with it.
    """

    def __init__(self, text: str, message: Message | None) -> None:
        super().__init__(text)
        self.message = message


def pair() -> tuple[socket.socket, socket.socket]:
    """A connected (primary end, worker end) socket pair."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return a, b


class Channel:
    """One end of a worker channel. Not thread-safe; owned by one event loop."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._fileno = sock.fileno()
        # (payload, fds) not yet taken by the kernel; the fds are ours until sent
        # (what goes on the wire, the fds with it, the message's size) not yet taken by the kernel
        self._out: collections.deque[tuple[bytes, list[int], int]] = collections.deque()
        self._out_bytes = 0
        self._out_fds = 0
        self.closed = False

    def fileno(self) -> int:
        return self._fileno

    @property
    def pending(self) -> int:
        """Messages queued because the peer's buffer was full."""
        return len(self._out)

    @property
    def pending_fds(self) -> int:
        """File descriptors held by the queued messages (the channel's until sent)."""
        return self._out_fds

    @property
    def pending_bytes(self) -> int:
        """Bytes of the messages queued because the peer's buffer was full."""
        return self._out_bytes

    def send(self, msg: Message, fds: Iterable[int] = ()) -> bool:
        """Send ``msg`` with ``fds``, which are the channel's from now on, whatever happens:
        it closes them once they are sent, or at once when it raises.

        Returns True when the kernel took it now, False when it was queued.
        Raises ``BrokenPipeError`` when the peer is gone (or the channel is
        closed), ``ChannelError``/``TypeError``/``ValueError`` when ``msg`` cannot
        be encoded.
        """
        owned = list(fds)
        item: tuple[bytes, list[int], int] | None = None
        try:
            if self.closed:
                raise BrokenPipeError(errno.EPIPE, "channel is closed")
            data = encode(msg)
            item = (*frame(data, owned), len(data))
            if not self._out and self._try_send(item):
                return True
        except BaseException:
            # not sent, not queued: nobody else will close them (nor a large message's memfd)
            _close_all(item[1] if item is not None else owned)
            raise
        self._out.append(item)
        self._out_bytes += item[2]
        self._out_fds += len(item[1])
        return False

    def flush(self) -> bool:
        """Send what is queued; True when nothing is left."""
        while self._out:
            if not self._try_send(self._out[0]):
                return False
            _, fds, size = self._out.popleft()
            self._out_bytes -= size
            self._out_fds -= len(fds)
        return True

    def _try_send(self, item: tuple[bytes, list[int], int]) -> bool:
        data, fds, _ = item
        try:
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                self.sock.sendmsg([data], anc)
            else:
                self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:  # transient kernel memory pressure
                return False
            raise
        for fd in fds:
            os.close(fd)
        return True

    def queued_fds(self) -> list[int]:
        """The fds of queued messages (still owned by the channel)."""
        return [fd for _, item_fds, _ in self._out for fd in item_fds]

    def take_pending_fds(self) -> list[int]:
        """Remove queued messages and hand back the fds they carried (caller owns them)."""
        fds = self.queued_fds()
        self._out.clear()
        self._out_bytes = self._out_fds = 0
        return fds

    def receive(self) -> Iterator[tuple[Message | ChannelError, list[int]]]:
        """Yield every message available now as (message, fds).

        A message that cannot be decoded is yielded as a ``ChannelError`` in its
        place (the fds that came with it are closed), so the caller can log it
        and go on. Raises ``EOFError`` when the peer has closed its end, or when
        the socket failed (any other ``OSError``: nothing more can be read).

        The caller may close the channel while handling a message (a failed
        send to the same peer): the loop then ends instead of reading a closed fd.
        """
        while not self.closed:
            try:
                data, anc, flags, _ = self.sock.recvmsg(MAX_MESSAGE + 1, _ANCBUF, _CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                raise EOFError from None
            fds = _fds_from(anc)
            if not data and not fds:
                raise EOFError
            if flags & socket.MSG_CTRUNC:
                # The kernel dropped fds (EMFILE on our side, or too many): say so, with
                # the message itself, so the receiver can tell the sender what to re-send.
                try:
                    truncated: Message | None = decode(data)
                except ChannelError:
                    truncated = None
                text = f"file descriptors were truncated (got {len(fds)}); at the fd limit?"
                yield FdsTruncated(text, truncated), fds
                continue
            if flags & socket.MSG_TRUNC:
                _close_all(fds)
                yield ChannelError(f"message over {MAX_MESSAGE} bytes truncated"), []
                continue
            try:
                msg = decode(data)
            except ChannelError as exc:
                _close_all(fds)
                yield exc, []
                continue
            try:
                msg, fds = unframe(msg, fds)
            except ChannelError as exc:  # (its fds are closed)
                yield exc, []
                continue
            yield msg, fds

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        _close_all(self.take_pending_fds())
        self.sock.close()


def _fds_from(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - (len(payload) % _FD_SIZE)])
            fds.extend(arr)
    return fds


def receive_all(
    channel: Channel, handle: Callable[[Message, list[int]], None], who: str, *, truncated: bool = False
) -> bool:
    """Hand every message ``channel`` holds now to ``handle(msg, fds)``: the fds are its to close.

    A message that cannot be decoded is logged (``who: dropped a message: why``)
    and dropped, its fds closed. With ``truncated``, a message that lost fds on
    the way (``FdsTruncated``) is handed on marked ``"ctrunc": True``, with the
    fds that came, so that the receiver can refuse what it did not get. Returns
    False when the peer closed the channel or it failed: the caller closes its
    end. Stops early when ``handle`` closed the channel.
    """
    try:
        for msg, fds in channel.receive():
            if truncated and isinstance(msg, FdsTruncated) and msg.message is not None:
                msg = {**msg.message, "ctrunc": True}
            if isinstance(msg, ChannelError):
                _close_all(fds)
                logger.warning("%s: dropped a message: %s", who, msg)
                continue
            handle(msg, fds)
    except EOFError:
        return False
    return True


def send_blocking(channel: Channel, msg: Message, fds: Iterable[int] = (), timeout: float = 5.0) -> None:
    """Send ``msg`` and wait (at most ``timeout`` s) until the kernel took everything queued.

    For a process with nothing else to do meanwhile (a template, the watcher), or
    a short exchange of the primary's. Raises ``TimeoutError``, or ``OSError``
    when the peer is gone.
    """
    if channel.send(msg, fds):
        return
    deadline = time.monotonic() + timeout
    while not channel.flush():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"the peer did not read its channel within {timeout:g} s")
        select.select([], [channel], [], remaining)
