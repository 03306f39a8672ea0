#!/usr/bin/env python3
"""Render the JSON that ``bench.py ... --json`` writes as SVG charts for the docs.

    python benchmarks/bench.py throughput --workers 1,2 --json benchmarks/results/throughput.json
    python benchmarks/charts.py benchmarks/results/throughput.json            # -> docs/img/*.svg
    python benchmarks/charts.py a.json b.json --out docs/img                  # rows of both, merged

One chart set per scenario (the ``scenario`` key of the JSON):

- ``throughput``: ``throughput.svg`` (req/s per worker count, a bar per server) and
  ``latency-p99.svg`` (p99 latency, same layout);
- ``spread``: ``spread.svg``, connections (or requests) per worker, a group per
  policy/server, workers sorted busiest first. Each row needs ``per_worker``: a list of
  counts, and is labelled by its ``policy`` (else ``server``) and ``workers``;
- ``efficiency``: ``efficiency.svg``, requests per CPU-second relative to uvicorn, a
  group per load mode, a bar per server;
- ``openloop``: ``openloop-p99.svg`` and ``openloop-p999.svg``, latency at fixed offered
  rates, a group per variant and load;
- ``restart``: ``restart-failed.svg``, failed requests across rolling restarts, a group
  per load mode and worker count.

Rows whose ``status`` is not ``ok`` are left out, and listed under the chart.

The SVG is written by hand (about 150 lines here) rather than with matplotlib: no
plotting stack to install for the docs, text stays selectable text, and the same
input gives byte-identical files, so a regenerated chart shows up in a diff only
when a number changed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "img"

#: one colour per series, in order (Okabe-Ito: tells apart for colour-blind readers)
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
#: fixed colours for the servers bench.py knows, so every chart agrees
SERVER_COLOURS = {"cluster-server": "#0072B2", "uvicorn": "#E69F00", "gunicorn": "#009E73", "granian": "#CC79A7"}
#: for ``cluster-server:POLICY`` rows, in order met (none of SERVER_COLOURS)
POLICY_COLOURS = ("#56B4E9", "#D55E00", "#000000", "#F0E442", "#999999")

WIDTH, PLOT_HEIGHT = 760, 244
LEFT, RIGHT, TOP = 70, 20, 64
FONT = "font-family='system-ui, -apple-system, Segoe UI, Roboto, sans-serif'"


@dataclass
class Series:
    name: str
    values: list[float | None]  # one per group; None: not measured
    colour: str


def nice_ticks(top: float, count: int = 5) -> list[float]:
    """0 and round steps (1, 2, 2.5 or 5 times a power of ten) up to at least ``top``."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    n = math.ceil(top / step - 1e-9)
    return [round(i * step, 10) for i in range(n + 1)]


def short(value: float) -> str:
    """35757 -> '35.8k'; 4.9 -> '4.9'."""
    if value >= 1000:
        text = f"{value / 1000:.1f}".rstrip("0").rstrip(".")
        return f"{text}k"
    if value >= 100 or value == int(value):
        return f"{value:.0f}"
    return f"{value:.2g}" if value < 1 else f"{value:.1f}"


