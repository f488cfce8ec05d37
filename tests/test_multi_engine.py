"""Several engines on one watch, through in-tree fake engines: outcomes, records, resumption."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pytest
from conftest import EICAR, Clock, Layout, local_watcher
from fakes import FakeEngine, answers, raises
from structlog.testing import capture_logs

from daemon.config import Config
from daemon.errors import EngineRetryableError, EngineThrottledError, EngineUnavailableError
from daemon.journal import FileRow, Journal, owner_token
from daemon.metrics import Metrics
from daemon.model import FileState, Pending, Reason, Verdict, VerdictKind
from daemon.pipeline import Pipeline, Reported
from daemon.pipeline.outcome import Tally
from daemon.retry import RetryPolicy


class Multi:
    """A watch with engines `a` and `b` (fakes), its journal and pipeline, driven step by step."""

    def __init__(self, layout: Layout, **engine_cfg: Any) -> None:
        self.layout = layout
        raw = layout.config(watch={"settle_seconds": 0, "engine": ["a", "b"]})
        raw["engines"] = {"a": {"type": "yara", **engine_cfg}, "b": {"type": "yara", **engine_cfg}}
        self.config = Config.model_validate(raw)
        self.journal = Journal(layout.state / "journal.sqlite3")
        self.a, self.b = FakeEngine(name="a"), FakeEngine(name="b")
        self.clock = Clock()
        self.watcher = local_watcher(self.config.watches[0], self.journal, threading.Event(),
                                     clock=self.clock)
        self.pipeline = self.new_pipeline()

    def new_pipeline(self) -> Pipeline:
        """A pipeline as a restarted daemon builds it (same engines, new scanner)."""
        return Pipeline(self.config, self.journal, {"a": self.a, "b": self.b}, owner=owner_token(),
                        clock=self.clock, policy=RetryPolicy(base_s=10, max_s=10))

    def drop(self, rel: str, data: bytes) -> None:
        (self.layout.inbox / rel).write_bytes(data)

    def step(self, advance_s: float = 0.0) -> None:
        self.clock.now += advance_s
        self.watcher.step()
        while self.pipeline.run_once(["inbox"]):
            pass

    def row(self, rel: str = "a.txt") -> FileRow:
        row = self.journal.latest("inbox", rel)
        assert row is not None
        return row

    def sidecar(self, where: str, rel: str = "a.txt") -> dict[str, Any]:
        path = getattr(self.layout, where) / f"{rel}.scanwatch.json"
        return dict(json.loads(path.read_text()))


@pytest.fixture
def multi(layout: Layout) -> Multi:
    return Multi(layout)


def test_a_single_name_and_a_list_are_both_accepted(layout: Layout) -> None:
    one = Config.model_validate(layout.config())
    assert one.watches[0].engines == ("default",) and one.watches[0].engine_label == "default"
    raw = layout.config(watch={"engine": ["default", "nope"]})
    with pytest.raises(Exception, match=r"watches\[0\].engine: no engine named 'nope'"):
        Config.model_validate(raw)
    with pytest.raises(Exception, match="listed twice"):
        Config.model_validate(layout.config(watch={"engine": ["default", "default"]}))


def test_clean_only_when_every_engine_said_clean(multi: Multi) -> None:
    multi.drop("a.txt", b"hello")
    multi.step(advance_s=3)
    assert multi.layout.placed("clean") == ["a.txt"]
    assert multi.a.seen == [b"hello"] and multi.b.seen == [b"hello"]
    records = multi.journal.scans(multi.row().id)
    assert {e: r.verdict for e, r in records.items()} == {"a": "clean", "b": "clean"}
    assert multi.row().engine == "a+b"


def test_one_infected_quarantines_with_the_union_of_threats_and_a_scans_list(multi: Multi) -> None:
    multi.a.script = [answers(Verdict(VerdictKind.INFECTED, ("A-Threat",), engine_scan_id="a-1"))]
    multi.drop("a.txt", EICAR)
    multi.step(advance_s=3)
    assert multi.layout.placed("quarantine") == ["a.txt"]
    sidecar = multi.sidecar("quarantine")
    assert sidecar["engine"] == "a+b"
    assert sidecar["threats"] == ["A-Threat", "Eicar-Test-Signature"]
    assert sidecar["engine_scan_id"] == "a-1"  # the first engine in the list that gave the outcome
    assert [s["engine"] for s in sidecar["scans"]] == ["a", "b"]
    assert {s["verdict"] for s in sidecar["scans"]} == {"infected"}


def test_infected_decides_at_once_and_the_other_pending_scan_is_abandoned(multi: Multi) -> None:
    multi.b.remote = True
    multi.b.script = [answers(Pending("b-1", poll_after_s=60))]
    multi.drop("a.txt", EICAR)
    with capture_logs() as logs:
        multi.step(advance_s=3)
    assert multi.layout.placed("quarantine") == ["a.txt"]
    assert [e for e in logs if e["event"] == "scan.abandoned"][0]["engines"] == ["b"]
    assert multi.journal.scans(multi.row().id)["b"].abandoned
    multi.step(advance_s=120)
    assert [c[0] for c in multi.b.calls] == ["scan"]  # never polled again


def test_failed_when_one_engine_fails_after_its_retries_and_none_is_infected(multi: Multi) -> None:
    error = EngineRetryableError("timed out", reason=Reason.TIMEOUT)
    multi.b.script = [raises(error)] * 3
    multi.drop("a.txt", b"hello")
    for _ in range(5):
        multi.step(advance_s=11)
    assert multi.layout.placed("failed") == ["a.txt"]
    assert multi.sidecar("failed")["reason"] == "timeout"
    assert len(multi.a.calls) == 1  # the engine that answered is not asked again
    assert len(multi.b.calls) == 3  # b's own max_attempts (3)


def test_an_engine_down_then_back_keeps_the_others_verdict(multi: Multi) -> None:
    multi.b.script = [raises(EngineUnavailableError("connection refused"))] * 2
    multi.drop("a.txt", b"hello")
    multi.step(advance_s=3)
    multi.step(advance_s=11)
    assert multi.row().state is FileState.SCANNING and multi.layout.placed("clean") == []
    multi.step(advance_s=11)
    assert multi.layout.placed("clean") == ["a.txt"]
    assert len(multi.a.calls) == 1 and len(multi.b.calls) == 3
    assert multi.journal.scans(multi.row().id)["b"].attempts == 1  # waits spend no attempt


def test_a_restart_follows_the_pending_engine_and_never_asks_the_one_that_answered(multi: Multi) -> None:
    multi.b.remote = True
    multi.b.script = [answers(Pending("b-1", poll_after_s=5))]
    multi.b.polls["b-1"] = [Verdict(VerdictKind.CLEAN, engine_scan_id="b-1")]
    multi.drop("a.txt", b"hello")
    multi.step(advance_s=3)
    assert multi.row().state is FileState.SCANNING
    multi.pipeline = multi.new_pipeline()  # a restart: only the journal is left
    multi.step(advance_s=6)
    assert multi.layout.placed("clean") == ["a.txt"]
    assert multi.a.calls == [("scan", multi.row().ref_id)]
    assert [c[0] for c in multi.b.calls] == ["scan", "poll"]


def test_an_in_doubt_submission_is_looked_up_not_resent(multi: Multi) -> None:
    """b timed out inside its submission: the record stays in doubt, and is looked up by reference."""
    multi.b.remote = True
    multi.b.script = [raises(EngineRetryableError("read timed out", reason=Reason.TIMEOUT))]
    multi.b.polls[""] = [Verdict(VerdictKind.CLEAN, engine_scan_id="b-found")]
    multi.drop("a.txt", b"hello")
    multi.step(advance_s=3)
    record = multi.journal.scans(multi.row().id)["b"]
    assert record.submitting_at is not None and record.verdict is None
    multi.pipeline = multi.new_pipeline()
    multi.step(advance_s=11)
    assert multi.layout.placed("clean") == ["a.txt"]
    assert [c[0] for c in multi.b.calls] == ["scan", "poll"]
    assert [c[0] for c in multi.a.calls] == ["scan"]


def _counted_by(metrics: Metrics) -> Callable[[list[Reported]], None]:
    """A pipeline's outcomes into `metrics`, as the daemon hears them."""
    def count(batch: list[Reported]) -> None:
        metrics.count(Tally.of(batch))
    return count


