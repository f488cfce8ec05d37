"""Local throughput: N small files (1 % EICAR) dropped into a watch with the YARA engine.

Prints, for a burst (all files dropped at once), files/s from first drop to last
move and the daemon's peak RSS; for a trickle (files dropped at a steady rate below
capacity), detect→verdict latency percentiles from the journal (discovery to
verdict; in a burst that figure is mostly queueing). Beside it, in the same run, the
floor of the same work with no daemon: one Python loop that reads, hashes,
YARA-scans and renames each file.

    python bench/local_throughput.py [--files 5000] [--size 4096] [--trickle-rate 200]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
EICAR = (ROOT / "samples" / "eicar.com").read_bytes()


def _payloads(count: int, size: int) -> list[tuple[str, bytes]]:
    files = []
    for i in range(count):
        body = EICAR if i % 100 == 0 else os.urandom(size)
        files.append((f"f{i:05d}.{'com' if i % 100 == 0 else 'bin'}", body))
    return files


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def own_cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process and its running children (`workers: N`) have used so far."""
    own = own_cpu_seconds(pid)
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
                for c in (task / "children").read_text().split()]
    return own + sum(cpu_seconds(c) for c in children)


def run_daemon(base: Path, files: list[tuple[str, bytes]], concurrency: int | None,
               arrival: str, rate: float | None = None,
               engine: dict[str, object] | None = None, code: Path = ROOT,
               workers: int | None = None, serial: bool = False,
               cpus: int | None = None, settle_s: float = 0.0, log_level: str = "warning"
               ) -> dict[str, float]:
    """Run `scanwatch run` (from the checkout `code`) on `files`; figures of the run.

    `workers`: None leaves the daemon's default (one per core). `serial`: also the time its
    transactions held the writers' locks (SCANWATCH_LOCK_STATS), per file. `cpus`: the daemon
    and its workers run on the first `cpus` cores only. `settle_s`: the watch's
    `settle_seconds`. `log_level`: the daemon's (its own default is info; the bench's warning
    leaves the per-file lines out)."""
    inbox = base / "inbox"
    inbox.mkdir(parents=True)
    base.chmod(0o755)  # clamd, as another user, reads files by path
    inbox.chmod(0o755)
    config = {
        "state_dir": str(base / "state"),
        "log": {"format": "json", "level": log_level},
        **({"workers": workers} if workers is not None else {}),
        "engines": {"default": {"type": "yara", **(engine or {}),
                                **({"concurrency": concurrency} if concurrency else {})}},
        "watches": [{"name": "bench", "source": str(inbox), "engine": "default",
                     "clean": str(base / "clean"), "quarantine": str(base / "quarantine"),
                     "failed": str(base / "failed"), "settle_seconds": settle_s, "rescan_interval": 300}],
    }
    (base / "scanwatch.yaml").write_text(yaml.safe_dump(config))
    if arrival == "backlog":  # all present before the daemon starts; timed from its start
        for name, body in files:
            (inbox / name).write_bytes(body)
    before_start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--config",
                             str(base / "scanwatch.yaml")], cwd=code, stdout=subprocess.DEVNULL,
                            preexec_fn=(lambda: os.sched_setaffinity(0, range(cpus))) if cpus else None,
                            env={**os.environ, "PYTHONPATH": str(code),
                                 **({"SCANWATCH_LOCK_STATS": str(base / "locks.jsonl")} if serial else {})})
    journal = base / "state" / "journal.sqlite3"
    deadline = time.monotonic() + 30
    while not journal.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # watchers armed
    cpu_at_start = 0.0 if arrival == "backlog" else cpu_seconds(proc.pid)  # start-up is not per file
    parent_at_start = 0.0 if arrival == "backlog" else own_cpu_seconds(proc.pid)
    staging = base / "staging"
    staging.mkdir()
    if arrival == "rename":
        for name, body in files:
            (staging / name).write_bytes(body)
    started = before_start if arrival == "backlog" else time.time()
    for index, (name, body) in enumerate(files if arrival != "backlog" else ()):
        if arrival == "rename":  # the way SFTP servers finish uploads: rename into place
            os.rename(staging / name, inbox / name)
        else:
            (inbox / name).write_bytes(body)
        if rate:
            time.sleep(max(0.0, started + (index + 1) / rate - time.time()))
    dropped = time.time()
    peak_kb = 0
    status_s = 0.0
    conn = sqlite3.connect(journal)
    while True:
        peak_kb = max(peak_kb, _peak_rss_kb(proc.pid))
        done = conn.execute("SELECT count(*), max(done_at) FROM files WHERE state = 'done'").fetchone()
        if arrival == "backlog" and not status_s and done[0] > len(files) // 4:
            status_s = _status_seconds(base / "scanwatch.yaml", code)
        if done[0] >= len(files):
            break
        if time.time() - started > 600:
            raise SystemExit(f"only {done[0]} of {len(files)} files done after 600 s")
        time.sleep(0.05)
    last_done = done[1]
    latencies = sorted(r[0] for r in conn.execute(
        "SELECT scanned_at - discovered_at FROM files WHERE state = 'done'"))
    outcomes = dict(conn.execute("SELECT verdict, count(*) FROM files GROUP BY verdict").fetchall())
    first_done = conn.execute("SELECT min(done_at) FROM files").fetchone()[0]
    cpu_s = cpu_seconds(proc.pid) - cpu_at_start
    parent_s = own_cpu_seconds(proc.pid) - parent_at_start
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    return {
        **(_lock_figures(base / "locks.jsonl", proc.pid, len(files)) if serial else {}),
        "parent_cpu_ms_per_file": 1000 * parent_s / len(files),
        "files_per_s": len(files) / (last_done - started),
        "drop_s": dropped - started,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99) - 1],
        "peak_rss_mb": peak_kb / 1024,
        "cpu_ms_per_file": 1000 * cpu_s / len(files),
        "first_move_s": first_done - started,
        # From the first move on: a backlog's drain without the daemon's start-up before it.
        "drain_files_per_s": (len(files) - 1) / max(last_done - first_done, 1e-6),
        "status_s": status_s,
        "clean": outcomes.get("clean", 0),
        "infected": outcomes.get("infected", 0),
    }