def grouped_bars(
    title: str,
    subtitle: str,
    groups: Sequence[str],
    series: Sequence[Series],
    unit: str,
    notes: Sequence[str] = (),
    fmt: Callable[[float], str] = short,
    cap: float | None = None,
) -> str:
    """A grouped bar chart: one group per x label, one bar per series in each group.
    ``fmt`` writes the value above each bar; a bar over ``cap`` is cut there (its label
    still says its value), so that one outlier does not flatten the rest."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, PLOT_HEIGHT
    top = max((v for s in series for v in s.values if v is not None), default=0.0)
    ticks = nice_ticks(min(top, cap if cap is not None else top) * 1.08)
    y_max = ticks[-1]
    if top > y_max:
        notes = [*notes, f"bars over {short(y_max)} {unit} are cut at the top (their label says their value)"]
    notes = list(notes[:2])
    legend = _legend_rows(series)
    height = TOP + plot_h + 58 + 16 * len(notes) + 20 * (len(legend) - 1)

    def y(v: float) -> float:
        return TOP + plot_h - (v / y_max) * plot_h

    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{height}' "
        f"viewBox='0 0 {WIDTH} {height}' role='img' aria-label='{escape(title, quote=True)}' {FONT}>",
        f"<rect width='{WIDTH}' height='{height}' fill='#ffffff'/>",
        f"<text x='{LEFT}' y='24' font-size='16' font-weight='600' fill='#111'>{escape(title)}</text>",
        f"<text x='{LEFT}' y='44' font-size='12' fill='#555'>{escape(subtitle)}</text>",
    ]
    for t in ticks:
        ty = y(t)
        out.append(
            f"<line x1='{LEFT}' y1='{ty:.1f}' x2='{WIDTH - RIGHT}' y2='{ty:.1f}' stroke='#e3e3e3' stroke-width='1'/>"
        )
        out.append(
            f"<text x='{LEFT - 8}' y='{ty + 4:.1f}' font-size='11' fill='#555' text-anchor='end'>{short(t)}</text>"
        )
    out.append(
        f"<text x='16' y='{TOP + plot_h / 2:.1f}' font-size='12' fill='#333' text-anchor='middle' "
        f"transform='rotate(-90 16 {TOP + plot_h / 2:.1f})'>{escape(unit)}</text>"
    )

    group_w = plot_w / max(len(groups), 1)
    bar_w = min(48.0, group_w * 0.8 / max(len(series), 1))
    for gi, label in enumerate(groups):
        x0 = LEFT + gi * group_w + (group_w - bar_w * len(series)) / 2
        for si, s in enumerate(series):
            value = s.values[gi]
            if value is None:
                continue
            bx, by = x0 + si * bar_w, y(min(value, y_max))
            out.append(
                f"<rect x='{bx + 1:.1f}' y='{by:.1f}' width='{bar_w - 2:.1f}' height='{TOP + plot_h - by:.1f}' "
                f"fill='{s.colour}'><title>{escape(s.name)}, {escape(label)}: {value:g} {escape(unit)}</title></rect>"
            )
            out.append(
                f"<text x='{bx + bar_w / 2:.1f}' y='{by - 4:.1f}' font-size='10' fill='#333' "
                f"text-anchor='middle'>{fmt(value)}</text>"
            )
        out.append(
            f"<text x='{LEFT + (gi + 0.5) * group_w:.1f}' y='{TOP + plot_h + 18:.1f}' font-size='12' fill='#333' "
            f"text-anchor='middle'>{escape(label)}</text>"
        )
    base = TOP + plot_h
    out.append(f"<line x1='{LEFT}' y1='{base}' x2='{WIDTH - RIGHT}' y2='{base}' stroke='#888' stroke-width='1'/>")

    # Legend, in as many rows as it takes, under the axis labels.
    ly = TOP + plot_h + 44
    for row in legend:
        lx = LEFT
        for s in row:
            out.append(f"<rect x='{lx}' y='{ly - 10}' width='12' height='12' fill='{s.colour}'/>")
            out.append(f"<text x='{lx + 18}' y='{ly}' font-size='12' fill='#333'>{escape(s.name)}</text>")
            lx += _legend_width(s)
        ly += 20
    ly -= 20
    for i, note in enumerate(notes):
        out.append(f"<text x='{LEFT}' y='{ly + 22 + 16 * i}' font-size='11' fill='#777'>{escape(note)}</text>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _legend_width(s: Series) -> int:
    return 30 + 7 * len(s.name)


def _legend_rows(series: Sequence[Series]) -> list[list[Series]]:
    """The legend's entries, wrapped to the chart's width."""
    rows: list[list[Series]] = [[]]
    used = 0
    for s in series:
        if rows[-1] and LEFT + used + _legend_width(s) > WIDTH - RIGHT:
            rows.append([])
            used = 0
        rows[-1].append(s)
        used += _legend_width(s)
    return rows


# --------------------------------------------------------------------------- scenarios


def _subtitle(payload: dict[str, Any]) -> str:
    env, cfg = payload.get("environment", {}), payload.get("config", {})
    parts = [f"{env.get('cpu_count', '?')} CPUs", f"Python {env.get('python', '?')}"]
    tool = cfg.get("tool") or env.get("load_tool")
    if payload.get("scenario") == "openloop":
        parts.append(f"wrk2 -R, {cfg.get('connections', '?')} connections")
    elif tool == "wrk":
        parts.append(f"wrk {cfg.get('threads', '?')} threads, {cfg.get('connections', '?')} connections")
    elif tool:
        parts.append(f"{tool} load loop (client-bound)")
    if cfg.get("duration"):
        parts.append(f"{cfg['duration']} s runs")
    if isinstance(cfg.get("repeat"), int) and cfg["repeat"] > 1:
        parts.append(f"median of {cfg['repeat']} rounds")
    if cfg.get("app") and cfg["app"] != "benchmarks.hello:app":  # (the default needs no room)
        parts.append(str(cfg["app"]))
    started = payload.get("started_at")
    if isinstance(started, int | float):
        parts.append(datetime.datetime.fromtimestamp(started, datetime.UTC).strftime("%Y-%m-%d"))
    return " · ".join(parts)


def _left_out(rows: list[dict[str, Any]]) -> list[str]:
    bad = [r for r in rows if r.get("status") != "ok"]
    if not bad:
        return []
    return ["not shown: " + "; ".join(f"{r.get('server')} x{r.get('workers')} ({r.get('status')})" for r in bad)]


def _server_order(rows: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for r in rows:
        if r.get("server") not in names:
            names.append(r["server"])
    return names


def chart_throughput(payload: dict[str, Any]) -> dict[str, str]:
    rows = payload["results"]
    ok = [r for r in rows if r.get("status") == "ok" and r.get("load")]
    workers = sorted({int(r["workers"]) for r in ok})
    groups = [f"{w} worker{'s' if w != 1 else ''}" for w in workers]
    servers = _server_order(ok)

    def series_of(metric: Callable[[dict[str, Any]], float]) -> list[Series]:
        out = []
        for i, name in enumerate(servers):
            by_workers = {int(r["workers"]): metric(r["load"]) for r in ok if r["server"] == name}
            colour = SERVER_COLOURS.get(name, PALETTE[i % len(PALETTE)])
            out.append(Series(name, [by_workers.get(w) for w in workers], colour))
        return out

    subtitle, notes = _subtitle(payload), _left_out(rows)
    return {
        "throughput.svg": grouped_bars(
            "Throughput: requests per second (higher is better)",
            subtitle,
            groups,
            series_of(lambda load: float(load["requests_per_s"])),
            "requests / s",
            notes,
        ),
        "latency-p99.svg": grouped_bars(
            "Latency: 99th percentile (lower is better)",
            subtitle,
            groups,
            series_of(lambda load: float(load["p99_ms"])),
            "milliseconds",
            notes,
        ),
    }


def chart_spread(payload: dict[str, Any]) -> dict[str, str]:
    rows = payload["results"]
    ok = [r for r in rows if r.get("status") == "ok" and isinstance(r.get("per_worker"), list)]
    groups = [f"{r.get('policy') or r['server']} ({r['workers']} workers)" for r in ok]
    counts = [sorted((float(c) for c in r["per_worker"]), reverse=True) for r in ok]
    most = max((len(c) for c in counts), default=0)
    series = [
        Series(
            "busiest worker" if k == 0 else f"worker #{k + 1}",
            [c[k] if k < len(c) else None for c in counts],
            PALETTE[k % len(PALETTE)],
        )
        for k in range(most)
    ]
    return {
        "spread.svg": grouped_bars(
            "Spread: work per worker, busiest first (even is better)",
            _subtitle(payload),
            groups,
            series,
            str(payload.get("config", {}).get("unit", "count")),
            _left_out(rows),
        )
    }


def _label(server: str) -> str:
    """``cluster-server`` alone is the default policy; ``cluster-server:POLICY`` names one."""
    return "cluster-server (default)" if server == "cluster-server" else server


def _bars_by_server(
    ok: list[dict[str, Any]], group_of: Callable[[dict[str, Any]], str], value: Callable[..., Any]
) -> tuple[list[str], list[Series]]:
    """The groups (``group_of`` each row, in the order met), and one series per server (in the
    order met) with one value per group (None: not measured)."""
    groups = list(dict.fromkeys(group_of(r) for r in ok))
    out = []
    others = iter(POLICY_COLOURS * 2)
    for name in _server_order(ok):
        by_group = {group_of(r): value(r) for r in ok if r["server"] == name}
        colour = SERVER_COLOURS.get(name) or next(others)
        out.append(Series(_label(name), [by_group.get(g) for g in groups], colour))
    return groups, out


def _mode_and_workers(r: dict[str, Any]) -> str:
    return f"{r['mode']} ({r['workers']} workers)"


def _failed(load: dict[str, Any]) -> int:
    """Failed requests of a run: non-2xx answers and socket errors."""
    return int(load.get("non_2xx", 0)) + sum(int(v) for v in load.get("socket_errors", {}).values())


def chart_efficiency(payload: dict[str, Any]) -> dict[str, str]:
    """``bench.py efficiency``: requests per CPU-second relative to uvicorn, per load mode."""
    rows = payload["results"]
    ok = [r for r in rows if r.get("status") == "ok" and r.get("ratio") is not None]
    groups, series = _bars_by_server(ok, _mode_and_workers, lambda r: r["ratio"])
    return {
        "efficiency.svg": grouped_bars(
            "Requests per CPU-second, relative to uvicorn (higher is better)",
            _subtitle(payload),
            groups,
            series,
            "x uvicorn",
            _left_out(rows),
            fmt=lambda v: f"{v:.2f}",
        )
    }


def chart_openloop(payload: dict[str, Any]) -> dict[str, str]:
    """``bench.py openloop``: p99 and p99.9 latency per variant and offered load."""
    rows = payload["results"]
    ok = [r for r in rows if r.get("status") == "ok" and r.get("percentiles")]
    out = {}
    for name, key in (("openloop-p99.svg", "99"), ("openloop-p999.svg", "99.9")):
        groups, series = _bars_by_server(
            ok, lambda r: f"{r['variant']} {r['percent']}%", lambda r, k=key: r["percentiles"].get(k)
        )
        values = sorted(v for s in series for v in s.values if v is not None)
        cap = 4 * values[len(values) // 2] if values else None  # an overloaded server's seconds
        out[name] = grouped_bars(
            f"Open loop, a new connection per request: p{key} latency (lower is better)",
            _subtitle(payload),
            groups,
            series,
            "milliseconds",
            _left_out(rows),
            fmt=lambda v: f"{v:.1f}" if v < 10 else (f"{v:.0f}" if v < 1000 else short(v)),
            cap=cap,
        )
    return out


def chart_restart(payload: dict[str, Any]) -> dict[str, str]:
    """``bench.py restart``: failed requests (errors + non-2xx) across the rolling restarts."""
    rows = payload["results"]
    ok = [r for r in rows if r.get("status") == "ok" and r.get("load")]
    groups, series = _bars_by_server(ok, _mode_and_workers, lambda r: _failed(r["load"]))
    return {
        "restart-failed.svg": grouped_bars(
            "Failed requests across two rolling restarts under load (lower is better)",
            _subtitle(payload),
            groups,
            series,
            "failed requests",
            _left_out(rows),
        )
    }


# --------------------------------------------------------------------------- tables


def _md(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, the first column left-aligned and the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else (f"{value:.1f}" if value < 1000 else f"{value / 1000:.2f} s")


def table_efficiency(payload: dict[str, Any]) -> str:
    """Ratio to uvicorn, requests per CPU-second and the main process's share of the CPU, per mode."""
    ok = [r for r in payload["results"] if r.get("status") == "ok" and r.get("ratio") is not None]
    modes = list(dict.fromkeys(r["mode"] for r in ok))
    cells: dict[str, dict[str, str]] = {}
    for r in ok:
        d = r["details"]
        cells.setdefault(_label(r["server"]), {})[r["mode"]] = (
            f"{r['ratio']:.2f}x ({d['per_cpu_s']:,.0f}; {100 * d.get('main_share', 0):.1f}%)"
        )
    header = ["server", *(f"{m}: x uvicorn (req/CPU-s; main process)" for m in modes)]
    return _md(header, [[name, *(row.get(m, "-") for m in modes)] for name, row in cells.items()])


