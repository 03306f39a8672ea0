"""Draw the dashboard's layout from grafana-dashboard.json, as an SVG for the docs.

    python examples/deploy/observability/render_dashboard.py > docs/img/dashboard.svg

Each panel is drawn where Grafana puts it (its ``gridPos``: 24 columns), with
its title, its description, the metrics it queries and the series it draws
(their legends; ``<worker>``: one per value of the label). No
data: it shows what the dashboard has, not a moment of a server.
tests/ops/test_observability.py checks that docs/img/dashboard.svg is this script's
output for the JSON in the repository.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
from html import escape
from pathlib import Path
from typing import Any

WIDTH = 960
COLUMN = WIDTH / 24
ROW = 22  # pixels per grid unit of height
PAD = 6
METRIC = re.compile(r"\b(?:cluster_server|process)_[a-z0-9_]+\b")
COLORS = ("#7eb26d", "#eab839", "#6ed0e0", "#ef843c", "#e24d42", "#1f78c1", "#ba43a9", "#705da0")


def panel_svg(panel: dict[str, Any]) -> list[str]:
    pos = panel["gridPos"]
    x, y = pos["x"] * COLUMN + PAD / 2, pos["y"] * ROW + PAD / 2
    w, h = pos["w"] * COLUMN - PAD, pos["h"] * ROW - PAD
    out = [
        f'<rect x="{x:.0f}" y="{y:.0f}" width="{w:.0f}" height="{h:.0f}" rx="4" fill="#181b1f" stroke="#2c3235"/>',
        f'<text x="{x + 10:.0f}" y="{y + 20:.0f}" class="title">{escape(panel["title"])}</text>',
    ]
    chars = int(w / 6.2)
    lines = textwrap.wrap(panel.get("description", ""), chars)[:4]
    for i, line in enumerate(lines):
        out.append(f'<text x="{x + 10:.0f}" y="{y + 40 + 14 * i:.0f}" class="desc">{escape(line)}</text>')
    names = sorted({name for target in panel["targets"] for name in METRIC.findall(target["expr"])})
    for i, name in enumerate(names[:3]):
        top = y + 48 + 14 * len(lines)
        out.append(f'<text x="{x + 10:.0f}" y="{top + 14 * i:.0f}" class="metric">{escape(name)}</text>')
    legend_y = y + h - 12
    lx = x + 10
    for i, target in enumerate(panel["targets"]):
        legend = target.get("legendFormat") or target["refId"]
        legend = legend.replace("{{", "<").replace("}}", ">")
        color = COLORS[i % len(COLORS)]
        out.append(f'<rect x="{lx:.0f}" y="{legend_y - 8:.0f}" width="14" height="3" fill="{color}"/>')
        out.append(f'<text x="{lx + 18:.0f}" y="{legend_y - 4:.0f}" class="legend">{escape(legend)}</text>')
        lx += 28 + 6.2 * len(legend)
    return out


def render(board: dict[str, Any]) -> str:
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in board["panels"]) * ROW
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="Helvetica, Arial, sans-serif">',
        f"<title>{escape(board['title'])} dashboard: its panels</title>",
        "<style>.title{fill:#d8d9da;font-size:14px;font-weight:bold}"
        ".desc{fill:#9fa7b3;font-size:11px}.legend{fill:#ccccdc;font-size:11px}"
        ".metric{fill:#6e9fff;font-size:11px;font-family:monospace}</style>",
        f'<rect width="{WIDTH}" height="{height}" fill="#111217"/>',
    ]
    for panel in board["panels"]:
        parts += panel_svg(panel)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main() -> None:
    board = json.loads((Path(__file__).parent / "grafana-dashboard.json").read_text())
    sys.stdout.write(render(board))


if __name__ == "__main__":
    main()
