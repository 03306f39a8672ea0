"""The worker channel, on real SEQPACKET socket pairs with real file descriptors."""

from __future__ import annotations

import array
import contextlib
import os
import resource
import socket
from collections.abc import Iterator

import pytest

from cluster_server import ChannelError
from cluster_server.wire import channel
from cluster_server.wire.channel import MAX_MESSAGE, Channel, decode, encode

from ..conftest import is_open


def receive_all(ch: Channel) -> list[tuple[object, list[int]]]:
    return list(ch.receive())


def test_messages_keep_their_boundaries_and_order(ends: tuple[Channel, Channel]) -> None:
    a, b = ends
    msgs = [{"t": "hb", "r": i, "c": 0} for i in range(5)] + [{"t": "x", "text": "héllo ✓", "nested": {"a": [1]}}]
    for m in msgs:
        assert a.send(m) is True
    assert receive_all(b) == [(m, []) for m in msgs]
    assert receive_all(b) == [], "nothing more: receive returns instead of blocking"


def test_both_directions(ends: tuple[Channel, Channel]) -> None:
    a, b = ends
    b.send({"t": "ready"})
    a.send({"t": "drain"})
    assert receive_all(a) == [({"t": "ready"}, [])]
    assert receive_all(b) == [({"t": "drain"}, [])]


def test_fds_travel_with_their_message_and_are_cloexec(ends: tuple[Channel, Channel]) -> None:
    a, b = ends
    r, w = os.pipe()
    try:
        assert a.send({"t": "conn", "n": 1}, [r])
        assert not is_open(r), "the channel owns sent fds and closes its copy"
        [(msg, fds)] = receive_all(b)
        assert msg == {"t": "conn", "n": 1}
        assert len(fds) == 1
        assert not os.get_inheritable(fds[0]), "received fds must not leak into children"
        os.write(w, b"through")
        assert os.read(fds[0], 16) == b"through"
        os.close(fds[0])
    finally:
        os.close(w)


def test_many_fds_in_one_message(ends: tuple[Channel, Channel]) -> None:
    a, b = ends
    socks = [socket.socket() for _ in range(20)]
    a.send({"t": "many"}, [s.detach() for s in socks])
    [(_, fds)] = receive_all(b)
    assert len(fds) == 20
    for fd in fds:
        with socket.socket(fileno=fd) as sock:
            assert sock.type == socket.SOCK_STREAM


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"\xff\xfe\x00garbage", "undecodable"),
        (b"{not json", "undecodable"),
        (b"[1, 2]", "JSON list, not an object"),
        (b'"text"', "JSON str, not an object"),
        (b"42", "JSON int, not an object"),
    ],
)
def test_garbage_is_yielded_as_channel_error(ends: tuple[Channel, Channel], raw: bytes, why: str) -> None:
    a, b = ends
    a.sock.send(raw)
    a.send({"t": "after"})
    [(err, fds), (msg, _)] = receive_all(b)
    assert isinstance(err, ChannelError) and why in str(err)
    assert fds == []
    assert msg == {"t": "after"}, "the channel goes on after a bad message"


def test_fds_sent_with_garbage_are_closed(ends: tuple[Channel, Channel]) -> None:
    a, b = ends
    r, w = os.pipe()
    os.close(w)
    lowest_free = os.dup(0)
    os.close(lowest_free)
    a.sock.sendmsg([b"nope"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, r.to_bytes(4, "little"))])
    os.close(r)
    [(err, fds)] = receive_all(b)
    assert isinstance(err, ChannelError) and fds == []
    probe = os.dup(0)
    os.close(probe)
    assert probe <= lowest_free, "the received fd was left open"


def test_oversized_message_is_truncated_and_dropped(ends: tuple[Channel, Channel]) -> None:
    a, b = ends
    a.sock.send(b"{" + b" " * (MAX_MESSAGE + 10) + b"}")
    a.send({"t": "ok"})
    [(err, _), (msg, _)] = receive_all(b)
    assert isinstance(err, ChannelError) and "truncated" in str(err)
    assert msg == {"t": "ok"}


def test_encode_refuses_messages_over_the_large_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    assert channel.MAX_LARGE_MESSAGE >= 64 * 1024 * 1024  # the documented bound
    monkeypatch.setattr(channel, "MAX_LARGE_MESSAGE", 100_000)  # (256 MiB: too big to build here)
    with pytest.raises(ChannelError, match="over the 100000-byte limit"):
        encode({"t": "x", "blob": "a" * 100_000})
    assert decode(encode({"t": "x"})) == {"t": "x"}


def drain(sender: Channel, receiver: Channel) -> list[tuple[object, list[int]]]:
    """Flush ``sender`` while reading ``receiver`` until nothing is queued; everything received."""
    got: list[tuple[object, list[int]]] = []
    while not sender.flush():
        got += receive_all(receiver)
    return got + receive_all(receiver)


def test_large_messages_keep_their_place_and_their_fds(ends: tuple[Channel, Channel]) -> None:
    a, b = ends
    big = "é" * (2 * 1024 * 1024 + 3)  # 4 MiB and 6 bytes of UTF-8 (64 MiB: test_cluster_large.py)
    r, w = os.pipe()
    try:
        a.send({"t": "before"})
        a.send({"t": "big", "blob": big}, [os.dup(r)])
        a.send({"t": "after", "blob": "x" * (MAX_MESSAGE + 1)})  # just over: a memfd too
        a.send({"t": "last"})
        got = drain(a, b)
        assert [m["t"] for m, _ in got] == ["before", "big", "after", "last"]  # type: ignore[index]
        (big_msg, big_fds), (after, after_fds) = got[1], got[2]
        assert big_msg == {"t": "big", "blob": big} and len(big_fds) == 1
        assert after_fds == [] and len(after["blob"]) == MAX_MESSAGE + 1  # type: ignore[index]
        os.write(w, b"!")
        assert os.read(big_fds[0], 1) == b"!"  # its own fd came with it; the memfd did not stay open
        os.close(big_fds[0])
    finally:
        os.close(r)
        os.close(w)


