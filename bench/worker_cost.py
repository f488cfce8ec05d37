"""What one file costs a worker, without the daemon around it (bench/RESULTS.md, "Issue 21:
the worker's cost per file"). Each figure is CPU time per file (or scan) of one process;
runs of several checkouts alternate, on one clamd (`--db one` or `synthetic`, MaxThreads 12).

- `pipeline`: one thread carries N files of 4 KB through `Pipeline.run_once` (snapshot,
  hash, scan, journal, move; tmpfs), the engine `yara` or `clamav` (FILDES); `--sleep-us`
  wraps the engine so that each scan first sleeps (a wait like clamd's, without clamd);
  `--concurrency` the engine's (2 by default): with clamd, how many scans the thread may
  have in flight at once (at most 4: daemon/pipeline/inflight.py).
- `engine`: `ClamavEngine.scan` alone on N held descriptors, `--threads` threads; the
  client's CPU and clamd's, per scan.
- `inflight`: the bare protocol, one thread, `zFILDES` on K pooled sessions at a time (the
  K replies read after the K sends): what a scan costs when its thread does not wait
  for each reply in turn. `--in-flight 1 4 12`.

    python bench/worker_cost.py pipeline --engine clamav --compare /work/wt/base [--sleep-us 400]
    python bench/worker_cost.py engine --threads 1 --compare /work/wt/base
    python bench/worker_cost.py inflight --in-flight 1 4 12
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import synthetic_db  # noqa: E402
from clamav_throughput import clamd_cpu_seconds  # noqa: E402
from clamd_server import running_clamd  # noqa: E402
from local_throughput import spread  # noqa: E402

# Run in a child with the checkout's `daemon` (PYTHONPATH): prints CPU ms per file, wall ms per file.
_PIPELINE = r'''
import os, shutil, sys, tempfile, threading, time
from pathlib import Path
from daemon.config import Config
from daemon.engines import build_engines
from daemon.journal import Journal, owner_token
from daemon.log import configure_logging
from daemon.pipeline import Pipeline
from daemon.watchers.local import LocalWatcher
sock, n, kind, sleep_s = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
concurrency = int(sys.argv[5])

class Sleepy:
    def __init__(self, engine):
        self._engine = engine
    def __getattr__(self, name):
        return getattr(self._engine, name)
    def scan(self, request):
        time.sleep(sleep_s)
        return self._engine.scan(request)

configure_logging("json", "warning")
base = Path(tempfile.mkdtemp(prefix="scanwatch-worker-cost-", dir="/dev/shm"))
try:
    inbox = base / "inbox"
    inbox.mkdir()
    engine = {"type": kind, "concurrency": concurrency, **({"socket": sock} if kind == "clamav" else {})}
    config = Config.model_validate({
        "state_dir": str(base / "state"), "log": {"format": "json", "level": "warning"},
        "engines": {"default": engine}, "workers": 1,
        "watches": [{"name": "w", "source": str(inbox), "engine": "default", "clean": str(base / "clean"),
                     "quarantine": str(base / "q"), "failed": str(base / "f"), "settle_seconds": 0,
                     "rescan_interval": 300}]})
    journal = Journal(config.state_dir / "journal.sqlite3")
    engines = {k: Sleepy(e) if sleep_s else e for k, e in build_engines(config).items()}
    for i in range(n):
        (inbox / f"f{i:05d}.bin").write_bytes(os.urandom(4096))
    LocalWatcher(config.watches[0], journal, threading.Event()).step()
    pipeline = Pipeline(config, journal, engines, owner=owner_token())
    cpu, wall = time.process_time(), time.perf_counter()
    while pipeline.run_once(["w"]):
        pass
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert len(list((base / "clean").iterdir())) == n
    print(1000 * cpu / n, 1000 * wall / n)
finally:
    shutil.rmtree(base, ignore_errors=True)
'''

# Prints the client's CPU µs per scan, clamd's CPU µs per scan, scans/s.
_ENGINE = r'''
import os, sys, threading, time
from daemon.config import ClamavEngineConfig
from daemon.engines.base import ScanRequest
from daemon.engines.clamav import ClamavEngine

def clamd_cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

sock, folder, threads, pid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
fds = [os.open(os.path.join(folder, name), os.O_RDONLY) for name in sorted(os.listdir(folder))]
engine = ClamavEngine("c", ClamavEngineConfig(type="clamav", socket=sock))

def scan(part):
    for fd in part:
        assert engine.scan(ScanRequest("w", "x", "x", fd, 4096, "0" * 64, "r")).kind.value == "clean"

scan(fds[:1])
cpu, clamd, wall = time.process_time(), clamd_cpu_seconds(pid), time.perf_counter()
running = [threading.Thread(target=scan, args=(fds[i::threads],)) for i in range(threads)]
for thread in running:
    thread.start()
for thread in running:
    thread.join()
n = len(fds)
print(1e6 * (time.process_time() - cpu) / n, 1e6 * (clamd_cpu_seconds(pid) - clamd) / n,
      n / (time.perf_counter() - wall))
'''


def _child(code: Path, script: str, *args: str) -> list[float]:
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=code, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(code)})
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return [float(x) for x in done.stdout.split()]


def _alternate(codes: list[Path], runs: int,
               one: Callable[[Path], list[float]]) -> dict[Path, list[list[float]]]:
    figures: dict[Path, list[list[float]]] = {code: [] for code in codes}
    for index in range(runs):
        for code in codes if index % 2 == 0 else codes[::-1]:
            figures[code].append(one(code))
    return figures


def _print(figures: dict[Path, list[list[float]]], names: tuple[str, ...], digits: int) -> None:
    for code, runs in figures.items():
        print(f"  {code}: " + ", ".join(f"{name} {spread([r[i] for r in runs], digits)}"
                                        for i, name in enumerate(names)))


def _files(folder: Path, count: int) -> None:
    folder.mkdir()
    for i in range(count):
        (folder / f"{i:05d}").write_bytes(os.urandom(4096))


def _inflight(sock: str, fds: list[int], k: int, clamd_pid: int) -> list[float]:
    sessions = []
    for _ in range(k):
        session = socket.socket(socket.AF_UNIX)
        session.connect(sock)
        session.sendall(b"zIDSESSION\0")
        sessions.append(session)
    before, cpu, clamd = resource.getrusage(resource.RUSAGE_SELF), os.times(), clamd_cpu_seconds(clamd_pid)
    for start in range(0, len(fds), k):
        batch = list(zip(sessions, fds[start:start + k], strict=False))
        for session, fd in batch:
            session.sendmsg([b"zFILDES\0\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
        for session, _ in batch:
            reply = b""
            while not reply.endswith(b"\0"):
                reply += session.recv(4096)
            assert reply.endswith(b" OK\0"), reply
    after, spent = resource.getrusage(resource.RUSAGE_SELF), os.times()
    for session in sessions:
        session.close()
    n = len(fds)
    return [1e6 * (spent.user + spent.system - cpu.user - cpu.system) / n,
            1e6 * (clamd_cpu_seconds(clamd_pid) - clamd) / n, (after.ru_nvcsw - before.ru_nvcsw) / n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["pipeline", "engine", "inflight"])
    parser.add_argument("--db", choices=["one", "synthetic"], default="synthetic")
    parser.add_argument("--files", type=int, default=1500)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--engine", choices=["yara", "clamav"], default="clamav")
    parser.add_argument("--sleep-us", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=2, help="pipeline: the engine's concurrency")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 4, 12])
    parser.add_argument("--compare", type=Path, nargs="*", default=[], help="other checkouts, alternating")
    args = parser.parse_args()
    codes = [ROOT, *args.compare]
    print(f"worker_cost {args.what}: {args.files} files x 4 KB, clamd database {args.db}, "
          f"load average {os.getloadavg()[0]:.1f}; {args.runs} runs, median (min - max)")
    with running_clamd(12, synthetic_db.write if args.db == "synthetic" else None,
                       start_timeout_s=600) as clamd, tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        if args.what == "pipeline":
            figures = _alternate(codes, args.runs, lambda code: _child(
                code, _PIPELINE, str(clamd.socket), str(args.files), args.engine, str(args.sleep_us / 1e6),
                str(args.concurrency)))
            _print(figures, ("CPU ms/file", "wall ms/file"), 3)
            return
        _files(Path(tmp) / "files", args.files)
        if args.what == "engine":
            figures = _alternate(codes, args.runs, lambda code: _child(
                code, _ENGINE, str(clamd.socket), str(Path(tmp) / "files"), str(args.threads),
                str(clamd.pid)))
            _print(figures, ("client µs/scan", "clamd µs/scan", "scans/s"), 1)
            return
        folder = Path(tmp) / "files"
        fds = [os.open(folder / name, os.O_RDONLY) for name in sorted(os.listdir(folder))]
        for k in args.in_flight:
            runs = [_inflight(str(clamd.socket), fds, k, clamd.pid) for _ in range(args.runs)]
            print(f"  {k} in flight: " + ", ".join(
                f"{name} {spread([r[i] for r in runs], 1)}"
                for i, name in enumerate(("client µs/scan", "clamd µs/scan", "waits/scan"))))
        print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
