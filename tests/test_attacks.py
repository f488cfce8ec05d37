"""A second, unprivileged uid races the real daemon with inotify only (no pause points).

The uploader (`nobody`, through `setpriv`) runs tests/attacker.py on a drop folder it owns,
holding its own descriptors, while the daemon (root, as a service with CAP_LEASE would be)
does its work. docs/integrity.md lists each attack and what must hold: `clean` never holds
bytes that were not scanned clean, nothing dropped is lost or stranded, no name of the
daemon's is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import EICAR, ROOT, Daemon, Layout
from test_integrity import Pauses, assert_clean_was_scanned

from daemon.journal import Journal
from daemon.model import FileState

NOBODY = 65534
_AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
_WITHOUT_DAC = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")
ATTACKER = str(ROOT / "tests" / "attacker.py")
EICAR_PATH = str(ROOT / "samples" / "eicar.com")

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv to play a second uid")


@pytest.fixture
def drop() -> Iterator[Layout]:
    """A layout the other uid can reach: its inbox is the uploader's own folder."""
    base = Path(tempfile.mkdtemp(prefix="scanwatch-attack-"))
    base.chmod(0o755)
    layout = Layout(base)
    os.chown(layout.inbox, NOBODY, NOBODY)
    yield layout
    shutil.rmtree(base, ignore_errors=True)


def _attacker(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*_AS_NOBODY, sys.executable, ATTACKER, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen[str]) -> dict[str, object]:
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    result: dict[str, object] = json.loads(out)
    return result


def _start(layout: Layout, factory: Callable[..., Daemon], wrapper: tuple[str, ...] = (),
           **watch: object) -> Daemon:
    daemon = factory(layout.write_config(watch=watch or None), wrapper=wrapper)
    daemon.wait_started()
    return daemon


def _nothing_left(layout: Layout) -> None:
    """No temporary of the daemon's anywhere; staging holds nothing once all is done."""
    for root in (layout.clean, layout.quarantine, layout.failed, layout.inbox):
        names = [p for p in root.rglob(".scanwatch-*") if not p.name.endswith(".scanwatch.json")]
        assert names == [], names
    assert list((layout.state / "staging").iterdir()) == []


def _files_left(layout: Layout) -> set[str]:
    """The regular files still in the inbox (symlinks left out), relative to it."""
    return {str(p.relative_to(layout.inbox)) for p in layout.inbox.rglob("*")
            if p.is_file() and not p.is_symlink()}


def _all_done(layout: Layout) -> bool:
    rows = Journal(layout.state / "journal.sqlite3").rows()
    return bool(rows) and all(r.state in (FileState.DONE, FileState.GONE, FileState.HELD) for r in rows)


def test_bytes_flipped_during_the_scan_never_reach_clean(
        drop: Layout, daemon_factory: Callable[..., Daemon]) -> None:
    daemon = _start(drop, daemon_factory, settle_seconds=0.5)
    attacker = _attacker("flip", str(drop.inbox / "big.bin"), "48", EICAR_PATH)
    daemon.wait_for(lambda: daemon.named("file.moved") and _all_done(drop), timeout=90,
                    what="the file moved")
    attacker.wait(90)
    assert daemon.stop() == 0
    result = _result(attacker)
    for path in drop.clean.rglob("*"):
        assert not path.is_file() or EICAR not in path.read_bytes(), f"{path} holds EICAR ({result})"
    assert drop.placed("quarantine") == ["big.bin"]
    assert_clean_was_scanned(drop, daemon)
    _nothing_left(drop)


def test_an_o_path_descriptor_cannot_reach_the_promoted_file(
        drop: Layout, daemon_factory: Callable[..., Daemon]) -> None:
    daemon = _start(drop, daemon_factory)
    attacker = _attacker("opath", str(drop.inbox / "a.txt"), str(drop.clean / "a.txt"), EICAR_PATH)
    daemon.wait_for(lambda: daemon.named("file.moved"), what="the file moved")
    result = _result(attacker)
    daemon.wait_for(lambda: _all_done(drop), what="every row settled")
    assert daemon.stop() == 0
    promoted = drop.clean / "a.txt"
    assert promoted.read_bytes() == b"harmless bytes", result
    assert promoted.stat().st_uid == os.geteuid() and promoted.stat().st_nlink == 1
    assert promoted.stat().st_ino != result["inode"]  # a snapshot, never the uploader's inode
    relinked = drop.inbox / ".relinked"
    assert not relinked.exists() or not os.path.samefile(promoted, relinked)
    assert_clean_was_scanned(drop, daemon)
    _nothing_left(drop)


