"""benchmarks/charts.py: bench.py's JSON in, SVG charts out."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from benchmarks import charts
from tests.conftest import ROOT

SVG = "{http://www.w3.org/2000/svg}"


def row(server: str, workers: int, rps: float, p99: float, status: str = "ok") -> dict[str, Any]:
    load = {"requests_per_s": rps, "p99_ms": p99} if status == "ok" else None
    return {"scenario": "throughput", "server": server, "workers": workers, "status": status, "load": load}


def payload(rows: list[dict[str, Any]], scenario: str = "throughput") -> dict[str, Any]:
    return {
        "scenario": scenario,
        "started_at": 1796000000.0,
        "environment": {"cpu_count": 2, "python": "3.11.7", "load_tool": "wrk"},
        "config": {"tool": "wrk", "threads": 2, "connections": 64, "duration": 5, "app": "benchmarks.hello:app"},
        "results": rows,
    }


def bars(svg: str) -> list[tuple[str, float]]:
    """(tooltip, height) of every bar."""
    root = ET.fromstring(svg)
    return [
        (rect.find(f"{SVG}title").text or "", float(rect.get("height", 0)))  # type: ignore[union-attr]
        for rect in root.iter(f"{SVG}rect")
        if rect.find(f"{SVG}title") is not None
    ]


def test_throughput_charts_have_a_bar_per_measured_row(tmp_path: Path) -> None:
    rows = [
        row("cluster-server", 1, 30000, 5.0),
        row("uvicorn", 1, 15000, 10.0),
        row("cluster-server", 2, 60000, 4.0),
        row("uvicorn", 2, 0, 0, status="error"),
    ]
    src = tmp_path / "t.json"
    src.write_text(json.dumps(payload(rows)))
    written = charts.render([src], tmp_path / "img")
    assert sorted(p.name for p in written) == ["latency-p99.svg", "throughput.svg"]

    svg = (tmp_path / "img" / "throughput.svg").read_text()
    got = dict(bars(svg))
    assert set(got) == {
        "cluster-server, 1 worker: 30000 requests / s",
        "uvicorn, 1 worker: 15000 requests / s",
        "cluster-server, 2 workers: 60000 requests / s",
    }
    # Heights are proportional to the values (same axis).
    one = got["cluster-server, 1 worker: 30000 requests / s"]
    assert got["uvicorn, 1 worker: 15000 requests / s"] == pytest.approx(one / 2, abs=0.2)
    assert got["cluster-server, 2 workers: 60000 requests / s"] == pytest.approx(one * 2, abs=0.2)
    assert "not shown: uvicorn x2 (error)" in svg
    assert "2 CPUs" in svg and "wrk 2 threads, 64 connections" in svg

    latency = dict(bars((tmp_path / "img" / "latency-p99.svg").read_text()))
    assert latency["uvicorn, 1 worker: 10 milliseconds"] == pytest.approx(
        2 * latency["cluster-server, 1 worker: 5 milliseconds"], abs=0.2
    )


def test_spread_chart_sorts_each_group_busiest_first(tmp_path: Path) -> None:
    rows = [
        {"server": "cluster-server", "policy": "shared", "workers": 3, "status": "ok", "per_worker": [10, 40, 20]},
        {"server": "cluster-server", "policy": "round-robin", "workers": 3, "status": "ok", "per_worker": [23, 24, 23]},
    ]
    (svg,) = charts.chart_spread(payload(rows, "spread")).values()
    got = bars(svg)
    shared = [h for title, h in got if "shared (3 workers)" in title]
    assert len(got) == 6 and len(shared) == 3
    assert shared == sorted(shared, reverse=True)


#: the charts docs/benchmarks.md shows, and the committed runs they are drawn from
COMMITTED = ("efficiency-2w.json", "openloop-2w.json", "restart-2w-4w.json")


@pytest.mark.parametrize("name", COMMITTED)
def test_output_is_deterministic_and_the_committed_charts_are_current(tmp_path: Path, name: str) -> None:
    source = ROOT / "benchmarks" / "results" / name
    first = charts.render([source], tmp_path / "a")
    second = charts.render([source], tmp_path / "b")
    assert first
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes()
        committed = ROOT / "docs" / "img" / a.name
        assert committed.read_bytes() == a.read_bytes(), f"regenerate {committed}: python benchmarks/charts.py {source}"


def test_efficiency_openloop_and_restart_charts(tmp_path: Path) -> None:
    def ok(server: str, **fields: Any) -> dict[str, Any]:
        return {"server": server, "workers": 2, "status": "ok", **fields}

    eff = [ok("uvicorn", mode="close", ratio=1.0), ok("cluster-server", mode="close", ratio=0.5)]
    got = dict(bars(charts.chart_efficiency(payload(eff, "efficiency"))["efficiency.svg"]))
    assert got["cluster-server (default), close (2 workers): 0.5 x uvicorn"] == pytest.approx(
        got["uvicorn, close (2 workers): 1 x uvicorn"] / 2, abs=0.2
    )
    ol = [ok("uvicorn", variant="block", percent=40, percentiles={"99": 20.0, "99.9": 30.0})]
    drawn = charts.chart_openloop(payload(ol, "openloop"))
    assert sorted(drawn) == ["openloop-p99.svg", "openloop-p999.svg"]
    assert [t for t, _ in bars(drawn["openloop-p999.svg"])] == ["uvicorn, block 40%: 30 milliseconds"]
    failed = {"non_2xx": 1, "socket_errors": {"read": 4, "connect": 0}}
    rs = [ok("uvicorn", mode="close", load=failed), ok("cluster-server", mode="close", load={"non_2xx": 0})]
    got = dict(bars(charts.chart_restart(payload(rs, "restart"))["restart-failed.svg"]))
    assert set(got) == {
        "uvicorn, close (2 workers): 5 failed requests",
        "cluster-server (default), close (2 workers): 0 failed requests",
    }
    assert got["uvicorn, close (2 workers): 5 failed requests"] > 0
    assert got["cluster-server (default), close (2 workers): 0 failed requests"] == 0


def test_mixed_scenarios_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(payload([])))
    (tmp_path / "b.json").write_text(json.dumps(payload([], "spread")))
    with pytest.raises(SystemExit, match="mix scenarios"):
        charts.render([tmp_path / "a.json", tmp_path / "b.json"], tmp_path)


@pytest.mark.parametrize(("top", "expected"), [(0.0, [0.0, 1.0]), (9.0, [0, 2, 4, 6, 8, 10]), (38000, None)])
def test_nice_ticks(top: float, expected: list[float] | None) -> None:
    ticks = charts.nice_ticks(top)
    if expected is not None:
        assert ticks == expected
    assert ticks[0] == 0 and ticks[-1] >= top and len(ticks) <= 8


def test_markdown_tables_carry_the_numbers_the_docs_quote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def ok(server: str, **fields: Any) -> dict[str, Any]:
        return {"server": server, "workers": 2, "status": "ok", **fields}

    eff = [
        ok("uvicorn", mode="close", ratio=1.0, details={"per_cpu_s": 10000.0, "main_share": 0.0}),
        ok("cluster-server:round-robin", mode="close", ratio=0.85, details={"per_cpu_s": 8500.0, "main_share": 0.2}),
    ]
    table = charts.table_efficiency(payload(eff, "efficiency"))
    assert "| cluster-server:round-robin | 0.85x (8,500; 20.0%) |" in table
    runs = [{"rate": 900}, {"rate": 1000}, {"rate": 1100}]
    ol = [
        ok(
            "cluster-server",
            variant="cpu",
            percent=70,
            percentiles={"50": 2.04, "99": 8.5, "99.9": 1600.0},
            details={"runs": runs},
        )
    ]
    table = charts.table_openloop(payload(ol, "openloop"))
    assert "cpu 70% (1,000/s)" in table and "| cluster-server (default) | 2.0 / 8.5 / 1.60 s |" in table
    rs = [
        ok(
            "gunicorn",
            mode="close",
            load={"requests": 5000, "non_2xx": 1, "socket_errors": {"read": 3}},
            per_second=[900, 400],
        )
    ]
    assert "| gunicorn | 2 | close | 4 / 5,000 | 400 |" in charts.table_restart(payload(rs, "restart"))

    source = tmp_path / "r.json"
    source.write_text(json.dumps(payload(rs, "restart")))
    assert charts.main(["--markdown", str(source)]) == 0
    assert "failed / requests" in capsys.readouterr().out
    source.write_text(json.dumps(payload([], "memory")))
    with pytest.raises(SystemExit, match="no table for scenario 'memory'"):
        charts.main(["--markdown", str(source)])
