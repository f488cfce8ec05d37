"""Metrics over HTTP, secrets kept out of every output, and files the daemon cannot read."""

from __future__ import annotations

import http.server
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import yaml
from clamd_server import Clamd, free_port
from conftest import EICAR, ROOT, Layout
from prometheus_client.parser import text_string_to_metric_families

from daemon.journal import Journal
from daemon.log import MAX_LINE_CHARS, configure_logging, enabled, file_context, info_each, redact
from daemon.metrics import Metrics
from daemon.model import FileState, Reason, VerdictKind
from daemon.pipeline import Outcome
from daemon.pipeline.outcome import Tally


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_and_status_count_every_file_exactly_once(layout: Layout, daemon_factory,
                                                          workers: int) -> None:
    port = free_port()
    config = layout.write_config(metrics={"listen": f"127.0.0.1:{port}"}, workers=workers)
    daemon = daemon_factory(config)
    daemon.wait_started()
    clean = {f"c{i:02d}.txt": b"x" * i for i in range(40)}
    for name, data in clean.items():
        (layout.inbox / name).write_bytes(data)
    for i in range(6):
        (layout.inbox / f"e{i}.com").write_bytes(EICAR)
    done = _key("scanwatch_scan_duration_seconds_count", engine="default")
    daemon.wait_for(lambda: _scrape(port).get(done) == 46, what="46 files counted")
    time.sleep(0.5)  # nothing counted twice arrives late
    metrics = _scrape(port)
    assert metrics[done] == 46
    assert metrics[_key("scanwatch_files_total", watch="inbox", outcome="clean", reason="")] == 40
    assert metrics[_key("scanwatch_files_total", watch="inbox", outcome="infected", reason="")] == 6
    assert metrics[_key("scanwatch_scanned_bytes_total", engine="default")] == (
        sum(map(len, clean.values())) + 6 * len(EICAR))
    assert "scanwatch_journal_bytes" in {name for name, _ in metrics}
    status = subprocess.run([sys.executable, "-m", "daemon.cli", "status", "--config", str(config),
                             "--json"], capture_output=True, text=True, cwd=ROOT, check=True)
    watch = json.loads(status.stdout)["watches"]["inbox"]
    assert watch["outcomes"] == {"clean": 40, "infected": 6} and watch["states"] == {"done": 46}
    assert daemon.stop() == 0
    assert len(daemon.named("file.moved")) == 46


@pytest.mark.parametrize("workers", [1, 2])
def test_status_and_metrics_count_the_files_on_their_way_to_a_worker(layout: Layout, daemon_factory,
                                                                     workers: int) -> None:
    """daemon/handoff.py: files an event named wait in the daemon's memory, not in the journal,
    until they have settled; `status` and `scanwatch_queue_depth` count them all the same, as
    `arriving`, and the oldest pending age is theirs, until a worker records them."""
    from daemon.config import load_config
    from daemon.journal import open_journal
    from daemon.status import collect

    port = free_port()
    config = layout.write_config(metrics={"listen": f"127.0.0.1:{port}"}, workers=workers,
                                 watch={"settle_seconds": 4, "rescan_interval": 300})
    daemon = daemon_factory(config)
    daemon.wait_started()
    for i in range(5):
        (layout.inbox / f"f{i}.txt").write_bytes(b"x")
    journal = open_journal(layout.state)

    def watch() -> dict[str, object]:
        return collect(load_config(config), journal)["watches"]["inbox"]

    arriving = daemon.wait_for(lambda: (w := watch())["states"].get("arriving") == 5 and w,
                               timeout=3, what="5 files arriving")
    assert journal.rows() == [] and arriving["states"] == {"arriving": 5}
    assert 0 <= arriving["oldest_pending_s"] < 4 and arriving["oldest_pending_file"] is None
    assert _scrape(port)[_key("scanwatch_queue_depth", watch="inbox", state="arriving")] == 5
    daemon.wait_for(lambda: len(layout.placed("clean")) == 5, what="5 files placed")
    daemon.wait_for(lambda: watch()["states"] == {"done": 5}, timeout=3, what="none arriving")
    assert _key("scanwatch_queue_depth", watch="inbox", state="arriving") not in _scrape(port)
    assert daemon.stop() == 0