def test_a_shared_mapping_flipping_the_bytes_reaches_neither_clean_nor_the_promoted_file(
        drop: Layout, daemon_factory: Callable[..., Daemon]) -> None:
    """docs/integrity.md: an uploader who keeps only a shared writable mapping flips the bytes
    between harmless and EICAR through memory while the daemon reads (no system call, no
    inotify event), then leaves EICAR in it. Whatever each snapshot caught is what
    was scanned and placed; a changed original goes round again; clean never holds EICAR
    nor the uploader's inode."""
    daemon = _start(drop, daemon_factory, settle_seconds=0)
    result = _result(_attacker("mapped", str(drop.inbox / "a.txt"), "2", EICAR_PATH))
    assert result["flips"], result
    daemon.wait_for(lambda: not _files_left(drop) and _all_done(drop),
                    timeout=30, what="the inbox emptied and every row settled")
    assert daemon.stop() == 0
    placed = drop.placed("clean") + drop.placed("quarantine")
    assert placed, daemon.named("file.moved")
    for name in drop.placed("clean"):
        st = (drop.clean / name).stat()
        assert (st.st_uid, st.st_nlink) == (os.geteuid(), 1)
        assert st.st_ino != result["inode"]
    assert_clean_was_scanned(drop, daemon)
    _nothing_left(drop)


@pytest.mark.parametrize("attack", ["replace", "symlink", "hardlink", "truncate", "grow"])
def test_a_name_raced_at_the_daemons_open_reaches_only_the_bytes_it_opened(
        drop: Layout, daemon_factory: Callable[..., Daemon], attack: str) -> None:
    """docs/integrity.md: the instant the daemon opens `sub/a.txt`, the uploader renames
    EICAR over its name, or swaps `sub/` for a symlink to a folder only root may read, or
    links the file to a name of its own and writes EICAR through it once it is moved, or
    truncates it (or extends it to a sparse terabyte) through a write descriptor it kept.
    Where the attack lands before the daemon's own look at what it opened, that look
    refuses the snapshot (a name renamed over the file moves its ctime; a link makes it a
    hardlink), as it should."""
    spares = drop.base / "attacker"
    spares.mkdir()
    os.chown(spares, NOBODY, NOBODY)
    secret = drop.base / "secret"
    secret.mkdir(mode=0o700)
    (secret / "a.txt").write_bytes(b"root's secret")
    spare = {"replace": spares / "evil.com", "symlink": secret, "hardlink": spares / "keep.txt",
             "truncate": spares, "grow": spares}[attack]
    daemon = _start(drop, daemon_factory, settle_seconds=0)
    result = _result(_attacker("race", str(drop.inbox / "sub" / "a.txt"), attack, str(spare), EICAR_PATH))
    assert result["opened"], result

    def settled() -> bool:
        skipped = {e["rel_path"] for e in daemon.named("file.skipped")}
        return (_all_done(drop) and _files_left(drop) <= skipped
                and bool(daemon.named("file.moved") or skipped))

    daemon.wait_for(settled, what="every regular file of the inbox placed or left in place")
    assert daemon.stop() == 0
    clean, quarantined = drop.placed("clean"), drop.placed("quarantine")
    harmless = b"harmless " * (1 << 19)
    placed = {name: (drop.clean / name).read_bytes() for name in clean}
    for name in clean:  # the bytes the daemon opened, as its own inode
        st = (drop.clean / name).stat()
        assert (st.st_uid, st.st_nlink) == (os.geteuid(), 1) and st.st_ino != result["inode"]
    assert attack == "truncate" or all(data == harmless for data in placed.values())
    if attack == "truncate":  # the whole bytes if their snapshot was complete first; the
        # truncated ones always, put back after that snapshot's move, else snapshotted at once
        assert placed in ({"sub/a.txt": harmless[:9]}, {"sub/a.txt": harmless, "sub/a.1.txt": harmless[:9]})
        assert not quarantined
    elif attack == "grow":  # never hashed: refused from its size as itself, whichever came first
        assert clean in ([], ["sub/a.txt"]) and quarantined == [] and drop.placed("failed") == ["sub/a.txt"]
        assert (drop.failed / "sub" / "a.txt").stat().st_size == 1 << 40
    elif attack == "replace":
        assert clean in ([], ["sub/a.txt"]) and quarantined == ["sub/a.txt"]
        assert (drop.quarantine / "sub" / "a.txt").read_bytes() == EICAR
        assert clean or daemon.named("file.changed")
    elif attack == "symlink":  # `sub/a.txt` may be found again as `sub.old/a.txt` before the
        # first move takes it: then both rows snapshot it, and the same bytes are placed twice
        assert clean in (["sub/a.txt"], ["sub.old/a.txt", "sub/a.txt"]) and quarantined == []
    elif clean:  # its own name reaches its own inode only; EICAR written before the daemon's
        # last look at the captured original went back into the inbox, and was quarantined
        assert clean == ["sub/a.txt"] and quarantined in ([], ["sub/a.txt"])
        assert all(EICAR in p.read_bytes() for p in drop.quarantine.rglob("a.txt"))
    else:  # linked before the snapshot counted: a hardlink, left in place
        skipped = [(e["rel_path"], e["reason"]) for e in daemon.named("file.skipped")]
        assert skipped == [("sub/a.txt", "hardlink")]
        assert os.path.samefile(drop.inbox / "sub" / "a.txt", spare) and quarantined == []
    assert (secret / "a.txt").read_bytes() == b"root's secret"
    for path in drop.base.rglob("*"):  # (the terabyte of `grow` is the uploader's own inode)
        assert (secret in path.parents or not path.is_file() or path.stat().st_size > 1 << 30
                or b"root's secret" not in path.read_bytes())
    assert_clean_was_scanned(drop, daemon)
    _nothing_left(drop)


