"""Template processes: who owns the workers, what happens when a template dies,
what a dependency template imports (real processes), and the launcher's choices
(a fake primary)."""

from __future__ import annotations

import os
import signal
import socket
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from cluster_server._config import Config
from cluster_server._errors import AppLoadError
from cluster_server.primary.loop import Primary
from cluster_server.templates.launcher import Template, TemplateLauncher
from cluster_server.templates.process import load_with_traceback, short_traceback
from cluster_server.wire.channel import Channel

from ..conftest import ROOT, Server, titled, wait_until
from .test_reload import one_shot, versioned_app


def socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


# -- real processes --------------------------------------------------------------


def test_template_killed_workers_keep_serving_and_a_new_one_forks(
    start_server: Callable[..., Server], write_app: Callable[..., Path]
) -> None:
    write_app("app", versioned_app("v1"))
    server = start_server("app:app", "--preload", "--workers", "2").wait_ready()
    [template] = titled(server.pid, "template")
    workers = titled(server.pid, "worker")
    os.kill(template, signal.SIGKILL)
    server.wait_log("exited (killed by SIGKILL); building a new one")
    wait_until(lambda: titled(server.pid, "template") not in ([], [template]), 10, what="a new template")
    server.wait_log("ready: imported the app", count=2)
    assert titled(server.pid, "worker") == workers  # they never depended on the template
    for _ in range(10):
        assert one_shot(server.port or 0)[0] == "v1"
    server.signal(signal.SIGTTIN)  # one more worker, forked by the new template
    wait_until(lambda: len(titled(server.pid, "worker")) == 3, 10, what="a third worker")
    server.wait_log("ready", count=6)  # 2 templates, 3 workers, "all 2 workers ready"
    assert "directly" not in server.log()


def test_template_workers_hold_only_their_own_channel(
    start_server: Callable[..., Server], write_app: Callable[..., Path]
) -> None:
    path = write_app("app", versioned_app("v1"))
    server = start_server("app:app", "--reload", "--log-level", "debug").wait_ready()  # debug: "spawned" lines
    server.wait_log("reload: watching")
    server.wait_log("dependency modules")
    path.write_text(versioned_app("v2"))  # the new worker comes from the template
    server.wait_log("rolling restart to generation 2 done")
    [template] = titled(server.pid, "template")
    [watcher] = titled(server.pid, "reload watcher")
    [worker] = [p for p in titled(server.pid, "worker") if f"[pid {p}] spawned (generation 2)" in server.log()]
    primary, tmpl, work, watch = (socket_inodes(p) for p in (server.pid, template, worker, watcher))
    listeners = tmpl & primary
    assert len(listeners) == 1  # the template kept the listening socket, and nothing else of the primary's
    assert work & primary <= listeners  # no other worker's channel, no primary end
    assert work & tmpl <= listeners  # not the template's channel
    assert not work & watch
    assert not watch & primary  # the watcher serves nothing and holds no channel but its own


def test_dependency_change_rebuilds_the_template_and_reloads(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    src, deps = tmp_path / "src", tmp_path / "deps"
    src.mkdir()
    deps.mkdir()
    (deps / "thirdparty.py").write_text("GREETING = 'hello'\n")
    source = versioned_app("v1").replace("VERSION = 'v1'", "from thirdparty import GREETING as VERSION")
    (src / "app.py").write_text(source)
    server = start_server(
        "app:app",
        "--reload",
        "--reload-dir",
        str(src),
        "--app-dir",
        str(src),
        env={"PYTHONPATH": os.pathsep.join([str(ROOT), str(deps)])},
    ).wait_ready()
    server.wait_log("reload: watching")
    server.wait_log("dependency modules")
    assert one_shot(server.port or 0)[0] == "hello"
    (deps / "thirdparty.py").write_text("GREETING = 'bonjour'\n")  # an installed package changes
    server.wait_log("reload: dependencies changed (")
    wait_until(lambda: one_shot(server.port or 0)[0] == "bonjour", 15, what="the new dependency served")
    assert "thirdparty.py changed (a dependency); rolling to a new generation" in server.log()


def test_a_dependency_that_starts_a_thread_disables_the_template(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    src, deps = tmp_path / "src", tmp_path / "deps"
    src.mkdir()
    deps.mkdir()
    (deps / "threaded.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n"
    )
    (src / "app.py").write_text("import threaded\n" + versioned_app("v1"))
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(deps)])}
    server = start_server("app:app", "--reload", "--reload-dir", str(src), "--app-dir", str(src), env=env)
    server.wait_ready()
    server.wait_log("workers are forked directly instead")
    assert "importing 'threaded' started a thread" in server.log()
    server.wait_log("reload: watching")
    (src / "app.py").write_text("import threaded\n" + versioned_app("v2"))
    wait_until(lambda: one_shot(server.port or 0)[0] == "v2", 15, what="v2 served by a directly forked worker")


