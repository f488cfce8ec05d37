"""The local watcher against awkward trees: deeper than PATH_MAX, unwalkable subtrees, and
roots that vanish, come back or turn into symlinks. The daemon runs as a real subprocess."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, Layout, local_watcher

from daemon.fsutil import open_dir
from daemon.naming import split_rel
from daemon.watchers.base import RepeatFilter

# Root without the capabilities that let it read any directory, so mode 000 really blocks.
_WITHOUT_DAC = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")


def _moved(daemon: Daemon) -> set[str]:
    return {e["rel_path"] for e in daemon.named("file.moved")}


def _noisy(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("level") in ("warning", "error", "critical")]


def _write_below(root: Path, rel: str, data: bytes) -> None:
    """Create `rel` below root one directory at a time (its full path may exceed PATH_MAX)."""
    parents, name = split_rel(rel)
    fd = open_dir(str(root), parents, create_mode=0o755)
    try:
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
        os.write(out, data)
        os.close(out)
    finally:
        os.close(fd)


def _read_below(root: Path, rel: str) -> bytes | None:
    parents, name = split_rel(rel)
    try:
        fd = open_dir(str(root), parents)
    except FileNotFoundError:
        return None
    try:
        file_fd = os.open(name, os.O_RDONLY, dir_fd=fd)
    except FileNotFoundError:
        return None
    finally:
        os.close(fd)
    try:
        return os.read(file_fd, 1 << 16)
    finally:
        os.close(file_fd)


def test_tree_deeper_than_path_max_is_walked_and_the_rest_still_watched(
        layout: Layout, daemon_factory) -> None:
    deep = "/".join(f"{i:02d}" + "d" * 78 for i in range(60)) + "/deep.txt"  # 60 x 80 bytes
    assert len(str(layout.inbox / deep)) > os.pathconf("/", "PC_PATH_MAX")
    _write_below(layout.inbox, deep, b"at the bottom")
    # The next sweep is a minute away: the file at the top is found by inotify or not at all.
    daemon = daemon_factory(layout.write_config(watch={"rescan_interval": 60}))
    daemon.wait_started()
    daemon.wait_for(lambda: deep in _moved(daemon), what="the deep file moved")
    assert _read_below(layout.clean, deep) == b"at the bottom"
    assert _read_below(layout.inbox, deep) is None
    (layout.inbox / "top.txt").write_bytes(b"at the top")
    daemon.wait_for(lambda: "top.txt" in _moved(daemon), timeout=15, what="top.txt moved")
    assert daemon.stop() == 0
    assert (layout.clean / "top.txt").read_bytes() == b"at the top"
    assert len(_noisy(daemon.events)) <= 3, _noisy(daemon.events)[:3]
    assert len(daemon.stderr) < 10_000


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to drop the capability to read any directory")
def test_unwalkable_subtree_is_reported_once_and_the_rest_processed(
        layout: Layout, daemon_factory) -> None:
    locked = layout.inbox / "locked"
    (locked / "inner").mkdir(parents=True)
    (locked / "inner" / "kept.txt").write_bytes(b"kept")
    (layout.inbox / "open").mkdir()
    (layout.inbox / "open" / "a.txt").write_bytes(b"a")
    locked.chmod(0)
    try:
        daemon = daemon_factory(layout.write_config(watch={"rescan_interval": 0.3}),
                                wrapper=_WITHOUT_DAC)
        daemon.wait_started()
        daemon.wait_for(lambda: "open/a.txt" in _moved(daemon), what="open/a.txt moved")
        daemon.wait_for(lambda: len(daemon.named("watch.swept")) >= 5, what="five sweeps")
        (layout.inbox / "open" / "b.txt").write_bytes(b"b")
        daemon.wait_for(lambda: "open/b.txt" in _moved(daemon), what="open/b.txt moved")
        assert daemon.stop() == 0
    finally:
        locked.chmod(0o755)
    skipped = daemon.named("watch.subtree_skipped")
    assert [(e["rel_dir"], e["reason"]) for e in skipped] == [("locked", "eacces")]
    assert (locked / "inner" / "kept.txt").read_bytes() == b"kept"
    assert layout.placed("clean") == ["open/a.txt", "open/b.txt"]
    assert daemon.named("watch.error") == []


def test_deleted_and_recreated_source_is_watched_again(layout: Layout, daemon_factory) -> None:
    daemon = daemon_factory(layout.write_config(watch={"rescan_interval": 60}))
    daemon.wait_started()
    (layout.inbox / "before.txt").write_bytes(b"before")
    daemon.wait_for(lambda: "before.txt" in _moved(daemon), what="before.txt moved")
    shutil.rmtree(layout.inbox)
    daemon.wait_for(lambda: daemon.named("watch.root_missing"), timeout=10, what="root_missing")
    layout.inbox.mkdir()
    (layout.inbox / "during.txt").write_bytes(b"during")  # before it is watched again
    daemon.wait_for(lambda: "during.txt" in _moved(daemon), timeout=10, what="during.txt moved")
    (layout.inbox / "after.txt").write_bytes(b"after")  # by inotify on the new directory
    daemon.wait_for(lambda: "after.txt" in _moved(daemon), timeout=10, what="after.txt moved")
    assert daemon.stop() == 0
    assert len(daemon.named("watch.root_missing")) == 1
    assert len(daemon.named("watch.root_restored")) == 1
    assert layout.placed("clean") == ["after.txt", "before.txt", "during.txt"]
    assert daemon.named("watch.error") == []


def test_source_replaced_by_a_symlink_is_never_followed(layout: Layout, daemon_factory) -> None:
    other = layout.base / "other"
    other.mkdir()
    (other / "bait.txt").write_bytes(b"not ours")
    daemon = daemon_factory(layout.write_config(watch={"rescan_interval": 0.3}))
    daemon.wait_started()
    layout.inbox.rename(layout.base / "inbox.old")
    layout.inbox.symlink_to(other, target_is_directory=True)
    daemon.wait_for(lambda: daemon.named("watch.root_unsafe"), timeout=10, what="root_unsafe")
    before = len(daemon.events)
    time.sleep(3)  # sweeps every 0.3 s: the old code listed the link and logged ~37 tracebacks/s
    quiet = daemon.events[before:]
    (other / "late.txt").write_bytes(b"not ours either")
    layout.inbox.unlink()
    layout.inbox.mkdir()
    (layout.inbox / "back.txt").write_bytes(b"back")
    daemon.wait_for(lambda: "back.txt" in _moved(daemon), timeout=10, what="back.txt moved")
    assert daemon.stop() == 0
    assert len(quiet) <= 3, quiet[:3]
    assert sorted(p.name for p in other.iterdir()) == ["bait.txt", "late.txt"]
    assert layout.placed("clean") == ["back.txt"]
    assert not [e for e in daemon.events if "bait" in json.dumps(e) or "late" in json.dumps(e)]
    assert [e["reason"] for e in daemon.named("watch.root_unsafe")] == ["symlink"]
    assert len(daemon.named("watch.root_restored")) == 1
    assert daemon.named("watch.error") == []


def test_repeated_errors_pass_once_per_interval_with_the_count_held_back() -> None:
    now = [0.0]
    errors = RepeatFilter(60.0, clock=lambda: now[0])
    assert errors.admit("ENAMETOOLONG") == 0
    assert errors.admit("EACCES") == 0  # another error is not held back by the first
    held = [errors.admit("ENAMETOOLONG") for _ in range(500)]
    assert held == [None] * 500
    now[0] = 61.0
    assert errors.admit("ENAMETOOLONG") == 500
    assert errors.admit("ENAMETOOLONG") is None


def _fill(handoff: Any) -> None:
    """Offer until the handoff's socket has no room left."""
    from daemon.fsutil import Identity

    while not handoff.offer("w", [("x" * 200, Identity(1, 1, 1, 1, 1), 0.0)] * 16, settled=True):
        pass