def test_a_write_after_the_capture_and_a_removed_folder_strand_nothing(
        drop: Layout, daemon_factory: Callable[..., Daemon]) -> None:
    daemon = _start(drop, daemon_factory)
    result = _result(_attacker("strand", str(drop.inbox), EICAR_PATH))
    assert result["captured"], result
    if result["nlink_after_write"]:  # written while it still had a name: it must be found
        daemon.wait_for(lambda: drop.placed("quarantine"), timeout=30, what="the EICAR bytes quarantined")
    daemon.wait_for(lambda: _all_done(drop), what="every row settled")
    assert daemon.stop() == 0
    assert drop.placed("clean") == ["sub/a.txt"]
    assert (drop.clean / "sub" / "a.txt").read_bytes() == b"harmless"
    if result["nlink_after_write"]:
        [quarantined] = drop.placed("quarantine")
        assert (drop.quarantine / quarantined).read_bytes() == EICAR
    assert not _files_left(drop)
    assert_clean_was_scanned(drop, daemon)
    _nothing_left(drop)


def test_a_folder_the_daemon_may_not_write_holds_its_files_reported_once(
        drop: Layout, daemon_factory: Callable[..., Daemon]) -> None:
    own = drop.inbox / "up"
    subprocess.run([*_AS_NOBODY, "mkdir", "-m", "0755", str(own)], check=True)
    subprocess.run([*_AS_NOBODY, "cp", EICAR_PATH, str(own / "e.com")], check=True)
    daemon = _start(drop, daemon_factory, _WITHOUT_DAC, rescan_interval=0.3)
    daemon.wait_for(lambda: daemon.named("file.skipped"), what="the file held")
    daemon.wait_for(lambda: len(daemon.named("watch.swept")) >= 8, what="eight sweeps")
    [skipped] = daemon.named("file.skipped")
    assert skipped["reason"] == "permission_denied" and skipped["rel_path"] == "up/e.com"
    assert not daemon.named("move.failed") and not daemon.named("file.moved")
    assert (own / "e.com").read_bytes() == EICAR
    os.chown(own, 0, 0)  # the operator fixes the folder: the next rescan takes it
    daemon.wait_for(lambda: drop.placed("quarantine") == ["up/e.com"], what="quarantined")
    assert daemon.stop() == 0
    assert len(daemon.named("file.skipped")) == 1
    _nothing_left(drop)


def test_a_folder_taken_back_after_the_scan_keeps_the_original_reported_once(
        drop: Layout, daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    """docs/integrity.md: a capture refused after the scan's check (the uploader took back
    the daemon's write access to its folder) keeps the original, reported once
    (`file.original_kept`); the snapshot is placed, and the original's next row is held."""
    pauses = Pauses(tmp_path / "pauses")
    own = drop.inbox / "up"
    subprocess.run([*_AS_NOBODY, "mkdir", "-m", "0777", str(own)], check=True)
    daemon = daemon_factory(drop.write_config(watch={"rescan_interval": 0.3}), pauses.env("move.start"),
                            wrapper=_WITHOUT_DAC)
    daemon.wait_started()
    subprocess.run([*_AS_NOBODY, "cp", str(ROOT / "samples" / "hello.txt"), str(own / "a.txt")], check=True)
    pauses.reached(daemon, "move.start")  # scanned, its folder found writable
    subprocess.run([*_AS_NOBODY, "chmod", "0755", str(own)], check=True)
    pauses.go("move.start")
    daemon.wait_for(lambda: daemon.named("file.skipped"), what="the original's next row held")
    assert daemon.stop() == 0
    [kept] = daemon.named("file.original_kept")
    assert (kept["rel_path"], kept["reason"]) == ("up/a.txt", "permission_denied")
    assert drop.placed("clean") == ["up/a.txt"]
    assert (own / "a.txt").read_bytes() == (drop.clean / "up" / "a.txt").read_bytes()
    assert [s["rel_path"] for s in daemon.named("file.skipped")] == ["up/a.txt"]
    assert list((drop.state / "staging").iterdir()) == []
