"""Local arrivals into the journal: found by the watcher (`discover`), or handed to a worker that
records them claimed (`take`, daemon/handoff.py), and those on their way meanwhile
(`note_arriving`). S3 object versions: daemon/journal/versions.py."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence

from daemon.fsutil import Identity
from daemon.handoff import Arrival, OnWay
from daemon.journal.database import Database
from daemon.journal.schema import _ACTIVE, FileRow, _new_row
from daemon.model import FileState

__all__ = ["Arrivals"]

# An arrival (`Journal.discover`): a path already active stays as it is, unless held back
# and seen again with another inode, or with one link (held as a hardlink: its other names
# removed; only a plain file has a ctime here), or held for `permission_denied`, tried again.
_DISCOVER = f"""INSERT INTO files (watch, rel_path, state, inode, dev, size, mtime_ns, ctime_ns,
                                  stable_at, next_attempt_at, discovered_at, updated_at)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (watch, rel_path) WHERE {_ACTIVE} DO UPDATE
                SET state = excluded.state, inode = excluded.inode,
                    reason = CASE files.reason WHEN 'permission_denied' THEN files.reason END,
                    dev = excluded.dev, size = excluded.size, mtime_ns = excluded.mtime_ns,
                    ctime_ns = excluded.ctime_ns, stable_at = excluded.stable_at,
                    next_attempt_at = excluded.next_attempt_at,
                    discovered_at = excluded.discovered_at, updated_at = excluded.updated_at
                WHERE files.state = 'held' AND (files.inode IS NOT excluded.inode
                                                OR files.reason = 'permission_denied'
                                                OR (files.reason = 'hardlink'
                                                    AND excluded.ctime_ns IS NOT NULL))"""


# An arrival taken at once by a worker (`Journal.take`): recorded claimed, if not active already.
_TAKE_COLUMNS = ("watch", "rel_path", "state", "owner", "attempts", "dev", "inode", "size", "mtime_ns",
                 "ctime_ns", "stable_at", "next_attempt_at", "discovered_at", "updated_at")
_TAKE = (f"INSERT INTO files ({', '.join(_TAKE_COLUMNS)}) VALUES ({','.join('?' * len(_TAKE_COLUMNS))})"
         f" ON CONFLICT (watch, rel_path) WHERE {_ACTIVE} DO NOTHING")
# Which of a take's arrivals (`a`, numbered) were placed already: one statement a take, not
# one an arrival. This very file placed is a done row of its path and inode that has its
# times (an arrival that `scan --move` took meanwhile, an event seen late), or that was found
# after it (with `settle_seconds: 0` a file seen while it was written, its creation's event,
# and seen again once written, its close's, is handed twice, with other times: the later
# sighting may be placed before a worker takes the first). `+state`: the paths' own rows
# (`files_seen`), never every finished row of the watch.
_PLACED = ("WITH a (n, path, inode, found_at, mtime_ns, ctime_ns) AS (VALUES {})"
           " SELECT n FROM a WHERE EXISTS (SELECT 1 FROM files WHERE watch = ? AND rel_path = a.path"
           " AND inode = a.inode AND +state = 'done' AND (discovered_at >= a.found_at"
           " OR (mtime_ns = a.mtime_ns AND ctime_ns = a.ctime_ns)))")


# The daemon notes what is on its way every second (daemon/service.py); a note older than this
# is from a daemon that no longer runs: its arrivals are found again by its next start's sweep.
_ON_WAY_FRESH_S = 5.0


def _placed(conn: sqlite3.Connection, watch: str, arrivals: list[tuple[bytes, Identity, float]]) -> set[int]:
    """The indexes in `arrivals` (path, identity, found_at) of the files placed already."""
    if not arrivals:
        return set()
    values = [v for n, (path, identity, found_at) in enumerate(arrivals)
              for v in (n, path, identity.inode, found_at, identity.mtime_ns, identity.ctime_ns)]
    sql = _PLACED.format(",".join(["(?,?,?,?,?,?)"] * len(arrivals)))
    return {n for (n,) in conn.execute(sql, (*values, watch))}


def _discover(conn: sqlite3.Connection, params: list[tuple[str, tuple[object, ...]]]) -> list[str]:
    """Run `_DISCOVER` for each arrival; the rel_paths added or revived."""
    # One execution per path, not `executemany`: its rowcount says which were added
    # (not `RETURNING`: SQLite would build a temporary b-tree per statement to hold it).
    return [rel_path for rel_path, values in params if conn.execute(_DISCOVER, values).rowcount]


class Arrivals(Database):
    """A local file's row from its arrival: recorded as found, or as claimed by a worker."""

    def discover(self, watch: str, entries: Iterable[tuple[str, int]], now: float,
                 seen: Mapping[str, Identity] | None = None, settle_s: float = 0.0) -> list[str]:
        """Record `(rel_path, inode)` arrivals; known active paths are left as they are.

        A path held back (a symlink, say) whose inode changed is a new arrival again, and
        so is a hardlink seen with one link (in `seen`); one held for `permission_denied` is
        tried again whenever it is seen (its reason kept, so that holding it again is not
        reported again).
        A path in `seen` (a plain file just lstat'ed) is recorded with that identity: stable
        at once if it has been quiet for `settle_s` already, else due when it will have been
        (`Identity.settles_at`), when the worker that claims it looks once more
        (daemon/pipeline/settling.py). Any other path is due now, to be looked at.
        Returns the rel_paths added or revived, each one a `file.discovered` (docs/contract.md,
        "Log events"). Idempotent.
        """
        params = self._arrival_values(watch, entries, now, seen, settle_s)
        with self._tx() as conn:
            return _discover(conn, params)

    def discover_found(self, watch: str, arrivals: Iterable[Arrival], settle_s: float) -> list[str]:
        """`discover` of arrivals each as it was found (its identity, at its time), in one
        transaction: those a watcher held that no worker could take when due
        (daemon/watchers/local.py)."""
        params = [values for rel_path, identity, found_at in arrivals
                  for values in self._arrival_values(watch, [(rel_path, identity.inode)], found_at,
                                                     {rel_path: identity}, settle_s)]
        with self._tx() as conn:
            return _discover(conn, params)

    @staticmethod
    def _arrival_values(watch: str, entries: Iterable[tuple[str, int]], now: float,
                        seen: Mapping[str, Identity] | None, settle_s: float = 0.0
                        ) -> list[tuple[str, tuple[object, ...]]]:
        """`_DISCOVER`'s values of each arrival (made before the writers' lock is taken)."""
        params: list[tuple[str, tuple[object, ...]]] = []
        for rel_path, inode in entries:
            identity = seen.get(rel_path) if seen else None
            due = identity.settles_at(settle_s, now) if identity else now
            state, stable_at = ("stable", now) if identity and due <= now else ("discovered", None)
            dev, size, mtime_ns, ctime_ns = ((identity.dev, identity.size, identity.mtime_ns,
                                              identity.ctime_ns) if identity else (None,) * 4)
            params.append((rel_path, (watch, os.fsencode(rel_path), state, inode, dev, size,
                                      mtime_ns, ctime_ns, stable_at, max(due, now), now, now)))
        return params

    def take(self, watch: str, arrivals: Sequence[Arrival], owner: str, now: float, *,
             settled: bool) -> tuple[list[FileRow], list[str]]:
        """Record arrivals handed to a worker (daemon/handoff.py), claimed by `owner` at once:
        one row write each, not a `discover` and a `claim`. `settled`: they had settled when
        they were found; else the worker looks once more (daemon/pipeline/settling.py).

        This very file placed already (its path, inode and times) is left out. A path already
        active is left to `discover` (without the identity: a held path it revives is looked
        at afresh), in the same transaction. Returns the rows taken and the rel_paths that
        discovery added or revived (unclaimed): each of both a `file.discovered`.
        """
        made = [(rel_path, identity, found_at,
                 (watch, os.fsencode(rel_path), "scanning", owner, 1, identity.dev, identity.inode,
                  identity.size, identity.mtime_ns, identity.ctime_ns, found_at if settled else None,
                  now, found_at, now))
                for rel_path, identity, found_at in arrivals]
        with self._tx() as conn:
            # Under the writers' lock: read before it, a file that `scan --move` placed between
            # the read and the insert was recorded again (and found `gone`).
            placed = _placed(conn, watch, [(row[1], identity, at) for _, identity, at, row in made])
            taken = [(rel_path, identity.inode, row) for n, (rel_path, identity, _, row) in enumerate(made)
                     if n not in placed]
            # Not `RETURNING *`, which costs more than the insert (bench/RESULTS.md, "Issue 21"):
            # the rows are made from what was inserted.
            ids = [cursor.lastrowid if (cursor := conn.execute(_TAKE, values)).rowcount else None
                   for _, _, values in taken]
            known = [(rel_path, inode) for (rel_path, inode, _), file_id in zip(taken, ids, strict=True)
                     if file_id is None]
            added = _discover(conn, self._arrival_values(watch, known, now, None)) if known else []
        rows = [_new_row(file_id, {**dict(zip(_TAKE_COLUMNS, values, strict=True)), "rel_path": rel_path,
                                   "state": FileState.SCANNING})
                for (rel_path, _, values), file_id in zip(taken, ids, strict=True) if file_id is not None]
        return rows, added

    def note_arriving(self, on_way: OnWay, now: float) -> None:
        """Record what the daemon's process holds on its way to a worker (daemon/handoff.py):
        per watch, how many arrivals, and when the earliest was found."""
        with self._tx() as conn:
            conn.execute("DELETE FROM arriving")
            conn.executemany("INSERT INTO arriving VALUES (?, ?, ?, ?)",
                             [(watch, count, found_at, now) for watch, (count, found_at) in on_way.items()])

    def arriving(self) -> OnWay:
        """What the running daemon last noted on its way to a worker (`note_arriving`)."""
        rows = self._conn().execute("SELECT watch, files, found_at FROM arriving WHERE noted_at > ?",
                                    (time.time() - _ON_WAY_FRESH_S,))
        return {watch: (count, found_at) for watch, count, found_at in rows}
