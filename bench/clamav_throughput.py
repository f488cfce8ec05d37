"""ClamAV throughput: N small files (1 % EICAR) through a watch with engine=clamav, beside
clamdscan on the same clamd in the same run: a per-file loop (one process per file, how
drop-folder scripts usually call it) and `clamdscan --multiscan` over the whole folder.

`--db one` is the tests' one-signature database (clamd answers in microseconds: the
figure is scanwatch's own cost); `--db synthetic` adds 1 M MD5 and 100 k body
signatures (bench/synthetic_db.py), the size of a production database. `--runs` runs
of each, on one clamd per database (`MaxThreads` `--max-threads`, Debian's 12 by
default); medians with the spread (min - max), the daemon's CPU-seconds per file, and
clamd's busy share: its CPU time over the wall time of each run, in cores. The per-file
loop scans a sample (`--loop-files`) and its rate is extrapolated to every file.
`--concurrency` unset: the engine's own default (clamd's `MaxThreads`, docs/engines.md).
`--compare DIR` runs a second checkout's daemon (say the main branch) as one more peer
in every run, with the same configuration (`--compare-concurrency`: another concurrency),
the two daemons taking turns going first.
`--tcp`: the daemons reach clamd by `address:` (the bytes streamed with INSTREAM, and a
verdict-cache flight for every file: docs/engines.md) instead of its unix socket (FILDES).

`--dir`: where the runs' folders go (the journal, the watched folder, its staging), e.g.
/dev/shm (tmpfs) as `bench/local_throughput.py --dir`; the system's temp dir by default.

    python bench/clamav_throughput.py [--db one synthetic] [--files 5000] [--runs 3] [--compare DIR]
                                      [--tcp] [--dir DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import synthetic_db  # noqa: E402
from clamd_server import Clamd, running_clamd  # noqa: E402
from local_throughput import _payloads, run_daemon, spread  # noqa: E402

_DATABASES: dict[str, Callable[[Path], None] | None] = {"one": None, "synthetic": synthetic_db.write}


def _clamdscan(conf: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["clamdscan", f"--config-file={conf}", "--no-summary", *args],
                          capture_output=True)


def clamd_cpu_seconds(pid: int) -> float:
    """User + system CPU time clamd has used so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _daemon(clamd: Clamd, base: Path, files: list[tuple[str, bytes]], concurrency: int | None,
            code: Path = ROOT, tcp: bool = False) -> dict[str, float]:
    """One daemon run: files/s, CPU ms/file, and clamd's cores busy over the run's wall time."""
    endpoint = {"address": clamd.address} if tcp else {"socket": str(clamd.socket)}
    engine = {"type": "clamav", **endpoint, "mode": "auto"}
    busy_before = clamd_cpu_seconds(clamd.pid)
    figures = run_daemon(base, files, concurrency, "write", engine=engine, code=code)
    busy_s = clamd_cpu_seconds(clamd.pid) - busy_before
    return {**figures, "clamd_cores": busy_s * figures["files_per_s"] / len(files)}


def _one_run(clamd: Clamd, base: Path, files: list[tuple[str, bytes]], args: argparse.Namespace,
             index: int) -> dict[str, float]:
    """One run of every peer; the two daemons take turns going first (a load that drifts
    during a run does not favour one of them)."""
    def ours() -> dict[str, float]:
        return _daemon(clamd, base / "daemon", files, args.concurrency, tcp=args.tcp)

    def theirs() -> dict[str, float]:
        return _daemon(clamd, base / "compare", files, args.compare_concurrency or args.concurrency,
                       code=args.compare, tcp=args.tcp)

    if args.compare and index % 2:
        other, mine = theirs(), ours()
    else:
        mine, other = ours(), theirs() if args.compare else {}
    figures = {"scanwatch": mine["files_per_s"], "cpu_ms": mine["cpu_ms_per_file"],
               "rss_mb": mine["peak_rss_mb"], "clamd_cores": mine["clamd_cores"]}
    if other:
        figures |= {"compare": other["files_per_s"], "compare_cpu_ms": other["cpu_ms_per_file"],
                    "compare_clamd_cores": other["clamd_cores"]}
    folder = base / "peer"
    folder.mkdir(mode=0o755)
    for name, body in files:
        (folder / name).write_bytes(body)
        (folder / name).chmod(0o644)
    started = time.monotonic()
    for name, _ in files[: args.loop_files]:
        _clamdscan(clamd.conf, str(folder / name))
    figures["per_file"] = args.loop_files / (time.monotonic() - started)
    busy_before, started = clamd_cpu_seconds(clamd.pid), time.monotonic()
    result = _clamdscan(clamd.conf, "--multiscan", str(folder))
    elapsed = time.monotonic() - started
    figures["multiscan"] = len(files) / elapsed
    figures["multiscan_clamd_cores"] = (clamd_cpu_seconds(clamd.pid) - busy_before) / elapsed
    if result.stdout.count(b"FOUND") != sum(name.endswith(".com") for name, _ in files):
        raise SystemExit(f"clamdscan found {result.stdout.count(b'FOUND')} EICARs: {result.stdout[-500:]!r}")
    return figures


