"""Snapshot cost: a 1 GiB file snapshotted as the daemon does (daemon/staging.py), against `cp`.

On the root filesystem (ext4 here: `copy_file_range`, no reflink) the snapshot is timed
beside `cp` of the same file; on an XFS image with reflinks (loop-mounted, needs root;
left out when it cannot be mounted) the snapshot (`FICLONE`) is timed beside a full copy
(`cp --reflink=never`). The page cache is warm for both (the file was just written); dirty pages are
written back before each timed step.

    python bench/snapshot.py [--mib 1024] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from daemon.staging import StagingDirs  # noqa: E402


def _write(path: Path, mib: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(block)


def _timed(step: Callable[[], object], runs: int, cleanup: Callable[[], None]) -> list[float]:
    times = []
    for _ in range(runs):
        os.sync()  # no writeback of the previous run's pages in this one's time
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
        cleanup()
    return times


def _snapshot(base: Path, src: Path) -> Callable[[], str]:
    staging = StagingDirs(base / "state").for_source(str(base))

    def step() -> str:
        fd = os.open(src, os.O_RDONLY)
        try:
            snap, how = staging.snapshot(fd, 1)
            os.close(snap)
            return how
        finally:
            os.close(fd)
    return step


def _figures(base: Path, mib: int, runs: int, cp_args: list[str]) -> tuple[str, list[float], list[float]]:
    src = base / "big.bin"
    _write(src, mib)
    step = _snapshot(base, src)
    how = step()
    snap_s = _timed(step, runs, lambda: None)
    cp_s = _timed(lambda: subprocess.run(["cp", *cp_args, str(src), str(base / "copy.bin")], check=True),
                  runs, lambda: (base / "copy.bin").unlink())
    return how, snap_s, cp_s


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f} - {max(values):.3f})"


def _report(where: str, mib: int, how: str, snap_s: list[float], cp_s: list[float], cp: str) -> None:
    ratios = [c / s for s, c in zip(snap_s, cp_s, strict=True)]
    print(f"  {where}: snapshot by {how} {_spread(snap_s)} s ({mib / statistics.median(snap_s):.0f} MiB/s), "
          f"{cp} {_spread(cp_s)} s; speed vs {cp} {statistics.median(ratios):.2f}x "
          f"({min(ratios):.2f} - {max(ratios):.2f})")


def _xfs(base: Path) -> Path | None:
    image, mnt = base / "xfs.img", base / "xfs"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(4 << 30)
    for cmd in (["mkfs.xfs", "-q", "-m", "reflink=1", str(image)],
                ["mount", "-o", "loop", str(image), str(mnt)]):
        if shutil.which(cmd[0]) is None or subprocess.run(cmd, capture_output=True).returncode != 0:
            return None
    return mnt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"snapshot: a {args.mib} MiB file, {args.runs} runs, median (min - max), warm page cache")
    base = Path(tempfile.mkdtemp(prefix="scanwatch-bench-snap-"))
    try:
        root = base / "root"
        root.mkdir()
        _report("root filesystem", args.mib, *_figures(root, args.mib, args.runs, []), "cp")
        shutil.rmtree(root)
        mnt = _xfs(base)
        if mnt is None:
            print("  XFS with reflinks: left out (cannot make or mount an XFS image here)")
            return
        try:
            _report("XFS, reflink=1", args.mib, *_figures(mnt, args.mib, args.runs, ["--reflink=never"]),
                    "cp --reflink=never")
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
