"""Faults in the destination under concurrency: nothing lost, nothing handled twice, status equals disk."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest
from conftest import ROOT, Daemon, Layout


@pytest.mark.parametrize("workers", [1, 2])
def test_destination_failing_then_recovering_under_concurrency_4(
        layout: Layout, daemon_factory: Callable[..., Daemon], workers: int) -> None:
    layout.clean.parent.mkdir(parents=True, exist_ok=True)
    layout.clean.write_bytes(b"a file where the clean directory should be")
    config = layout.write_config(engine={"concurrency": 4}, workers=workers)
    daemon = daemon_factory(config)
    daemon.wait_started()
    names = [f"file{i:02d}.bin" for i in range(60)]
    for name in names:
        (layout.inbox / name).write_bytes(name.encode() * 4000)
    daemon.wait_for(lambda: len({e["rel_path"] for e in daemon.named("move.failed")}) == 60,
                    timeout=30, what="every move failed once")
    assert "not a directory" in daemon.named("move.failed")[0]["error"].lower()
    layout.clean.unlink()
    daemon.wait_for(lambda: len(daemon.named("file.moved")) == 60, timeout=60, what="all 60 moved")
    assert daemon.stop() == 0

    assert layout.placed("clean") == names
    assert all((layout.clean / n).read_bytes() == n.encode() * 4000 for n in names)
    assert not any(layout.inbox.iterdir())
    for event in ("file.vanished", "worker.error", "file.internal_error"):
        assert daemon.named(event) == [], event
    # One worker per row: every failed attempt is logged once, with its own attempt number.
    attempts = [(e["rel_path"], e["move_attempts"]) for e in daemon.named("move.failed")]
    assert len(attempts) == len(set(attempts))
    status = json.loads(subprocess.run(
        [sys.executable, "-m", "daemon.cli", "status", "--config", str(config), "--json"],
        capture_output=True, check=True, cwd=ROOT).stdout)["watches"]["inbox"]
    assert status["states"] == {"done": 60} and status["outcomes"] == {"clean": 60}
