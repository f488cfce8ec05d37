"""The journal's per-batch work does not grow with the history or the backlog behind it.

Measured in SQLite virtual-machine steps (a progress handler called every 100 steps),
not in seconds: the same count on any machine, however loaded.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from daemon.fsutil import Identity
from daemon.journal import CachedVerdict, Journal
from daemon.model import FileState, VerdictKind


def _journal(tmp_path: Path, backlog: int) -> Journal:
    """`backlog` stable rows of watch `w`, as many done ones, and 100 of another watch."""
    journal = Journal(tmp_path / f"journal-{backlog}.sqlite3")
    journal.discover("w", ((f"f{i}", i) for i in range(backlog)), 1.0)
    journal.discover("other", ((f"o{i}", i) for i in range(100)), 1.0)
    conn = journal._conn()
    conn.execute("UPDATE files SET state = 'stable'")
    conn.execute("""INSERT INTO files (watch, rel_path, state, next_attempt_at, discovered_at,
                                       updated_at, done_at, verdict)
                    SELECT watch, rel_path || '.old', 'done', 0.5, 0.5, 0.5, 0.5, 'clean'
                    FROM files""")
    return journal


def _steps(journal: Journal, call: Callable[[], object]) -> int:
    conn: sqlite3.Connection = journal._conn()
    counted = [0]

    def tick() -> int:
        counted[0] += 1
        return 0

    conn.set_progress_handler(tick, 100)
    try:
        call()
    finally:
        conn.set_progress_handler(None, 100)
    return counted[0] * 100


def _batch_steps(tmp_path: Path, backlog: int) -> dict[str, int]:
    journal = _journal(tmp_path, backlog)
    claimed: list[object] = []
    steps = {
        "claim": _steps(journal, lambda: claimed.extend(journal.claim(["w"], "1:1", 2.0, 16))),
        "next_due_at": _steps(journal, lambda: journal.next_due_at(["w"])),
    }
    assert len(claimed) == 16
    return steps


def test_claim_and_next_due_cost_the_same_at_1_000_and_20_000_rows(tmp_path: Path) -> None:
    small = _batch_steps(tmp_path, 1000)
    large = _batch_steps(tmp_path, 20_000)
    for query, steps in large.items():
        assert steps <= 2 * small[query] + 1000, (query, small, large)


def _store_steps(tmp_path: Path, backlog: int) -> int:
    journal = _journal(tmp_path, backlog)
    entry = CachedVerdict("yara", "rules", "ab" * 32, VerdictKind.CLEAN, None, (), "ref", None, 2.0)
    return _steps(journal, lambda: journal.cache_verdict(entry, 100_000, 2.0, 1, is_miss=True))


def test_a_verdict_kept_in_the_cache_costs_the_same_at_1_000_and_20_000_rows(tmp_path: Path) -> None:
    """Waking the rows that wait for the bytes reads the rows due later, not the history."""
    small = _store_steps(tmp_path, 1000)
    large = _store_steps(tmp_path, 20_000)
    assert large <= 2 * small + 1000, (small, large)


def _landing_steps(tmp_path: Path, backlog: int) -> int:
    """A flight landing with a row waiting for it, behind `backlog` rows due later."""
    journal = _journal(tmp_path, backlog)
    journal._conn().execute("UPDATE files SET next_attempt_at = 50, sha256 = 'cd' WHERE watch = 'w'")
    flyer, waiter = (r.id for r in journal.claim(["other"], "1:1", 2.0, 2))
    journal.take_flight("yara", "ab" * 32, flyer, 2.0, 9.0)
    assert journal.take_flight("yara", "ab" * 32, waiter, 2.0, 9.0) == flyer
    entry = CachedVerdict("yara", "rules", "ab" * 32, VerdictKind.CLEAN, None, (), "ref", None, 3.0)
    steps = _steps(journal, lambda: journal.cache_verdict(entry, 100_000, 3.0, flyer, is_miss=True))
    assert journal.get(waiter).next_attempt_at == 3.0  # type: ignore[union-attr]
    return steps


def test_a_landing_flight_wakes_its_waiters_at_the_same_cost_at_1_000_and_20_000_rows(
        tmp_path: Path) -> None:
    """The rows waiting for a flight are listed where they wait: neither the backlog due later
    nor the history is read to find them."""
    small = _landing_steps(tmp_path, 1000)
    large = _landing_steps(tmp_path, 20_000)
    assert large <= 2 * small + 1000, (small, large)


def _status_steps(tmp_path: Path, history: int) -> dict[str, int]:
    """What `status` and the metrics read of the active rows, behind `history` finished ones."""
    journal = Journal(tmp_path / f"history-{history}.sqlite3")
    journal.discover("w", ((f"f{i}", i) for i in range(100)), 1.0)
    journal._conn().executemany("""INSERT INTO files (watch, rel_path, state, next_attempt_at,
                                                      discovered_at, updated_at, done_at, verdict)
                                   VALUES ('w', ?, 'done', 0.5, 0.5, 0.5, 0.5, 'clean')""",
                                ((f"old{i}".encode(),) for i in range(history)))
    pending = [s for s in FileState if s not in (FileState.DONE, FileState.GONE, FileState.HELD)]
    return {"oldest_pending": _steps(journal, journal.oldest_pending),
            "pending_count": _steps(journal, journal.pending_count),
            "oldest_file": _steps(journal, lambda: journal.rows(watch="w", states=pending, limit=1)),
            "errors": _steps(journal, lambda: journal.rows(has_error=True, states=[*pending, FileState.HELD],
                                                           order="updated_at", newest_first=True))}


def test_status_reads_the_active_rows_alone_at_1_000_and_50_000_finished_ones(tmp_path: Path) -> None:
    small = _status_steps(tmp_path, 1000)
    large = _status_steps(tmp_path, 50_000)
    for query, steps in large.items():
        assert steps <= 2 * small[query] + 1000, (query, small, large)


def test_listing_a_known_key_reads_its_own_rows_at_1_000_and_50_000_finished_ones(tmp_path: Path) -> None:
    """Whether an S3 key's version was judged is read from the key's rows, not from every
    finished row of the watch: a listing asks it of each key."""
    steps = []
    for history in (1000, 50_000):
        journal = Journal(tmp_path / f"listed-{history}.sqlite3")
        journal._conn().executemany("""INSERT INTO files (watch, rel_path, state, etag, next_attempt_at,
                                                          discovered_at, updated_at, done_at, dest_root)
                                       VALUES ('w', ?, 'done', 'e', 0.5, 0.5, 0.5, 0.5, 's3://out/')""",
                                    ((f"old{i}".encode(),) for i in range(history)))
        steps.append(_steps(journal, lambda j=journal: j.discover_objects("w", [("old7", "e", None, 1)], 2.0,
                                                                          listed_at=1.0)))
    small, large = steps
    assert large <= 2 * small + 1000, (small, large)


def test_claim_takes_the_most_overdue_rows_of_its_watches_only(tmp_path: Path) -> None:
    journal = _journal(tmp_path, 50)
    journal._conn().execute("UPDATE files SET next_attempt_at = 100 - id WHERE state = 'stable'")
    claimed = journal.claim(["w"], "1:1", 200.0, 5)
    assert {r.watch for r in claimed} == {"w"}
    stable = [r for r in journal.rows(watch="w", states=[FileState.STABLE], limit=100)]
    assert max(r.next_attempt_at for r in claimed) <= min(r.next_attempt_at for r in stable)
    others = journal.rows(watch="other", states=[FileState.STABLE], limit=200)
    assert journal.next_due_at(["other"]) == min(r.next_attempt_at for r in others)


def test_status_opens_a_journal_while_another_process_holds_a_write(tmp_path: Path) -> None:
    """Opening an up-to-date journal writes nothing: `status` does not queue behind a drain."""
    path = tmp_path / "journal.sqlite3"
    Journal(path).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], "
         "isolation_level=None); c.execute('BEGIN IMMEDIATE'); print('held', flush=True); "
         "sys.stdin.read()", str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        journal = Journal(path)
        journal._conn().execute("PRAGMA busy_timeout = 0")  # a write would fail at once
        assert journal.pending_count() == 0
    finally:
        holder.communicate("")


def test_rows_decoded_on_the_fast_path_are_the_rows_init_would_make(tmp_path: Path) -> None:
    import dataclasses

    journal = Journal(tmp_path / "journal.sqlite3")
    odd = b"caf\xe9.txt".decode("utf-8", "surrogateescape")
    journal.discover("w", [(odd, 1), ("b", 2)], 1.0)
    [first, _] = journal.rows()
    journal.apply([(first.id, {"threats": ["EICAR"], "raw_result": {"a": [1]},
                               "destination": "/q/" + odd, "state": FileState.DONE})])
    for row in journal.rows():
        rebuilt = type(row)(**{f.name: getattr(row, f.name) for f in dataclasses.fields(row)})
        assert row == rebuilt
        assert isinstance(row.state, FileState)
    done = journal.get(first.id)
    assert done is not None and done.rel_path == odd and done.destination == "/q/" + odd
    assert done.threats == ["EICAR"] and done.raw_result == {"a": [1]} and done.state is FileState.DONE


def test_writing_a_row_builds_no_temporary_b_tree(tmp_path: Path) -> None:
    """A partial index's condition is evaluated for every row written; an IN list of more than
    two values in it would make and free a temporary b-tree each time, under the writers' lock."""
    journal = Journal(tmp_path / "journal.sqlite3")
    conn: sqlite3.Connection = journal._conn()
    written: list[str] = []
    conn.set_trace_callback(written.append)
    try:
        journal.discover("w", [("a", 1), ("b", 2)], 1.0,
                         {name: Identity(1, inode, 4, 1, 1) for name, inode in (("a", 1), ("b", 2))})
        [row, _] = journal.claim(["w"], "1:1", 2.0, 16)
        journal.apply([(row.id, {"state": FileState.MOVING, "verdict": VerdictKind.CLEAN, "sha256": "ab"}),
                       (row.id, {"state": FileState.DONE, "owner": None, "done_at": 3.0})])
    finally:
        conn.set_trace_callback(None)
    per_row = [sql for sql in written if sql.lstrip().startswith(("INSERT", "UPDATE files SET state"))]
    assert len(per_row) == 4, written
    for sql in per_row:
        opcodes = [op[1] for op in conn.execute(f"EXPLAIN {sql}")]
        assert "OpenEphemeral" not in opcodes, sql


def test_the_quarantine_is_listed_from_an_index_of_infected_rows_only(tmp_path: Path) -> None:
    """Clean rows (nearly all of them) are in no index by verdict: each one changed it twice."""
    from daemon.quarantine import list_quarantined

    journal = _journal(tmp_path, 200)
    conn: sqlite3.Connection = journal._conn()
    conn.execute("UPDATE files SET verdict = 'infected' WHERE state = 'done' AND id % 50 = 0")
    queries: list[str] = []
    conn.set_trace_callback(queries.append)
    try:
        listed = list_quarantined(journal)
    finally:
        conn.set_trace_callback(None)
    assert len(listed) == 6 and all(r.verdict == VerdictKind.INFECTED for r in listed)
    plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {queries[-1]}")]
    assert plan == ["SCAN files USING INDEX files_quarantined"], plan
    indexed = [r[2] for r in conn.execute("PRAGMA index_info(files_quarantined)")]
    assert indexed == ["done_at"]