def _watcher(tmp_path: Path, settle_seconds: float, wake: Any = None,
             handoff: Any = None, clock: Any = time.time) -> tuple[Any, Any, Any]:
    import threading

    from daemon.config import load_config
    from daemon.journal import Journal

    for sub in ("in", "clean", "quarantine", "failed"):
        (tmp_path / sub).mkdir(exist_ok=True)
    (tmp_path / "scanwatch.yaml").write_text(json.dumps({
        "state_dir": str(tmp_path / "state"), "engines": {"default": {"type": "yara"}},
        "watches": [{"name": "w", "engine": "default", "source": str(tmp_path / "in"),
                     "clean": str(tmp_path / "clean"), "quarantine": str(tmp_path / "quarantine"),
                     "failed": str(tmp_path / "failed"), "settle_seconds": settle_seconds}]}))
    config = load_config(tmp_path / "scanwatch.yaml")
    journal = Journal(tmp_path / "state" / "journal.sqlite3")
    wake = threading.Event() if wake is None else wake
    watcher = local_watcher(config.watches[0], journal, wake, handoff=handoff, clock=clock)
    watcher.step()  # the first look at the root sweeps it (empty); events only from here on
    return watcher, journal, wake


def test_with_settle_0_a_file_an_event_names_is_recorded_stable_with_its_identity(
        tmp_path: Path) -> None:
    from daemon.fsutil import Identity
    from daemon.model import FileState

    watcher, journal, wake = _watcher(tmp_path, 0)
    (tmp_path / "in" / "a.bin").write_bytes(b"a")
    (tmp_path / "in" / "link").symlink_to(tmp_path / "in" / "a.bin")
    watcher._add(str(tmp_path / "in" / "a.bin"))
    watcher._add(str(tmp_path / "in" / "link"))
    watcher.step()
    rows = {r.rel_path: r for r in journal.rows()}
    assert rows["a.bin"].state is FileState.STABLE
    assert rows["a.bin"].identity == Identity.of(os.lstat(tmp_path / "in" / "a.bin"))
    assert rows["link"].state is FileState.DISCOVERED  # the settle step holds it back
    assert wake.is_set()
    watcher._disarm()