def table_openloop(payload: dict[str, Any]) -> str:
    """p50 / p99 / p99.9 per server (rows) and variant at an offered load (columns)."""
    ok = [r for r in payload["results"] if r.get("status") == "ok" and r.get("percentiles")]
    groups = list(dict.fromkeys((r["variant"], r["percent"]) for r in ok))
    rates: dict[tuple[str, int], list[int]] = {}
    cells: dict[str, dict[tuple[str, int], str]] = {}
    for r in ok:
        group, p = (r["variant"], r["percent"]), r["percentiles"]
        rates[group] = [run["rate"] for run in r["details"].get("runs", []) if "rate" in run]
        cells.setdefault(_label(r["server"]), {})[group] = " / ".join(_ms(p.get(k)) for k in ("50", "99", "99.9"))

    def head(group: tuple[str, int]) -> str:
        seen = rates.get(group) or []
        return f"{group[0]} {group[1]}% ({statistics.median(seen):,.0f}/s)" if seen else f"{group[0]} {group[1]}%"

    header = ["p50 / p99 / p99.9 ms", *(head(g) for g in groups)]
    return _md(header, [[name, *(row.get(g, "-") for g in groups)] for name, row in cells.items()])


def table_restart(payload: dict[str, Any]) -> str:
    """Failed requests (socket errors + non-2xx) of all requests, and the lowest one-second count."""
    rows = []
    for r in payload["results"]:
        if r.get("status") != "ok" or not r.get("load"):
            rows.append([_label(r["server"]), str(r.get("workers")), str(r.get("mode")), r.get("status", "?"), "-"])
            continue
        load = r["load"]
        failed = _failed(load)
        per_second = r.get("per_second") or []
        rows.append(
            [
                _label(r["server"]),
                str(r["workers"]),
                r["mode"],
                f"{failed:,} / {load.get('requests', 0):,}",
                f"{min(per_second):,}" if per_second else "-",
            ]
        )
    return _md(["server", "workers", "mode", "failed / requests", "lowest 1 s"], rows)