def test_metrics_count_each_engine_under_its_own_name(layout: Layout) -> None:
    multi = Multi(layout)
    metrics = Metrics(multi.journal)
    multi.pipeline = Pipeline(multi.config, multi.journal, {"a": multi.a, "b": multi.b},
                              owner=owner_token(), clock=multi.clock, on_outcomes=_counted_by(metrics),
                              policy=RetryPolicy(base_s=10, max_s=10))
    multi.b.script = [raises(EngineRetryableError("503 busy"))]
    multi.drop("a.txt", b"hello")
    multi.step(advance_s=3)
    multi.step(advance_s=11)
    assert multi.layout.placed("clean") == ["a.txt"]
    sample = metrics.registry.get_sample_value
    assert sample("scanwatch_retries_total", {"engine": "b", "reason": "engine_error"}) == 1
    assert sample("scanwatch_retries_total", {"engine": "a", "reason": "engine_error"}) is None
    assert sample("scanwatch_files_total", {"watch": "inbox", "outcome": "clean", "reason": ""}) == 1


@pytest.mark.parametrize(("error", "reason"), [
    (EngineThrottledError("429 slow down"), "rate_limited"),
    (EngineUnavailableError("connection refused"), "engine_unavailable"),
    (EngineRetryableError("read timed out", reason=Reason.TIMEOUT), "timeout")])
