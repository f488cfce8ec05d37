"""The journal's part of one file, step by step: what the writers' lock serialises.

One process, one thread, a journal on tmpfs: batches of 16 files go through the journal
steps of a clean local file scanned by YARA (an event's settled arrival recorded claimed by
the worker that takes it, `take`; in a checkout from before, the watcher's `discover` with
settled identities and the worker's `claim`; the verdicts with their kept cache entries,
the placements), as `Pipeline` writes them. Prints µs of CPU per file of each step, and of the
CPU spent holding the writers' lock (`SCANWATCH_LOCK_STATS`). Checkouts given with
`--compare` run in alternation, each in its own process (bench/RESULTS.md, "Issue 21").

    python bench/journal_steps.py [--batches 400] [--runs 5] [--compare /other/checkout]
    python bench/journal_steps.py --what-if "DROP INDEX files_finished"   # what an index costs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_BATCH = 16
_WARM = 50


def _one_run(batches: int, what_if: str | None) -> dict[str, float]:
    """The steps of `batches` batches (after `_WARM` unmeasured ones), µs of CPU per file;
    `what_if`: SQL run on the new journal first (a schema change to weigh)."""
    from daemon.fsutil import Identity
    from daemon.journal import CachedVerdict, KeptVerdict, open_journal
    from daemon.model import FileState, RowChanges, VerdictKind

    with tempfile.TemporaryDirectory(dir="/dev/shm") as state:
        journal = open_journal(Path(state))
        if what_if:
            journal._conn().executescript(what_if)  # noqa: SLF001 - a what-if of the bench only
        # Handed to a worker, an arrival is recorded claimed at once (daemon/handoff.py);
        # a checkout from before that discovers it, then claims it.
        handed = hasattr(journal, "take")
        spent = dict.fromkeys(("take",) if handed else ("discover", "claim"), 0.0)
        spent.update(verdicts=0.0, placements=0.0)
        files = 0
        for batch in range(batches + _WARM):
            now = time.time()
            settled = {f"d/f{batch:05d}-{i:02d}.bin": Identity(1, batch * _BATCH + i, 4096, 1, 1)
                       for i in range(_BATCH)}
            marks = [time.thread_time()]
            if handed:
                rows, _ = journal.take("bench", [(name, ident, now) for name, ident in settled.items()],
                                       "1:1", now, settled=True)
            else:
                journal.discover("bench", [(name, ident.inode) for name, ident in settled.items()],
                                 now, settled)
                marks.append(time.thread_time())
                rows = journal.claim(["bench"], "1:1", now + 1, _BATCH)
            marks.append(time.thread_time())
            verdicts: list[tuple[int, RowChanges]] = []
            kept = []
            for row in rows:
                sha = hashlib.sha256(row.rel_path.encode()).hexdigest()
                verdicts.append((row.id, {
                    "sha256": sha, "ref_id": f"bench:{row.rel_path}#{sha[:12]}", "size": 4096,
                    "state": FileState.MOVING, "verdict": VerdictKind.CLEAN, "reason": None,
                    "threats": [], "raw_result": None, "engine_scan_id": None,
                    "submitting_at": None, "scanned_at": now, "destination": f"/c/{row.rel_path}",
                    "dest_root": "/c", "dest_rel": row.rel_path}))
                kept.append(KeptVerdict(CachedVerdict("default", "yara:x", sha, VerdictKind.CLEAN,
                                                      None, (), row.ref_id, None, now),
                                        100_000, now, row.id))
            journal.apply(verdicts, kept)
            marks.append(time.thread_time())
            journal.apply([(row.id, {"state": FileState.DONE, "destination": f"/c/{row.rel_path}",
                                     "owner": None, "done_at": now, "last_error": None})
                           for row in rows])
            marks.append(time.thread_time())
            if batch >= _WARM:
                files += len(rows)
                for step, start, end in zip(spent, marks, marks[1:], strict=False):
                    spent[step] += end - start
        journal.close()
    locks = [json.loads(line) for line in Path(os.environ["SCANWATCH_LOCK_STATS"]).read_text().splitlines()]
    # A checkout whose journal keeps the verdicts in a file of their own has two locks.
    held = {"under the lock": 0.0, "under the verdicts' lock": 0.0}
    for record in locks:
        held["under the verdicts' lock" if record.get("file") == "verdicts.sqlite3"
             else "under the lock"] += record["held_cpu_s"]
    return {**{step: 1e6 * s / files for step, s in spent.items()},
            **{name: 1e6 * s / ((batches + _WARM) * _BATCH) for name, s in held.items()}}


def _run_in(checkout: Path, batches: int, what_if: str | None) -> dict[str, float]:
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as stats:
        out = subprocess.run([sys.executable, __file__, "--one", str(batches),
                              *(["--what-if", what_if] if what_if else [])], cwd=checkout,
                             env={**os.environ, "PYTHONPATH": str(checkout),
                                  "SCANWATCH_LOCK_STATS": stats.name},
                             capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--compare", type=Path, nargs="*", default=[])
    parser.add_argument("--what-if", help="SQL run on each new journal first, statements separated "
                        "by semicolons (e.g. DROP INDEX x; CREATE INDEX x ...)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a run, in the checkout's process
    args = parser.parse_args()
    if args.one:
        sys.path.insert(0, os.getcwd())
        print(json.dumps(_one_run(args.one, args.what_if)))
        return
    # Every variant runs once per round: the what-if beside this checkout as it is.
    variants = [(c, None) for c in (ROOT, *args.compare)] + ([(ROOT, args.what_if)] if args.what_if else [])
    runs: dict[tuple[Path, str | None], list[dict[str, float]]] = {v: [] for v in variants}
    for _ in range(args.runs):
        for checkout, what_if in variants:
            runs[checkout, what_if].append(_run_in(checkout, args.batches, what_if))
    print(f"journal_steps: {args.batches} batches of {_BATCH} files, {args.runs} runs alternating, "
          f"load average {os.getloadavg()[0]:.1f}; µs of CPU per file, median (min - max)")
    for (checkout, what_if), results in runs.items():
        figures = ", ".join(f"{step} {statistics.median(r[step] for r in results):.1f} "
                            f"({min(r[step] for r in results):.1f} - {max(r[step] for r in results):.1f})"
                            for step in results[0])
        print(f"  {checkout}{f' ({what_if})' if what_if else ''}: {figures}")


if __name__ == "__main__":
    main()
