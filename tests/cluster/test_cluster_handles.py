"""Handles sent with messages (Node's ``sendHandle``), with real processes: ``cluster/handles.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from .test_cluster_api import run_program

# test-cluster-send-socket-to-worker-http-server.js: the primary accepts a connection on a
# server of its own and sends the socket to a worker, whose HTTP server answers on it.
# test-cluster-net-send.js: a worker sends a socket to the primary, which writes on it.
BOTH_WAYS = """
import socket
from http.server import BaseHTTPRequestHandler

class Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"worker {os.getpid()} answers {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

if cluster.is_primary:
    async def main():
        loop = asyncio.get_running_loop()
        w = cluster.fork()
        ready, from_worker = loop.create_future(), loop.create_future()
        w.on("message", lambda data, handle=None: (from_worker if handle else ready).set_result((data, handle)))
        await asyncio.wait_for(ready, 20)  # its callback is registered: a message before it would queue
        # a server of the primary's own: its connection goes to the worker
        server = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        out("sent", w.send("serve this", conn), conn.fileno())  # -1: closed here once sent
        client.sendall(b"GET /hi HTTP/1.0\\r\\n\\r\\n")
        response = await loop.run_in_executor(None, lambda: client.makefile("rb").read())
        out("response", response.decode().split("\\r\\n")[0], response.decode().split("\\r\\n")[-1])
        client.close()
        data, handle = await asyncio.wait_for(from_worker, 20)
        handle.sendall(b"written by the primary\\n")
        out("from worker", data, type(handle).__name__, handle.family.name, handle.type.name)
        handle.close()
        await cluster.wait()
        server.close()
    cluster.run(main)
else:
    def serve(data, handle):
        Hello(handle, handle.getpeername(), None)
        handle.close()
        # and the other way: a connection of the worker's own, sent to the primary
        server = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        cluster.send({"from": cluster.worker.id}, conn)
        out("worker closed its copy", conn.fileno() == -1)
        out("worker read", client.makefile().readline().strip())
        cluster.worker.disconnect()
    cluster.on_message(serve)
    cluster.send("ready")
    cluster.wait_disconnect(20)
"""


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_sockets_go_both_ways_with_messages(tmp_path: Path, start_method: str) -> None:
    done = run_program(tmp_path, BOTH_WAYS, start_method=start_method)
    assert done.rc == 0, done
    assert done.one("sent") == ["sent", True, -1]
    status, body = done.one("response")[1:]
    assert status == "HTTP/1.0 200 OK" and body.endswith("answers /hi")
    assert done.one("from worker") == ["from worker", {"from": 1}, "socket", "AF_INET", "SOCK_STREAM"]
    assert done.one("worker closed its copy") == ["worker closed its copy", True]
    assert done.one("worker read") == ["worker read", "written by the primary"]


def test_send_handle_twice_and_keep_open(tmp_path: Path) -> None:
    # test-cluster-send-handle-twice.js: a worker sends the connection it got twice. Node
    # sends the second message without the (closed) handle; here it is a clear error.
    done = run_program(
        tmp_path,
        """
        import socket
        if cluster.is_primary:
            got = []
            cluster.on("message", lambda w, data, handle: (got.append([data, handle is not None]),
                                                           handle and handle.close()))
            cluster.on("exit", lambda w, code, sig: out("exit", code, sig, got))
            cluster.fork()
            cluster.run()
        else:
            server = socket.create_server(("127.0.0.1", 0))
            client = socket.create_connection(server.getsockname())
            conn, _ = server.accept()
            cluster.send("send-handle-1", conn)
            try:
                cluster.send("send-handle-2", conn)
            except ValueError as exc:
                out("second", str(exc))
            client.close()
            client = socket.create_connection(server.getsockname())
            conn, _ = server.accept()
            cluster.send("kept-1", conn, keep_open=True)
            cluster.send("kept-2", conn, keep_open=True)
            out("still open", conn.fileno() >= 0)
            cluster.send("listening", server)  # a listening socket stays open in the sender
            out("server open", server.fileno() >= 0)
            try:
                cluster.send("not a socket", open(__file__))
            except TypeError as exc:
                out("type", str(exc))
        """,
    )
    assert done.rc == 0, done
    assert done.one("second") == ["second", "the handle is closed: nothing to send"]
    assert done.one("still open") == ["still open", True]
    assert done.one("server open") == ["server open", True]
    assert "a handle is a socket.socket" in done.one("type")[1]
    assert done.one("exit")[1:] == [
        0,
        None,
        [["send-handle-1", True], ["kept-1", True], ["kept-2", True], ["listening", True]],
    ]


def test_a_listening_socket_sent_to_a_worker_serves_there(tmp_path: Path) -> None:
    # Node's docs (subprocess.send(message, server)): the server is shared with the child.
    done = run_program(
        tmp_path,
        """
        import socket
        if cluster.is_primary:
            async def main():
                loop = asyncio.get_running_loop()
                w = cluster.fork()
                server = socket.create_server(("127.0.0.1", 0))
                w.send("here is a server", server)
                out("primary keeps it", server.fileno() >= 0)
                reader, writer = await asyncio.open_connection(*server.getsockname())
                out("answer", (await reader.readline()).decode().strip() == f"worker {w.pid}")
                writer.close()
                server.close()
                w.disconnect()
            cluster.run(main)
        else:
            data, server = cluster.get_message(20, with_handle=True)
            conn, _ = server.accept()
            conn.sendall(f"worker {os.getpid()}\\n".encode())
            conn.close()
            server.close()
            cluster.wait_disconnect(20)
        """,
    )
    assert done.rc == 0, done
    assert done.one("primary keeps it") == ["primary keeps it", True]
    assert done.one("answer") == ["answer", True]


# 10,000 handles: 7,500 to the worker (closed by recv() without with_handle, taken with
# with_handle, closed because the on_message callback does not take them), 2,500 back to
# the primary (its listener does not take them); then one to a disconnected worker.
# Every fd count is the same before and after.
LEAK_PROGRAM = """
import socket

