"""YARA's `max_size`: larger files fail as too_large unmapped, so a scan's memory stays bounded."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import EICAR, ROOT, Layout
from test_integrity import Pauses

from daemon.config import YaraEngineConfig
from daemon.engines.base import ScanRequest
from daemon.engines.yara import YaraEngine
from daemon.errors import EnginePermanentError
from daemon.model import Reason, VerdictKind


def _scan(engine: YaraEngine, path: Path) -> object:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return engine.scan(ScanRequest("w", path.name, str(path), fd, size,
                                       hashlib.sha256(path.read_bytes()).hexdigest(), "w:x#0"))
    finally:
        os.close(fd)


def test_max_size_parses_sizes_and_defaults_to_512_mib() -> None:
    assert YaraEngineConfig(type="yara").max_size == 512 * 2**20
    assert YaraEngineConfig.model_validate({"type": "yara", "max_size": "2MB"}).max_size == 2_000_000


def test_a_file_over_max_size_fails_unscanned_and_one_at_it_is_scanned(tmp_path: Path) -> None:
    engine = YaraEngine("y", YaraEngineConfig(type="yara", max_size=len(EICAR)))
    at_limit, over = tmp_path / "at.com", tmp_path / "over.com"
    at_limit.write_bytes(EICAR)
    over.write_bytes(EICAR + b" ")
    assert _scan(engine, at_limit).kind is VerdictKind.INFECTED  # type: ignore[attr-defined]
    with pytest.raises(EnginePermanentError, match="engines.y.max_size") as refused:
        _scan(engine, over)
    assert refused.value.reason == Reason.TOO_LARGE


@pytest.mark.parametrize("value", ["lots", -1, "12 parsecs"])
def test_a_bad_max_size_is_a_config_error_naming_its_path(layout: Layout, value: object) -> None:
    layout.config_path.write_text(yaml.safe_dump(layout.config(engine={"max_size": value})))
    result = subprocess.run([sys.executable, "-m", "daemon.cli", "check-config", "--config",
                             str(layout.config_path)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 2
    assert "engines.default.max_size: " in result.stderr and "Traceback" not in result.stderr
    assert "expected a size" in result.stderr  # not "unknown key": the key exists


def test_a_2gb_sparse_file_fails_too_large_uncopied_and_unread(layout: Layout, daemon_factory) -> None:
    """Larger than the engine's `max_size` when found: failed as itself, never copied into
    staging (a dense 2 GiB there) nor hashed (docs/engines.md, "File size limits")."""
    daemon = daemon_factory(layout.write_config())
    daemon.wait_started()
    with open(layout.inbox / "sparse.bin", "wb") as f:
        f.truncate(2 * 2**30)
    inode = (layout.inbox / "sparse.bin").stat().st_ino
    moved = daemon.wait_for(lambda: daemon.named("file.moved"), timeout=120, what="the sparse file moved")
    peak_mb = daemon.peak_rss_kb() / 1024
    assert daemon.stop() == 0
    assert moved[0]["outcome"] == "failed" and moved[0]["reason"] == "too_large"
    assert layout.placed("failed") == ["sparse.bin"]
    assert (layout.failed / "sparse.bin").stat().st_ino == inode  # the original: no snapshot made
    sidecar = json.loads((layout.failed / "sparse.bin.scanwatch.json").read_text())
    assert sidecar["reason"] == "too_large" and sidecar["sha256"] is None  # never read
    assert peak_mb < 400, f"peak RSS {peak_mb:.0f} MB"  # max_size (512 MiB) was never mapped


def test_a_sparse_file_under_max_size_is_scanned_through_and_placed_still_sparse(
        layout: Layout, daemon_factory) -> None:
    """Its snapshot keeps its holes (daemon/staging.py): the data far past its first MiB is
    copied and scanned, the 256 MiB of holes around it cost no disk in staging or quarantine."""
    daemon = daemon_factory(layout.write_config())
    daemon.wait_started()
    with open(layout.inbox / "sparse.bin", "wb") as f:
        f.truncate(256 * 2**20)
        f.seek(200 * 2**20)
        f.write(EICAR)
    moved = daemon.wait_for(lambda: daemon.named("file.moved"), timeout=60, what="the sparse file moved")
    assert daemon.stop() == 0
    assert moved[0]["outcome"] == "infected"
    placed = layout.quarantine / "sparse.bin"
    assert placed.stat().st_size == 256 * 2**20 and placed.stat().st_blocks * 512 < 4 * 2**20
    with open(placed, "rb") as f:
        f.seek(200 * 2**20 - 1)
        assert f.read(len(EICAR) + 2) == b"\0" + EICAR + b"\0"


def test_a_file_found_too_large_then_rewritten_small_is_scanned_as_it_is_now(
        layout: Layout, daemon_factory, tmp_path: Path) -> None:
    """Refused from the size its watcher saw only while it still is that file: rewritten
    before a worker got to it, it is looked at anew (`file.changed`) and scanned."""
    pauses = Pauses(tmp_path / "pauses")
    daemon = daemon_factory(layout.write_config(watch={"settle_seconds": 0}), pauses.env("arrivals.taken"))
    daemon.wait_started()
    with open(layout.inbox / "big.bin", "wb") as f:
        f.truncate(2 * 2**30)
    pauses.reached(daemon, "arrivals.taken")  # found 2 GiB, handed to a worker
    (layout.inbox / "big.bin").write_bytes(b"small now")  # the same inode, rewritten
    pauses.go("arrivals.taken")
    daemon.wait_for(lambda: daemon.named("file.moved"), what="the file moved")
    assert daemon.stop() == 0
    assert layout.placed("clean") == ["big.bin"] and (layout.clean / "big.bin").read_bytes() == b"small now"
    assert daemon.named("file.changed") and layout.placed("failed") == []
