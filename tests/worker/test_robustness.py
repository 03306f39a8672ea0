"""Bad and hostile clients, over raw sockets, against a running cluster.

Each case checks what the client gets (the right status, or a closed
connection), and that the worker is unharmed: the same worker pid keeps
answering other clients and nothing crashed (no worker exit, no traceback).
Parametrized over both HTTP parsers, which fail in different ways.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from typing import Any

import pytest

from ..conftest import Server, asgi_app

ECHO_APP = asgi_app(
    "import os",
    """
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    if scope["path"] == "/big":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        for _ in range(256):
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    body = f"{os.getpid()} {size}".encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    """,
)

HTTP_IMPLS = ["httptools", "h11"]


@pytest.fixture
def serve(start_server: Any, write_app: Any) -> Any:
    write_app("echoapp", ECHO_APP)

    def start(http: str, *args: str) -> tuple[Server, int]:
        server = start_server("echoapp:app", "--workers", "1", "--http", http, *args).wait_ready()
        return server, _pid(server)

    return start


def _pid(server: Server) -> int:
    return int(server.get("/").text.split()[0])


def exchange(server: Server, data: bytes, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send ``data``; read until the server closes or ``timeout``. Returns (bytes read, closed?)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_all(sock, timeout)


def read_all(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    received = b""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return received, False
        except ConnectionResetError:
            return received, True
        if not data:
            return received, True
        received += data
    return received, False


def read_until(sock: socket.socket, end: bytes, timeout: float = 5.0) -> bytes:
    received = b""
    deadline = time.monotonic() + timeout
    while not received.endswith(end) and (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        data = sock.recv(65536)
        if not data:
            break
        received += data
    return received


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0): the abrupt disconnect of a crashed client."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def assert_unharmed(server: Server, pid: int) -> None:
    assert server.proc.poll() is None
    assert _pid(server) == pid, "another worker answers: the first one died"
    assert server.worker_pids() == [pid]
    log = server.log()
    assert "exited" not in log and "Traceback" not in log, log


@pytest.mark.parametrize("http", HTTP_IMPLS)
def test_malformed_request_line(serve: Any, http: str) -> None:
    server, pid = serve(http)
    # (h11 takes any "HTTP/d.d" version and answers as HTTP/1.1; httptools refuses HTTP/9.9: not tested here.)
    for bad in (b"GARBAGE\r\n\r\n", b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n", b"GET / HTTP/1.1 x\r\nHost: x\r\n\r\n"):
        reply, closed = exchange(server, bad)
        assert reply.startswith(b"HTTP/1.1 400 "), (bad, reply)
        assert closed
    assert_unharmed(server, pid)


@pytest.mark.parametrize("http", HTTP_IMPLS)
def test_invalid_header_name(serve: Any, http: str) -> None:
    server, pid = serve(http)
    for bad in (b"Bad Header: v", b"Bad\x01: v", b": no-name"):
        reply, closed = exchange(server, b"GET / HTTP/1.1\r\nHost: x\r\n" + bad + b"\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400 "), (bad, reply)
        assert closed
    assert_unharmed(server, pid)


def test_oversized_headers_h11(serve: Any) -> None:
    """h11's own limit: 400 once an incomplete head passes --h11-max-incomplete-event-size."""
    server, pid = serve("h11", "--h11-max-incomplete-event-size", "4096")
    reply, closed = send_endless_head(server)
    assert reply.startswith(b"HTTP/1.1 400 ") and closed, reply
    # under the limit is fine
    ok = b"GET / HTTP/1.1\r\nHost: x\r\nX-Ok: " + b"a" * 2048 + b"\r\nConnection: close\r\n\r\n"
    reply, _ = exchange(server, ok)
    assert reply.startswith(b"HTTP/1.1 200 "), reply
    assert_unharmed(server, pid)


