"""The development loop under --reload never hangs, and says little: real processes, a real client.

- an app that cannot start (syntax error, import error, lifespan failure) gets
  every request answered with a 500 showing why, until a save fixes it;
- a save logs at most two lines at INFO.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from ..conftest import Server, titled, wait_until
from .test_reload import versioned_app

StartServer = Callable[..., Server]
WriteApp = Callable[[str, str], Path]

SYNTAX_ERROR = "import os\n\ndef broken(:\n    pass\n"
IMPORT_ERROR = "import os\n\nraise RuntimeError('no database configured')\n"


def _get(server: Server, **headers: str) -> httpx.Response:
    return httpx.get(server.url + "/", headers=headers, timeout=10)


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("source", "shows"),
    [
        (SYNTAX_ERROR, ["app.py", "line 3", "def broken(:", "SyntaxError: invalid syntax"]),
        (IMPORT_ERROR, ['app.py", line 3', "RuntimeError: no database configured"]),
    ],
)
def test_an_app_that_cannot_start_gets_an_error_page_until_a_save_fixes_it(
    start_server: StartServer, write_app: WriteApp, source: str, shows: list[str]
) -> None:
    path = write_app("app", source)
    server = start_server("app:app", "--reload", "--workers", "2")
    server.wait_log("the app cannot start; every request gets a 500 page")
    server.wait_log("reload: watching")
    for _ in range(4):  # every request, whichever worker answers
        text = wait_until(lambda: _get(server), 10, what="an answer")
        assert text.status_code == 500 and text.headers["content-type"].startswith("text/plain")
        for part in shows:
            assert part in text.text, text.text
    page = _get(server, accept="text/html,application/xhtml+xml")
    assert page.status_code == 500 and page.headers["content-type"].startswith("text/html")
    assert "<pre>" in page.text and all(part.replace('"', "&quot;") in page.text for part in shows)
    path.write_text(versioned_app("v2"))
    server.wait_log("rolling restart to generation 2 done")  # both error pages replaced
    # (under the default `shared`, a drained worker may take a connection or two more
    # until its SIGTERM lands; then every answer is the new code's)
    wait_until(lambda: all(_get(server).text.startswith("v2 ") for _ in range(4)), 10, what="only v2 answers")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_lifespan_failure_shows_the_app_s_traceback_and_a_new_error_replaces_the_old(
    start_server: StartServer, write_app: WriteApp
) -> None:
    path = write_app("app", versioned_app("v1", startup_fails=True))
    server = start_server("app:app", "--reload", "--scheduling", "shared")
    server.wait_log("reload: watching")
    first = wait_until(lambda: _get(server), 10, what="an answer")
    assert first.status_code == 500 and "lifespan startup of app:app failed" in first.text, first.text
    path.write_text(IMPORT_ERROR)  # still broken, differently: the page follows
    wait_until(lambda: "no database configured" in _get(server).text, 15, what="the new error")
    assert _get(server).status_code == 500


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_broken_save_keeps_the_running_code_serving(start_server: StartServer, write_app: WriteApp) -> None:
    """Once the app serves, a broken save changes nothing that serves: no error page replaces it."""
    path = write_app("app", versioned_app("v1"))
    server = start_server("app:app", "--reload").wait_ready()
    server.wait_log("reload: watching")
    path.write_text(SYNTAX_ERROR)
    server.wait_log("rolling restart to generation 2 stopped")
    answer = _get(server)
    assert answer.status_code == 200 and answer.text.startswith("v1 ")


def test_no_error_page_under_production_flags(start_server: StartServer, write_app: WriteApp) -> None:
    write_app("app", SYNTAX_ERROR)
    server = start_server("app:app", "--workers", "2")
    assert server.wait_exit(20) == 3
    assert "500" not in server.log()
    with pytest.raises(httpx.ConnectError):
        _get(server)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_save_logs_at_most_two_lines(start_server: StartServer, write_app: WriteApp) -> None:
    path = write_app("app", versioned_app("v1"))
    server = start_server("app:app", "--reload", "--workers", "2").wait_ready()
    server.wait_log("reload: watching")
    server.wait_log("dependency modules")  # the dependency template is built once, after the start
    before = len(server.log().splitlines())
    old = set(titled(server.pid, "worker"))
    path.write_text(versioned_app("v2"))
    server.wait_log("rolling restart to generation 2 done")
    wait_until(lambda: len(titled(server.pid, "worker")) == 2, 10, what="the old workers gone")
    assert _get(server).text.startswith("v2 ") and not old & set(titled(server.pid, "worker"))
    new = [line for line in server.log().splitlines()[before:] if " INFO " in line and '"GET /' not in line]
    assert len(new) <= 2, new
    assert "reload: app.py changed" in new[0] and "rolling restart to generation 2 done" in new[1]
