"""Prometheus metrics: counters fed by the pipeline, gauges read from the journal at scrape time.

Served by a bounded `HTTPListener` (daemon/listener.py): two workers, and clients that
hold a connection without sending a request are cut off.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Histogram, MetricsHandler
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from daemon.engines._pacing import read_rates
from daemon.journal import Journal
from daemon.listener import HTTPListener, ListenerLimits
from daemon.model import FileState
from daemon.pipeline.outcome import Tally

__all__ = ["Metrics"]

_Metric = TypeVar("_Metric", Counter, Histogram)


class _JournalCollector(Collector):
    """Queue depth, oldest pending age, journal size and engine health, straight from SQLite."""

    def __init__(self, journal: Journal, engines: Callable[[], Collection[str]] | None) -> None:
        self._journal = journal
        self._engines = engines

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("scanwatch_queue_depth", "Files by watch and state, not yet done",
                                  labels=["watch", "state"])
        totals: dict[tuple[str, str], int] = {}
        held: dict[tuple[str, str], int] = {}
        # The active rows only: a scrape's cost does not grow with the history kept.
        for watch, state, _, reason, count in self._journal.counts(finished=False):
            totals[(watch, state)] = totals.get((watch, state), 0) + count
            if state == FileState.HELD:
                held[(watch, reason or "")] = held.get((watch, reason or ""), 0) + count
        for (watch, state), count in sorted(totals.items()):
            depth.add_metric([watch, state], count)
        yield depth
        skipped = GaugeMetricFamily("scanwatch_files_skipped", "Files and keys left unscanned on purpose "
                                    "(held), by reason", labels=["watch", "reason"])
        for (watch, reason), count in sorted(held.items()):
            skipped.add_metric([watch, reason], count)
        yield skipped
        oldest = GaugeMetricFamily("scanwatch_oldest_pending_seconds",
                                   "Age of the oldest file not yet done", labels=["watch"])
        now = time.time()
        for watch, since in self._journal.oldest_pending().items():
            oldest.add_metric([watch], now - since)
        yield oldest
        size = GaugeMetricFamily("scanwatch_journal_bytes", "Size of the journal's files")
        size.add_metric([], self._journal.size_bytes())
        yield size
        yield self._engine_up()
        yield self._request_rate()
        yield from self._fleet(now)

    def _fleet(self, now: float) -> Iterator[GaugeMetricFamily]:
        """This daemon's part in its fleet watches (docs/fleet.md), as the watcher recorded it."""
        lease = GaugeMetricFamily("scanwatch_fleet_lease_held",
                                  "1 while this daemon holds the watch's listing lease", labels=["watch"])
        held = GaugeMetricFamily("scanwatch_fleet_messages_held",
                                 "SQS messages this daemon holds (visibility extended) while their "
                                 "objects are in flight", labels=["watch"])
        for watch, member in sorted(self._journal.fleet().items()):
            lease.add_metric([watch], 1.0 if member.holds_lease(now) else 0.0)
            held.add_metric([watch], member.messages_held)
        yield lease
        yield held

    def _request_rate(self) -> GaugeMetricFamily:
        """Each HTTP engine's paced request rate, from its pacing file (docs/engines.md#rate-limits)."""
        running = None if self._engines is None else set(self._engines())
        rate = GaugeMetricFamily("scanwatch_engine_request_rate_per_minute",
                                 "Requests a minute the engine is paced at now: its rate_limit, "
                                 "lower while it throttles", labels=["engine"])
        for name, per_minute in read_rates(self._journal.path.parent).items():
            if running is None or name in running:
                rate.add_metric([name], per_minute)
        return rate

    def _engine_up(self) -> GaugeMetricFamily:
        # The journal remembers engines a reload removed: only the running ones count.
        running = None if self._engines is None else set(self._engines())
        up = GaugeMetricFamily("scanwatch_engine_up",
                               "1 when the engine answered its last probe or scan, 0 when it is down",
                               labels=["engine"])
        for name, (is_healthy, _, _) in sorted(self._journal.engine_health().items()):
            if running is None or name in running:
                up.add_metric([name], 1.0 if is_healthy else 0.0)
        return up


