"""The journal as a work queue: idempotent intake, claims, and hand-back of dead owners' rows."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from daemon.fsutil import Identity
from daemon.journal import Journal, owner_token
from daemon.journal.migrations import SCHEMA
from daemon.model import FileState, SeenObject, VerdictKind
from daemon.pipeline.settling import needs_settling


def _journal(tmp_path: Path) -> Journal:
    return Journal(tmp_path / "state" / "journal.sqlite3")


def test_wal_mode_and_schema_version(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    conn = journal._conn()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(SCHEMA)
    journal.close()
    assert len(_journal(tmp_path).discover("w", [("a", 1)], 1.0)) == 1  # reopening migrates nothing


def test_discover_is_idempotent_and_non_utf8_names_survive(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    odd = b"caf\xe9.txt".decode("utf-8", "surrogateescape")
    assert journal.discover("w", [("a.txt", 1), (odd, 2)], 1.0) == ["a.txt", odd]
    assert journal.discover("w", [("a.txt", 1), (odd, 2), ("b.txt", 3)], 2.0) == ["b.txt"]
    assert {r.rel_path for r in journal.rows()} == {"a.txt", odd, "b.txt"}


def test_a_path_done_before_is_a_new_arrival(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    journal.discover("w", [("a.txt", 1)], 1.0)
    [row] = journal.rows()
    journal.apply([(row.id, {"state": FileState.DONE})])
    assert len(journal.discover("w", [("a.txt", 1)], 2.0)) == 1
    assert len(journal.rows()) == 2


def test_held_path_is_revived_only_when_its_inode_changes(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    journal.discover("w", [("link", 7)], 1.0)
    [row] = journal.rows()
    journal.apply([(row.id, {"state": FileState.HELD, "reason": "symlink"})])
    assert len(journal.discover("w", [("link", 7)], 2.0)) == 0
    assert len(journal.discover("w", [("link", 8)], 3.0)) == 1
    assert journal.get(row.id).state is FileState.DISCOVERED


def test_take_records_arrivals_claimed_as_the_journal_has_them(tmp_path: Path) -> None:
    """daemon/handoff.py: an arrival handed to a worker is one row write, claimed by it; the
    rows it returns are made from what it inserted, and equal the rows read back. Not known
    settled, it is left for the worker's settle step (no `stable_at`)."""
    journal = _journal(tmp_path)
    odd = b"caf\xe9 \xff.txt".decode("utf-8", "surrogateescape")
    arrivals = [("a.txt", Identity(5, 1, 10, 1_000, 2_000), 100.0),
                (odd, Identity(5, 2, 20, 3_000, 4_000), 99.0)]
    rows, added = journal.take("w", arrivals, "me:1", 101.0, settled=True)
    assert added == [] and [r.rel_path for r in rows] == ["a.txt", odd]
    for row, (_, identity, found_at) in zip(rows, arrivals, strict=True):
        assert row == journal.get(row.id)
        assert (row.state, row.owner, row.attempts, row.identity) == (
            FileState.SCANNING, "me:1", 1, identity)
        assert (row.stable_at, row.discovered_at, row.updated_at) == (found_at, found_at, 101.0)
    [unsettled], _ = journal.take("w", [("b.txt", Identity(5, 3, 1, 1, 1), 100.0)], "me:1", 101.0,
                                  settled=False)
    assert unsettled == journal.get(unsettled.id) and needs_settling(unsettled)
    assert journal.claim(["w"], "other:1", now=200.0, limit=10) == []


