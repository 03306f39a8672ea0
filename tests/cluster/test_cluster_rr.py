"""Round-robin scheduling in the cluster API (``cluster.SCHED_RR``), with real processes.

The primary hands each connection it accepts to the next worker listening on
that address, through the HTTP server's hand-off code (``cluster/rr.py``). The
programs here drive their own clients from the primary's event loop (the
primary accepts on that loop too) and print what happened; see
``test_cluster_api.py`` for ``run_program``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster_server.cluster import rr

from .test_cluster_api import run_program

# A worker serving "pid\n" per line with cluster.start_server (asyncio), or holding
# its listener without ever accepting (ROLE=hold), or closing it when told (ROLE=close).
REROUTE_PROGRAM = """
ROLE = os.environ.get("ROLE")

async def ask(addr):
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(b"hi\\n")
    await writer.drain()
    line = await reader.readline()
    writer.close()
    return int(line)

async def answered(tasks, timeout):
    done, _ = await asyncio.wait(tasks, timeout=timeout)
    return sorted(t.result() for t in done)

if cluster.is_primary:
    listening = asyncio.Queue()
    cluster.on("listening", lambda w, addr: listening.put_nowait(addr))
    cluster.on("exit", lambda w, code, sig: out("exit", w.id, code, sig.name if sig else None))

    async def main():
        hold = cluster.fork(env={"ROLE": "hold"})
        addr = await asyncio.wait_for(listening.get(), 20)
        serve = cluster.fork(env={"ROLE": "serve"})
        await asyncio.wait_for(listening.get(), 20)
        # one connection is queued in 'hold', which never accepts; the other is served
        tasks = [asyncio.ensure_future(ask(addr)) for _ in range(2)]
        out("before the death", await answered(tasks, 0.5), serve.pid)
        hold.kill(signal.SIGKILL)  # what it was handed and never accepted goes to 'serve'
        out("after the death", await answered(tasks, 10), serve.pid)

        closer = cluster.fork(env={"ROLE": "close"})
        await asyncio.wait_for(listening.get(), 20)
        tasks = [asyncio.ensure_future(ask(addr)) for _ in range(2)]
        out("before the close", await answered(tasks, 0.5))
        closer.send("close")  # its listener closes: the connection it holds goes back
        out("after the close", await answered(tasks, 10), closer.is_connected())

        quitter = cluster.fork(env={"ROLE": "disconnect"})
        await asyncio.wait_for(listening.get(), 20)
        gone = asyncio.get_running_loop().create_future()
        quitter.on("disconnect", lambda: gone.set_result(None))
        quitter.send("disconnect")
        await asyncio.wait_for(gone, 10)
        tasks = [asyncio.ensure_future(ask(addr)) for _ in range(4)]
        out("after the disconnect", await answered(tasks, 10), quitter.is_dead())
        out("handles", len(cluster._primary._rr.handles))
        quitter.kill()
        cluster.disconnect()
    cluster.run(main)
elif ROLE == "serve":
    async def handle(reader, writer):
        await reader.readline()
        writer.write(f"{os.getpid()}\\n".encode())
        await writer.drain()
        writer.close()

    async def serve():
        server = await cluster.start_server(handle, "127.0.0.1", 0)
        out("serve", type(server).__name__)
        await cluster.disconnected()
    asyncio.run(serve())
else:
    sock = cluster.listen(("127.0.0.1", 0))
    if ROLE == "close":
        cluster.get_message(20)
        sock.close()
        cluster.wait_disconnect(20)
    elif ROLE == "disconnect":
        cluster.get_message(20)
        cluster.worker.disconnect()
        time.sleep(30)  # alive, disconnected: never routed to
    else:
        time.sleep(30)
"""


def test_connections_a_worker_never_accepted_go_to_another(tmp_path: Path) -> None:
    # Node's round-robin handle re-distributes a handle whose worker died or refused it
    # (lib/internal/cluster/round_robin_handle.js: remove() and the 'accepted: false' reply).
    done = run_program(tmp_path, REROUTE_PROGRAM, timeout=60)
    assert done.rc == 0, done
    assert done.one("serve") == ["serve", "RoundRobinServer"]
    before, serve_pid = done.one("before the death")[1:]
    assert before == [serve_pid]  # one served, one waiting in 'hold'
    assert done.one("after the death")[1] == [serve_pid, serve_pid]  # nothing lost
    assert done.one("before the close")[1] == [serve_pid]
    assert done.one("after the close")[1:] == [[serve_pid, serve_pid], True]
    # never to a disconnected worker (still alive: is_dead() is False)
    assert done.one("after the disconnect")[1:] == [[serve_pid] * 4, False]
    assert done.one("handles") == ["handles", 1]  # one address, one handle, whoever listens
    assert done.one("exit", 1) == ["exit", 1, None, "SIGKILL"]


SERVERS_PROGRAM = """
import socket, socketserver