def fds():
    return len(os.listdir("/proc/self/fd"))

CHUNK = 250

if cluster.is_primary:
    async def main():
        loop = asyncio.get_running_loop()
        w = cluster.fork()
        acks = asyncio.Queue()
        handles = []
        # no handle parameter: what comes with a message is closed for it
        def on_message(data):
            if isinstance(data, dict) and "h" in data:
                handles.append(1)
            else:
                acks.put_nowait(data)
        w.on("message", on_message)
        assert await acks.get() == "start"
        before = fds()
        for chunk in range(7500 // CHUNK):
            for i in range(CHUNK):
                w.send(i, socket.socket())  # closed here once sent
            assert await asyncio.wait_for(acks.get(), 20) == chunk
        out("worker", await asyncio.wait_for(acks.get(), 30), len(handles))
        out("primary", before, fds())
        gone = loop.create_future()
        w.on("disconnect", lambda: gone.set_result(None))
        w.disconnect()
        await gone
        s = socket.socket()
        out("to a disconnected worker", w.send("late", s), s.fileno() >= 0)
        s.close()
        await cluster.wait()
        out("primary at the end", before, fds())
    cluster.run(main)
else:
    before = fds()
    cluster.send("start")
    got = []
    for chunk in range(20):
        for i in range(CHUNK):
            if chunk < 10:
                cluster.get_message(20)  # the handle is closed for us
            else:
                data, handle = cluster.get_message(20, with_handle=True)
                handle.close()
        if chunk == 19:  # every message so far is read: from now on, a callback
            cluster.on_message(got.append)  # that takes no handle: closed for it
        cluster.send(chunk)
    for chunk in range(20, 30):
        while len(got) < (chunk - 19) * CHUNK:
            time.sleep(0.001)
        cluster.send(chunk)
    for i in range(2500):
        cluster.send({"h": i}, socket.socket())
    cluster.send({"before": before, "after": fds(), "got": len(got)})
    cluster.wait_disconnect(30)
"""


@pytest.mark.timeout(120)
def test_ten_thousand_handles_leak_no_fd(tmp_path: Path) -> None:
    # a socket left to the garbage collector is closed too, but says so: no such warning either
    done = run_program(tmp_path, LEAK_PROGRAM, timeout=90, PYTHONWARNINGS="always::ResourceWarning")
    assert done.rc == 0, done
    assert "ResourceWarning" not in done.err, done.err[-2000:]
    worker, from_worker = done.one("worker")[1:]
    assert from_worker == 2500
    assert worker["after"] == worker["before"], worker
    assert worker["got"] == 2500
    before, after = done.one("primary")[1:]
    assert after == before
    assert done.one("to a disconnected worker") == ["to a disconnected worker", False, True]
    assert done.one("primary at the end")[1] >= done.one("primary at the end")[2]
