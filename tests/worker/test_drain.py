"""Draining a worker, seen from real clients (one worker, rolled by SIGHUP).

With one worker, a SIGHUP starts a replacement, waits until it is ready, then
drains the old worker: every connection the test opened before is on the old
worker, and its log line ``worker draining: ...`` says when the drain began.
"""

from __future__ import annotations

import http.client
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from tests.conftest import Server, asgi_app, read_response, response_headers, wait_until

DRAIN_APP = asgi_app(
    """
    import asyncio, os, sys

    PID = str(os.getpid()).encode()
    """,
    """
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                print(f"websocket closed with {message.get('code')}", flush=True)
                return
            await send({"type": "websocket.send", "text": message.get("text") or ""})
    path = scope["path"]
    if path == "/slow":
        print("slow request started", flush=True)
        await asyncio.sleep(2)
    if path == "/late-body":  # the head goes out at once, the body 1.5 s later
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(PID)).encode())]})
        print("head sent", flush=True)
        await asyncio.sleep(1.5)
        await send({"type": "http.response.body", "body": PID})
        return
    if path == "/stream":
        print("stream started", flush=True)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        while True:
            await send({"type": "http.response.body", "body": b"tick\\n", "more_body": True})
            await asyncio.sleep(0.05)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(PID)).encode())]})
    await send({"type": "http.response.body", "body": PID})
    """,
)


@pytest.fixture
def server(
    request: pytest.FixtureRequest, start_server: Callable[..., Server], write_app: Callable[[str, str], Path]
) -> Server:
    """One worker; ``--http`` is httptools unless a test parametrizes it (indirect)."""
    http = getattr(request, "param", "httptools")
    write_app("drainapp", DRAIN_APP)
    args = ("--workers", "1", "--no-access-log", "--graceful-timeout", "4", "--http", http)
    return start_server("drainapp:app", *args).wait_ready()


both_parsers = pytest.mark.parametrize("server", ["httptools", "h11"], indirect=True)


def _roll_and_wait_for_drain(server: Server) -> None:
    server.signal(signal.SIGHUP)
    server.wait_log("worker draining:")


def _request(sock: socket.socket, path: str = "/") -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    return read_response(sock)


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


@both_parsers
def test_keep_alive_connection_gets_connection_close_on_its_next_response(server: Server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", "/")
    first = conn.getresponse()
    old_pid = first.read().decode()
    assert first.getheader("connection") is None  # keep-alive before the drain
    _roll_and_wait_for_drain(server)
    conn.request("GET", "/")  # the connection was idle when the drain began
    second = conn.getresponse()
    assert second.status == 200
    assert second.read().decode() == old_pid  # answered by the draining worker
    assert second.getheader("connection") == "close"
    conn.close()
    assert server.get().text != old_pid  # a new connection goes to the new worker


@both_parsers
def test_connection_accepted_but_not_yet_read_is_answered(server: Server) -> None:
    old_pid = server.get().text
    sock = socket.create_connection(("127.0.0.1", server.port))
    try:
        server.wait_accepted(sock)
        _roll_and_wait_for_drain(server)
        # it was accepted by the old worker before its drain began
        assert "worker draining: 1 connection(s)" in server.log()
        response = _request(sock)
        assert response.startswith(b"HTTP/1.1 200 ")
        assert response.endswith(old_pid.encode())
        assert response_headers(response)["connection"] == "close"
        assert _closed_by_peer(sock)
    finally:
        sock.close()


def test_idle_connection_is_closed_after_the_window(server: Server) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port))
    try:
        server.wait_accepted(sock)
        _roll_and_wait_for_drain(server)
        began = time.monotonic()
        assert _closed_by_peer(sock)
        assert 0.5 < time.monotonic() - began < 3.0  # the 1 s window, not the 4 s graceful timeout
    finally:
        sock.close()


@both_parsers
def test_request_in_flight_finishes(server: Server) -> None:
    result: dict[str, Any] = {}

    def slow() -> None:
        try:
            result["response"] = httpx.get(server.url + "/slow", timeout=10)
        except Exception as exc:
            result["error"] = exc

    old_pid = server.get().text
    t = threading.Thread(target=slow)
    t.start()
    server.wait_log("slow request started")
    _roll_and_wait_for_drain(server)
    assert "1 with a request in flight" in server.log()
    t.join(10)
    assert "error" not in result, result
    response = result["response"]
    assert response.status_code == 200 and response.text == old_pid
    assert response.headers["connection"] == "close"


