"""--preload: workers forked from a template that imported the app (real processes)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path

from ..conftest import Server, alive, asgi_app, titled, wait_until


def versioned_app(version: str) -> str:
    """Answers its version, pid, parent pid and gc freeze count; notes each process that imports it."""
    return asgi_app(
        f"""
        import gc, os

        VERSION = {version!r}
        with open(os.environ["IMPORT_LOG"], "a") as f:
            f.write(f"{{os.getpid()}}\\n")  # one line per process that imported the app
        """,
        """
        body = {"version": VERSION, "pid": os.getpid(), "ppid": os.getppid(), "frozen": gc.get_freeze_count()}
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": __import__("json").dumps(body).encode()})
        """,
    )


def one_shot(port: int) -> dict[str, int | str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        resp = conn.getresponse()
        assert resp.status == 200
        result: dict[str, int | str] = json.loads(resp.read())
        return result
    finally:
        conn.close()


def start_preloaded(
    start_server: Callable[..., Server], tmp_path: Path, *args: str, version: str = "v1"
) -> tuple[Server, Path]:
    (tmp_path / "app.py").write_text(versioned_app(version))
    log = tmp_path / "imports.log"
    server = start_server("app:app", "--preload", *args, env={"IMPORT_LOG": str(log)})
    return server.wait_ready(), log


def test_preload_imports_the_app_once_and_forks_frozen_workers(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    server, log = start_preloaded(start_server, tmp_path, "--workers", "2")
    templates = titled(server.pid, "template")
    workers = titled(server.pid, "worker")
    assert len(templates) == 1 and len(workers) == 2
    assert log.read_text().split() == [str(templates[0])]  # imported once, by the template
    seen: dict[int, dict[str, int | str]] = {}
    for _ in range(200):
        answer = one_shot(server.port or 0)
        seen[int(answer["pid"])] = answer
        if len(seen) == 2:
            break
    assert set(seen) == set(workers)
    for answer in seen.values():
        assert answer["ppid"] == server.pid  # re-parented: the primary reaps them
        assert int(answer["frozen"]) > 1000  # gc.freeze() in the template: shared pages stay shared


def test_preload_sighup_serves_changed_code(start_server: Callable[..., Server], tmp_path: Path) -> None:
    server, log = start_preloaded(start_server, tmp_path, "--workers", "2")
    old_template = titled(server.pid, "template")
    (tmp_path / "app.py").write_text(versioned_app("v2"))
    server.signal(signal.SIGHUP)
    server.wait_log("rolling restart to generation 2 done")
    wait_until(
        lambda: len(t := titled(server.pid, "template")) == 1 and t != old_template, 10, what="the old template retired"
    )
    wait_until(lambda: len(titled(server.pid, "worker")) == 2, 10, what="the old workers drained")
    for _ in range(20):
        assert one_shot(server.port or 0)["version"] == "v2"
    assert len(log.read_text().split()) == 2  # the new template imported it; no worker did


def test_preload_sighup_with_broken_code_keeps_the_old_generation(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    server, _ = start_preloaded(start_server, tmp_path, "--workers", "2")
    workers = titled(server.pid, "worker")
    source = versioned_app("v2").replace("VERSION = ", "VERSION = = ")
    (tmp_path / "app.py").write_text(source)
    server.signal(signal.SIGHUP)
    server.wait_log("not rolling: the new code failed to import")
    line = source.splitlines().index("VERSION = = 'v2'") + 1
    assert f'app.py", line {line}' in server.log()
    assert "SyntaxError" in server.log()
    assert titled(server.pid, "worker") == workers
    assert one_shot(server.port or 0)["version"] == "v1"
    (tmp_path / "app.py").write_text(versioned_app("v3"))
    server.signal(signal.SIGHUP)
    server.wait_log("rolling restart to generation 2 done")
    wait_until(lambda: one_shot(server.port or 0)["version"] == "v3", 10, what="v3 served")


def test_preloaded_worker_killed_is_seen_and_replaced(start_server: Callable[..., Server], tmp_path: Path) -> None:
    server, _ = start_preloaded(start_server, tmp_path, "--workers", "2")
    victim, other = titled(server.pid, "worker")
    os.kill(victim, signal.SIGKILL)
    server.wait_log(f"[pid {victim}] exited (killed by SIGKILL)")
    wait_until(lambda: len(set(titled(server.pid, "worker")) - {victim, other}) == 1, 10, what="a replacement")
    server.wait_log("ready", count=3)
    replacement = (set(titled(server.pid, "worker")) - {other}).pop()
    assert f"[pid {replacement}] spawned (generation 1)" in server.log()
    assert "forking worker" not in server.log()  # it came from the template, not a direct fork


def test_primary_killed_takes_template_and_workers_with_it(start_server: Callable[..., Server], tmp_path: Path) -> None:
    server, _ = start_preloaded(start_server, tmp_path, "--workers", "2")
    children = titled(server.pid, "worker") + titled(server.pid, "template")
    assert len(children) == 3
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(5)
    # a zombie (of init) has exited: not alive
    wait_until(lambda: not any(alive(p) for p in children), 10, what="no orphan left")
    with socket.socket() as s:  # nobody keeps the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", server.port or 0))


def test_preload_with_broken_app_fails_at_start(start_server: Callable[..., Server], tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("import os\nraise RuntimeError('no config')\n")
    server = start_server("app:app", "--preload", env={"IMPORT_LOG": str(tmp_path / "imports.log")})
    assert server.wait_exit(20) == 3
    log = server.log()
    assert "Error: importing 'app' raised RuntimeError: no config" in log
    assert 'app.py", line 2' in log