def _lock_figures(stats: Path, parent: int, count: int) -> dict[str, float]:
    """Per file: ms the workers' and the parent's transactions held the journal's writers'
    lock (wall time, and the CPU time of the holding threads: wall time counts waiting for a
    core too), and every process's held the kept verdicts' (a checkout that keeps them in a
    file of their own)."""
    held = {"workers": 0.0, "parent": 0.0, "workers_cpu": 0.0, "parent_cpu": 0.0,
            "verdicts": 0.0, "verdicts_cpu": 0.0}
    if not stats.exists():  # a checkout that keeps no such figures
        return {}
    for line in stats.read_text().splitlines():
        record = json.loads(line)
        who = ("verdicts" if record.get("file") == "verdicts.sqlite3"
               else "parent" if record["pid"] == parent else "workers")
        held[who] += record["held_s"]
        held[f"{who}_cpu"] += record.get("held_cpu_s", record["held_s"])
    return {f"lock_{who}_ms_per_file": 1000 * s / count for who, s in held.items()}


def _status_seconds(config: Path, code: Path) -> float:
    """How long `scanwatch status` (of the checkout `code`) takes to collect, imports left out."""
    script = ("import sys, time; from daemon.config import load_config; "
              "from daemon.journal import open_journal; from daemon.status import collect; "
              "config = load_config(sys.argv[1]); started = time.perf_counter(); "
              "collect(config, open_journal(config.state_dir)); print(time.perf_counter() - started)")
    done = subprocess.run([sys.executable, "-c", script, str(config)], capture_output=True, text=True,
                          cwd=code, env={**os.environ, "PYTHONPATH": str(code)}, check=True)
    return float(done.stdout)


def run_floor(base: Path, files: list[tuple[str, bytes]]) -> dict[str, float]:
    """The same work without a daemon: read, hash, YARA-scan, rename; one thread."""
    import yara

    rules = yara.compile(filepath=str(ROOT / "daemon" / "rules" / "eicar.yar"))
    src, dst = base / "floor-in", base / "floor-out"
    src.mkdir()
    dst.mkdir()
    for name, body in files:
        (src / name).write_bytes(body)
    started = time.time()
    for name, _ in files:
        data = (src / name).read_bytes()
        hashlib.sha256(data).hexdigest()
        rules.match(data=data)
        os.rename(src / name, dst / name)
    return {"files_per_s": len(files) / (time.time() - started)}


def _one_run(base: Path, files: list[tuple[str, bytes]], args: argparse.Namespace
             ) -> dict[str, dict[str, float]]:
    figures: dict[str, dict[str, float]] = {}
    codes = {"ours": (ROOT, args.workers, None, args.log_level)}
    if args.compare or args.compare_workers or args.compare_cpus or args.compare_log_level:
        codes["compare"] = (args.compare or ROOT, args.compare_workers or args.workers,
                            args.compare_cpus, args.compare_log_level or args.log_level)
    for who, (code, workers, cpus, level) in codes.items():
        figures[f"burst {who}"] = run_daemon(base / f"burst-{who}", files, args.concurrency,
                                             args.arrival, code=code, workers=workers,
                                             serial=args.serial, cpus=cpus, settle_s=args.settle,
                                             log_level=level)
        figures[f"trickle {who}"] = run_daemon(base / f"trickle-{who}", files[:args.trickle_files],
                                               args.concurrency, args.arrival,
                                               rate=args.trickle_rate, code=code, workers=workers,
                                               settle_s=args.settle, log_level=level)
        if args.backlog:
            backlog = _payloads(args.backlog, 100)
            figures[f"backlog {who}"] = run_daemon(base / f"backlog-{who}", backlog,
                                                   args.concurrency, "backlog", code=code,
                                                   workers=workers, settle_s=args.settle,
                                                   log_level=level)
    figures["floor"] = run_floor(base, files)
    return figures


def spread(values: list[float], digits: int = 0) -> str:
    """`median (min - max)` of one figure over the runs."""
    return (f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f} - "
            f"{max(values):.{digits}f})")


def _spread(runs: list[dict[str, dict[str, float]]], what: str, key: str, digits: int = 0) -> str:
    return spread([r[what][key] for r in runs], digits)


def _report(runs: list[dict[str, dict[str, float]]], args: argparse.Namespace) -> None:
    peer_level = f" (peer {args.compare_log_level})" if args.compare_log_level else ""
    print(f"local_throughput: {args.files} files x {args.size} B, 1 % EICAR, YARA, "
          f"concurrency {args.concurrency}, arrival by {args.arrival}, settle_seconds {args.settle:g}, "
          f"log level {args.log_level}{peer_level}, "
          f"{os.cpu_count()} cores, "
          f"{len(runs)} runs, median (min - max)")
    peer = args.compare or args.compare_workers or args.compare_cpus or args.compare_log_level
    for who in ("ours", "compare") if peer else ("ours",):
        name = f"scanwatch (workers {args.workers})" if who == "ours" else (
            f"{args.compare or 'scanwatch'} (workers {args.compare_workers or args.workers}"
            + (f", on {args.compare_cpus} cores" if args.compare_cpus else "")
            + (f", log level {args.compare_log_level})" if args.compare_log_level else ")"))
        print(f"  {name}, burst: {_spread(runs, f'burst {who}', 'files_per_s')} files/s, CPU "
              f"{_spread(runs, f'burst {who}', 'cpu_ms_per_file', 3)} ms/file, peak RSS "
              f"{_spread(runs, f'burst {who}', 'peak_rss_mb')} MB")
        print(f"  {name}, trickle {args.trickle_rate:.0f} files/s: detect->verdict p50 "
              f"{_spread(runs, f'trickle {who}', 'p50_ms', 1)} ms, p99 "
              f"{_spread(runs, f'trickle {who}', 'p99_ms', 1)} ms")
        if args.backlog:
            print(f"  {name}, backlog of {args.backlog} x 100 B present at start: "
                  f"{_spread(runs, f'backlog {who}', 'files_per_s')} files/s, first move "
                  f"{_spread(runs, f'backlog {who}', 'first_move_s', 2)} s, status during the drain "
                  f"{_spread(runs, f'backlog {who}', 'status_s', 3)} s, CPU "
                  f"{_spread(runs, f'backlog {who}', 'cpu_ms_per_file', 3)} ms/file (start-up included), "
                  f"peak RSS {_spread(runs, f'backlog {who}', 'peak_rss_mb')} MB")
            _report_backlog(runs, name, who)
    if peer:
        ratios = [{"r": {"burst": r["burst ours"]["files_per_s"] / r["burst compare"]["files_per_s"],
                         "cpu": r["burst ours"]["cpu_ms_per_file"] / r["burst compare"]["cpu_ms_per_file"],
                         **({"backlog": r["backlog ours"]["files_per_s"]
                             / r["backlog compare"]["files_per_s"],
                             "first": r["backlog ours"]["first_move_s"]
                             / r["backlog compare"]["first_move_s"]} if args.backlog else {})}}
                  for r in runs]
        print(f"  scanwatch / peer: burst {_spread(ratios, 'r', 'burst', 2)}x, CPU per file "
              f"{_spread(ratios, 'r', 'cpu', 2)}x"
              + (f", backlog {_spread(ratios, 'r', 'backlog', 2)}x, its first move after "
                 f"{_spread(ratios, 'r', 'first', 2)}x the time" if args.backlog else ""))
    if args.serial:
        for who in ("ours", "compare"):
            if "lock_workers_ms_per_file" in runs[0].get(f"burst {who}", {}):
                _report_serial(runs, who)
    print(f"  bare python loop: {_spread(runs, 'floor', 'files_per_s')} files/s "
          "(read+sha256+yara+rename, no daemon)")


def _report_backlog(runs: list[dict[str, dict[str, float]]], name: str, who: str) -> None:
    """The backlog's drain from its first move, and against the burst of the same run: timed
    from the daemon's start (start-up included) and from its first move."""
    ratios = [{"r": {"start": r[f"backlog {who}"]["files_per_s"] / r[f"burst {who}"]["files_per_s"],
                     "move": r[f"backlog {who}"]["drain_files_per_s"]
                     / r[f"burst {who}"]["files_per_s"]}} for r in runs]
    print(f"  {name}, backlog from its first move: "
          f"{_spread(runs, f'backlog {who}', 'drain_files_per_s')} files/s; backlog / burst, same run: "
          f"{_spread(ratios, 'r', 'start', 2)}x from the daemon's start, "
          f"{_spread(ratios, 'r', 'move', 2)}x from the first move")


def _report_serial(runs: list[dict[str, dict[str, float]]], who: str) -> None:
    """The serial part of a file's work (the writers' lock held by the workers, the parent's
    CPU: watcher, dispatch, its own transactions) and the speed-up predicted from it.

    Two predictions (bench/RESULTS.md, "the serial-fraction table"): Amdahl's, which counts the
    lock's CPU and the parent's as one serial part during which nothing else runs; and the
    bottleneck bound, for what this pipeline is: the lock (any holder) and the parent's
    process are each one resource that runs beside the workers, so n cores move at most
    min(n / C, 1 / L, 1 / V, 1 / P) files a second (C: CPU per file, every process; L: CPU under
    the journal's lock, every process; V: under the kept verdicts' lock, where they have one;
    P: the parent's CPU), i.e. a speed-up of min(n, C / L, C / V, C / P)."""
    shares = []
    for run in runs:
        burst = run[f"burst {who}"]
        cpu = burst["cpu_ms_per_file"]
        lock_cpu = burst["lock_workers_cpu_ms_per_file"]
        verdicts_cpu = burst.get("lock_verdicts_cpu_ms_per_file", 0.0)
        parent = burst["parent_cpu_ms_per_file"]
        shares.append({"s": {"lock": burst["lock_workers_ms_per_file"], "lock_cpu": lock_cpu,
                             "lock_parent": burst["lock_parent_ms_per_file"], "parent": parent,
                             "verdicts_cpu": verdicts_cpu,
                             "share": 100 * (burst["lock_workers_ms_per_file"] + parent) / cpu,
                             "share_cpu": 100 * (lock_cpu + parent) / cpu,
                             "share_both": 100 * (lock_cpu + verdicts_cpu + parent) / cpu,
                             "lock_bound": cpu / (lock_cpu + burst.get("lock_parent_cpu_ms_per_file", 0.0)),
                             "verdicts_bound": cpu / verdicts_cpu if verdicts_cpu else float("inf"),
                             "parent_bound": cpu / parent}})
    print(f"  serial part ({who}), ms per file: the journal's writers' lock held by the workers "
          f"{_spread(shares, 's', 'lock', 3)} "
          f"(CPU under it {_spread(shares, 's', 'lock_cpu', 3)}), by the parent "
          f"{_spread(shares, 's', 'lock_parent', 3)}; the kept verdicts' lock (CPU, every process) "
          f"{_spread(shares, 's', 'verdicts_cpu', 3)}; parent CPU {_spread(shares, 's', 'parent', 3)}; "
          f"serial share of the CPU per file {_spread(shares, 's', 'share', 1)} % (the journal's lock's "
          f"wall time), {_spread(shares, 's', 'share_cpu', 1)} % (CPU under it), "
          f"{_spread(shares, 's', 'share_both', 1)} % (CPU under either lock)")
    for key, what in (("share", "lock's wall time"), ("share_cpu", "CPU under the lock")):
        share = statistics.median(r["s"][key] for r in shares) / 100
        print(f"  Amdahl from that share ({what}): " + ", ".join(
            f"{cores} cores {1 / (share + (1 - share) / cores):.2f}x" for cores in (2, 4, 8, 16)))
    bound = min(statistics.median(r["s"][key] for r in shares)
                for key in ("lock_bound", "verdicts_bound", "parent_bound"))
    print(f"  bottleneck bound: C / L {_spread(shares, 's', 'lock_bound', 1)}, C / V "
          f"{_spread(shares, 's', 'verdicts_bound', 1)}, C / P {_spread(shares, 's', 'parent_bound', 1)}: "
          + ", ".join(f"{cores} cores {min(cores, bound):.2f}x" for cores in (2, 4, 8, 16)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--arrival", choices=["write", "rename"], default="write",
                        help="files written in place, or written elsewhere and renamed in")
    parser.add_argument("--trickle-rate", type=float, default=200.0, help="files/s of the trickle")
    parser.add_argument("--trickle-files", type=int, default=1000)
    parser.add_argument("--backlog", type=int, default=0,
                        help="also drain this many 100-byte files present at start (0: skip)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, help="where the runs' folders go (default: the system's "
                        "temp dir); e.g. /dev/shm to leave the filesystem's cost out")
    parser.add_argument("--compare", type=Path, help="another checkout's daemon as a peer")
    parser.add_argument("--workers", type=int, help="`workers:` of our daemon (default: the daemon's)")
    parser.add_argument("--serial", action="store_true",
                        help="also measure the serial part of the work (bench/RESULTS.md)")
    parser.add_argument("--settle", type=float, default=0.0,
                        help="the watch's settle_seconds (default 0; the daemon's own default is 2)")
    parser.add_argument("--log-level", default="warning", choices=("debug", "info", "warning"),
                        help="the daemon's log level (default warning: no line per file)")
    parser.add_argument("--compare-log-level", choices=("debug", "info", "warning"),
                        help="the peer's log level (our own checkout unless --compare)")
    parser.add_argument("--compare-workers", type=int,
                        help="`workers:` of the peer (our own checkout unless --compare)")
    parser.add_argument("--compare-cpus", type=int,
                        help="run the peer (our own checkout unless --compare) on this many cores: "
                        "the measured speed-up the serial figures predict (--serial)")
    args = parser.parse_args()
    files = _payloads(args.files, args.size)
    runs = []
    for _ in range(args.runs):
        base = Path(tempfile.mkdtemp(prefix="scanwatch-bench-", dir=args.dir))
        try:
            runs.append(_one_run(base, files, args))
        finally:
            shutil.rmtree(base, ignore_errors=True)
    _report(runs, args)


if __name__ == "__main__":
    main()
