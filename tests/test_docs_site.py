"""The documentation site builds strictly, and what the docs say about flags is true.

- ``mkdocs build --strict``: every nav entry has its page, every page is in the
  nav, every link and anchor resolves (see ``validation`` in mkdocs.yml).
- The migration pages' flag tables name real flags: the uvicorn column is
  checked against uvicorn's own CLI, the gunicorn column against gunicorn's
  settings, the cluster-server column against ours.
- Every ``cluster-server ...`` command line in a shell block parses.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import click
import pytest
import yaml

from cluster_server._config import Config
from cluster_server._errors import ConfigError
from cluster_server.cli.main import cli
from tests.conftest import ROOT

DOCS = ROOT / "docs"

#: Pages the nav names that another branch writes. Every branch is merged now, so
#: none: a page missing from docs/ fails the strict build.
OTHER_BRANCHES: dict[str, str] = {}

#: Flags the docs may name before the branch adding them is merged: none left.
PENDING_FLAGS: dict[str, str] = {}


def nav_pages(nav: list[object]) -> list[str]:
    pages: list[str] = []
    for item in nav:
        if isinstance(item, str):
            pages.append(item)
        elif isinstance(item, dict):
            for value in item.values():
                pages.extend(nav_pages(value) if isinstance(value, list) else [value])
    return pages


def mkdocs_config() -> dict[str, object]:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert isinstance(config, dict)
    return config


def test_nav_pages_are_here_or_come_from_another_branch() -> None:
    pages = nav_pages(mkdocs_config()["nav"])  # type: ignore[arg-type]
    assert len(pages) == len(set(pages)), "a page is in the nav twice"
    for page in pages:
        assert (DOCS / page).is_file() or page in OTHER_BRANCHES, f"{page} is in the nav but nowhere"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs not installed (pip install .[docs])")
@pytest.mark.skipif(importlib.util.find_spec("material") is None, reason="mkdocs-material not installed")
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    config_file = ROOT / "mkdocs.yml"
    missing = [page for page in OTHER_BRANCHES if not (DOCS / page).exists()]
    if missing:
        docs = tmp_path / "docs"
        shutil.copytree(DOCS, docs)
        for page in missing:
            title = page.removesuffix(".md").replace("-", " ").capitalize()
            (docs / page).write_text(f"# {title}\n\nWritten on another branch ({OTHER_BRANCHES[page]}).\n")
        text = config_file.read_text()
        text = re.sub(r"(?m)^docs_dir: .*$", f"docs_dir: {docs}", text)
        config_file = tmp_path / "mkdocs.yml"
        config_file.write_text(text)
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config_file), "-d", str(site)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for svg in ("efficiency.svg", "openloop-p99.svg", "openloop-p999.svg", "restart-failed.svg"):
        assert (site / "img" / svg).is_file()
        assert f'src="../img/{svg}"' in (site / "benchmarks" / "index.html").read_text()


# -- flags named in the docs ---------------------------------------------------------


def our_flags() -> set[str]:
    flags = set()
    for param in cli.params:
        if isinstance(param, click.Option):
            flags.update(param.opts + param.secondary_opts)
    return flags


def uvicorn_flags() -> set[str]:
    from uvicorn.main import main

    return {o for p in main.params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts}


def gunicorn_flags() -> set[str]:
    from gunicorn.config import KNOWN_SETTINGS

    return {flag for setting in KNOWN_SETTINGS for flag in (setting.cli or [])}


def table_column_flags(page: str, header: str) -> list[str]:
    """Every ``--flag``/``-f`` in backticks in the column titled ``header`` of the page's tables."""
    flags: list[str] = []
    column = None
    for line in (DOCS / page).read_text().splitlines():
        if not line.startswith("|"):
            column = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if column is None:
            column = cells.index(header) if header in cells else -1
            continue
        if column < 0 or set(cells[0]) <= set("-: "):
            continue
        for code in re.findall(r"`([^`]+)`", cells[column]):
            flags.extend(w for w in code.split() if re.fullmatch(r"--?[a-z][a-z0-9_-]*", w))
    return flags


def _unknown(named: list[str], known: set[str]) -> list[str]:
    return sorted({f for f in named if f not in known and f not in PENDING_FLAGS})


@pytest.mark.parametrize(
    ("page", "peer", "peer_flags"),
    [
        ("migrating-from-uvicorn.md", "uvicorn", uvicorn_flags),
        ("migrating-from-gunicorn.md", "gunicorn", gunicorn_flags),
    ],
)
def test_migration_tables_name_real_flags(page: str, peer: str, peer_flags: Callable[[], set[str]]) -> None:
    theirs = table_column_flags(page, peer)
    ours = table_column_flags(page, "cluster-server")
    assert len(theirs) > 20 and len(ours) > 20, "the flag tables were not found"
    assert sorted(set(theirs) - peer_flags()) == [], f"not {peer} flags"
    assert _unknown(ours, our_flags()) == [], "not cluster-server flags"


def test_every_uvicorn_option_is_mapped() -> None:
    named = set(table_column_flags("migrating-from-uvicorn.md", "uvicorn"))
    from uvicorn.main import main

    long_flags = {p.opts[0] for p in main.params if isinstance(p, click.Option)} - {"--version", "--help"}
    assert sorted(long_flags - named) == []


def test_command_lines_in_the_docs_parse() -> None:
    """``cluster-server APP ...`` in shell blocks: every flag exists and every value is valid."""
    checked = 0
    for page in sorted(DOCS.glob("*.md")):
        text = re.sub(r"\\\n\s*", " ", page.read_text())  # join continued lines
        for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
            for line in block.splitlines():
                words = shlex.split(line, comments=True)
                while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                    words.pop(0)
                if not words or words[0] != "cluster-server" or len(words) < 2 or words[1].startswith("-"):
                    continue
                args = words[1:]
                if any(a in PENDING_FLAGS for a in args):
                    continue  # checked once the branch that adds the flag is merged
                ctx = cli.make_context("cluster-server", args)
                params = dict(ctx.params)
                try:
                    Config(app=params.pop("app"), **params)
                except ConfigError as exc:  # example paths (certificates, source dirs) need not exist here
                    if "no such file" not in str(exc) and "no such directory" not in str(exc):
                        raise
                checked += 1
    assert checked >= 5
