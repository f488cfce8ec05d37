"""`scanwatch scan --rescan-clean`: clean files scanned again after a signature update, resumable."""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Layout, wait_until
from realservers import S3Server
from test_s3 import S3Harness

from daemon.config import Config, YaraEngineConfig
from daemon.engines import build_engines
from daemon.engines.yara import YaraEngine
from daemon.journal import Journal
from daemon.model import VerdictKind
from daemon.rescan import rescan_clean

NEEDLE = b"needle-7f3a-new-signature"
RULE = 'rule NewSignature { strings: $a = "needle-7f3a-new-signature" condition: $a }\n'
INFECTED = ("d1/f0100.txt", "d2/f0700.txt")  # sorted order: one before the 500th file, one after


def _populate(clean: Path) -> dict[str, os.stat_result]:
    """1 000 small files in clean (two of them carry the needle); their lstat."""
    for i in range(1000):
        rel = f"d{i // 500 + 1}/f{i:04d}.txt"
        path = clean / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"file {i}\n".encode() + (NEEDLE if rel in INFECTED else b""))
    return {str(p.relative_to(clean)): p.lstat() for p in clean.rglob("*") if p.is_file()}


def _config(layout: Layout) -> Path:
    rules = layout.base / "new.yar"
    rules.write_text(RULE)
    raw = layout.config(engine={"rules": [str(rules)]})
    layout.config_path.write_text(yaml.safe_dump(raw))
    return layout.config_path