@both_parsers
def test_keep_alive_connection_whose_response_had_started_serves_its_next_request(server: Server) -> None:
    """The drain begins after the response's head went out (no ``Connection: close``
    on it): the client then sends its next request on the connection as soon as the
    body is in, as any keep-alive client does (wrk, a proxy's pool). It must be
    answered, not met by a close that crossed it on the wire (issue 13, finding 5)."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    try:
        sock.sendall(b"GET /late-body HTTP/1.1\r\nHost: test\r\n\r\n")
        server.wait_log("head sent")
        _roll_and_wait_for_drain(server)
        assert "1 with a request in flight" in server.log()
        first = read_response(sock)
        assert first.startswith(b"HTTP/1.1 200 ") and "connection" not in response_headers(first)
        old_pid = first.rpartition(b"\r\n\r\n")[2]
        second = _request(sock)  # at once, on the same connection
        assert second.startswith(b"HTTP/1.1 200 ")
        assert second.endswith(old_pid)  # still the draining worker
        assert response_headers(second)["connection"] == "close"
        assert _closed_by_peer(sock)
    finally:
        sock.close()


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_connection_whose_response_had_started_is_closed_one_window_after_it(
    http: str, start_server: Callable[..., Server], write_app: Callable[[str, str], Path]
) -> None:
    """The same, but the client sends nothing more: once the response is complete the
    connection gets the drain window (1 s), not uvicorn's keep-alive timeout (30 s
    here) nor the graceful timeout (20 s here)."""
    write_app("drainapp", DRAIN_APP)
    args = (
        "--workers",
        "1",
        "--no-access-log",
        "--http",
        http,
        "--graceful-timeout",
        "20",
        "--timeout-keep-alive",
        "30",
    )
    server = start_server("drainapp:app", *args).wait_ready()
    sock = socket.create_connection(("127.0.0.1", server.port))
    try:
        sock.sendall(b"GET /late-body HTTP/1.1\r\nHost: test\r\n\r\n")
        server.wait_log("head sent")
        _roll_and_wait_for_drain(server)
        assert read_response(sock).startswith(b"HTTP/1.1 200 ")
        complete = time.monotonic()
        assert _closed_by_peer(sock)
        assert 0.5 < time.monotonic() - complete < 3.0
    finally:
        sock.close()


def test_websocket_gets_1012_on_drain(server: Server) -> None:
    with ws_connect(f"ws://127.0.0.1:{server.port}/ws", open_timeout=5) as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
        _roll_and_wait_for_drain(server)
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1012
    server.wait_log("websocket closed with 1012")


def test_websocket_opened_on_a_connection_accepted_before_the_drain_gets_1012(server: Server) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port))
    server.wait_accepted(sock)
    _roll_and_wait_for_drain(server)
    with (
        ws_connect(f"ws://127.0.0.1:{server.port}/ws", sock=sock, open_timeout=5) as ws,
        pytest.raises(ConnectionClosed) as info,
    ):
        ws.recv(timeout=5)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1012


def test_stream_is_cut_at_the_graceful_timeout(server: Server) -> None:
    old = server.worker_pids()
    ticks = 0
    with httpx.stream("GET", server.url + "/stream", timeout=10) as response:
        assert response.status_code == 200
        began = None
        with pytest.raises(httpx.RemoteProtocolError):  # an incomplete chunked body
            for _ in response.iter_lines():
                ticks += 1
                if ticks == 5:
                    _roll_and_wait_for_drain(server)
                    began = time.monotonic()
        assert began is not None
        cut_after = time.monotonic() - began
    # uvicorn cancels the response at --graceful-timeout minus 1 s (kept for lifespan
    # shutdown), and the primary's SIGKILL would come at 4 s
    assert 2.0 < cut_after < 5.0, cut_after
    wait_until(lambda: set(server.worker_pids()).isdisjoint(old), 5, what="the old worker gone")
    assert "did not stop in time" not in server.log()
