"""deploy/observability/: the alert rules pass promtool (where installed) and every metric the
rules and the Grafana dashboard name is one the services serve at /metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "observability" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "observability" / "grafana-dashboard.json"

# Made by Prometheus itself, not by a service.
BUILT_IN = {"up"}
_FUNCTIONS_AND_WORDS = {
    "sum", "min", "max", "avg", "count", "rate", "increase", "irate", "histogram_quantile",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "label_values", "bool", "offset", "abs", "clamp_min", "clamp_max", "delta", "deriv",
    "topk", "bottomk", "time", "vector", "scalar",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads (label matchers, groupings, ranges, strings
    and Grafana's variables taken out first)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    # Grafana's label_values(series, label): the label is no series.
    text = re.sub(r"label_values\(([^,]*),\s*\w+\)", r"\1", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\w+", "", text)
    words = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", text))
    return {w for w in words if w not in _FUNCTIONS_AND_WORDS and not re.fullmatch(r"\d+\w*", w)}


def rule_expressions() -> list[tuple[str, str]]:
    document = yaml.safe_load(RULES.read_text())
    return [
        (rule["alert"], rule["expr"]) for group in document["groups"] for rule in group["rules"]
    ]


def dashboard_expressions() -> list[tuple[str, str]]:
    document = json.loads(DASHBOARD.read_text())
    found = []
    for panel in document["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
    for variable in document["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            found.append((variable["name"], query["query"]))
    return found


def served(text: str) -> set[str]:
    """Every series name a /metrics page offers, labelled families without children included
    (their samples appear once an event labels them)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


@pytest.fixture
async def exposed(
    http: Any, identity_url: str, gateway_url: str, school_api_url: str, webhooks_url: str
) -> set[str]:
    names: set[str] = set()
    for base in (identity_url, gateway_url, school_api_url, webhooks_url):
        async with http.get(base + "/metrics") as resp:
            assert resp.status == 200, base
            names |= served(await resp.text())
    return names


def test_the_metric_name_reader_finds_names_and_only_names() -> None:
    expr = (
        'sum by (service) (rate(http_requests_total{status=~"5.."}[5m])) / ignoring(state) '
        "db_pool_max_connections > 35 * 86400 or histogram_quantile(0.99, sum by (le) "
        '(rate(x_seconds_bucket{job=~"$job"}[$__rate_interval]))) '
        'and label_values(up{job=~"connect-.*"}, job)'
    )
    assert metric_names(expr) == {
        "http_requests_total",
        "db_pool_max_connections",
        "x_seconds_bucket",
        "up",
    }


async def test_every_metric_the_rules_and_dashboard_name_is_served(exposed: set[str]) -> None:
    expressions = rule_expressions() + dashboard_expressions()
    assert len(expressions) > 30
    missing = {
        (where, name)
        for where, expr in expressions
        for name in metric_names(expr)
        if name not in exposed and name not in BUILT_IN
    }
    assert not missing, sorted(missing)


def test_every_alert_says_how_bad_and_what() -> None:
    document = yaml.safe_load(RULES.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus)")
def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
