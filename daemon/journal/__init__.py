"""The journal: one SQLite file in WAL mode, the only shared state and the work queue.

One row per arrival. Rows change state (see `FileState`, which says where they go back) in
transactions; the intent of every side effect is written before it and the outcome after, so any
step can be replayed after a crash. Each thread uses its own connection; other
processes (`scan --move`, `status`, `quarantine`) open the same file beside the
daemon. A claimed row carries its owner's token (`pid:start time`); rows of a
dead owner are handed back by `reclaim`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path

from daemon.journal.arrivals import Arrivals
from daemon.journal.cache import VERDICTS_FILE, CachedVerdict, KeptVerdict, VerdictCacheRecords
from daemon.journal.database import Database, _is_alive, is_damage, owner_token, state_dir_error
from daemon.journal.rescans import RescanRecords
from daemon.journal.retention import Retention
from daemon.journal.schema import (
    _ACTIVE,
    _CLAIMABLE,
    _FINISHED,
    _ORDER_COLUMNS,
    _SCAN_WRITABLE,
    _THREAT_LIKE,
    AuditRow,
    FileRow,
    FleetMember,
    RowOrder,
    _audit,
    _file_updates,
    _from_db,
    _insert_file,
    _like_substring,
    _run,
    _to_db,
    _update_file,
)
from daemon.journal.versions import ObjectVersions
from daemon.model import (
    FileState,
    RowChanges,
    ScanChanges,
    ScanRecord,
    SeenObject,
    VerdictKind,
)

__all__ = ["VERDICTS_FILE", "AuditRow", "CachedVerdict", "Database", "FileRow", "FleetMember", "Journal",
           "KeptVerdict", "RowChanges", "RowOrder", "SeenObject", "is_damage", "open_journal", "owner_token",
           "state_dir_error"]


# A claim: a stable or a discovered row becomes scanning and spends an attempt.
_TAKEN = ("attempts = attempts + (state = 'stable' OR state = 'discovered'), "
          "state = CASE WHEN state = 'stable' OR state = 'discovered' THEN 'scanning' ELSE state END")
# Handed back unfinished: a scan the engine never took waits again, to be settled if it was not.
_UNTAKEN = ("CASE WHEN state = 'scanning' AND engine_scan_id IS NULL "
            "THEN CASE WHEN stable_at IS NULL THEN 'discovered' ELSE 'stable' END ELSE state END")


class Journal(Arrivals, ObjectVersions, RescanRecords, Retention, VerdictCacheRecords):
    """The SQLite journal under `state_dir`: arrivals, the work queue, what happened to each file;
    and beside it, in a file of their own, the verdicts it keeps (`verdicts`)."""

    # -- intake -----------------------------------------------------------------------------

    def restore(self, rows: Iterable[Mapping[str, object]]) -> int:
        """Insert finished rows (column → value) rebuilt from elsewhere; returns how many."""
        with self._tx() as conn:
            return sum(1 for row in rows if _insert_file(conn, row))

    # -- work queue -----------------------------------------------------------------------

    def claim(self, watches: Sequence[str], owner: str, now: float, limit: int) -> list[FileRow]:
        """Take up to `limit` due rows of these watches for `owner`.

        A stable or discovered row becomes scanning and spends an attempt (a discovered one,
        `stable_at` still empty, is settled first by the pipeline: daemon/pipeline/settling.py);
        scanning rows waiting for an engine, rows with a verdict, and half-done moves keep
        their state.
        """
        marks = ",".join("?" * len(watches))
        with self._tx() as conn:
            rows = conn.execute(
                f"""UPDATE files SET owner = ?, updated_at = ?,
                        {_TAKEN}
                    WHERE id IN (SELECT id FROM files WHERE {_CLAIMABLE} AND +watch IN ({marks})
                                 AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?)
                    RETURNING *""",
                (owner, now, *watches, now, limit),
            ).fetchall()
        return sorted((_from_db(r) for r in rows), key=lambda r: r.id)

    def claim_id(self, file_id: int, owner: str, now: float) -> FileRow | None:
        """Claim one row now whatever its due time, if nobody else holds it."""
        with self._tx() as conn:
            row = conn.execute(
                f"""UPDATE files SET owner = ?, updated_at = ?,
                        {_TAKEN}
                    WHERE id = ? AND {_CLAIMABLE} RETURNING *""",
                (owner, now, file_id),
            ).fetchone()
        return _from_db(row) if row else None

    def apply(self, changes: Iterable[tuple[int, RowChanges]], kept: Iterable[KeptVerdict] = ()) -> None:
        """Write several rows' changes in one transaction (columns by name), the verdicts their
        scans leave in the cache kept just before (`cache_verdict` for a whole batch)."""
        kept = list(kept)
        statements = _file_updates(changes)
        if kept:
            self.verdicts.keep(kept, is_miss=True)
        with self._tx() as conn:
            _run(conn, statements)
            self._landed(conn, kept)

    def apply_scans(self, file_id: int, changes: RowChanges,
                    scans: Mapping[str, ScanChanges]) -> None:
        """Write a file row's changes and its engines' scan records in one transaction.

        A record given a `sha256` other than its own is of new bytes: it starts afresh.
        """
        with self._tx() as conn:
            if changes:
                _update_file(conn, file_id, changes)
            for engine, fields in scans.items():
                if unknown := fields.keys() - _SCAN_WRITABLE:
                    raise ValueError(f"not scan record columns: {sorted(unknown)}")
                if "sha256" in fields:
                    conn.execute("DELETE FROM scans WHERE file_id = ? AND engine = ? AND sha256 != ?",
                                 (file_id, engine, fields["sha256"]))
                    conn.execute("INSERT OR IGNORE INTO scans (file_id, engine, sha256) VALUES (?, ?, ?)",
                                 (file_id, engine, fields["sha256"]))
                columns = ", ".join(f"{name} = ?" for name in fields)
                values = [_to_db(name, value) for name, value in fields.items()]
                conn.execute(f"UPDATE scans SET {columns} WHERE file_id = ? AND engine = ?",
                             (*values, file_id, engine))

    def scans(self, file_id: int) -> dict[str, ScanRecord]:
        """A file's scan records by engine (watches with several engines)."""
        rows = self._conn().execute("SELECT * FROM scans WHERE file_id = ?", (file_id,)).fetchall()
        records = {}
        for row in rows:
            values = dict(row)
            values["threats"] = json.loads(values["threats"]) if values["threats"] else None
            values["verdict"] = VerdictKind(values["verdict"]) if values["verdict"] else None
            values["abandoned"] = bool(values["abandoned"])
            values["cached_from"] = json.loads(values["cached_from"]) if values["cached_from"] else None
            records[values["engine"]] = ScanRecord(**values)
        return records

    def reclaim(self) -> int:
        """Hand back the rows of owners that are no longer running; returns how many."""
        conn = self._conn()
        owners = [r[0] for r in conn.execute(
            "SELECT DISTINCT owner FROM files WHERE owner IS NOT NULL AND " + _ACTIVE)]
        dead = [o for o in owners if not _is_alive(o)]
        if not dead:
            return 0
        marks = ",".join("?" * len(dead))
        with self._tx() as conn:
            # A scan cut off before the engine took it starts over (the attempt stays spent,
            # so a file that crashes the daemon cannot loop forever).
            cursor = conn.execute(
                f"""UPDATE files SET owner = NULL, state = {_UNTAKEN}
                    WHERE owner IN ({marks}) AND {_ACTIVE}""", dead)
            return cursor.rowcount

    def release(self, owner: str, ids: Sequence[int] | None = None) -> None:
        """Hand back the rows `owner` holds (all, or those of `ids`) that it did not finish."""
        only = "" if ids is None else f" AND id IN ({','.join('?' * len(ids))})"
        with self._tx() as conn:
            conn.execute(
                f"""UPDATE files SET owner = NULL, state = {_UNTAKEN},
                        attempts = attempts - (state = 'scanning' AND engine_scan_id IS NULL)
                    WHERE owner = ? AND {_ACTIVE}{only}""", (owner, *(ids or ())))

    def next_due_at(self, watches: Sequence[str]) -> float | None:
        """When the earliest claimable row of these watches is due."""
        marks = ",".join("?" * len(watches))
        row = self._conn().execute(
            f"SELECT min(next_attempt_at) FROM files WHERE {_CLAIMABLE} AND +watch IN ({marks})",
            tuple(watches)).fetchone()
        return row[0] if row else None

    def mark_scan_due(self, engine: str, engine_scan_ids: Sequence[str], now: float) -> int:
        """Make the unclaimed row waiting for one of these scans of `engine` due now.

        A webhook said the scan finished; the worker then polls it once. Rows already
        due, claimed or finished are left alone, so repeated deliveries change nothing.
        Returns how many rows were made due.
        """
        if not engine_scan_ids:
            return 0
        marks = ",".join("?" * len(engine_scan_ids))
        with self._tx() as conn:
            cursor = conn.execute(
                f"""UPDATE files SET next_attempt_at = ?, updated_at = ?
                    WHERE state = 'scanning' AND owner IS NULL AND next_attempt_at > ?
                      AND ((engine = ? AND engine_scan_id IN ({marks}))
                           OR id IN (SELECT file_id FROM scans WHERE engine = ?
                                     AND engine_scan_id IN ({marks})))""",
                (now, now, now, engine, *engine_scan_ids, engine, *engine_scan_ids))
            conn.execute(f"UPDATE scans SET next_attempt_at = ? WHERE engine = ? AND verdict IS NULL "
                         f"AND engine_scan_id IN ({marks}) AND next_attempt_at > ?",
                         (now, engine, *engine_scan_ids, now))
            return cursor.rowcount

    # -- reading ----------------------------------------------------------------------------

    def get(self, file_id: int) -> FileRow | None:
        """One row by id."""
        row = self._conn().execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return _from_db(row) if row else None

    def active(self, watch: str, rel_path: str) -> FileRow | None:
        """The row of a path still being handled, if any."""
        row = self._conn().execute(
            f"SELECT * FROM files WHERE watch = ? AND rel_path = ? AND {_ACTIVE}",
            (watch, os.fsencode(rel_path))).fetchone()
        return _from_db(row) if row else None

    def is_settled(self, watch: str, rel_path: str, etag: str) -> bool:
        """Whether no row of this object version is still being handled (done, gone or held)."""
        row = self._conn().execute(
            f"SELECT 1 FROM files WHERE watch = ? AND rel_path = ? AND etag = ? AND {_ACTIVE} "
            "AND state != 'held' LIMIT 1", (watch, os.fsencode(rel_path), etag)).fetchone()
        return row is None

    def latest(self, watch: str, rel_path: str) -> FileRow | None:
        """The newest row of a path, in any state."""
        row = self._conn().execute(
            "SELECT * FROM files WHERE watch = ? AND rel_path = ? ORDER BY id DESC LIMIT 1",
            (watch, os.fsencode(rel_path))).fetchone()
        return _from_db(row) if row else None

    def rows(self, *, watch: str | None = None, states: Collection[FileState] | None = None,
             verdict: VerdictKind | None = None, done_since: float | None = None,
             threat: str | None = None, has_error: bool | None = None,
             has_disposition: bool | None = None, order: RowOrder = "id",
             newest_first: bool = False, limit: int = 1000) -> list[FileRow]:
        """Rows passing every filter given (None: not filtered), by `order` then id.

        `threat` is a substring of one of the row's threat names, case-insensitive for
        ASCII (SQL LIKE) and literal: `%`, `_` and `\\` in it are not patterns.
        """
        filters = [
            (watch is not None, "watch = ?", (watch,)),
            (states is not None, f"state IN ({','.join('?' * len(states or ()))})",
             tuple(str(s) for s in states or ())),
            # Only active states asked for: the partial index of active rows serves them.
            (states is not None and not {FileState.DONE, FileState.GONE} & set(states or ()), _ACTIVE, ()),
            # A literal: the partial index of quarantined rows is used only for it.
            (verdict is not None, f"verdict = '{VerdictKind(verdict).value}'" if verdict else "", ()),
            (done_since is not None, "done_at >= ?", (done_since,)),
            (threat is not None, _THREAT_LIKE, (_like_substring(threat or ""),)),
            (has_error is not None,
             "last_error IS NOT NULL" if has_error else "last_error IS NULL", ()),
            (has_disposition is not None,
             "disposition IS NOT NULL" if has_disposition else "disposition IS NULL", ()),
        ]
        where = " AND ".join(["1", *(sql for used, sql, _ in filters if used)])
        params = [value for used, _, values in filters if used for value in values]
        direction = "DESC" if newest_first else "ASC"
        rows = self._conn().execute(
            f"SELECT * FROM files WHERE {where} "
            f"ORDER BY {_ORDER_COLUMNS[order]} {direction}, id {direction} LIMIT ?",
            (*params, limit))
        return [_from_db(r) for r in rows]

    def counts(self, *, finished: bool = True) -> list[tuple[str, str, str | None, str | None, int]]:
        """`(watch, state, verdict, reason, count)` for every group of rows: the active ones
        read from their index; then the arrivals on their way to a worker, in state
        `arriving` (`note_arriving`). `finished`: the finished ones too, read from their
        index alone (`files_finished`), with those that retention removed (`prune`)."""
        groups = ("SELECT watch, state, verdict, reason, count(*) AS files FROM files WHERE {} "
                  "GROUP BY watch, state, verdict, reason")
        sql = groups.format(_ACTIVE)
        if finished:
            sql = (f"SELECT watch, state, verdict, reason, sum(files) FROM ("
                   f"{groups.format(_FINISHED)} UNION ALL SELECT watch, state, NULLIF(verdict, ''), "
                   "NULLIF(reason, ''), files FROM finished_counts) "
                   f"GROUP BY watch, state, verdict, reason UNION ALL {sql} ORDER BY 1, 2")
        rows = [tuple(r) for r in self._conn().execute(sql)]
        return rows + [(watch, "arriving", None, None, count)
                       for watch, (count, _) in sorted(self.arriving().items())]

    def pending_count(self) -> int:
        """Files not yet done, gone or held: rows (served by the partial index of active rows),
        and arrivals on their way to a worker."""
        row = self._conn().execute(
            f"SELECT count(*) FROM files WHERE {_ACTIVE} AND state != 'held'").fetchone()
        return int(row[0]) + sum(count for count, _ in self.arriving().values())

    def oldest_pending(self) -> dict[str, float]:
        """Per watch, when the oldest file not yet done was found (a row, or on its way)."""
        rows = self._conn().execute(
            f"SELECT watch, min(discovered_at) FROM files WHERE {_ACTIVE} AND state != 'held' "
            "GROUP BY watch")
        oldest = {r[0]: r[1] for r in rows}
        for watch, (_, found_at) in self.arriving().items():
            oldest[watch] = min(found_at, oldest.get(watch, found_at))
        return oldest

    def size_bytes(self) -> int:
        """Bytes on disk of the journal and its kept verdicts, with their WALs."""
        return sum(p.stat().st_size for db in (self.path, self.verdicts.path)
                   for p in (db, Path(f"{db}-wal")) if p.exists())

    # -- engines and audit --------------------------------------------------------------------

    def set_engine_health(self, name: str, healthy: bool, detail: str | None, now: float) -> None:
        """Record the last health probe of an engine."""
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO engines VALUES (?, ?, ?, ?)",
                         (name, int(healthy), detail, now))

    def engine_health(self) -> dict[str, tuple[bool, str | None, float]]:
        """`name → (healthy, detail, checked_at)` of every engine probed."""
        rows = self._conn().execute("SELECT * FROM engines")
        return {r[0]: (bool(r[1]), r[2], r[3]) for r in rows}

    def set_fleet(self, watch: str, member: FleetMember) -> None:
        """Record this daemon's part in a fleet watch: its lease, the messages it holds."""
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO fleet VALUES (?, ?, ?, ?, ?)",
                         (watch, member.holder, member.lease_until, member.messages_held,
                          member.updated_at))

    def fleet(self) -> dict[str, FleetMember]:
        """`watch → FleetMember` of the fleet watches this daemon ran."""
        rows = self._conn().execute("SELECT * FROM fleet")
        return {r[0]: FleetMember(r[1], r[2], r[3], r[4]) for r in rows}

    def audit(self, file_id: int, action: str, actor: str, reason: str,
              detail: str | None, changes: Mapping[str, object], now: float) -> None:
        """Record a quarantine action and its change to the row, atomically."""
        with self._tx() as conn:
            _audit(conn, file_id, action, actor, reason, detail, changes, now)

    def audit_trail(self, file_id: int) -> list[AuditRow]:
        """The audited actions on one row, oldest first."""
        rows = self._conn().execute(
            "SELECT file_id, at, action, actor, reason, detail FROM audit "
            "WHERE file_id = ? ORDER BY id", (file_id,))
        return [AuditRow(*r) for r in rows]


def open_journal(state_dir: Path) -> Journal:
    """The journal kept under `state_dir`."""
    return Journal(state_dir / "journal.sqlite3")


