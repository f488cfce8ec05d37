"""An attacker with write access to the drop folder races the daemon: nothing unscanned reaches clean.

Each test holds the real daemon at one named step (`daemon.faults` pause points),
does what an uploader could do at that instant, lets it go on, and then checks
docs/integrity.md's promise: every file in `clean` holds bytes that got a clean
verdict, nothing that was dropped is lost, and nothing is left behind. The same
attacks without pause points, by another uid, are in tests/test_attacks.py.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import EICAR, Daemon, Layout

from daemon.journal import Journal
from daemon.model import FileState, VerdictKind


class Pauses:
    """The test's side of `daemon.faults`: where the daemon waits, and letting it go."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir()

    def env(self, *points: str) -> dict[str, str]:
        return {"SCANWATCH_PAUSE_AT": ",".join(points), "SCANWATCH_PAUSE_DIR": str(self.folder)}

    def reached(self, daemon: Daemon, point: str) -> None:
        daemon.wait_for(lambda: (self.folder / f"{point}.reached").exists(), what=f"pause at {point}")

    def go(self, point: str) -> None:
        (self.folder / f"{point}.go").touch()


@pytest.fixture
def pauses(tmp_path: Path) -> Pauses:
    return Pauses(tmp_path / "pauses")


def _start(layout: Layout, daemon_factory: Callable[..., Daemon], env: dict[str, str],
           workers: int = 1) -> Daemon:
    daemon = daemon_factory(layout.write_config(workers=workers), env)
    daemon.wait_started()
    return daemon


def assert_clean_was_scanned(layout: Layout, *daemons: Daemon, killed: bool = False) -> None:
    """Every file in clean has bytes whose hash a clean verdict named; no temp is left over,
    and staging holds nothing once every row is done. `killed`: a daemon was killed -9, and
    its workers' last lines died with it (docs/operations.md, "Logging"), so the clean
    verdicts the journal keeps count too."""
    rows = Journal(layout.state / "journal.sqlite3").rows()
    scanned_clean = {e["ref_id"] for daemon in daemons
                     for e in daemon.named("scan.verdict") if e["verdict"] == "clean"}
    if killed:
        scanned_clean |= {r.ref_id for r in rows if r.verdict == VerdictKind.CLEAN and r.ref_id}
    scanned_clean = {ref_id.rpartition("#")[2][:12] for ref_id in scanned_clean}
    for path in layout.clean.rglob("*"):
        if path.is_file():
            assert not path.name.startswith(".scanwatch-"), f"left over: {path}"
            data = path.read_bytes()
            assert EICAR not in data, f"{path} holds EICAR"
            assert hashlib.sha256(data).hexdigest()[:12] in scanned_clean, f"{path} was never scanned clean"
    staging = layout.state / "staging"
    if staging.exists() and all(r.state in (FileState.DONE, FileState.GONE) for r in rows):
        assert list(staging.iterdir()) == []


def _evil_swap(layout: Layout, name: str) -> None:
    """rename(2) an EICAR file over `name` in the inbox: atomic, as an attacker would."""
    staged = layout.base / "staged.com"
    staged.write_bytes(EICAR)
    os.rename(staged, layout.inbox / name)


def test_file_renamed_over_the_name_before_the_move_is_scanned_not_promoted(
        layout: Layout, daemon_factory: Callable[..., Daemon], pauses: Pauses) -> None:
    daemon = _start(layout, daemon_factory, pauses.env("move.before_capture"))
    (layout.inbox / "a.txt").write_bytes(b"harmless")
    pauses.reached(daemon, "move.before_capture")  # identity checked, about to move by name
    _evil_swap(layout, "a.txt")
    pauses.go("move.before_capture")
    daemon.wait_for(lambda: layout.placed("quarantine") == ["a.txt"], what="the swapped-in file quarantined")
    assert daemon.stop() == 0
    # The snapshot that was scanned is placed; the file renamed over the name is a new arrival.
    assert layout.placed("clean") == ["a.txt"]
    assert (layout.clean / "a.txt").read_bytes() == b"harmless"
    assert (layout.quarantine / "a.txt").read_bytes() == EICAR
    assert (layout.quarantine / "a.txt").stat().st_mode & 0o777 == 0o600
    assert daemon.named("file.changed")
    assert list(layout.inbox.iterdir()) == []
    assert_clean_was_scanned(layout, daemon)


