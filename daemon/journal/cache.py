"""The verdict cache (docs/engines.md, "Verdict cache"): verdicts by content and the hit
counts `status` shows, in a file of their own beside the journal (`VerdictStore`), and the
scans identical bytes wait for, in the journal beside the rows that wait (`VerdictCacheRecords`).

An entry is one engine's clean or infected verdict on one sha256 under one signature
fingerprint; a failed verdict is never kept. Each engine keeps at most `max_entries`, the
newest (rowid order: a replaced entry is new again). A flight is a scan of some bytes in
progress: the row holding it asks the engine; a row with the same bytes waits, scheduled,
until the answer lands in the cache, or the flight ends without one.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from daemon.journal.database import Database
from daemon.journal.migrations import VERDICT_TABLES
from daemon.model import VerdictKind
from daemon.timefmt import iso

__all__ = ["VERDICTS_FILE", "CachedVerdict", "KeptVerdict", "VerdictCacheRecords", "VerdictStore"]

# The kept verdicts' file, beside the journal's (`VerdictStore`).
VERDICTS_FILE = "verdicts.sqlite3"

# Eviction reads `max_entries` index entries: done once every `max(_EVICT_EVERY,
# max_entries // _EVICT_SHARE)` stores of an engine (so ~16 entries read per store, under the
# kept verdicts' writers' lock), which so holds at most that many more than `max_entries`.
_EVICT_EVERY = 64
_EVICT_SHARE = 16


@dataclass(frozen=True)
class CachedVerdict:
    """One engine's verdict on some bytes, and the scan that gave it."""

    engine: str
    fingerprint: str
    sha256: str
    verdict: VerdictKind
    reason: str | None
    threats: tuple[str, ...]
    ref_id: str | None
    engine_scan_id: str | None
    scanned_at: float

    def source(self) -> dict[str, Any]:
        """The reused scan as sidecars and logs name it (`cached_from`)."""
        return {"external_reference_id": self.ref_id, "engine_scan_id": self.engine_scan_id,
                "scanned_at": iso(self.scanned_at)}

    def to_json(self) -> dict[str, Any]:
        """The entry as the fleet's shared cache stores it (docs/fleet.md)."""
        return {"engine": self.engine, "fingerprint": self.fingerprint, "sha256": self.sha256,
                "verdict": self.verdict.value, "reason": self.reason, "threats": list(self.threats),
                "ref_id": self.ref_id, "engine_scan_id": self.engine_scan_id,
                "scanned_at": self.scanned_at}

    @classmethod
    def from_json(cls, value: Any) -> CachedVerdict:
        """An entry read back; raises ValueError (or KeyError, TypeError) for another shape."""
        verdict = VerdictKind(value["verdict"])
        if verdict is VerdictKind.FAILED:
            raise ValueError("a failed verdict is never cached")
        threats = value.get("threats") or []
        if not isinstance(threats, list) or not all(isinstance(t, str) for t in threats):
            raise ValueError("threats: expected a list of strings")
        return cls(str(value["engine"]), str(value["fingerprint"]), str(value["sha256"]), verdict,
                   _str(value.get("reason")), tuple(threats), _str(value.get("ref_id")),
                   _str(value.get("engine_scan_id")), float(value["scanned_at"]))


class KeptVerdict(NamedTuple):
    """A verdict to keep with the batch's commit (`Journal.apply`): a miss, `file_id`'s scan."""

    entry: CachedVerdict
    max_entries: int
    now: float
    file_id: int | None


def _count(conn: Any, engine: str, *, hit: bool, by: int = 1) -> None:
    column = "hits" if hit else "misses"
    conn.execute(f"INSERT INTO cache_stats (engine, {column}) VALUES (?, ?) "
                 f"ON CONFLICT (engine) DO UPDATE SET {column} = {column} + excluded.{column}",
                 (engine, by))


def _str(value: object) -> str | None:
    return None if value is None else str(value)