def test_an_events_settled_arrivals_go_to_a_worker_and_wait_for_room_then_for_the_journal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """daemon/handoff.py: a settled plain file named by an event is handed over, whole with
    its identity, and costs no row; one held back (a symlink) is recorded as before. What the
    socket has no room for waits in the watcher, in order, ahead of later arrivals; what
    finds no room for `_HOLD_S`, or past `MAX_HELD` waiting, is recorded as before."""
    from daemon.fsutil import Identity
    from daemon.handoff import Handoff
    from daemon.model import FileState
    from daemon.watchers import held, local

    handoff = Handoff()
    watcher, journal, wake = _watcher(tmp_path, 0, handoff=handoff)
    watcher._disarm()  # the test names the events
    inbox = tmp_path / "in"
    for name in ("a.bin", "b.bin"):
        (inbox / name).write_bytes(name.encode())
    (inbox / "link").symlink_to(inbox / "a.bin")
    watcher._add_all({str(inbox / name) for name in ("a.bin", "b.bin", "link")})
    watcher.step()
    assert {r.rel_path: r.state for r in journal.rows()} == {"link": FileState.DISCOVERED}
    watch, settled, arrivals = handoff.take()
    assert (watch, settled) == ("w", True)
    assert sorted((rel, identity) for rel, identity, _ in arrivals) == [
        (name, Identity.of(os.lstat(inbox / name))) for name in ("a.bin", "b.bin")]
    assert all(found_at == pytest.approx(time.time(), abs=5) for _, _, found_at in arrivals)
    assert handoff.take() is None and wake.is_set()

    wake.clear()
    _fill(handoff)
    for name in ("c.bin", "d.bin"):
        (inbox / name).write_bytes(name.encode())
        watcher._add(str(inbox / name))
        watcher.step()
    assert [r.rel_path for r in journal.rows()] == ["link"] and not wake.is_set()
    assert watcher._idle_wait_s() == pytest.approx(local._FLUSH_S, abs=0.005)  # it tries again soon
    while handoff.take() is not None:  # the workers catch up
        pass
    watcher.step()
    watch, settled, arrivals = handoff.take()
    assert (watch, settled) == ("w", True)
    assert [(rel, identity) for rel, identity, _ in arrivals] == [
        (name, Identity.of(os.lstat(inbox / name))) for name in ("c.bin", "d.bin")]
    assert wake.is_set()

    wake.clear()
    _fill(handoff)
    monkeypatch.setattr(held, "MAX_HELD", 1)
    for name in ("e.bin", "f.bin"):  # f.bin: one held already
        (inbox / name).write_bytes(name.encode())
        watcher._add(str(inbox / name))
    watcher.step()
    assert {r.rel_path: r.state for r in journal.rows()}.get("f.bin") is FileState.STABLE
    monkeypatch.setattr(local, "_HOLD_S", 0.0)
    time.sleep(0.01)
    watcher.step()  # e.bin found no room in time
    assert {r.rel_path: r.identity for r in journal.rows()}["e.bin"] == Identity.of(os.lstat(inbox / "e.bin"))
    assert wake.is_set()
    handoff.close()