def test_file_renamed_over_the_name_during_the_scan_is_scanned_again(
        layout: Layout, daemon_factory: Callable[..., Daemon], pauses: Pauses) -> None:
    daemon = _start(layout, daemon_factory, pauses.env("scan.hashed"))
    (layout.inbox / "a.txt").write_bytes(b"harmless")
    pauses.reached(daemon, "scan.hashed")  # the snapshot is hashed, the engine not asked yet
    _evil_swap(layout, "a.txt")
    pauses.go("scan.hashed")
    daemon.wait_for(lambda: layout.placed("quarantine") == ["a.txt"], what="the swapped-in file quarantined")
    assert daemon.stop() == 0
    assert layout.placed("clean") == ["a.txt"]
    assert (layout.clean / "a.txt").read_bytes() == b"harmless"
    assert_clean_was_scanned(layout, daemon)


def test_directory_swapped_for_a_symlink_before_the_move_never_leads_outside(
        layout: Layout, daemon_factory: Callable[..., Daemon], pauses: Pauses) -> None:
    outside = layout.base / "outside"
    outside.mkdir()
    (outside / "a.txt").write_bytes(EICAR)
    daemon = _start(layout, daemon_factory, pauses.env("move.start"))
    (layout.inbox / "sub").mkdir()
    (layout.inbox / "sub" / "a.txt").write_bytes(b"harmless")
    pauses.reached(daemon, "move.start")
    os.rename(layout.inbox / "sub", layout.inbox / "sub.old")
    os.symlink(outside, layout.inbox / "sub")
    pauses.go("move.start")
    daemon.wait_for(lambda: daemon.named("file.moved") and not (layout.inbox / "sub.old" / "a.txt").exists(),
                    what="the harmless file placed")
    assert daemon.stop() == 0
    # The snapshot is placed once; the original, reached through the folder's descriptor (not
    # the link), is removed as unchanged; the link's target is untouched.
    [placed] = layout.placed("clean")
    assert (layout.clean / placed).read_bytes() == b"harmless"
    assert (outside / "a.txt").read_bytes() == EICAR
    assert layout.placed("quarantine") == []
    assert_clean_was_scanned(layout, daemon)


def test_hardlink_made_after_settling_cannot_reach_what_is_promoted(
        layout: Layout, daemon_factory: Callable[..., Daemon], pauses: Pauses) -> None:
    daemon = _start(layout, daemon_factory, pauses.env("move.start"))
    (layout.inbox / "a.txt").write_bytes(b"harmless")
    pauses.reached(daemon, "move.start")
    elsewhere = layout.base / "elsewhere.txt"
    os.link(layout.inbox / "a.txt", elsewhere)  # a second name the attacker keeps
    pauses.go("move.start")
    daemon.wait_for(lambda: daemon.named("file.moved"), what="file moved")
    assert daemon.stop() == 0
    promoted = layout.clean / "a.txt"
    assert promoted.read_bytes() == b"harmless"
    assert promoted.stat().st_ino != elsewhere.stat().st_ino and promoted.stat().st_nlink == 1
    elsewhere.write_bytes(EICAR)  # writing through the other name cannot reach clean
    assert promoted.read_bytes() == b"harmless"
    assert not daemon.named("move.failed")
    assert list(layout.inbox.iterdir()) == []


