"""deploy/prometheus and deploy/grafana as Prometheus itself reads them (promtool)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import yaml

from tests.tools import require_tool

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "fleetserve.json"
# Grafana's variables, replaced by what they stand for when Prometheus alone reads a query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$model": ".*"}


def promtool(*args: str) -> str:
    result = subprocess.run(
        [require_tool("promtool"), *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    queries = [target["expr"] for panel in panels for target in panel["targets"]]
    for name, value in GRAFANA_VARIABLES.items():
        queries = [query.replace(name, value) for query in queries]
    return queries


def rule_queries() -> list[str]:
    groups = yaml.safe_load((PROMETHEUS / "rules" / "fleetserve.rules.yml").read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def metric_names(queries: list[str]) -> set[str]:
    """Every fleetserve metric the queries read (recording rules' own names left out)."""
    names = set()
    for query in queries:
        names |= set(re.findall(r"(?<![:\w])fleetserve_\w+", query))
    return names


def test_scrape_config_is_valid() -> None:
    assert "SUCCESS" in promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))


def test_rules_are_valid_and_pass_their_unit_tests() -> None:
    promtool("check", "rules", str(PROMETHEUS / "rules" / "fleetserve.rules.yml"))
    out = promtool("test", "rules", str(PROMETHEUS / "tests" / "fleetserve.rules.test.yml"))
    assert "SUCCESS" in out
    # every alert has a unit test
    alerts = {
        rule["alert"]
        for group in yaml.safe_load((PROMETHEUS / "rules" / "fleetserve.rules.yml").read_text())[
            "groups"
        ]
        for rule in group["rules"]
        if "alert" in rule
    }
    tests = yaml.safe_load((PROMETHEUS / "tests" / "fleetserve.rules.test.yml").read_text())
    tested = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]}
    assert alerts == tested


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    # promtool parses PromQL when it checks rules: one recording rule per panel query
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query{i}", "expr": query}
                    for i, query in enumerate(dashboard_queries())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    promtool("check", "rules", str(path))
    panels = json.loads(DASHBOARD.read_text())["panels"]
    titles = " ".join(panel["title"].lower() for panel in panels)
    for wanted in ("throughput", "latency", "first token", "queue", "kv-cache", "errors"):
        assert wanted in titles, f"the dashboard has no {wanted} panel"


def test_dashboard_is_what_its_generator_writes() -> None:
    path = DASHBOARD.with_name("dashboard.py")
    spec = importlib.util.spec_from_file_location("dashboard", path)
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert json.loads(DASHBOARD.read_text()) == generator.dashboard(), f"run python {path}"
