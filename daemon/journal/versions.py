"""Which S3 object version a journal row stands for (docs/contract.md, "Arrival and settle").

The identity of an arrival is the object version, not its key and ETag: the same bytes
uploaded again under a key are a new version, so a new arrival with its own outcome.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable

from daemon.config.models import IN_PLACE
from daemon.journal.database import Database
from daemon.journal.schema import _ACTIVE
from daemon.model import SeenObject

__all__ = ["ObjectVersions"]

# An active row not yet scanning follows its key to a new version: another ETag, or a
# VersionId or LastModified the row knows and that differs (one it does not know is news).
_OTHER_VERSION = """(excluded.etag IS NOT files.etag
    OR (excluded.version_id IS NOT NULL AND excluded.version_id IS NOT files.version_id)
    OR (excluded.last_modified IS NOT NULL AND excluded.last_modified IS NOT files.last_modified))"""


class ObjectVersions(Database):
    """S3 arrivals: each object version a row of its own, and keys never scanned reported."""

    def discover_objects(self, watch: str, objects: Iterable[tuple[str, str, str | None, int] | SeenObject],
                         now: float, *, listed_at: float | None = None) -> list[str]:
        """Record S3 object versions `(rel_path, etag, version_id, size[, last_modified])` as stable.

        A version a row already stands for is not new, so listing a prefix again, or a
        repeated event, adds nothing; any other version is a new arrival, the same bytes
        or not (docs/contract.md, "Arrival and settle"). `listed_at`: when the listing
        that saw them started (None for events). A key replaced before its scan started
        is updated in place; once scanning, the change is found by the scan's or the
        move's ETag condition. A key held as ignored is taken up once it is no longer
        ignored. Returns the rel_paths of the rows added or updated.
        """
        changed = []
        with self._tx() as conn:
            for seen in map(_seen, objects):
                path = os.fsencode(seen.rel_path)
                if _is_judged(conn, watch, path, seen, listed_at):
                    continue
                cursor = conn.execute(
                    f"""INSERT INTO files (watch, rel_path, state, size, etag, version_id, last_modified,
                                          next_attempt_at, discovered_at, stable_at, updated_at)
                        VALUES (?, ?, 'stable', ?, ?, ?, ?, ?, ?, ?, ?)
                        ON CONFLICT (watch, rel_path) WHERE {_ACTIVE} DO UPDATE
                        SET etag = excluded.etag, version_id = excluded.version_id,
                            last_modified = excluded.last_modified, size = excluded.size,
                            state = excluded.state, reason = NULL, done_at = NULL,
                            updated_at = excluded.updated_at
                        WHERE (files.state IN ('discovered', 'stable') AND {_OTHER_VERSION})
                           OR (files.state = 'held' AND files.reason = 'ignored')""",
                    (watch, path, seen.size, seen.etag, seen.version_id, seen.last_modified,
                     now, now, now, now),
                )
                if cursor.rowcount:
                    changed.append(seen.rel_path)
        return changed

    def skip_objects(self, watch: str, skipped: Iterable[tuple[str, str, str]], now: float) -> list[str]:
        """Record keys `(rel_path, etag, reason)` left unscanned as held; the rel_paths new to it.

        A held row stands for its key until the key is wanted again (`discover_objects`
        then takes it up), so each is reported once (docs/contract.md, "Ignored names").
        """
        added = []
        with self._tx() as conn:
            for rel_path, etag, reason in skipped:
                cursor = conn.execute(
                    f"""INSERT INTO files (watch, rel_path, state, reason, etag, next_attempt_at,
                                          discovered_at, done_at, updated_at)
                        VALUES (?, ?, 'held', ?, ?, ?, ?, ?, ?)
                        ON CONFLICT (watch, rel_path) WHERE {_ACTIVE} DO NOTHING""",
                    (watch, os.fsencode(rel_path), reason, etag, now, now, now, now))
                if cursor.rowcount:
                    added.append(rel_path)
        return added


def _seen(entry: tuple[str, str, str | None, int] | SeenObject) -> SeenObject:
    """An entry as a `SeenObject` (callers may pass plain 4-tuples)."""
    return entry if isinstance(entry, SeenObject) else SeenObject(*entry)


def _is_judged(conn: sqlite3.Connection, watch: str, path: bytes, seen: SeenObject,
               listed_at: float | None) -> bool:
    """Whether the newest finished row of this key stands for exactly this object version.

    VersionIds decide where both are known. An object judged in place stays at its key:
    the same ETag and LastModified are that version. A moved one was removed from the
    source when its row was done, so what a listing started after that finds is new.
    """
    # `+state`: the key's own rows (`files_seen`), never every finished row of the watch.
    row = conn.execute(
        "SELECT etag, version_id, last_modified, dest_root, done_at FROM files "
        "WHERE watch = ? AND rel_path = ? AND +state = 'done' ORDER BY id DESC LIMIT 1",
        (watch, path)).fetchone()
    if row is None:
        return False
    etag, version_id, last_modified, dest_root, done_at = row
    if seen.version_id and version_id:
        return bool(seen.version_id == version_id)
    if dest_root != IN_PLACE:
        return listed_at is not None and done_at is not None and listed_at < done_at
    if seen.last_modified is None or last_modified is None:
        return bool(seen.etag == etag)
    return bool(seen.etag == etag and seen.last_modified == last_modified)
