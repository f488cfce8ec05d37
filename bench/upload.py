"""Upload: one 100 MB file through each HTTP adapter vs curl to the same emulator, same run.

Blazelock takes a multipart upload (curl -F), MetaDefender Core the raw bytes (curl -T).
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
from emulators.metadefender import MetadefenderEmulator  # noqa: E402

_ADAPTER = """
import json, os, sys, time
from pydantic import TypeAdapter
from daemon.config import EngineConfig
from daemon.engines import ENGINE_TYPES
from daemon.engines.base import ScanRequest
config = TypeAdapter(EngineConfig).validate_python(json.loads(sys.argv[1]))
path = sys.argv[2]
engine = ENGINE_TYPES[config.type]("bench", config)
fd = os.open(path, os.O_RDONLY)
size = os.fstat(fd).st_size
started = time.monotonic()
engine.scan(ScanRequest("bench", "big.bin", path, fd, size, "0" * 64, "bench:big.bin#000000000000"))
elapsed = time.monotonic() - started
# VmHWM, not ru_maxrss: that one starts from the parent's peak at fork (the Blazelock
# emulator's parsed multipart bodies), since exec keeps it.
status = open("/proc/self/status").read().splitlines()
peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"seconds": elapsed, "peak_rss_kb": peak_kb}))
"""


_Setup = tuple[dict[str, object], list[str]]


def _blazelock(url: str, path: Path) -> _Setup:
    """The adapter's config and the equivalent curl command."""
    attributes = json.dumps({"file_name": "big.bin", "external_reference_id": "bench:curl#1"})
    return ({"type": "blazelock", "url": url, "api_key": "test-key", "timeout": 300},
            ["curl", "-sS", "-o", "/dev/null", "-H", "Authorization: Bearer test-key",
             "-F", f"file=@{path}", "-F", f"attributes={attributes}", f"{url}/file-scans"])


def _metadefender(url: str, path: Path) -> _Setup:
    """The adapter's config and the equivalent curl command (raw body, no 100-continue wait)."""
    return ({"type": "metadefender", "url": url, "apikey": "test-key", "timeout": 300},
            ["curl", "-sS", "-o", "/dev/null", "-X", "POST", "-H", "apikey: test-key",
             "-H", "filename: big.bin", "-H", "Expect:", "-T", str(path), f"{url}/file"])


def _compare(name: str, path: Path, size_mb: float, setup: _Setup) -> None:
    config, curl = setup
    result = json.loads(subprocess.run([sys.executable, "-c", _ADAPTER, json.dumps(config), str(path)],
                                       capture_output=True, text=True, check=True, cwd=ROOT).stdout)
    started = time.monotonic()
    subprocess.run(curl, check=True)
    curl_s = time.monotonic() - started
    adapter_rate, curl_rate = size_mb / result["seconds"], size_mb / curl_s
    print(f"upload: one {size_mb:.0f} MB file to the {name} emulator on loopback")
    print(f"  scanwatch adapter: {adapter_rate:7.0f} MB/s   peak RSS {result['peak_rss_kb'] / 1024:.0f} MB")
    print(f"  curl             : {curl_rate:7.0f} MB/s   -> adapter at {adapter_rate / curl_rate:.0%} "
          "of curl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.bin"
        with open(path, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(1_000_000))
        size_mb = path.stat().st_size / 1e6
        with BlazelockEmulator() as blazelock:
            _compare("Blazelock", path, size_mb, _blazelock(blazelock.url, path))
        with MetadefenderEmulator() as metadefender:
            _compare("MetaDefender", path, size_mb, _metadefender(metadefender.url, path))


if __name__ == "__main__":
    main()