class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(f"tcp {os.getpid()} {self.rfile.readline().decode().strip()}\\n".encode())

async def ask(addr, text):
    if isinstance(addr, str):
        reader, writer = await asyncio.open_unix_connection(addr)
    else:
        reader, writer = await asyncio.open_connection(*addr)
    writer.write(text.encode() + b"\\n")
    await writer.drain()
    line = await reader.readline()
    writer.close()
    return line.decode().split()

if cluster.is_primary:
    addrs = {}
    cluster.on("listening", lambda w, addr: addrs.setdefault(w.id, []).append(addr))

    async def main():
        ws = [cluster.fork() for _ in range(2)]
        loop = asyncio.get_running_loop()
        ready = {w.id: loop.create_future() for w in ws}
        cluster.on("message", lambda w, data: ready[w.id].done() or ready[w.id].set_result(data))
        kinds = await asyncio.wait_for(asyncio.gather(*ready.values()), 20)
        out("kinds", kinds[0], cluster.scheduling_policy)
        tcp, stream, unix = addrs[1]
        answers = []
        for i in range(8):
            answers.append(await ask(tcp, f"n{i}"))
            answers.append(await ask(stream, f"s{i}"))
            answers.append(await ask(unix, f"u{i}"))
        out("answers", answers, [w.pid for w in ws])
        cluster.disconnect()
        await cluster.wait()
        out("exits", [w.exit_code for w in ws])
    cluster.run(main)
else:
    import threading
    tcp = cluster.TCPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=tcp.serve_forever, daemon=True).start()

    async def handle(reader, writer):
        line = (await reader.readline()).decode().strip()
        kind = "unix" if writer.get_extra_info("socket").family == socket.AF_UNIX else "stream"
        writer.write(f"{kind} {os.getpid()} {line}\\n".encode())
        await writer.drain()
        writer.close()

    async def serve():
        stream = await cluster.start_server(handle, "127.0.0.1", 0)
        unix = await cluster.start_unix_server(handle, os.path.join(os.getcwd(), "rr.sock"))
        cluster.send([type(tcp.socket).__name__, type(stream).__name__, type(unix).__name__])
        async with stream, unix:
            await cluster.disconnected()
    asyncio.run(serve())
    tcp.server_close()
"""


@pytest.mark.parametrize("policy", ["rr", "none"])
def test_the_same_servers_serve_under_both_policies(tmp_path: Path, policy: str) -> None:
    done = run_program(tmp_path, SERVERS_PROGRAM, CLUSTER_SERVER_SCHED_POLICY=policy)
    assert done.rc == 0, done
    kinds, sched = done.one("kinds")[1:]
    if policy == "rr":
        assert sched == rr.SCHED_RR
        assert kinds == ["RoundRobinSocket", "RoundRobinServer", "RoundRobinServer"]
    else:
        assert sched == rr.SCHED_NONE
        assert kinds == ["socket", "Server", "Server"]
    answers, pids = done.one("answers")[1:]
    expected = [
        [kind, text] for i in range(8) for kind, text in (("tcp", f"n{i}"), ("stream", f"s{i}"), ("unix", f"u{i}"))
    ]
    assert [[a[0], a[2]] for a in answers] == expected
    assert {int(a[1]) for a in answers} <= set(pids)
    if policy == "rr":  # strictly in turn, per address
        for kind in ("tcp", "stream", "unix"):
            served = [int(a[1]) for a in answers if a[0] == kind]
            assert served[0::2] == [served[0]] * 4 and served[1::2] == [served[1]] * 4 and served[0] != served[1]
    assert done.one("exits") == ["exits", [0, 0]]
    assert not (tmp_path / "rr.sock").exists()


POLICY_PROGRAM = """
if cluster.is_primary:
    out("before", cluster.scheduling_policy)
    if len(sys.argv) > 1:
        cluster.scheduling_policy = int(sys.argv[1])
    async def main():
        w = cluster.fork()
        cluster.scheduling_policy = 99  # after the first fork: ignored, with a warning
        got = asyncio.get_running_loop().create_future()
        w.on("message", got.set_result)
        out("worker", await asyncio.wait_for(got, 20))
        cluster.fork().kill()
    cluster.run(main)