def send_endless_head(server: Server) -> tuple[bytes, bool]:
    """Header lines, a packet at a time, never ending the head, until the server answers (at most 4 MiB)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        sock.setblocking(False)
        try:
            for _ in range(1000):
                sock.sendall(b"X-Pad: " + b"a" * 4000 + b"\r\n")
                try:
                    if sock.recv(1, socket.MSG_PEEK):
                        break  # the server answered
                except BlockingIOError:
                    time.sleep(0.001)
        except (BrokenPipeError, ConnectionResetError, BlockingIOError):
            pass
        sock.setblocking(True)
        return read_all(sock, 5)


@pytest.mark.parametrize("http", HTTP_IMPLS)
def test_oversized_headers_max_request_head_size(serve: Any, http: str) -> None:
    """httptools keeps every header byte it is sent; --max-request-head-size bounds it (431)."""
    server, pid = serve(http, "--max-request-head-size", "16384", "--h11-max-incomplete-event-size", "1048576")
    reply, closed = send_endless_head(server)
    assert reply.startswith(b"HTTP/1.1 431 "), reply
    assert closed
    reply, _ = exchange(server, b"GET / HTTP/1.1\r\nHost: x\r\nX-Ok: " + b"a" * 4000 + b"\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 "), reply
    assert_unharmed(server, pid)


@pytest.mark.parametrize("http", HTTP_IMPLS)
def test_body_longer_than_content_length(serve: Any, http: str) -> None:
    """The extra bytes are the next request: not HTTP, so 400 and closed.

    h11 answers the first request, then the 400. httptools parses the whole
    read at once and answers only the 400: the stream is broken, the client
    learns it either way.
    """
    server, pid = serve(http)
    reply, closed = exchange(
        server, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloTHIS IS NOT A REQUEST\r\n\r\n"
    )
    first, bad, _ = reply.partition(b"HTTP/1.1 400 ")
    assert bad and closed, reply
    if http == "h11":
        assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(f"{pid} 5".encode()), reply
    # Sent in two reads, both parsers answer the first request before the 400.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        first = read_until(sock, f"{pid} 5".encode())
        sock.sendall(b"THIS IS NOT A REQUEST\r\n\r\n")
        rest, closed = read_all(sock, 5)
    assert first.startswith(b"HTTP/1.1 200 ") and first.endswith(f"{pid} 5".encode()), first
    assert rest.startswith(b"HTTP/1.1 400 ") and closed, rest
    assert_unharmed(server, pid)


@pytest.mark.parametrize("http", HTTP_IMPLS)
def test_slow_headers_are_cut_off(serve: Any, http: str) -> None:
    """A client sending its head a byte at a time is answered 408 and closed after --timeout-request-header.

    Each case takes the timeout (1 s) to play out: the four clients run at once.
    """
    server, pid = serve(http, "--timeout-request-header", "1")
    address = ("127.0.0.1", server.port)
    with contextlib.ExitStack() as stack:
        # A connection that sends nothing (closed too, without an answer).
        silent = stack.enter_context(socket.create_connection(address, timeout=5))
        # A request whose head is on time, and whose body is not (never cut off).
        post = stack.enter_context(socket.create_connection(address, timeout=5))
        post.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nConnection: close\r\n\r\nabc")
        head_sent = time.monotonic()
        # A keep-alive connection: the first request is answered, the slow second one is cut off.
        keep = stack.enter_context(socket.create_connection(address, timeout=5))
        keep.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        first = read_until(keep, f"{pid} 0".encode())
        keep.sendall(b"GET / HT")

        sock = stack.enter_context(socket.create_connection(address, timeout=5))
        head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100 + b"\r\n\r\n"
        started = time.monotonic()
        closed_after = None
        for byte in head:  # 4 bytes a second: the connection is busy, never idle, yet cut off
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed_after = time.monotonic() - started
                break
            sock.settimeout(0.25)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            closed_after = time.monotonic() - started
            assert data.startswith(b"HTTP/1.1 408 "), data
            break
        assert closed_after is not None and 0.9 <= closed_after < 3, closed_after

        reply, closed = read_all(silent, 4)
        assert reply == b"" and closed
        rest, closed = read_all(keep, 4)
        reply = first + rest
        assert reply.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 408 " in reply and closed, reply
        time.sleep(max(0.0, head_sent + 1.3 - time.monotonic()))  # the body goes on past the timeout
        post.sendall(b"def")
        reply, _ = read_all(post, 5)
        assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(f"{pid} 6".encode()), reply
    assert_unharmed(server, pid)


@pytest.mark.parametrize("http", HTTP_IMPLS)
def test_abrupt_disconnects(serve: Any, http: str) -> None:
    server, pid = serve(http)
    for _ in range(5):
        # half a body, then a reset
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"a" * 50000)
        reset(sock)
        # half a head, then a reset
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Half")
        reset(sock)
        # a reset while the response streams (16 MiB)
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        reset(sock)
    assert_unharmed(server, pid)
