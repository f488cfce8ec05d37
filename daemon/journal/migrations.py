"""The journal's tables, as the migrations that made them, in order: `PRAGMA user_version`
counts those a journal has had (daemon/journal/database.py)."""

__all__ = ["SCHEMA", "VERDICT_TABLES"]

# The verdict cache's entries, each engine's verdicts by signatures and sha256, kept newest
# first (rowid order: a replaced entry is new again; the order index serves eviction), and
# its counts: the journal's once, the kept verdicts' own file's now (daemon/journal/cache.py).
VERDICT_TABLES = """
    CREATE TABLE verdict_cache (
        engine TEXT NOT NULL, fingerprint TEXT NOT NULL, sha256 TEXT NOT NULL,
        verdict TEXT NOT NULL, reason TEXT, threats TEXT,
        ref_id TEXT, engine_scan_id TEXT, scanned_at REAL NOT NULL,
        PRIMARY KEY (engine, fingerprint, sha256)
    );
    CREATE INDEX verdict_cache_order ON verdict_cache(engine);
    CREATE TABLE cache_stats (
        engine TEXT PRIMARY KEY, hits INTEGER NOT NULL DEFAULT 0, misses INTEGER NOT NULL DEFAULT 0,
        stored INTEGER NOT NULL DEFAULT 0
    );
"""