def _scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def _key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


def test_metrics_follow_an_engine_down_then_back(layout: Layout, daemon_factory, clamd: Clamd,
                                                 tmp_path: Path) -> None:
    port = free_port()
    socket_path = tmp_path / "clamd.sock"  # nothing there yet: the engine is down
    config = layout.write_config(metrics={"listen": f"127.0.0.1:{port}"})
    config.write_text(config.read_text().replace(
        "type: yara", f"type: clamav\n    socket: {socket_path}\n    mode: stream"))
    daemon = daemon_factory(config)
    daemon.wait_started()
    (layout.inbox / "a.txt").write_bytes(b"waits for clamd")
    daemon.wait_for(lambda: daemon.named("retry.scheduled"), what="a retry while clamd is down")
    down = _scrape(port)
    assert down[_key("scanwatch_engine_up", engine="default")] == 0
    assert down[_key("scanwatch_engine_errors_total", engine="default", reason="engine_unavailable")] >= 1
    assert down[_key("scanwatch_retries_total", engine="default", reason="engine_unavailable")] >= 1
    assert down[_key("scanwatch_queue_depth", watch="inbox", state="stable")] == 1
    assert down[_key("scanwatch_oldest_pending_seconds", watch="inbox")] > 0
    socket_path.symlink_to(clamd.socket)  # clamd is back
    daemon.wait_for(lambda: daemon.named("file.moved"), what="the file moved once clamd answered")
    back = _scrape(port)
    assert back[_key("scanwatch_engine_up", engine="default")] == 1
    assert back[_key("scanwatch_files_total", watch="inbox", outcome="clean", reason="")] == 1
    assert back[_key("scanwatch_scanned_bytes_total", engine="default")] == len(b"waits for clamd")
    pending = ("scanwatch_queue_depth", "scanwatch_oldest_pending_seconds")
    assert not [key for key in back if key[0] in pending]
    assert daemon.stop() == 0


