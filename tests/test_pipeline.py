"""The pipeline through the in-tree fake engine: retries, waits, polls, changes, failed moves."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import EICAR, Harness, Layout
from fakes import FakeEngine, answers, raises
from structlog.testing import capture_logs

from daemon import staging as staging_module
from daemon.config import Config
from daemon.engines.yara import YaraEngine
from daemon.errors import EnginePermanentError, EngineRetryableError, EngineUnavailableError
from daemon.journal import Journal, owner_token
from daemon.model import FileState, Pending, Reason, Verdict, VerdictKind
from daemon.pipeline import Pipeline
from daemon.staging import StagingDirs


@pytest.fixture
def harness(layout: Layout) -> Harness:
    return Harness(layout, FakeEngine())


def test_clean_and_infected_go_to_their_places(harness: Harness) -> None:
    harness.drop("a.txt", b"hello")
    harness.drop("deep/er/e.com", EICAR)
    harness.step()
    assert harness.layout.placed("clean") == ["a.txt"]
    assert harness.layout.placed("quarantine") == ["deep/er/e.com"]
    assert not list(harness.layout.inbox.rglob("*.*"))
    quarantined = harness.layout.quarantine / "deep/er/e.com"
    assert quarantined.stat().st_mode & 0o777 == 0o600
    assert (harness.layout.quarantine / "deep").stat().st_mode & 0o777 == 0o700


def test_handed_arrivals_are_taken_with_the_rows_due_and_a_removed_watchs_dropped(
        harness: Harness) -> None:
    """daemon/handoff.py: a worker records what it is handed as its own and scans it (one
    not known settled, settled first), two messages a batch when the socket holds two,
    claims the journal's due rows in the same batch so a flood of arrivals does not starve
    them, and drops the arrivals of a watch a reload removed (they stay in its source)."""
    from daemon.fsutil import Identity
    from daemon.handoff import Handoff

    handoff = harness.pipeline.handoff = Handoff()
    now = harness.clock.now
    arrivals = [(name, Identity.of(os.lstat(harness.drop(name, data))), now)
                for name, data in (("a.txt", b"a"), ("e.com", EICAR))]
    harness.journal.discover("inbox", [("due.txt", os.lstat(harness.drop("due.txt", b"d")).st_ino)], now)
    assert handoff.offer("inbox", arrivals[:1], settled=True) == []
    assert handoff.offer("inbox", arrivals[1:], settled=False) == []
    assert handoff.offer("removed", [("x.txt", Identity(1, 1, 1, 1, 1), now)], settled=True) == []
    assert harness.pipeline.run_once(["inbox"]) == 3  # a.txt, e.com, and due.txt (settled first)
    assert harness.pipeline.run_once(["inbox"]) == 0  # the removed watch's arrival: dropped
    assert harness.layout.placed("clean") == ["a.txt", "due.txt"]
    assert harness.layout.placed("quarantine") == ["e.com"]
    assert sorted(r.rel_path for r in harness.journal.rows()) == ["a.txt", "due.txt", "e.com"]
    assert handoff.take() is None


@pytest.mark.parametrize(("engine_cfg", "first_batch"), [
    ({}, 64),  # YARA: four messages a batch
    ({"type": "clamav", "address": "127.0.0.1:9"}, 32),  # several scans in flight a thread: two
    ({"type": "blazelock", "url": "http://127.0.0.1:9", "api_key": "k"}, 16),  # seconds a scan: one
])
def test_a_batch_takes_as_many_handed_messages_as_its_engine_goes_fastest_with(
        layout: Layout, engine_cfg: dict[str, object], first_batch: int) -> None:
    """A batch's own costs are shared by more files when the socket holds several messages
    (daemon/pipeline/intake.py, `_MESSAGES`): four with YARA, two with clamd; an HTTP
    engine's thread, which scans its batch one file after another, takes one. A claim is
    16 rows whatever the engine."""
    from daemon.fsutil import Identity
    from daemon.handoff import Handoff

    harness = Harness(layout, FakeEngine(), engine_cfg=engine_cfg)
    handoff = harness.pipeline.handoff = Handoff()
    now = harness.clock.now
    arrivals = [(f"f{i:03d}.txt", Identity.of(os.lstat(harness.drop(f"f{i:03d}.txt", b"x"))), now)
                for i in range(140)]
    assert handoff.offer("inbox", arrivals, settled=True) == []  # nine messages
    assert harness.pipeline.run_once(["inbox"]) == first_batch
    assert len(harness.journal.rows()) == first_batch
    while handoff.take() is not None:  # the rest is found by a sweep
        pass
    harness.watcher.step()
    assert harness.pipeline.run_once(["inbox"]) == 16
    handoff.close()


def test_retryable_error_is_retried_after_backoff_then_succeeds(harness: Harness) -> None:
    harness.engine.script = [raises(EngineRetryableError("503 busy"))]
    harness.drop("a.txt", b"hello")
    with capture_logs() as logs:
        harness.step()
    assert harness.row().state is FileState.STABLE
    assert [e["event"] for e in logs if e["event"] == "retry.scheduled"]
    harness.step(advance_s=1)  # not due yet unless the jittered delay was tiny
    harness.step(advance_s=10)
    assert harness.layout.placed("clean") == ["a.txt"]
    assert harness.row().attempts == 2


def test_file_fails_after_max_attempts_with_the_error_reason(harness: Harness) -> None:
    error = EngineRetryableError("timed out", reason=Reason.TIMEOUT)
    harness.engine.script = [raises(error)] * 3
    harness.drop("a.txt", b"hello")
    for _ in range(4):
        harness.step(advance_s=11)
    assert harness.layout.placed("failed") == ["a.txt"]
    assert harness.row().reason == "timeout"
    assert len(harness.engine.calls) == 3
    sidecar = json.loads((harness.layout.failed / "a.txt.scanwatch.json").read_text())
    assert sidecar["sha256"] == hashlib.sha256(b"hello").hexdigest() and sidecar["size"] == 5
    assert sidecar["external_reference_id"].startswith("inbox:a.txt#")


def test_permanent_error_fails_at_once_with_sidecar(harness: Harness) -> None:
    harness.engine.script = [raises(EnginePermanentError("too big", reason=Reason.TOO_LARGE))]
    harness.drop("a.txt", b"hello")
    harness.step()
    assert harness.layout.placed("failed") == ["a.txt"]
    sidecar = (harness.layout.failed / "a.txt.scanwatch.json").read_text()
    assert '"reason": "too_large"' in sidecar and '"verdict": "failed"' in sidecar


def test_engine_down_makes_files_wait_without_spending_attempts(harness: Harness) -> None:
    harness.engine.script = [raises(EngineUnavailableError("connection refused"))] * 5
    harness.drop("a.txt", b"hello")
    for _ in range(5):
        harness.step(advance_s=11)
        assert harness.layout.placed("failed") == []
    assert harness.row().attempts == 0
    harness.step(advance_s=11)
    assert harness.layout.placed("clean") == ["a.txt"]


def test_engine_down_past_max_pending_age_fails_engine_unavailable(layout: Layout) -> None:
    engine = FakeEngine(script=[raises(EngineUnavailableError("down"))] * 10)
    harness = Harness(layout, engine, engine_cfg={"max_pending_age": 30})
    harness.drop("a.txt", b"hello")
    for _ in range(5):
        harness.step(advance_s=11)
    assert harness.layout.placed("failed") == ["a.txt"]
    assert harness.row().reason == "engine_unavailable"


def test_pending_scan_is_polled_without_resubmitting(harness: Harness) -> None:
    harness.engine.remote = True
    harness.engine.script = [answers(Pending("scan-1", poll_after_s=5))]
    harness.engine.polls["scan-1"] = [Pending("scan-1", 5),
                                      Verdict(VerdictKind.INFECTED, threats=("X",), engine_scan_id="scan-1")]
    harness.drop("a.txt", b"hello")
    harness.step()
    row = harness.row()
    assert row.state is FileState.SCANNING and row.owner is None and row.engine_scan_id == "scan-1"
    assert row.ref_id and row.ref_id.startswith("inbox:a.txt#")  # journaled before submitting
    harness.step(advance_s=6)
    harness.step(advance_s=6)
    assert harness.layout.placed("quarantine") == ["a.txt"]
    assert [c[0] for c in harness.engine.calls] == ["scan", "poll", "poll"]


def test_a_file_rewritten_while_its_remote_scan_runs_is_scanned_as_a_new_arrival(harness: Harness) -> None:
    harness.engine.remote = True
    harness.engine.script = [answers(Pending("old-scan", poll_after_s=5))]
    harness.engine.polls["old-scan"] = [Verdict(VerdictKind.CLEAN, engine_scan_id="old-scan")]
    path = harness.drop("a.txt", b"hello")
    harness.step()
    path.write_bytes(EICAR)  # rewritten while the engine scans the old bytes' snapshot
    for _ in range(3):
        harness.step(advance_s=6)
    # The old scan's clean verdict goes with its snapshot; the new bytes are scanned anew.
    assert harness.layout.placed("clean") == ["a.txt"]
    assert (harness.layout.clean / "a.txt").read_bytes() == b"hello"
    assert harness.layout.placed("quarantine") == ["a.txt"]
    assert (harness.layout.quarantine / "a.txt").read_bytes() == EICAR
    assert [c[0] for c in harness.engine.calls] == ["scan", "poll", "scan"]


def test_bytes_changed_between_scan_and_move_are_scanned_again(harness: Harness) -> None:
    path = harness.drop("a.txt", b"hello")

    def rewrite(request: object) -> Verdict:
        path.write_bytes(EICAR)  # a writer sneaks in while the engine works
        return Verdict(VerdictKind.CLEAN)

    harness.engine.script = [rewrite]
    with capture_logs() as logs:
        harness.step()
        harness.step(advance_s=1)
    # The snapshot that was scanned is placed; the rewritten original is a new arrival.
    assert "file.changed" in [e["event"] for e in logs]
    assert harness.layout.placed("clean") == ["a.txt"]
    assert (harness.layout.clean / "a.txt").read_bytes() == b"hello"
    assert harness.layout.placed("quarantine") == ["a.txt"]


def test_failed_move_leaves_file_in_source_and_retries(harness: Harness) -> None:
    harness.layout.clean.parent.mkdir(exist_ok=True)
    harness.layout.clean.write_text("a file where the clean directory should be")
    harness.drop("a.txt", b"hello")
    with capture_logs() as logs:
        harness.step()
    assert (harness.layout.inbox / "a.txt").exists()
    row = harness.row()
    assert row.state is FileState.VERDICT and row.move_attempts == 1 and row.last_error
    assert "move.failed" in [e["event"] for e in logs]
    harness.layout.clean.unlink()
    harness.step(advance_s=11)
    assert harness.layout.placed("clean") == ["a.txt"]


def test_collision_gets_numbered_suffix_before_last_extension(harness: Harness) -> None:
    harness.layout.clean.mkdir()
    (harness.layout.clean / "a.tar.gz").write_text("earlier")
    (harness.layout.clean / "README").write_text("earlier")
    harness.drop("a.tar.gz", b"new")
    harness.drop("README", b"new")
    harness.step()
    assert (harness.layout.clean / "a.tar.gz").read_text() == "earlier"
    assert (harness.layout.clean / "a.tar.1.gz").read_bytes() == b"new"
    assert (harness.layout.clean / "README.1").read_bytes() == b"new"


def test_directory_swapped_for_symlink_is_never_followed(harness: Harness, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.txt").write_bytes(b"not yours")
    harness.drop("sub/a.txt", b"hello")
    harness.watcher.step()  # recorded and settled as sub/a.txt
    (harness.layout.inbox / "sub").rename(tmp_path / "moved-away")
    (harness.layout.inbox / "sub").symlink_to(outside)
    harness.step()
    assert (outside / "a.txt").read_bytes() == b"not yours"
    assert harness.engine.seen == []
    assert harness.row("sub/a.txt").state is FileState.HELD


def test_cross_filesystem_move_copies_verifies_and_removes_source(layout: Layout) -> None:
    shm = Path("/dev/shm") / f"scanwatch-test-{os.getpid()}"
    try:
        harness = Harness(layout, FakeEngine(), clean=str(shm / "clean"))
        harness.drop("a.txt", b"hello" * 1000)
        os.utime(layout.inbox / "a.txt", ns=(1, 2))
        harness.step()
        assert (shm / "clean" / "a.txt").read_bytes() == b"hello" * 1000
        assert (shm / "clean" / "a.txt").stat().st_mtime_ns == 2
        assert not (layout.inbox / "a.txt").exists()
        assert [p.name for p in (shm / "clean").iterdir()] == ["a.txt"]
    finally:
        subprocess.run(["rm", "-rf", str(shm)], check=True)


def test_disk_full_on_destination_keeps_file_and_recovers(layout: Layout, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        harness = Harness(layout, FakeEngine(), clean=str(small))
        harness.drop("big.bin", os.urandom(256 * 1024))
        harness.step()
        assert (layout.inbox / "big.bin").exists()
        assert harness.row("big.bin").state is FileState.VERDICT
        assert "No space left" in (harness.row("big.bin").last_error or "")
        assert [p.name for p in small.iterdir()] == []  # no half-written temp left behind
        subprocess.run(["mount", "-o", "remount,size=1m", str(small)], check=True)
        harness.step(advance_s=11)
        assert (small / "big.bin").stat().st_size == 256 * 1024
        assert not (layout.inbox / "big.bin").exists()
    finally:
        subprocess.run(["umount", "-l", str(small)])


def test_yara_timeout_is_retried_then_fails_with_reason_timeout(layout: Layout, tmp_path: Path) -> None:
    rules = tmp_path / "slow.yar"
    # About 4 s of matching for 8 MB here: far past the 1 s timeout even on a fast machine.
    rules.write_text("rule slow { condition: for all i in (0..filesize-1) : "
                     "(for all j in (0..7) : ((uint8(i) | j) == (0x61 | j))) }")
    engine_cfg = {"rules": [str(rules)], "timeout": 1, "max_attempts": 2}
    config = Config.model_validate(layout.config(engine=engine_cfg))
    harness = Harness(layout, YaraEngine("default", config.engines["default"]), engine_cfg=engine_cfg)
    harness.drop("slow.bin", b"a" * (8 << 20))
    harness.drop("quick.txt", b"b")
    with capture_logs() as logs:
        harness.step()
        harness.step(advance_s=11)
    assert harness.layout.placed("failed") == ["slow.bin"]
    assert harness.layout.placed("clean") == ["quick.txt"]
    assert harness.row("slow.bin").reason == "timeout" and harness.row("slow.bin").attempts == 2
    assert [e["reason"] for e in logs if e["event"] == "retry.scheduled"] == ["timeout"]


def test_a_batch_fsyncs_its_destination_folder_once_before_journaling_the_moves(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """One fsync per folder and batch (not per file), and before the commit that says done."""
    events: list[str] = []
    fsync, apply = os.fsync, harness.journal.apply

    def counted_fsync(fd: int) -> None:
        events.append(f"fsync {os.readlink(f'/proc/self/fd/{fd}')}")
        fsync(fd)

    def noted_apply(changes, kept=()):  # type: ignore[no-untyped-def]
        changes = list(changes)
        if any(fields.get("state") is FileState.DONE for _, fields in changes):
            events.append("done")
        apply(changes, kept)

    monkeypatch.setattr(os, "fsync", counted_fsync)
    monkeypatch.setattr(harness.journal, "apply", noted_apply)
    for i in range(16):
        harness.drop(f"f{i}.txt", b"hello %d" % i)
    harness.step()
    assert len(harness.layout.placed("clean")) == 16
    assert events == [f"fsync {harness.layout.clean}", "done"]


def test_a_yara_batch_keeps_its_verdicts_in_the_cache_with_the_commit_of_its_verdicts(
        layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    """16 small files, YARA, the verdict cache on: the journal writes of the batch are its
    claim, the verdicts with their cache entries, and the moves (no flights: docs/engines.md,
    "Verdict cache")."""
    config = Config.model_validate(layout.config())
    harness = Harness(layout, YaraEngine("default", config.engines["default"]))
    for i in range(16):
        harness.drop(f"f{i}.txt", b"hello %d" % i)
    harness.watcher.step()
    writes = harness.journal_writes(monkeypatch)
    harness.pipeline.run_once(["inbox"])
    assert len(harness.layout.placed("clean")) == 16
    assert writes[0] == 1 + 1 + 1
    assert harness.journal.verdicts.stats() == {"default": (0, 16)}
    assert harness.journal.verdicts.size("default") == 16


@pytest.mark.parametrize(("concurrency", "threads"), [(1, 1), (2, 1), (3, 2), (8, 4)])
def test_worker_processes_share_out_an_engines_scan_threads(layout: Layout, concurrency: int,
                                                            threads: int) -> None:
    """`workers: 2`: `concurrency` threads in all, so none waits for its process's GIL while it
    holds the journal's writers' lock behind a sibling thread (docs/operations.md)."""
    config = Config.model_validate({**layout.config(engine={"concurrency": concurrency}), "workers": 2})
    pipeline = Pipeline(config, Journal(layout.state / "journal.sqlite3"), {"default": FakeEngine()},
                        owner=owner_token())
    assert pipeline._workers("default") == threads


def test_a_snapshot_has_its_name_only_once_filled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    staging = StagingDirs(tmp_path / "state").for_source(str(tmp_path))
    source = tmp_path / "original"
    source.write_bytes(b"x" * 10_000)
    seen: list[bool] = []
    copy = staging_module.copy_into

    def watched_copy(src: int, dst: int, dev: int | None = None) -> str:
        seen.append(os.path.exists(os.path.join(staging.path, "7.snap")))
        return copy(src, dst, dev)

    monkeypatch.setattr(staging_module, "copy_into", watched_copy)
    fd = os.open(source, os.O_RDONLY)
    try:
        snap, _ = staging.snapshot(fd, 7)
    finally:
        os.close(fd)
    os.close(snap)
    assert seen == [False]
    assert (Path(staging.path) / "7.snap").read_bytes() == b"x" * 10_000
    assert (Path(staging.path) / "7.snap").stat().st_mode & 0o777 == 0o600
