"""Journal cost against the backlog: the per-batch queries of a drain at 5 000 and 100 000 rows.

Fills a journal with `--rows` stable rows (plus as many done ones: a day's history),
then times, per call, what a drain repeats: `claim` of a 16-row batch, `apply` of its
changes, the watcher's `due` query, the worker's `next_due_at`, and `scanwatch status`
(`status.collect`, journal opened by a second connection as the CLI does). A step whose
cost grows with the backlog shows as a per-call time that grows with `--rows`.

    python bench/journal_backlog.py [--rows 5000 100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon.config import load_config  # noqa: E402
from daemon.journal import Journal  # noqa: E402
from daemon.model import FileState  # noqa: E402
from daemon.status import collect  # noqa: E402


def _fill(journal: Journal, rows: int) -> None:
    now = time.time()
    for start in range(0, rows, 5000):
        journal.discover("bench", ((f"f{i:07d}", i) for i in range(start, min(rows, start + 5000))), now)
    conn = journal._conn()  # noqa: SLF001 - the bench sets states directly, in bulk
    conn.execute("UPDATE files SET state = 'stable'")
    conn.execute("""INSERT INTO files (watch, rel_path, state, next_attempt_at, discovered_at,
                                       updated_at, done_at, verdict)
                    SELECT watch, rel_path || '.old', 'done', next_attempt_at, discovered_at,
                           updated_at, updated_at, 'clean' FROM files""")


def _time(fn: object, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()  # type: ignore[operator]
    return (time.perf_counter() - started) / calls * 1e3


def run(rows: int, config_path: Path, base: Path) -> dict[str, float]:
    journal = Journal(base / "journal.sqlite3")
    _fill(journal, rows)
    config = load_config(config_path)
    now = time.time() + 1

    def claim_apply() -> None:
        claimed = journal.claim(["bench"], "1:1", now, 16)
        journal.apply((r.id, {"state": FileState.DONE, "owner": None, "done_at": now}) for r in claimed)

    result = {
        "claim+apply ms": _time(claim_apply, 50),
        "next_due_at ms": _time(lambda: journal.next_due_at(["bench"]), 50),
    }
    started = time.perf_counter()
    collect(config, Journal(base / "journal.sqlite3"))
    result["status ms"] = (time.perf_counter() - started) * 1e3
    journal.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[5000, 100_000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
    for rows in args.rows:
        runs: list[dict[str, float]] = []
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix="scanwatch-bench-journal-") as tmp:
                base = Path(tmp)
                config = base / "scanwatch.yaml"
                for sub in ("in", "c", "q", "f"):
                    (base / sub).mkdir()
                config.write_text(f"state_dir: {base}\nengines: {{default: {{type: yara}}}}\n"
                                  f"watches: [{{name: bench, engine: default, source: {base}/in, "
                                  f"clean: {base}/c, "
                                  f"quarantine: {base}/q, failed: {base}/f}}]\n")
                runs.append(run(rows, config, base))
        print(f"{rows:>7} stable rows + {rows} done:", "  ".join(
            f"{k} {statistics.median(r[k] for r in runs):8.2f} "
            f"({min(r[k] for r in runs):.2f}-{max(r[k] for r in runs):.2f})" for k in runs[0]))
    print(f"cpu {resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu0:.1f} s, pid {os.getpid()}")


if __name__ == "__main__":
    main()