def test_engine_errors_count_engines_that_could_not_scan_not_unreadable_files(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    journal.discover("inbox", [("a.txt", 1)], time.time())
    [row] = journal.rows()
    metrics = Metrics(journal, engines=lambda: ["default"])

    def verdict(kind: VerdictKind, reason: Reason | None) -> Outcome:
        return Outcome({"state": FileState.MOVING, "verdict": kind, "reason": reason}, "scan.verdict",
                       {"verdict": kind.value, "reason": reason})

    metrics.count(Tally.of((row, "default", outcome) for outcome in (
        verdict(VerdictKind.FAILED, Reason.TOO_LARGE), verdict(VerdictKind.FAILED, Reason.UNREADABLE),
        verdict(VerdictKind.CLEAN, None),
        Outcome({"state": FileState.STABLE, "last_error": "HTTP 503"}, "retry.scheduled",
                {"reason": "engine_error"}))))
    value = metrics.registry.get_sample_value
    assert value("scanwatch_engine_errors_total", {"engine": "default", "reason": "too_large"}) == 1
    assert value("scanwatch_engine_errors_total", {"engine": "default", "reason": "engine_error"}) == 1
    assert value("scanwatch_engine_errors_total", {"engine": "default", "reason": "unreadable"}) is None
    assert value("scanwatch_retries_total", {"engine": "default", "reason": "engine_error"}) == 1
    assert value("scanwatch_retries_total", {"engine": "default", "reason": "too_large"}) is None


def test_a_step_that_cannot_be_counted_is_logged_and_skips_no_other(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    journal.discover("inbox", [("a.txt", 1)], time.time())
    [row] = journal.rows()
    broken = Outcome({}, "file.moved", {"destination": "/c/a.txt"})  # no `outcome`
    counted = Outcome({}, "file.skipped", {"reason": "ignored"})
    with structlog.testing.capture_logs() as logs:
        tally = Tally.of([(row, "default", broken), (row, "default", counted)])
    assert tally.counts == {("files", ("inbox", "skipped", "ignored")): 1}
    assert [(e["event"], e["file_id"]) for e in logs] == [("outcome.unobserved", row.id)]


def test_engine_up_reports_only_the_engines_in_use(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    journal.set_engine_health("default", True, "PONG", time.time())
    journal.set_engine_health("removed", False, "down before a reload removed it", time.time())
    in_use = Metrics(journal, engines=lambda: ["default"]).registry.get_sample_value
    assert in_use("scanwatch_engine_up", {"engine": "default"}) == 1
    assert in_use("scanwatch_engine_up", {"engine": "removed"}) is None
    known = Metrics(journal).registry.get_sample_value
    assert known("scanwatch_engine_up", {"engine": "removed"}) == 0


def test_secrets_never_reach_logs_or_errors(layout: Layout, daemon_factory, tmp_path: Path) -> None:
    secret = "hunter2-very-secret-value"
    (tmp_path / "pwd").write_text(secret + "\n")
    config = layout.write_config(watch={"archivepwd": f"${{file:{tmp_path / 'pwd'}}}"})
    check = subprocess.run([sys.executable, "-m", "daemon.cli", "check-config", "--config", str(config)],
                           capture_output=True, text=True, cwd=ROOT)
    assert check.returncode == 0 and secret not in check.stdout + check.stderr
    daemon = daemon_factory(config)
    daemon.wait_started()
    (layout.inbox / "e.com").write_bytes(EICAR)
    daemon.wait_for(lambda: daemon.named("file.moved"), what="file moved")
    assert daemon.stop() == 0
    assert not daemon.leaked(secret)
    assert secret not in (layout.quarantine / "e.com.scanwatch.json").read_text()


def test_redaction_is_the_backstop_for_sensitive_keys() -> None:
    event = {"event": "x", "api_key": "k", "nested": {"Authorization": "Bearer t", "ok": 1}}
    assert redact(None, "", event) == {"event": "x", "api_key": "***",
                                       "nested": {"Authorization": "***", "ok": 1}}


def test_a_record_too_long_for_journald_is_cut_to_one_line(capsys) -> None:
    configure_logging("json")
    log = structlog.get_logger("test")
    log.info("big.name", watch="w", rel_path="a" * 100_000, error="é" * 2_000, file_id=7)
    log.info("big.list", watch="w", problems=["x" * 100] * 1_000)
    big_name, big_list = map(json.loads, capsys.readouterr().out.splitlines())
    assert len(json.dumps(big_name)) <= MAX_LINE_CHARS
    assert big_name["truncated"] == ["rel_path"] and big_name["rel_path"].startswith("a" * 1000)
    assert big_name["error"] == "é" * 2_000 and big_name["file_id"] == 7
    assert big_list == {"event": "big.list", "level": "info", "timestamp": big_list["timestamp"],
                        "watch": "w", "truncated": ["*"]}


def test_a_record_per_value_is_the_record_logged_for_each(capsys) -> None:
    """`info_each` renders once and puts each value in place: the lines are those of one
    `log.info` per value (but their shared timestamp), for names JSON must escape; a
    sensitive field is still redacted; a value too long for a line, another set-up's
    records (a test's capture) and console lines go one record at a time."""
    log = structlog.get_logger("test")
    names = ["a b/ü.txt", 'q"uo\\te\n.bin', "bad\udcff", "..", "x" * 300]
    configure_logging("json")
    info_each(log, "file.discovered", "rel_path", names, watch="w", by="event", token="s3cr3t")
    for name in names:
        log.info("file.discovered", watch="w", by="event", token="s3cr3t", rel_path=name)
    lines = capsys.readouterr().out.splitlines()
    each, one_by_one = [json.loads(line) for line in lines[:5]], [json.loads(line) for line in lines[5:]]
    assert [r["rel_path"] for r in each] == names and {r["timestamp"] for r in each} == {each[0]["timestamp"]}
    assert [{**r, "timestamp": 0} for r in each] == [{**r, "timestamp": 0} for r in one_by_one]
    assert "s3cr3t" not in "".join(lines) and each[0]["token"] == "***"

    info_each(log, "file.discovered", "rel_path", ["a", "é" * 40_000], watch="w")
    short, cut = map(json.loads, capsys.readouterr().out.splitlines())
    assert short["rel_path"] == "a" and cut["truncated"] == ["rel_path"]
    with structlog.testing.capture_logs() as captured:  # another set-up: record by record
        info_each(log, "file.discovered", "rel_path", ["a", "b"], watch="w")
    assert [(r["event"], r["rel_path"]) for r in captured] == [("file.discovered", "a"),
                                                                ("file.discovered", "b")]
    configure_logging("console")
    info_each(log, "file.discovered", "rel_path", ["a b", "c"], watch="w")
    console = capsys.readouterr().out.splitlines()
    assert len(console) == 2 and "rel_path='a b'" in console[0] and "rel_path=c" in console[1]


def test_a_files_fields_ride_on_every_record_of_its_step(capsys) -> None:
    """One contextvar for the per-file fields (daemon/pipeline: set once per step); a record's
    own fields win; `enabled` says what the configured level filters out."""
    configure_logging("json", "warning")
    log = structlog.get_logger("test")
    with file_context({"watch": "w", "rel_path": "a.txt", "file_id": 7}):
        log.warning("file.original_kept", rel_path="b.txt")
        log.info("scan.verdict")
    log.warning("worker.error")
    kept, after = map(json.loads, capsys.readouterr().out.splitlines())
    assert (kept["event"], kept["watch"], kept["rel_path"], kept["file_id"]) == (
        "file.original_kept", "w", "b.txt", 7)
    assert after["event"] == "worker.error" and "file_id" not in after
    assert enabled(logging.WARNING) and not enabled(logging.INFO)
    structlog.reset_defaults()
    assert enabled(logging.DEBUG)


_AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def world_writable_base() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="scanwatch-nobody-"))
    base.chmod(0o777)
    yield base
    shutil.rmtree(base)


@pytest.fixture
def nobody_layout(world_writable_base: Path) -> Layout:
    """A watch whose folders the user nobody may write; `scan_as_nobody` runs scanwatch there."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv")
    if subprocess.run([*_AS_NOBODY, sys.executable, "-c", "import daemon"], cwd=ROOT).returncode:
        pytest.skip("the user nobody cannot run this checkout's Python")
    layout = Layout(world_writable_base)
    layout.inbox.chmod(0o777)
    layout.write_config()
    return layout


def scan_as_nobody(layout: Layout, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_AS_NOBODY, sys.executable, "-m", "daemon.cli", "scan", "--config", str(layout.config_path),
         *args], capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HOME": str(layout.base)})


def test_unreadable_file_goes_to_failed_never_clean(nobody_layout: Layout) -> None:
    layout = nobody_layout
    (layout.inbox / "locked.txt").write_bytes(b"only root may read this")
    (layout.inbox / "locked.txt").chmod(0o000)
    result = scan_as_nobody(layout, "--move", "--json", str(layout.inbox / "locked.txt"))
    assert result.returncode == 3, result.stderr
    assert '"reason": "unreadable"' in result.stdout
    assert layout.placed("failed") == ["locked.txt"] and layout.placed("clean") == []
    sidecar = yaml.safe_load((layout.failed / "locked.txt.scanwatch.json").read_text())
    assert sidecar["verdict"] == "failed" and sidecar["reason"] == "unreadable"


def test_quarantine_of_another_users_file_is_a_private_copy(nobody_layout: Layout) -> None:
    layout = nobody_layout
    upload = layout.inbox / "upload.com"
    upload.write_bytes(EICAR)  # owned by root: the daemon (nobody) may rename but not chmod it
    upload.chmod(0o644)
    result = scan_as_nobody(layout, "--move", str(upload))
    assert result.returncode == 1, result.stdout + result.stderr
    quarantined = layout.quarantine / "upload.com"
    assert quarantined.read_bytes() == EICAR and not upload.exists()
    assert quarantined.stat().st_mode & 0o777 == 0o600 and quarantined.stat().st_uid == 65534


def test_healthz_is_ready_then_unready_while_the_engine_is_down(layout: Layout, daemon_factory,
                                                                 tmp_path: Path) -> None:
    port = free_port()
    socket_path = tmp_path / "clamd.sock"  # nothing listens: the engine is down from the start
    config = layout.write_config(metrics={"listen": f"127.0.0.1:{port}"})
    config.write_text(config.read_text().replace("type: yara", f"type: clamav\n    socket: {socket_path}"))
    daemon = daemon_factory(config)
    daemon.wait_started()
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
    assert info.value.code == 503
    health = json.loads(info.value.read())
    assert health["ready"] is False and health["reasons"][0].startswith("engine default down")
    assert daemon.stop() == 0


def test_healthz_ready_with_a_working_engine(layout: Layout, daemon_factory) -> None:
    port = free_port()
    daemon = daemon_factory(layout.write_config(metrics={"listen": f"127.0.0.1:{port}"}))
    daemon.wait_started()
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read()
    assert json.loads(body) == {"ready": True, "reasons": []}
    assert daemon.stop() == 0


class _Receiver(http.server.BaseHTTPRequestHandler):
    events: list[dict[str, object]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Receiver.events.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.parametrize("workers", [1, 2])
def test_webhook_gets_infected_and_failed_events_not_clean(layout: Layout, daemon_factory,
                                                           workers: int) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Receiver.events = []
    url = f"http://127.0.0.1:{server.server_address[1]}/hook?token=s3cret-token"
    daemon = daemon_factory(layout.write_config(notify={"webhook": url}, workers=workers))
    daemon.wait_started()
    for i in range(20):
        (layout.inbox / f"ok{i}.txt").write_bytes(b"ok %d" % i)
    infected = [f"e{i}.com" for i in range(5)]
    for name in infected:
        (layout.inbox / name).write_bytes(EICAR)
    os.mkfifo(layout.inbox / "pipe")  # skipped, not failed: no event
    daemon.wait_for(lambda: len(_Receiver.events) >= 5 and len(daemon.named("file.moved")) >= 25,
                    what="five webhook events")
    time.sleep(0.5)
    server.shutdown()
    assert sorted(e["rel_path"] for e in _Receiver.events) == infected  # each one once
    event = _Receiver.events[0]
    assert event["event"] == "file.infected"
    assert event["threats"] == ["EICAR_Test_File"]
    assert event["destination"] == str(layout.quarantine / event["rel_path"])
    assert daemon.stop() == 0
    assert "s3cret-token" not in repr(daemon.events)


def test_a_down_webhook_never_stalls_scanning(layout: Layout, daemon_factory) -> None:
    url = f"http://127.0.0.1:{free_port()}/nobody-listens"
    daemon = daemon_factory(layout.write_config(notify={"webhook": url, "max_attempts": 3}))
    daemon.wait_started()
    for i in range(20):
        (layout.inbox / f"e{i}.com").write_bytes(EICAR)
    daemon.wait_for(lambda: len(daemon.named("file.moved")) >= 20, timeout=10, what="20 files moved")
    daemon.wait_for(lambda: daemon.named("alert.failed"), timeout=30, what="alert.failed")
    assert daemon.stop() == 0
    assert "nobody-listens" not in repr(daemon.events)