else:
    sock = cluster.listen(("127.0.0.1", 0))
    cluster.send([cluster.scheduling_policy, os.environ.get("CLUSTER_SERVER_SCHED_POLICY"), type(sock).__name__])
"""


@pytest.mark.parametrize(
    ("env", "argv", "expected"),
    [
        (None, [], [2, 2, "rr", "RoundRobinSocket"]),  # Node's default on Linux
        ("none", [], [1, 1, "none", "socket"]),
        ("none", ["2"], [1, 2, "rr", "RoundRobinSocket"]),  # set in code before fork(): wins
    ],
)
def test_scheduling_policy_default_environment_and_freeze(
    tmp_path: Path, env: str | None, argv: list[str], expected: list[object]
) -> None:
    extra = {} if env is None else {"CLUSTER_SERVER_SCHED_POLICY": env}
    done = run_program(tmp_path, POLICY_PROGRAM, *argv, **extra)
    assert done.rc == 0, done
    assert done.one("before") == ["before", expected[0]]
    assert done.one("worker") == ["worker", expected[1:]]
    assert "changed to 99 after the first fork() or setup_primary(): ignored" in done.err


def test_a_bad_policy_is_a_clear_error(tmp_path: Path) -> None:
    done = run_program(
        tmp_path,
        """
        for value in (0, 3, True, "rr"):
            try:
                cluster.rr.check_policy(value)
            except ValueError as exc:
                out("bad", str(exc))
        try:
            cluster.fork()
        except ValueError as exc:
            out("env", str(exc))
        """,
        CLUSTER_SERVER_SCHED_POLICY="roundrobin",
    )
    assert done.rc == 0, done
    assert len(done.find("bad")) == 4
    assert "expected cluster.SCHED_RR (2) or cluster.SCHED_NONE (1)" in done.find("bad")[0][1]
    assert (
        done.one("env")[1]
        == "CLUSTER_SERVER_SCHED_POLICY='roundrobin': expected 'rr' (round-robin) or 'none' (shared handle)"
    )


def test_a_worker_at_its_fd_limit_gives_connections_back(tmp_path: Path) -> None:
    # A connection handed to a worker that cannot receive another fd arrives truncated
    # (MSG_CTRUNC): the worker says so and the primary gives it to another worker, and
    # backs off from that one (the HTTP server's hand-off, scheduling/primary.py).
    done = run_program(
        tmp_path,
        """
        import resource
        async def ask(addr):
            reader, writer = await asyncio.open_connection(*addr)
            line = await reader.readline()
            writer.close()
            return int(line)

        if cluster.is_primary:
            async def main():
                listening = asyncio.Queue()
                cluster.on("listening", lambda w, addr: listening.put_nowait(addr))
                full = cluster.fork(env={"ROLE": "full"})
                limited = asyncio.get_running_loop().create_future()
                full.on("message", limited.set_result)
                addr = await asyncio.wait_for(listening.get(), 20)
                await asyncio.wait_for(limited, 20)
                serve = cluster.fork(env={"ROLE": "serve"})
                await asyncio.wait_for(listening.get(), 20)
                out("answers", [await asyncio.wait_for(ask(addr), 10) for _ in range(6)], serve.pid)
                full.kill()
                serve.kill()
            cluster.run(main)
        elif os.environ["ROLE"] == "full":
            sock = cluster.listen(("127.0.0.1", 0))
            open_now = len(os.listdir("/proc/self/fd")) - 1
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_now, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
            cluster.send("limited")
            time.sleep(30)
        else:
            sock = cluster.listen(("127.0.0.1", 0))
            while True:
                conn, _ = sock.accept()
                conn.sendall(f"{os.getpid()}\\n".encode())
                conn.close()
        """,
    )
    assert done.rc == 0, done
    answers, serve_pid = done.one("answers")[1:]
    assert answers == [serve_pid] * 6
    assert "is at its file-descriptor limit" in done.err
