"""The verdict cache: N files through the Blazelock emulator, half of them copies of the others.

Each run drops the same files twice into a fresh daemon, once with the cache on (the default)
and once with `cache: {enabled: false}`, in alternating order, and prints for each the vendor
submissions the emulator accepted (with the cache: the number of distinct contents) and the
time from the first drop to the last file placed. A vendor scan takes `--scan-ms` (sync
mode: the answer comes in the upload's response).

    python bench/cache.py [--files 1000] [--runs 3] [--scan-ms 100] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from emulators.blazelock import BlazelockEmulator  # noqa: E402
from local_throughput import run_daemon, spread  # noqa: E402


def _files(count: int, seed: int) -> tuple[list[tuple[str, bytes]], int]:
    """`count` files of 4 KB, half of them copies of the others, shuffled; and how many differ."""
    rng = random.Random(seed)
    distinct = [os.urandom(4096) for _ in range(count - count // 2)]
    bodies = distinct + [rng.choice(distinct) for _ in range(count // 2)]
    rng.shuffle(bodies)
    return [(f"f{i:05d}.bin", body) for i, body in enumerate(bodies)], len(distinct)


def _one(files: list[tuple[str, bytes]], args: argparse.Namespace, *, cache: bool) -> dict[str, float]:
    with BlazelockEmulator(scan_delay_s=args.scan_ms / 1000, sync_timeout_s=60) as emulator, \
            tempfile.TemporaryDirectory(prefix="scanwatch-bench-cache-") as tmp:
        engine = {"type": "blazelock", "url": emulator.url, "api_key": "test-key", "mode": "sync",
                  "rate_limit": 1_000_000, "timeout": 60,
                  **({} if cache else {"cache": {"enabled": False}})}
        figures = run_daemon(Path(tmp), files, args.concurrency, "write", engine=engine)
        return {"seconds": len(files) / figures["files_per_s"],
                "submissions": float(len(emulator.submissions())), "clean": figures["clean"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scan-ms", type=float, default=100.0)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    results: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for run in range(args.runs):
        files, distinct = _files(args.files, seed=run)
        for cache in (True, False) if run % 2 == 0 else (False, True):
            figures = _one(files, args, cache=cache)
            assert figures["clean"] == args.files, figures
            results[cache].append(figures)
            print(f"run {run + 1} cache {'on ' if cache else 'off'}: {figures['submissions']:.0f} "
                  f"submissions ({distinct} distinct contents), {figures['seconds']:.1f} s", flush=True)
    print(f"\ncache.py: {args.files} files (half copies), Blazelock emulator sync, {args.scan_ms:g} ms "
          f"per scan, concurrency {args.concurrency}, {os.cpu_count()} cores, {args.runs} runs, "
          "median (min - max)")
    print("| cache | vendor submissions | seconds | files/s |\n|---|---|---|---|")
    for cache in (True, False):
        runs = results[cache]
        print(f"| {'on' if cache else 'off'} | {spread([r['submissions'] for r in runs])} | "
              f"{spread([r['seconds'] for r in runs], 1)} | "
              f"{spread([args.files / r['seconds'] for r in runs])} |")
    ratios = [off["seconds"] / on["seconds"] for on, off in zip(results[True], results[False], strict=True)]
    print(f"| time off / on, same run | | {spread(ratios, 2)}x | |")


if __name__ == "__main__":
    main()