def test_arrivals_on_their_way_count_as_pending_while_the_note_is_fresh(tmp_path: Path) -> None:
    """daemon/handoff.py: what the daemon notes on its way to a worker counts in `counts`
    (state `arriving`), `pending_count` and `oldest_pending` beside the rows, until a newer
    note, or until it is 5 s old (a daemon no longer running)."""
    journal = _journal(tmp_path)
    journal.discover("w", [("a.txt", 1)], 50.0)
    now = time.time()
    journal.note_arriving({"w": (3, 40.0), "v": (2, 60.0)}, now)
    assert journal.counts() == [("w", "discovered", None, None, 1), ("v", "arriving", None, None, 2),
                                ("w", "arriving", None, None, 3)]
    assert journal.pending_count() == 6
    assert journal.oldest_pending() == {"w": 40.0, "v": 60.0}
    journal.note_arriving({"v": (1, 60.0)}, now)
    assert journal.pending_count() == 2 and journal.oldest_pending() == {"w": 50.0, "v": 60.0}
    journal.note_arriving({"v": (1, 60.0)}, now - 5.1)
    assert journal.pending_count() == 1 and journal.oldest_pending() == {"w": 50.0}


def test_take_leaves_a_path_already_active_to_discover(tmp_path: Path) -> None:
    """Seen twice, an arrival is not recorded twice; a held path seen with another inode is
    revived as `discover` would, unclaimed, to be looked at afresh."""
    journal = _journal(tmp_path)
    [first], _ = journal.take("w", [("a.txt", Identity(5, 1, 10, 1, 1), 1.0)], "me:1", 1.0, settled=True)
    journal.discover("w", [("link", 7)], 1.0)
    [link] = [r for r in journal.rows() if r.rel_path == "link"]
    journal.apply([(link.id, {"state": FileState.HELD, "reason": "symlink"})])
    rows, added = journal.take("w", [("a.txt", Identity(5, 1, 10, 1, 1), 2.0),
                                     ("link", Identity(5, 8, 3, 1, 1), 2.0)], "you:1", 2.0, settled=True)
    assert (rows, added) == ([], ["link"])
    assert journal.get(first.id).owner == "me:1" and len(journal.rows()) == 2
    revived = journal.get(link.id)
    assert (revived.state, revived.owner, revived.inode, revived.identity) == (
        FileState.DISCOVERED, None, 8, None)


def test_take_leaves_out_a_file_placed_already(tmp_path: Path) -> None:
    """An event seen late, or an arrival `scan --move` took meanwhile: this very file (path,
    inode and times) has a done row, so it is not recorded again (to be found `gone`); nor is
    a sighting of it from before that row was found (with `settle_seconds: 0`, its creation's
    event, with other times, handed before its close's); the same name with other times, seen
    after, is a new arrival."""
    journal = _journal(tmp_path)
    identity = Identity(5, 1, 10, 1_000, 2_000)
    [row], _ = journal.take("w", [("a.txt", identity, 1.0)], "me:1", 1.0, settled=True)
    journal.apply([(row.id, {"state": FileState.DONE, "owner": None})])
    assert journal.take("w", [("a.txt", identity, 2.0)], "me:1", 2.0, settled=False) == ([], [])
    assert journal.take("w", [], "me:1", 2.0, settled=True) == ([], [])
    while_written = Identity(5, 1, 0, 900, 900)
    assert journal.take("w", [("a.txt", while_written, 0.9)], "me:1", 2.0, settled=True) == ([], [])
    [b], _ = journal.take("w", [("a.txt", identity, 2.0), ("b.txt", Identity(5, 9, 1, 1, 1), 2.0)],
                          "me:1", 2.0, settled=True)  # of a take's arrivals, the placed one left out
    assert b.rel_path == "b.txt"
    journal.apply([(b.id, {"state": FileState.DONE, "owner": None})])
    newer = Identity(5, 1, 10, 1_000, 3_000)
    [again], _ = journal.take("w", [("a.txt", newer, 3.0)], "me:1", 3.0, settled=False)
    assert again.identity == newer and len(journal.rows()) == 3
    journal.apply([(again.id, {"state": FileState.DONE, "owner": None})])
    another_file = Identity(5, 2, 0, 900, 900)
    [other], _ = journal.take("w", [("a.txt", another_file, 0.9)], "me:1", 4.0, settled=True)
    assert other.identity == another_file and len(journal.rows()) == 4