def test_retries_are_counted_by_the_engines_own_reason(layout: Layout, error: Exception,
                                                       reason: str) -> None:
    multi = Multi(layout)
    metrics = Metrics(multi.journal)
    multi.pipeline = Pipeline(multi.config, multi.journal, {"a": multi.a, "b": multi.b},
                              owner=owner_token(), clock=multi.clock, on_outcomes=_counted_by(metrics),
                              policy=RetryPolicy(base_s=10, max_s=10))
    multi.b.script = [raises(error)]
    multi.drop("a.txt", b"hello")
    multi.step(advance_s=3)
    multi.step(advance_s=61)
    assert multi.layout.placed("clean") == ["a.txt"]
    assert metrics.registry.get_sample_value("scanwatch_retries_total",
                                             {"engine": "b", "reason": reason}) == 1


def test_one_shot_scan_asks_every_engine(multi: Multi) -> None:
    from daemon.oneshot import scan_paths

    multi.b.script = [answers(Verdict(VerdictKind.INFECTED, ("B-Only",)))]
    multi.drop("a.txt", b"hello")
    multi.drop("b.txt", b"hello again")
    engines: dict[str, Any] = {"a": multi.a, "b": multi.b}
    first, second = scan_paths(multi.config, engines, [str(multi.layout.inbox / "a.txt"),
                                                        str(multi.layout.inbox / "b.txt")],
                               watch_name=None, move=False, journal=None)
    assert (first.verdict, first.threats) == (VerdictKind.INFECTED, ("B-Only",))
    assert second.verdict is VerdictKind.CLEAN
    assert len(multi.a.calls) == 2 and len(multi.b.calls) == 2


def test_status_names_the_watch_engines_and_each_engine_health(multi: Multi) -> None:
    from daemon.status import collect

    multi.b.script = [raises(EngineUnavailableError("connection refused"))]
    multi.pipeline.scanner.start()  # takes the journal's health view
    multi.drop("a.txt", b"hello")
    multi.step(advance_s=3)
    status = collect(multi.config, multi.journal)
    assert status["watches"]["inbox"]["engine"] == "a+b"
    assert status["watches"]["inbox"]["engines"] == ["a", "b"]
    assert status["engines"]["b"]["healthy"] is False
