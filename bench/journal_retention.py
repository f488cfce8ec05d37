"""Journal retention: what a long history costs, and what removing it costs.

Builds a journal of `--rows` finished rows as a YARA watch leaves them (1 % of them still in
quarantine), the oldest `--old` share of them past the cutoff, then per run, on a fresh
copy of it:
- `status` (`Journal.counts()`) and a `/metrics` scrape (`counts(finished=False)`), ms;
- a retention pass (`Journal.prune`): rows removed per second, and the median and longest
  of its transactions (how long the workers may wait for the writers' lock);
- the peer, in the same run on another copy: one bare `DELETE FROM files WHERE done_at < ?`
  (no rows kept for a reason, no counts kept, one transaction);
- the journal's size, and what the next `--rows` x `--old` arrivals add to it (0: they reuse
  the pages freed).
Medians over `--runs` with the spread (min - max) (bench/RESULTS.md).

    python bench/journal_retention.py [--rows 200000] [--old 0.5] [--runs 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.journal import Journal  # noqa: E402

_NOW = time.time()
_CUTOFF = _NOW - 90 * 86400


def _rows(start: int, count: int, old: int) -> list[tuple[object, ...]]:
    rows = []
    for i in range(start, start + count):
        rel = f"partner-{i % 50:02d}/2026/invoice-{i:08d}.pdf".encode()
        sha = hashlib.sha256(rel).hexdigest()
        at = _CUTOFF - (old - i) / 100 if i < old else _NOW - 86400 + i / 1000
        verdict = "infected" if i % 100 == 0 else "clean"
        rows.append((rel, verdict, sha, f"inbox:{rel.decode()}#{sha[:12]}", b"/srv/" + rel, rel,
                     at, at + 0.5))
    return rows


def _fill(path: Path, rows: int, old: int) -> None:
    Journal(path).close()
    conn = sqlite3.connect(path)
    for start in range(0, rows, 10_000):
        conn.executemany(
            """INSERT INTO files (watch, rel_path, state, verdict, threats, sha256, ref_id, engine,
                                  destination, dest_root, dest_rel, dev, inode, size, mtime_ns,
                                  ctime_ns, next_attempt_at, discovered_at, stable_at, scanned_at,
                                  done_at, updated_at, attempts)
               VALUES ('inbox', ?, 'done', ?, '[]', ?, ?, 'default', ?, '/srv/clean', ?, 2049,
                       1000, 4096, 1, 1, ?1, ?7, ?7, ?8, ?8, ?8, 1)""",
            _rows(start, min(10_000, rows - start), old))
        conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def _ms(call) -> float:  # type: ignore[no-untyped-def]
    began = time.perf_counter()
    call()
    return 1000 * (time.perf_counter() - began)


def _one(base: Path, work: Path, rows: int, old: int) -> dict[str, float]:
    shutil.copy(base, work / "ours.sqlite3")
    shutil.copy(base, work / "peer.sqlite3")
    journal = Journal(work / "ours.sqlite3")
    figures = {"status ms": _ms(journal.counts), "scrape ms": _ms(lambda: journal.counts(finished=False))}
    ends = [time.perf_counter()]
    began = time.perf_counter()
    removed = journal.prune(_CUTOFF, go_on=lambda: bool(ends.append(time.perf_counter())) or True)
    seconds = time.perf_counter() - began
    spans = [1000 * (b - a) for a, b in zip(ends, ends[1:], strict=False)]
    figures.update({"pruned rows/s": removed / seconds, "median tx ms": statistics.median(spans),
                    "longest tx ms": max(spans),
                    "status after ms": _ms(journal.counts)})
    journal._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")  # noqa: SLF001 - sizes without the WAL
    size = journal.path.stat().st_size
    conn = sqlite3.connect(journal.path)
    conn.executemany("INSERT INTO files (watch, rel_path, state, next_attempt_at, discovered_at, "
                     "updated_at, sha256, ref_id, destination, dest_rel) "
                     "VALUES ('inbox', ?, 'done', ?, ?, ?, ?, ?, ?, ?)",
                     [(rel + b".new", at, at, at, sha, ref, dest, rel)
                      for rel, _, sha, ref, dest, _, at, _ in _rows(rows, old, 0)])
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    figures["grown by new rows MB"] = (journal.path.stat().st_size - size) / 1e6
    conn.close()
    journal.close()
    peer = sqlite3.connect(work / "peer.sqlite3")
    began = time.perf_counter()
    deleted = peer.execute("DELETE FROM files WHERE done_at < ?", (_CUTOFF,)).rowcount
    peer.commit()
    figures["peer rows/s"] = deleted / (time.perf_counter() - began)
    peer.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--old", type=float, default=0.5, help="share of the rows past the cutoff")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    old = int(args.rows * args.old)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        base = Path(tmp) / "base.sqlite3"
        _fill(base, args.rows, old)
        print(f"journal_retention: {args.rows} finished rows ({old} past the cutoff, 1 % in quarantine), "
              f"{base.stat().st_size / args.rows:.0f} bytes a row, {args.runs} runs, load average "
              f"{os.getloadavg()[0]:.1f}; median (min - max)")
        runs = [_one(base, Path(tmp), args.rows, old) for _ in range(args.runs)]
    for key in runs[0]:
        values = [r[key] for r in runs]
        print(f"  {key:>22}: {statistics.median(values):10.1f} ({min(values):.1f} - {max(values):.1f})")
    ratio = [r["pruned rows/s"] / r["peer rows/s"] for r in runs]
    print(f"  {'ours / bare DELETE':>22}: {statistics.median(ratio):10.2f} "
          f"({min(ratio):.2f} - {max(ratio):.2f})")


if __name__ == "__main__":
    main()