SCHEMA = [
    """
    CREATE TABLE files (
        id INTEGER PRIMARY KEY,
        watch TEXT NOT NULL,
        rel_path BLOB NOT NULL,          -- os.fsencode: file names need not be UTF-8
        state TEXT NOT NULL,
        dev INTEGER, inode INTEGER, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER,
        sha256 TEXT, ref_id TEXT, engine TEXT, engine_scan_id TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        move_attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        verdict TEXT, reason TEXT, threats TEXT, raw_result TEXT,
        destination BLOB, disposition TEXT,
        owner TEXT, last_error TEXT,
        discovered_at REAL NOT NULL, stable_at REAL, scanned_at REAL, done_at REAL,
        updated_at REAL NOT NULL
    );
    CREATE UNIQUE INDEX files_active ON files(watch, rel_path)
        WHERE state NOT IN ('done', 'gone');
    CREATE INDEX files_due ON files(state, next_attempt_at) WHERE state NOT IN ('done', 'gone');
    CREATE INDEX files_outcome ON files(verdict, done_at);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        file_id INTEGER NOT NULL REFERENCES files(id),
        at REAL NOT NULL, action TEXT NOT NULL, actor TEXT NOT NULL,
        reason TEXT NOT NULL, detail TEXT
    );
    CREATE TABLE engines (
        name TEXT PRIMARY KEY, healthy INTEGER NOT NULL, detail TEXT, checked_at REAL NOT NULL
    );
    """,
    # S3 sources: the object version a row stands for; rows of any state remember it.
    """
    ALTER TABLE files ADD COLUMN etag TEXT;
    ALTER TABLE files ADD COLUMN version_id TEXT;
    CREATE INDEX files_seen ON files(watch, rel_path, etag);
    """,
    # Remote engines: a submission sent (or about to be) whose answer is not journaled yet.
    """
    ALTER TABLE files ADD COLUMN submitting_at REAL;
    """,
    # The move plan as the mover executes it: the destination root and the name below it.
    """
    ALTER TABLE files ADD COLUMN dest_root TEXT;
    ALTER TABLE files ADD COLUMN dest_rel BLOB;
    """,
    # Several engines on one watch: one scan record per (file, engine) (daemon/pipeline/multi.py).
    """
    CREATE TABLE scans (
        file_id INTEGER NOT NULL REFERENCES files(id),
        engine TEXT NOT NULL,
        sha256 TEXT NOT NULL, ref_id TEXT, engine_scan_id TEXT,
        verdict TEXT, reason TEXT, threats TEXT,
        attempts INTEGER NOT NULL DEFAULT 0, submitting_at REAL,
        next_attempt_at REAL NOT NULL DEFAULT 0, last_error TEXT, scanned_at REAL,
        abandoned INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (file_id, engine)
    );
    CREATE INDEX scans_engine_scan ON scans(engine, engine_scan_id);
    """,
    # `scan --rescan-clean`: each rescan of a watch's clean files, and what it did to each one
    # (daemon/rescan.py); `plan` holds a quarantine move journaled before it is made.
    """
    CREATE TABLE rescans (
        id INTEGER PRIMARY KEY, watch TEXT NOT NULL, started_at REAL NOT NULL, finished_at REAL
    );
    CREATE TABLE rescan_files (
        rescan_id INTEGER NOT NULL REFERENCES rescans(id),
        rel_path BLOB NOT NULL, outcome TEXT NOT NULL,
        file_id INTEGER REFERENCES files(id), plan TEXT,
        PRIMARY KEY (rescan_id, rel_path)
    );
    """,
    # Fleet watches (docs/fleet.md): this daemon's part, for `status` and the metrics.
    """
    CREATE TABLE fleet (
        watch TEXT PRIMARY KEY, holder TEXT NOT NULL, lease_until REAL,
        messages_held INTEGER NOT NULL, updated_at REAL NOT NULL
    );
    """,
    # The work queue in due order: `claim` and `next_due_at` read a batch off its head
    # instead of every row of the watch, so their cost does not grow with the backlog.
    """
    CREATE INDEX files_claimable ON files(next_attempt_at)
        WHERE state IN ('stable', 'verdict', 'scanning', 'moving') AND owner IS NULL;
    -- `counts` (status, metrics) reads this index alone, already in group order.
    CREATE INDEX files_counts ON files(watch, state, verdict, reason);
    """,
    # S3 sources: the object version's LastModified (epoch seconds), so that the same bytes
    # uploaded again under a judged key are a new arrival (docs/contract.md, "S3 in place").
    """
    ALTER TABLE files ADD COLUMN last_modified REAL;
    """,
    # S3 sources: the private server-side snapshot a row is scanned and promoted from
    # (daemon/locations/s3staging.py), deleted with the source once the row is moved.
    """
    ALTER TABLE files ADD COLUMN snapshot TEXT;
    """,
    # The verdict cache by content (docs/engines.md, "Verdict cache", daemon/journal/cache.py):
    # each engine's verdicts by signatures and sha256, kept newest first (rowid order); the
    # scans in flight that identical bytes wait for; hits and misses for `status`. The
    # verdicts and their counts have since had a file of their own (`VerdictStore`), made with
    # the same tables: these are only read once, to be copied there.
    VERDICT_TABLES + """
    CREATE TABLE cache_flights (
        engine TEXT NOT NULL, sha256 TEXT NOT NULL, file_id INTEGER NOT NULL REFERENCES files(id),
        started_at REAL NOT NULL,
        PRIMARY KEY (engine, sha256)
    );
    ALTER TABLE scans ADD COLUMN cached_from TEXT;
    CREATE INDEX scans_waiting ON scans(sha256) WHERE verdict IS NULL;
    """,
    # The claimable rows' condition as comparisons: SQLite evaluates an IN list of more than
    # two values through a temporary b-tree, made and freed at each evaluation, and a partial
    # index's condition is evaluated for the old and the new row of every row written: two
    # such b-trees per INSERT and UPDATE of `files`, under the writers' lock (bench/RESULTS.md,
    # "Issue 21"). `_CLAIMABLE` (schema.py) is the same expression, so the work queue's queries use it.
    """
    DROP INDEX files_claimable;
    CREATE INDEX files_claimable ON files(next_attempt_at)
        WHERE (state = 'stable' OR state = 'verdict' OR state = 'scanning' OR state = 'moving')
              AND owner IS NULL;
    """,
    # Outcomes by verdict were indexed for every row, each one changed twice (its verdict,
    # then its done time): 3 of the 25 pages a batch of 16 clean files wrote to the WAL. Only
    # the quarantine is listed by verdict (`Journal.rows`, `scanwatch quarantine list`).
    """
    DROP INDEX files_outcome;
    CREATE INDEX files_quarantined ON files(done_at) WHERE verdict = 'infected';
    """,
    # Discovered rows are claimed too: the worker that takes one settles it (one lstat) and
    # scans it in the same batch, where the daemon's watcher used to settle every file with
    # a row write of its own (daemon/pipeline/settling.py).
    """
    DROP INDEX files_claimable;
    CREATE INDEX files_claimable ON files(next_attempt_at)
        WHERE (state = 'discovered' OR state = 'stable' OR state = 'verdict' OR state = 'scanning'
               OR state = 'moving') AND owner IS NULL;
    """,
    # A row's state changes three times on its way (claimed, judged, done), and SQLite
    # rewrites a row's entry in every index that names a column written: `files_due` and
    # `files_counts` had `state` in their key, 6.6 of the ~42 µs per file that the journal's
    # lock serialises (bench/RESULTS.md, "Issue 21"). The queue is read by `files_claimable`,
    # the active rows by `files_active`; the finished rows are counted from an index of their
    # own, written once, when a row finishes; the rows waiting for a flight of the verdict
    # cache, which `files_due` found among the rows due later, are listed where they wait (a
    # row waiting across the upgrade asks for itself when its wait ends).
    """
    DROP INDEX files_due;
    DROP INDEX files_counts;
    CREATE INDEX files_finished ON files(watch, state, verdict, reason)
        WHERE state = 'done' OR state = 'gone';
    CREATE TABLE cache_waiters (
        engine TEXT NOT NULL, sha256 TEXT NOT NULL, file_id INTEGER NOT NULL REFERENCES files(id),
        PRIMARY KEY (engine, sha256, file_id)
    ) WITHOUT ROWID;
    """,
    # The arrivals the daemon holds in memory on their way to a worker (daemon/handoff.py),
    # per watch, as its main loop last noted them: counted by `status` and the metrics.
    """
    CREATE TABLE arriving (
        watch TEXT PRIMARY KEY, files INTEGER NOT NULL, found_at REAL NOT NULL,
        noted_at REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # Retention (daemon/journal/retention.py, docs/operations.md "Journal retention"): the
    # counts of the finished rows removed, which `status` adds to those of the rows kept
    # (NULL verdicts and reasons as ''); and the indexes that let a removed row's audit and
    # rescan records be found without reading those tables whole, as SQLite's foreign key
    # check of each deleted row otherwise does.
    """
    CREATE TABLE finished_counts (
        watch TEXT NOT NULL, state TEXT NOT NULL, verdict TEXT NOT NULL, reason TEXT NOT NULL,
        files INTEGER NOT NULL,
        PRIMARY KEY (watch, state, verdict, reason)
    ) WITHOUT ROWID;
    CREATE INDEX audit_file ON audit(file_id);
    CREATE INDEX rescan_files_file ON rescan_files(file_id);
    """,
]