def _envelope(ch: Channel, msg: dict[str, object], fds: list[int]) -> None:
    payload = encode(msg)
    ch.sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else [])
    for fd in fds:
        os.close(fd)


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("test")
    os.write(fd, data)
    return fd


def test_malformed_large_messages_are_dropped_and_close_their_fds(ends: tuple[Channel, Channel]) -> None:
    a, b = ends
    lowest_free = os.dup(0)
    os.close(lowest_free)
    r, w = os.pipe()
    cases = [
        ({"t": "large", "n": 10}, []),  # no memfd
        ({"t": "large", "n": 10}, [_memfd(b"12345")]),  # not that size
        ({"t": "large", "n": 4}, [os.dup(r)]),  # a pipe, not a file
        ({"t": "large", "n": 5}, [os.dup(w), _memfd(b"[1,2]")]),  # not an object (and its own fd)
        ({"t": "large", "n": 2**40}, [_memfd(b"{}")]),  # over the bound
        ({"t": "large", "n": "5"}, [_memfd(b"{}")]),
    ]
    inner = encode({"t": "large", "n": 2})
    cases.append(({"t": "large", "n": len(inner)}, [_memfd(inner)]))  # one inside another
    for msg, fds in cases:
        _envelope(a, msg, fds)
    a.send({"t": "ok"})
    os.close(r)
    os.close(w)
    got = receive_all(b)
    assert [type(m) for m, _ in got[:-1]] == [ChannelError] * len(cases), got
    assert all(fds == [] for _, fds in got[:-1])
    assert got[-1] == ({"t": "ok"}, [])
    probe = os.dup(0)
    os.close(probe)
    assert probe <= lowest_free, "a received fd was left open"


def test_peer_closing_is_eof(ends: tuple[Channel, Channel]) -> None:
    a, b = ends
    a.send({"t": "last"})
    a.close()
    got = []
    with pytest.raises(EOFError):
        for item in b.receive():
            got.append(item)
    assert got == [({"t": "last"}, [])], "messages sent before the close still arrive"


def test_sending_to_a_closed_peer_or_on_a_closed_channel(ends: tuple[Channel, Channel]) -> None:
    a, b = ends
    b.close()
    with pytest.raises(BrokenPipeError):
        a.send({"t": "x"})
    a.close()
    with pytest.raises(BrokenPipeError, match="closed"):
        a.send({"t": "x"})


def test_fds_of_a_send_that_fails_are_closed(ends: tuple[Channel, Channel]) -> None:
    a, b = ends
    r, w = os.pipe()
    with pytest.raises(TypeError):
        a.send({"t": "x", "obj": object()}, [r])  # cannot be encoded
    assert not is_open(r)
    b.close()
    with pytest.raises(BrokenPipeError):
        a.send({"t": "x"}, [w])  # the peer is gone
    assert not is_open(w)
    a.close()
    r, w = os.pipe()
    with pytest.raises(BrokenPipeError):
        a.send({"t": "x"}, [r, w])  # closed already
    assert not is_open(r) and not is_open(w)


def fill(ch: Channel) -> int:
    """Send until the kernel buffer is full (the last message is queued); returns how many."""
    n = 0
    while ch.send({"t": "fill", "i": n, "blob": "x" * 4000}):
        n += 1
        assert n < 100_000, "the socket buffer never filled"
    return n + 1


def closed_pipe_end() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def test_full_buffer_queues_then_flushes_in_order(ends: tuple[Channel, Channel]) -> None:
    a, b = ends
    n = fill(a)
    r = closed_pipe_end()
    assert a.send({"t": "fill", "i": n}, [r]) is False, "queued behind the first queued message"
    assert a.pending == 2
    assert is_open(r), "a queued message keeps its fds open until it is sent"
    received: list[object] = []
    fds: list[int] = []
    for _ in range(1000):
        for msg, got in b.receive():
            received.append(msg)
            fds.extend(got)
        if a.flush():
            break
    for msg, got in b.receive():
        received.append(msg)
        fds.extend(got)
    assert a.pending == 0
    assert [m["i"] for m in received if isinstance(m, dict)] == list(range(n + 1))
    assert len(fds) == 1
    assert not is_open(r) or r == fds[0], "sent: the sender's copy is closed"
    os.close(fds[0])


def test_take_pending_fds_hands_them_back(ends: tuple[Channel, Channel]) -> None:
    a, _ = ends
    fill(a)
    r = closed_pipe_end()
    a.send({"t": "fd"}, [r])
    assert a.take_pending_fds() == [r]
    assert a.pending == 0
    assert is_open(r), "the caller owns them now"
    os.close(r)


def test_close_releases_queued_fds(ends: tuple[Channel, Channel]) -> None:
    a, _ = ends
    fill(a)
    r = closed_pipe_end()
    a.send({"t": "fd"}, [r])
    a.close()
    assert not is_open(r), "closing the channel closes the fds it still held"


@contextlib.contextmanager
def fd_limit_reached() -> Iterator[None]:
    """No new fd can be opened in this process until the block ends."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.dup(0)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_fds_truncated_at_the_fd_limit_are_reported(ends: tuple[Channel, Channel]) -> None:
    a, b = ends
    r, w = os.pipe()
    os.close(w)
    a.send({"t": "conn"}, [r])
    with fd_limit_reached():
        items = receive_all(b)
    [(err, fds)] = items
    assert isinstance(err, ChannelError) and "truncated" in str(err)
    assert fds == []
