"""Retention: the finished rows nothing needs any more are removed once they are older than
`journal.keep`, their counts kept for `status` (docs/operations.md, "Journal retention");
held rows whose path the watchers no longer find are finished first (`held_gone`).

Without it every file ever handled keeps a row (about 550 bytes) and `status` counts them all.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterable

from daemon.config.models import IN_PLACE
from daemon.journal.database import Database
from daemon.journal.schema import _ACTIVE, _FINISHED

__all__ = ["Retention"]

# Row ids one transaction looks at: it bounds how long the writers' lock is held (a few ms).
_CHUNK = 1000

# What a finished row is still needed for, however old: a file still in quarantine (the
# `quarantine` commands), the newest outcome of an S3 object judged in place (it stops the
# object's next listing from scanning it again: daemon/journal/versions.py), the plan of a
# rescan under way (daemon/rescan.py), a flight of the verdict cache. `IS`, not `=`: never
# NULL, which `NOT` would leave NULL, so that a row with no verdict would be kept.
_NEEDED = f"""(
    (state = 'done' AND verdict IS 'infected' AND disposition IS NULL)
    OR (dest_root IS '{IN_PLACE}' AND id = (
        SELECT max(id) FROM files AS newer
        WHERE newer.watch = files.watch AND newer.rel_path = files.rel_path AND +newer.state = 'done'))
    OR EXISTS (SELECT 1 FROM rescan_files JOIN rescans ON rescans.id = rescan_id
               WHERE file_id = files.id AND finished_at IS NULL)
    OR EXISTS (SELECT 1 FROM cache_flights WHERE file_id = files.id)
    OR EXISTS (SELECT 1 FROM cache_waiters WHERE file_id = files.id))"""

# Parameters: the first id, the id past the last, the cutoff.
_PRUNABLE = f"id >= ? AND id < ? AND {_FINISHED} AND updated_at < ? AND NOT {_NEEDED}"

_REMOVE = (
    # Counted as the rows were (`Journal.counts` adds these back).
    """INSERT INTO finished_counts
       SELECT watch, state, IFNULL(verdict, ''), IFNULL(reason, ''), count(*) FROM files
       WHERE id IN temp.pruned GROUP BY 1, 2, 3, 4
       ON CONFLICT DO UPDATE SET files = files + excluded.files""",
    "DELETE FROM scans WHERE file_id IN temp.pruned",
    "DELETE FROM audit WHERE file_id IN temp.pruned",
    "UPDATE rescan_files SET file_id = NULL WHERE file_id IN temp.pruned",
    "DELETE FROM files WHERE id IN temp.pruned",
)


class Retention(Database):
    """Old finished rows removed, a transaction at a time, beside the running daemon."""

    def prune(self, before: float, *, go_on: Callable[[], bool] = lambda: True) -> int:
        """Remove the finished rows last changed before `before` that nothing needs (`_NEEDED`),
        with their scans and audit records; then the rescans finished before it with their
        records. One transaction per `_CHUNK` row ids that hold such rows (found first by a
        read, which takes no lock); `go_on()` is asked after each, and False stops there (the
        next call starts again). Returns the rows removed."""
        conn = self._conn()
        # Two queries: SQLite reads the ends of the rowid b-tree for `min(id)` or `max(id)`
        # alone, and the whole table for both in one.
        first, last = (conn.execute(f"SELECT {end}(id) FROM files").fetchone()[0] for end in ("min", "max"))
        removed = 0
        for start in range(first or 0, (last or -1) + 1, _CHUNK):
            if conn.execute(f"SELECT 1 FROM files WHERE {_PRUNABLE} LIMIT 1",
                            (start, start + _CHUNK, before)).fetchone() is None:
                continue
            with self._tx() as tx:
                removed += _prune_chunk(tx, start, start + _CHUNK, before)
            if not go_on():
                return removed
        finished = "SELECT id FROM rescans WHERE finished_at < ?"
        with self._tx() as tx:
            tx.execute(f"DELETE FROM rescan_files WHERE rescan_id IN ({finished})", (before,))
            tx.execute(f"DELETE FROM rescans WHERE id IN ({finished})", (before,))
        return removed

    def held_paths(self, watch: str) -> list[tuple[int, str]]:
        """`(id, rel_path)` of the watch's held rows: a symlink, a hardlink, a special file..."""
        rows = self._conn().execute(f"SELECT id, rel_path FROM files WHERE watch = ? AND {_ACTIVE} "
                                    "AND state = 'held'", (watch,))
        return [(file_id, os.fsdecode(rel_path)) for file_id, rel_path in rows]

    def held_gone(self, file_ids: Iterable[int], now: float) -> int:
        """Held rows whose path is no longer there become `gone`, if still held: finished, no
        longer counted as skipped, and removed by retention in time. How many."""
        with self._tx() as conn:
            return conn.executemany("UPDATE files SET state = 'gone', done_at = ?, updated_at = ? "
                                    "WHERE id = ? AND state = 'held'",
                                    [(now, now, file_id) for file_id in file_ids]).rowcount


def _prune_chunk(conn: sqlite3.Connection, start: int, end: int, before: float) -> int:
    """Remove the prunable rows with ids in [start, end); how many."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS pruned (id INTEGER PRIMARY KEY)")
    found = conn.execute(f"INSERT INTO temp.pruned SELECT id FROM files WHERE {_PRUNABLE}",
                         (start, end, before)).rowcount
    if found:
        for sql in _REMOVE:
            conn.execute(sql)
        conn.execute("DELETE FROM temp.pruned")
    return found