def table_spread(payload: dict[str, Any]) -> str:
    """Max/min requests per worker: the median, and each round's."""
    rows = []
    for r in payload["results"]:
        if r.get("status") != "ok":
            continue
        d = r.get("details") or {}
        each = " / ".join(f"{run['spread']:.2f}" for run in d.get("runs", []) if run.get("spread"))
        rows.append(
            [
                _label(r["server"]),
                str(r["workers"]),
                f"{d.get('spread', 0):.2f}",
                each,
                f"{r['load']['requests_per_s']:,.0f}",
            ]
        )
    return _md(["server", "workers", "max/min (median)", "each round", "req/s (median round)"], rows)


TABLES: dict[str, Callable[[dict[str, Any]], str]] = {
    "efficiency": table_efficiency,
    "openloop": table_openloop,
    "restart": table_restart,
    "spread": table_spread,
}


CHARTS: dict[str, Callable[[dict[str, Any]], dict[str, str]]] = {
    "throughput": chart_throughput,
    "spread": chart_spread,
    "efficiency": chart_efficiency,
    "openloop": chart_openloop,
    "restart": chart_restart,
}


def load(paths: Sequence[Path]) -> dict[str, Any]:
    """Read one or more bench.py JSON files of one scenario; the rows are concatenated."""
    payloads = [json.loads(p.read_text()) for p in paths]
    scenarios = {p.get("scenario") for p in payloads}
    if len(scenarios) != 1:
        raise SystemExit(f"charts: the files mix scenarios {sorted(map(str, scenarios))}; chart one at a time")
    merged = dict(payloads[0])
    merged["results"] = [row for p in payloads for row in p.get("results", [])]
    return merged


def render(paths: Sequence[Path], out_dir: Path) -> list[Path]:
    payload = load(paths)
    scenario = payload.get("scenario")
    if scenario not in CHARTS:
        raise SystemExit(f"charts: no chart for scenario {scenario!r}; known: {', '.join(CHARTS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, svg in CHARTS[scenario](payload).items():
        path = out_dir / name
        path.write_text(svg)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", type=Path, help="files written by bench.py --json (one scenario)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"directory for the SVG files ({DEFAULT_OUT})")
    parser.add_argument("--markdown", action="store_true", help="print the results as a Markdown table instead")
    args = parser.parse_args(argv)
    if args.markdown:
        payload = load(args.json)
        if payload["scenario"] not in TABLES:
            raise SystemExit(f"no table for scenario {payload['scenario']!r}; tables: {', '.join(TABLES)}")
        print(TABLES[payload["scenario"]](payload))
        return 0
    for path in render(args.json, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
