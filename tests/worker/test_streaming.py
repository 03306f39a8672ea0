"""WebSockets and server-sent events through cluster-server, plain and over TLS.

The FastAPI example's ``/ws`` echo and ``/stream`` SSE endpoint, served by a
real cluster, for each of uvicorn's websocket implementations and each
``--scheduling`` policy this build has (see ``scheduling_policies``).
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import ssl
import struct
import time
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from ..conftest import Server, TLSFiles, scheduling_args, scheduling_policies

EXAMPLE = "examples.fastapi_app.main:app"
POLICIES = scheduling_policies()
WS_IMPLS = ["websockets", "websockets-sansio", "wsproto"]
# Every websocket implementation under the first policy (the shared socket); each other
# policy with one implementation, in turn: all pairs would cost a cluster start each.
WS_AND_POLICY = [(ws, POLICIES[0]) for ws in WS_IMPLS] + [
    (WS_IMPLS[i % len(WS_IMPLS)], policy) for i, policy in enumerate(POLICIES[1:])
]


def _ws_url(server: Server, tls: bool) -> str:
    return f"{'wss' if tls else 'ws'}://127.0.0.1:{server.port}/ws"


def _base(server: Server, tls: bool) -> str:
    return f"{'https' if tls else 'http'}://127.0.0.1:{server.port}"


def check_echo(server: Server, tls: bool = False, ctx: ssl.SSLContext | None = None) -> None:
    with connect(_ws_url(server, tls), ssl=ctx, open_timeout=10, close_timeout=5) as ws:
        for i in range(20):
            msg = f"hello {i} " + "x" * (i * 1000)  # up to ~19 KiB: several TCP/TLS records
            ws.send(msg)
            assert ws.recv(timeout=10) == msg
        ws.close()
    assert ws.close_code == 1000


def check_sse(server: Server, tls: bool = False, ctx: ssl.SSLContext | None = None) -> None:
    """Events arrive one by one, as they are produced, not all at the end."""
    events: list[dict[str, Any]] = []
    arrived: list[float] = []
    verify: Any = ctx if ctx is not None else True
    with httpx.stream(
        "GET", _base(server, tls) + "/stream?count=4&interval=0.3", timeout=10, verify=verify
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                arrived.append(time.monotonic())
    assert [e["n"] for e in events] == [0, 1, 2, 3]
    # The server sends them 0.3 s apart: buffered whole, they would arrive together.
    assert arrived[-1] - arrived[0] > 0.45, arrived
    assert len({e["pid"] for e in events}) == 1


@pytest.mark.parametrize(("ws", "policy"), WS_AND_POLICY)
def test_websocket_echo_and_sse(start_server: Any, policy: str, ws: str) -> None:
    server = start_server(EXAMPLE, "--workers", "2", "--ws", ws, *scheduling_args(policy)).wait_ready()
    check_echo(server)
    check_sse(server)
    # Several websockets open at once, each echoing its own messages.
    with contextlib.ExitStack() as stack:
        conns = [stack.enter_context(connect(_ws_url(server, False), open_timeout=10)) for _ in range(4)]
        for i, conn in enumerate(conns):
            conn.send(f"conn {i}")
        assert [c.recv(timeout=10) for c in conns] == [f"conn {i}" for i in range(4)]
    assert server.proc.poll() is None


@pytest.mark.parametrize("policy", POLICIES)
def test_tls_https_wss_and_sse(start_server: Any, tls_files: TLSFiles, policy: str) -> None:
    server = start_server(EXAMPLE, "--workers", "2", *tls_files.server_args(), *scheduling_args(policy))
    server.wait_ready()
    ctx = tls_files.client_context()
    response = httpx.get(_base(server, True) + "/pid", verify=ctx, timeout=10)
    assert response.status_code == 200 and response.json()["pid"] in server.worker_pids()
    check_echo(server, tls=True, ctx=ctx)
    check_sse(server, tls=True, ctx=ctx)
    # Plain HTTP to a TLS port is refused, and the worker keeps serving.
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.url + "/pid", timeout=5)
    assert httpx.get(_base(server, True) + "/pid", verify=ctx, timeout=10).status_code == 200


def test_websocket_abrupt_disconnect_keeps_worker(start_server: Any) -> None:
    """Clients that vanish mid-frame (TCP reset, no close frame) cost the worker nothing."""
    server = start_server(EXAMPLE, "--workers", "1").wait_ready()
    pid = server.get("/pid").json()["pid"]
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(
                b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            assert sock.recv(4096).startswith(b"HTTP/1.1 101 ")
            sock.sendall(b"\x81\xfe\x01\x00" + b"mask" + b"x" * 100)  # a masked 256-byte frame, cut short
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
    check_echo(server)
    assert server.get("/pid").json()["pid"] == pid
    assert "Traceback" not in server.log()


@pytest.mark.parametrize(("ws", "policy"), WS_AND_POLICY)
def test_websocket_closed_with_1012_on_rolling_restart(start_server: Any, policy: str, ws: str) -> None:
    """A drained worker closes its websockets with 1012 (service restart): clients know to reconnect."""
    server = start_server(
        EXAMPLE, "--workers", "1", "--graceful-timeout", "5", "--ws", ws, *scheduling_args(policy)
    ).wait_ready()
    with connect(_ws_url(server, False), open_timeout=10) as ws:
        ws.send("before")
        assert ws.recv(timeout=10) == "before"
        server.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        with pytest.raises(ConnectionClosed):
            while time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    ws.recv(timeout=0.2)
    assert ws.close_code == 1012
    server.wait_log("rolling restart to generation 2 done")  # the replacement serves websockets again
    check_echo(server)


@pytest.mark.parametrize(("http", "loop"), [("httptools", "uvloop"), ("h11", "asyncio")])
def test_websocket_and_sse_outlive_the_request_header_timeout(
    start_server: Any, tls_files: TLSFiles, http: str, loop: str
) -> None:
    """The request-head timer stops at the end of the head: upgraded and streaming connections live on."""
    server = start_server(
        EXAMPLE, "--http", http, "--loop", loop, "--timeout-request-header", "0.5", *tls_files.server_args()
    ).wait_ready()
    ctx = tls_files.client_context()
    with connect(_ws_url(server, True), ssl=ctx, open_timeout=10) as ws:
        # The stream takes 1.5 s, 3x the timeout; the websocket is idle meanwhile.
        with httpx.stream(
            "GET", _base(server, True) + "/stream?count=3&interval=0.5", timeout=10, verify=ctx
        ) as response:
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
        ws.send("still here")
        assert ws.recv(timeout=10) == "still here"
    assert len(events) == 3
