"""setup_primary's settings with Node's meanings (cwd, silent, stdio, uid/gid, serialization),
and the setup event, with real processes (``cluster/child.py``, ``wire/advanced.py``)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_cluster_api import run_program

START_METHODS = ["fork", "spawn"]


@pytest.mark.parametrize("start_method", START_METHODS)
def test_setup_is_cumulative_and_emitted_and_cwd_applies(tmp_path: Path, start_method: str) -> None:
    # test-cluster-setup-primary-cumulative.js, test-cluster-setup-primary-emit.js,
    # test-cluster-cwd.js
    (tmp_path / "elsewhere").mkdir()
    done = run_program(
        tmp_path,
        """
        if cluster.is_primary:
            s = cluster.settings
            out("defaults", s.exec, s.args == tuple(sys.argv[1:]), s.cwd, s.silent, s.stdio, s.uid, s.gid,
                s.serialization)
            cluster.on("setup", lambda s: out("setup", s.args, s.cwd, s.serialization))
            cluster.setup_primary(args=["one"])
            cluster.setup_primary(cwd="elsewhere")  # relative to the primary's cwd; args stay
            out("settings", cluster.settings.args, cluster.settings.cwd == os.path.abspath("elsewhere"))
            for bad in ({"serialization": "pickle"}, {"stdio": ["pipe"]}, {"stdio": ["pipe", "bogus", "pipe"]}):
                try:
                    cluster.setup_primary(**bad)
                except ValueError as exc:
                    out("bad", str(exc))
            cluster.on("message", lambda w, data: out("worker", data))
            cluster.fork()
            cluster.setup_primary(cwd="no such directory")
            try:
                cluster.fork()
            except FileNotFoundError as exc:
                out("no cwd", exc.strerror)
            cluster.run()
        else:
            cluster.send({"cwd": os.getcwd(), "argv": sys.argv[1:]})
        """,
        start_method=start_method,
    )
    assert done.rc == 0, done
    assert done.one("defaults") == ["defaults", None, True, None, False, None, None, None, "json"]
    assert [line[1:] for line in done.find("setup")] == [
        [["one"], None, "json"],
        [["one"], str(tmp_path / "elsewhere"), "json"],
        [["one"], str(tmp_path / "no such directory"), "json"],
    ]
    assert done.one("settings") == ["settings", ["one"], True]
    assert [line[1] for line in done.find("bad")] == [
        "serialization='pickle': expected 'json' or 'advanced'",
        "stdio has 1 entries: give stdin, stdout and stderr (and 'ipc' if you like)",
        "stdio[1] = 'bogus': expected 'inherit', 'pipe', 'ignore', an fd or a file",
    ]
    assert done.one("worker")[1] == {"cwd": str(tmp_path / "elsewhere"), "argv": ["one"]}
    assert done.one("no cwd") == ["no cwd", "cwd is not a directory"]


@pytest.mark.parametrize("start_method", START_METHODS)
def test_silent_and_stdio_pipe_the_workers_output_to_the_primary(tmp_path: Path, start_method: str) -> None:
    # test-cluster-fork-stdio.js (stdio: ['pipe', 'pipe', 'pipe', 'ipc']); Node's silent: true
    done = run_program(
        tmp_path,
        """
        if cluster.is_primary:
            async def main():
                loop = asyncio.get_running_loop()
                cluster.setup_primary(silent=True)
                quiet = cluster.fork(env={"ROLE": "quiet"})
                cluster.setup_primary(silent=False, stdio=["pipe", "pipe", "ignore", "ipc"])
                piped = cluster.fork(env={"ROLE": "piped"})
                piped.stdin.write(b"from the primary\\n")
                piped.stdin.close()
                cluster.setup_primary(stdio=None, silent=False)
                await cluster.wait()
                read = lambda f: f.read().decode() if f else None
                for w in (quiet, piped):
                    got = await loop.run_in_executor(None, lambda: [read(w.stdout), read(w.stderr)])
                    out(os.environ.get("ROLE") or w.id, w.exit_code, w.stdin is not None, *got)
                    for f in (w.stdin, w.stdout, w.stderr):
                        f and f.close()
            cluster.run(main)
        else:
            role = os.environ["ROLE"]
            print(f"{role} says hello on stdout", flush=True)
            print(f"{role} says hello on stderr", file=sys.stderr, flush=True)
            if role == "piped":
                print("stdin:", sys.stdin.readline().strip(), flush=True)
        """,
        start_method=start_method,
    )
    assert done.rc == 0, done
    assert done.one(1) == [1, 0, True, "quiet says hello on stdout\n", "quiet says hello on stderr\n"]
    assert done.one(2) == [2, 0, True, "piped says hello on stdout\nstdin: from the primary\n", None]
    # none of it went to the primary's own output (only in its JSON lines above)
    assert not [line for line in done.out.splitlines() if not line.startswith("[")]
    assert "says hello" not in done.err


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    """A directory any user can read (a worker running as nobody re-reads its program)."""
    path = Path(tempfile.mkdtemp(prefix="cluster-uid-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching a worker's user needs root")
def test_uid_and_gid(world_readable_dir: Path) -> None:
    done = run_program(
        world_readable_dir,
        """
        import pkgutil  # runpy imports it in the worker: imported here, as the interpreter may be unreadable to nobody
        if cluster.is_primary:
            cluster.setup_primary(uid=65534, gid=65534)
            cluster.on("message", lambda w, data: out("worker", data))
            cluster.fork()
            cluster.run()
        else:
            cluster.send([os.getuid(), os.geteuid(), os.getgid(), os.getgroups()])
        """,
    )
    assert done.rc == 0, done
    assert done.one("worker") == ["worker", [65534, 65534, 65534, []]]


def test_uid_a_worker_may_not_take_is_a_clear_error(tmp_path: Path) -> None:
    done = run_program(
        tmp_path,
        """
        import errno
        if os.geteuid() == 0:  # be an unprivileged primary
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
        cluster.setup_primary(uid=0)
        try:
            cluster.fork()
        except PermissionError as exc:
            out("fork", exc.errno == errno.EPERM, exc.strerror)
        """,
    )
    assert done.rc == 0, done
    assert done.one("fork") == ["fork", True, "only root may start a worker as uid 0"]


ADVANCED = """
import datetime, decimal, uuid
VALUE = {
    "bytes": b"\\x00\\xff", "tuple": (1, (2, 3)), "set": {1, 2}, "frozen": frozenset({"a"}),
    "when": datetime.datetime(2024, 2, 29, 12, 0, tzinfo=datetime.timezone.utc), "day": datetime.date(2024, 1, 1),
    "delta": datetime.timedelta(seconds=90), "price": decimal.Decimal("9.90"), "id": uuid.UUID(int=1),
    "keys": {1: "int", (1, 2): "tuple"}, "nested": [{"deep": {b"k": {1.5, None}}}], "big": b"x" * 100_000,
}
if cluster.is_primary:
    cluster.setup_primary(serialization="advanced")
    async def main():
        w = cluster.fork()
        loop = asyncio.get_running_loop()
        echoed, second = loop.create_future(), loop.create_future()
        w.on("message", lambda data: (second if echoed.done() else echoed).set_result(data))
        w.send(VALUE)
        back = await asyncio.wait_for(echoed, 20)
        out("echo", back == VALUE, type(back["tuple"]).__name__, type(back["frozen"]).__name__)
        out("request", await w.request({"ask": {1, 2}}) == {"got": frozenset({1, 2})})
        circular = {"name": "circular"}
        circular["circular"] = circular  # Node's test sends this
        w.send(circular)
        back = await asyncio.wait_for(second, 20)
        out("circular", back["circular"] is back, back["name"])
        w.disconnect()
    cluster.on_request(lambda w, data: {"primary got": data})
    cluster.run(main)
else:
    cluster.on_request(lambda data: {"got": frozenset(data["ask"])})
    data = cluster.get_message(20)
    assert data == VALUE, data
    cluster.send(data)
    out("worker asks", cluster.request_sync((1, b"2")))
    cluster.send(cluster.get_message(20))
    cluster.wait_disconnect(20)
"""


@pytest.mark.parametrize("start_method", START_METHODS)
def test_advanced_serialization_carries_what_json_cannot(tmp_path: Path, start_method: str) -> None:
    # test-cluster-advanced-serialization.js: a circular object echoed, still circular
    done = run_program(tmp_path, ADVANCED, start_method=start_method)
    assert done.rc == 0, done
    assert done.one("echo") == ["echo", True, "tuple", "frozenset"]
    assert done.one("request") == ["request", True]
    assert done.one("circular") == ["circular", True, "circular"]
    assert done.one("worker asks") == ["worker asks", {"primary got": [1, "b'2'"]}]
