"""--reload: real servers, real file edits, real clients."""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import click.testing
import pytest
import websockets

from cluster_server._config import RELOAD_GRACEFUL_TIMEOUT, Config
from cluster_server._errors import ConfigError
from cluster_server.cli import main as _cli
from cluster_server.templates.reload import WatchRules

from ..conftest import ROOT, Server, asgi_app, wait_until


def versioned_app(version: str, startup_fails: bool = False) -> str:
    """An ASGI app answering ``<version> <pid>``; it echoes on a websocket."""
    source = asgi_app(
        f"""
        import os

        VERSION = {version!r}
        """,
        """
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
                await send({"type": "websocket.send", "text": message.get("text") or ""})
        body = f"{VERSION} {os.getpid()}".encode()
        headers = [(b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        """,
    )
    if startup_fails:
        source = source.replace(
            'await send({"type": "lifespan.startup.complete"})',
            'await send({"type": "lifespan.startup.failed", "message": "no database"})\n                return',
        )
    return source


def one_shot(port: int, path: str = "/") -> tuple[str, int]:
    """GET on a new connection: (version, pid)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        body = resp.read().decode()
        assert resp.status == 200, body
    finally:
        conn.close()
    version, pid = body.split()
    return version, int(pid)


def start_reloading(start_server: Callable[..., Server], *args: str) -> Server:
    server: Server = start_server("app:app", "--reload", *args)
    server.wait_ready()
    server.wait_log("reload: watching")
    return server


def serves(server: Server, version: str) -> bool:
    return one_shot(server.port or 0)[0] == version


# -- options ---------------------------------------------------------------------


def test_reload_options_parse_as_tuples_and_shorten_the_graceful_timeout(tmp_path: Path) -> None:
    seen: dict[str, Config] = {}

    def capture(config: Config) -> int:
        seen["config"] = config
        return 0

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    runner = click.testing.CliRunner()
    original = _cli.serve
    _cli.serve = capture  # type: ignore[assignment]
    try:
        args = ["m:app", "--reload", "--reload-dir", str(tmp_path / "a"), "--reload-dir", str(tmp_path / "b")]
        result = runner.invoke(_cli.cli, [*args, "--reload-include", "*.html", "--reload-delay", "0.1"])
        assert result.exit_code == 0, result.output
        config = seen["config"]
        assert config.reload_dirs == (str(tmp_path / "a"), str(tmp_path / "b"))
        assert config.reload_includes == ("*.html",)
        assert config.reload_delay == 0.1
        assert config.graceful_timeout == RELOAD_GRACEFUL_TIMEOUT  # not given: shorter under --reload
        result = runner.invoke(_cli.cli, ["m:app", "--reload", "--graceful-timeout", "30"])
        assert result.exit_code == 0, result.output
        assert seen["config"].graceful_timeout == 30.0  # given: kept
        result = runner.invoke(_cli.cli, ["m:app"], env={"CLUSTER_SERVER_RELOAD_EXCLUDES": "*.tmp build"})
        assert result.exit_code == 0, result.output
        assert seen["config"].reload_excludes == ("*.tmp", "build")
        assert seen["config"].graceful_timeout == 30.0  # no --reload: the usual default
    finally:
        _cli.serve = original  # type: ignore[assignment]


def test_reload_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--reload and --preload"):
        Config(app="m:app", reload=True, preload=True)
    with pytest.raises(ConfigError, match="no such directory"):
        Config(app="m:app", reload=True, reload_dirs=(str(tmp_path / "nope"),))
    with pytest.raises(ConfigError, match="import string"):
        Config(app=lambda: None, reload=True)
    assert Config(app="m:app", reload=True, reload_dirs=[str(tmp_path)]).reload_dirs == (str(tmp_path),)


def test_watch_rules(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    (root / "pkg").mkdir(parents=True)
    (root / "myenv").mkdir()
    (root / "myenv" / "pyvenv.cfg").write_text("home = /usr\n")
    rules = WatchRules((str(root),), ("*.py", "*.html"), ("generated_*", "build"))
    yes = ["app.py", "pkg/mod.py", "templates/index.html"]
    no = [
        "app.pyc",
        ".app.py.swp",
        "app.py~",
        ".#app.py",
        "4913",
        "notes.txt",
        "__pycache__/app.cpython-311.pyc",
        ".git/config.py",
        ".venv/lib/site.py",
        "venv/lib/site.py",
        "myenv/lib/site.py",  # a virtualenv by its pyvenv.cfg
        "node_modules/x.py",
        "generated_api.py",
        "build/lib/app.py",
    ]
    for rel in yes:
        assert rules.triggers(str(root / rel)), rel
    for rel in no:
        assert not rules.triggers(str(root / rel)), rel
    assert not rules.triggers(str(tmp_path / "elsewhere.py"))
    assert rules.in_project(str(root / "pkg" / "mod.py"))
    assert not rules.in_project(str(root / "myenv" / "lib" / "python3.11" / "site-packages" / "x.py"))
    assert rules.show(str(root / "pkg" / "mod.py")) == os.path.join("pkg", "mod.py")
    assert rules.is_project_module(type("M", (), {"__file__": str(root / "app.py")}))
    assert not rules.is_project_module(os)
    assert not rules.is_project_module(sys)  # built in: no file


STALE_PYC = """
import importlib, importlib.util, os, sys, time
sys.path.insert(0, os.getcwd())
{hook}
S = int(time.time()) * 10**9  # a whole second: the timeline below happens within it
with open("mod.py", "w") as f:
    f.write("X = 1\\n")
