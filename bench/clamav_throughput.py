"""ClamAV throughput: N small files (1 % EICAR) through a watch with engine=clamav, beside
clamdscan on the same clamd in the same run: a per-file loop (one process per file, how
drop-folder scripts usually call it) and `clamdscan --multiscan` over the whole folder.

    python bench/clamav_throughput.py [--files 5000] [--loop-files 500]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from clamd_server import running_clamd  # noqa: E402
from local_throughput import _payloads, run_daemon  # noqa: E402


def _clamdscan(conf: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["clamdscan", f"--config-file={conf}", "--no-summary", *args],
                          capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--loop-files", type=int, default=500, help="files for the per-file loop")
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    files = _payloads(args.files, args.size)
    base = Path(tempfile.mkdtemp(prefix="scanwatch-bench-clamav-"))
    base.chmod(0o755)
    try:
        with running_clamd(max_threads=max(4, args.concurrency)) as clamd:
            engine = {"type": "clamav", "socket": str(clamd.socket), "mode": "auto"}
            daemon = run_daemon(base / "daemon", files, args.concurrency, "write", engine=engine)
            folder = base / "peer"
            folder.mkdir(mode=0o755)
            for name, body in files:
                (folder / name).write_bytes(body)
                (folder / name).chmod(0o644)
            started = time.time()
            for name, _ in files[: args.loop_files]:
                _clamdscan(clamd.conf, str(folder / name))
            loop_rate = args.loop_files / (time.time() - started)
            started = time.time()
            result = _clamdscan(clamd.conf, "--multiscan", str(folder))
            multiscan_rate = len(files) / (time.time() - started)
            found = result.stdout.count(b"FOUND")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"clamav_throughput: {args.files} files x {args.size} B, 1 % EICAR, one clamd, "
          f"{os.cpu_count()} cores")
    print(f"  scanwatch (clamav, mode auto: FILDES, concurrency {args.concurrency}): "
          f"{daemon['files_per_s']:7.0f} files/s  peak RSS {daemon['peak_rss_mb']:.0f} MB  "
          f"({daemon['infected']:.0f} infected, scanned and moved)")
    print(f"  clamdscan per file ({args.loop_files} files): {loop_rate:7.0f} files/s  "
          f"-> scanwatch is {daemon['files_per_s'] / loop_rate:.1f}x")
    print(f"  clamdscan --multiscan: {multiscan_rate:7.0f} files/s  ({found} found, scan only, "
          f"nothing moved) -> scanwatch is {daemon['files_per_s'] / multiscan_rate:.2f}x")


if __name__ == "__main__":
    main()
