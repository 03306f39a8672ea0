"""A real browser: headless Chromium renders the FastAPI example's /docs and /redoc.

"Renders" means the page's JavaScript ran and drew the API from the schema:
the rendered DOM has Swagger UI's title and one block per route, which exist
only after swagger-ui-bundle.js loaded and fetched /openapi.json through
cluster-server (the server's access log shows both). FastAPI loads those
assets from a CDN, which this machine cannot reach, so the example serves them
from the ``fastapi-offline`` package; without it the test is skipped.

The screenshot lands in test-artifacts/ (not committed). Chromium comes from
the distribution (``.ci/install-browser``); the test is skipped without it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, Server

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (run .ci/install-browser)")


def chromium(url: str, profile: Path, *args: str) -> str:
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # tests run as root in CI
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
        "--virtual-time-budget=8000",
        *args,
        url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_docs_and_redoc_render(start_server: Any, tmp_path: Path) -> None:
    pytest.importorskip("fastapi_offline", reason="/docs needs its assets served locally: pip install fastapi-offline")
    docs_server: Server = start_server("examples.fastapi_app.main:app", "--workers", "2").wait_ready()
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "fastapi-docs.png"
    shot.unlink(missing_ok=True)
    dom = chromium(docs_server.url + "/docs", tmp_path / "profile", "--dump-dom", f"--screenshot={shot}")
    assert 'class="title">cluster-server example' in dom, dom[:2000]
    for path in ("/", "/pid", "/items/{item_id}", "/items", "/slow", "/stream"):
        assert f'class="opblock-summary-path" data-path="{path}"' in dom, path
    log = docs_server.log()
    for fetched in ('GET /static-offline-docs/swagger-ui-bundle.js HTTP/1.1" 200', 'GET /openapi.json HTTP/1.1" 200'):
        assert fetched in log
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000  # a blank 1280x900 page is a few KiB

    dom = chromium(docs_server.url + "/redoc", tmp_path / "profile2", "--dump-dom")
    # ReDoc's heading and an operation, drawn from /openapi.json (the served HTML has neither)
    assert re.search(r"<h1[^>]*>cluster-server example", dom), dom[:2000]
    assert "/items/{item_id}" in dom
    assert docs_server.log().count('GET /openapi.json HTTP/1.1" 200') >= 2
