"""Node's own cluster tests (``test/parallel/test-cluster-*.js``), ported: each test names its source.

What they check is Node's behaviour; where Python's differs on purpose, the
comment says so. Real processes throughout (``run_program``, ``test_cluster_api.py``).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from .test_cluster_api import run_program

# One worker per Node test; ROLE says which. Each records what Node's test records,
# by the same names: the events counted, the codes, the state at 'disconnect'...
LIFE = """
import http.server

class Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

if cluster.is_primary:
    results = {}
    def watch(w, role):
        r = results[role] = {"cluster_emitDisconnect": 0, "cluster_emitExit": 0, "worker_emitDisconnect": 0,
                             "worker_emitExit": 0}
        def on_disconnect():
            r["worker_emitDisconnect"] += 1
            r["worker_state"] = w.state
            r["connected_at_disconnect"] = w.is_connected()
        def on_exit(code, sig):
            r["worker_emitExit"] += 1
            r.update(worker_exitedAfter=w.exited_after_disconnect, worker_died=not alive(w.pid),
                     worker_exitCode=w.exit_code, worker_signalCode=w.signal_code and w.signal_code.name,
                     worker_state_at_exit=w.state, dead=w.is_dead())
        w.on("disconnect", on_disconnect)
        w.on("exit", on_exit)
        w.on("listening", lambda addr: act[role](w))
    def alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    def cluster_event(name):
        def record(w, *args):
            r = results[w.role]
            r[f"cluster_emit{name}"] += 1
            if name == "Exit":
                r.update(cluster_exitCode=args[0], cluster_signalCode=args[1] and args[1].name)
        return record
    cluster.on("disconnect", cluster_event("Disconnect"))
    cluster.on("exit", cluster_event("Exit"))
    act = {
        "exit": lambda w: None,  # it exits by itself once it listens
        "kill": lambda w: os.kill(w.pid, signal.SIGKILL),  # the process killed, not worker.kill()
        "disconnect": lambda w: w.disconnect(),
        "worker.kill": lambda w: w.kill(),
    }
    async def main():
        for role in act:
            w = cluster.fork(env={"ROLE": role})
            w.role = role
            watch(w, role)
        await cluster.wait()
        out("results", results)
    cluster.run(main)
else:
    server = cluster.HTTPServer(("127.0.0.1", 0), Quiet)
    if os.environ["ROLE"] == "exit":
        sys.exit(42)
    server.serve_forever()