def test_claims_are_exclusive_and_due_only(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    journal.discover("w", [(f"f{i}", i) for i in range(5)], 1.0)
    rows = journal.rows()
    journal.apply([(r.id, {"state": FileState.STABLE, "next_attempt_at": 10.0 if r.rel_path == "f4" else 1.0})
                   for r in rows])
    first = journal.claim(["w"], "a:1", now=5.0, limit=3)
    second = journal.claim(["w"], "b:1", now=5.0, limit=10)
    assert len(first) == 3 and len(second) == 1
    assert {r.id for r in first}.isdisjoint(r.id for r in second)
    assert all(r.state is FileState.SCANNING and r.attempts == 1 for r in first + second)
    assert journal.claim(["w"], "c:1", now=5.0, limit=10) == []
    assert [r.rel_path for r in journal.claim(["w"], "c:1", now=11.0, limit=10)] == ["f4"]


def test_rows_of_a_dead_owner_are_handed_back(tmp_path: Path) -> None:
    """A scan the engine never took waits again: settled (stable), or still to be settled
    (discovered: claimed before its settle step committed, daemon/pipeline/settling.py)."""
    journal = _journal(tmp_path)
    journal.discover("w", [("scan", 1), ("poll", 2), ("move", 3), ("unsettled", 5)], 1.0)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    token = f"{dead}:0"
    by_name = {r.rel_path: r for r in journal.rows()}
    journal.apply([
        (by_name["scan"].id, {"state": FileState.SCANNING, "owner": token, "stable_at": 1.0}),
        (by_name["poll"].id, {"state": FileState.SCANNING, "owner": token, "engine_scan_id": "s-1"}),
        (by_name["move"].id, {"state": FileState.MOVING, "owner": token, "verdict": "clean"}),
        (by_name["unsettled"].id, {"state": FileState.SCANNING, "owner": token}),
    ])
    live = owner_token()
    journal.discover("w", [("mine", 4)], 1.0)
    mine = journal.active("w", "mine")
    journal.apply([(mine.id, {"state": FileState.SCANNING, "owner": live})])
    assert journal.reclaim() == 4
    states = {r.rel_path: (r.state, r.owner) for r in journal.rows()}
    assert states == {"scan": (FileState.STABLE, None), "poll": (FileState.SCANNING, None),
                      "move": (FileState.MOVING, None), "unsettled": (FileState.DISCOVERED, None),
                      "mine": (FileState.SCANNING, live)}
    claimed = journal.claim(["w"], live, now=2.0, limit=10)
    assert {r.rel_path for r in claimed} == {"scan", "poll", "move", "unsettled"}


def test_a_version_1_journal_is_migrated_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA[0])
    conn.execute("INSERT INTO files (watch, rel_path, state, next_attempt_at, discovered_at, updated_at) "
                 "VALUES ('w', ?, 'stable', 1, 1, 1)", (b"old.txt",))
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    journal = Journal(path)
    (row,) = journal.rows()
    assert (row.rel_path, row.state, row.etag) == ("old.txt", FileState.STABLE, None)
    assert len(journal.discover_objects("w", [("new.txt", "e1", None, 5)], 2.0)) == 1


