"""Upload: one 100 MB file through the Blazelock adapter vs curl to the same emulator, same run.

Prints MB/s of each and the adapter's peak RSS (measured in a child process that does only
the upload, so the emulator's memory is not counted).

    python bench/upload.py [--mb 100]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from emulators.blazelock import BlazelockEmulator  # noqa: E402

_ADAPTER = """
import json, os, resource, sys, time
from daemon.config import BlazelockEngineConfig
from daemon.engines.base import ScanRequest
from daemon.engines.blazelock import BlazelockEngine
url, path = sys.argv[1], sys.argv[2]
engine = BlazelockEngine("bench", BlazelockEngineConfig.model_validate(
    {"type": "blazelock", "url": url, "api_key": "test-key", "timeout": 300}))
fd = os.open(path, os.O_RDONLY)
size = os.fstat(fd).st_size
started = time.monotonic()
engine.scan(ScanRequest("bench", "big.bin", path, fd, size, "0" * 64, "bench:big.bin#000000000000"))
elapsed = time.monotonic() - started
print(json.dumps({"seconds": elapsed, "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, BlazelockEmulator() as emulator:
        path = Path(tmp) / "big.bin"
        with open(path, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(1_000_000))
        size_mb = path.stat().st_size / 1e6
        result = json.loads(subprocess.run([sys.executable, "-c", _ADAPTER, emulator.url, str(path)],
                                           capture_output=True, text=True, check=True, cwd=ROOT).stdout)
        attributes = json.dumps({"file_name": "big.bin", "external_reference_id": "bench:curl#1"})
        started = time.monotonic()
        subprocess.run(["curl", "-sS", "-o", "/dev/null", "-H", "Authorization: Bearer test-key",
                        "-F", f"file=@{path}", "-F", f"attributes={attributes}",
                        f"{emulator.url}/file-scans"], check=True)
        curl_s = time.monotonic() - started
    adapter_rate, curl_rate = size_mb / result["seconds"], size_mb / curl_s
    print(f"upload: one {size_mb:.0f} MB file to the Blazelock emulator on loopback")
    print(f"  scanwatch adapter: {adapter_rate:7.0f} MB/s   peak RSS {result['peak_rss_kb'] / 1024:.0f} MB")
    print(f"  curl -F          : {curl_rate:7.0f} MB/s   "
          f"-> adapter at {adapter_rate / curl_rate:.0%} of curl")


if __name__ == "__main__":
    main()
