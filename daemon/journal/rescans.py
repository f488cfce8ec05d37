"""The records of `scan --rescan-clean` (daemon/rescan.py): each rescan, and what it did to each file."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from daemon.journal.database import Database
from daemon.journal.schema import (
    FileRow,
    _audit,
    _from_db,
    _insert_file,
    _rescan_record,
)

__all__ = ["RescanRecords"]


class RescanRecords(Database):
    """What rescans of clean destinations did, resumable after an interruption."""

    def rescan(self, watch: str, now: float) -> tuple[int, dict[str, tuple[str, int | None, Any]]]:
        """The unfinished rescan of `watch` (a new one if none) and what it did so far:
        `rel_path → (outcome, file_id, plan)`."""
        with self._tx() as conn:
            found = conn.execute("SELECT id FROM rescans WHERE watch = ? AND finished_at IS NULL "
                                 "ORDER BY id DESC LIMIT 1", (watch,)).fetchone()
            rescan_id = int(found[0]) if found else int(conn.execute(
                "INSERT INTO rescans (watch, started_at) VALUES (?, ?)", (watch, now)).lastrowid or 0)
            rows = conn.execute("SELECT rel_path, outcome, file_id, plan FROM rescan_files "
                                "WHERE rescan_id = ?", (rescan_id,)).fetchall()
        return rescan_id, {os.fsdecode(r[0]): (r[1], r[2], json.loads(r[3]) if r[3] else None)
                           for r in rows}

    def rescan_record(self, rescan_id: int, rel_path: str, outcome: str, file_id: int | None = None,
                      plan: Mapping[str, Any] | None = None) -> None:
        """Record what the rescan did to `rel_path` (or, `plan`, is about to do)."""
        with self._tx() as conn:
            _rescan_record(conn, rescan_id, rel_path, outcome, file_id, plan)

    def rescan_audited(self, rescan_id: int, rel_path: str, outcome: str, file_id: int,
                       audit: tuple[str, str, str, str | None], changes: Mapping[str, object],
                       now: float) -> None:
        """The rescan's move of `rel_path` done: its audit row, row change and outcome, atomically."""
        with self._tx() as conn:
            _audit(conn, file_id, *audit, changes, now)
            _rescan_record(conn, rescan_id, rel_path, outcome, file_id, None)

    def rescan_finish(self, rescan_id: int, now: float) -> None:
        """Mark a rescan finished: the next one starts afresh."""
        with self._tx() as conn:
            conn.execute("UPDATE rescans SET finished_at = ? WHERE id = ?", (now, rescan_id))

    def placed_row(self, watch: str, destination: str) -> FileRow | None:
        """The newest finished row of a file placed at `destination`."""
        row = self._conn().execute(
            "SELECT * FROM files WHERE watch = ? AND destination = ? AND state = 'done' "
            "ORDER BY id DESC LIMIT 1", (watch, os.fsencode(destination))).fetchone()
        return _from_db(row) if row else None

    def add_done(self, row: Mapping[str, object]) -> int:
        """Insert one finished row (column → value); its id."""
        with self._tx() as conn:
            return _insert_file(conn, row)