"""


@pytest.mark.parametrize("policy", ["rr", "none"])
def test_exit_kill_and_disconnect_as_node_reports_them(tmp_path: Path, policy: str) -> None:
    done = run_program(tmp_path, LIFE, CLUSTER_SERVER_SCHED_POLICY=policy)
    assert done.rc == 0, done
    results = done.one("results")[1]
    once = {"cluster_emitDisconnect": 1, "cluster_emitExit": 1, "worker_emitDisconnect": 1, "worker_emitExit": 1}
    gone = {"worker_state": "disconnected", "connected_at_disconnect": False, "worker_died": True}
    gone |= {"worker_state_at_exit": "dead", "dead": True}
    # test-cluster-worker-exit.js: process.exit(42) once listening
    assert results["exit"] == {
        **once, **gone, "worker_exitedAfter": False, "worker_exitCode": 42, "worker_signalCode": None,
        "cluster_exitCode": 42, "cluster_signalCode": None,
    }  # fmt: skip
    # test-cluster-worker-kill.js: worker.process.kill('SIGKILL')
    assert results["kill"] == {
        **once, **gone, "worker_exitedAfter": False, "worker_exitCode": None, "worker_signalCode": "SIGKILL",
        "cluster_exitCode": None, "cluster_signalCode": "SIGKILL",
    }  # fmt: skip
    # test-cluster-worker-disconnect.js: its server closes, it exits 0
    assert results["disconnect"] == {
        **once, **gone, "worker_exitedAfter": True, "worker_exitCode": 0, "worker_signalCode": None,
        "cluster_exitCode": 0, "cluster_signalCode": None,
    }  # fmt: skip
    # test-cluster-worker-forced-exit.js: worker.kill() (SIGTERM); exitedAfterDisconnect is true
    assert results["worker.kill"] == {
        **once, **gone, "worker_exitedAfter": True, "worker_exitCode": None, "worker_signalCode": "SIGTERM",
        "cluster_exitCode": None, "cluster_signalCode": "SIGTERM",
    }  # fmt: skip


def test_is_dead_and_is_connected_at_each_step(tmp_path: Path) -> None:
    # test-cluster-worker-isdead.js and test-cluster-worker-isconnected.js
    done = run_program(
        tmp_path,
        """
        if cluster.is_primary:
            w = cluster.fork()
            out("forked", w.is_dead(), w.is_connected())
            w.on("online", lambda: out("online", w.is_dead(), w.is_connected()))
            w.on("message", lambda m: m == "readyToDisconnect" and w.disconnect())
            w.on("disconnect", lambda: out("disconnect", w.is_connected()))
            w.on("exit", lambda code, sig: out("exit", w.is_dead(), w.is_connected(), code))
            cluster.run()
        else:
            out("worker", cluster.worker.is_dead(), cluster.worker.is_connected())
            cluster.worker.on("disconnect", lambda: out("worker disconnect", cluster.worker.is_connected()))
            cluster.send("readyToDisconnect")
            cluster.wait_disconnect(20)
        """,
    )
    assert done.rc == 0, done
    assert done.one("forked") == ["forked", False, True]
    assert done.one("online") == ["online", False, True]
    assert done.one("worker") == ["worker", False, True]
    assert done.one("worker disconnect") == ["worker disconnect", False]
    assert done.one("disconnect") == ["disconnect", False]
    assert done.one("exit") == ["exit", True, False, 0]


@pytest.mark.parametrize("policy", ["rr", "none"])
def test_eaddrinuse_in_a_worker_and_the_listening_port(tmp_path: Path, policy: str) -> None:
    # test-cluster-eaddrinuse.js: a worker listening on a port in use gets EADDRINUSE, and the
    # primary is not confused: the worker then listens elsewhere and serves.
    # test-cluster-listening-port.js: the primary's 'listening' event has the real port.
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        done = run_program(
            tmp_path,
            """
            if cluster.is_primary:
                async def main():
                    loop = asyncio.get_running_loop()
                    listening = loop.create_future()
                    cluster.on("listening", lambda w, addr: listening.set_result(addr))
                    w = cluster.fork()
                    host, port = await asyncio.wait_for(listening, 20)
                    out("listening", host, port, type(port).__name__)
                    reader, writer = await asyncio.open_connection(host, port)
                    out("served", (await reader.readline()).decode().strip())
                    writer.close()
                    w.kill()
                cluster.run(main)
            else:
                try:
                    cluster.listen(("127.0.0.1", int(os.environ["BUSY_PORT"])))
                except cluster.BindError as exc:
                    out("bind error", str(exc))
                sock = cluster.listen(("127.0.0.1", 0))
                conn, _ = sock.accept()
                conn.sendall(b"after EADDRINUSE\\n")
                conn.close()
                time.sleep(20)
            """,
            BUSY_PORT=str(busy.getsockname()[1]),
            CLUSTER_SERVER_SCHED_POLICY=policy,
        )
    finally:
        busy.close()
    assert done.rc == 0, done
    assert "EADDRINUSE" in done.one("bind error")[1] and "Address already in use" in done.one("bind error")[1]
    _, host, port, kind = done.one("listening")
    assert host == "127.0.0.1" and port > 0 and kind == "int"
    assert done.one("served") == ["served", "after EADDRINUSE"]


def test_cluster_disconnect_callback(tmp_path: Path) -> None:
    # test-cluster-disconnect.js: cluster.disconnect(callback) once every worker has
    # disconnected, twice in a row; test-cluster-disconnect-with-no-workers.js: the callback
    # comes with no worker too (on the next tick, not at once).
    done = run_program(
        tmp_path,
        """
        if cluster.is_primary:
            calls = []
            cluster.disconnect(lambda: calls.append("no workers"))
            out("not yet", calls)
            async def round(n):
                loop = asyncio.get_running_loop()
                ws = [cluster.fork() for _ in range(2)]
                servers = asyncio.Queue()
                for w in ws:
                    w.on("listening", servers.put_nowait)
                for _ in range(4):  # two servers each
                    await asyncio.wait_for(servers.get(), 20)
                done = loop.create_future()
                cluster.disconnect(lambda: done.set_result([w.is_connected() for w in ws]))
                out("round", n, await asyncio.wait_for(done, 20))
                await asyncio.gather(*[asyncio.wait_for(exited(w), 20) for w in ws])
                out("exits", n, [w.exit_code for w in ws])
            def exited(w):
                f = asyncio.get_running_loop().create_future()
                if w.is_dead():
                    f.set_result(None)
                else:
                    w.on("exit", lambda code, sig: f.set_result(None))
                return f
            async def main():
                await asyncio.sleep(0)
                out("no workers", calls)
                await round(1)
                await round(2)
            cluster.run(main)
        else:
            import threading
            for port in (0, 0):
                server = cluster.TCPServer(("127.0.0.1", port), None)
                threading.Thread(target=server.serve_forever, daemon=True).start()
            cluster.wait_disconnect(20)
        """,
    )
    assert done.rc == 0, done
    assert done.one("not yet") == ["not yet", []]
    assert done.one("no workers") == ["no workers", ["no workers"]]
    assert done.one("round", 1) == ["round", 1, [False, False]]
    assert done.one("round", 2) == ["round", 2, [False, False]]
    assert done.one("exits", 1) == ["exits", 1, [0, 0]]
    assert done.one("exits", 2) == ["exits", 2, [0, 0]]


@pytest.mark.parametrize("policy", ["rr", "none"])
def test_server_restart_in_a_worker(tmp_path: Path, policy: str) -> None:
    # test-cluster-server-restart-rr.js and -none.js: a worker closes its server and listens
    # again on the same port; it serves again.
    done = run_program(
        tmp_path,
        """
        if cluster.is_primary:
            async def main():
                loop = asyncio.get_running_loop()
                got = asyncio.Queue()
                cluster.on("listening", lambda w, addr: got.put_nowait(addr))
                w = cluster.fork()
                for i in range(2):
                    host, port = await asyncio.wait_for(got.get(), 20)
                    reader, writer = await asyncio.open_connection(host, port)
                    out("served", i, port, (await reader.readline()).decode().strip())
                    writer.close()
                w.disconnect()
            cluster.run(main)
        else:
            port = 0
            for i in range(2):
                sock = cluster.listen(("127.0.0.1", port))
                port = sock.getsockname()[1]
                conn, _ = sock.accept()
                conn.sendall(f"server {i}\\n".encode())
                conn.close()
                sock.close()
            cluster.wait_disconnect(20)
        """,
        CLUSTER_SERVER_SCHED_POLICY=policy,
    )
    assert done.rc == 0, done
    (_, _, port0, text0), (_, _, port1, text1) = done.find("served")
    assert port0 == port1 and [text0, text1] == ["server 0", "server 1"]


def test_workers_share_a_udp_socket(tmp_path: Path) -> None:
    # test-cluster-dgram-1.js: workers bind the same UDP port (shared, whatever the policy:
    # Node never round-robins datagrams); every packet the primary sends is received once.
    done = run_program(
        tmp_path,
        """
        import socket
        if cluster.is_primary:
            async def main():
                loop = asyncio.get_running_loop()
                ports = asyncio.Queue()
                ws = [cluster.fork() for _ in range(2)]
                for w in ws:
                    w.on("message", ports.put_nowait)
                got = {await asyncio.wait_for(ports.get(), 20) for _ in ws}
                out("ports", len(got), cluster.scheduling_policy == cluster.SCHED_RR)
                port = got.pop()
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    for i in range(20):
                        s.sendto(b"x", ("127.0.0.1", port))
                for _ in range(500):  # (at most 5 s)
                    counts = [await w.request("count") for w in ws]
                    if sum(counts) >= 20:
                        break
                    await asyncio.sleep(0.01)
                out("received", sum(counts))
                cluster.disconnect()
            cluster.run(main)
        else:
            import threading
            sock = cluster.listen(("127.0.0.1", 0), type=socket.SOCK_DGRAM)
            n = 0
            def read():
                global n
                while True:
                    sock.recv(10)
                    n += 1
            threading.Thread(target=read, daemon=True).start()
            cluster.on_request(lambda q: n)
            cluster.send(sock.getsockname()[1])
            cluster.wait_disconnect(20)
        """,
    )
    assert done.rc == 0, done
    assert done.one("ports") == ["ports", 1, True]
    assert done.one("received") == ["received", 20]
