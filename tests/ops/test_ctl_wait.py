"""``ctl`` for scripts: ``reload/scale/restart --wait`` and the documented ``status --json`` schema."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cluster_server.cli import waiting

from ..conftest import ROOT, Server
from ..ops_helpers import ctl
from ..primary.test_restart import NO_PYC, RESTART_APP

DOC = ROOT / "docs" / "operations.md"
#: documented type -> the JSON types it allows
TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "list of strings": (list,),
    "list of integers": (list,),
    "list of objects": (list,),
}


def documented(title: str) -> dict[str, str]:
    """{key: type} from the table that follows ``**title**`` in docs/operations.md."""
    lines = DOC.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"**{title}**"))
    table: dict[str, str] = {}
    for line in lines[start + 1 :]:
        if not line.strip() and table:
            break
        m = re.match(r"\| `([a-z_]+)` \| ([a-z ]+) \|", line)
        if m:
            table[m[1]] = m[2]
    assert table, f"no table after **{title}**"
    return table


def check_schema(value: dict[str, Any], schema: dict[str, str], where: str) -> None:
    assert set(value) == set(schema), f"{where}: documented {sorted(schema)}, got {sorted(value)}"
    for key, kind in schema.items():
        base, _, null = kind.partition(" or ")
        v = value[key]
        if v is None:
            assert null == "null", f"{where}.{key} is null, documented as {kind}"
            continue
        assert isinstance(v, TYPES[base]) and not (base != "boolean" and isinstance(v, bool)), (where, key, v)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_wait_for_rolls_and_scaling_and_the_status_schema(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path], tmp_path: Path
) -> None:
    write_app("myapp", RESTART_APP)
    path = str(tmp_path / "ctl.sock")
    start_server("myapp:app", "--workers", "2", "--control-socket", path, env=NO_PYC).wait_ready()

    r = ctl(path, "reload", "--wait")
    assert "rolling restart to generation 2 completed: 2 worker(s) replaced" in r.stdout, r.stdout
    r = ctl(path, "restart", "1", "--wait")
    assert "rolling restart to generation 3 completed: 1 worker(s) replaced" in r.stdout, r.stdout
    assert ctl(path, "scale", "3", "--wait").stdout.splitlines()[-1] == "3 workers ready"
    assert ctl(path, "scale", "2", "--wait").stdout.splitlines()[-1] == "2 workers ready"

    # The documented schema, against the real output.
    st = json.loads(ctl(path, "status", "--json").stdout)
    check_schema(st, documented("Top level"), "status")
    assert st["workers"] and st["last_rolls"]
    for row in st["workers"]:
        check_schema(row, documented("A row of `workers`"), "workers[]")
    for roll in st["last_rolls"]:
        check_schema(roll, documented("A roll"), "last_rolls[]")
    assert [r["generation"] for r in st["last_rolls"]] == [2, 3]
    assert set(st["states"]) == {"booting", "ready", "draining", "backoff"}

    # Broken code: the roll fails, and --wait says why, exit status 1.
    write_app("myapp", RESTART_APP.replace('VERSION = "v1"', 'VERSION = "v2" +'))
    r = ctl(path, "reload", "--wait", check=False)
    assert r.returncode == 1
    assert re.search(r"Error: rolling restart to generation 4 failed: syntax error in .*myapp\.py:\d+", r.stderr)
    r = ctl(path, "scale", "3", "--wait", check=False)
    assert r.returncode == 1
    assert re.search(r"Error: worker 3 cannot start \(\d+ failures in a row\): syntax error in", r.stderr), r.stderr


def test_wait_gives_up_at_its_timeout() -> None:
    clock = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    ended = waiting.wait(lambda: {}, lambda st: None, 1.0, sleep=sleep, clock=lambda: clock[0])
    assert not ended.ok and "still not done after 1 s (--wait-timeout)" in ended.message
    assert 1.0 <= clock[0] < 1.0 + 2 * waiting.POLL