def test_an_event_whose_file_settles_soon_is_held_then_handed_over_when_due(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a settle period, the arrival waits in the watcher, not in the journal, and goes
    to a worker when due, to be looked at once more (daemon/pipeline/settling.py). Seen
    again meanwhile, it is due from its new times; what the socket finds no room for within
    `_HOLD_S` after it is due is recorded as the journal would have had it (due when it
    settles, with the identity seen); one due later than `_HOLD_S` is recorded at once."""
    from daemon.fsutil import Identity
    from daemon.handoff import Handoff
    from daemon.model import FileState
    from daemon.watchers import local

    def due(name: str) -> float:
        st = os.lstat(inbox / name)
        return max(st.st_mtime, st.st_ctime) + 2

    now = [time.time()]
    handoff = Handoff()
    watcher, journal, wake = _watcher(tmp_path, 2, handoff=handoff, clock=lambda: now[0])
    watcher._disarm()  # the test names the events, at the times it says
    inbox = tmp_path / "in"
    for name in ("a.bin", "b.bin"):
        (inbox / name).write_bytes(name.encode())
    watcher._add_all({str(inbox / "a.bin"), str(inbox / "b.bin")})
    now[0] = time.time()
    watcher.step()
    assert journal.rows() == [] and handoff.take() is None
    now[0] = due("a.bin") - 0.5  # written first, due first
    assert watcher._idle_wait_s() == pytest.approx(0.5, abs=0.01)  # it wakes when one is due

    time.sleep(0.3)
    (inbox / "a.bin").write_bytes(b"written again")
    now[0] = time.time()
    found_again = now[0]
    watcher._add(str(inbox / "a.bin"))
    watcher.step()
    now[0] = due("b.bin") + 0.1  # b.bin is due, a.bin not yet
    watcher.step()
    watch, settled, arrivals = handoff.take()
    assert (watch, settled) == ("w", False)
    assert [(rel, identity) for rel, identity, _ in arrivals] == [
        ("b.bin", Identity.of(os.lstat(inbox / "b.bin")))]
    assert handoff.take() is None

    _fill(handoff)
    now[0] = due("a.bin") + 0.1
    watcher.step()  # a.bin is due, and the socket has no room: it waits
    assert journal.rows() == []
    now[0] = due("a.bin") + local._HOLD_S + 0.2
    watcher.step()  # no room for `_HOLD_S`: the journal has it
    [row] = journal.rows()
    assert (row.rel_path, row.state, row.identity) == (
        "a.bin", FileState.DISCOVERED, Identity.of(os.lstat(inbox / "a.bin")))
    assert (row.discovered_at, row.next_attempt_at) == (found_again, pytest.approx(due("a.bin"), abs=0.01))
    assert wake.is_set()

    monkeypatch.setattr(local, "_HOLD_S", 1.0)
    (inbox / "c.bin").write_bytes(b"c")
    now[0] = time.time()
    watcher._add(str(inbox / "c.bin"))
    watcher.step()
    assert {r.rel_path: r.state for r in journal.rows()}["c.bin"] is FileState.DISCOVERED
    handoff.close()


def test_with_a_settle_period_an_event_records_the_arrival_due_when_it_will_have_settled(
        tmp_path: Path) -> None:
    """The identity the event's `lstat` saw goes with the row, due `settle_seconds` after its
    times: the worker that claims it then settles it with one look (daemon/pipeline/settling.py)."""
    from daemon.fsutil import Identity
    from daemon.model import FileState

    watcher, journal, wake = _watcher(tmp_path, 5)
    (tmp_path / "in" / "a.bin").write_bytes(b"a")
    (tmp_path / "in" / "old.bin").write_bytes(b"old")
    os.utime(tmp_path / "in" / "old.bin", (1.0, 1.0))  # its ctime is now: it waits all the same
    watcher._add(str(tmp_path / "in" / "a.bin"))
    watcher._add(str(tmp_path / "in" / "old.bin"))
    watcher.step()
    rows = {r.rel_path: r for r in journal.rows()}
    for rel, row in rows.items():
        st = os.lstat(tmp_path / "in" / rel)
        assert row.state is FileState.DISCOVERED and row.identity == Identity.of(st)
        assert row.next_attempt_at == pytest.approx(max(st.st_mtime, st.st_ctime) + 5, abs=0.01)
    assert wake.is_set()  # the workers learn when the next row is due
    watcher._disarm()


def test_with_settle_0_the_start_up_sweep_records_files_stable_and_wakes_per_chunk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backlog present at start is claimable chunk by chunk while the sweep goes on,
    with no settle step after it (docs/operations.md, "`settle_seconds: 0`")."""
    import sqlite3

    from daemon.fsutil import Identity
    from daemon.model import FileState
    from daemon.watchers import local

    inbox = tmp_path / "in"
    (inbox / "sub").mkdir(parents=True)
    for rel in ("a.bin", "b.bin", "c.bin", "sub/d.bin"):
        (inbox / rel).write_bytes(rel.encode())
    (inbox / "link").symlink_to(inbox / "a.bin")
    monkeypatch.setattr(local, "_CHUNK", 2)
    stable_at_wake: list[int] = []

    class Wake:  # what the workers could claim each time they are woken
        def set(self) -> None:
            with sqlite3.connect(tmp_path / "state" / "journal.sqlite3") as conn:
                [(count,)] = conn.execute("SELECT count(*) FROM files WHERE state = 'stable'")
            stable_at_wake.append(count)

    watcher, journal, _ = _watcher(tmp_path, 0, Wake())  # its first step sweeps
    rows = {r.rel_path: r for r in journal.rows()}
    assert {rel: r.state for rel, r in rows.items()} == {
        "a.bin": FileState.STABLE, "b.bin": FileState.STABLE, "c.bin": FileState.STABLE,
        "sub/d.bin": FileState.STABLE, "link": FileState.DISCOVERED}  # the settle step holds it
    assert rows["sub/d.bin"].identity == Identity.of(os.lstat(inbox / "sub" / "d.bin"))
    assert len(stable_at_wake) >= 2 and stable_at_wake[0] < 4 and stable_at_wake[-1] == 4
    assert stable_at_wake == sorted(stable_at_wake)
    watcher._disarm()


def test_an_events_path_is_made_relative_as_relpath_would() -> None:
    """The prefix of the root as given is cut off an event's path (most arrivals); anything to
    normalize goes through `os.path.relpath` as before."""
    from daemon.watchers.base import relative_path

    for root in ("/a/b", "/a/b/", "/", "/a/./b", "/a//b", "rel/x", "/a/b/..", "//a"):
        for tail in ("c", "c/d", "./c", "c/../d", "c//d", "..", ".", "", "c/", ".h", "..x", "c/..", "/c"):
            path = root.rstrip("/") + "/" + tail
            expected = os.path.relpath(path, root)
            if expected in (".", "..") or expected.startswith("../") or os.path.isabs(expected):
                expected = None
            assert relative_path(root, path) == expected, (root, path)
