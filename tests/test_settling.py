"""The settle step, taken by the worker that claims a discovered file (daemon/pipeline/settling.py).

The harness's clock runs years ahead of the files' real times, so each file's mtime is set
on that clock: it is what makes a file fresh or quiet here (its ctime, real, is older).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import EICAR, Harness, Layout
from fakes import FakeEngine
from structlog.testing import capture_logs

from daemon.fsutil import Identity
from daemon.model import FileState

_SETTLE_S = 2.0


@pytest.fixture
def harness(layout: Layout) -> Harness:
    return Harness(layout, FakeEngine(), settle_seconds=_SETTLE_S)


def _drop(harness: Harness, rel: str, data: bytes, *, mtime: float) -> Path:
    path = harness.drop(rel, data)
    os.utime(path, (mtime, mtime))
    return path


def _claim_and_carry(harness: Harness) -> None:
    while harness.pipeline.run_once(["inbox"]):
        pass


def test_a_file_is_settled_by_the_worker_that_claims_it_and_scanned_in_the_same_batch(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recorded with its identity, due once it will have settled; then one claim, one verdict,
    one placement: no transaction of its own for the settle step, in any process."""
    path = _drop(harness, "a.txt", b"hello", mtime=harness.clock.now)
    _drop(harness, "e.com", EICAR, mtime=harness.clock.now)
    harness.step()  # the watcher's first step sweeps
    row = harness.row()
    assert row.state is FileState.DISCOVERED and row.identity == Identity.of(os.lstat(path))
    assert row.next_attempt_at == harness.clock.now + _SETTLE_S
    _claim_and_carry(harness)
    assert harness.row().state is FileState.DISCOVERED  # not due: nothing claimed
    writes = harness.journal_writes(monkeypatch)
    harness.clock.now += _SETTLE_S
    assert harness.pipeline.run_once(["inbox"]) == 2  # one batch
    assert harness.layout.placed("clean") == ["a.txt"]
    assert harness.layout.placed("quarantine") == ["e.com"]
    assert writes[0] == 3  # its claim, its verdicts, its placements
    done = harness.row()
    assert done.state is FileState.DONE and done.stable_at == harness.clock.now and done.attempts == 1


def test_a_file_written_again_before_its_look_waits_a_settle_period_from_the_last_write(
        harness: Harness) -> None:
    path = _drop(harness, "a.txt", b"hello", mtime=harness.clock.now)
    harness.step()
    harness.clock.now += _SETTLE_S
    with path.open("ab") as f:
        f.write(b" again")
    os.utime(path, (harness.clock.now - 0.5, harness.clock.now - 0.5))  # written half a second ago
    _claim_and_carry(harness)
    row = harness.row()
    assert row.state is FileState.DISCOVERED and row.owner is None and row.attempts == 0
    assert row.identity == Identity.of(os.lstat(path))
    assert row.next_attempt_at == harness.clock.now + _SETTLE_S - 0.5
    assert harness.engine.calls == []
    harness.clock.now += _SETTLE_S - 0.5
    _claim_and_carry(harness)
    assert harness.layout.placed("clean") == ["a.txt"]
    assert (harness.layout.clean / "a.txt").read_bytes() == b"hello again"
    assert harness.row().attempts == 1


def test_times_ahead_of_the_clock_hold_a_file_one_settle_period_only(harness: Harness) -> None:
    """A network filesystem's clock ahead of ours: unchanged across a whole settle period is
    settled, whatever its times say."""
    _drop(harness, "a.txt", b"hello", mtime=harness.clock.now + 3600)
    harness.step()
    assert harness.row().next_attempt_at == harness.clock.now + _SETTLE_S
    harness.clock.now += _SETTLE_S
    _claim_and_carry(harness)
    assert harness.layout.placed("clean") == ["a.txt"]


def test_a_file_gone_or_turned_into_a_symlink_before_its_look_is_not_scanned(
        harness: Harness, tmp_path: Path) -> None:
    gone = _drop(harness, "gone.txt", b"x", mtime=harness.clock.now)
    swapped = _drop(harness, "swapped.txt", b"y", mtime=harness.clock.now)
    harness.step()
    gone.unlink()
    swapped.unlink()
    (tmp_path / "elsewhere").write_bytes(b"not ours")
    swapped.symlink_to(tmp_path / "elsewhere")
    harness.clock.now += _SETTLE_S
    with capture_logs() as logs:
        _claim_and_carry(harness)
    assert harness.row("gone.txt").state is FileState.GONE
    held = harness.row("swapped.txt")
    assert held.state is FileState.HELD and held.reason == "symlink"
    assert sorted((e["event"], e["rel_path"]) for e in logs if e["event"] in ("file.vanished", "file.skipped")
                  ) == [("file.skipped", "swapped.txt"), ("file.vanished", "gone.txt")]
    assert harness.engine.calls == [] and swapped.is_symlink()
