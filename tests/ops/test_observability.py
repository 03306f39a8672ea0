"""examples/deploy/observability/: the alert rules pass their promtool unit tests, and the
dashboard and the rules only use metrics a real server exposes.

promtool comes with Prometheus (Debian/Ubuntu: ``apt-get install prometheus``;
``.ci/run`` installs it); the tests that need it skip, saying so, where it is missing.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ..conftest import HELLO_APP, ROOT, Server, free_port, wait_until
from .test_metrics import get_metrics

HERE = ROOT / "examples" / "deploy" / "observability"
DOCS = ROOT / "docs" / "operations.md"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found: install Prometheus (Debian: apt-get install prometheus) to run this"
)
#: a metric name in a PromQL expression
NAME = re.compile(r"\b(?:cluster_server|process)_[a-z0-9_]+\b")


def promtool(*args: str, cwd: Path = HERE) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((HERE / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((HERE / "grafana-dashboard.json").read_text())
    return data


def dashboard_exprs() -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) of every query, with Grafana's variables filled in."""
    board = dashboard()
    for panel in board["panels"]:
        for target in panel["targets"]:
            yield panel["title"], grafana_vars(target["expr"])
    for annotation in board["annotations"]["list"]:
        yield annotation["name"], grafana_vars(annotation["expr"])


def grafana_vars(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace("$job", "app").replace("$instance", ".+")


# -- promtool ------------------------------------------------------------------------------


@needs_promtool
def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    check = promtool("check", "rules", "alerts.yml")
    assert check.returncode == 0, check.stdout + check.stderr
    test = promtool("test", "rules", "alerts.test.yml")
    assert test.returncode == 0, test.stdout + test.stderr
    config = promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    tests = yaml.safe_load((HERE / "alerts.test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    for rule in rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']}: no test where it fires"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']}: no test where it stays quiet"


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool checks the expressions of recording rules: one per dashboard query.
    recorded = [{"record": f"dashboard:query{i}", "expr": expr} for i, (_, expr) in enumerate(dashboard_exprs())]
    (tmp_path / "queries.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}))
    check = promtool("check", "rules", "queries.yml", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr


# -- against a real server -------------------------------------------------------------------


def test_the_dashboard_and_the_alerts_use_only_exposed_metrics(
    start_server: Callable[..., Server], write_app: Callable[[str, str], Path]
) -> None:
    write_app("hello", HELLO_APP)
    mport = free_port()
    srv = start_server(  # least-busy: the hand-off's families (accept backlog) are on the dashboard
        "hello:app", "--scheduling", "least-busy", "--metrics-bind", f"127.0.0.1:{mport}", "--max-worker-memory", "512"
    )
    srv.wait_ready()
    assert srv.get().status_code == 200  # request metrics have samples once a request was served
    wait_until(lambda: "cluster_server_http_requests_total{" in get_metrics(mport), 5, what="the request counted")
    text = get_metrics(mport)
    exposed = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1].isalpha()}
    used = {(title, name) for title, expr in dashboard_exprs() for name in NAME.findall(expr)}
    used |= {(rule["alert"], name) for rule in rules() for name in NAME.findall(rule["expr"])}
    unknown = sorted((where, name) for where, name in used if name not in exposed)
    assert unknown == [], f"not exposed by the server: {unknown}"
    # Every label a query selects on is one the server puts on a sample (not just a word of its help text).
    for where, expr in [*dashboard_exprs(), *((r["alert"], r["expr"]) for r in rules())]:
        for label in re.findall(r'\b(state|reason|outcome|status_class)=~?"', expr):
            assert f'{label}="' in text, (where, label)


def test_the_dashboard_has_the_panels_operators_need_and_docs_list_them() -> None:
    titles = [panel["title"] for panel in dashboard()["panels"]]
    for needed in (
        "Request rate",
        "Errors (5xx share)",
        "Latency percentiles",
        "Workers by state",
        "Restarts by reason",
        "Rolling restarts and recycles",
        "Heartbeat age",
        "Accept backlog",
        "Memory per worker",
    ):
        assert needed in titles
    assert len(set(panel["id"] for panel in dashboard()["panels"])) == len(titles)
    doc = DOCS.read_text()
    listed = re.findall(r"^\| \d+ \| ([^|]+?) \|", doc, re.M)
    assert listed == titles, "docs/operations.md's panel table follows the dashboard, in order"
    alerts = re.findall(r"^\| `(ClusterServer\w+)` \|", doc, re.M)
    assert alerts == [rule["alert"] for rule in rules()], "docs/operations.md's alert table follows alerts.yml"


def test_the_dashboard_picture_in_the_docs_is_drawn_from_the_json() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_dashboard", HERE / "render_dashboard.py")
    assert spec is not None and spec.loader is not None
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    drawn = render.render(dashboard())
    stale = "docs/img/dashboard.svg is stale: run examples/deploy/observability/render_dashboard.py > it"
    assert (ROOT / "docs" / "img" / "dashboard.svg").read_text() == drawn, stale
    assert all(panel["title"] in drawn for panel in dashboard()["panels"])