# The kept verdicts' own file: the tables the journal had (`adopt` copies them column for
# column), and when the journal's were copied.
_SCHEMA = [VERDICT_TABLES + "CREATE TABLE adopted (at REAL NOT NULL);"]


class VerdictStore(Database):
    """The kept verdicts and their counts, in a file of their own beside the journal.

    Its own file is its own writers' lock: a kept verdict is a random page of its sha256 key
    per file, which under the journal's lock was a quarter of what that lock serialises
    (bench/RESULTS.md, "the kept verdicts' own lock"). It holds nothing the journal's
    promises rest on: an entry is written before the verdict it comes with is journaled (so
    that rows woken by that commit find it), and one without its row's verdict (a crash
    between the two) is still that engine's true verdict on those bytes.
    """

    schema = _SCHEMA

    def __init__(self, path: Path, journal: Database | None = None) -> None:
        """`journal`: told of damage found here, as of its own (the daemon stops on it)."""
        self._journal = journal
        super().__init__(path)

    def _on_damage(self, exc: sqlite3.DatabaseError) -> None:
        super()._on_damage(exc)
        if self._journal is not None:
            self._journal._on_damage(sqlite3.DatabaseError(f"{self.path.name}: {exc}"))  # noqa: SLF001

    def get(self, engine: str, fingerprint: str, sha256: str) -> CachedVerdict | None:
        """The engine's verdict on these bytes under these signatures, if kept."""
        row = self._conn().execute(
            "SELECT engine, fingerprint, sha256, verdict, reason, threats, ref_id, engine_scan_id, "
            "scanned_at FROM verdict_cache WHERE engine = ? AND fingerprint = ? AND sha256 = ?",
            (engine, fingerprint, sha256)).fetchone()
        if row is None:
            return None
        return CachedVerdict(row[0], row[1], row[2], VerdictKind(row[3]), row[4],
                             tuple(json.loads(row[5]) if row[5] else ()), row[6], row[7], row[8])

    def keep(self, kept: Sequence[KeptVerdict], *, is_miss: bool) -> None:
        """Keep several verdicts in one transaction: the entries in one statement, each
        engine's counts once (`is_miss`: the engines were asked for them), the oldest
        entries dropped past `max_entries` (a pass every sixteenth of it)."""
        values = [(e.engine, e.fingerprint, e.sha256, e.verdict.value, e.reason,
                   json.dumps(list(e.threats)), e.ref_id, e.engine_scan_id, e.scanned_at)
                  for e in (k.entry for k in kept)]
        with self._tx() as conn:
            conn.executemany("INSERT OR REPLACE INTO verdict_cache VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             values)
            for engine, count in Counter(k.entry.engine for k in kept).items():
                if is_miss:
                    _count(conn, engine, hit=False, by=count)
                stored = conn.execute(
                    "INSERT INTO cache_stats (engine, stored) VALUES (?, ?) ON CONFLICT (engine) "
                    "DO UPDATE SET stored = stored + excluded.stored RETURNING stored",
                    (engine, count)).fetchone()[0]
                max_entries = min(k.max_entries for k in kept if k.entry.engine == engine)
                if stored % max(_EVICT_EVERY, max_entries // _EVICT_SHARE) < count:  # a multiple passed
                    conn.execute(
                        "DELETE FROM verdict_cache WHERE engine = ? AND rowid <= (SELECT rowid FROM "
                        "verdict_cache WHERE engine = ? ORDER BY rowid DESC LIMIT 1 OFFSET ?)",
                        (engine, engine, max_entries))

    def count(self, engine: str, *, hit: bool) -> None:
        """Count a lookup of `engine`'s cache: a hit, or a miss (the engine was asked)."""
        with self._tx() as conn:
            _count(conn, engine, hit=hit)

    def stats(self) -> dict[str, tuple[int, int]]:
        """`engine → (hits, misses)` since the file was made."""
        rows = self._conn().execute("SELECT engine, hits, misses FROM cache_stats")
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    def clear(self, engine: str | None) -> int:
        """Drop the kept verdicts of `engine` (None: of every engine); returns how many."""
        with self._tx() as conn:
            cursor = conn.execute("DELETE FROM verdict_cache WHERE engine = ? OR ? IS NULL",
                                  (engine, engine))
            return int(cursor.rowcount)

    def forget(self, sha256: str, engines: Collection[str]) -> int:
        """Drop these engines' kept verdicts on the bytes `sha256`; returns how many."""
        marks = ",".join("?" * len(engines))
        with self._tx() as conn:
            cursor = conn.execute(f"DELETE FROM verdict_cache WHERE sha256 = ? AND engine IN ({marks})",
                                  (sha256, *engines))
            return int(cursor.rowcount)

    def size(self, engine: str) -> int:
        """How many verdicts `engine` keeps."""
        row = self._conn().execute("SELECT count(*) FROM verdict_cache WHERE engine = ?",
                                   (engine,)).fetchone()
        return int(row[0])

    def adopt(self, journal: Database) -> None:
        """Copy the kept verdicts and counts of the journal beside, once: journals made
        before this file kept them in tables of their own (`verdict_cache`, `cache_stats`),
        which stay there unused, so that a daemon of that version still running meanwhile
        goes on with them (its later entries are not copied)."""
        if self._conn().execute("SELECT 1 FROM adopted").fetchone() is not None:
            return
        with self._tx() as mine:  # the copy and its mark in one transaction: made once, whole
            if mine.execute("SELECT 1 FROM adopted").fetchone() is not None:
                return
            theirs = journal._conn()  # noqa: SLF001 - read only
            if theirs.execute("SELECT 1 FROM sqlite_master WHERE name = 'verdict_cache'").fetchone():
                entries = theirs.execute("SELECT * FROM verdict_cache ORDER BY rowid")
                mine.executemany("INSERT INTO verdict_cache VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                 [tuple(e) for e in entries])
                stats = theirs.execute("SELECT engine, hits, misses, stored FROM cache_stats")
                mine.executemany("INSERT INTO cache_stats VALUES (?, ?, ?, ?)", [tuple(r) for r in stats])
            mine.execute("INSERT INTO adopted VALUES (?)", (time.time(),))


class VerdictCacheRecords(Database):
    """The verdict cache as the journal holds it: the entries in their own file
    (`verdicts`), the flights beside the rows that wait for them."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        self.verdicts = VerdictStore(self.path.with_name(VERDICTS_FILE), self)
        self.verdicts.adopt(self)

    def quick_check(self) -> str | None:
        """What `PRAGMA quick_check` finds wrong in the journal or its kept verdicts, or None."""
        problem = super().quick_check()
        if problem is None and (problem := self.verdicts.quick_check()) is not None:
            problem = f"{VERDICTS_FILE}: {problem}"
        return problem

    def close(self) -> None:
        """Close every thread's connections, to both files."""
        super().close()
        self.verdicts.close()

    def cache_verdict(self, entry: CachedVerdict, max_entries: int, now: float,
                      file_id: int | None = None, *, is_miss: bool = False) -> None:
        """Keep a verdict (of `file_id`'s scan), end its bytes' flight, make the rows waiting due now.

        `is_miss`: the engine was asked for it, counted with it.
        """
        kept = KeptVerdict(entry, max_entries, now, file_id)
        self.verdicts.keep([kept], is_miss=is_miss)
        with self._tx() as conn:
            self._landed(conn, [kept])

    def _landed(self, conn: Any, kept: Sequence[KeptVerdict]) -> None:
        """The flights these kept verdicts end, within a transaction already open (their
        entries already kept: the rows this wakes find them). Only bytes with a flight are
        landed, found by one look for the whole batch: most take none (small files for an
        engine on this host, `VerdictCache.wait`)."""
        flown: set[tuple[str, str]] = set()
        for engine in {k.entry.engine for k in kept}:
            shas = [k.entry.sha256 for k in kept if k.entry.engine == engine]
            rows = conn.execute("SELECT sha256 FROM cache_flights WHERE engine = ? AND sha256 IN "
                                f"({','.join('?' * len(shas))})", (engine, *shas))
            flown.update((engine, row[0]) for row in rows)
        for k in kept:
            if (k.entry.engine, k.entry.sha256) in flown:
                self._land(conn, k.entry.engine, k.entry.sha256, k.file_id, k.now, is_answer=True)

    def take_flight(self, engine: str, sha256: str, file_id: int, now: float,
                    wait_until: float) -> int | None:
        """Hold the flight of these bytes for `file_id`, unless another row's stands: its id.

        A flight stands while its row is `scanning` (asking, or waiting for a pending scan);
        one left by a row that was retried, placed or lost is taken over. A row that waits
        is due at `wait_until`, or as soon as the flight lands: both written here, in the
        transaction that found the flight, so a flight landing before the waiting row's own
        step commits still wakes it.
        """
        with self._tx() as conn:
            found = conn.execute(
                "SELECT f.file_id FROM cache_flights f JOIN files r ON r.id = f.file_id "
                "WHERE f.engine = ? AND f.sha256 = ? AND f.file_id != ? AND r.state = 'scanning'",
                (engine, sha256, file_id)).fetchone()
            if found is not None:
                conn.execute("UPDATE files SET sha256 = ?, next_attempt_at = ? WHERE id = ?",
                             (sha256, wait_until, file_id))
                conn.execute("INSERT OR IGNORE INTO cache_waiters VALUES (?, ?, ?)",
                             (engine, sha256, file_id))
                return int(found[0])
            conn.execute("INSERT OR REPLACE INTO cache_flights VALUES (?, ?, ?, ?)",
                         (engine, sha256, file_id, now))
            return None

    def end_flight(self, engine: str, sha256: str, file_id: int, now: float, *,
                   is_miss: bool = False) -> None:
        """The row's scan ended without a verdict to keep: the rows waiting ask for themselves.

        `is_miss`: the engine was asked (and failed), counted.
        """
        if is_miss:
            self.verdicts.count(engine, hit=False)
        with self._tx() as conn:
            self._land(conn, engine, sha256, file_id, now, is_answer=False)

    def _land(self, conn: Any, engine: str, sha256: str, file_id: int | None, now: float, *,
              is_answer: bool) -> None:
        """End the flight (an answer ends anyone's; no answer only the row's own) and wake the
        rows waiting for it; never `file_id` itself, whose own schedule stands. A row waits only
        while the flight it found stands (`take_flight`): no flight ended, nobody to wake (an
        answer for bytes nobody flew, the usual case, costs one statement)."""
        only = "" if is_answer else " AND file_id = ?"
        cursor = conn.execute(f"DELETE FROM cache_flights WHERE engine = ? AND sha256 = ?{only}",
                              (engine, sha256, *(() if is_answer else (file_id,))))
        if cursor.rowcount:
            # The rows that waited for it (`take_flight`) and wait still, their bytes journaled:
            # stable (one engine; or still claimed, their step not committed yet) or scanning
            # with a scan record waiting (several engines; a pending scan of the same bytes is
            # then polled once early: harmless).
            me = -1 if file_id is None else file_id
            conn.execute("""UPDATE files SET next_attempt_at = ?
                            WHERE id IN (SELECT file_id FROM cache_waiters WHERE engine = ? AND sha256 = ?)
                              AND state IN ('stable', 'scanning') AND sha256 = ?
                              AND next_attempt_at > ? AND id != ?""",
                         (now, engine, sha256, sha256, now, me))
            conn.execute("DELETE FROM cache_waiters WHERE engine = ? AND sha256 = ?", (engine, sha256))
            conn.execute("UPDATE scans SET next_attempt_at = ? WHERE sha256 = ? AND verdict IS NULL "
                         "AND next_attempt_at > ? AND file_id != ?", (now, sha256, now, me))
