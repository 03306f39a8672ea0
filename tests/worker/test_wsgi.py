"""WSGI apps served through a2wsgi, by real workers, over real sockets.

Streaming both ways is checked by behaviour, not by reading the code: the
first chunk of a response must reach the client before the app has produced
the rest, and the app must see the start of an upload before the client has
sent the rest; a 64 MiB upload and download must not grow a worker's peak RSS
by anything near their size.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..conftest import wait_until

STREAMING_APP = """
import json, os, threading, time
from pathlib import Path

HERE = Path(__file__).parent
CHUNK = 64 * 1024
lock = threading.Lock()
busy = 0
most_busy = 0


def app(environ, start_response):
    global busy, most_busy
    path = environ["PATH_INFO"]
    if path == "/pid":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getpid()).encode()]
    if path == "/stream":
        # First chunk, then wait (bounded) until the client says it has it.
        def gen():
            yield b"first\\n"
            deadline = time.monotonic() + 10
            while not (HERE / "client-got-first").exists():
                if time.monotonic() > deadline:
                    yield b"timed out\\n"
                    return
                time.sleep(0.01)
            for i in range(100):
                yield b"chunk %d\\n" % i
        start_response("200 OK", [("Content-Type", "text/plain")])
        return gen()
    if path == "/big":
        n = int(environ["QUERY_STRING"] or "16")
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(n * CHUNK))])
        return (b"x" * CHUNK for _ in range(n))
    if path == "/upload":
        body = environ["wsgi.input"]
        first = body.read(CHUNK)
        (HERE / "app-got-first").write_text(str(len(first)))
        total, reads = len(first), 1
        while chunk := body.read(CHUNK):
            total += len(chunk)
            reads += 1
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps({"bytes": total, "reads": reads, "pid": os.getpid()}).encode()]
    if path == "/slow":
        with lock:
            busy += 1
            most_busy = max(most_busy, busy)
        time.sleep(0.3)
        with lock:
            busy -= 1
            seen = most_busy
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(seen).encode()]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found"]
"""


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.fixture
def wsgi_server(start_server: Any, write_app: Any) -> Any:
    write_app("wsgiapp", STREAMING_APP)

    def start(*args: str) -> Any:
        return start_server("wsgiapp:app", *args).wait_ready()

    return start


def test_streamed_response_arrives_before_the_app_finishes(wsgi_server: Any, tmp_path: Path) -> None:
    server = wsgi_server("--workers", "1")
    with httpx.stream("GET", server.url + "/stream", timeout=15) as response:
        lines = response.iter_lines()
        assert next(lines) == "first"
        # The app is now blocked until we say we have the first chunk: if the
        # server buffered the response whole, we would never have got here.
        (tmp_path / "client-got-first").touch()
        rest = list(lines)
    assert rest == [f"chunk {i}" for i in range(100)]


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_upload_is_read_incrementally(wsgi_server: Any, tmp_path: Path, http: str) -> None:
    server = wsgi_server("--workers", "1", "--http", http)
    size = 4 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % size
        )
        sock.sendall(b"a" * 100_000)
        # The app reads the first 64 KiB while most of the body is still to come.
        wait_until(lambda: (tmp_path / "app-got-first").exists(), 10, what="the app to see the first chunk")
        assert (tmp_path / "app-got-first").read_text() == str(64 * 1024)
        sent = 100_000
        while sent < size:
            n = min(256 * 1024, size - sent)
            sock.sendall(b"a" * n)
            sent += n
        response = b""
        while b"}" not in response:
            data = sock.recv(65536)
            assert data, response
            response += data
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b'"bytes": %d' % size in body


def test_large_upload_and_download_keep_worker_memory_bounded(wsgi_server: Any) -> None:
    server = wsgi_server("--workers", "1")
    pid = int(server.get("/pid").text)
    before = _peak_rss_kib(pid)
    size = 64 * 1024 * 1024
    chunk = b"u" * (256 * 1024)

    def body() -> Any:
        for _ in range(size // len(chunk)):
            yield chunk

    response = httpx.post(server.url + "/upload", content=body(), timeout=60)
    assert response.json()["bytes"] == size
    digest, got = hashlib.sha256(), 0
    with httpx.stream("GET", server.url + f"/big?{size // (64 * 1024)}", timeout=60) as download:
        for part in download.iter_bytes():
            digest.update(part)
            got += len(part)
    assert got == size
    grown_mib = (_peak_rss_kib(pid) - before) / 1024
    # 64 MiB each way; a buffered body would grow the peak by at least that.
    assert grown_mib < 24, f"worker peak RSS grew {grown_mib:.1f} MiB"


def test_wsgi_threads_bound_concurrency(wsgi_server: Any) -> None:
    server = wsgi_server("--workers", "1", "--wsgi-threads", "2")
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        started = time.monotonic()
        seen = list(pool.map(lambda _: int(server.get("/slow", timeout=20).text), range(6)))
        took = time.monotonic() - started
    assert max(seen) == 2  # never more than 2 at once, and 2 did run at once
    assert took >= 0.85  # 6 requests of 0.3 s, 2 at a time: 3 rounds


def test_explicit_interface_wsgi(start_server: Any, write_app: Any) -> None:
    # *args hides the WSGI signature: auto would guess ASGI 2; --interface wsgi says what it is.
    write_app(
        "starapp",
        """
        def app(*args):
            environ, start_response = args
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [environ["REQUEST_METHOD"].encode()]
        """,
    )
    server = start_server("starapp:app", "--interface", "wsgi").wait_ready()
    assert server.get("/").text == "GET"


def test_flask_example(start_server: Any) -> None:
    """The Flask example: JSON, a form POST, a streamed download, with 2 workers."""
    pytest.importorskip("flask")
    server = start_server("examples.flask_app.app:app", "--workers", "2").wait_ready()
    workers = server.worker_pids()
    assert len(workers) == 2
    data = server.get("/").json()
    assert data["message"].startswith("Hello") and data["pid"] in workers
    assert "<form" in server.get("/form").text
    posted = httpx.post(server.url + "/form", data={"name": "Ada", "message": "hi"}, timeout=10)
    assert posted.status_code == 200
    assert posted.json()["greeting"] == "Hello, Ada!" and posted.json()["message"] == "hi"
    assert httpx.post(server.url + "/form", data={"name": ""}, timeout=10).status_code == 400
    with httpx.stream("GET", server.url + "/download?chunks=50&delay=0.01", timeout=10) as download:
        assert download.headers["content-disposition"] == "attachment; filename=data.bin"
        parts = list(download.iter_bytes())
    blob = b"".join(parts)
    assert len(blob) == 50 * 64 * 1024 and blob.startswith(b"00000000.") and b"00000049." in blob
    body = bytes(range(256)) * 4096
    uploaded = httpx.post(server.url + "/upload", content=body, timeout=10).json()
    assert uploaded["bytes"] == len(body) and uploaded["sha256"] == hashlib.sha256(body).hexdigest()
    assert uploaded["reads"] > 1
    # both workers answer, over new connections (bounded)
    pids = set()
    for _ in range(40):
        pids.add(httpx.get(server.url + "/pid", timeout=10).json()["pid"])
        if pids == set(workers):
            break
    assert pids == set(workers)


@pytest.mark.parametrize("attr", ["application", "asgi_application"])
def test_django_example(start_server: Any, attr: str) -> None:
    """The same Django project as WSGI (through a2wsgi) and as ASGI, told apart by signature."""
    pytest.importorskip("django")
    server = start_server(f"examples.django_app.app:{attr}", "--workers", "2").wait_ready()
    workers = server.worker_pids()
    data = server.get("/").json()
    assert data["message"].startswith("Hello from Django") and data["pid"] in workers
    posted = httpx.post(server.url + "/form", data={"name": "Ada"}, timeout=10)
    assert posted.status_code == 200 and posted.json()["greeting"] == "Hello, Ada!"
    assert httpx.post(server.url + "/form", data={}, timeout=10).status_code == 400
    assert server.get("/form").status_code == 405
    arrived = []
    with httpx.stream("GET", server.url + "/stream?count=5", timeout=10) as response:
        lines = []
        for line in response.iter_lines():
            lines.append(line)
            arrived.append(time.monotonic())
    assert [line.split(" from ")[0] for line in lines] == [f"line {i}" for i in range(5)]
    assert arrived[-1] - arrived[0] > 0.2  # 0.1 s apart at the source: streamed, not buffered
