"""What the dashboard and alert tests check PromQL against: the daemon's real /metrics, and promtool.

`exported()` runs `scanwatch run` once per test session through every code path that
feeds a metric (clean and infected files, an engine that is down, a move that fails), so
each family has samples with their labels; `problems()` then lists every metric name or
label a PromQL expression uses that this scrape does not have.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml
from clamd_server import free_port
from conftest import EICAR, Daemon
from prometheus_client.parser import text_string_to_metric_families

# Series Prometheus makes itself for every target, and the labels it adds to every series.
SYNTHETIC = {"up": frozenset({"job", "instance"})}
TARGET_LABELS = frozenset({"job", "instance"})
# What Grafana puts into a query before it runs it.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}

_SAMPLE_SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "untyped": ("",),
                    "histogram": ("_bucket", "_count", "_sum", "_created"),
                    "summary": ("", "_count", "_sum", "_created")}


@dataclass(frozen=True)
class Exported:
    """Sample names of one scrape, each with its label names (None: seen without samples)."""

    labels: dict[str, frozenset[str] | None]
    text: str


@functools.cache
def exported() -> Exported:
    """Scrape a daemon that has counted clean, infected, retried and unmovable files."""
    base = Path(tempfile.mkdtemp(prefix="scanwatch-scrape-"))
    try:
        return _scrape_scenario(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _scrape_scenario(base: Path) -> Exported:
    port = free_port()
    (base / "not-a-dir").write_text("a regular file: nothing can be created under it")

    def watch(name: str, engine: str, clean: Path | None = None) -> dict[str, object]:
        (base / name).mkdir()
        return {"name": name, "source": str(base / name), "engine": engine, "settle_seconds": 0.2,
                "clean": str(clean or base / "out" / name / "clean"),
                "quarantine": str(base / "out" / name / "quarantine"),
                "failed": str(base / "out" / name / "failed")}

    config = {
        "state_dir": str(base / "state"),
        "log": {"format": "json", "level": "info"},
        "metrics": {"listen": f"127.0.0.1:{port}"},
        "engines": {"default": {"type": "yara"},
                    "down": {"type": "clamav", "socket": str(base / "nobody-listens.sock")}},
        "watches": [watch("inbox", "default"), watch("stuck", "down"),
                    watch("blocked", "default", clean=base / "not-a-dir" / "clean")],
    }
    (base / "scanwatch.yaml").write_text(yaml.safe_dump(config))
    daemon = Daemon(base / "scanwatch.yaml")
    try:
        daemon.wait_for(lambda: daemon.named("daemon.started"), what="daemon.started")
        (base / "inbox" / "a.txt").write_bytes(b"clean")
        (base / "inbox" / "e.com").write_bytes(EICAR)
        (base / "stuck" / "s.txt").write_bytes(b"waits for an engine that is down")
        (base / "blocked" / "b.txt").write_bytes(b"its clean destination cannot be made")
        daemon.wait_for(lambda: len(daemon.named("file.moved")) >= 2 and daemon.named("retry.scheduled")
                        and daemon.named("move.failed"), what="moved, retried and failed moves")
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        daemon.stop()
    return Exported(_sample_labels(text), text)


def _sample_labels(text: str) -> dict[str, frozenset[str] | None]:
    labels: dict[str, frozenset[str] | None] = {}
    for family in text_string_to_metric_families(text):
        for suffix in _SAMPLE_SUFFIXES.get(family.type, ("",)):
            labels.setdefault(family.name + suffix, None)
        for sample in family.samples:
            known = labels.get(sample.name) or frozenset()
            labels[sample.name] = known | frozenset(sample.labels)
    return labels


# -- reading PromQL ---------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<matchers>\{[^{}]*\})
  | (?P<range>\[[^\[\]]*\])
  | (?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:ms|[smhdwy])?)
  | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<open>\()
  | (?P<other>[^\s])
""", re.VERBOSE)
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")


@dataclass(frozen=True)
class Parsed:
    """The selectors of one expression (metric name → matcher labels) and its grouping labels."""

    selectors: tuple[tuple[str, frozenset[str]], ...]
    grouping: frozenset[str]


def parse(expr: str) -> Parsed:
    """Find metric selectors and `by (...)`-style label lists; functions and keywords are skipped."""
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    selectors: list[tuple[str, frozenset[str]]] = []
    grouping: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else (None, "")
        if kind == "name" and text in _GROUPING and following[0] == "open":
            end = next(j for j in range(i + 2, len(tokens)) if tokens[j][1] == ")")
            grouping.update(t for k, t in tokens[i + 2:end] if k == "name")
            i = end + 1
            continue
        is_aggregation = following[0] == "name" and following[1] in ("by", "without")
        if kind == "name" and following[0] != "open" and not is_aggregation and text.lower() not in _KEYWORDS:
            matchers = following[1] if following[0] == "matchers" else "{}"
            selectors.append((text, frozenset(_MATCHER_LABEL.findall(matchers))))
        elif kind == "matchers" and (i == 0 or tokens[i - 1][0] != "name"):
            raise ValueError(f"a selector without a metric name cannot be checked: {text}")
        i += 1
    return Parsed(tuple(selectors), frozenset(grouping))


def problems(expr: str, scrape: Exported) -> list[str]:
    """Every metric or label `expr` uses that the scrape does not export."""
    known: dict[str, frozenset[str] | None] = {**scrape.labels, **SYNTHETIC}
    parsed = parse(expr)
    found: list[str] = []
    in_use: set[str] = set(TARGET_LABELS)
    for name, matchers in parsed.selectors:
        if name not in known:
            found.append(f"metric {name} is not exported")
            continue
        labels = known[name]
        if labels is None:
            continue
        in_use |= labels
        found += [f"{name} has no label {label}" for label in sorted(matchers - labels - TARGET_LABELS)]
    if all(known.get(name) is not None for name, _ in parsed.selectors):
        found += [f"no selector here has the label {label}" for label in sorted(parsed.grouping - in_use)]
    return found


# -- promtool -----------------------------------------------------------------------------------

def promtool() -> str | None:
    """Path of Prometheus' promtool (Debian: prometheus), if installed."""
    return shutil.which("promtool")


def grafana_to_promql(expr: str, variables: Iterable[str]) -> str:
    """The query Prometheus would get: Grafana's interval variables and `$var` filled in."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    for name in variables:
        expr = expr.replace("${" + name + "}", ".*").replace("$" + name, ".*")
    return expr


def check_syntax(exprs: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`promtool check rules` on the expressions as recording rules: Prometheus' own parser."""
    rules = {"groups": [{"name": "syntax", "rules": [
        {"record": f"check:{re.sub(r'[^A-Za-z0-9_]', '_', key)}", "expr": expr}
        for key, expr in exprs.items()]}]}
    path = tmp_path / "syntax.rules.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return subprocess.run([str(promtool()), "check", "rules", str(path)], capture_output=True, text=True)