_LIMITS = ListenerLimits(workers=2, queue_size=16)


def _handler(registry: CollectorRegistry, health: Callable[[], list[str]]) -> type[MetricsHandler]:
    """/healthz answers from `health`; every other path is prometheus_client's /metrics."""

    class Handler(MetricsHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path.partition("?")[0] != "/healthz":
                return super().do_GET()
            problems = health()
            body = json.dumps({"ready": not problems, "reasons": problems}).encode()
            self.send_response(200 if not problems else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return None

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes are not events

    Handler.registry = registry
    return Handler


class Metrics:
    """The daemon's metrics; `observe` is the pipeline's outcome hook."""

    def __init__(self, journal: Journal, engines: Callable[[], Collection[str]] | None = None) -> None:
        """`engines` names the engines in use now (default: every engine the journal knows)."""
        self.registry = CollectorRegistry()
        self.files = Counter("scanwatch_files_total", "Files done, by watch and outcome",
                             ["watch", "outcome", "reason"], registry=self.registry)
        self.scan_seconds = Histogram("scanwatch_scan_duration_seconds",
                                      "From discovery to destination, by engine", ["engine"],
                                      registry=self.registry,
                                      buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300))
        self.bytes_scanned = Counter("scanwatch_scanned_bytes_total", "Bytes given a verdict",
                                     ["engine"], registry=self.registry)
        self.retries = Counter("scanwatch_retries_total", "Scan retries scheduled, by reason",
                               ["engine", "reason"], registry=self.registry)
        self.engine_errors = Counter("scanwatch_engine_errors_total",
                                     "Scans without a verdict, retried or final, by reason",
                                     ["engine", "reason"], registry=self.registry)
        self.resubmissions = Counter("scanwatch_resubmissions_total",
                                     "In-doubt submissions submitted again (the engine may hold a "
                                     "duplicate scan)", ["watch", "engine"], registry=self.registry)
        self.moves_failed = Counter("scanwatch_moves_failed_total", "Moves that failed (retried)",
                                    ["watch"], registry=self.registry)
        self.already_placed = Counter("scanwatch_fleet_already_placed_total",
                                      "Placements found already done by another daemon of the fleet",
                                      ["watch"], registry=self.registry)
        self.cache = Counter("scanwatch_cache_lookups_total",
                             "Verdict cache lookups: hit (no request made) or miss (the engine was "
                             "asked)", ["engine", "result"], registry=self.registry)
        self.sqs_malformed = Counter("scanwatch_sqs_malformed_total",
                                     "SQS messages received that are not S3 events (each receipt; "
                                     "the queue's redrive policy ends them)", ["watch"],
                                     registry=self.registry)
        self.registry.register(_JournalCollector(journal, engines))
        self._children: dict[tuple[object, tuple[str, ...]], object] = {}

    def serve(self, listen: str, health: Callable[[], list[str]],
              limits: ListenerLimits = _LIMITS) -> HTTPListener:
        """Serve /metrics and /healthz on `host:port` from daemon threads; returns the listener.

        `health` returns the reasons the daemon is not ready (none: ready). Raises
        `ListenError` (naming `metrics.listen`) when the address cannot be bound.
        """
        listener = HTTPListener("metrics.listen", listen, _handler(self.registry, health),
                                name="metrics", limits=limits)
        listener.start()
        return listener

    def count(self, tally: Tally) -> None:
        """Add a batch's counts as the daemon hears them (daemon/pipeline/outcome.py, `Tally`)."""
        for (counter, labels), amount in tally.counts.items():
            self._child(getattr(self, counter), *labels).inc(amount)
        for engine, seconds in tally.durations:
            self._child(self.scan_seconds, engine).observe(seconds)

    def _child(self, metric: _Metric, *labels: str) -> _Metric:
        """`metric.labels(*labels)`, looked up once: the per-file counts are the daemon's own
        work for every file of every worker (bench/RESULTS.md, "Issue 21")."""
        key = (metric, labels)
        if (child := self._children.get(key)) is None:
            child = self._children[key] = metric.labels(*labels)
        return cast(_Metric, child)
