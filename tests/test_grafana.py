"""The Grafana dashboard imports cleanly and asks only for metrics the daemon exports; the docs list them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT
from prometheus_client.parser import text_string_to_metric_families
from promql import check_syntax, exported, grafana_to_promql, parse, problems, promtool

DASHBOARD = ROOT / "config" / "grafana" / "scanwatch.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """`<panel title> [refId]` → PromQL, for every query of every panel."""
    return {f"{panel['title']} [{target['refId']}]": target["expr"]
            for panel in dashboard["panels"] for target in panel.get("targets", [])}


def _variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def test_dashboard_imports_with_a_prometheus_input(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["id"] is None and dashboard["uid"] == "scanwatch"
    [source] = dashboard["__inputs"]
    assert source == {**source, "name": "DS_PROMETHEUS", "type": "datasource", "pluginId": "prometheus"}
    # Nothing may point at a datasource of the machine the dashboard was made on.
    uids = set(re.findall(r'"uid": "([^"]*)"', DASHBOARD.read_text())) - {"scanwatch", "-- Grafana --"}
    assert uids == {"${DS_PROMETHEUS}"}


def test_every_panel_has_a_unique_id_a_datasource_and_queries(dashboard: dict[str, Any]) -> None:
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]


def test_panels_fit_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def test_the_panels_the_operations_issue_asks_for_are_there(dashboard: dict[str, Any]) -> None:
    used = {name for expr in _queries(dashboard).values() for name, _ in parse(expr).selectors}
    assert used >= {
        "scanwatch_files_total", "scanwatch_scan_duration_seconds_bucket", "scanwatch_engine_errors_total",
        "scanwatch_retries_total", "scanwatch_queue_depth", "scanwatch_oldest_pending_seconds",
        "scanwatch_scanned_bytes_total", "scanwatch_moves_failed_total", "scanwatch_journal_bytes",
        "scanwatch_engine_up"}
    assert any(expr.startswith("histogram_quantile(0.95,") for expr in _queries(dashboard).values())


def test_every_query_uses_only_exported_metrics_and_labels(dashboard: dict[str, Any]) -> None:
    scrape = exported()
    found = {where: p for where, expr in _queries(dashboard).items() if (p := problems(expr, scrape))}
    assert found == {}


def test_template_variables_are_defined_and_built_on_exported_labels(dashboard: dict[str, Any]) -> None:
    variables = _variables(dashboard)
    assert set(variables) == {"watch", "engine"}
    used = {m for expr in _queries(dashboard).values()
            for m in re.findall(r"\$\{?([A-Za-z_]\w*)", expr) if not m.startswith("__")}
    assert used == set(variables)
    scrape = exported()
    for name, variable in variables.items():
        assert variable["datasource"] == DATASOURCE
        assert variable["includeAll"] and variable["allValue"] == ".*"  # also matches values seen later
        match = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"]["query"])
        assert match and match[2] == name, variable["query"]
        assert name in (scrape.labels.get(match[1]) or ()), f"{match[1]} has no label {name}"


def test_the_drift_check_catches_a_renamed_metric_or_label() -> None:
    scrape = exported()
    assert problems('sum by (watch) (rate(scanwatch_file_total{watch=~"$watch"}[5m]))', scrape) == [
        "metric scanwatch_file_total is not exported"]
    assert problems('sum by (engine) (rate(scanwatch_files_total{outcome="failed"}[5m]))', scrape) == [
        "no selector here has the label engine"]
    assert problems('scanwatch_queue_depth{status="stable"}', scrape) == [
        "scanwatch_queue_depth has no label status"]


@pytest.mark.skipif(promtool() is None,
                    reason="promtool is absent (scripts/install-test-deps.sh installs it)")
def test_every_query_parses_as_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    variables = _variables(dashboard)
    exprs = {where: grafana_to_promql(expr, variables) for where, expr in _queries(dashboard).items()}
    result = check_syntax(exprs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout
    broken = check_syntax({"broken": "sum by (watch (rate(scanwatch_files_total[1m]))"}, tmp_path)
    assert broken.returncode != 0


def test_operations_doc_lists_every_exported_metric() -> None:
    families = [f for f in text_string_to_metric_families(exported().text) if f.name.startswith("scanwatch_")]
    bases = {f.name for f in families}
    names = {f.name + "_total" if f.type == "counter" else f.name for f in families
             if not (f.name.endswith("_created") and f.name.removesuffix("_created") in bases)}
    table = (ROOT / "docs" / "operations.md").read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    assert set(re.findall(r"^\| `(scanwatch_\w+)`", table, re.MULTILINE)) == names