def _link_descriptor(fd: int, to: Path) -> None:
    """linkat(2) of `/proc/self/fd/N` with AT_SYMLINK_FOLLOW: a name for the inode a descriptor holds."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.linkat(-100, f"/proc/self/fd/{fd}".encode(), -100, bytes(to), 0x400) != 0:
        assert ctypes.get_errno() == errno.ENOENT  # the inode has no name left: it cannot get one


def test_writer_keeping_its_descriptor_cannot_write_into_clean(
        layout: Layout, daemon_factory: Callable[..., Daemon]) -> None:
    daemon = _start(layout, daemon_factory, {})
    with open(layout.inbox / "upload.bin", "wb", buffering=0) as writer:
        writer.write(b"harmless bytes")
        # It pauses past settle_seconds, keeping the descriptor: the file is scanned and moved.
        daemon.wait_for(lambda: daemon.named("file.moved"), what="file moved")
        writer.write(EICAR)
        _link_descriptor(writer.fileno(), layout.base / "relinked")
    assert daemon.stop() == 0
    assert (layout.clean / "upload.bin").read_bytes() == b"harmless bytes"
    relinked = layout.base / "relinked"
    assert not relinked.exists() or not os.path.samefile(layout.clean / "upload.bin", relinked)
    assert_clean_was_scanned(layout, daemon)


def test_truncation_through_a_held_descriptor_after_the_snapshot_is_scanned_again(
        layout: Layout, daemon_factory: Callable[..., Daemon], pauses: Pauses) -> None:
    daemon = _start(layout, daemon_factory, pauses.env("move.captured"))
    with open(layout.inbox / "upload.bin", "wb", buffering=0) as writer:
        writer.write(b"A" * 100_000)
        pauses.reached(daemon, "move.captured")  # snapshot placed, original taken out of the inbox
        os.ftruncate(writer.fileno(), 10)
        pauses.go("move.captured")
        daemon.wait_for(lambda: daemon.named("file.changed"), what="the change noticed")
        daemon.wait_for(lambda: len(layout.placed("clean")) == 2, what="the new bytes placed")
    assert daemon.stop() == 0
    assert (layout.clean / "upload.bin").read_bytes() == b"A" * 100_000  # the snapshot scanned first
    assert (layout.clean / "upload.1.bin").read_bytes() == b"A" * 10  # put back, scanned the second time
    assert list(layout.inbox.iterdir()) == []
    assert_clean_was_scanned(layout, daemon)


def test_an_original_grown_to_a_sparse_terabyte_after_the_snapshot_is_never_hashed(
        layout: Layout, daemon_factory: Callable[..., Daemon], pauses: Pauses) -> None:
    """Its size says it changed (`same_bytes`): not read (a terabyte of holes hashed is an
    hour of a worker), put back, and refused from its size as `too_large`."""
    daemon = _start(layout, daemon_factory, pauses.env("move.captured"))
    with open(layout.inbox / "upload.bin", "wb", buffering=0) as writer:
        writer.write(b"A" * 100_000)
        pauses.reached(daemon, "move.captured")
        os.ftruncate(writer.fileno(), 2**40)
        pauses.go("move.captured")
        failed = daemon.wait_for(lambda: [e for e in daemon.named("file.moved") if e["outcome"] == "failed"],
                                 what="the grown original refused")
    assert daemon.stop() == 0
    assert (layout.clean / "upload.bin").read_bytes() == b"A" * 100_000  # the snapshot scanned
    assert failed[0]["reason"] == "too_large" and layout.placed("failed") == ["upload.bin"]
    assert (layout.failed / "upload.bin").stat().st_size == 2**40
    assert list(layout.inbox.iterdir()) == []


@pytest.mark.parametrize(("workers", "point"), [
    (1, "move.captured"),  # one snapshot placed, its original captured into staging
    (2, "move.captured"),
    (1, "scan.hashed"),  # a snapshot made and hashed, nothing journaled of it yet
    (1, "move.start"),  # a verdict journaled, its snapshot waiting in staging
])
def test_kill_9_anywhere_in_a_move_finishes_it_once(
        layout: Layout, daemon_factory: Callable[..., Daemon], pauses: Pauses, workers: int,
        point: str) -> None:
    first = _start(layout, daemon_factory, pauses.env(point), workers)
    (layout.inbox / "a.txt").write_bytes(b"harmless")
    (layout.inbox / "e.com").write_bytes(EICAR)
    pauses.reached(first, point)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    second = _start(layout, daemon_factory, {}, workers)
    second.wait_for(lambda: layout.placed("clean") == ["a.txt"] and layout.placed("quarantine") == ["e.com"],
                    what="both placed")
    assert second.stop() == 0
    assert list(layout.inbox.iterdir()) == []
    leftovers = [p for root in (layout.clean, layout.quarantine) for p in root.rglob(".scanwatch-*")
                 if not p.name.endswith(".scanwatch.json")]
    assert leftovers == []
    rows = Journal(layout.state / "journal.sqlite3").rows()
    assert sorted(r.state for r in rows) == [FileState.DONE, FileState.DONE]
    assert_clean_was_scanned(layout, first, second, killed=True)