def _start(config: Path, pause_dir: Path, pause_at: str | None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SCANWATCH_PAUSE_DIR": str(pause_dir)}
    if pause_at:
        env["SCANWATCH_PAUSE_AT"] = pause_at
    return subprocess.Popen([sys.executable, "-m", "daemon.cli", "scan", "--config", str(config),
                             "--rescan-clean", "inbox"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _kill_at(config: Path, pause_dir: Path, point: str) -> None:
    """Run a rescan until it reaches `point`, then kill -9 it there."""
    proc = _start(config, pause_dir, point)
    try:
        wait_until(lambda: (pause_dir / f"{point}.reached").exists() or proc.poll() is not None,
                   timeout_s=60, what=point)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        assert proc.stdout and proc.stderr
        proc.stdout.close()
        proc.stderr.close()


def _events(text: bytes) -> list[dict[str, Any]]:
    found = []
    for line in text.decode().splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found


@pytest.mark.slow
def test_newly_infected_quarantined_after_kills_the_rest_untouched(layout: Layout, tmp_path: Path) -> None:
    before = _populate(layout.clean)
    config = _config(layout)
    pause_dir = tmp_path / "pause"
    pause_dir.mkdir()
    _kill_at(config, pause_dir, "rescan.scanned.500")
    assert layout.placed("quarantine") == [INFECTED[0]]  # the first, before the kill
    _kill_at(config, pause_dir, "move.captured")  # the second, cut off in the middle of its move
    assert not (layout.clean / INFECTED[1]).exists()
    # Its snapshot is placed, its original captured into staging (docs/integrity.md).
    assert [p.name for p in (layout.quarantine / "d2").iterdir()] == ["f0700.txt"]
    assert [p.suffix for p in (layout.state / "staging").iterdir()] == [".orig"]

    done = subprocess.run([sys.executable, "-m", "daemon.cli", "scan", "--config", str(config),
                           "--rescan-clean", "inbox", "--json"], capture_output=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert sorted(json.loads(line)["path"] for line in done.stdout.decode().splitlines()
                  if line.startswith('{"path"')) == [str(layout.clean / INFECTED[1])]
    started = next(e for e in _events(done.stderr) if e.get("event") == "rescan.started")
    assert started["resumed"] >= 700  # nothing done before is scanned again
    progress = [e for e in _events(done.stderr) if e.get("event") == "rescan.progress"]
    assert progress[-1] | {"rescan_id": 0} == {
        "event": "rescan.progress", "watch": "inbox", "rescan_id": 0, "done": 1000, "total": 1000,
        "clean": 998, "infected": 2, "failed": 0, "skipped": 0, "finished": True}
    assert any(not e["finished"] and e["done"] == 1000 for e in progress)  # one line per 1 000

    assert layout.placed("quarantine") == sorted(INFECTED)
    assert not [p for p in layout.quarantine.rglob(".scanwatch-*")]  # the cut-off move finished
    assert list((layout.state / "staging").iterdir()) == []  # its original dropped once placed
    for rel in INFECTED:
        placed = layout.quarantine / rel
        assert placed.stat().st_mode & 0o777 == 0o600
        # Its snapshot, checked against the scanned hash, with the file's times.
        st = placed.stat()
        assert (st.st_size, st.st_mtime_ns) == (before[rel].st_size, before[rel].st_mtime_ns)
        sidecar = json.loads((layout.quarantine / f"{rel}.scanwatch.json").read_text())
        assert sidecar["verdict"] == "infected" and sidecar["threats"] == ["NewSignature"]
        assert sidecar["destination"] == str(placed)
    assert layout.placed("clean") == sorted(set(before) - set(INFECTED))
    for rel in layout.placed("clean"):
        st = (layout.clean / rel).lstat()
        assert (st.st_ino, st.st_mtime_ns, st.st_mode) == (
            before[rel].st_ino, before[rel].st_mtime_ns, before[rel].st_mode)

    journal = Journal(layout.state / "journal.sqlite3")
    quarantined = journal.rows(verdict=VerdictKind.INFECTED)
    assert sorted(r.destination or "" for r in quarantined) == [str(layout.quarantine / r) for r in INFECTED]
    for row in quarantined:
        trail = journal.audit_trail(row.id)
        assert [a.action for a in trail] == ["rescan"]  # once, though a move was cut off
        assert "NewSignature" in trail[0].reason
    with sqlite3.connect(layout.state / "journal.sqlite3") as db:
        counted = db.execute("SELECT count(*), count(DISTINCT rescan_id) FROM rescan_files").fetchone()
    assert counted == (1000, 1)

    # That rescan finished: the next starts afresh, and finds everything left clean.
    again = subprocess.run([sys.executable, "-m", "daemon.cli", "scan", "--config", str(config),
                            "--rescan-clean", "inbox"], capture_output=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert _events(again.stderr)[-1]["clean"] == 998


def test_rescan_clean_needs_a_watch_or_paths(layout: Layout) -> None:
    config = layout.write_config()
    both = subprocess.run([sys.executable, "-m", "daemon.cli", "scan", "--config", str(config)],
                          capture_output=True)
    assert both.returncode == 2 and b"--rescan-clean" in both.stderr


# -- in place, on a real S3 server ------------------------------------------------------------------

@pytest.fixture
def harness(s3_server: S3Server, s3_bucket: str, tmp_path: Path, s3_env: dict[str, str]
            ) -> Callable[..., S3Harness]:
    def make(**kw: Any) -> S3Harness:
        return S3Harness(s3_server, s3_bucket, tmp_path, YaraEngine("default", YaraEngineConfig(type="yara")),
                         **kw)
    return make


def test_in_place_objects_newly_infected_are_tagged_infected(
        harness: Callable[..., S3Harness], s3_server: S3Server, tmp_path: Path) -> None:
    h = harness(clean="in_place", quarantine="in_place")
    h.client.put_object(Bucket=h.bucket, Key="in/a.txt", Body=b"hello", Tagging="owner=alice")
    h.put("in/b.txt", b"new threat: " + NEEDLE)
    h.put("in/c/d.txt", b"world")
    h.step()
    judged = {key: h.tags(f"in/{key}") for key in ("a.txt", "b.txt", "c/d.txt")}
    assert {t["scanwatch-verdict"] for t in judged.values()} == {"clean"}
    rules = tmp_path / "new.yar"
    rules.write_text(RULE)
    config = Config.model_validate({
        **h.config.model_dump(mode="json", include={"state_dir", "watches"}),
        "s3": {"endpoint_url": s3_server.endpoint_url, "region": s3_server.region},
        "engines": {"default": {"type": "yara", "rules": [str(rules)]}}})

    stderr = io.StringIO()
    summary = rescan_clean(config, build_engines(config), h.journal, "w", stream=stderr)

    assert summary.counts == {"clean": 2, "infected": 1, "failed": 0, "skipped": 0}
    tags = h.tags("in/b.txt")
    assert tags["scanwatch-verdict"] == "infected" and tags["scanwatch-threat"] == "NewSignature"
    assert h.tags("in/a.txt") == judged["a.txt"] and h.tags("in/c/d.txt") == judged["c/d.txt"]
    assert h.keys("") == ["in/a.txt", "in/b.txt", "in/c/d.txt"]  # nothing moved
    assert json.loads(stderr.getvalue().splitlines()[-1])["infected"] == 1
    row = next(r for r in h.journal.rows(verdict=VerdictKind.INFECTED))
    assert row.rel_path == "b.txt" and [a.action for a in h.journal.audit_trail(row.id)] == ["rescan"]
    assert h.watcher.poll_once() == 0  # the re-tagged object (a self-copy: a new ETag) is known