def test_a_journal_counted_by_state_indexes_is_migrated_to_the_finished_rows_index(tmp_path: Path) -> None:
    """The migration that dropped the indexes keyed on `state` keeps every count."""
    path = tmp_path / "journal.sqlite3"
    conn = sqlite3.connect(path)
    made = next(i for i, script in enumerate(SCHEMA) if "DROP INDEX files_counts" in script)
    for script in SCHEMA[:made]:
        conn.executescript(script)
    rows = [("w", b"a", "done", "clean", None), ("w", b"b", "done", "infected", None),
            ("w", b"c", "gone", None, None), ("w", b"d", "held", None, "ignored"),
            ("v", b"e", "stable", None, None)]
    conn.executemany("INSERT INTO files (watch, rel_path, state, verdict, reason, next_attempt_at, "
                     "discovered_at, updated_at) VALUES (?, ?, ?, ?, ?, 1, 1, 1)", rows)
    before = conn.execute("SELECT watch, state, verdict, reason, count(*) FROM files "
                          "GROUP BY watch, state, verdict, reason ORDER BY 1, 2").fetchall()
    conn.execute(f"PRAGMA user_version = {made}")
    conn.commit()
    conn.close()
    journal = Journal(path)
    assert journal.counts() == before
    indexes = {r[0] for r in journal._conn().execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "files_finished" in indexes and not {"files_due", "files_counts"} & indexes


def test_discover_objects_remembers_versions(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    assert len(journal.discover_objects("w", [("a", "e1", None, 3), ("b", "e2", "v2", 4)], 1.0)) == 2
    assert len(journal.discover_objects("w", [("a", "e1", None, 3)], 2.0)) == 0  # listed again
    # Replaced before its scan started: the row follows the new version.
    assert len(journal.discover_objects("w", [("a", "e3", None, 9)], 3.0)) == 1
    row = journal.active("w", "a")
    assert row is not None and (row.etag, row.size, row.state) == ("e3", 9, FileState.STABLE)
    # A version judged in place stays at its key: listed again, it is not new...
    journal.apply([(row.id, {"state": FileState.DONE, "dest_root": "in_place", "done_at": 3.5})])
    assert len(journal.discover_objects("w", [("a", "e3", None, 9)], 4.0, listed_at=4.0)) == 0
    # ...but a new upload under that key is.
    assert len(journal.discover_objects("w", [("a", "e4", None, 1)], 5.0)) == 1
    # Once scanning, a listing does not touch the row (the ETag conditions catch a change).
    fresh = journal.active("w", "a")
    assert fresh is not None
    journal.apply([(fresh.id, {"state": FileState.SCANNING})])
    assert len(journal.discover_objects("w", [("a", "e5", None, 2)], 6.0)) == 0
    assert journal.get(fresh.id).etag == "e4"  # type: ignore[union-attr]


def test_connections_of_finished_threads_are_closed(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    for _ in range(20):  # as the metrics server does: a thread per scrape
        thread = threading.Thread(target=journal.counts)
        thread.start()
        thread.join()
    journal.counts()
    assert len(journal._connections) <= 2
    journal.close()


def test_rows_filters_combine_order_and_limit_and_take_names_literally(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    done = {"state": FileState.DONE, "verdict": VerdictKind.INFECTED}
    rows = {
        "a": ("w", {**done, "threats": ["Eicar-Test"], "done_at": 30.0}),
        "b": ("w", {**done, "threats": ["Win.Trojan_x"], "done_at": 10.0}),
        "c": ("w", {**done, "threats": ["100%_it's"], "done_at": 20.0, "disposition": "released"}),
        "d": ("w", {"state": FileState.DONE, "verdict": VerdictKind.CLEAN, "done_at": 40.0}),
        "e": ("w%", {**done, "threats": ["EICAR"], "done_at": 50.0}),
        "f": ("w", {"state": FileState.SCANNING, "last_error": "engine down"}),
        "g": ("w'", {**done, "threats": ['say "hi"', "back\\slash"], "done_at": 60.0}),
    }
    for name, (watch, fields) in rows.items():
        journal.discover(watch, [(name, 1)], 1.0)
        journal.apply([(journal.active(watch, name).id, fields)])

    def names(**filters) -> list[str]:
        return [r.rel_path for r in journal.rows(**filters)]

    infected = {"states": [FileState.DONE], "verdict": VerdictKind.INFECTED}
    assert names(watch="w", **infected, order="done_at") == ["b", "c", "a"]
    assert names(watch="w", **infected, has_disposition=False, order="done_at") == ["b", "a"]
    assert names(**infected, order="done_at", newest_first=True, limit=2) == ["g", "e"]
    assert names(**infected, done_since=30.0, order="done_at") == ["a", "e", "g"]
    assert names(has_error=True) == ["f"] and "f" not in names(has_error=False)
    assert names(states=[FileState.SCANNING, FileState.DISCOVERED]) == ["f"]
    assert names(verdict=VerdictKind.CLEAN) == ["d"]
    # Names are matched literally: `%`, `_`, quotes and backslashes are no patterns.
    assert names(watch="w%") == ["e"] and names(watch="w_") == [] and names(watch="w'") == ["g"]
    assert names(threat="eicar") == ["a", "e"]  # a substring, ASCII case-insensitive
    assert names(threat="_") == ["b", "c"]
    assert names(threat="%") == ["c"] and names(threat="%_it's") == ["c"]
    assert names(threat="Trojan%") == [] and names(threat="1_0") == []
    assert names(threat='"hi"') == ["g"] and names(threat="k\\s") == ["g"]
    assert names(threat='Test", "') == []  # never across two threat names


def test_latest_is_the_newest_row_of_a_path(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    assert journal.latest("w", "a.txt") is None
    journal.discover("w", [("a.txt", 1)], 1.0)
    first = journal.active("w", "a.txt")
    journal.apply([(first.id, {"state": FileState.DONE})])
    journal.discover("w", [("a.txt", 2)], 2.0)
    journal.discover("v", [("a.txt", 3)], 3.0)
    latest = journal.latest("w", "a.txt")
    assert latest is not None and latest.id != first.id and latest.inode == 2


def test_an_object_version_is_an_arrival_the_same_bytes_or_not(tmp_path: Path) -> None:
    journal = _journal(tmp_path)

    def done(dest_root: str, at: float) -> None:
        row = journal.active("w", "a")
        assert row is not None
        journal.apply([(row.id, {"state": FileState.DONE, "dest_root": dest_root, "done_at": at})])

    # Moved: the key was emptied when the row was done; a listing begun after that finds new bytes.
    assert len(journal.discover_objects("w", [SeenObject("a", "e1", None, 1, 100.0)], 1.0,
                                        listed_at=1.0)) == 1
    done("s3://b/clean/", 2.0)
    assert len(journal.discover_objects("w", [("a", "e1", None, 1, 100.0)], 2.5, listed_at=1.5)) == 0  # stale
    assert len(journal.discover_objects("w", [("a", "e1", None, 1, 103.0)], 3.0, listed_at=3.0)) == 1
    done("s3://b/clean/", 4.0)
    assert len(journal.discover_objects("w", [("a", "e1", None, 1)], 5.0)) == 1  # an event: new bytes again
    done("in_place", 6.0)
    # In place: the same ETag and LastModified are the version judged; a new LastModified is new.
    journal.apply([(journal.latest("w", "a").id, {"last_modified": 110.0})])  # type: ignore[union-attr]
    assert len(journal.discover_objects("w", [("a", "e1", None, 1, 110.0)], 7.0, listed_at=7.0)) == 0
    assert len(journal.discover_objects("w", [("a", "e1", None, 1, 111.0)], 8.0, listed_at=8.0)) == 1
    done("in_place", 9.0)
    journal.apply([(journal.latest("w", "a").id, {"version_id": "v1"})])  # type: ignore[union-attr]
    # VersionIds decide where both are known.
    assert len(journal.discover_objects("w", [("a", "e1", "v1", 1)], 10.0)) == 0
    assert len(journal.discover_objects("w", [("a", "e1", "v2", 1)], 11.0)) == 1


def test_skipped_keys_are_held_once_and_taken_up_when_no_longer_ignored(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    assert journal.skip_objects("w", [("x/", "e0", "directory_marker"), (".env", "e1", "ignored")], 1.0) == [
        "x/", ".env"]
    assert journal.skip_objects("w", [("x/", "e0", "directory_marker"), (".env", "e1", "ignored")], 2.0) == []
    assert len(journal.discover_objects("w", [(".env", "e1", None, 3)], 3.0)) == 1
    row = journal.active("w", ".env")
    assert row is not None and (row.state, row.reason) == (FileState.STABLE, None)
