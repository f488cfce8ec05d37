"""The Prometheus alert rules: valid, built on exported metrics, and firing when they should."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT
from promql import exported, problems, promtool

RULES = ROOT / "config" / "prometheus" / "scanwatch-alerts.yaml"
RULE_TESTS = ROOT / "tests" / "prometheus" / "scanwatch-alerts.test.yaml"
needs_promtool = pytest.mark.skipif(promtool() is None,
                                    reason="promtool is absent (scripts/install-test-deps.sh installs it)")


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    [group] = yaml.safe_load(RULES.read_text())["groups"]
    return list(group["rules"])


def test_the_alerts_operations_asks_for_are_there(rules: list[dict[str, Any]]) -> None:
    assert [rule["alert"] for rule in rules] == [
        "ScanwatchDown", "ScanwatchEngineDown", "ScanwatchBacklogStale", "ScanwatchFailedRateHigh",
        "ScanwatchMovesFailing"]
    for rule in rules:
        assert rule["for"] and rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]


def test_every_rule_uses_only_exported_metrics_and_labels(rules: list[dict[str, Any]]) -> None:
    scrape = exported()
    assert {rule["alert"]: p for rule in rules if (p := problems(rule["expr"], scrape))} == {}


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run([str(promtool()), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


@needs_promtool
def test_each_alert_fires_on_its_symptom_and_stays_quiet_otherwise(rules: list[dict[str, Any]]) -> None:
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    checks = [case for test in cases for case in test["alert_rule_test"]]
    fired = {case["alertname"] for case in checks if case["exp_alerts"]}
    quiet = {case["alertname"] for case in checks if not case["exp_alerts"]}
    assert fired == quiet == {rule["alert"] for rule in rules}
    result = subprocess.run([str(promtool()), "test", "rules", RULE_TESTS.name], capture_output=True,
                            text=True, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_test_rules_fails_when_an_alert_does_not_fire(tmp_path: Path) -> None:
    cases = yaml.safe_load(RULE_TESTS.read_text())
    cases["rule_files"] = [str(RULES)]
    firing = next(c for c in cases["tests"][0]["alert_rule_test"] if c["exp_alerts"])
    firing["eval_time"] = "3m"  # still pending at 3m: its `for: 5m` has not passed
    (tmp_path / "early.test.yaml").write_text(yaml.safe_dump(cases))
    result = subprocess.run([str(promtool()), "test", "rules", "early.test.yaml"], capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr
