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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_daemon(base: Path, files: list[tuple[str, bytes]], concurrency: int,
               arrival: str, rate: float | None = None,
               engine: dict[str, object] | None = None, code: Path = ROOT) -> dict[str, float]:
    """Run `scanwatch run` (from the checkout `code`) on `files`; figures of the run."""
    inbox = base / "inbox"
    inbox.mkdir(parents=True)
    base.chmod(0o755)  # clamd, as another user, reads files by path
    inbox.chmod(0o755)
    config = {
        "state_dir": str(base / "state"),
        "log": {"format": "json", "level": "warning"},
        "engines": {"default": {"type": "yara", **(engine or {}), "concurrency": concurrency}},
        "watches": [{"name": "bench", "source": str(inbox), "engine": "default",
                     "clean": str(base / "clean"), "quarantine": str(base / "quarantine"),
                     "failed": str(base / "failed"), "settle_seconds": 0, "rescan_interval": 300}],
    }
    (base / "scanwatch.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--config",
                             str(base / "scanwatch.yaml")], cwd=code, stdout=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(code)})
    journal = base / "state" / "journal.sqlite3"
    deadline = time.monotonic() + 30
    while not journal.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # watchers armed
    cpu_at_start = cpu_seconds(proc.pid)  # start-up (imports, config) is not per file
    staging = base / "staging"
    staging.mkdir()
    if arrival == "rename":
        for name, body in files:
            (staging / name).write_bytes(body)
    started = time.time()
    for index, (name, body) in enumerate(files):
        if arrival == "rename":  # the way SFTP servers finish uploads: rename into place
            os.rename(staging / name, inbox / name)
        else:
            (inbox / name).write_bytes(body)
        if rate:
            time.sleep(max(0.0, started + (index + 1) / rate - time.time()))
    dropped = time.time()
    peak_kb = 0
    conn = sqlite3.connect(journal)
    while True:
        peak_kb = max(peak_kb, _peak_rss_kb(proc.pid))
        done = conn.execute("SELECT count(*), max(done_at) FROM files WHERE state = 'done'").fetchone()
        if done[0] >= len(files):
            break
        if time.time() - started > 600:
            raise SystemExit(f"only {done[0]} of {len(files)} files done after 600 s")
        time.sleep(0.05)
    last_done = done[1]
    latencies = sorted(r[0] for r in conn.execute(
        "SELECT scanned_at - discovered_at FROM files WHERE state = 'done'"))
    outcomes = dict(conn.execute("SELECT verdict, count(*) FROM files GROUP BY verdict").fetchall())
    cpu_s = cpu_seconds(proc.pid) - cpu_at_start
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    return {
        "files_per_s": len(files) / (last_done - started),
        "drop_s": dropped - started,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99) - 1],
        "peak_rss_mb": peak_kb / 1024,
        "cpu_ms_per_file": 1000 * cpu_s / len(files),
        "clean": outcomes.get("clean", 0),
        "infected": outcomes.get("infected", 0),
    }


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--arrival", choices=["write", "rename"], default="write",
                        help="files written in place, or written elsewhere and renamed in")
    parser.add_argument("--trickle-rate", type=float, default=200.0, help="files/s of the trickle")
    parser.add_argument("--trickle-files", type=int, default=1000)
    args = parser.parse_args()
    files = _payloads(args.files, args.size)
    base = Path(tempfile.mkdtemp(prefix="scanwatch-bench-"))
    try:
        daemon = run_daemon(base / "daemon", files, args.concurrency, args.arrival)
        trickle = run_daemon(base / "trickle", files[:args.trickle_files], args.concurrency,
                             args.arrival, rate=args.trickle_rate)
        floor = run_floor(base, files)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"local_throughput: {args.files} files x {args.size} B, 1 % EICAR, YARA, "
          f"concurrency {args.concurrency}, arrival by {args.arrival}, {os.cpu_count()} cores")
    print(f"  scanwatch, burst : {daemon['files_per_s']:8.0f} files/s   "
          f"peak RSS {daemon['peak_rss_mb']:.0f} MB   "
          f"({daemon['clean']:.0f} clean, {daemon['infected']:.0f} infected; "
          f"queueing p50 {daemon['p50_ms']:.0f} ms)")
    print(f"  scanwatch, trickle {args.trickle_rate:.0f} files/s: detect->verdict "
          f"p50 {trickle['p50_ms']:.1f} ms  p99 {trickle['p99_ms']:.1f} ms   "
          f"peak RSS {trickle['peak_rss_mb']:.0f} MB")
    print(f"  bare python loop : {floor['files_per_s']:8.0f} files/s   (read+sha256+yara+rename, no daemon)")


if __name__ == "__main__":
    main()
