"""Snapshots (docs/integrity.md): a reflink on XFS, a copy on ext4, a private staging
directory or none, and staging reconciled with the journal at start."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import EICAR, Daemon, Harness, Layout
from fakes import FakeEngine
from structlog.testing import capture_logs

from daemon import staging as staging_module
from daemon.errors import StagingError
from daemon.fsutil import Identity
from daemon.locations import local as local_module
from daemon.model import FileState
from daemon.pipeline.reconcile import reconcile
from daemon.staging import Staging, StagingDirs


@pytest.fixture(scope="module")
def xfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 512 MB XFS image with reflinks, loop-mounted (skipped where that is impossible)."""
    base = tmp_path_factory.mktemp("xfs")
    image, mnt = base / "xfs.img", base / "mnt"
    mnt.mkdir()
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs is not installed (xfsprogs)")
    with open(image, "wb") as f:
        f.truncate(512 << 20)
    made = subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"mkfs.xfs failed: {made.stderr.decode().strip()}")
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount an XFS image here: {mounted.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _snapshot_of(tmp: Path, data: bytes) -> tuple[str, bytes]:
    """How a snapshot of a file holding `data` is made under `tmp`, and its bytes."""
    (tmp / "src").write_bytes(data)
    staging = StagingDirs(tmp / "state").for_source(str(tmp))
    src = os.open(tmp / "src", os.O_RDONLY)
    try:
        fd, how = staging.snapshot(src, 7)
    finally:
        os.close(src)
    try:
        return how, os.pread(fd, len(data) + 1, 0)
    finally:
        os.close(fd)


def test_a_snapshot_on_xfs_is_a_reflink(xfs: Path) -> None:
    base = xfs / "unit"
    base.mkdir()
    data = os.urandom(3 << 20)
    assert _snapshot_of(base, data) == ("reflink", data)


def test_a_snapshot_on_the_root_filesystem_is_a_copy(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    how, copied = _snapshot_of(tmp_path, data)
    assert copied == data
    assert how in ("copy_file_range", "reflink")  # reflink only if / is XFS or Btrfs


def test_a_filesystem_without_reflinks_is_asked_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FICLONE answered "not supported" is that filesystem's answer: the next snapshots there
    go straight to a copy, one failed ioctl fewer per file."""
    asked: list[int] = []
    ioctl = staging_module.fcntl.ioctl

    def counted(fd: int, request: int, arg: int) -> object:
        asked.append(request)
        return ioctl(fd, request, arg)

    monkeypatch.setattr(staging_module, "_NO_REFLINK", set())
    monkeypatch.setattr(staging_module.fcntl, "ioctl", counted)
    first, copied = _snapshot_of(tmp_path, b"one")
    if first == "reflink":
        pytest.skip("this filesystem makes reflinks")
    assert copied == b"one" and asked == [staging_module._FICLONE]
    for data in (b"two", b"three"):
        assert _snapshot_of(tmp_path, data) == (first, data)
    assert len(asked) == 1


def _source(path: Path, kind: str) -> bytes:
    """A file to copy, and its bytes: `sparse` is 5 MiB with a head, 4 KiB of data at
    2 MiB, and holes between them and at the end."""
    with open(path, "wb") as f:
        if kind == "sparse":
            f.write(b"head")
            f.seek(2 << 20)
            f.write(os.urandom(4096))
            f.truncate(5 << 20)
        else:
            f.write({"dense": os.urandom(3 << 20), "small": b"small", "empty": b""}[kind])
    return path.read_bytes()


@pytest.mark.parametrize("how", ["copy_file_range", "read"])
@pytest.mark.parametrize("kind", ["sparse", "dense", "small", "empty"])
def test_a_copy_has_every_byte_and_keeps_the_holes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   how: str, kind: str) -> None:
    """Past its first MiB only what holds data is copied: a sparse file's holes cost no disk."""
    data = _source(tmp_path / "src", kind)
    dev = os.stat(tmp_path).st_dev
    monkeypatch.setattr(staging_module, "_NO_REFLINK", {dev})
    if how == "read":
        def unsupported(*_: object) -> int:
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(staging_module.os, "copy_file_range", unsupported)
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert staging_module.copy_into(src, dst, dev) == how
    finally:
        os.close(src)
        os.close(dst)
    assert (tmp_path / "dst").read_bytes() == data
    if kind == "sparse":
        assert (tmp_path / "dst").stat().st_blocks * 512 <= (1 << 20) + 64 * 1024


def test_the_daemon_works_end_to_end_on_xfs_with_reflinks(
        xfs: Path, daemon_factory: Callable[..., Daemon]) -> None:
    layout = Layout(xfs / "e2e")
    daemon = daemon_factory(layout.write_config())
    daemon.wait_started()
    (layout.inbox / "a.bin").write_bytes(b"x" * (1 << 20))
    (layout.inbox / "e.com").write_bytes(EICAR)
    daemon.wait_for(lambda: len(daemon.named("file.moved")) == 2, what="both moved")
    assert daemon.stop() == 0
    assert {e["how"] for e in daemon.named("file.snapshot")} == {"reflink"}
    assert (layout.clean / "a.bin").read_bytes() == b"x" * (1 << 20)
    assert layout.placed("quarantine") == ["e.com"]
    assert list(layout.inbox.iterdir()) == [] and list((layout.state / "staging").iterdir()) == []


@pytest.mark.parametrize("spoil", ["group_writable", "symlink", "other_owner"])
def test_a_staging_directory_not_ours_alone_is_refused_and_files_wait(layout: Layout, spoil: str) -> None:
    harness = Harness(layout, FakeEngine())
    staging = layout.state / "staging"
    layout.state.mkdir(parents=True, exist_ok=True)
    if spoil == "symlink":
        (layout.base / "elsewhere").mkdir()
        staging.symlink_to(layout.base / "elsewhere")
    else:
        staging.mkdir(0o700)
        if spoil == "group_writable":
            staging.chmod(0o770)
        else:
            os.chown(staging, 65534, 65534)
    harness.drop("a.txt", b"hello")
    harness.step()
    row = harness.row()
    assert row.state is FileState.STABLE and "staging directory" in (row.last_error or "")
    assert harness.engine.calls == [] and (layout.inbox / "a.txt").exists()
    with pytest.raises(StagingError):
        StagingDirs(layout.state).for_source(str(layout.inbox))


def test_staging_is_reconciled_with_the_journal_at_start(layout: Layout) -> None:
    harness = Harness(layout, FakeEngine())
    harness.drop("kept.txt", b"kept")
    harness.drop("changed.txt", b"scanned bytes")
    harness.run()
    kept, changed = harness.row("kept.txt"), harness.row("changed.txt")
    staging = layout.state / "staging"
    # As a crash could leave them: a snapshot without a row, two originals of done rows.
    (staging / "999.snap").write_bytes(b"orphan")
    (staging / f"{kept.id}.orig").write_bytes(b"kept")
    (staging / f"{changed.id}.orig").write_bytes(b"written after the snapshot")
    assert changed.sha256 == hashlib.sha256(b"scanned bytes").hexdigest()
    reconcile(harness.config, harness.journal, harness.pipeline.staging, harness.clock.now)
    assert list(staging.iterdir()) == []
    assert (layout.inbox / "changed.txt").read_bytes() == b"written after the snapshot"
    harness.run()
    assert layout.placed("clean") == ["changed.1.txt", "changed.txt", "kept.txt"]
    assert (layout.clean / "changed.1.txt").read_bytes() == b"written after the snapshot"


def test_a_snapshot_of_a_file_changed_since_it_settled_is_dropped_at_once(
        layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/integrity.md: what was opened is judged only if it still is what settled; its
    snapshot goes at once, not left in staging until the next start when the file then
    vanishes (or is held: a symlink, a hardlink) and no move ever removes it."""
    harness = Harness(layout, FakeEngine())
    harness.drop("a.txt", b"first bytes")
    snapshot = local_module._snapshot

    def written_then_removed(staging: Staging, dir_fd: int, base: str, file_id: int) -> tuple[int, Identity]:
        os.utime(base, dir_fd=dir_fd, ns=(1, 1))  # written between the worker's look and its open
        try:
            return snapshot(staging, dir_fd, base, file_id)
        finally:
            os.unlink(base, dir_fd=dir_fd)  # and gone once opened

    monkeypatch.setattr(local_module, "_snapshot", written_then_removed)
    with capture_logs() as logs:
        harness.run()
    events = [e["event"] for e in logs if e["event"].startswith("file.")]
    assert events[-2:] == ["file.changed", "file.vanished"]
    assert harness.row().state is FileState.GONE
    assert list((layout.state / "staging").iterdir()) == []


def test_a_state_dir_on_another_filesystem_puts_staging_in_the_source_never_an_arrival(
        layout: Layout, tmp_path: Path) -> None:
    layout.state.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(layout.state)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        harness = Harness(layout, FakeEngine(), ignore=[])  # not even `.*` ignored
        harness.drop("a.txt", b"hello")
        harness.drop("sub/e.com", EICAR)
        harness.run()
        staging = layout.inbox / ".scanwatch-staging"
        assert staging.is_dir() and staging.stat().st_mode & 0o777 == 0o700
        (staging / "stray.bin").write_bytes(b"not an arrival")  # as if left there
        harness.step(advance_s=3)  # a rescan walks the whole source
        assert sorted(r.rel_path for r in harness.journal.rows()) == ["a.txt", "sub/e.com"]
        assert layout.placed("clean") == ["a.txt"] and layout.placed("quarantine") == ["sub/e.com"]
    finally:
        subprocess.run(["umount", "-l", str(layout.state)], check=False)
