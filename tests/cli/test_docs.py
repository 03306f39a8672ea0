"""The generated CLI reference cannot drift from the option declarations."""

from __future__ import annotations

import re
import signal

import pytest

from cluster_server._config import env_vars, options
from cluster_server.cli import docs as _docs
from cluster_server.primary.loop import Primary
from cluster_server.primary.state import TRANSITIONS

from ..conftest import ROOT


def test_generated_docs_are_up_to_date() -> None:
    stale = [str(p.relative_to(ROOT)) for p in _docs.stale()]
    assert stale == [], f"{stale} out of date: run `python -m cluster_server.cli.docs` and commit the result"


def test_check_mode_reports_staleness(capsys: pytest.CaptureFixture[str]) -> None:
    assert _docs.main(["--check"]) == 0
    assert _docs.main(["--bogus"]) == 2


def test_every_option_and_env_var_is_documented() -> None:
    cli_md = _docs.render_cli_md()
    table = _docs.render_flag_table()
    for f, spec in options():
        flag = spec.flag or "--" + f.name.replace("_", "-")
        assert f"`{flag}" in cli_md and f"`{flag}" in table, flag
        for env in env_vars(f.name, spec):
            assert f"`{env}`" in cli_md
        assert spec.help.replace("|", "\\|") in cli_md


def test_readme_table_is_replaced_between_the_markers() -> None:
    text = f"before\n{_docs.BEGIN}\nold table\n{_docs.END}\nafter\n"
    new = _docs.render_readme(text)
    assert new.startswith(f"before\n{_docs.BEGIN}\n| Option |")
    assert new.endswith(f"|\n{_docs.END}\nafter\n")
    assert "old table" not in new
    assert _docs.render_readme(new) == new
    with pytest.raises(ValueError, match="no flag-table markers"):
        _docs.render_readme("no markers here")


def test_tables_have_the_same_number_of_cells_on_every_row() -> None:
    """An unescaped '|' would shift a row's cells on GitHub."""
    for text in (_docs.render_cli_md(), _docs.render_flag_table()):
        rows = [line for line in text.splitlines() if line.startswith("| ")]
        widths = {len(re.split(r"(?<!\\)\|", row)) for row in rows}
        assert len(widths) == 1, widths


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"^pip install -e '\.\[test\]' && (python -m pytest.*)$", readme, re.M)
    assert m, "the README's quick start names the test command"
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^pip install (--quiet )?-e '\.\[test\]'$", ci, re.M)
    assert re.search(rf"^\s*{re.escape(m.group(1))}\s*$", ci, re.M), "CI runs exactly the README's test command"


def test_index_state_table_matches_the_code() -> None:
    index = (ROOT / "docs" / "index.md").read_text()
    for state, moves in TRANSITIONS.items():
        m = re.search(rf"^\| `{state.value}` \| [^|]+ \| (.+) \|$", index, re.M)
        assert m, f"state {state.value} is not in docs/index.md's state table"
        documented = set(re.findall(r"`(\w+)`", m.group(1)))
        assert documented == {s.value for s in moves}, state


def test_index_documents_every_signal_the_primary_handles() -> None:
    index = (ROOT / "docs" / "index.md").read_text()
    names = {name[len("handle_") :].upper() for name in dir(Primary) if name.startswith("handle_")}
    handled = {n for n in names if hasattr(signal, "SIG" + n)} - {"CHLD"}
    assert {"TERM", "INT", "QUIT", "HUP", "TTIN", "TTOU"} <= handled
    documented = set(re.findall(r"^\| `([A-Z]+)` \|", index, re.M))
    assert handled == documented


def test_cli_reference_matches_help_output() -> None:
    """Every flag `cluster-server --help` prints is in docs/cli.md, and nothing else is."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "cluster_server", "--help"],
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
        check=True,
    ).stdout
    # the option column: lines that start (after indentation) with a flag, e.g. "--a / --no-a INTEGER"
    decls = [m.group(1) for m in re.finditer(r"(?m)^\s{2}(-[^\n]*?)(?:\s{2,}|$)", out)]
    help_flags = {f for d in decls for f in re.findall(r"--[a-z][a-z0-9-]*", d)} - {"--help", "--version"}
    cli_md = (ROOT / "docs" / "cli.md").read_text()
    doc_flags = set(re.findall(r"`(--[a-z][a-z0-9-]*)", cli_md)) | set(re.findall(r" / (--no-[a-z0-9-]*)", cli_md))
    doc_flags -= {"--help", "--version"}
    assert help_flags, out
    assert help_flags - doc_flags == set(), "in --help but not in docs/cli.md"
    assert doc_flags - help_flags == set(), "in docs/cli.md but not in --help"