def _spread(runs: list[dict[str, float]], key: str, digits: int = 0) -> str:
    return spread([r[key] for r in runs], digits)


def _report(db: str, runs: list[dict[str, float]], args: argparse.Namespace) -> None:
    ratio = [{"multi": r["scanwatch"] / r["multiscan"], "loop": r["scanwatch"] / r["per_file"],
              **({"compare": r["scanwatch"] / r["compare"]} if args.compare else {})} for r in runs]
    concurrency = args.concurrency or f"unset: MaxThreads {args.max_threads}"
    how = "TCP, INSTREAM" if args.tcp else "FILDES"
    print(f"  database {db}, {len(runs)} runs, median (min - max), load average {os.getloadavg()[0]:.1f}:")
    print(f"    scanwatch ({how}, concurrency {concurrency}): {_spread(runs, 'scanwatch')} files/s, "
          f"CPU {_spread(runs, 'cpu_ms', 3)} ms/file, peak RSS {_spread(runs, 'rss_mb')} MB, "
          f"clamd busy {_spread(runs, 'clamd_cores', 2)} cores")
    if args.compare:
        theirs = args.compare_concurrency or args.concurrency or "unset: its default"
        print(f"    {args.compare} daemon (concurrency {theirs}): "
              f"{_spread(runs, 'compare')} files/s, CPU "
              f"{_spread(runs, 'compare_cpu_ms', 3)} ms/file, clamd busy "
              f"{_spread(runs, 'compare_clamd_cores', 2)} cores "
              f"-> scanwatch is {_spread(ratio, 'compare', 2)}x")
    print(f"    clamdscan --multiscan (scan only): {_spread(runs, 'multiscan')} files/s, clamd busy "
          f"{_spread(runs, 'multiscan_clamd_cores', 2)} cores -> scanwatch is {_spread(ratio, 'multi', 2)}x")
    print(f"    clamdscan per file ({args.loop_files} of the files, rate extrapolated): "
          f"{_spread(runs, 'per_file')} files/s -> scanwatch is {_spread(ratio, 'loop', 1)}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", nargs="+", choices=sorted(_DATABASES), default=["one", "synthetic"])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--loop-files", type=int, default=200, help="files for the per-file loop")
    parser.add_argument("--concurrency", type=int, help="the engine's; unset: its default")
    parser.add_argument("--max-threads", type=int, default=12, help="clamd's MaxThreads")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compare", type=Path, help="another checkout's daemon as a peer")
    parser.add_argument("--compare-concurrency", type=int, help="the peer's; unset: as --concurrency")
    parser.add_argument("--tcp", action="store_true", help="the daemons reach clamd over TCP (address:)")
    parser.add_argument("--dir", type=Path, help="where the runs' folders go (default: the system's "
                        "temp dir); e.g. /dev/shm to leave the filesystem's cost out")
    args = parser.parse_args()
    files = _payloads(args.files, args.size)
    print(f"clamav_throughput: {args.files} files x {args.size} B, 1 % EICAR, one clamd "
          f"(MaxThreads {args.max_threads}), {os.cpu_count()} cores, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for db in args.db:
        with running_clamd(args.max_threads, _DATABASES[db], start_timeout_s=600) as clamd:
            runs = []
            for index in range(args.runs):
                base = Path(tempfile.mkdtemp(prefix="scanwatch-bench-clamav-", dir=args.dir))
                base.chmod(0o755)
                try:
                    runs.append(_one_run(clamd, base, files, args, index))
                finally:
                    shutil.rmtree(base, ignore_errors=True)
        _report(db, runs, args)


if __name__ == "__main__":
    main()