os.utime("mod.py", ns=(S, S + 100_000_000))  # saved at S+0.1
import mod  # writes a .pyc recording the source's mtime in whole seconds (S) and its size
assert mod.X == 1
pyc = importlib.util.cache_from_source(os.path.abspath("mod.py"))
os.utime(pyc, ns=(S, S + 200_000_000))  # written at S+0.2
pid = os.fork()
if pid == 0:
    with open("mod.py", "w") as f:
        f.write("X = 2\\n")  # the same size
    os.utime("mod.py", ns=(S, S + 500_000_000))  # saved again at S+0.5: the same second
    del sys.modules["mod"]
    importlib.invalidate_caches()
    import mod
    print("X =", mod.X)
    os._exit(0)
os.waitpid(pid, 0)
"""


@pytest.mark.parametrize("fresh", [False, True])
def test_fresh_import_hook_never_serves_a_stale_pyc(tmp_path: Path, fresh: bool) -> None:
    hook = (
        "from cluster_server.templates.reload import WatchRules, fresh_import_hook\n"
        "fresh_import_hook(WatchRules((os.path.realpath(os.getcwd()),)))"
        if fresh
        else ""
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    out = subprocess.run(
        [sys.executable, "-c", STALE_PYC.format(hook=hook)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    # Plain Python trusts the .pyc and imports the old code; the hook does not.
    assert out.stdout.strip() == ("X = 2" if fresh else "X = 1")


# -- real servers ------------------------------------------------------------------


def test_reload_serves_new_code(start_server: Callable[..., Server], write_app: Callable[..., Path]) -> None:
    path = write_app("app", versioned_app("v1"))
    server = start_reloading(start_server)
    assert serves(server, "v1")
    path.write_text(versioned_app("v2"))
    wait_until(lambda: serves(server, "v2"), 10, what="v2 served")
    server.wait_log("reload: app.py changed; rolling to a new generation")
    server.wait_log("rolling restart to generation 2 done")
    assert server.log().count("changed; rolling") == 1  # one log line per reload


def test_reload_with_two_workers_reloads_both(
    start_server: Callable[..., Server], write_app: Callable[..., Path]
) -> None:
    path = write_app("app", versioned_app("v1"))
    # (each reload's steps are logged at DEBUG under --reload)
    server = start_reloading(start_server, "--workers", "2", "--log-level", "debug")
    before = set(re.findall(r"worker \d \[pid (\d+)\] ready", server.log()))
    assert len(before) == 2
    path.write_text(versioned_app("v2"))
    server.wait_log("rolling restart to generation 2 done")
    after = set(re.findall(r"worker \d \[pid (\d+)\] spawned \(generation 2\)", server.log()))
    assert len(after) == 2 and not after & before
    for pid in before:  # the old generation drains and exits
        wait_until(lambda pid=pid: f"[pid {pid}] exited" in server.log(), 10, what=f"{pid} exited")
    seen: dict[int, str] = {}
    deadline = time.monotonic() + 10
    while len(seen) < 2 and time.monotonic() < deadline:
        version, pid = one_shot(server.port or 0)
        seen[pid] = version
    assert set(seen.values()) == {"v2"}
    assert {str(p) for p in seen} == after


def test_syntax_error_keeps_old_code_serving_and_fixing_it_reloads(
    start_server: Callable[..., Server], write_app: Callable[..., Path]
) -> None:
    path = write_app("app", versioned_app("v1"))
    server = start_reloading(start_server, "--workers", "2")
    broken = versioned_app("v2").replace("async def app(scope, receive, send):", "async def app(scope, receive, send)")
    path.write_text(broken)
    server.wait_log("rolling restart to generation 2 stopped")
    log = server.log()
    line = broken.splitlines().index("async def app(scope, receive, send)") + 1
    assert f"app.py:{line}" in log or f'app.py", line {line}' in log
    assert "SyntaxError" in log
    assert log.count("SyntaxError") == 1  # shown once, not once per worker
    assert "importlib" not in log.split("stopped:")[1]  # a short traceback: the app's frames only
    for _ in range(20):
        assert serves(server, "v1")
    path.write_text(versioned_app("v3"))
    wait_until(lambda: serves(server, "v3"), 10, what="v3 served after the fix")
    server.wait_log("rolling restart to generation 3 done")


def test_broken_code_at_start_waits_for_a_fix(
    start_server: Callable[..., Server], write_app: Callable[..., Path]
) -> None:
    path = write_app("app", versioned_app("v1").replace("VERSION = ", "VERSION = = "))
    server: Server = start_server("app:app", "--reload", "--workers", "2")
    server.wait_log("the app cannot start; every request gets a 500 page saying why")
    server.wait_log("reload: watching")
    assert server.log().count("SyntaxError") == 1
    assert server.proc.poll() is None  # still running, unlike without --reload
    path.write_text(versioned_app("v2"))
    server.wait_log("all 2 workers ready")
    # (under the default `shared`, an error-page worker being drained may take one more
    # connection until its SIGTERM lands)
    wait_until(lambda: serves(server, "v2"), 10, what="v2 served")


def test_import_error_shows_a_short_traceback(
    start_server: Callable[..., Server], write_app: Callable[..., Path]
) -> None:
    write_app("helper", "def load():\n    return 1 / 0\n")  # before the start: its own save would reload
    path = write_app("app", versioned_app("v1"))
    server = start_reloading(start_server)
    path.write_text("import helper\nhelper.load()\n" + versioned_app("v2"))
    server.wait_log("rolling restart to generation 2 stopped")
    tail = server.log().split("stopped:")[1]
    assert "ZeroDivisionError" in tail
    assert 'helper.py", line 2, in load' in tail
    assert 'app.py", line 2' in tail
    assert serves(server, "v1")


def test_failing_lifespan_startup_keeps_old_code_serving(
    start_server: Callable[..., Server], write_app: Callable[..., Path]
) -> None:
    path = write_app("app", versioned_app("v1"))
    server = start_reloading(start_server)
    path.write_text(versioned_app("v2", startup_fails=True))
    server.wait_log("rolling restart to generation 2 stopped")
    assert "lifespan startup" in server.log()
    assert serves(server, "v1")
    path.write_text(versioned_app("v3"))
    wait_until(lambda: serves(server, "v3"), 10, what="v3 served")


def test_file_filters(start_server: Callable[..., Server], write_app: Callable[..., Path], tmp_path: Path) -> None:
    path = write_app("app", versioned_app("v1"))
    server = start_reloading(start_server, "--reload-include", "*.html", "--reload-exclude", "scratch_*")
    for name in ("notes.txt", ".app.py.swp", "app.py~", "scratch_1.py"):
        (tmp_path / name).write_text("x")
    (tmp_path / "__pycache__").mkdir(exist_ok=True)
    (tmp_path / "__pycache__" / "junk.py").write_text("x")
    (tmp_path / "page.html").write_text("<p>hi</p>")
    server.wait_log("reload: page.html changed")
    server.wait_log("rolling restart to generation 2 done")
    path.write_text(versioned_app("v3"))
    wait_until(lambda: serves(server, "v3"), 10, what="v3 served")
    log = server.log()
    assert log.count("changed; rolling") == 2, log  # page.html, then app.py: nothing for the ignored files


def test_open_websocket_does_not_block_a_reload(
    start_server: Callable[..., Server], write_app: Callable[..., Path]
) -> None:
    path = write_app("app", versioned_app("v1"))
    server = start_reloading(start_server, "--log-level", "debug")  # debug: each reload's "exited" lines
    old_pid = one_shot(server.port or 0)[1]

    async def scenario() -> float:
        async with websockets.connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            saved = time.monotonic()
            path.write_text(versioned_app("v2"))
            while not await asyncio.to_thread(serves, server, "v2"):
                assert time.monotonic() - saved < 5, "the reload waited for the websocket"
                await asyncio.sleep(0.02)
            new_code_after = time.monotonic() - saved
            with pytest.raises(websockets.ConnectionClosed):  # closed by the draining worker
                async with asyncio.timeout(RELOAD_GRACEFUL_TIMEOUT + 3):
                    while True:
                        await ws.send("ping")
                        await ws.recv()
                        await asyncio.sleep(0.05)
            return new_code_after

    assert asyncio.run(scenario()) < 3
    server.wait_log(f"[pid {old_pid}] exited", timeout=RELOAD_GRACEFUL_TIMEOUT + 3)


def test_no_failed_requests_while_polling_through_reloads(
    start_server: Callable[..., Server], write_app: Callable[..., Path]
) -> None:
    path = write_app("app", versioned_app("v0"))
    server = start_reloading(start_server, "--workers", "2")
    failures: list[str] = []
    versions: list[str] = []
    stop = threading.Event()

    def poll() -> None:
        deadline = time.monotonic() + 40
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                versions.append(one_shot(server.port or 0)[0])
            except Exception as exc:
                failures.append(repr(exc))

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        for n in range(1, 4):
            path.write_text(versioned_app(f"v{n}"))
            wait_until(lambda n=n: versions and versions[-1] == f"v{n}", 10, what=f"v{n} served")
            server.wait_log(f"rolling restart to generation {n + 1} done")
    finally:
        stop.set()
        poller.join(10)
    assert not failures, failures
    assert len(versions) > 50