# -- the launcher's decisions, with a fake primary -----------------------------------


def fake_template(launcher: TemplateLauncher, generation: int) -> Template:
    t = Template(launcher, "preload", generation)
    t.state = "ready"
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.close()
    t.channel = Channel(a)
    return t


def test_launcher_picks_the_template_of_a_generation_and_retires_unused_ones() -> None:
    primary = Primary(Config(app="app:app", workers=2, preload=True), [])
    launcher = TemplateLauncher(primary.config, "preload")
    launcher.primary = primary  # what attach() does, without building a template
    t1, t3 = fake_template(launcher, 1), fake_template(launcher, 3)
    launcher.templates = [t1, t3]
    assert launcher.template_for(1) is t1
    assert launcher.template_for(2) is t1  # a failed roll's generation 2 never got its own
    assert launcher.template_for(3) is t3
    assert launcher.template_for(7) is t3
    launcher.retire()
    assert launcher.templates == [t1, t3]  # both slots still run generation 1
    primary.slots[1].generation = 3
    launcher.retire()
    assert launcher.templates == [t1, t3]  # slot 2 still does
    primary.slots[2].generation = 3
    launcher.retire()
    assert launcher.templates == [t3] and t1.stopping and t1.channel is None
    t3.state = "gone"
    assert launcher.template_for(3) is None  # none ready: the launcher forks directly
    t3.stop()


def test_launcher_defers_a_preload_roll_until_the_new_template_is_ready() -> None:
    primary = Primary(Config(app="app:app", workers=1, preload=True), [])
    launcher = TemplateLauncher(primary.config, "preload")
    launcher.primary = primary  # what attach() does, without building a template
    started: list[int] = []

    def build(generation: int) -> None:  # what build() does, without a process
        started.append(generation)
        launcher.building = Template(launcher, "preload", generation)

    launcher.build = build  # type: ignore[method-assign]
    primary.add_component(launcher)
    assert primary.roll("SIGHUP") is False  # not yet: the template imports the new code first
    assert started == [2] and primary.generation == 1 and primary.roll_state is None
    assert launcher.roll_wanted is not None and launcher.roll_wanted[:2] == ("SIGHUP", None)
    assert primary.roll("one slot", [1]) is False  # still building: a partial roll joins the full one
    assert started == [2] and launcher.roll_wanted[:2] == ("one slot", None)


# -- load errors -----------------------------------------------------------------------


def test_short_traceback_shows_the_apps_frames_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "badapp.py").write_text(
        textwrap.dedent("""
        import os

        def build():
            return {}["missing"]

        app = build()
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AppLoadError) as info:
        load_with_traceback(Config(app="badapp:app", app_dir=str(tmp_path)))
    text = str(info.value)
    assert text.startswith("importing 'badapp' raised KeyError")
    assert 'badapp.py", line 7, in <module>' in text
    assert 'badapp.py", line 5, in build' in text
    assert "importlib" not in text and "cluster_server" not in text
    try:
        compile("def f(:\n    pass\n", str(tmp_path / "x.py"), "exec")
    except SyntaxError as exc:
        short = short_traceback(exc)
    assert 'x.py", line 1' in short and "^" in short and short.endswith("SyntaxError: invalid syntax")
